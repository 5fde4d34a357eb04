"""The NBD protocol, client side, without I/O: handshake, requests, and a strict reply decoder.

Feed it the server's bytes (`receive_data`, or `get_buffer`/`buffer_updated` as made for
asyncio.BufferedProtocol), take events with `next_event()` (None means "need more bytes"),
and write whatever `data_to_send()` returns. Requests (`read`, `write`, ...) return the
cookie and the request header to write; `write`'s payload follows its header unchanged.
Everything here follows the NBD protocol document (NetworkBlockDevice/nbd doc/proto.md).

The conversation (C client, S server):

    S: NBDMAGIC IHAVEOPT handshake-flags                 (fixed newstyle only)
    C: client flags (FIXED_NEWSTYLE | NO_ZEROES), OPT_STRUCTURED_REPLY
    S: ACK (or an error: no structured replies, then no metadata contexts)
    C: OPT_SET_META_CONTEXT export [queries]             (only when contexts are asked for)
    S: META_CONTEXT id name ... ACK
    C: OPT_GO export [INFO_BLOCK_SIZE]
    S: INFO (EXPORT: size, flags; BLOCK_SIZE: min, preferred, max) ... ACK
    C/S: requests and simple or structured replies, any number in flight, matched by cookie

The server is QEMU, but its bytes are still checked as if hostile: every length is bounded
before anything is buffered (a reply payload never exceeds what its request asked for, an
option reply or error message never exceeds the protocol's string limits), every chunk must
lie inside its request's range and not overlap an earlier one, cookies must belong to a
request in flight, and a READ that claims success must have covered every byte. READ data is
received straight into the caller's buffer (`get_buffer` hands out a slice of it), so the
range checks are what keep a server from writing anywhere else. A violation raises
NbdProtocolError from `next_event()` (after the events decoded before it), and the decoder
then swallows whatever else arrives. Small messages are parsed transactionally: a message is
consumed whole once all its bytes are buffered, or not at all.

The states and the transitions between them are the table TRANSITIONS below, the one place
they are written down; `_enter` refuses any other move.
"""

from __future__ import annotations

import bisect
import struct
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum, IntFlag
from types import MappingProxyType

from agent.errors import (
    NbdError,
    NbdOptionError,
    NbdProtocolError,
    NbdRequestError,
    NotNbdServerError,
)

# ---------------------------------------------------------------------------- magics

NBDMAGIC = 0x4E42444D41474943
"""First 8 bytes from every NBD server: ASCII 'NBDMAGIC'."""
IHAVEOPT = 0x49484156454F5054
"""Second 8 bytes from a newstyle server, and the magic of every client option: 'IHAVEOPT'."""
CLISERV_MAGIC = 0x00420281861253
"""Second 8 bytes from an oldstyle server (not supported)."""
OPTION_REPLY_MAGIC = 0x3E889045565A9
"""Magic of every option reply in fixed newstyle negotiation."""
REQUEST_MAGIC = 0x25609513
"""Magic of every transmission request."""
SIMPLE_REPLY_MAGIC = 0x67446698
"""Magic of a simple reply."""
STRUCTURED_REPLY_MAGIC = 0x668E33EF
"""Magic of a structured reply chunk."""
EXTENDED_REPLY_MAGIC = 0x6E8A278C
"""Magic of an extended-header reply (never negotiated here; named for a clear error)."""

# ---------------------------------------------------------------------------- codes


class HandshakeFlag(IntFlag):
    """Flags the server sends after its magics."""

    FIXED_NEWSTYLE = 1 << 0
    """The server speaks fixed newstyle negotiation (required here)."""
    NO_ZEROES = 1 << 1
    """The server can leave out the 124 zero bytes after NBD_OPT_EXPORT_NAME."""


class ClientFlag(IntFlag):
    """Flags the client answers with."""

    FIXED_NEWSTYLE = 1 << 0
    """The client speaks fixed newstyle negotiation."""
    NO_ZEROES = 1 << 1
    """The server must not send the 124 zero bytes (only if it offered NO_ZEROES)."""


class Option(IntEnum):
    """Option codes of the handshake."""

    EXPORT_NAME = 1
    """Choose an export and enter transmission without a way to fail (not used: OPT_GO is)."""
    ABORT = 2
    """End the handshake politely."""
    LIST = 3
    """List the server's exports (not used)."""
    STARTTLS = 5
    """Upgrade to TLS (not supported)."""
    INFO = 6
    """Ask about an export without entering transmission (not used)."""
    GO = 7
    """Choose an export, learn its size, flags and block sizes, and enter transmission."""
    STRUCTURED_REPLY = 8
    """Let the server answer with structured reply chunks (sparse reads, block status)."""
    LIST_META_CONTEXT = 9
    """List the metadata contexts of an export (not used)."""
    SET_META_CONTEXT = 10
    """Select the metadata contexts that BLOCK_STATUS will report."""
    EXTENDED_HEADERS = 11
    """64-bit request and reply headers (not negotiated)."""


class OptionReply(IntEnum):
    """Option reply types; those with bit 31 set are errors."""

    ACK = 1
    """The option succeeded (and, for a list of replies, the list is complete)."""
    SERVER = 2
    """One export, in reply to OPT_LIST."""
    INFO = 3
    """One piece of information about the export, in reply to OPT_INFO/OPT_GO."""
    META_CONTEXT = 4
    """One selected metadata context: its id and name."""
    ERR_UNSUP = (1 << 31) + 1
    """The server does not know the option."""
    ERR_POLICY = (1 << 31) + 2
    """The server's policy forbids the option."""
    ERR_INVALID = (1 << 31) + 3
    """The option was syntactically or semantically invalid."""
    ERR_PLATFORM = (1 << 31) + 4
    """The option is not supported on the server's platform or build."""
    ERR_TLS_REQD = (1 << 31) + 5
    """The server requires TLS first."""
    ERR_UNKNOWN = (1 << 31) + 6
    """The requested export does not exist."""
    ERR_SHUTDOWN = (1 << 31) + 7
    """The server is shutting down."""
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    """The server insists that the client request block sizes."""
    ERR_TOO_BIG = (1 << 31) + 9
    """The request or its reply would be too large."""
    ERR_EXT_HEADER_REQD = (1 << 31) + 10
    """The server insists on extended headers."""


OPTION_REPLY_ERROR_BIT = 1 << 31
"""Bit set in every error option reply type, known or not."""


class Info(IntEnum):
    """Information types in NBD_REP_INFO replies to OPT_GO."""

    EXPORT = 0
    """Export size (u64) and transmission flags (u16); mandatory before ACK."""
    NAME = 1
    """The export's canonical name."""
    DESCRIPTION = 2
    """A human-readable description of the export."""
    BLOCK_SIZE = 3
    """Minimum, preferred and maximum payload block sizes (3 x u32)."""


