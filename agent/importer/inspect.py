"""What an import source is, read into one VmDefinition (`read_source`) and checked
against the limits and the net map (the report of it: `ferry import --inspect`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from agent.errors import UserError
from agent.importer.common import apply_net_map, check_limits
from agent.importer.definition import NicDef, VmDefinition
from agent.importer.image import read_image
from agent.importer.ovf import read_ova, read_ovf
from agent.importer.vbox import read_vbox
from agent.importer.vmx import read_vmx

CONFIG_READERS = {".vmx": read_vmx, ".ovf": read_ovf, ".ova": read_ova, ".vbox": read_vbox}


def read_source(path: Path, net_map: dict[str, str] | None = None, memory: int = 0,
                cpus: int = 1, nics: Sequence[NicDef] = (),
                firmware: str = "bios") -> VmDefinition:
    """The VM at `path`: a .vmx, .ovf, .ova, .vbox, a directory holding one .ovf (or one
    .vmx or .vbox), or a bare image (then memory, cpus, nics and firmware describe it)."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        path = _config_in(path)
    reader = CONFIG_READERS.get(path.suffix.lower())
    if reader is not None:
        defn = reader(path)
    else:
        defn = read_image(path, memory, cpus, nics, firmware)
    return apply_net_map(check_limits(defn), net_map or {})


def _config_in(directory: Path) -> Path:
    for suffix in (".ovf", ".vmx", ".vbox"):
        found = sorted(directory.glob(f"*{suffix}"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UserError(f"{directory}: holds {len(found)} {suffix} files; name one")
    raise UserError(f"{directory}: holds no .ovf, .vmx or .vbox")

