"""The import conversation (`ferry import SOURCE --to PEER`): what the importing agent
(role source: it reads the images) and the peer (role destination: it writes the targets
and records the VM) may say in each state, as per-role tables in the style of the
migration's (agent.migration.conversation), and the checks every import message passes
before it has any effect.

An import is a conversation of its own, not a migration's: no QEMU runs on either side,
nothing is committed (a pass ends with FINISH), and a warm import is many conversations
over days. The messages share the channel's kinds and ops (agent.migration.protocol).

    source                                   destination
    IMPORT {job, definition, disks, ...}     IMPORT_READY {targets, vm_dir} | ERROR
    per disk: DISK_BATCH*, DISK_END {disk}   HASHES* {disk, first, count, hashes}
                                             DISK_WRITTEN {disk, blocks_written, ...}
    FINISH {create, start}                   FINISHED {name, vm_dir, created, started}
    ABORT {reason} (any time before)         ABORTED {removed}

Docs: `python -m agent.importer.talk --write` draws the tables into docs/architecture.md.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import docgen
from agent.batch.format import HASH_SIZE
from agent.errors import ProtocolError
from agent.importer.common import MAX_CPUS, MAX_DISK, MAX_MEMORY
from agent.importer.definition import DISK_BUSES, NIC_MODELS, VmDefinition
from agent.importer.images import TARGET_FORMATS
from agent.migration.conversation import (
    Conversation,
    Dir,
    Role,
    Table,
    tables_markdown,
)
from agent.migration.protocol import MAX_CONTROL_BYTES, Control, Kind, Op


class ImportState(enum.StrEnum):
    """Where one side's import conversation is."""

    IDLE = "idle"              # nothing said yet
    PREPARING = "preparing"    # IMPORT said: the destination checks and makes its targets
    COPYING = "copying"        # disk batches of the current disk
    VERIFYING = "verifying"    # DISK_END said: the destination flushes and hashes
    FINISHING = "finishing"    # FINISH said: the destination records the VM
    ABORTING = "aborting"      # ABORT said: the destination removes what it made
    CLOSED = "closed"          # the conversation is over


S = ImportState
ABORTABLE = (S.PREPARING, S.COPYING, S.VERIFYING, S.FINISHING)


def _table(role: Role) -> Table:
    out, inn = (Dir.SEND, Dir.RECV) if role is Role.SOURCE else (Dir.RECV, Dir.SEND)
    t: Table = {
        (S.IDLE, out, Op.IMPORT): S.PREPARING,
        (S.PREPARING, inn, Op.IMPORT_READY): S.COPYING,
        (S.COPYING, out, Kind.DISK_BATCH): S.COPYING,
        (S.COPYING, out, Op.DISK_END): S.VERIFYING,
        (S.VERIFYING, inn, Op.HASHES): S.VERIFYING,
        (S.VERIFYING, inn, Op.DISK_WRITTEN): S.COPYING,
        (S.COPYING, out, Op.FINISH): S.FINISHING,
        (S.FINISHING, inn, Op.FINISHED): S.CLOSED,
        (S.ABORTING, inn, Op.ABORTED): S.CLOSED,
    }
    for state in ABORTABLE:
        t[(state, out, Op.ABORT)] = S.ABORTING
        t[(state, inn, Op.ERROR)] = S.CLOSED
        t[(state, out, Op.ERROR)] = S.CLOSED
    # Said while the ABORT was on its way: heard, no longer acted on.
    for late in (Op.IMPORT_READY, Op.HASHES, Op.DISK_WRITTEN, Op.FINISHED, Op.ERROR):
        t[(S.ABORTING, inn, late)] = S.ABORTING
    t[(S.CLOSED, out, Op.ABORT)] = S.CLOSED       # best effort after the other gave up
    return t


TABLES: dict[Role, Table] = {role: _table(role) for role in Role}


def conversation(role: Role) -> Conversation:
    """A fresh import conversation for one side."""
    return Conversation(role, TABLES[role], S.IDLE, name="import")


# ------------------------------------------------------------------ message checks

JOB_ID = re.compile(r"[0-9a-f]{12}")
TOKEN = re.compile(r"[0-9a-f]{32}")
VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
MAX_DISKS = 64
MAX_TEXT = 4096            # a note, a network name, a path
HASH_RUN_BLOCKS = 32768
"""Blocks per HASHES message (512 KiB of hashes, 2 GiB of disk): its base64 stays well
inside a control message."""


