"""What the two agents say during a migration: message kinds and control operations.

Data messages carry bytes (page batches, device-state chunks); control messages carry
one JSON object with an "op". The order on the channel is the order of meaning: the
destination applies page batches in the order sent (the codec's COPY entries rely on
it), and feeds device state to its QEMU only after RAM_DONE, because devices may read
guest RAM while their state loads.

Source -> destination                     Destination -> source
  PREPARE {vm, options}                     PREPARED {dest_pid, ...} | ERROR
  RAM_BATCH* (rounds)                       ERROR (any time before COMMIT)
  ROUND {index, pages} (bookkeeping)
  DEVICE_STATE* / DEVICE_STATE_END
  RAM_DONE {final pages}                    LOADED {} when its QEMU took the device state
  COMMIT                                    COMMITTED {resume_us}
  ABORT {reason}                            ABORTED {}
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from agent.errors import ProtocolError
from agent.wire.messages import MsgType

MAX_CONTROL_BYTES = 1 << 20


class Kind(enum.IntEnum):
    """Message kinds on the migration channel (their channel type codes)."""

    CONTROL = MsgType.CONTROL            # one JSON object with an "op"
    RAM_BATCH = MsgType.RAM_PAGES        # an encoded page batch (agent.batch.codec) of guest RAM
    DISK_BATCH = MsgType.DISK_BLOCKS     # an encoded block batch of one disk
    DEVICE_STATE = MsgType.DEVICE_STATE  # raw bytes of QEMU's migration stream


class Op(enum.StrEnum):
    """Control operations."""

    PREPARE = "prepare"            # here is a VM: get ready to receive it
    PREPARED = "prepared"          # destination QEMU waits for incoming
    ROUND = "round"                # a pre-copy round finished (for the destination's log)
    RAM_DONE = "ram-done"          # every page is sent; the guest is stopped
    DEVICE_STATE_END = "device-state-end"  # QEMU's migration stream is complete
    LOADED = "loaded"              # destination QEMU loaded the device state, paused
    COMMIT = "commit"              # the destination now owns the VM: resume it
    COMMITTED = "committed"        # destination resumed
    ABORT = "abort"                # roll back: destination removes its QEMU and files
    ABORTED = "aborted"            # destination rolled back
    ERROR = "error"                # the sender failed; the job cannot continue
    STATUS = "status"              # after a lost link: what happened to job X?


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
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ProtocolError(f"malformed control message: {exc}") from exc
        return cls(op, data)


def control(op: Op, **body: Any) -> Control:
    """Shorthand: control(Op.COMMIT) or control(Op.ERROR, message=...)."""
    return Control(op, body)
