"""`ferry disk move`: ask the local agent to move a running VM's disk to other storage on
this host (QEMU's mirror job), show progress, print the report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.commands.common import add_home_argument, human_bytes, resolve_home
from agent.commands.jobrun import add_output_arguments, run_job
from agent.errors import UserError
from agent.units import parse_rate


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    disk = subparsers.add_parser("disk", help="a running VM's disks on this host",
                                 description="Work on a running VM's disks on this host.")
    commands = disk.add_subparsers(dest="disk_command", metavar="COMMAND", required=True)
    p = commands.add_parser(
        "move", help="move a disk of a running VM to other storage here, live",
        description="Move a running VM's disk to a new image on this host, live, through "
                    "QEMU's mirror job; the VM switches to the new image once it is in sync. "
                    "The old image is kept: remove it yourself.")
    p.add_argument("vm", nargs="?", help="name of a VM the local agent knows (or --qmp)")
    p.add_argument("disk", help="the disk: its drive or device id, node name or image path")
    p.add_argument("target", type=Path, help="the new image (created by ferry; must not exist)")
    p.add_argument("--format", choices=("qcow2", "raw"),
                   help="format of the new image (default: the disk's current one)")
    p.add_argument("--qmp", metavar="PATH", help="QMP socket of a VM started by other tools")
    p.add_argument("--speed", metavar="RATE", help="cap on the copy rate, e.g. 200M")
    add_home_argument(p)
    add_output_arguments(p, detach="print the job id and return at once (watch it with "
                                   "`ferry job ID --follow`)")
    p.set_defaults(func=run)


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The control request for these arguments."""
    if bool(args.vm) == bool(args.qmp):
        raise UserError("name a VM, or give --qmp PATH for a VM started by other tools")
    return {"op": "disk-move", "vm": args.vm, "qmp": args.qmp, "disk": args.disk,
            # The agent has its own working directory: send the path as meant here.
            "target": str(args.target.absolute()), "format": args.format,
            "speed": parse_rate(args.speed) if args.speed else None}


def report_text(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"disk move {report.get('status')}: {report.get('vm')} disk "
             f"{report.get('disk')} -> {report.get('target')}",
             f"  job:          {report.get('job')}"]
    if report.get("error"):
        lines.append(f"  error:        {report['error']}")
    if report.get("status") == "completed":
        seconds = (report.get("mirror_ms") or 0) / 1000
        rate = f" ({human_bytes(report.get('bytes', 0) / seconds)}/s)" if seconds else ""
        lines += [f"  format:       {report.get('source_format')} -> {report.get('format')}",
                  f"  copied:       {human_bytes(report.get('bytes', 0))} in "
                  f"{seconds:.1f} s{rate}"]
    lines.append(f"  total:        {report.get('total_ms')} ms")
    if report.get("note"):
        lines.append(f"  {report['note']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    return run_job(resolve_home(args), request_from_args(args), args, render=report_text,
                   cancelling="the VM stays on its old image")