class TransmissionFlag(IntFlag):
    """What the export allows, from NBD_INFO_EXPORT."""

    HAS_FLAGS = 1 << 0
    """Always set by a valid server."""
    READ_ONLY = 1 << 1
    """Writes, trims and write-zeroes will fail."""
    SEND_FLUSH = 1 << 2
    """NBD_CMD_FLUSH is supported."""
    SEND_FUA = 1 << 3
    """The FUA (forced unit access) command flag is supported."""
    ROTATIONAL = 1 << 4
    """The export behaves like a rotational disk (a scheduling hint)."""
    SEND_TRIM = 1 << 5
    """NBD_CMD_TRIM is supported."""
    SEND_WRITE_ZEROES = 1 << 6
    """NBD_CMD_WRITE_ZEROES (and its NO_HOLE flag) is supported."""
    SEND_DF = 1 << 7
    """The DF (don't fragment) flag on READ is supported."""
    CAN_MULTI_CONN = 1 << 8
    """Several connections to this export see each other's flushed writes."""
    SEND_RESIZE = 1 << 9
    """NBD_CMD_RESIZE is supported (experimental)."""
    SEND_CACHE = 1 << 10
    """NBD_CMD_CACHE is understood."""
    SEND_FAST_ZERO = 1 << 11
    """The FAST_ZERO flag on WRITE_ZEROES is supported."""
    BLOCK_STATUS_PAYLOAD = 1 << 12
    """BLOCK_STATUS may carry a payload (extended headers only)."""


class Command(IntEnum):
    """Request types of the transmission phase."""

    READ = 0
    """Read a range."""
    WRITE = 1
    """Write a range; the data follows the request header."""
    DISC = 2
    """Disconnect after answering every earlier request; has no reply."""
    FLUSH = 3
    """Persist every write already answered."""
    TRIM = 4
    """The range is no longer needed (a hint)."""
    CACHE = 5
    """Prefetch a range (not used)."""
    WRITE_ZEROES = 6
    """Make a range read as zeroes, without sending them."""
    BLOCK_STATUS = 7
    """Report the selected metadata contexts over a range."""


class CommandFlag(IntFlag):
    """Flags of a request."""

    FUA = 1 << 0
    """Reply only once the written data is on stable storage."""
    NO_HOLE = 1 << 1
    """WRITE_ZEROES must allocate, not punch a hole."""
    DF = 1 << 2
    """READ: reply with at most one data chunk."""
    REQ_ONE = 1 << 3
    """BLOCK_STATUS: one extent per context is enough."""
    FAST_ZERO = 1 << 4
    """WRITE_ZEROES: fail with ENOTSUP at once unless zeroing is faster than writing."""


class ReplyFlag(IntFlag):
    """Flags of a structured reply chunk."""

    DONE = 1 << 0
    """This is the last chunk of the reply."""


class ReplyType(IntEnum):
    """Structured reply chunk types; those with bit 15 set are errors."""

    NONE = 0
    """No payload; ends a reply (DONE must be set)."""
    OFFSET_DATA = 1
    """READ data: offset (u64), then the bytes."""
    OFFSET_HOLE = 2
    """READ: offset (u64) and size (u32) of a range that reads as zeroes."""
    BLOCK_STATUS = 5
    """Context id (u32), then (length u32, flags u32) extent descriptors."""
    BLOCK_STATUS_EXT = 6
    """64-bit block status descriptors (extended headers only; not negotiated)."""
    ERROR = (1 << 15) + 1
    """Error (u32), message length (u16), message."""
    ERROR_OFFSET = (1 << 15) + 2
    """Error (u32), message length (u16), message, then the offset (u64) where it happened."""


REPLY_TYPE_ERROR_BIT = 1 << 15
"""Bit set in every error chunk type, known or not."""


class NbdErrno(IntEnum):
    """Error values a server puts in replies (the usual errno numbers)."""

    EPERM = 1
    """Operation not permitted (e.g. a write to a read-only export)."""
    EIO = 5
    """Input/output error."""
    ENOMEM = 12
    """Cannot allocate memory."""
    EINVAL = 22
    """Invalid argument (also: unknown command or flag, out-of-range read)."""
    ENOSPC = 28
    """No space left on device (also: write past the end)."""
    EOVERFLOW = 75
    """Value too large (e.g. a DF read too large for one chunk)."""
    ENOTSUP = 95
    """Operation not supported (FAST_ZERO that would not be fast)."""
    ESHUTDOWN = 108
    """The server is shutting down; the client must disconnect."""


def errno_name(code: int) -> str:
    """The NBD error value's name, or 'error N' for one the protocol does not define."""
    try:
        return NbdErrno(code).name
    except ValueError:
        return f"error {code}"


class AllocationFlag(IntFlag):
    """Extent flags of the `base:allocation` metadata context."""

    HOLE = 1 << 0
    """Not allocated on the server's storage."""
    ZERO = 1 << 1
    """Reads as zeroes."""


DIRTY = 1 << 0
"""Extent flag of a `qemu:dirty-bitmap:NAME` context: the range is dirty in the bitmap."""
BASE_ALLOCATION = "base:allocation"
"""The one metadata context the NBD protocol itself defines."""
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
"""QEMU's metadata context of a dirty bitmap, followed by the bitmap's name."""

# ---------------------------------------------------------------------------- layouts

GREETING = struct.Struct(">QQH")
"""NBDMAGIC, IHAVEOPT, handshake flags."""
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
"""IHAVEOPT, option code, data length."""
OPTION_REPLY_HEADER = struct.Struct(">QIII")
"""Reply magic, option code, reply type, data length."""
REQUEST = struct.Struct(">IHHQQI")
"""Magic, command flags, type, cookie, offset, length."""
SIMPLE_REPLY = struct.Struct(">IIQ")
"""Magic, error, cookie."""
STRUCTURED_REPLY = struct.Struct(">IHHQI")
"""Magic, flags, type, cookie, payload length."""
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">QH")
"""Export size, transmission flags (after the u16 info type)."""
INFO_BLOCK_SIZE = struct.Struct(">III")
"""Minimum, preferred, maximum (after the u16 info type)."""
HOLE = struct.Struct(">QI")
"""Offset and size of an OFFSET_HOLE chunk."""
ERROR_HEAD = struct.Struct(">IH")
"""Error value and message length at the start of every error chunk."""
DESCRIPTOR = struct.Struct(">II")
"""Extent length and flags in a BLOCK_STATUS chunk."""

# ---------------------------------------------------------------------------- limits

