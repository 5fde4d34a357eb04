"""The VMs an agent knows: one directory per VM under its home, with a vm.json record."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.errors import UserError
from agent.hostnet import attach
from agent.qemu.vm import is_qemu
from agent.state.config import AgentConfig

RECORD_FILE = "vm.json"


@dataclass(frozen=True, slots=True)
class VmRecord:
    """One VM this agent started or received."""

    name: str
    pid: int
    qmp_path: str
    ram_path: str
    vm_dir: str
    managed: bool = True      # ferry created its files (and may delete them)
    nics: list[dict[str, str]] = field(default_factory=list)   # NICs on host networks
    argv: list[str] = field(default_factory=list)   # QEMU's command line, when ferry started it

    def nic_networks(self) -> dict[str, str]:
        """NIC key -> the network it is on here."""
        return {n["key"]: n["network"] for n in self.nics if n.get("key") and n.get("network")}

    def alive(self) -> bool:
        """Whether the recorded QEMU process still runs."""
        return is_qemu(self.pid)


def record_path(config: AgentConfig, name: str) -> Path:
    return config.vms_dir / name / RECORD_FILE


def register(config: AgentConfig, record: VmRecord) -> None:
    """Write (atomically) the record of a VM now running on this host."""
    path = record_path(config, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    os.replace(tmp, path)


def load(config: AgentConfig, name: str) -> VmRecord:
    """The record of VM `name`, or a UserError listing the VMs this agent knows."""
    path = record_path(config, name)
    try:
        return VmRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        known = ", ".join(r.name for r in list_vms(config)) or "none"
        raise UserError(f"no VM named {name!r} on this agent (known: {known}); "
                        f"use --qmp PATH for a VM started by other tools") from None
    except (ValueError, TypeError) as exc:
        raise UserError(f"corrupt VM record {path}: {exc}") from exc


def list_vms(config: AgentConfig) -> list[VmRecord]:
    """Every VM record in the agent's home, sorted by name (dead ones included)."""
    records = []
    if config.vms_dir.is_dir():
        for path in sorted(config.vms_dir.glob(f"*/{RECORD_FILE}")):
            try:
                records.append(VmRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
    return records


def is_running(config: AgentConfig, name: str) -> bool:
    """Whether a VM of that name is recorded here and its QEMU still runs."""
    try:
        return load(config, name).alive()
    except UserError:
        return False


def forget(config: AgentConfig, name: str) -> None:
    """Drop the record of a VM that left this host (its directory stays for its logs)."""
    record_path(config, name).unlink(missing_ok=True)


def release_departed(config: AgentConfig, name: str) -> None:
    """The VM left this host: drop its record and what ferry made for it (its RAM file,
    its macvtaps; its taps went with QEMU). Its directory stays, for its logs."""
    try:
        record = load(config, name)
    except UserError:
        return
    forget(config, name)
    if record.managed and record.ram_path:
        Path(record.ram_path).unlink(missing_ok=True)
    attach.remove_recorded(record.nics)
