"""`ferry import SOURCE`: another hypervisor's VM (a .vmx, OVF/OVA, .vbox or a bare
image) read into a ferry VM definition and reported first, always (`--inspect` stops
there); then, on this host (`--local`) or on a trusted peer (`--to PEER`, through the
local agent: agent.importer.remote_source), each disk copied through QEMU's block layer into
an image ferry creates, verified, and the VM recorded (`HOME/vms/NAME/import.json`) and
with `--start` started as an ordinary ferry VM. `--warm` passes copy only what changed
since the last; `--cutover` is the last pass and creates the VM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.commands.common import (
    add_config_argument,
    add_home_argument,
    human_bytes,
    load_agent_config,
    resolve_home,
)
from agent.commands.jobrun import run_attached
from agent.commands.vm_cmds import start_imported
from agent.errors import UserError
from agent.importer.common import normalize_mac
from agent.importer.definition import RECORD_FILE, DiskDef, Level, NicDef, VmDefinition
from agent.qemu import firmware
from agent.qemu.nics import parse_net_map
from agent.qemu.vmspec import keyval_get, parse_keyval, parse_size
from agent.state import vms

if TYPE_CHECKING:
    from agent.importer.copy import Progress

NIC_OPTION_MODELS = ("virtio-net-pci", "e1000", "e1000e", "vmxnet3", "rtl8139")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import", help="bring a VM from another hypervisor (VMware, VirtualBox, OVF/OVA, "
                       "bare images)",
        description="Read SOURCE (a .vmx, .ovf or a directory holding one, .ova, .vbox, or "
                    "a bare .vhdx/.vhd/.vdi/.vmdk/qcow2/raw image) into a ferry VM "
                    "definition and print every decision, warning and refusal. Exit "
                    "status 1 when something refuses the import.")
    p.add_argument("source", type=Path, metavar="SOURCE")
    p.add_argument("--inspect", action="store_true",
                   help="only read SOURCE and report; copy nothing")
    p.add_argument("--json", action="store_true", help="print the definition as JSON")
    p.add_argument("--net-map", action="append", default=[], metavar="SRC=NETWORK",
                   help="put NICs on source network SRC onto ferry network NETWORK "
                        "(repeatable)")
    p.add_argument("--memory", metavar="SIZE", help="a bare image's guest RAM, e.g. 2G")
    p.add_argument("--cpus", type=int, default=1, metavar="N", help="a bare image's vCPUs")
    p.add_argument("--nic", action="append", default=[], metavar="NETWORK[,mac=M,model=D]",
                   help="a bare image's NIC on ferry network NETWORK (repeatable)")
    p.add_argument("--firmware", choices=("bios", "uefi"), default="bios",
                   help="a bare image's firmware (default bios)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true",
                       help="import onto this host's agent (the disks are readable here)")
    where.add_argument("--to", metavar="PEER",
                       help="import onto trusted peer PEER: this host's agent reads the "
                            "disks (under its allowed paths) and sends them over the "
                            "encrypted channel; the peer writes, verifies and records the VM")
    p.add_argument("--name", help="the VM's name here (default: the source's)")
    p.add_argument("--format", choices=("qcow2", "raw"), default="qcow2",
                   help="the imported disks' format (default qcow2)")
    p.add_argument("--dir", type=Path, metavar="DIR",
                   help="where the disks go, an allowed path (default HOME/vms/NAME; with "
                        "--to, a directory on the peer, default the peer's HOME/vms/NAME)")
    p.add_argument("--compress", default="off", metavar="off|zstd:N",
                   help="with --to: zstd for the disk batches (default off: disk data "
                        "rarely pays on a fast link)")
    passes = p.add_mutually_exclusive_group()
    passes.add_argument("--warm", action="store_true",
                        help="copy while the source may still run; repeat to send only "
                             "what changed; create nothing yet")
    passes.add_argument("--cutover", action="store_true",
                        help="the last warm pass (the source VM shut down), then create")
    p.add_argument("--start", action="store_true", help="start the VM once created")
    p.add_argument("--ram", choices=("file", "private"), default="file",
                   help="with --start: RAM as for ferry vm start (default file)")
    add_home_argument(p)
    add_config_argument(p)
    p.set_defaults(func=run)


def parse_nic(text: str) -> NicDef:
    """--nic NETWORK[,mac=M][,model=D] of a bare image."""
    pairs = parse_keyval(text, "network")
    network = keyval_get(pairs, "network")
    unknown = {k for k, _ in pairs} - {"network", "mac", "model"}
    if not network or unknown:
        raise UserError(f"--nic {text!r}: use NETWORK[,mac=MAC][,model=MODEL]")
    model = keyval_get(pairs, "model") or "virtio-net-pci"
    if model not in NIC_OPTION_MODELS:
        raise UserError(f"--nic {text!r}: model {model!r} is not one of "
                        f"{', '.join(NIC_OPTION_MODELS)}")
    return NicDef(model=model, mac=normalize_mac(keyval_get(pairs, "mac")),
                  source_network=network, network=network)


def run(args: argparse.Namespace) -> int:
    """`ferry import`: the definition first, always; with --inspect only its report.
    (The copy is to be `run_import(definition, args)`, called here without --inspect.)"""
    definition = read_definition(args)
    if args.inspect:
        return run_inspect(definition, args)
    return run_import(definition, args)


def read_definition(args: argparse.Namespace) -> VmDefinition:
    """SOURCE read into a definition, with --net-map and a bare image's options."""
    # The readers and the copy (numpy, QEMU's block layer) load only for an import: every
    # other ferry command starts 0.15 s sooner without them.
    from agent.importer.inspect import read_source
    memory = parse_size(args.memory, default_suffix="m") if args.memory else 0
    return read_source(args.source, net_map=parse_net_map(args.net_map), memory=memory,
                       cpus=args.cpus, nics=[parse_nic(t) for t in args.nic],
                       firmware=args.firmware)