MAX_STRING = 4096
"""Longest string (export name, context name, message) the protocol allows, in bytes."""
MAX_OPTION_REPLY = 2 * MAX_STRING + 64
"""Largest option reply payload accepted (a context id and name, an info string, an error
message): larger ones are a protocol error, never buffered."""
MAX_ERROR_CHUNK = MAX_STRING + 64
"""Largest error chunk payload accepted: fixed fields, a message and room for fields of an
error type not known here."""
MAX_DESCRIPTORS = 1 << 20
"""Most extents in one BLOCK_STATUS chunk (the limit the protocol tells servers to keep)."""
MAX_BLOCK_STATUS_CHUNK = 4 + DESCRIPTOR.size * MAX_DESCRIPTORS
"""Largest BLOCK_STATUS chunk payload accepted (8 MiB + 4)."""
MAX_FRAGMENTS = 4096
"""Most disjoint pieces a READ reply may be in before its last chunk: out-of-order chunks
are fine, a reply shredded into more gaps than this is refused (bounds the bookkeeping)."""
MAX_LENGTH = 0xFFFFFFFF
"""Largest length field of a request."""
MAX_BLOCK_SIZE_MINIMUM = 1 << 16
"""Largest minimum block size a server may advertise."""
DEFAULT_MAXIMUM_PAYLOAD = 32 << 20
"""Largest READ/WRITE payload when the server advertises none (the protocol's default)."""
DEFAULT_BLOCK_SIZES_MINIMUM = 1
DEFAULT_BLOCK_SIZES_PREFERRED = 4096
SCRATCH_SIZE = 64 << 10
"""Receive buffer for headers and small messages; READ data bypasses it."""
MAX_SMALL_MESSAGE = SCRATCH_SIZE // 4
"""Largest message parsed whole in the scratch buffer (option replies and error chunks are
all smaller); a larger BLOCK_STATUS chunk is received into a buffer of its own."""
DISCARD_SIZE = 256 << 10
"""Buffer that data for an abandoned READ (or after a failure) is received into and dropped."""

_ZEROS = bytes(1 << 20)

# ---------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class BlockSizes:
    """The export's size constraints: requests must be multiples of `minimum`, should be of
    `preferred`, and READ/WRITE payloads must not exceed `maximum`."""

    minimum: int = DEFAULT_BLOCK_SIZES_MINIMUM
    preferred: int = DEFAULT_BLOCK_SIZES_PREFERRED
    maximum: int = DEFAULT_MAXIMUM_PAYLOAD

    def __post_init__(self) -> None:
        if not _power_of_two(self.minimum) or self.minimum > MAX_BLOCK_SIZE_MINIMUM:
            raise ValueError(f"minimum block size {self.minimum} is not a power of two "
                             f"up to {MAX_BLOCK_SIZE_MINIMUM}")
        if not _power_of_two(self.preferred) or self.preferred < max(self.minimum, 512):
            raise ValueError(f"preferred block size {self.preferred} is not a power of two "
                             f"of at least max(minimum, 512)")
        if not self.preferred <= self.maximum <= MAX_LENGTH:
            raise ValueError(f"maximum payload {self.maximum} is below the preferred block "
                             f"size {self.preferred} or above 2**32 - 1")


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What OPT_GO told us about the export."""

    name: str
    size: int
    flags: TransmissionFlag
    block_sizes: BlockSizes
    contexts: Mapping[str, int]
    """Selected metadata contexts: name -> the id this connection uses for it."""
    structured_replies: bool

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError("export size must not be negative")
        if self.contexts and not self.structured_replies:
            raise ValueError("metadata contexts need structured replies")

    @property
    def read_only(self) -> bool:
        """Writes, trims and write-zeroes are refused."""
        return bool(self.flags & TransmissionFlag.READ_ONLY)


@dataclass(frozen=True, slots=True)
class Extent:
    """A range of the export and its flags in one metadata context."""

    offset: int
    length: int
    flags: int

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length <= 0 or self.flags < 0:
            raise ValueError(f"bad extent {self.offset}+{self.length} flags {self.flags}")

    @property
    def end(self) -> int:
        """First byte after the extent."""
        return self.offset + self.length


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """The server accepted OPT_GO: the connection is in the transmission phase."""

    export: ExportInfo


@dataclass(frozen=True, slots=True)
class ReplyDone:
    """The reply to one request is complete (for READ, the data is in its buffer).

    `error` is 0 on success, else the NBD error value the server sent (the first one, when a
    structured reply carried several). `status` maps context id -> extents, for BLOCK_STATUS:
    consecutive from the request's offset, clipped to its range, at least one per context.
    """

    cookie: int
    command: Command
    offset: int
    length: int
    error: int = 0
    message: str = ""
    error_offset: int | None = None
    status: Mapping[int, tuple[Extent, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.error < 0 or (self.error == 0 and (self.message or self.error_offset is not None)):
            raise ValueError("a successful reply carries no error message or offset")
        if self.status and self.command != Command.BLOCK_STATUS:
            raise ValueError("only BLOCK_STATUS replies carry extents")


Event = HandshakeDone | ReplyDone

# ---------------------------------------------------------------------------- states


class Phase(Enum):
    """Where the connection is. The allowed moves are TRANSITIONS."""

    GREETING = "greeting"
    """Waiting for the server's magics and handshake flags."""
    STRUCTURED_REPLY = "structured-reply"
    """Sent OPT_STRUCTURED_REPLY, waiting for its reply."""
    META_CONTEXT = "meta-context"
    """Sent OPT_SET_META_CONTEXT, waiting for META_CONTEXT replies and ACK."""
    GO = "go"
    """Sent OPT_GO, waiting for INFO replies and ACK."""
    TRANSMISSION = "transmission"
    """Requests may be sent; replies are decoded."""
    DISCONNECTING = "disconnecting"
    """NBD_CMD_DISC sent: no new requests; replies to earlier ones still arrive."""
    CLOSED = "closed"
    """The handshake was refused or aborted, or the protocol failed: nothing more happens."""


TRANSITIONS: Mapping[Phase, frozenset[Phase]] = {
    Phase.GREETING: frozenset({Phase.STRUCTURED_REPLY, Phase.CLOSED}),
    Phase.STRUCTURED_REPLY: frozenset({Phase.META_CONTEXT, Phase.GO, Phase.CLOSED}),
    Phase.META_CONTEXT: frozenset({Phase.GO, Phase.CLOSED}),
    Phase.GO: frozenset({Phase.TRANSMISSION, Phase.CLOSED}),
    Phase.TRANSMISSION: frozenset({Phase.DISCONNECTING, Phase.CLOSED}),
    Phase.DISCONNECTING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}
"""Every allowed move between phases; `_enter` refuses any other."""

HANDSHAKE_PHASES = frozenset({Phase.GREETING, Phase.STRUCTURED_REPLY, Phase.META_CONTEXT,
                              Phase.GO})
REQUEST_PHASES = frozenset({Phase.TRANSMISSION})
REPLY_PHASES = frozenset({Phase.TRANSMISSION, Phase.DISCONNECTING})


class _Rx(Enum):
    """What the next received bytes are."""

    MESSAGE = "message"
    """A header or a small message, collected in the scratch buffer."""
    DATA = "data"
    """READ data, received straight into the request's buffer."""
    BODY = "body"
    """A large BLOCK_STATUS payload, received into a buffer of its own."""
    DISCARD = "discard"
    """Everything, after a failure: received into the discard buffer and dropped."""


