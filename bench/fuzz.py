"""Fuzzing ferry's decoders with structure-aware, seeded inputs (issue 11).

    python -m bench fuzz [--target wire|messages|batch|stream|all] [--count N] [--seed S]
                         [--json] [--replay FILE]

Each target takes --count inputs (default 1,000,000): valid inputs built with the project's
own encoders (sealed frames and Noise messages, control messages and VM descriptions, page
batches from BatchEncoder, QEMU streams from stream_format), then mutated (bit flips, byte
insert/delete, truncation, length and count fields set to zero/huge/off-by-one, splicing
of two inputs, JSON values of the wrong type, missing keys, huge numbers, deep nesting),
plus some pure random bytes, fed in random chunkings. Per target it prints the inputs, how
many were accepted, how many were rejected with the project's own errors (the FerryError
subclass each decoder promises: PeerError on the wire, ProtocolError/UserError for
messages, BatchError for batches, StreamError for QEMU's stream), the failures (any other
exception, a hang, a broken invariant: a forged frame delivered, a byte written outside the
target buffer, native and pure-Python twin disagreeing, a page index outside RAM or a page
read from outside the bytes received) and the rate. A failing input is saved as JSON under
bench/results/fuzz/ for `--replay FILE`; the exit code is 1 on any failure.

  wire      FrameDecoder (real AES-GCM keys) fed mutated frame streams; a responder Session
            fed the preamble, Noise messages 1 and 3 and frames; validly sealed frames of
            mutated type codes and payloads
  messages  migration.link.parse_message for every Kind and Op, and the fields the jobs
            read from replies; VmSpec.from_json of mutated VM descriptions
  batch     decode_and_apply into a buffer with guard regions, native and twin compared
  stream    StreamParser, native record loop and twin compared, random chunk splits

The same --seed gives the same inputs. Twins run on every input unless --twin-share says
otherwise (the share is printed).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import faulthandler
import hashlib
import json
import mmap
import os
import random
import signal
import sys
import time
import traceback
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.batch import _codec_py, codec
from agent.batch import format as bfmt
from agent.errors import (
    BatchError,
    FerryError,
    PeerError,
    ProtocolError,
    StreamEndError,
    UserError,
    WireCode,
)
from agent.migration import link, protocol
from agent.migration.protocol import Kind, Op
from agent.qemu import _stream_py, stream
from agent.qemu import stream_format as sfmt
from agent.qemu.stream import Forward, Pages, RamSection, RamSetup, StreamError, StreamParser
from agent.qemu.vmspec import VmSpec
from agent.storage.disk_sink import parse_disk_map
from agent.wire import frames as wframes
from agent.wire import session as wsession
from agent.wire.messages import Goodbye, Message, MsgType, Opened
from agent.wire.noise import HandshakeState, public_bytes

from . import parser as bench_parser

try:
    from agent._native import codec as native_codec
except ImportError:  # pragma: no cover - the extension is not built
    native_codec = None  # type: ignore[assignment]
try:
    from agent._native import qstream as native_qstream
except ImportError:  # pragma: no cover
    native_qstream = None  # type: ignore[assignment]

TARGETS = ("wire", "messages", "batch", "stream")
DEFAULT_COUNT = 1_000_000
CORPUS_SEED = 11
"""Seed of the valid inputs (and keys) every run starts from; --seed drives the mutations."""
HANG_SECONDS = 10.0
"""One input taking longer than this is a hang."""
WATCHDOG_SECONDS = 600.0
"""1000 inputs taking longer than this end the run (faulthandler prints where it hung): the
only way to see a hang inside native code that never returns to Python."""
RESULTS = Path(__file__).resolve().parent / "results" / "fuzz"
MAX_SAVED = 20
"""Failing inputs saved per target and run."""


class Hang(BaseException):
    """One input ran past HANG_SECONDS (BaseException: no `except Exception` swallows it)."""


class Broken(Exception):
    """An invariant of a decoder did not hold: always a failure."""


@dataclasses.dataclass
class Case:
    """One generated input, complete: replaying it needs nothing else."""

    target: str
    kind: str
    data: bytes
    chunks: list[int] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind,
                "data": base64.b64encode(self.data).decode(), "chunks": self.chunks,
                "extra": self.extra}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Case:
        return cls(obj["target"], obj["kind"], base64.b64decode(obj["data"]),
                   list(obj.get("chunks", [])), dict(obj.get("extra", {})))


# ---------------------------------------------------------------------------- mutations

Field = tuple[int, int, str]
"""A length, count or header field of a valid input: offset, width in bytes, '>' or '<'."""

INTERESTING = (0, 1, 2, 7, 8, 15, 16, 17, 24, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000,
               0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def special_value(rng: random.Random, width: int, old: int) -> int:
    top = (1 << (8 * width)) - 1
    pick = rng.randrange(8)
    if pick == 0:
        return 0
    if pick == 1:
        return top                      # -1 as unsigned
    if pick == 2:
        return (old + rng.choice((1, -1, 2, -2, 8, -8, 16, -16))) & top
    if pick == 3:
        return 1 << rng.randrange(8 * width)
    if pick == 4:
        return top >> 1                 # largest signed
    if pick == 5:
        return (top >> 1) + 1           # smallest signed, as unsigned
    if pick == 6:
        return rng.choice(INTERESTING) & top
    return rng.getrandbits(8 * width)


def mutate(rng: random.Random, data: bytes, fields: Sequence[Field] = (),
           other: bytes | None = None, rounds: int | None = None) -> bytes:
    """`data` with 1..4 structure-aware mutations."""
    buf = bytearray(data)
    for _ in range(rounds or rng.choice((1, 1, 1, 2, 2, 3, 4))):
        op = rng.randrange(12)
        n = len(buf)
        if op <= 1 and fields:                                      # a field to a special value
            at, width, order = rng.choice(fields)
            if at + width <= n:
                old = int.from_bytes(buf[at:at + width], "big" if order == ">" else "little")
                new = special_value(rng, width, old)
                buf[at:at + width] = new.to_bytes(width, "big" if order == ">" else "little")
                continue
        if op == 2 and n:                                           # bit flip
            at = rng.randrange(n)
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 3 and n:                                         # byte set
            buf[rng.randrange(n)] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 4:                                               # insert
            at = rng.randrange(n + 1)
            size = rng.choice((1, 1, 2, 4, 8, rng.randrange(1, 64)))
            buf[at:at] = (rng.randbytes(size) if rng.random() < 0.5
                          else bytes([rng.randrange(256)]) * size)
        elif op == 5 and n:                                         # delete
            at = rng.randrange(n)
            del buf[at:at + rng.choice((1, 1, 2, 4, 8, rng.randrange(1, 64)))]
        elif op == 6 and n:                                         # truncate
            del buf[rng.randrange(n):]
        elif op == 7 and n:                                         # truncate at a field
            if fields:
                at, width, _ = rng.choice(fields)
                del buf[min(n, at + rng.randrange(width + 1)):]
            else:
                del buf[rng.randrange(n):]
        elif op == 8 and n:                                         # duplicate a range
            at = rng.randrange(n)
            size = rng.randrange(1, min(n - at, 256) + 1)
            dest = rng.randrange(n + 1)
            buf[dest:dest] = buf[at:at + size]
        elif op == 9 and other:                                     # splice two inputs
            cut_a = rng.randrange(n + 1)
            cut_b = rng.randrange(len(other) + 1)
            buf = buf[:cut_a] + other[cut_b:]
        elif op == 10 and n >= 8:                                   # interesting word
            width = rng.choice((1, 2, 4, 8))
            at = rng.randrange(n - width + 1)
            value = special_value(rng, width, 0)
            buf[at:at + width] = value.to_bytes(width, rng.choice(("big", "little")))
        elif n:                                                     # random run
            at = rng.randrange(n)
            size = min(n - at, rng.randrange(1, 17))
            buf[at:at + size] = rng.randbytes(size)
    return bytes(buf)


MAX_PIECES = 48
"""Most pieces one input is fed in (more only costs time: the decoders see the same cuts)."""


def chunking(rng: random.Random, size: int, limit: int = 1 << 30) -> list[int]:
    """Sizes of the pieces `size` bytes are fed in (empty: all at once)."""
    pick = rng.randrange(6)
    if pick == 0 or size == 0:
        return [] if size <= limit else chunking(rng, size, limit)
    if pick == 1 and size <= MAX_PIECES:
        return [1] * size
    if pick == 2:
        step = rng.choice((2, 3, 7, 13, 16, 17, 64, 100, 1000, 4096, 4097))
        step = min(max(step, -(-size // MAX_PIECES)), limit)
        return [step] * (size // step) + ([size % step] if size % step else [])
    cuts = sorted(rng.randrange(size + 1) for _ in range(rng.randrange(1, 8)))
    pieces = [b - a for a, b in zip([0, *cuts], [*cuts, size], strict=True)]
    out: list[int] = []
    for piece in pieces:
        while piece > limit:
            out.append(limit)
            piece -= limit
        out.append(piece)
    return out


def pieces(data: bytes, chunks: Sequence[int]) -> Iterator[bytes]:
    if not chunks:
        yield data
        return
    at = 0
    for size in chunks:
        yield data[at:at + size]
        at += size
    if at < len(data):
        yield data[at:]


def json_junk(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of any type, some of them odd."""
    pick = rng.randrange(12 if depth < 3 else 8)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice((True, False))
    if pick == 2:
        return rng.choice((0, -1, 1, 2**31, 2**63, 2**64, -(2**63), 10**30, 4096, 4095))
    if pick == 3:
        return rng.choice((0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan")))
    if pick == 4:
        return rng.choice(("", "x", "ram", "/abs/path", "rel/path", "\u0000", "\udcff" * 0,
                           "é" * 3, "a" * 300, "-m", "qcow2", "raw", "1" * 30))
    if pick == 5:
        return "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randrange(20)))
    if pick == 6:
        return rng.getrandbits(rng.choice((8, 32, 64, 200)))
    if pick == 7:
        return 10 ** rng.randrange(1, 400)
    if pick in (8, 9):
        return [json_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(("a", "op", "vm", "key", "name", "", "index")): json_junk(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def _containers(node: Any, out: list[Any]) -> list[Any]:
    """Every list and object in a JSON value, outermost first."""
    if isinstance(node, (dict, list)):
        out.append(node)
        for child in (node.values() if isinstance(node, dict) else node):
            _containers(child, out)
    return out


def mutate_json(rng: random.Random, value: Any, rounds: int = 0) -> Any:
    """A deep copy of a JSON value with 1..3 structural mutations."""
    value = json.loads(json.dumps(value))
    for _ in range(rounds or rng.choice((1, 1, 2, 3))):
        containers = _containers(value, [])
        if not containers:
            return json_junk(rng)
        node = rng.choice(containers)
        keys: list[Any] = list(node) if isinstance(node, dict) else list(range(len(node)))
        op = rng.randrange(6)
        if op == 0 and keys:
            del node[rng.choice(keys)]                             # missing key / element
        elif op in (1, 2) and keys:
            node[rng.choice(keys)] = json_junk(rng)                # wrong type, huge number
        elif op == 3:
            junk = json_junk(rng)
            if isinstance(node, dict):
                node[rng.choice(("op", "extra", "vm", "disks", "nics", "ram_size"))] = junk
            else:
                node.append(junk)
        elif op == 4 and keys:
            key = rng.choice(keys)
            nested: Any = node[key]
            for _ in range(rng.choice((2, 10, 100))):
                nested = [nested] if rng.random() < 0.5 else {"k": nested}
            node[key] = nested                                     # nested junk
        elif keys:
            key = rng.choice(keys)
            old = node[key]
            if isinstance(old, bool) or not isinstance(old, int):
                node[key] = str(old) if rng.random() < 0.5 else [old]
            else:
                huge = abs(old) > 10**300   # no float, and str() may refuse it
                node[key] = rng.choice((-old, old * 2**64, -1, 0, old if huge else str(old),
                                        old if huge else float(old)))
    return value


# ---------------------------------------------------------------------------- targets


class Target:
    """A decoder under fuzz: builds valid inputs once, then generates and runs cases."""

    name = ""
    expected: tuple[type[BaseException], ...] = (FerryError,)
    has_twin = False
    default_twin_share = 1.0
    """Share of inputs the pure-Python twin also runs on unless --twin-share says."""

    def __init__(self) -> None:
        self.twin_share = self.default_twin_share

    def generate(self, rng: random.Random) -> Case:
        raise NotImplementedError

    def run(self, case: Case, rng: random.Random) -> None:
        """Accepts (returns), rejects (raises an `expected` error) or fails (anything else)."""
        raise NotImplementedError

    def use_twin(self, rng: random.Random) -> bool:
        return self.has_twin and (self.twin_share >= 1.0 or rng.random() < self.twin_share)


# ---- wire


LOW_ORDER_POINTS = (bytes(32), (1).to_bytes(32, "little"),
                    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
                    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
                    ((1 << 255) - 20).to_bytes(32, "little"))
"""X25519 public keys of small order (RFC 7748 section 6.1): the DH output is all zero."""


def _key(rng: random.Random) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(rng.randbytes(32))


class WireTarget(Target):
    """Frames into FrameDecoder; preamble, Noise messages and frames into a responder."""

    name = "wire"
    expected = (PeerError,)

    def __init__(self) -> None:
        super().__init__()
        rng = random.Random(CORPUS_SEED)
        self.initiator_key, self.responder_key = _key(rng), _key(rng)
        self.initiator_e, self.responder_e = _key(rng), _key(rng)
        prologue = wsession.preamble()
        ini = HandshakeState(initiator=True, static_key=self.initiator_key, prologue=prologue,
                             ephemeral_key=self.initiator_e)
        res = HandshakeState(initiator=False, static_key=self.responder_key, prologue=prologue,
                             ephemeral_key=self.responder_e)
        msg1 = ini.write_message(b"")
        res.read_message(msg1)
        ini.read_message(res.write_message(b""))
        msg3 = ini.write_message(bytes([wsession.Verdict.TRUSTED]))
        self.send_key, _ = ini.split()
        self.trusted = {public_bytes(self.initiator_key)}
        length = wsession.HANDSHAKE_LENGTH
        self.hs_fields: list[Field] = [(6, 2, ">"), (8, 2, ">"), (10 + len(msg1), 2, ">")]
        self.handshake = (prologue + length.pack(len(msg1)) + msg1 + length.pack(len(msg3))
                          + msg3)
        # Valid frame streams (initiator to responder, from sequence 0), GOODBYE last.
        self.genuine: dict[int, set[tuple[int, bytes]]] = {}
        self.streams: list[tuple[bytes, list[Field]]] = []
        for _ in range(48):
            frames = self._frames(rng)
            self.streams.append(self._seal(frames, self.genuine))

    def _frames(self, rng: random.Random) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        for _ in range(rng.randrange(0, 6)):
            pick = rng.randrange(5)
            if pick == 0:
                body = {"op": rng.choice(list(Op)).value, "n": rng.randrange(1000)}
                out.append((int(MsgType.CONTROL), json.dumps(body).encode()))
            elif pick == 1:
                out.append((int(MsgType.DATA), rng.randbytes(rng.randrange(0, 300))))
            elif pick == 2:
                out.append((int(MsgType.RAM_PAGES), rng.randbytes(rng.choice((16, 4096)))))
            elif pick == 3 and rng.random() < 0.15:   # a large frame: its own buffer
                out.append((int(MsgType.QEMU_STREAM), rng.randbytes(rng.choice(
                    (70_000, 140_000)))))
            else:
                out.append((int(MsgType.STATUS), b"{}"))
        if rng.random() < 0.8:
            out.append((int(MsgType.GOODBYE), b"{}"))
        return out

    def _seal(self, frames: Sequence[tuple[int, bytes]],
              genuine: dict[int, set[tuple[int, bytes]]]) -> tuple[bytes, list[Field]]:
        sealer = wframes.FrameSealer(self.send_key)
        out = bytearray()
        fields: list[Field] = []
        for seq, (code, payload) in enumerate(frames):
            fields += [(len(out), 4, ">"), (len(out) + 4, 1, ">"), (len(out) + 5, 8, ">")]
            header, ciphertext = sealer.seal(code, payload)
            out += header + ciphertext
            genuine.setdefault(seq, set()).add((code, payload))
        return bytes(out), fields

    def generate(self, rng: random.Random) -> Case:
        pick = rng.random()
        if pick < 0.80:
            data, fields = rng.choice(self.streams)
            if rng.random() < 0.95:
                data = mutate(rng, data, fields, rng.choice(self.streams)[0])
            return Case(self.name, "frames", data, chunking(rng, len(data)))
        if pick < 0.84:   # validly sealed frames of odd types and payloads
            frames: list[tuple[int, str]] = []
            for _ in range(rng.randrange(1, 5)):
                code = rng.choice((rng.randrange(256), 1, 2, 3, 4, 0x10, 0x11, 0x80, 0x84))
                payload = rng.choice((b"{}", b'{"code": 7, "message": "x"}', b"[]", b"\xff",
                                      b'{"code": "7", "message": 1}', b"",
                                      json.dumps(json_junk(rng)).encode()))
                if rng.random() < 0.5:
                    payload = mutate(rng, payload)
                frames.append((code, payload.hex()))
            data, _ = self._seal([(c, bytes.fromhex(p)) for c, p in frames], {})
            return Case(self.name, "sealed", self.handshake + data,
                        chunking(rng, len(self.handshake) + len(data)),
                        {"frames": frames})
        if pick < 0.96:   # the responder: preamble, Noise messages 1 and 3, frames
            data, fields = rng.choice(self.streams)
            whole = self.handshake + data
            shift = len(self.handshake)
            all_fields = self.hs_fields + [(a + shift, w, o) for a, w, o in fields]
            if rng.random() < 0.05:   # message 1's ephemeral key a low-order point
                point = rng.choice(LOW_ORDER_POINTS)
                whole = self.handshake[:10] + point + self.handshake[42:] + data
            elif rng.random() < 0.5:   # the handshake part
                head = mutate(rng, self.handshake, self.hs_fields)
                whole = head + data
            elif rng.random() < 0.95:
                whole = mutate(rng, whole, all_fields)
            trusted = rng.random() < 0.95
            return Case(self.name, "session", whole, chunking(rng, len(whole)),
                        {"trusted": trusted})
        data = rng.randbytes(rng.choice((0, 1, 8, 13, 29, 64, 500, 5000)))
        if rng.random() < 0.5:
            return Case(self.name, "frames", data, chunking(rng, len(data)))
        data = (wsession.preamble() if rng.random() < 0.5 else b"") + data
        return Case(self.name, "session", data, chunking(rng, len(data)), {"trusted": True})

    def run(self, case: Case, rng: random.Random) -> None:
        if case.kind == "frames":
            self._run_frames(case, self.genuine)
        elif case.kind == "sealed":
            genuine: dict[int, set[tuple[int, bytes]]] = {}
            self._seal([(c, bytes.fromhex(p)) for c, p in case.extra["frames"]], genuine)
            self._run_session(case, genuine)
        else:
            self._run_session(case, self.genuine)

    def _run_frames(self, case: Case, genuine: dict[int, set[tuple[int, bytes]]]) -> None:
        decoder = wframes.FrameDecoder(self.send_key)
        seq = 0
        in_place = len(case.data) % 2 == 1
        for piece in pieces(case.data, case.chunks):
            if in_place:   # get_buffer/buffer_updated, as asyncio's BufferedProtocol does
                view = memoryview(piece)
                while view.nbytes and not decoder.failed:
                    target = decoder.get_buffer()
                    n = min(len(target), view.nbytes)
                    if n == 0:
                        raise Broken("get_buffer() is empty on a live decoder")
                    target[:n] = view[:n]
                    target.release()
                    decoder.buffer_updated(n)
                    view = view[n:]
            else:
                decoder.receive_data(piece)
            if decoder.buffered > len(case.data):
                raise Broken(f"decoder holds {decoder.buffered} bytes of {len(case.data)} fed")
            while True:
                frame = decoder.next_frame()
                if frame is None:
                    break
                self._check_genuine(genuine, seq, frame.type_code, bytes(frame.payload))
                seq += 1
        if not decoder.at_frame_boundary:
            # What Session.receive_eof() makes of it.
            raise StreamEndError("the stream ended inside a frame", WireCode.TRUNCATED)

    @staticmethod
    def _check_genuine(genuine: dict[int, set[tuple[int, bytes]]], seq: int, code: int,
                       payload: bytes) -> None:
        if (code, payload) not in genuine.get(seq, ()):
            raise Broken(f"frame {seq} (type {code:#x}, {len(payload)} bytes) was delivered "
                         f"but never sealed: forged or corrupted")

    def _run_session(self, case: Case, genuine: dict[int, set[tuple[int, bytes]]]) -> None:
        trusted = self.trusted if case.extra.get("trusted", True) else set()
        session = wsession.Session(initiator=False, static_key=self.responder_key,
                                   is_trusted=trusted.__contains__,
                                   ephemeral_key=self.responder_e)
        seq = 0
        limit = len(case.data) + 8
        for piece in pieces(case.data, case.chunks):
            session.receive_data(piece)
            if session.buffered > len(case.data) + wframes.SCRATCH_SIZE:
                raise Broken(f"session holds {session.buffered} bytes")
            for _ in range(limit):
                event = session.next_event()
                if event is None:
                    break
                if isinstance(event, Message):
                    self._check_genuine(genuine, seq, int(event.type), bytes(event.payload))
                    seq += 1
                elif isinstance(event, Goodbye):
                    if not any(code == MsgType.GOODBYE for code, _ in genuine.get(seq, ())):
                        raise Broken(f"GOODBYE delivered as frame {seq}, which was not one")
                    seq += 1
                elif not isinstance(event, Opened):
                    raise Broken(f"unknown event {event!r}")
            else:
                raise Broken("next_event() does not stop")
            session.data_to_send()
        session.receive_eof()
        if session.next_event() is not None:
            raise Broken("an event after the end of the stream")


# ---- messages

VM_DESCRIPTION: dict[str, Any] = {
    "name": "guest-1", "argv": ["-m", "256M", "-machine", "pc,memory-backend=mem",
                                "-object", "memory-backend-file,id=mem,size=256M,share=on"],
    "ram_size": 256 << 20, "ram_backend_id": "mem",
    "disks": [{"index": 0, "path": "/var/lib/vm/a.qcow2", "format": "qcow2",
               "virtual_size": 1 << 30, "node": "disk0"}],
    "nics": [{"key": "net0", "network": "lan", "mac": "52:54:00:12:34:56",
              "model": "virtio-net-pci"}],
}

BODIES: dict[Op, dict[str, Any]] = {
    Op.PREPARE: {"vm": VM_DESCRIPTION, "job": "job-1", "disk_map": ["/a=/b"],
                 "disk_format": "qcow2"},
    Op.PREPARED: {"dest_pid": 4242, "npages": 65536},
    Op.RAM_DONE: {"pages": 65536},
    Op.STREAM_END: {"bytes": 123456},
    Op.LOADED: {"pages": 65536},
    Op.COMMIT: {},
    Op.COMMITTED: {"resume_us": 1500, "dest_pid": 4242, "health_window_s": 3.0},
    Op.ABORT: {"reason": "cancelled"},
    Op.ABORTED: {},
    Op.ERROR: {"message": "destination failed"},
    Op.STATUS: {"job": "job-1", "outcome": "resumed"},
    Op.RESUME: {"job": "0123456789ab"},
    Op.RESUMED: {"received": 17},
    Op.ACK: {"received": 4096},
    Op.HEALTH: {"pace": 0.98, "window_s": 3.0,
                "samples": [[-0.8, 0.0, 0.2, 0.1], [0.2, 0.97, 1.1, 0.02]]},
    # The import conversation (agent.importer.talk checks the fields themselves).
    Op.IMPORT: {"job": "0123456789ab", "name": "web01", "format": "qcow2", "warm": False},
    Op.IMPORT_READY: {"disks": [{"index": 0, "target": "/srv/vms/web01-disk0.qcow2"}]},
    Op.DISK_END: {"disk": 0, "blocks": 16},
    Op.HASHES: {"disk": 0, "first": 0, "hashes": "AAAA"},
    Op.DISK_WRITTEN: {"disk": 0, "bytes": 65536},
    Op.FINISH: {"start": False},
    Op.FINISHED: {"vm": "web01"},
}


class MessagesTarget(Target):
    """parse_message for every kind and op; VmSpec.from_json of what PREPARE carries."""

    name = "messages"
    expected = (ProtocolError, UserError)

    def generate(self, rng: random.Random) -> Case:
        pick = rng.random()
        op = rng.choice(list(Op))
        body = {"op": op.value, **BODIES[op]}
        if pick < 0.05:   # data kinds and unknown kinds
            kind = rng.choice([int(k) for k in Kind] + [0, 1, 4, 0x84, 0xFF, -1, 2**40,
                                                        rng.randrange(256)])
            return Case(self.name, "message", rng.randbytes(rng.randrange(40)),
                        extra={"kind": kind})
        if pick < 0.40:   # structural mutations of a control body
            value = mutate_json(rng, body)
            text = json.dumps(value).encode()
        elif pick < 0.55:   # byte mutations of its JSON text
            text = mutate(rng, json.dumps(body).encode())
        elif pick < 0.85:   # PREPARE with a mutated VM description
            vm = mutate_json(rng, VM_DESCRIPTION, rng.choice((1, 1, 2, 3, 5)))
            text = json.dumps({"op": "prepare", "vm": vm, "job": "j",
                               "disk_map": rng.choice((None, ["/a=/b"], [], ["x"]))}).encode()
        elif pick < 0.90:   # deep nesting, big numbers, odd encodings
            depth = rng.choice((10, 500, 5000, 100_000))
            text = rng.choice((
                b'{"op": "prepare", "vm": ' + b"[" * depth + b"]" * depth + b"}",
                b'{"op": "commit", "x": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}",
                b'{"op": "prepared", "dest_pid": ' + b"9" * rng.choice((20, 5000)) + b"}",
                b'{"op": "prepared", "dest_pid": 1e999}',
                b'{"op": "committed", "resume_us": NaN, "dest_pid": -Infinity}',
                json.dumps(body).encode("utf-16"),
                b"\xef\xbb\xbf" + json.dumps(body).encode(),
            ))
        else:
            text = rng.randbytes(rng.randrange(64))
        return Case(self.name, "message", text, extra={"kind": int(Kind.CONTROL)})

    def run(self, case: Case, rng: random.Random) -> None:
        msg = link.parse_message(case.extra["kind"], case.data)
        if msg is None:
            if case.extra["kind"] == Kind.CONTROL:
                raise Broken("a control message parsed to None")
            return
        if not isinstance(msg.op, Op) or not isinstance(msg.body, dict) or "op" in msg.body:
            raise Broken(f"parse_message gave {msg!r}")
        again = protocol.Control.decode(msg.encode())
        if again.encode() != msg.encode():
            raise Broken("a control message does not survive encode/decode")
        # What the jobs read from the peer's control messages.
        for name in protocol.INT_FIELDS.get(msg.op, ()):
            value = msg.int_field(name, strict=len(case.data) % 2 == 0)
            if not isinstance(value, int):
                raise Broken(f"int_field({name!r}) gave {value!r}")
        if msg.op is Op.PREPARE:   # what DestinationJob._prepare reads before any check
            parse_disk_map(msg.body.get("disk_map"))
            spec = VmSpec.from_json(msg.body.get("vm") or {})
            if VmSpec.from_json(spec.to_json()) != spec:
                raise Broken("a VM description does not survive to_json/from_json")


# ---- batch

GUARD = 4096
GUARD_BYTE = 0xA5


@dataclasses.dataclass
class BatchSeed:
    block_size: int
    nblocks: int
    before: bytes        # the target the batch was encoded against
    after: bytes         # what it must hold once the batch is applied
    batch: bytes
    fields: list[Field]


def _use(module: ModuleType, impl: ModuleType) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def swap() -> Iterator[None]:
        saved = getattr(module, "_backend")   # noqa: B009 - the module's private choice
        setattr(module, "_backend", impl)       # noqa: B010
        try:
            yield
        finally:
            setattr(module, "_backend", saved)  # noqa: B010
    return swap()


def _block(rng: random.Random, bs: int, earlier: bytearray, nblocks: int) -> bytes:
    pick = rng.randrange(6)
    if pick == 0:
        return bytes(bs)
    if pick == 1 and nblocks:
        i = rng.randrange(nblocks)
        return bytes(earlier[i * bs:(i + 1) * bs])   # a duplicate: COPY
    if pick == 2:
        return bytes([rng.randrange(256)]) * bs
    if pick == 3:
        return (b"ferry page %d " % rng.randrange(100) * bs)[:bs]
    return rng.randbytes(bs)


class BatchTarget(Target):
    """decode_and_apply, native and twin, into a target between two guard regions."""

    name = "batch"
    expected = (BatchError,)
    default_twin_share = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.impls = [m for m in (native_codec, _codec_py) if m is not None]
        self.has_twin = native_codec is not None
        rng = random.Random(CORPUS_SEED)
        self.seeds: list[BatchSeed] = []
        for bs, nblocks in ((512, 32), (4096, 16), (4096, 48), (1 << 13, 4)):
            for _ in range(12):
                self.seeds += self._round(rng, bs, nblocks)

    def _round(self, rng: random.Random, bs: int, nblocks: int) -> list[BatchSeed]:
        dst = bytearray(bs * nblocks)
        src = bytearray(bs * nblocks)
        sent = bytearray(codec.zero_block_hash(bs) * nblocks)
        level = rng.choice((None, 1, 3))
        encoder = codec.BatchEncoder(src, bs, sent, dedup=rng.random() < 0.8,
                                     compress_level=level,
                                     max_entries=rng.choice((4, 16, 64)),
                                     max_data_bytes=bs * rng.choice((2, 8, 64)))
        out = []
        for _ in range(3):   # a few rounds: later ones have COPY and unchanged blocks
            for i in rng.sample(range(nblocks), rng.randrange(1, nblocks + 1)):
                src[i * bs:(i + 1) * bs] = _block(rng, bs, src, nblocks)
            indices = array("Q", sorted(rng.sample(range(nblocks), nblocks)))
            start = 0
            while start < len(indices):
                batch, start = encoder.encode(indices, start)
                before = bytes(dst)
                codec.decode_and_apply(batch.payload, dst, nblocks, bs)
                payload = bytes(batch.payload)
                count = batch.entry_count + batch.copy_count
                fields: list[Field] = [(4, 1, "<"), (5, 1, "<"), (6, 2, "<"), (8, 4, "<"),
                                       (12, 4, "<"), (16, 4, "<"), (20, 4, "<")]
                fields += [(bfmt.HEADER_SIZE + 8 * k, 8, "<") for k in range(count)]
                fields += [(bfmt.HEADER_SIZE + 8 * k + 7, 1, "<") for k in range(count)]
                out.append(BatchSeed(bs, nblocks, before, bytes(dst), payload, fields))
        if dst != src:
            raise Broken("the corpus batches did not reproduce their source")
        return out

    def generate(self, rng: random.Random) -> Case:
        index = rng.randrange(len(self.seeds))
        seed = self.seeds[index]
        extra: dict[str, Any] = {"seed": index, "nblocks": seed.nblocks,
                                 "fd": rng.random() < 0.1}
        pick = rng.random()
        if pick < 0.04:
            return Case(self.name, "batch", seed.batch, extra=extra)   # must apply exactly
        if pick < 0.07:
            data = rng.randbytes(rng.randrange(0, 200))
            if rng.random() < 0.5:
                data = bfmt.HEADER.pack(bfmt.MAGIC, bfmt.VERSION, seed.block_size.bit_length()
                                        - 1, 0, rng.randrange(8), rng.randrange(3), 0,
                                        0) + data
            return Case(self.name, "batch", data, extra=extra)
        other = self.seeds[rng.randrange(len(self.seeds))].batch
        data = mutate(rng, seed.batch, seed.fields, other)
        if rng.random() < 0.05:
            extra["nblocks"] = rng.randrange(seed.nblocks + 1)   # a smaller target
        return Case(self.name, "batch", data, extra=extra)

    def run(self, case: Case, rng: random.Random) -> None:
        seed = self.seeds[case.extra["seed"]]
        nblocks = case.extra["nblocks"]
        impls = self.impls if self.use_twin(rng) else self.impls[:1]
        results: list[tuple[str, bytes | None]] = []
        for impl in impls:
            results.append(self._apply(impl, case.data, seed, nblocks, case.extra["fd"]))
        outcomes = {r[0] for r in results}
        if len(outcomes) > 1:
            raise Broken(f"native and twin disagree: {[r[0] for r in results]}")
        if len({r[1] for r in results}) > 1:
            raise Broken("native and twin wrote different bytes")
        if case.data == seed.batch and nblocks == seed.nblocks and results[0][1] != seed.after:
            raise Broken("a valid batch did not give the block contents it was encoded from")
        if results[0][0] != "accepted":
            raise BatchError(results[0][0])

    @staticmethod
    def _apply(impl: ModuleType, batch: bytes, seed: BatchSeed, nblocks: int,
               use_fd: bool) -> tuple[str, bytes | None]:
        size = seed.block_size * seed.nblocks
        fd = -1
        mapping: mmap.mmap | None = None
        if use_fd:   # a shared file mapping, DATA by pwrite; the guard is the file's tail
            fd = os.memfd_create("ferry-fuzz")
            os.ftruncate(fd, size + GUARD)
            mapping = mmap.mmap(fd, size + GUARD)
            mapping[:] = seed.before + bytes([GUARD_BYTE]) * GUARD
            area: mmap.mmap | bytearray = mapping
            lo = 0
        else:
            area = bytearray([GUARD_BYTE]) * GUARD + seed.before + bytes([GUARD_BYTE]) * GUARD
            lo = GUARD
        try:
            view = memoryview(area)[lo:lo + size]
            try:
                with _use(codec, impl):
                    codec.decode_and_apply(batch, view, nblocks, seed.block_size, fd)
                outcome = "accepted"
            except BatchError as exc:
                outcome = f"rejected: {type(exc).__name__}"
            finally:
                view.release()
            image = bytes(area)
        finally:
            if mapping is not None:
                mapping.close()
            if fd >= 0:
                os.close(fd)
        guard = bytes([GUARD_BYTE]) * GUARD
        if image[:lo] != guard[:lo] or image[lo + size:] != guard:
            raise Broken(f"{impl.__name__} wrote outside the target buffer")
        content = image[lo:lo + size]
        if outcome != "accepted" and content != seed.before:
            raise Broken(f"{impl.__name__} refused a batch but changed the target")
        return outcome, content


# ---- stream

BE32, BE64 = sfmt.BE32.pack, sfmt.BE64.pack


def _lstr(name: bytes) -> bytes:
    return bytes([len(name)]) + name


class StreamBuilder:
    """A synthetic QEMU 7.2 migration stream, its fields, and the main block's pages."""

    def __init__(self, blocks: Sequence[tuple[bytes, int]], main: bytes, sid: int) -> None:
        self.blocks, self.main, self.sid = list(blocks), main, sid
        self.raw = bytearray()
        self.fields: list[Field] = []
        self.current: bytes | None = None

    def field(self, width: int) -> None:
        self.fields.append((len(self.raw) - width, width, ">"))

    def emit(self, data: bytes, width: int = 0) -> StreamBuilder:
        self.raw += data
        if width:
            self.field(width)
        return self

    def opening(self, machine: bytes = b"pc-i440fx-7.2") -> StreamBuilder:
        self.emit(sfmt.MAGIC).emit(BE32(sfmt.VERSION), 4)
        self.emit(bytes([sfmt.Section.CONFIGURATION])).emit(BE32(len(machine)), 4)
        self.emit(machine)
        self.emit(b"\x01").emit(BE32(self.sid), 4).emit(_lstr(sfmt.RAM_SECTION))
        self.field(len(sfmt.RAM_SECTION) + 1)
        self.emit(BE32(0), 4).emit(BE32(sfmt.RAM_SECTION_VERSION), 4)
        total = sum(size for _, size in self.blocks)
        self.emit(BE64(total | sfmt.RAM_SAVE_FLAG_MEM_SIZE), 8)
        for name, size in self.blocks:
            self.emit(bytes([len(name)]), 1).emit(name).emit(BE64(size), 8)
        return self.eos()

    def eos(self) -> StreamBuilder:
        return self.emit(BE64(sfmt.RAM_SAVE_FLAG_EOS), 8).emit(b"\x7e").emit(BE32(self.sid), 4)

    def section(self, kind: sfmt.Section) -> StreamBuilder:
        return self.emit(bytes([kind]), 1).emit(BE32(self.sid), 4)

    def record(self, rng: random.Random, name: bytes, page: int, zero: bool) -> StreamBuilder:
        cont = name == self.current and rng.random() < 0.8
        flags = ((sfmt.RAM_SAVE_FLAG_ZERO if zero else sfmt.RAM_SAVE_FLAG_PAGE)
                 | (sfmt.RAM_SAVE_FLAG_CONTINUE if cont else 0))
        self.emit(BE64(page << sfmt.PAGE_SHIFT | flags), 8)
        if not cont:
            self.emit(bytes([len(name)]), 1).emit(name)
        self.emit(b"\0" if zero else (bytes([page & 0xFF]) * 8 + rng.randbytes(8)) * 256)
        self.current = name
        return self

    def device(self, name: bytes, body: bytes, sid: int) -> StreamBuilder:
        self.emit(bytes([sfmt.Section.FULL])).emit(BE32(sid), 4).emit(_lstr(name))
        return self.emit(BE32(0)).emit(BE32(1)).emit(body).emit(b"\x7e").emit(BE32(sid), 4)

    def tail(self) -> StreamBuilder:
        self.device(b"timer", b"\x00\x01\x02\x05", 9).device(b"apic", bytes(range(40)), 10)
        desc = b'{"page_size": 4096, "devices": []}'
        return self.emit(b"\x00").emit(b"\x06").emit(BE32(len(desc)), 4).emit(desc)


def _build_stream(rng: random.Random) -> tuple[bytes, list[Field], bytes, int]:
    main = rng.choice((b"pc.ram", b"mem", b"ram0"))
    main_pages = rng.choice((4, 16, 64))
    blocks = [(main, main_pages * sfmt.PAGE_SIZE), (b"pc.bios", 4 * sfmt.PAGE_SIZE)]
    if rng.random() < 0.5:
        blocks.append((b"vga.vram", 8 * sfmt.PAGE_SIZE))
    rng.shuffle(blocks)
    b = StreamBuilder(blocks, main, rng.choice((0, 2, 3, 0xFFFFFFFF)))
    b.opening()
    sections = rng.randrange(1, 4)
    for k in range(sections):
        b.section(sfmt.Section.END if k == sections - 1 else sfmt.Section.PART)
        for _ in range(rng.randrange(0, 10)):
            name, size = rng.choice(blocks)
            b.record(rng, name, rng.randrange(size // sfmt.PAGE_SIZE), rng.random() < 0.6)
        b.eos()
    b.tail()
    return bytes(b.raw), b.fields, main, main_pages


class StreamTarget(Target):
    """StreamParser (native record loop and twin) fed mutated streams in random splits."""

    name = "stream"
    expected = (StreamError,)
    default_twin_share = 0.2

    def __init__(self) -> None:
        super().__init__()
        self.impls = [m for m in (native_qstream, _stream_py) if m is not None]
        self.has_twin = native_qstream is not None
        rng = random.Random(CORPUS_SEED)
        self.seeds = [_build_stream(rng) for _ in range(64)]
        # Each valid stream must parse, with the same result on every backend.
        for raw, _, main, pages in self.seeds:
            for impl in self.impls:
                self._parse(impl, raw, [], main.decode(), pages, 2048, False)

    def generate(self, rng: random.Random) -> Case:
        index = rng.randrange(len(self.seeds))
        raw, fields, main, pages = self.seeds[index]
        pick = rng.random()
        if pick < 0.03:
            data = raw
        elif pick < 0.05:
            data = rng.randbytes(rng.randrange(0, 300))
            if rng.random() < 0.5:
                data = raw[:rng.randrange(len(raw))] + data
        else:
            data = mutate(rng, raw, fields, self.seeds[rng.randrange(len(self.seeds))][0])
        extra = {"main": main.decode(), "pages": pages,
                 "max_pages": rng.choice((1, 2, 3, 7, 2048)),
                 "space": rng.random() < 0.5, "valid": data == raw}
        return Case(self.name, "stream", data, chunking(rng, len(data), 1 << 17), extra)

    def run(self, case: Case, rng: random.Random) -> None:
        x = case.extra
        impls = self.impls if self.use_twin(rng) else self.impls[:1]
        results = [self._parse(impl, case.data, case.chunks, x["main"], x["pages"],
                               x["max_pages"], x["space"]) for impl in impls]
        if len(set(results)) > 1:
            raise Broken(f"native and twin disagree: {[r[0] for r in results]}")
        if x["valid"] and results[0][0] != "accepted":
            raise Broken(f"a valid stream was refused: {results[0][0]}")
        if results[0][0] != "accepted":
            raise StreamError(results[0][0])

    @staticmethod
    def _parse(impl: ModuleType, data: bytes, chunks: Sequence[int], main: str, npages: int,
               max_pages: int, use_space: bool) -> tuple[str, str]:
        """(outcome, digest of every event) of one parse on one backend."""
        digest = hashlib.blake2b(digest_size=16)
        fed = 0
        with _use(stream, impl):
            parser = StreamParser(main, npages * sfmt.PAGE_SIZE, max_pages=max_pages,
                                  buffer_size=2 * stream.MIN_SPACE)
            try:
                for piece in pieces(data, chunks):
                    if use_space:
                        room = parser.space()
                        if room.nbytes < len(piece):
                            raise Broken(f"space() offers {room.nbytes} bytes for a piece "
                                         f"of {len(piece)}")
                        room[:len(piece)] = piece
                        room.release()
                        parser.commit(len(piece))
                    else:
                        parser.feed(piece)
                    fed += len(piece)
                    for _ in range(4 * len(data) + 64):
                        event = parser.next_event()
                        if event is None:
                            break
                        StreamTarget._check(event, parser, data, fed, npages, digest)
                    else:
                        raise Broken("next_event() does not stop")
                parser.close()
                outcome = "accepted"
            except StreamError as exc:
                outcome = f"rejected: {exc}"
        return outcome, digest.hexdigest()

    @staticmethod
    def _check(event: object, parser: StreamParser, data: bytes, fed: int, npages: int,
               digest: Any) -> None:
        if isinstance(event, Pages):
            base = parser.offset - parser._start   # stream offset of the buffer's byte 0
            for index, offset in zip(event.indices, event.offsets, strict=True):
                if index >= npages:
                    raise Broken(f"page index {index} outside the {npages} pages of RAM")
                if offset == sfmt.ZERO_PAGE_OFFSET:
                    digest.update(b"Z" + index.to_bytes(8, "little"))
                    continue
                at = base + offset
                page = bytes(event.data[offset:offset + sfmt.PAGE_SIZE])
                if at + sfmt.PAGE_SIZE > fed or page != data[at:at + sfmt.PAGE_SIZE]:
                    raise Broken(f"page {index} read from stream bytes {at}..{at + 4096} of "
                                 f"{fed} received, not what the stream holds there")
                digest.update(b"P" + index.to_bytes(8, "little") + page)
        elif isinstance(event, Forward):
            digest.update(b"F" + len(event.data).to_bytes(8, "little") + event.data)
        elif isinstance(event, RamSetup):
            digest.update(b"S" + repr(event.blocks).encode())
        elif isinstance(event, RamSection):
            digest.update(b"R" + repr((event.kind, event.number)).encode())
        else:
            raise Broken(f"unknown event {event!r}")


# ---------------------------------------------------------------------------- driver

FACTORIES: dict[str, Callable[[], Target]] = {
    "wire": WireTarget, "messages": MessagesTarget, "batch": BatchTarget,
    "stream": StreamTarget}


@dataclasses.dataclass
class Tally:
    target: str
    inputs: int = 0
    accepted: int = 0
    rejected: int = 0
    failures: int = 0
    seconds: float = 0.0
    twin_share: float = 1.0
    saved: list[str] = dataclasses.field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0

    def line(self, has_twin: bool) -> str:
        twin = ""
        if has_twin:
            twin = (" (native and twin on every input)" if self.twin_share >= 1.0 else
                    f" (native on every input, twin on a {self.twin_share:.0%} share)")
        return (f"{self.target}: {self.inputs} inputs, {self.accepted} accepted, "
                f"{self.rejected} rejected with the project's errors, {self.failures} "
                f"failures, {self.rate:,.0f} inputs/s{twin}")


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang(f"an input ran longer than {HANG_SECONDS:g} s")


@contextlib.contextmanager
def alarms() -> Iterator[None]:
    """Inside: SIGALRM (run_one's per-input timer) raises Hang."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_one(target: Target, case: Case, rng: random.Random) -> str | None:
    """None if accepted, 'rejected', or the failure's text."""
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        target.run(case, rng)
        return None
    except target.expected:
        return "rejected"
    except (Exception, Hang):
        return traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def save(case: Case, text: str, seed: int, number: int) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{case.target}-{seed}-{number}.json"
    obj = case.to_json() | {"seed": seed, "input": number, "failure": text}
    path.write_text(json.dumps(obj, indent=1) + "\n")
    return str(path)


def fuzz(target: Target, count: int, seed: int, *, progress: bool = False) -> Tally:
    """`count` inputs of `seed` through `target`."""
    with alarms():
        try:
            return _fuzz(target, count, seed, progress)
        finally:
            faulthandler.cancel_dump_traceback_later()


def _fuzz(target: Target, count: int, seed: int, progress: bool) -> Tally:
    tally = Tally(target.name, twin_share=target.twin_share)
    rng = random.Random(f"{seed}:{target.name}")
    started = time.perf_counter()
    for number in range(count):
        if number % 1000 == 0:   # a hang inside native code, where SIGALRM cannot reach
            faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True,
                                              file=sys.__stderr__ or sys.stderr)
        case = target.generate(rng)
        result = run_one(target, case, rng)
        tally.inputs += 1
        if result is None:
            tally.accepted += 1
        elif result == "rejected":
            tally.rejected += 1
        else:
            tally.failures += 1
            if len(tally.saved) < MAX_SAVED:
                tally.saved.append(save(case, result, seed, number))
                print(f"{target.name}: FAILURE at input {number}, saved to "
                      f"{tally.saved[-1]}\n{result}", file=sys.stderr)
        if progress and number and number % 100_000 == 0:
            print(f"  {target.name}: {number} inputs, {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
    tally.seconds = time.perf_counter() - started
    return tally


def replay(path: str) -> int:
    obj = json.loads(Path(path).read_text())
    case = Case.from_json(obj)
    target = FACTORIES[case.target]()
    with alarms():
        result = run_one(target, case, random.Random(0))
    if result is None or result == "rejected":
        print(f"{case.target}/{case.kind}: {result or 'accepted'} (no failure)")
        return 0
    print(f"{case.target}/{case.kind}: FAILURE\n{result}")
    return 1


def main(argv: Sequence[str]) -> int:
    command = bench_parser("fuzz", __doc__)
    command.add_argument("--target", choices=(*TARGETS, "all"), default="all")
    command.add_argument("--count", type=int, default=DEFAULT_COUNT,
                         help=f"inputs per target (default {DEFAULT_COUNT:,})")
    command.add_argument("--seed", type=int, default=1, help="seed of the mutations")
    command.add_argument("--twin-share", type=float, default=None,
                         help="share of inputs the pure-Python twins also run (default: "
                              "0.5 for batch, 0.2 for stream, to keep 1M inputs in minutes)")
    command.add_argument("--json", action="store_true", help="print one JSON object")
    command.add_argument("--progress", action="store_true", help="progress on stderr")
    command.add_argument("--replay", metavar="FILE", help="run one saved failing input")
    args = command.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    if args.count < 1 or not 0.0 <= (args.twin_share or 0.0) <= 1.0:
        command.error("--count must be at least 1 and --twin-share within 0..1")
    tallies = []
    for name in TARGETS if args.target == "all" else (args.target,):
        target = FACTORIES[name]()
        if args.twin_share is not None:
            target.twin_share = args.twin_share
        tally = fuzz(target, args.count, args.seed, progress=args.progress)
        tallies.append(tally)
        if not args.json:
            print(tally.line(target.has_twin), flush=True)
    if args.json:
        print(json.dumps({"seed": args.seed, "targets": [
            dataclasses.asdict(t) | {"rate": round(t.rate)} for t in tallies]}))
    return 1 if any(t.failures for t in tallies) else 0
