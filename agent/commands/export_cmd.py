"""`ferry export VM --format vmdk|vhdx|vpc|ova DIR`: a stopped ferry VM written for another
hypervisor (agent.importer.export)."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.commands.common import add_config_argument, add_home_argument, load_agent_config
from agent.errors import UserError
from agent.importer.export import FORMATS, definition_of, export_vm
from agent.state import vms


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a stopped VM's disks (or an OVA) for another hypervisor",
        description="Write a stopped ferry VM's disks as vmdk, vhdx or vpc (VHD) images into "
                    "DIR, or with --format ova one OVA package: an OVF descriptor of its "
                    "configuration, its disks as streamOptimized vmdk, a SHA256 manifest.")
    p.add_argument("vm", metavar="VM")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    add_home_argument(p)
    add_config_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_agent_config(args)
    record = vms.load(config, args.vm)
    if record.alive():
        raise UserError(f"VM {args.vm} is running (pid {record.pid}); shut it down first: "
                        f"an export copies its disks as they are")
    written = export_vm(definition_of(record), args.format, args.dir.absolute())
    for path in written:
        print(f"wrote {path}")
    return 0
