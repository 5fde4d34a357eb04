"""`ferry vm start` and `ferry vm list`: migratable VMs kept in an agent's home."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence

from agent.commands.common import (
    add_config_argument,
    add_home_argument,
    human_bytes,
    load_agent_config,
)
from agent.errors import UserError
from agent.hostnet import attach
from agent.importer import argv as import_argv
from agent.importer.definition import RECORD_FILE, VmDefinition
from agent.qemu import firmware, vm
from agent.qemu import nics as guest_nics
from agent.qemu.vmspec import PAGE_SIZE, parse_size
from agent.state import vms
from agent.state.config import AgentConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("vm", help="start and list migratable VMs",
                              description="Start and list the VMs an agent knows.")
    sub = p.add_subparsers(dest="vm_command", metavar="ACTION", required=True)
    start = sub.add_parser("start", help="start a VM the agent knows (QMP socket)")
    start.add_argument("name")
    start.add_argument("--memory", metavar="SIZE",
                       help="guest RAM, e.g. 1G (an imported VM has its own)")
    start.add_argument("--ram", choices=("file", "private"), default="file",
                       help="guest RAM as a shared file in the agent's RAM directory "
                            "(default; tools can read it) or plain -m private memory")
    start.add_argument("--cpus", type=int, default=1, metavar="N")
    start.add_argument("--nic", action="append", default=[], metavar="NETWORK[,mac=M,model=D]",
                       help="a NIC on one of the agent's networks ([networks.NAME] in "
                            "agent.toml); model default virtio-net-pci, MAC made up "
                            "(52:54:00:...) unless given; repeatable")
    add_home_argument(start)
    add_config_argument(start)
    start.epilog = ("Extra QEMU arguments follow --, e.g.  "
                    "ferry vm start web01 --memory 1G -- -kernel guest.elf")
    start.set_defaults(func=run_start, takes_passthrough=True)
    listing = sub.add_parser("list", help="list the VMs this agent knows")
    add_home_argument(listing)
    add_config_argument(listing)
    listing.set_defaults(func=run_list)


def run_start(args: argparse.Namespace) -> int:
    config = load_agent_config(args)
    imported = config.vms_dir / args.name / RECORD_FILE
    if args.memory is None:
        if not imported.exists():
            raise UserError(f"say how much RAM {args.name} gets: --memory SIZE")
        if args.nic or args.passthrough:
            raise UserError(f"{args.name} was imported: its NICs and disks are its own "
                            f"(no --nic or extra QEMU arguments)")
        definition = VmDefinition.from_json(json.loads(imported.read_text()))
        start_imported(config, definition, private=args.ram == "private")
        return 0
    size = parse_size(args.memory, default_suffix="m")
    start_vm(config, args.name, size, cpus=args.cpus, nic_options=args.nic,
             extra=list(args.passthrough), private=args.ram == "private")
    return 0


def start_vm(config: AgentConfig, name: str, size: int, *, cpus: int,
             nic_options: Sequence[str], extra: Sequence[str], private: bool,
             machine: str = vm.MACHINE_TYPE) -> vms.VmRecord:
    """Start a VM the agent will know by name (`ferry vm start`, `ferry import --start`):
    TCG guests padded past QEMU's dirty-log bug, NICs on the agent's networks, recorded."""
    if size <= 0 or size % PAGE_SIZE:
        raise UserError(f"memory {size}: must be a positive multiple of 4 KiB")
    if vms.is_running(config, name):
        raise UserError(f"a VM named {name} already runs on this agent")
    accel = vm.choose_accel()
    padded = vm.dirty_log_safe_size(size, accel.accel, vm.qemu_binary_version(config.qemu_path()))
    if padded != size:
        print(f"note: {human_bytes(size)} is a multiple of {vm.TCG_DIRTY_BUG_PAGES} pages, "
              f"whose dirty pages QEMU < 9.0 under TCG loses in a migration; starting with "
              f"{padded // 1024}K instead")
        size = padded
    requested = [guest_nics.parse_nic_option(text, index)
                 for index, text in enumerate(nic_options)]
    nics = attach.plan([r.request for r in requested], config.networks)  # refuses early
    vm_dir = config.vms_dir / name
    vm_dir.mkdir(parents=True, exist_ok=True)
    backends = nics.create()
    try:
        nic_args = guest_nics.nic_arguments(requested, backends)
        spec = vm.LaunchSpec.in_directory(vm_dir, name, size, ram_dir=config.ram_dir,
                                          cpus=cpus, extra_args=(*nic_args, *extra),
                                          accel=accel, qemu_binary=config.qemu_path(),
                                          private_ram=private, machine=machine)
        process = asyncio.run(vm.launch(spec, pass_fds=nics.pass_fds))
    except BaseException:
        nics.remove()
        raise
    nics.handed_over()   # QEMU alone holds the taps: they go when it exits
    ram_path = "" if private else str(spec.ram_path)
    record = vms.VmRecord(name=name, pid=process.pid, qmp_path=str(spec.qmp_path),
                          ram_path=ram_path, vm_dir=str(vm_dir), managed=True,
                          nics=nics.records(), argv=list(process.argv))
    vms.register(config, record)
    process.detach()
    for nic in nics.records():
        print(f"  NIC {nic['key']}: {nic['mac']} on network {nic['network']}"
              f"{' (' + nic['ifname'] + ')' if nic['ifname'] else ''}")
    where = "private memory" if private else spec.ram_path
    print(f"started {name}: pid {process.pid}, {human_bytes(size)} RAM in "
          f"{where}, QMP {spec.qmp_path} ({process.accel.accel.value})")
    return record


def start_imported(config: AgentConfig, definition: VmDefinition, *,
                   private: bool) -> vms.VmRecord:
    """Start a VM `ferry import` created, as its definition says; a UEFI one under OVMF
    with its own variable store in its directory (copied from the template at its first
    start, kept after)."""
    flash: list[str] = []
    if definition.firmware == "uefi":
        uefi = firmware.find_uefi(definition.machine)
        if vms.is_running(config, definition.name):
            raise UserError(f"a VM named {definition.name} already runs on this agent")
        vars_path = config.vms_dir / definition.name / firmware.VARS_FILE
        vars_path.parent.mkdir(parents=True, exist_ok=True)
        if firmware.ensure_vars(uefi.vars_template, vars_path):
            print(f"  UEFI: OVMF {uefi.code}, fresh variables in {vars_path}")
        else:
            print(f"  UEFI: OVMF {uefi.code}, variables kept in {vars_path}")
        flash = uefi.pflash_arguments(vars_path)
    disks = [(d, d.path, d.format or "qcow2") for d in definition.disks if d.media == "disk"]
    return start_vm(config, definition.name, definition.memory, cpus=definition.cpus,
                    nic_options=import_argv.nic_options(definition),
                    extra=[*flash, *import_argv.vm_arguments(definition, disks)],
                    private=private, machine=definition.machine)


def run_list(args: argparse.Namespace) -> int:
    config = load_agent_config(args)
    records = vms.list_vms(config)
    if not records:
        print(f"no VMs in {config.vms_dir}")
        return 0
    print(f"{'NAME':<20} {'PID':>8}  {'STATE':<8} QMP")
    for record in records:
        state = "running" if record.alive() else "gone"
        print(f"{record.name:<20} {record.pid:>8}  {state:<8} {record.qmp_path}")
    return 0
