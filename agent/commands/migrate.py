"""`ferry migrate`: ask the local agent to move a VM, show progress, print the report."""

from __future__ import annotations

import argparse
from typing import Any

from agent.commands.common import add_home_argument, human_bytes, resolve_home
from agent.commands.jobrun import add_output_arguments, run_job
from agent.errors import UserError
from agent.migration.timeline import health_line
from agent.units import parse_rate


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("migrate", help="live-migrate a VM to a trusted peer",
                              description="Live-migrate a running VM to a trusted peer agent.")
    p.add_argument("vm", nargs="?", help="name of a VM the local agent knows")
    p.add_argument("--to", required=True, metavar="PEER", help="trusted peer name")
    p.add_argument("--qmp", metavar="PATH", help="QMP socket of a VM started by other tools")
    add_home_argument(p)
    p.add_argument("--downtime-ms", type=int, default=300, metavar="N",
                   help="longest acceptable pause of the guest (default 300)")
    p.add_argument("--bandwidth", metavar="RATE", help="cap on the wire rate, e.g. 500M")
    p.add_argument("--compress", default="auto", metavar="auto|off|zstd:N",
                   help="compression of page data (default auto)")
    p.add_argument("--no-dedup", action="store_true", help="do not send pages as references")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="pre-copy time budget before the timeout action (default 120)")
    p.add_argument("--timeout-action", choices=("abort", "force"), default="abort",
                   help="when pre-copy does not converge: roll back (default) or switch over")
    p.add_argument("--storage", choices=("copy", "shared"), default="copy",
                   help="copy the VM's writable disks live (default), or use the same paths "
                        "on the destination (shared storage)")
    p.add_argument("--disk-map", action="append", metavar="SRC=DST", default=[],
                   help="put the copy of disk SRC at DST on the destination (repeatable)")
    p.add_argument("--disk-format", choices=("qcow2", "raw"),
                   help="convert copied disks to this format (default: keep each one's)")
    p.add_argument("--net-map", action="append", metavar="SRC=NETWORK", default=[],
                   help="put the NIC SRC (its netdev id, its bridge here, or its network "
                        "here) on the destination's network NETWORK (repeatable)")
    add_output_arguments(p, detach="print the job id and return at once; the agent runs "
                                   "the job on (watch it with `ferry job ID --follow`)")
    p.set_defaults(func=run)


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The control request for these arguments (validated here for early, clear errors)."""
    if bool(args.vm) == bool(args.qmp):
        raise UserError("name a VM, or give --qmp PATH for a VM started by other tools")
    if args.downtime_ms <= 0:
        raise UserError("--downtime-ms must be positive")
    return {"op": "migrate", "vm": args.vm, "qmp": args.qmp, "to": args.to,
            "downtime_ms": args.downtime_ms,
            "bandwidth": parse_rate(args.bandwidth) if args.bandwidth else None,
            "compress": args.compress, "dedup": not args.no_dedup,
            "timeout_s": args.timeout, "timeout_action": args.timeout_action,
            "storage": args.storage, "disk_map": args.disk_map,
            "disk_format": args.disk_format, "net_map": args.net_map}


def report_text(report: dict[str, Any]) -> str:
    """The human-readable report (of a migration, a disk move or an import to a peer:
    `ferry job`, `ferry report`)."""
    if report.get("direction") == "local":
        from agent.commands import disk_cmds  # it imports this module
        return disk_cmds.report_text(report)
    if report.get("direction") in ("import", "import-in"):
        from agent.commands import import_cmd  # it imports this module
        return import_cmd.remote_report_text(report)
    if report.get("direction") == "inbound":
        return (f"incoming migration {report.get('status')}: {report.get('vm')} from "
                f"{report.get('peer')}\n  job:          {report.get('job')}\n"
                f"  total:        {report.get('total_ms')} ms")
    lines = [f"migration {report.get('status')}: {report.get('vm')} -> {report.get('peer')}",
             f"  job:          {report.get('job')}"]
    if report.get("error"):
        lines.append(f"  error:        {report['error']}")
    lines += [
        f"  total:        {report.get('total_ms')} ms",
        f"  downtime:     {report.get('downtime_ms')} ms",
        f"  iterations:   {report.get('rounds')} (QEMU's dirty-log syncs)",
        f"  RAM:          {human_bytes(report.get('ram_bytes', 0))}",
        (f"  pages sent:   {report.get('pages_sent')}: {report.get('data_pages')} data, "
         f"{report.get('unchanged_pages')} unchanged, {report.get('dedup_pages')} dedup, "
         f"{report.get('zero_pages')} zero"),
        (f"  on the wire:  {human_bytes(report.get('wire_bytes', 0))} "
         f"(compression {report.get('compression')}, DATA "
         f"{report.get('compression_ratio')}x)"),
    ]
    for disk in report.get("disks") or ():
        lines.append(f"  disk:         {disk['path']}: {disk['rounds']} rounds, "
                     f"{human_bytes(disk['wire_bytes'])} sent")
    if report.get("dest_pid"):
        lines.append(f"  destination:  QEMU pid {report['dest_pid']}")
    if report.get("status") == "completed" and "health" in report:
        lines.append(f"  guest pace after resume: {health_line(report['health'])}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    return run_job(resolve_home(args), request_from_args(args), args, render=report_text,
                   cancelling="the source VM keeps running")
