"""Running one agent job from the CLI: detached (its id), or attached with live progress
and its report at the end; Ctrl-C asks the agent to cancel it (`ferry migrate`, `disk
move`, `import --to`, `job --follow`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from agent.commands.render import ProgressView
from agent.errors import UserError
from agent.service.control import ControlClient

Report = dict[str, Any]


def add_output_arguments(parser: argparse.ArgumentParser, *, detach: str | None) -> None:
    """--json, and --detach (with its help) when the job may run on without the CLI."""
    if detach is not None:
        parser.add_argument("--detach", action="store_true", help=detach)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")


def follow_replies(client: ControlClient, view: ProgressView, *,
                   cancelling: str | None) -> Report:
    """Show the progress events of a job as they come and return its report; Ctrl-C asks
    the agent to cancel it (on the connection that started it; `cancelling` says what that
    leaves) and keeps reading, or with `cancelling` None (only watching) just stops."""
    while True:
        try:
            # A fresh iterator after each Ctrl-C: the interrupted one is finished.
            for reply in client.replies():
                if reply.get("event") in ("progress", "queued"):
                    view.update(reply)
                    continue
                if reply.get("event") == "result":
                    return reply
                if reply.get("ok") is False:
                    raise UserError(reply.get("error", "the agent refused the request"))
                return reply
            raise UserError("the agent closed the connection before the report")
        except KeyboardInterrupt:
            if cancelling is None:
                raise                # the job runs on; the agent stops sending to us
            # Ask the agent to roll back and keep reading: the report says how it ended.
            view.close()
            sys.stderr.write(f"\nferry: cancelling ({cancelling})...\n")
            client.send({"op": "cancel"})


def run_attached(home: Path, request: dict[str, Any], *, as_json: bool,
                 render: Callable[[Report], str], cancelling: str | None,
                 progress_to: TextIO | None = None) -> int:
    """Send the request, follow the job to its report, print it (JSON or `render`); the
    exit code: 0 when it completed."""
    with ControlClient(home / "control.sock", timeout=None) as client, \
            ProgressView(progress_to or sys.stderr, enabled=not as_json) as view:
        client.send(request)
        report = follow_replies(client, view, cancelling=cancelling)
    print(json.dumps(report) if as_json else render(report))
    return 0 if report.get("status") == "completed" else 1


def run_job(home: Path, request: dict[str, Any], args: argparse.Namespace, *,
            render: Callable[[Report], str], cancelling: str) -> int:
    """--detach: start the job and print its id (and its place in the queue); else
    run_attached."""
    if getattr(args, "detach", False):
        with ControlClient(home / "control.sock") as client:
            reply = client.call({**request, "detach": True})
        if args.json:
            print(json.dumps(reply))
        else:
            where = (f", queued at position {reply['position']}"
                     if reply.get("state") == "queued" else "")
            print(f"{reply['job']}{where}")
        return 0
    return run_attached(home, request, as_json=args.json, render=render,
                        cancelling=cancelling)