@dataclass(slots=True, eq=False)
class _Request:
    """One request in flight, and what its reply has delivered so far."""

    cookie: int
    command: Command
    flags: int
    offset: int
    length: int
    into: memoryview | None = None
    """READ destination (exactly `length` bytes); None once abandoned: data is dropped."""
    chunked: bool = False
    """A structured chunk arrived, so a simple reply is no longer allowed."""
    covered: int = 0
    """READ bytes delivered by data and hole chunks."""
    pieces: list[tuple[int, int]] = field(default_factory=list)
    """READ: disjoint covered ranges (relative start, end), sorted and merged."""
    error: int = 0
    message: str = ""
    error_offset: int | None = None
    status: dict[int, tuple[Extent, ...]] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.offset + self.length


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _text(raw: bytes | memoryview) -> str:
    """A server string for a human: decoded leniently (it only ever goes into a message)."""
    return bytes(raw).decode("utf-8", "replace")


def _encode_string(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > MAX_STRING or "\0" in value:
        raise NbdRequestError(f"{what} {value[:64]!r} is longer than {MAX_STRING} bytes "
                              f"or contains NUL")
    return raw


def _option(code: Option, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, code, len(data)) + data


def _reply_name(code: int) -> str:
    try:
        return OptionReply(code).name
    except ValueError:
        return f"reply type {code:#x}"


# ---------------------------------------------------------------------------- the protocol


class ClientProtocol:
    """The client end of one NBD connection, fed bytes and asked for bytes, doing no I/O."""

    def __init__(self, export_name: str = "", meta_contexts: Iterable[str] = ()) -> None:
        self.export_name = export_name
        self._name_bytes = _encode_string(export_name, "export name")
        self.meta_contexts: tuple[str, ...] = tuple(dict.fromkeys(meta_contexts))
        for context in self.meta_contexts:
            if ":" not in context:
                raise NbdRequestError(f"metadata context {context!r} has no namespace "
                                      f"(like base:allocation)")
            _encode_string(context, "metadata context")
        self.phase = Phase.GREETING
        self.export: ExportInfo | None = None
        self._structured = False
        self._no_zeroes = False
        self._contexts: dict[str, int] = {}
        self._size = 0
        self._flags: TransmissionFlag | None = None
        self._block_sizes = BlockSizes()
        self._outbox: list[bytes] = []
        self._events: deque[Event] = deque()
        self._error: NbdError | None = None
        self._requests: dict[int, _Request] = {}
        self._next_cookie = 1
        # Receive side.
        self._scratch = bytearray(SCRATCH_SIZE)
        self._scratch_view = memoryview(self._scratch)
        self._start = 0               # first unparsed byte in scratch
        self._end = 0                 # one past the last received byte in scratch
        self._rx = _Rx.MESSAGE
        self._target: _Request | None = None  # DATA: the READ being filled
        self._target_pos = 0                  # DATA: where in it (relative); BODY: bytes in
        self._remaining = 0                   # DATA/BODY: bytes still to come
        self._target_done = False             # DATA/BODY: the chunk had the DONE flag
        self._body: bytearray | None = None   # BODY: the payload buffer
        self._body_cookie = 0
        self._discard = bytearray(DISCARD_SIZE)

    # ------------------------------------------------------------------ state

    @property
    def in_flight(self) -> int:
        """Requests sent whose replies are not complete."""
        return len(self._requests)

    @property
    def partial(self) -> bool:
        """Part of a reply (or handshake message) has arrived, but not all of it."""
        return self._end > self._start or self._rx in (_Rx.DATA, _Rx.BODY)

    @property
    def failed(self) -> NbdError | None:
        """The protocol error that ended the connection, if one did."""
        return self._error

    def _enter(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise AssertionError(f"NBD client: no move from {self.phase.value} to {phase.value}")
        self.phase = phase

    # ------------------------------------------------------------------ bytes in

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (asyncio.BufferedProtocol.get_buffer)."""
        if self._rx is _Rx.DATA:
            target = self._target
            assert target is not None and self._start == self._end
            if target.into is not None:
                return target.into[self._target_pos:self._target_pos + self._remaining]
            return memoryview(self._discard)[:min(self._remaining, DISCARD_SIZE)]
        if self._rx is _Rx.BODY:
            assert self._body is not None and self._start == self._end
            return memoryview(self._body)[self._target_pos:]
        if self._rx is _Rx.DISCARD:
            return memoryview(self._discard)
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start and SCRATCH_SIZE - self._end < MAX_SMALL_MESSAGE:
            # Keep room for a whole small message after the part already here.
            left = self._end - self._start
            self._scratch[:left] = self._scratch_view[self._start:self._end]
            self._start, self._end = 0, left
        return self._scratch_view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were written into the last get_buffer(); parse what is complete."""
        if nbytes <= 0:
            return
        if self._rx is _Rx.DATA:
            self._data_arrived(nbytes)
        elif self._rx is _Rx.BODY:
            self._target_pos += nbytes
            self._remaining -= nbytes
            if self._remaining == 0:
                self._body_complete()
        elif self._rx is _Rx.DISCARD:
            return
        else:
            self._end += nbytes
        self._parse()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes (copies them in through get_buffer/buffer_updated)."""
        view = memoryview(data).cast("B")
        while view:
            buffer = self.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def next_event(self) -> Event | None:
        """The next complete event, or None when more bytes are needed.

        Raises the NbdError that ended the connection once the events before it are taken.
        """
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        return None

    def receive_eof(self) -> str | None:
        """The server closed its end: why that is an error, or None if nothing was lost."""
        if self._error is not None:
            return None
        phase, partial, unanswered = self.phase, self.partial, len(self._requests)
        if phase is not Phase.CLOSED:
            self._enter(Phase.CLOSED)
        self._requests.clear()
        if phase in HANDSHAKE_PHASES:
            return f"the server closed the connection during the handshake ({phase.value})"
        if unanswered or partial:
            what = " in the middle of a reply" if partial else ""
            return (f"the server closed the connection{what} with {unanswered} request(s) "
                    f"unanswered")
        if phase is Phase.TRANSMISSION:
            return "the server closed the connection"
        return None

    # ------------------------------------------------------------------ bytes out

    def data_to_send(self) -> bytes:
        """Handshake bytes to write now (requests return their own header instead)."""
        out = b"".join(self._outbox)
        self._outbox.clear()
        return out

    # ------------------------------------------------------------------ requests

    def read(self, offset: int, into: memoryview, *, flags: int = 0) -> tuple[int, bytes]:
        """A READ of len(into) bytes at `offset`; the reply's data lands in `into`."""
        view = memoryview(into)
        if view.readonly or not view.contiguous:
            raise NbdRequestError("READ needs a writable contiguous buffer")
        view = view.cast("B")
        export = self._check_io(Command.READ, offset, len(view), flags)
        if len(view) > export.block_sizes.maximum:
            raise NbdRequestError(f"READ of {len(view)} bytes exceeds the server's maximum "
                                  f"payload {export.block_sizes.maximum}")
        if flags & CommandFlag.DF and not export.flags & TransmissionFlag.SEND_DF:
            raise NbdRequestError("the export does not support the DF flag")
        return self._request(Command.READ, flags, offset, len(view), into=view)

    def write(self, offset: int, length: int, *, fua: bool = False) -> tuple[int, bytes]:
        """The header of a WRITE of `length` bytes; send the data right after it."""
        flags = self._fua(fua)
        export = self._check_io(Command.WRITE, offset, length, flags)
        self._check_writable(export, Command.WRITE)
        if length > export.block_sizes.maximum:
            raise NbdRequestError(f"WRITE of {length} bytes exceeds the server's maximum "
                                  f"payload {export.block_sizes.maximum}")
        return self._request(Command.WRITE, flags, offset, length)

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False,
                     fast: bool = False, fua: bool = False) -> tuple[int, bytes]:
        """A WRITE_ZEROES: the range reads as zeroes afterwards."""
        flags = self._fua(fua) | (CommandFlag.NO_HOLE if no_hole else 0)
        export = self._check_io(Command.WRITE_ZEROES, offset, length, flags)
        self._check_writable(export, Command.WRITE_ZEROES)
        if not export.flags & TransmissionFlag.SEND_WRITE_ZEROES:
            raise NbdRequestError("the export does not support WRITE_ZEROES")
        if fast:
            if not export.flags & TransmissionFlag.SEND_FAST_ZERO:
                raise NbdRequestError("the export does not support fast zeroing")
            flags |= CommandFlag.FAST_ZERO
        return self._request(Command.WRITE_ZEROES, flags, offset, length)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> tuple[int, bytes]:
        """A TRIM: the server may discard the range."""
        flags = self._fua(fua)
        export = self._check_io(Command.TRIM, offset, length, flags)
        self._check_writable(export, Command.TRIM)
        if not export.flags & TransmissionFlag.SEND_TRIM:
            raise NbdRequestError("the export does not support TRIM")
        return self._request(Command.TRIM, flags, offset, length)

    def flush(self) -> tuple[int, bytes]:
        """A FLUSH of every write already answered."""
        export = self._transmitting()
        if not export.flags & TransmissionFlag.SEND_FLUSH:
            raise NbdRequestError("the export does not support FLUSH")
        return self._request(Command.FLUSH, 0, 0, 0)

    def block_status(self, offset: int, length: int, *,
                     req_one: bool = False) -> tuple[int, bytes]:
        """A BLOCK_STATUS over the range for every selected metadata context."""
        flags = CommandFlag.REQ_ONE if req_one else 0
        export = self._check_io(Command.BLOCK_STATUS, offset, length, flags)
        if not export.contexts:
            raise NbdRequestError("BLOCK_STATUS needs a metadata context selected at connect")
        return self._request(Command.BLOCK_STATUS, flags, offset, length)

    def disconnect(self) -> bytes:
        """NBD_CMD_DISC: no new requests; earlier ones are still answered, then EOF."""
        self._transmitting()
        self._enter(Phase.DISCONNECTING)
        return REQUEST.pack(REQUEST_MAGIC, 0, Command.DISC, self._take_cookie(), 0, 0)

    def abandon(self, cookie: int) -> None:
        """Nobody waits for this request any more: its reply is still checked and consumed,
        but READ data goes nowhere (the caller may reuse its buffer at once)."""
        request = self._requests.get(cookie)
        if request is not None:
            request.into = None

    # ------------------------------------------------------------------ request helpers

    def _transmitting(self) -> ExportInfo:
        if self.phase is not Phase.TRANSMISSION or self.export is None:
            raise NbdRequestError(f"no requests in the {self.phase.value} phase")
        return self.export

    def _fua(self, fua: bool) -> int:
        if not fua:
            return 0
        if self.export is None or not self.export.flags & TransmissionFlag.SEND_FUA:
            raise NbdRequestError("the export does not support FUA")
        return CommandFlag.FUA

    def _check_io(self, command: Command, offset: int, length: int, flags: int) -> ExportInfo:
        export = self._transmitting()
        if offset < 0 or length <= 0 or length > MAX_LENGTH:
            raise NbdRequestError(f"{command.name} of {length} bytes at {offset}: the length "
                                  f"must be 1 to 2**32 - 1 and the offset not negative")
        if offset + length > export.size:
            raise NbdRequestError(f"{command.name} of {length} bytes at {offset} reaches past "
                                  f"the end of the export ({export.size} bytes)")
        minimum = export.block_sizes.minimum
        end = offset + length
        if offset % minimum or (end % minimum and end != export.size):
            raise NbdRequestError(f"{command.name} of {length} bytes at {offset} is not aligned "
                                  f"to the export's minimum block size {minimum}")
        return export

    @staticmethod
    def _check_writable(export: ExportInfo, command: Command) -> None:
        if export.read_only:
            raise NbdRequestError(f"{command.name} to a read-only export")

    def _take_cookie(self) -> int:
        cookie = self._next_cookie
        self._next_cookie = cookie + 1 if cookie < (1 << 64) - 1 else 1
        return cookie

    def _request(self, command: Command, flags: int, offset: int, length: int,
                 into: memoryview | None = None) -> tuple[int, bytes]:
        cookie = self._take_cookie()
        while cookie in self._requests:   # only after 2**64 requests, but never reuse one
            cookie = self._take_cookie()
        self._requests[cookie] = _Request(cookie, command, flags, offset, length, into=into)
        return cookie, REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)

    # ------------------------------------------------------------------ parsing

    def _fail(self, error: NbdError) -> None:
        """Record the first error; everything received from now on is dropped."""
        if self._error is None:
            self._error = error
        if isinstance(error, NbdOptionError) and self.phase in HANDSHAKE_PHASES:
            self._outbox.append(_option(Option.ABORT))   # a refusal ends the handshake politely
        if self.phase is not Phase.CLOSED:
            self._enter(Phase.CLOSED)
        self._rx = _Rx.DISCARD
        self._start = self._end = 0
        self._body = None
        self._requests.clear()
        self._target = None

    def _parse(self) -> None:
        try:
            while self._rx is _Rx.MESSAGE and self._end > self._start:
                consumed = self._parse_message(self._scratch_view[self._start:self._end])
                if consumed == 0:
                    break
                self._start += consumed
                if self._rx is _Rx.DATA:
                    self._feed_data_from_scratch()
                elif self._rx is _Rx.BODY:
                    self._feed_body_from_scratch()
        except NbdError as exc:
            self._fail(exc)

    def _parse_message(self, buf: memoryview) -> int:
        """Consume one whole message from the front of `buf`, or nothing (return 0)."""
        phase = self.phase
        if phase in REPLY_PHASES:
            return self._parse_reply(buf)
        if phase is Phase.GREETING:
            return self._parse_greeting(buf)
        if phase in HANDSHAKE_PHASES:
            return self._parse_option_reply(buf)
        raise NbdProtocolError(f"the server sent bytes in the {phase.value} phase")

    # ------------------------------------------------------------------ handshake

    def _parse_greeting(self, buf: memoryview) -> int:
        magic = NBDMAGIC.to_bytes(8, "big")
        head = bytes(buf[:8])
        if head != magic[:len(head)]:
            raise NotNbdServerError(f"the server's first bytes {head!r} are not NBDMAGIC: "
                                    f"this is not an NBD server")
        if len(buf) < GREETING.size:
            return 0
        _, second, flags = GREETING.unpack_from(buf)
        if second == CLISERV_MAGIC:
            raise NbdProtocolError("the server speaks oldstyle NBD negotiation, which is not "
                                   "supported (only fixed newstyle)")
        if second != IHAVEOPT:
            raise NotNbdServerError(f"the server's second magic {second:#x} is not IHAVEOPT")
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise NbdProtocolError("the server does not speak fixed newstyle negotiation")
        client = ClientFlag.FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            client |= ClientFlag.NO_ZEROES
            self._no_zeroes = True
        self._outbox.append(CLIENT_FLAGS.pack(client))
        self._outbox.append(_option(Option.STRUCTURED_REPLY))
        self._enter(Phase.STRUCTURED_REPLY)
        return GREETING.size

    def _parse_option_reply(self, buf: memoryview) -> int:
        if len(buf) < OPTION_REPLY_HEADER.size:
            return 0
        magic, option, reply, length = OPTION_REPLY_HEADER.unpack_from(buf)
        if magic != OPTION_REPLY_MAGIC:
            raise NbdProtocolError(f"option reply magic {magic:#x} is wrong")
        expected = {Phase.STRUCTURED_REPLY: Option.STRUCTURED_REPLY,
                    Phase.META_CONTEXT: Option.SET_META_CONTEXT,
                    Phase.GO: Option.GO}[self.phase]
        if option != expected:
            raise NbdProtocolError(f"option reply for option {option}, but {expected.name} "
                                   f"was sent")
        if length > MAX_OPTION_REPLY:
            raise NbdProtocolError(f"{expected.name} reply of {length} bytes exceeds "
                                   f"{MAX_OPTION_REPLY}")
        total = OPTION_REPLY_HEADER.size + length
        if len(buf) < total:
            return 0
        data = buf[OPTION_REPLY_HEADER.size:total]
        if reply & OPTION_REPLY_ERROR_BIT:
            self._option_refused(expected, reply, data)
        elif self.phase is Phase.STRUCTURED_REPLY:
            self._structured_reply_answer(reply, data)
        elif self.phase is Phase.META_CONTEXT:
            self._meta_context_answer(reply, data)
        else:
            self._go_answer(reply, data)
        return total

    def _option_refused(self, option: Option, reply: int, data: memoryview) -> None:
        message = _text(data) or "no reason given"
        if option is Option.STRUCTURED_REPLY and not self.meta_contexts:
            # An old server: go on with simple replies (no sparse reads, no block status).
            self._structured = False
            self._send_go()
            return
        if option is Option.GO and reply == OptionReply.ERR_UNKNOWN:
            message = f"no export named {self.export_name!r} ({message})"
        raise NbdOptionError(f"NBD_OPT_{option.name}", _reply_name(reply), reply, message)

    def _structured_reply_answer(self, reply: int, data: memoryview) -> None:
        if reply != OptionReply.ACK or data:
            raise NbdProtocolError(f"unexpected {_reply_name(reply)} ({len(data)} bytes) to "
                                   f"NBD_OPT_STRUCTURED_REPLY")
        self._structured = True
        if self.meta_contexts:
            queries = b"".join(U32.pack(len(raw)) + raw
                               for raw in (c.encode() for c in self.meta_contexts))
            payload = (U32.pack(len(self._name_bytes)) + self._name_bytes
                       + U32.pack(len(self.meta_contexts)) + queries)
            self._outbox.append(_option(Option.SET_META_CONTEXT, payload))
            self._enter(Phase.META_CONTEXT)
        else:
            self._send_go()

    def _meta_context_answer(self, reply: int, data: memoryview) -> None:
        if reply == OptionReply.META_CONTEXT:
            if not U32.size < len(data) <= U32.size + MAX_STRING:
                raise NbdProtocolError(f"META_CONTEXT reply of {len(data)} bytes")
            (context_id,) = U32.unpack_from(data)
            try:
                name = bytes(data[U32.size:]).decode("utf-8")
            except UnicodeDecodeError:
                raise NbdProtocolError("META_CONTEXT name is not UTF-8") from None
            if name in self._contexts or context_id in self._contexts.values():
                raise NbdProtocolError(f"META_CONTEXT {name!r} id {context_id} repeats an "
                                       f"earlier name or id")
            if name not in self.meta_contexts:
                raise NbdProtocolError(f"the server selected context {name!r}, which was "
                                       f"not asked for")
            self._contexts[name] = context_id
        elif reply == OptionReply.ACK and not data:
            missing = [name for name in self.meta_contexts if name not in self._contexts]
            if missing:
                raise NbdOptionError(
                    "NBD_OPT_SET_META_CONTEXT", "not selected", 0,
                    f"export {self.export_name!r} has no metadata context "
                    f"{', '.join(map(repr, missing))}")
            self._send_go()
        else:
            raise NbdProtocolError(f"unexpected {_reply_name(reply)} to "
                                   f"NBD_OPT_SET_META_CONTEXT")

    def _send_go(self) -> None:
        payload = (U32.pack(len(self._name_bytes)) + self._name_bytes
                   + U16.pack(1) + U16.pack(Info.BLOCK_SIZE))
        self._outbox.append(_option(Option.GO, payload))
        self._enter(Phase.GO)

    def _go_answer(self, reply: int, data: memoryview) -> None:
        if reply == OptionReply.INFO:
            if len(data) < U16.size:
                raise NbdProtocolError("INFO reply without an information type")
            (info,) = U16.unpack_from(data)
            body = data[U16.size:]
            if info == Info.EXPORT:
                if len(body) != INFO_EXPORT.size:
                    raise NbdProtocolError(f"INFO_EXPORT of {len(data)} bytes, not 12")
                size, flags = INFO_EXPORT.unpack(body)
                if not flags & TransmissionFlag.HAS_FLAGS:
                    raise NbdProtocolError("INFO_EXPORT flags lack HAS_FLAGS")
                if size > (1 << 63) - 1:
                    raise NbdProtocolError(f"export size {size} is beyond 2**63 - 1")
                self._size, self._flags = size, TransmissionFlag(flags)
            elif info == Info.BLOCK_SIZE:
                if len(body) != INFO_BLOCK_SIZE.size:
                    raise NbdProtocolError(f"INFO_BLOCK_SIZE of {len(data)} bytes, not 14")
                try:
                    self._block_sizes = BlockSizes(*INFO_BLOCK_SIZE.unpack(body))
                except ValueError as exc:
                    raise NbdProtocolError(f"INFO_BLOCK_SIZE: {exc}") from None
            # NAME, DESCRIPTION and types unknown here are ignored, as the protocol says.
        elif reply == OptionReply.ACK and not data:
            if self._flags is None:
                raise NbdProtocolError("OPT_GO succeeded without INFO_EXPORT")
            self.export = ExportInfo(self.export_name, self._size, self._flags,
                                     self._block_sizes, MappingProxyType(dict(self._contexts)),
                                     self._structured)
            self._enter(Phase.TRANSMISSION)
            self._events.append(HandshakeDone(self.export))
        else:
            raise NbdProtocolError(f"unexpected {_reply_name(reply)} to NBD_OPT_GO")

    # ------------------------------------------------------------------ replies

    def _lookup(self, cookie: int) -> _Request:
        request = self._requests.get(cookie)
        if request is None:
            raise NbdProtocolError(f"reply for cookie {cookie}, which no request in flight has")
        return request

    def _parse_reply(self, buf: memoryview) -> int:
        if len(buf) < U32.size:
            return 0
        (magic,) = U32.unpack_from(buf)
        if magic == STRUCTURED_REPLY_MAGIC:
            return self._parse_chunk(buf)
        if magic == SIMPLE_REPLY_MAGIC:
            return self._parse_simple(buf)
        if magic == EXTENDED_REPLY_MAGIC:
            raise NbdProtocolError("extended-header reply, but extended headers were not "
                                   "negotiated")
        raise NbdProtocolError(f"reply magic {magic:#010x} is neither simple nor structured")

    def _parse_simple(self, buf: memoryview) -> int:
        if len(buf) < SIMPLE_REPLY.size:
            return 0
        _, error, cookie = SIMPLE_REPLY.unpack_from(buf)
        request = self._lookup(cookie)
        if request.chunked:
            raise NbdProtocolError(f"simple reply to {request.command.name} cookie {cookie} "
                                   f"after structured chunks")
        if request.command is Command.READ:
            if self._structured:
                raise NbdProtocolError("simple reply to READ, but structured replies were "
                                       "negotiated")
            if error == 0:
                request.covered = request.length
                self._begin_data(request, 0, request.length, done=True)
                return SIMPLE_REPLY.size
        elif request.command is Command.BLOCK_STATUS and error == 0:
            raise NbdProtocolError("simple success reply to BLOCK_STATUS (it needs chunks)")
        request.error = error
        self._complete(request)
        return SIMPLE_REPLY.size

    def _parse_chunk(self, buf: memoryview) -> int:
        if len(buf) < STRUCTURED_REPLY.size:
            return 0
        _, flags, kind, cookie, length = STRUCTURED_REPLY.unpack_from(buf)
        if not self._structured:
            raise NbdProtocolError("structured reply chunk, but structured replies were not "
                                   "negotiated")
        request = self._lookup(cookie)
        request.chunked = True
        done = bool(flags & ReplyFlag.DONE)
        head = STRUCTURED_REPLY.size
        command = request.command
        if kind == ReplyType.OFFSET_DATA:
            if command is not Command.READ:
                raise NbdProtocolError(f"OFFSET_DATA chunk in the reply to {command.name}")
            if not U64.size < length <= U64.size + request.length:
                raise NbdProtocolError(f"OFFSET_DATA chunk of {length} bytes for a READ of "
                                       f"{request.length}")
            if len(buf) < head + U64.size:
                return 0
            (offset,) = U64.unpack_from(buf, head)
            size = length - U64.size
            self._cover(request, offset, size, "OFFSET_DATA")
            self._begin_data(request, offset - request.offset, size, done)
            return head + U64.size
        if kind == ReplyType.BLOCK_STATUS:
            if command is not Command.BLOCK_STATUS:
                raise NbdProtocolError(f"BLOCK_STATUS chunk in the reply to {command.name}")
            if (length < U32.size + DESCRIPTOR.size or (length - U32.size) % DESCRIPTOR.size
                    or length > MAX_BLOCK_STATUS_CHUNK):
                raise NbdProtocolError(f"BLOCK_STATUS chunk of {length} bytes (must be 4 + "
                                       f"8 * n, n from 1 to {MAX_DESCRIPTORS})")
            if head + length > MAX_SMALL_MESSAGE:
                self._body = bytearray(length)
                self._body_cookie = cookie
                self._target_pos, self._remaining = 0, length
                self._target_done = done
                self._rx = _Rx.BODY
                return head
        elif kind == ReplyType.NONE:
            if length:
                raise NbdProtocolError(f"NONE chunk with {length} bytes of payload")
            if not done:
                raise NbdProtocolError("NONE chunk without the DONE flag")
        elif kind == ReplyType.OFFSET_HOLE:
            if command is not Command.READ:
                raise NbdProtocolError(f"OFFSET_HOLE chunk in the reply to {command.name}")
            if length != HOLE.size:
                raise NbdProtocolError(f"OFFSET_HOLE chunk of {length} bytes, not 12")
        elif kind & REPLY_TYPE_ERROR_BIT:
            if length > MAX_ERROR_CHUNK:
                raise NbdProtocolError(f"error chunk of {length} bytes exceeds "
                                       f"{MAX_ERROR_CHUNK}")
        else:
            raise NbdProtocolError(f"unknown reply chunk type {kind} for {command.name}")
        if len(buf) < head + length:
            return 0
        payload = buf[head:head + length]
        if kind == ReplyType.BLOCK_STATUS:
            self._block_status_chunk(request, payload)
        elif kind == ReplyType.OFFSET_HOLE:
            offset, size = HOLE.unpack(payload)
            if size == 0:
                raise NbdProtocolError("OFFSET_HOLE chunk of size 0")
            self._cover(request, offset, size, "OFFSET_HOLE")
            if request.into is not None:
                _zero(request.into, offset - request.offset, size)
        elif kind & REPLY_TYPE_ERROR_BIT:
            self._error_chunk(request, kind, payload)
        if done:
            self._complete(request)
        return head + length

    def _cover(self, request: _Request, offset: int, size: int, what: str) -> None:
        """Check that [offset, offset+size) lies in the request and overlaps no earlier
        chunk, and record it. Everything that decides where READ data lands is checked here."""
        start = offset - request.offset
        end = start + size
        if start < 0 or end > request.length:
            raise NbdProtocolError(f"{what} chunk {offset}+{size} lies outside the READ "
                                   f"{request.offset}+{request.length}")
        pieces = request.pieces
        if pieces and pieces[-1][1] <= start:          # in order: the common case
            index = len(pieces)
        else:
            index = bisect.bisect_right(pieces, (start, MAX_LENGTH + 1))
            if index and pieces[index - 1][1] > start:
                raise NbdProtocolError(f"{what} chunk {offset}+{size} overlaps an earlier one")
            if index < len(pieces) and pieces[index][0] < end:
                raise NbdProtocolError(f"{what} chunk {offset}+{size} overlaps an earlier one")
        joins_left = index > 0 and pieces[index - 1][1] == start
        joins_right = index < len(pieces) and pieces[index][0] == end
        if joins_left and joins_right:
            pieces[index - 1] = (pieces[index - 1][0], pieces[index][1])
            del pieces[index]
        elif joins_left:
            pieces[index - 1] = (pieces[index - 1][0], end)
        elif joins_right:
            pieces[index] = (start, pieces[index][1])
        else:
            pieces.insert(index, (start, end))
            if len(pieces) > MAX_FRAGMENTS:
                raise NbdProtocolError(f"READ reply in more than {MAX_FRAGMENTS} pieces")
        request.covered += size

    def _error_chunk(self, request: _Request, kind: int, payload: memoryview) -> None:
        fixed = ERROR_HEAD.size + (U64.size if kind == ReplyType.ERROR_OFFSET else 0)
        if len(payload) < fixed:
            raise NbdProtocolError(f"error chunk of {len(payload)} bytes is too short")
        error, message_length = ERROR_HEAD.unpack_from(payload)
        if message_length > len(payload) - fixed:
            raise NbdProtocolError(f"error message of {message_length} bytes does not fit "
                                   f"its chunk of {len(payload)}")
        if error == 0:
            raise NbdProtocolError("error chunk with error value 0")
        message = _text(payload[ERROR_HEAD.size:ERROR_HEAD.size + message_length])
        error_offset = None
        if kind == ReplyType.ERROR_OFFSET:
            (error_offset,) = U64.unpack_from(payload, ERROR_HEAD.size + message_length)
            if request.command in (Command.FLUSH, Command.DISC, Command.CACHE):
                raise NbdProtocolError(f"ERROR_OFFSET chunk in the reply to "
                                       f"{request.command.name}")
            if not request.offset <= error_offset < request.end:
                raise NbdProtocolError(f"ERROR_OFFSET {error_offset} lies outside the request "
                                       f"{request.offset}+{request.length}")
        if request.error == 0:
            request.error, request.message, request.error_offset = error, message, error_offset

    def _block_status_chunk(self, request: _Request, payload: memoryview) -> None:
        (context_id,) = U32.unpack_from(payload)
        assert self.export is not None
        if context_id not in self.export.contexts.values():
            raise NbdProtocolError(f"BLOCK_STATUS chunk for context id {context_id}, which "
                                   f"was not selected")
        if context_id in request.status:
            raise NbdProtocolError(f"second BLOCK_STATUS chunk for context id {context_id}")
        count = (len(payload) - U32.size) // DESCRIPTOR.size
        req_one = request.flags & CommandFlag.REQ_ONE
        if req_one and count != 1:
            raise NbdProtocolError(f"{count} extents in reply to a REQ_ONE BLOCK_STATUS")
        position, end = request.offset, request.end
        extents = []
        for length, flags in DESCRIPTOR.iter_unpack(payload[U32.size:]):
            if length == 0:
                raise NbdProtocolError("BLOCK_STATUS extent of length 0")
            if position >= end:
                raise NbdProtocolError(f"BLOCK_STATUS extents go on past the requested range "
                                       f"{request.offset}+{request.length}")
            if req_one and length > request.length:
                raise NbdProtocolError("REQ_ONE BLOCK_STATUS extent longer than the request")
            # Only the last extent may reach past the request; it is clipped to the range.
            length = min(length, end - position)
            extents.append(Extent(position, length, flags))
            position += length
        request.status[context_id] = tuple(extents)

    def _complete(self, request: _Request) -> None:
        """The reply's DONE: check that a success delivered everything, then emit it."""
        if request.error == 0:
            if request.command is Command.READ and request.covered != request.length:
                raise NbdProtocolError(f"READ {request.offset}+{request.length} ended with "
                                       f"success after only {request.covered} bytes")
            if request.command is Command.BLOCK_STATUS:
                assert self.export is not None
                missing = set(self.export.contexts.values()) - set(request.status)
                if missing:
                    raise NbdProtocolError(f"BLOCK_STATUS ended with success without extents "
                                           f"for context id(s) {sorted(missing)}")
        del self._requests[request.cookie]
        self._events.append(ReplyDone(
            request.cookie, request.command, request.offset, request.length, request.error,
            request.message, request.error_offset,
            request.status if request.error == 0 else {}))

    # ------------------------------------------------------------------ data and bodies

    def _begin_data(self, request: _Request, position: int, size: int, done: bool) -> None:
        self._rx = _Rx.DATA
        self._target = request
        self._target_pos = position
        self._remaining = size
        self._target_done = done

    def _feed_data_from_scratch(self) -> None:
        """READ data that arrived in the scratch buffer along with its header."""
        n = min(self._end - self._start, self._remaining)
        if n:
            target = self._target
            assert target is not None
            if target.into is not None:
                target.into[self._target_pos:self._target_pos + n] = (
                    self._scratch_view[self._start:self._start + n])
            self._start += n
            self._data_arrived(n)

    def _data_arrived(self, nbytes: int) -> None:
        self._target_pos += nbytes
        self._remaining -= nbytes
        if self._remaining:
            return
        target, self._target = self._target, None
        self._rx = _Rx.MESSAGE
        assert target is not None
        if self._target_done:
            try:
                self._complete(target)
            except NbdError as exc:
                self._fail(exc)

    def _feed_body_from_scratch(self) -> None:
        n = min(self._end - self._start, self._remaining)
        assert self._body is not None
        self._body[self._target_pos:self._target_pos + n] = (
            self._scratch_view[self._start:self._start + n])
        self._start += n
        self._target_pos += n
        self._remaining -= n
        if self._remaining == 0:
            self._body_complete()

    def _body_complete(self) -> None:
        body, self._body = self._body, None
        self._rx = _Rx.MESSAGE
        assert body is not None
        try:
            request = self._lookup(self._body_cookie)
            self._block_status_chunk(request, memoryview(body))
            if self._target_done:
                self._complete(request)
        except NbdError as exc:
            self._fail(exc)


def _zero(view: memoryview, start: int, size: int) -> None:
    """Fill view[start:start+size] with zeroes without allocating."""
    end = start + size
    while start < end:
        n = min(end - start, len(_ZEROS))
        view[start:start + n] = _ZEROS[:n]
        start += n


def context_ids(export: ExportInfo, names: Sequence[str]) -> list[int]:
    """The ids of selected metadata contexts by name (NbdRequestError for one not selected)."""
    try:
        return [export.contexts[name] for name in names]
    except KeyError as exc:
        raise NbdRequestError(f"metadata context {exc.args[0]!r} was not selected at connect "
                              f"(selected: {', '.join(export.contexts) or 'none'})") from None