def run_inspect(definition: VmDefinition, args: argparse.Namespace) -> int:
    """Print the definition (a report, or --json); exit status 1 when it has refusals."""
    if args.json:
        print(json.dumps(definition.to_json(), indent=2))
    else:
        print("\n".join(report_lines(definition)))
    return 1 if definition.refusals() else 0

def report_lines(defn: VmDefinition) -> list[str]:
    """The human report: the VM, its disks and NICs, then every decision, every warning
    (each with its remedy) and last the refusals."""
    lines = [f"{defn.name} ({defn.source}): {defn.cpus} vCPU ({defn.sockets} socket(s) x "
             f"{defn.cores} core(s)), {human_bytes(defn.memory)}, {defn.firmware}, "
             f"machine {defn.machine}",
             f"  SMBIOS UUID {defn.uuid or '-'}, guest OS {defn.os_type or '-'}"]
    for d in defn.disks:
        size = human_bytes(d.virtual_size) if d.virtual_size else "size unknown"
        where = f"{d.path}" + (f" member {d.member} at byte {d.member_offset}"
                               if d.member else "")
        boot = f", boot {d.boot_order}" if d.boot_order else ""
        lines.append(f"  disk {d.bus} {d.controller}:{d.unit} {d.format} {size}{boot}: "
                     f"{where}")
    for i, n in enumerate(defn.nics):
        lines.append(f"  nic {i}: {n.model} mac {n.mac or 'new'} source network "
                     f"{n.source_network or '-'} -> {n.network or '(unmapped)'}")
    for level in (Level.DECISION, Level.WARNING, Level.REFUSAL):
        lines += [note.line() for note in defn.notes if note.level is level]
    refused = len(defn.refusals())
    lines.append(f"{refused} refusal(s): nothing can be imported" if refused
                 else "ready to import")
    return lines