@dataclass(frozen=True, slots=True)
class DiskOffer:
    """One disk the source will send: its index, size and how much of it holds data."""

    index: int
    virtual_size: int
    allocated: int


@dataclass(frozen=True, slots=True)
class ImportRequest:
    """A checked IMPORT message."""

    job: str
    definition: VmDefinition      # disks' paths are the source host's (not opened here)
    disks: tuple[DiskOffer, ...]
    target_format: str
    directory: str | None         # an absolute path on the destination, or its default
    warm: bool                    # a warm pass: the targets stay for the next one
    token: str                    # names one warm import's targets across its passes
    first_pass: bool              # the source has no state: the targets must not exist

    def body(self) -> dict[str, Any]:
        return {"job": self.job, "definition": self.definition.to_json(),
                "disks": [{"index": d.index, "virtual_size": d.virtual_size,
                           "allocated": d.allocated} for d in self.disks],
                "format": self.target_format, "dir": self.directory, "warm": self.warm,
                "token": self.token, "first_pass": self.first_pass}

    @classmethod
    def parse(cls, msg: Control) -> ImportRequest:
        body = msg.body
        job = _text(body, "job", pattern=JOB_ID)
        definition = check_definition(body.get("definition"))
        disks_in = body.get("disks")
        if not isinstance(disks_in, list) or len(disks_in) > MAX_DISKS:
            raise ProtocolError(f"import message: disks is not a list of at most {MAX_DISKS}")
        disks = []
        for n, item in enumerate(disks_in):
            if not isinstance(item, dict) or set(item) != {"index", "virtual_size",
                                                           "allocated"}:
                raise ProtocolError(f"import message: disk {n} is not "
                                    f"{{index, virtual_size, allocated}}")
            index = _int(item, "index", 0, MAX_DISKS - 1)
            if index != n:
                raise ProtocolError(f"import message: disk {n} has index {index}")
            size = _int(item, "virtual_size", 1, MAX_DISK)
            disks.append(DiskOffer(index, size, _int(item, "allocated", 0, size)))
        wanted = [d for d in definition.disks if d.media == "disk"]
        if len(wanted) != len(disks):
            raise ProtocolError(f"import message: {len(disks)} disks offered, the "
                                f"definition has {len(wanted)}")
        fmt = body.get("format")
        if fmt not in TARGET_FORMATS:
            raise ProtocolError(f"import message: format {str(fmt)[:20]!r} is not one of "
                                f"{', '.join(TARGET_FORMATS)}")
        directory = body.get("dir")
        if directory is not None and (not isinstance(directory, str) or
                                      not directory.startswith("/") or
                                      len(directory) > MAX_TEXT or "\0" in directory):
            raise ProtocolError(f"import message: dir {str(directory)[:60]!r} is not an "
                                f"absolute path")
        return cls(job=job, definition=definition, disks=tuple(disks), target_format=fmt,
                   directory=directory, warm=_bool(body, "warm"),
                   token=_text(body, "token", pattern=TOKEN),
                   first_pass=_bool(body, "first_pass"))


def check_definition(data: object) -> VmDefinition:
    """An imported VM's definition from the peer: every field of the expected type and
    range (it becomes the VM's import.json and, with --start, its QEMU's arguments)."""
    if not isinstance(data, dict):
        raise ProtocolError("import message: definition is not an object")
    try:
        defn = VmDefinition.from_json(data)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"import message: malformed definition: {exc}") from None
    if not isinstance(defn.name, str) or not VM_NAME.fullmatch(defn.name):
        raise ProtocolError(f"import message: VM name {str(defn.name)[:70]!r} is not letters, "
                            f"digits, '_', '.', '-' (at most 64)")
    _range("memory", defn.memory, 1, MAX_MEMORY)
    for label, value in (("cpus", defn.cpus), ("sockets", defn.sockets),
                         ("cores", defn.cores)):
        _range(label, value, 1, MAX_CPUS)
    _choice("firmware", defn.firmware, ("bios", "uefi"))
    _choice("machine", defn.machine, ("pc", "q35"))
    for label, text in (("uuid", defn.uuid), ("os_type", defn.os_type),
                        ("source", defn.source)):
        _optional_text(label, text)
    if len(defn.disks) > MAX_DISKS or len(defn.nics) > MAX_DISKS:
        raise ProtocolError(f"import message: more than {MAX_DISKS} disks or NICs")
    for d in defn.disks:
        _choice("disk bus", d.bus, DISK_BUSES)
        _choice("disk media", d.media, ("disk", "cdrom"))
        _range("disk controller", d.controller, 0, 255)
        _range("disk unit", d.unit, 0, 255)
        if d.boot_order is not None:
            _range("disk boot order", d.boot_order, 1, 255)
        _optional_text("disk format", d.format)
    for nic in defn.nics:
        _choice("NIC model", nic.model, NIC_MODELS)
        if nic.mac is not None and (not isinstance(nic.mac, str)
                                    or not MAC.fullmatch(nic.mac)):
            raise ProtocolError(f"import message: NIC MAC {str(nic.mac)[:20]!r} is not "
                                f"aa:bb:cc:dd:ee:ff")
        _optional_text("NIC network", nic.network)
        _optional_text("NIC source network", nic.source_network)
    for note in defn.notes:
        _optional_text("note", note.text)
        _optional_text("note", note.remedy)
    return defn


