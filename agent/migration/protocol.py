"""What the two agents say during a migration: message kinds and control operations.

Data messages carry bytes (page batches, QEMU stream chunks); control messages carry
one JSON object with an "op". The order on the channel is the order of meaning: the
destination applies page batches in the order sent (the codec's COPY entries rely on
it), and feeds each QEMU_STREAM chunk to its QEMU only after every page batch before it
is in the RAM file, and the device state (after RAM_DONE) only once the disks are done.

Source -> destination                     Destination -> source
  PREPARE {vm, job, disk_map, ...}          PREPARED {dest_pid, npages} | ERROR
  RAM_BATCH* / QEMU_STREAM* / DISK_BATCH*   ERROR (any time before COMMIT)
  RAM_DONE {pages}: RAM and disks complete
  QEMU_STREAM* (device state)
  STREAM_END {bytes}                        LOADED {pages} when its QEMU loaded it all
  COMMIT                                    COMMITTED {resume_us, dest_pid, health_window_s}
                                            HEALTH {pace, window_s, samples} after the
                                              health window (none when it is 0)
  ABORT {reason}                            ABORTED {}
                                            ACK {received} now and then during pre-copy
On a new connection after the link was lost in pre-copy:
  RESUME {job}                              RESUMED {received} | ERROR
On a new connection, about an earlier job:
  STATUS {job}                              STATUS {job, outcome}
An import (`ferry import --to PEER`) is a conversation of its own on a new connection,
with its own tables (agent.importer.talk), sharing these kinds and ops:
  IMPORT {job, definition, disks, ...}      IMPORT_READY {targets, vm_dir} | ERROR
  DISK_BATCH* of one disk, DISK_END {disk}  HASHES* {disk, first, count, hashes}
                                            DISK_WRITTEN {disk, ...}
  FINISH {create, start}                    FINISHED {name, vm_dir, created, started}
  ABORT {reason}                            ABORTED {removed}
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from agent.errors import ProtocolError
from agent.wire.messages import MsgType

MAX_CONTROL_BYTES = 1 << 20
MAX_STREAM_CHUNK = 1 << 20
"""QEMU stream bytes in one QEMU_STREAM message, at most."""
MAX_INT_FIELD = (1 << 63) - 1
"""Largest value an integer field of a control message may hold."""


class Kind(enum.IntEnum):
    """Message kinds on the migration channel (their channel type codes)."""

    CONTROL = MsgType.CONTROL            # one JSON object with an "op"
    RAM_BATCH = MsgType.RAM_PAGES        # an encoded page batch (agent.batch.codec) of guest RAM
    DISK_BATCH = MsgType.DISK_BLOCKS     # an encoded block batch of one disk
    QEMU_STREAM = MsgType.QEMU_STREAM    # QEMU's migration stream, main block's pages cut


class Op(enum.StrEnum):
    """Control operations."""

    PREPARE = "prepare"            # here is a VM: get ready to receive it
    PREPARED = "prepared"          # destination QEMU waits for incoming
    RAM_DONE = "ram-done"          # every page and disk block is sent; device state follows
    STREAM_END = "stream-end"      # QEMU's migration stream is complete
    LOADED = "loaded"              # destination QEMU loaded the device state, paused
    COMMIT = "commit"              # the destination now owns the VM: resume it
    COMMITTED = "committed"        # destination resumed
    ABORT = "abort"                # roll back: destination removes its QEMU and files
    ABORTED = "aborted"            # destination rolled back
    ERROR = "error"                # the sender failed; the job cannot continue
    STATUS = "status"              # after a lost link: what happened to job X?
    RESUME = "resume"              # a new connection for job X, whose link was lost
    RESUMED = "resumed"            # the destination holds the first N messages: resend the rest
    ACK = "ack"                    # the destination has received the first N messages
    HEALTH = "health"              # the guest's pace at the destination after the resume
    # An import's (agent.importer.talk):
    IMPORT = "import"              # here is an imported VM's definition: make its targets
    IMPORT_READY = "import-ready"  # the targets exist (or are kept from a warm pass)
    DISK_END = "disk-end"          # every block of this disk's pass is sent
    HASHES = "hashes"              # the target's per-block hashes, one run of blocks
    DISK_WRITTEN = "disk-written"  # the disk is flushed and every hash sent
    FINISH = "finish"              # the pass is over: create the VM (or keep the targets)
    FINISHED = "finished"          # the VM is recorded (stopped or started)


@dataclass(frozen=True, slots=True)
class Control:
    """A decoded control message."""

    op: Op
    body: dict[str, Any]

    def encode(self) -> bytes:
        return json.dumps({"op": self.op.value, **self.body}).encode()

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Control:
        if len(payload) > MAX_CONTROL_BYTES:
            raise ProtocolError(f"control message of {len(payload)} bytes is too large")
        try:
            data = json.loads(bytes(payload))
            op = Op(data.pop("op"))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # RecursionError: JSON nested deeper than the parser's recursion limit.
            raise ProtocolError(f"malformed control message: {exc}") from None
        return cls(op, data)

    def int_field(self, name: str, default: int = 0, *, strict: bool = True) -> int:
        """The integer `name` of the body (`default` if absent): a JSON integer within
        0..MAX_INT_FIELD. Anything else is a ProtocolError, or `default` if not `strict`
        (a figure the job only reports must not fail it)."""
        value = self.body.get(name, default)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT_FIELD:
            return value
        if not strict:
            return default
        raise ProtocolError(f"{self.op.value} message: {name} is {str(value)[:40]!r}, not an "
                            f"integer within 0..{MAX_INT_FIELD}")


INT_FIELDS: dict[Op, tuple[str, ...]] = {
    Op.PREPARED: ("dest_pid",),
    Op.COMMITTED: ("resume_us", "dest_pid"),
}
"""The integer fields the jobs read from the peer's replies (with Control.int_field)."""


def control(op: Op, **body: Any) -> Control:
    """Shorthand: control(Op.COMMIT) or control(Op.ERROR, message=...)."""
    return Control(op, body)