def run_import(definition: VmDefinition, args: argparse.Namespace) -> int:
    """Report, copy every disk (a pass), and unless --warm record (and --start) the VM."""
    from agent.importer.copy import default_state_file, import_disk
    if args.to:
        return run_remote(definition, args)
    if not args.local:
        raise UserError("say where the VM goes: --local (this host), or --inspect to only "
                        "read SOURCE")
    config = load_agent_config(args)
    print("\n".join(report_lines(definition)))
    if definition.refusals():
        return 1
    if args.start and definition.firmware == "uefi":
        firmware.find_uefi(definition.machine)   # no OVMF here: refused before copying
    unmapped = [n for n in definition.nics if not n.network]
    if args.start and unmapped:
        raise UserError(f"NIC {unmapped[0].mac or ''} on source network "
                        f"{unmapped[0].source_network!r} has no ferry network here: map it "
                        f"with --net-map SRC=NETWORK (networks: "
                        f"{', '.join(sorted(config.networks)) or 'none configured'})")
    name = args.name or definition.name
    directory = (args.dir or config.vms_dir / name).absolute()
    if (directory / RECORD_FILE).exists() or (config.vms_dir / name / RECORD_FILE).exists():
        raise UserError(f"a VM named {name} was already imported here "
                        f"({directory / RECORD_FILE}); choose another --name")
    disks = [d for d in definition.disks if d.media == "disk"]
    directory.mkdir(parents=True, exist_ok=True)
    warm = args.warm or args.cutover
    targets = []
    for n, disk in enumerate(disks):
        target = directory / f"{name}-disk{n}.{args.format}"
        state = default_state_file(target) if warm else None
        report = asyncio.run(import_disk(disk.path, target, roots=config.roots,
                                         target_format=args.format, source_format=disk.format,
                                         state_file=state, progress=_progress(n),
                                         window=_window(disk),
                                         run_dir=config.run_dir if config.run_dir.is_dir()
                                         else None))
        print(f"  disk{n}: {report.source} -> {report.target}: pass {report.warm_pass}, "
              f"{human_bytes(report.bytes_read)} read, {report.blocks_changed} blocks "
              f"changed, {human_bytes(report.bytes_written)} written, "
              f"{human_bytes(report.zero_bytes_skipped)} zero skipped, "
              f"{report.mb_per_s:.0f} MB/s, verified {report.verified}")
        targets.append((disk, target, args.format))
    if args.warm:
        print(f"warm pass done; run again to send what changed, then with --cutover once "
              f"{definition.name} is shut down")
        return 0
    for _, target, _ in targets:
        default_state_file(target).unlink(missing_ok=True)
    imported = dataclasses.replace(definition, name=name, disks=tuple(
        dataclasses.replace(d, path=t, format=f) for d, t, f in targets))
    # The record goes where `ferry vm start NAME` looks, whatever --dir the disks went to.
    home_dir = config.vms_dir / name
    home_dir.mkdir(parents=True, exist_ok=True)
    (home_dir / RECORD_FILE).write_text(json.dumps(imported.to_json(), indent=2) + "\n")
    print(f"imported {name}: {len(targets)} disk(s) in {directory}")
    if args.start:
        start_imported(config, imported, private=args.ram == "private")
    else:
        # Known here, stopped: `ferry vm start NAME` starts it, `ferry export` writes it out.
        vms.register(config, vms.VmRecord(name=name, pid=0, qmp_path="", ram_path="",
                                          vm_dir=str(home_dir)))
        print(f"start it with: ferry vm start {name}")
    return 0


