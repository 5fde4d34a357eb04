"""`ferry status`, `jobs`, `job`, `cancel`, `limit`, `history`, `report`: watch and steer the
local agent's jobs (each a client of one control op: docs/control-api.md)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.commands.common import add_home_argument, human_bytes, resolve_home
from agent.commands.jobrun import run_attached
from agent.commands.migrate import report_text
from agent.commands.plot import draw_timeline
from agent.commands.render import ago, print_table, progress_line, when
from agent.service.control import ControlClient
from agent.units import parse_rate


def _command(subparsers: argparse._SubParsersAction, name: str, help_text: str,
             func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help_text, description=help_text[0].upper()
                              + help_text[1:] + ".")
    add_home_argument(p)
    p.add_argument("--json", action="store_true", help="print the agent's reply as JSON")
    p.set_defaults(func=func)
    return p


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    _command(subparsers, "status", "the local agent: version, uptime, peers, VMs, jobs",
             run_status)
    _command(subparsers, "jobs", "the jobs running or queued on the local agent", run_jobs)
    p = _command(subparsers, "job", "one job: its phase and latest progress", run_job)
    p.add_argument("id", help="job id (or a unique prefix)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="print live progress until the job ends, then its report")
    p = _command(subparsers, "cancel", "cancel a running or queued job (the VM stays here)",
                 run_cancel)
    p.add_argument("id", help="job id (or a unique prefix)")
    p = _command(subparsers, "limit", "change a bandwidth cap now: the agent's, shared by "
                 "every outbound job, or one job's", run_limit)
    p.add_argument("id", nargs="?", help="job id (or a unique prefix); none: the agent's cap")
    p.add_argument("--bandwidth", required=True, metavar="RATE",
                   help="bytes per second on the wire, e.g. 100M, 1G or 800Mbit; "
                        "'none' lifts the cap")
    p = _command(subparsers, "history", "finished jobs, newest first", run_history)
    p.add_argument("--limit", type=int, default=20, metavar="N",
                   help="show at most N jobs (default 20)")
    p = _command(subparsers, "report", "the report of a finished job", run_report)
    p.add_argument("id", help="job id (or a unique prefix)")
    p.add_argument("--png", type=Path, metavar="FILE",
                   help="also draw the job's timeline into FILE (PNG, 1200x800; needs "
                        "matplotlib: pip install 'ferry[plots]')")


def _call(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    with ControlClient(resolve_home(args) / "control.sock") as client:
        return client.call(request)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj))


def job_rows(jobs: list[dict[str, Any]]) -> list[list[Any]]:
    """Table rows of `jobs` entries: id, direction, VM, peer, state, progress, started."""
    rows = []
    for job in jobs:
        progress = job.get("progress") or {}
        if job.get("state") == "queued":
            detail = f"position {job.get('position')}"
        elif progress.get("event") == "progress":
            detail = progress_line(progress).split("  ", 1)[-1].strip()
        else:
            detail = ""
        rows.append([job.get("job"), job.get("direction"), job.get("vm"), job.get("peer"),
                     job.get("state"), job.get("phase"), detail, ago(job.get("started_at"))])
    return rows


JOB_COLUMNS = ("JOB", "DIRECTION", "VM", "PEER", "STATE", "PHASE", "PROGRESS", "STARTED")
HISTORY_COLUMNS = ("JOB", "DIRECTION", "VM", "PEER", "STATUS", "ENDED", "TOTAL", "DOWNTIME",
                   "WIRE", "ERROR")


def history_rows(entries: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for e in entries:
        downtime = e.get("downtime_ms")
        rows.append([e.get("job"), e.get("direction"), e.get("vm"), e.get("peer"),
                     e.get("status"), when(e.get("ended_at")),
                     f"{(e.get('total_ms') or 0) / 1000:.1f} s",
                     f"{downtime} ms" if downtime is not None else None,
                     human_bytes(e["wire_bytes"]) if e.get("wire_bytes") else None,
                     (e.get("error") or "")[:60] or None])
    return rows


def run_status(args: argparse.Namespace) -> int:
    reply = _call(args, {"op": "status"})
    if args.json:
        _print_json(reply)
        return 0
    limits = reply.get("limits", {})
    print(f"ferry agent {reply['version']}  pid {reply['pid']}  up {reply['uptime_s']:.0f} s"
          f"{'  (stopping)' if reply.get('stopping') else ''}")
    metrics = reply.get("metrics")
    print(f"  listen   {reply['listen']}\n  control  {reply['control']}\n"
          f"  metrics  {f'http://{metrics}/metrics' if metrics else 'off'}\n"
          f"  key      {reply['public_key']}")
    print(f"  limits   max_outbound {limits.get('max_outbound')}, max_inbound "
          f"{limits.get('max_inbound')}, bandwidth {_rate(limits.get('bandwidth'))}, "
          f"history {reply.get('history_jobs')} of {limits.get('history_limit')} jobs")
    peers = [[p["name"], p["address"],
              f"yes ({p['connect_ms']} ms)" if p.get("reachable") else f"no: {p.get('error')}"]
             for p in reply.get("peers", [])]
    print_table(("PEER", "ADDRESS", "REACHABLE"), peers, title="peers")
    vms = [[v["name"], v["pid"], "yes" if v["alive"] else "no", v["qmp"]]
           for v in reply.get("vms", [])]
    print_table(("VM", "PID", "RUNNING", "QMP"), vms, title="VMs")
    print_table(JOB_COLUMNS, job_rows(reply.get("jobs", [])), title="jobs")
    return 0


def run_jobs(args: argparse.Namespace) -> int:
    reply = _call(args, {"op": "jobs"})
    if args.json:
        _print_json(reply)
    elif not reply["jobs"]:
        print("no jobs running or queued")
    else:
        print_table(JOB_COLUMNS, job_rows(reply["jobs"]))
    return 0


def run_job(args: argparse.Namespace) -> int:
    if args.follow:
        return run_attached(resolve_home(args), {"op": "job", "id": args.id, "follow": True},
                            as_json=args.json, render=report_text,
                            cancelling=None,
                            progress_to=sys.stderr if args.json else sys.stdout)
    reply = _call(args, {"op": "job", "id": args.id})
    if args.json:
        _print_json(reply)
        return 0
    job = reply["job"]
    if reply.get("report") is not None:
        print(report_text(reply["report"]))
        return 0
    print_table(JOB_COLUMNS, job_rows([job]))
    if job.get("progress", {}).get("event") == "progress":
        print(progress_line(job["progress"]))
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    reply = _call(args, {"op": "cancel", "id": args.id})
    if args.json:
        _print_json(reply)
    else:
        print(f"cancelling {reply['job']} ({reply['state']}, {reply['phase']}); "
              f"`ferry job {reply['job']} --follow` shows how it ends")
    return 0


def _rate(rate: int | None) -> str:
    return "no cap" if rate is None else f"{human_bytes(rate)}/s"


def run_limit(args: argparse.Namespace) -> int:
    text = args.bandwidth.strip().lower()
    rate = None if text in ("none", "off", "0") else parse_rate(args.bandwidth)
    request: dict[str, Any] = {"op": "limit", "bandwidth": rate}
    if args.id:
        request["id"] = args.id
    reply = _call(args, request)
    if args.json:
        _print_json(reply)
    elif reply.get("job"):
        print(f"job {reply['job']}: bandwidth {_rate(reply['bandwidth'])} "
              f"(the agent's: {_rate(reply['agent_bandwidth'])})")
    else:
        print(f"agent bandwidth {_rate(reply['bandwidth'])}, for every outbound job")
    return 0


def run_history(args: argparse.Namespace) -> int:
    reply = _call(args, {"op": "history", "limit": args.limit})
    if args.json:
        _print_json(reply)
    elif not reply["jobs"]:
        print("no finished jobs")
    else:
        print_table(HISTORY_COLUMNS, history_rows(reply["jobs"]))
    return 0


def run_report(args: argparse.Namespace) -> int:
    reply = _call(args, {"op": "report", "id": args.id})
    if args.png is not None:
        draw_timeline(reply["report"], args.png)
    if args.json:
        _print_json(reply["report"])
    else:
        print(report_text(reply["report"]))
        if args.png is not None:
            print(f"  timeline:     {args.png}")
    return 0