def hashes_body(disk: int, first: int, hashes: bytes | memoryview) -> dict[str, Any]:
    """A HASHES message's body: the hashes of blocks [first, first + n)."""
    return {"disk": disk, "first": first, "count": len(hashes) // HASH_SIZE,
            "hashes": base64.b64encode(hashes).decode()}


def parse_hashes(msg: Control, disk: int, nblocks: int, expected_first: int) -> bytes:
    """The hashes of a HASHES message about `disk`, whose blocks must follow on from
    `expected_first` without gap or overlap and stay inside its `nblocks`."""
    if _int(msg.body, "disk", 0, MAX_DISKS) != disk:
        raise ProtocolError(f"hashes message about disk {msg.body.get('disk')}, not {disk}")
    first = _int(msg.body, "first", 0, nblocks)
    count = _int(msg.body, "count", 1, HASH_RUN_BLOCKS)
    if first != expected_first or first + count > nblocks:
        raise ProtocolError(f"hashes message for blocks {first}..{first + count} of disk "
                            f"{disk}: expected them from block {expected_first} of {nblocks}")
    text = msg.body.get("hashes")
    if not isinstance(text, str):
        raise ProtocolError("hashes message without its hashes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"hashes message: bad base64: {exc}") from None
    if len(raw) != count * HASH_SIZE:
        raise ProtocolError(f"hashes message: {len(raw)} bytes for {count} blocks")
    return raw


def check_disk_end(msg: Control, disk: int) -> None:
    if _int(msg.body, "disk", 0, MAX_DISKS) != disk:
        raise ProtocolError(f"disk-end for disk {msg.body.get('disk')} while disk {disk} "
                            f"is being sent")


def _text(body: dict[str, Any], name: str, *, pattern: re.Pattern[str]) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ProtocolError(f"import message: {name} {str(value)[:40]!r} is malformed")
    return value


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"import message: {name} is {str(value)[:40]!r}, not an integer "
                            f"within {low}..{high}")
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if not isinstance(value, bool):
        raise ProtocolError(f"import message: {name} is {str(value)[:20]!r}, not true/false")
    return value


def _range(label: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"import message: {label} {str(value)[:40]!r} is out of range "
                            f"({low} to {high})")


def _choice(label: str, value: object, allowed: Iterable[str]) -> None:
    if value not in tuple(allowed):
        raise ProtocolError(f"import message: {label} {str(value)[:40]!r} is not one of "
                            f"{', '.join(allowed)}")


def _optional_text(label: str, value: object) -> None:
    if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
        raise ProtocolError(f"import message: {label} is not text of at most {MAX_TEXT} "
                            f"characters")


assert HASH_RUN_BLOCKS * HASH_SIZE * 4 // 3 + 200 < MAX_CONTROL_BYTES

# ---------------------------------------------------------------------------- docs

DOC_BEGIN = "<!-- import tables: generated by python -m agent.importer.talk -->"
DOC_END = "<!-- end of import tables -->"


def markdown() -> str:
    """Both roles' tables as markdown."""
    return tables_markdown(TABLES, DOC_BEGIN, DOC_END, title="import ")


def with_tables(doc: str) -> str:
    return docgen.splice(doc, DOC_BEGIN, DOC_END, markdown())


def main(argv: Iterable[str] | None = None) -> int:
    return docgen.main(argv, description=__doc__.splitlines()[0],
                       default_doc=Path("docs/architecture.md"), render=markdown,
                       rewrite=with_tables)


if __name__ == "__main__":
    sys.exit(main())