def run_remote(definition: VmDefinition, args: argparse.Namespace) -> int:
    """--to PEER: print the report, refuse what cannot work, then ask this host's agent to
    run the pass as a job (`import` control op) and follow it to its report."""
    lines = report_lines(definition)
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    if definition.refusals():
        return 1
    if args.start and definition.firmware == "uefi":
        raise UserError(f"{definition.name} boots with UEFI; ferry starts only BIOS guests "
                        f"yet: import it without --start")
    unmapped = [n for n in definition.nics if not n.network]
    if args.start and unmapped:
        raise UserError(f"NIC {unmapped[0].mac or ''} on source network "
                        f"{unmapped[0].source_network!r} has no ferry network: map it with "
                        f"--net-map SRC=NETWORK to one of {args.to}'s networks")
    if args.warm and args.start:
        raise UserError("--warm creates no VM yet: give --start with --cutover")
    name = args.name or definition.name
    # The agent opens the images itself: absolute paths, as meant here.
    defn = dataclasses.replace(definition, name=name, disks=tuple(
        dataclasses.replace(d, path=d.path.absolute()) for d in definition.disks))
    request = {"op": "import", "to": args.to, "definition": defn.to_json(),
               "format": args.format, "dir": str(args.dir) if args.dir else None,
               "warm": args.warm, "cutover": args.cutover, "start": args.start,
               "private": args.ram == "private", "compress": args.compress}
    if args.dir is not None and not args.dir.is_absolute():
        raise UserError(f"--dir {args.dir}: give an absolute path on {args.to}")
    return run_attached(resolve_home(args), request, as_json=args.json,
                        render=remote_report_text,
                        cancelling=f"{args.to} removes what this pass created")


def remote_report_text(report: dict[str, Any]) -> str:
    """The human report of an import pass to a peer (or, on the peer, of the incoming one)."""
    incoming = report.get("direction") == "import-in"
    lines = [f"{'incoming import' if incoming else 'import'} {report.get('status')}: "
             f"{report.get('vm')} {'from' if incoming else 'to'} {report.get('peer')} "
             f"(job {report.get('job')})"]
    if report.get("error"):
        lines.append(f"  error: {report['error']}")
    for n, d in enumerate(report.get("disks") or ()):
        lines.append(f"  disk{n}: {d['source']} -> {d['target']}: pass {d['warm_pass']}, "
                     f"{human_bytes(d['bytes_read'])} read, {d['blocks_changed']} blocks "
                     f"changed, {human_bytes(d['bytes_written'])} written, "
                     f"{human_bytes(d['wire_bytes'])} on the wire, "
                     f"{human_bytes(d['zero_bytes_skipped'])} zero skipped, "
                     f"{d['mb_per_s']:.0f} MB/s, verified {d['verified']}")
    if incoming:
        lines.append(f"  received {human_bytes(report.get('wire_bytes') or 0)} for "
                     f"{report.get('disks_done')} disk(s) into {report.get('vm_dir') or '-'}")
    elif report.get("status") == "completed":
        if report.get("created"):
            lines.append(f"imported {report.get('vm')} on {report.get('peer')} in "
                         f"{report.get('vm_dir')}" + (", started" if report.get("started")
                                                      else ""))
            if report.get("start_error"):
                lines.append(f"  it did not start: {report['start_error']}")
            elif not report.get("started"):
                lines.append(f"start it there with: ferry vm start {report.get('vm')}")
        else:
            lines.append(f"warm pass done; run again to send what changed, then with "
                         f"--cutover once {report.get('vm')} is shut down")
    lines.append(f"  total: {report.get('total_ms')} ms")
    return "\n".join(lines)


def _window(disk: DiskDef) -> tuple[int, int] | None:
    """Where in its package file a disk inside an OVA is (read in place, not unpacked)."""
    if disk.member_offset is None or disk.member_size is None:
        return None
    return disk.member_offset, disk.member_size


def _progress(n: int) -> Callable[[Progress], None]:
    """A progress line on stderr, at most once a second."""
    last = [0.0]

    def show(p: Progress) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or p.done >= p.total:
            last[0] = now
            print(f"  disk{n}: {human_bytes(p.done)} of {human_bytes(p.total)}, "
                  f"{p.rate / 1e6:.0f} MB/s", file=sys.stderr)
    return show
