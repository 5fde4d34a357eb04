"""`ferry import SOURCE --inspect`: another hypervisor's VM (a .vmx, OVF/OVA, .vbox or a
bare image) read into a ferry VM definition and reported, before anything is copied.
The copy (`run_import(definition, args)`) is to sit beside `run_inspect`: both take
the definition `read_definition` made."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.commands.common import human_bytes
from agent.errors import UserError
from agent.importer.common import normalize_mac
from agent.importer.definition import Level, NicDef, VmDefinition
from agent.importer.inspect import read_source
from agent.qemu.nics import parse_net_map
from agent.qemu.vmspec import keyval_get, parse_keyval, parse_size

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
    raise UserError("ferry import copies nothing yet: run it with --inspect")


def read_definition(args: argparse.Namespace) -> VmDefinition:
    """SOURCE read into a definition, with --net-map and a bare image's options."""
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
