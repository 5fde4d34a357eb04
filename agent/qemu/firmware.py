"""UEFI firmware (OVMF) as QEMU's firmware descriptors name it: the read-only code image
and the template of its variable store, found through the descriptor files a firmware
package installs (QEMU's docs/interop/firmware.json; Debian's `ovmf` puts them in
/usr/share/qemu/firmware), a VM's own copy of the variables, and the pflash options.

A VM keeps its variables (boot entries) in `VARS_FILE` in its directory: copied from the
template once, kept across stops and starts. A destination of a live migration makes its
own copy too: QEMU sends the flash content in the migration stream (RAM block
`system.flash1`) and writes it into that file when the guest resumes."""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import UserError
from agent.qemu.vmspec import format_keyval

DESCRIPTOR_DIRS = (Path("/etc/qemu/firmware"), Path("/usr/share/qemu/firmware"))
"""Where QEMU looks for firmware descriptors (a host's /etc overrides the package's file
of the same name); a user's ~/.config is left out: an agent serves the whole host."""
PACKAGE = "ovmf"
VARS_FILE = "uefi-vars.fd"
ARCH = "x86_64"
# Features that need more than ferry gives a guest: Secure Boot (with SMM, and keys an
# imported VM's fresh store does not have) and confidential guests.
UNWANTED_FEATURES = frozenset({"secure-boot", "requires-smm", "enrolled-keys", "amd-sev-es",
                               "amd-sev-snp", "intel-tdx"})
# QEMU's machine aliases as the versioned names descriptors match with globs.
MACHINE_PREFIXES = {"pc": "pc-i440fx-", "q35": "pc-q35-"}


@dataclass(frozen=True, slots=True)
class Uefi:
    """One UEFI firmware: its code image and the template of its variable store."""

    code: Path
    vars_template: Path
    descriptor: Path

    def pflash_arguments(self, vars_path: Path) -> list[str]:
        """The code image read-only as pflash unit 0, the VM's variables as unit 1."""
        flash = [("if", "pflash"), ("format", "raw")]
        return ["-drive", format_keyval([*flash, ("unit", "0"), ("readonly", "on"),
                                         ("file", str(self.code))]),
                "-drive", format_keyval([*flash, ("unit", "1"), ("file", str(vars_path))])]


def _descriptors(dirs: Sequence[Path]) -> list[Path]:
    """Descriptor files by name (QEMU's priority order); a name in an earlier directory
    hides the same name in later ones."""
    chosen: dict[str, Path] = {}
    for directory in dirs:
        try:
            entries = sorted(directory.glob("*.json"))
        except OSError:
            continue
        for entry in entries:
            chosen.setdefault(entry.name, entry)
    return [chosen[name] for name in sorted(chosen)]


def _read(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None   # an unreadable descriptor is skipped, as QEMU's tools skip it
    return data if isinstance(data, dict) else None


def _flash_files(data: dict[str, object]) -> tuple[str, str] | None:
    """(code, template) of a flash-mapped raw descriptor, else None."""
    mapping = data.get("mapping")
    if not isinstance(mapping, dict) or mapping.get("device") != "flash":
        return None
    code, template = mapping.get("executable"), mapping.get("nvram-template")
    if not isinstance(code, dict) or not isinstance(template, dict):
        return None
    if code.get("format", "raw") != "raw" or template.get("format", "raw") != "raw":
        return None
    if not isinstance(code.get("filename"), str) or not isinstance(template.get("filename"), str):
        return None
    return code["filename"], template["filename"]


def _fits(data: dict[str, object], machine: str) -> bool:
    interfaces = data.get("interface-types")
    features = data.get("features")
    targets = data.get("targets")
    if not isinstance(interfaces, list) or "uefi" not in interfaces:
        return False
    if isinstance(features, list) and UNWANTED_FEATURES & set(map(str, features)):
        return False
    probe = MACHINE_PREFIXES.get(machine, machine)
    return isinstance(targets, list) and any(
        isinstance(t, dict) and t.get("architecture") == ARCH
        and any(fnmatch.fnmatchcase(probe, str(glob)) for glob in t.get("machines") or ())
        for t in targets)


def find_uefi(machine: str, dirs: Sequence[Path] | None = None) -> Uefi:
    """The first UEFI firmware without Secure Boot for x86_64 `machine` whose files exist
    (descriptors in `dirs`, default DESCRIPTOR_DIRS); refused, naming the package to
    install, when there is none."""
    dirs = DESCRIPTOR_DIRS if dirs is None else dirs
    listed = []
    for path in _descriptors(dirs):
        data = _read(path)
        files = _flash_files(data) if data is not None else None
        if data is None or files is None or not _fits(data, machine):
            continue
        code, template = Path(files[0]), Path(files[1])
        if code.is_file() and template.is_file():
            return Uefi(code=code, vars_template=template, descriptor=path)
        listed.append(f"{path} names {code} and {template}")
    missing = f" ({'; '.join(listed)}, which are missing)" if listed else ""
    raise UserError(f"the VM boots with UEFI, and this host has no UEFI firmware for "
                    f"{ARCH} machine {machine} without Secure Boot{missing}: install "
                    f"Debian's {PACKAGE} package (apt-get install {PACKAGE}, or make setup), "
                    f"which puts OVMF and its descriptor in {dirs[-1]}")


def flash_images(dirs: Sequence[Path] | None = None) -> dict[Path, Path]:
    """Every flash code image this host's descriptors name (resolved) -> its variable
    template: the firmware a destination accepts as bundled, and how it pairs them."""
    out: dict[Path, Path] = {}
    for path in _descriptors(DESCRIPTOR_DIRS if dirs is None else dirs):
        data = _read(path)
        files = _flash_files(data) if data is not None else None
        if files is not None and Path(files[0]).is_file() and Path(files[1]).is_file():
            out.setdefault(Path(files[0]).resolve(), Path(files[1]))
    return out


def ensure_vars(template: Path, target: Path, *, fresh: bool = False) -> bool:
    """The VM's variable store at `target`, copied from `template` if it has none (or
    `fresh`: a migration's destination, whose content QEMU overwrites at resume); True
    if it was copied. An existing store of another size than the template's (another
    firmware build) is refused: OVMF would not find its variables in it."""
    if target.exists() and not fresh:
        have, want = target.stat().st_size, template.stat().st_size
        if have != want:
            raise UserError(f"{target} holds {have} bytes of UEFI variables, and the "
                            f"firmware's template {template} has {want}: move it away to "
                            f"start with fresh variables")
        return False
    partial = target.with_name(target.name + ".part")
    shutil.copyfile(template, partial)
    partial.chmod(0o600)
    partial.replace(target)
    return True

