"""Transport frames after the handshake: length-prefixed, AES-256-GCM sealed, numbered, rekeyed.

Frame layout (all integers big-endian):

    +-----------------+---------+-------------------+--------------------------------+
    | length (u32)    | type u8 | sequence (u64)    | ciphertext: length bytes       |
    +-----------------+---------+-------------------+--------------------------------+
    |<------------- header, HEADER_LEN bytes, clear -->|  AES-256-GCM(payload) || tag   |

The whole clear header is the associated data of the AEAD, so its length, type and sequence
number are authenticated with the payload. The nonce is Noise's AESGCM nonce of the sequence
number (32 zero bits, then the 64-bit counter); each direction has its own key from Noise
Split() and counts from 0. The receiver knows which number comes next, so a replayed frame
(number already seen) or a dropped or reordered one (number ahead) is named as such before any
decryption; a frame whose header is rewritten to pass that check fails authentication.

Rekeying: each direction replaces its key with Noise REKEY(k) after REKEY_AFTER_BYTES of
ciphertext or REKEY_AFTER_FRAMES frames under one key, whichever comes first; the receiver
does the same after the same frame, so no message is needed. Per key that is at most 2**30
AES blocks; the AEAD usage limits of draft-irtf-cfrg-aead-limits put AES-GCM's confidentiality
advantage at about (blocks)**2 / 2**128 = 2**-68 and its integrity advantage far lower, well
inside the 2**-57 TLS 1.3 aims for (TLS rekeys after about 2**34.5 blocks). Sequence numbers,
and so nonces, keep counting across rekeys (as in Noise).

The decoder buffers at most one partial frame (SCRATCH_SIZE for small frames, or one frame
buffer of up to MAX_CIPHERTEXT bytes) plus the complete frames not yet taken with next_frame().
Large frames are received straight into their own buffer (get_buffer/buffer_updated, made for
asyncio.BufferedProtocol), so guest RAM is not copied on its way to the cipher.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.buffers import has_views
from agent.errors import FrameError, LocalError, WireCode, WireError
from agent.wire.noise import KEYLEN, MAX_NONCE, TAGLEN, aesgcm_nonce, rekey

HEADER = struct.Struct(">IBQ")
"""Frame header: ciphertext length (payload + tag), message type code, sequence number."""
HEADER_LEN = HEADER.size
MAX_PAYLOAD = 4 << 20
"""Largest payload of one frame (4 MiB); RAM batches are about 1 MiB."""
MAX_CIPHERTEXT = MAX_PAYLOAD + TAGLEN
MAX_FRAME = HEADER_LEN + MAX_CIPHERTEXT
REKEY_AFTER_BYTES = 1 << 34
"""Ciphertext bytes sealed under one key before both sides rekey (16 GiB)."""
REKEY_AFTER_FRAMES = 1 << 20
"""Frames sealed under one key before both sides rekey."""
MAX_SEQUENCE = MAX_NONCE - 1
"""Last usable sequence number; MAX_NONCE itself is reserved for REKEY."""
SCRATCH_SIZE = 64 << 10
"""Receive buffer for headers and small frames; larger frames get a buffer of their own."""
FRAME_BUFFER_GRAIN = 256 << 10
"""Buffers for large frames are allocated in multiples of this, and reused."""
PLAINTEXT_POOL_MIN = 64 << 10
"""Payloads from this size up are decrypted into reused buffers and handed out as read-only
memoryviews (no zero-filled `bytes` per frame: cryptography's decrypt() zero-fills its output
first, which cost as much CPU as AES itself). A buffer is reused only once no view of it is
left anywhere; smaller payloads are plain `bytes`."""
PLAINTEXT_POOL_BYTES = 32 << 20
"""Most bytes of plaintext buffers the decoder keeps track of for reuse."""
FRAME_BUFFER_POOL_BYTES = 16 << 20
"""Spare large-frame buffers kept for reuse, in bytes: fresh buffers cost a page fault per
4 KiB, which halved the receive rate; this covers the frames a reader lets pile up."""

_HAVE_ENCRYPT_INTO = hasattr(AESGCM, "encrypt_into")
_HAVE_DECRYPT_INTO = hasattr(AESGCM, "decrypt_into")

Buffer = bytes | bytearray | memoryview
"""Any contiguous bytes-like object (collections.abc.Buffer from Python 3.12 on)."""


class _KeySchedule:
    """One direction's key, sequence counter and rekey accounting (same code on both ends)."""

    __slots__ = (
        "_after_bytes",
        "_after_frames",
        "_bytes",
        "_frames",
        "aead",
        "key",
        "rekeys",
        "seq",
    )

    def __init__(self, key: bytes, after_bytes: int, after_frames: int) -> None:
        if len(key) != KEYLEN:
            raise ValueError(f"transport key must be {KEYLEN} bytes")
        if after_bytes < 1 or after_frames < 1:
            raise ValueError("rekey limits must be positive")
        self.key = key
        self.aead = AESGCM(key)
        self.seq = 0
        self._frames = 0
        self._bytes = 0
        self._after_bytes = after_bytes
        self._after_frames = after_frames
        self.rekeys = 0

    def nonce(self) -> bytes:
        if self.seq > MAX_SEQUENCE:
            raise WireError("no nonces left in this direction", WireCode.NONCE_EXHAUSTED)
        return aesgcm_nonce(self.seq)

    def advance(self, ciphertext_len: int) -> None:
        """Count one frame just sealed or opened; rekey when a limit is reached."""
        self.seq += 1
        self._frames += 1
        self._bytes += ciphertext_len
        if self._frames >= self._after_frames or self._bytes >= self._after_bytes:
            self.key = rekey(self.key)
            self.aead = AESGCM(self.key)
            self._frames = 0
            self._bytes = 0
            self.rekeys += 1


class FrameSealer:
    """Seals outgoing payloads into frames for one direction of one channel."""

    def __init__(self, key: bytes, *, rekey_after_bytes: int = REKEY_AFTER_BYTES,
                 rekey_after_frames: int = REKEY_AFTER_FRAMES) -> None:
        self._schedule = _KeySchedule(key, rekey_after_bytes, rekey_after_frames)

    @property
    def sequence(self) -> int:
        """Sequence number of the next frame."""
        return self._schedule.seq

    @property
    def rekeys(self) -> int:
        return self._schedule.rekeys

    def seal(self, type_code: int, payload: Buffer) -> tuple[bytes, bytes]:
        """(header, ciphertext) of one frame; write them in this order. Copies `payload`."""
        payload = _contiguous(payload)
        header = self._header(type_code, payload)
        schedule = self._schedule
        ciphertext = schedule.aead.encrypt(schedule.nonce(), payload, header)
        schedule.advance(len(ciphertext))
        return header, ciphertext

    def seal_into(self, type_code: int, payload: Buffer, out: bytearray) -> memoryview:
        """The whole frame (header and ciphertext) written at the start of `out`, which must
        hold frame_size(payload) bytes; returns the view of it. Saves allocating (and
        page-faulting) a fresh ciphertext buffer for every large frame."""
        payload = _contiguous(payload)
        header = self._header(type_code, payload)
        frame = memoryview(out)[:frame_size(memoryview(payload).nbytes)]
        frame[:HEADER_LEN] = header
        schedule = self._schedule
        nonce = schedule.nonce()
        if _HAVE_ENCRYPT_INTO:
            schedule.aead.encrypt_into(nonce, payload, header, frame[HEADER_LEN:])
        else:  # cryptography < 45
            frame[HEADER_LEN:] = schedule.aead.encrypt(nonce, payload, header)
        schedule.advance(len(frame) - HEADER_LEN)
        return frame

    def _header(self, type_code: int, payload: Buffer) -> bytes:
        size = memoryview(payload).nbytes
        if size > MAX_PAYLOAD:
            raise LocalError(f"payload of {size} bytes exceeds the frame limit {MAX_PAYLOAD}")
        if not 0 <= type_code <= 0xFF:
            raise LocalError(f"type code {type_code} does not fit a byte")
        return HEADER.pack(size + TAGLEN, type_code, self._schedule.seq)


def _contiguous(payload: Buffer) -> Buffer:
    """`payload`, or a bytes copy of it if it is a strided view (e.g. view[::-1])."""
    if isinstance(payload, memoryview) and not payload.contiguous:
        return payload.tobytes()
    return payload


def frame_size(payload_size: int) -> int:
    """Bytes on the wire of a frame carrying `payload_size` bytes."""
    return HEADER_LEN + payload_size + TAGLEN


@dataclass(frozen=True, slots=True)
class Frame:
    """An opened frame: its type code (not yet checked against MsgType) and payload (bytes,
    or for large payloads a read-only memoryview of a buffer the decoder reuses once every
    view of it is gone)."""

    type_code: int
    payload: bytes | memoryview


@dataclass(frozen=True, slots=True)
class SealedFrame:
    """A complete frame taken from the decoder, not yet authenticated or decrypted."""

    header: bytes
    type_code: int
    sequence: int
    ciphertext: Buffer
    buffer: bytearray | None = None
    """The reusable buffer `ciphertext` lives in, if any; recycled once the frame is opened."""

    def __post_init__(self) -> None:
        if len(self.header) != HEADER_LEN:
            raise ValueError("header has the wrong size")


class FrameDecoder:
    """Incoming frames of one direction: feed bytes, take frames; errors are WireError.

    Either `receive_data(bytes)`, or `get_buffer()` then `buffer_updated(n)` to receive in
    place. `next_frame()` returns the next authentic frame, None when more bytes are needed,
    or raises the error that ended the stream once the frames before it were taken.
    `take_sealed()` and `open()` split next_frame() so the decryption can run elsewhere
    (a worker thread); frames must be opened in the order they were taken.
    """

    def __init__(self, key: bytes, *, rekey_after_bytes: int = REKEY_AFTER_BYTES,
                 rekey_after_frames: int = REKEY_AFTER_FRAMES,
                 max_payload: int = MAX_PAYLOAD) -> None:
        if not 0 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be within 0..{MAX_PAYLOAD}")
        self._schedule = _KeySchedule(key, rekey_after_bytes, rekey_after_frames)
        self._max_ciphertext = max_payload + TAGLEN
        self._scratch = bytearray(SCRATCH_SIZE)
        self._lo = 0                      # first unparsed byte in _scratch
        self._hi = 0                      # end of received bytes in _scratch
        self._big: memoryview | None = None  # ciphertext of a large frame being received
        self._big_buffer: bytearray | None = None  # the pooled buffer _big is a view of
        self._big_fill = 0
        self._pool: list[bytearray] = []
        self._lent: deque[bytearray] = deque()  # plaintext buffers, maybe still viewed
        self._big_header = b""
        self._ready: deque[SealedFrame] = deque()
        self._ready_bytes = 0
        self._next_parse_seq = 0          # sequence number the next header must carry
        self._error: WireError | None = None  # raised once the frames before it are taken
        self._dead: WireError | None = None   # raised at once: a frame failed authentication

    # ---- feeding bytes ----

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go; never empty unless the stream already failed."""
        if self._big is not None:
            return self._big[self._big_fill:]
        if self._lo:
            # Keep the partial frame at the front; it is smaller than SCRATCH_SIZE.
            pending = self._hi - self._lo
            self._scratch[:pending] = self._scratch[self._lo:self._hi]
            self._lo, self._hi = 0, pending
        if self.failed:
            return memoryview(self._scratch)[:0]
        return memoryview(self._scratch)[self._hi:]

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were written at the start of the last get_buffer()."""
        if nbytes <= 0 or self.failed:
            return
        if self._big is not None:
            self._big_fill += nbytes
            if self._big_fill == len(self._big):
                self._push(self._big_header, self._big, self._big_buffer)
                self._big = self._big_buffer = None
                self._big_fill = 0
            return
        self._hi += nbytes
        self._parse_scratch()

    def receive_data(self, data: Buffer) -> None:
        """Feed received bytes (any amount); complete frames queue up for next_frame()."""
        view = memoryview(data).cast("B")
        while view and not self.failed:
            target = self.get_buffer()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            target.release()
            self.buffer_updated(n)
            view = view[n:]
        # Once the stream failed, what follows is ignored: the error is all that remains.

    # ---- state ----

    @property
    def buffered(self) -> int:
        """Bytes held: complete frames not yet taken plus the partial frame."""
        return self._ready_bytes + (self._hi - self._lo) + self._big_fill

    @property
    def at_frame_boundary(self) -> bool:
        """True if no partial frame is buffered (a clean place for the stream to end)."""
        return self._big is None and self._hi == self._lo

    @property
    def has_frames(self) -> bool:
        return bool(self._ready)

    @property
    def failed(self) -> bool:
        """True once the stream hit an error (it may still hold frames from before it)."""
        return self._error is not None or self._dead is not None

    @property
    def rekeys(self) -> int:
        return self._schedule.rekeys

    # ---- taking frames ----

    def take_sealed(self) -> SealedFrame | None:
        """The next complete frame, still sealed; None if more bytes are needed."""
        if self._dead is not None:
            raise self._dead
        if self._ready:
            frame = self._ready.popleft()
            self._ready_bytes -= HEADER_LEN + len(memoryview(frame.ciphertext))
            return frame
        if self._error is not None:
            raise self._error
        return None

    def open(self, frame: SealedFrame) -> Frame:
        """Authenticate and decrypt a frame from take_sealed().

        Touches only the key schedule (and, on failure, sets one attribute), so it may run in
        a worker thread while the event loop keeps feeding bytes.
        """
        schedule = self._schedule
        if frame.sequence != schedule.seq:
            raise LocalError("frames opened out of the order they were taken")
        size = len(memoryview(frame.ciphertext)) - TAGLEN
        payload: bytes | memoryview
        try:
            if size >= PLAINTEXT_POOL_MIN and _HAVE_DECRYPT_INTO:
                out = memoryview(self._plaintext_buffer(size))[:size]
                schedule.aead.decrypt_into(schedule.nonce(), frame.ciphertext, frame.header, out)
                payload = out.toreadonly()
                out.release()
            else:
                payload = schedule.aead.decrypt(schedule.nonce(), frame.ciphertext, frame.header)
            if frame.buffer is not None:
                self._recycle(frame.buffer)
        except InvalidTag:
            error = FrameError(f"frame {frame.sequence} failed authentication "
                               f"(tampered with or corrupted on the way)", WireCode.AUTH_FAILED)
            self._dead = error  # nothing after a forged frame is ever delivered
            raise error from None
        schedule.advance(len(memoryview(frame.ciphertext)))
        return Frame(frame.type_code, payload)

    def next_frame(self) -> Frame | None:
        """The next authentic frame; None if more bytes are needed."""
        sealed = self.take_sealed()
        return None if sealed is None else self.open(sealed)

    # ---- internals ----

    def _push(self, header: bytes, ciphertext: Buffer, buffer: bytearray | None = None) -> None:
        _, type_code, seq = HEADER.unpack(header)
        self._ready.append(SealedFrame(header, type_code, seq, ciphertext, buffer))
        self._ready_bytes += HEADER_LEN + len(memoryview(ciphertext))

    def _stop(self, error: WireError) -> None:
        """Stop parsing: frames completed before `error` stay deliverable, then it is raised."""
        self._error = error
        self._big = self._big_buffer = None
        self._big_fill = 0
        self._lo = self._hi = 0

    def _frame_buffer(self, length: int) -> bytearray:
        """A buffer of at least `length` bytes: a spare one if it fits, else a new one."""
        pool = self._pool
        for i in range(len(pool) - 1, -1, -1):  # most recently used first: still in cache
            if len(pool[i]) >= length:
                return pool.pop(i)
        grains = -(-length // FRAME_BUFFER_GRAIN)
        return bytearray(grains * FRAME_BUFFER_GRAIN)

    def _plaintext_buffer(self, size: int) -> bytearray:
        """A buffer for a payload of `size` bytes that no one is looking at any more."""
        lent = self._lent
        for _ in range(len(lent)):
            buffer = lent.popleft()
            lent.append(buffer)
            if len(buffer) >= size and not has_views(buffer):
                return buffer
        buffer = bytearray(-(-size // FRAME_BUFFER_GRAIN) * FRAME_BUFFER_GRAIN)
        lent.append(buffer)
        while sum(map(len, lent)) > PLAINTEXT_POOL_BYTES:
            lent.popleft()  # forget the oldest; whoever still views it keeps it alive
        return buffer

    def _recycle(self, buffer: bytearray) -> None:
        if sum(map(len, self._pool)) + len(buffer) <= FRAME_BUFFER_POOL_BYTES:
            self._pool.append(buffer)

    def _check_header(self, length: int, seq: int) -> WireError | None:
        if length > self._max_ciphertext:
            return FrameError(f"frame of {length} bytes exceeds the limit of "
                              f"{self._max_ciphertext}", WireCode.FRAME_TOO_LARGE)
        if length < TAGLEN:
            return FrameError(f"frame of {length} bytes is shorter than its tag",
                              WireCode.FRAME_TOO_SHORT)
        expected = self._next_parse_seq
        if seq < expected:
            return FrameError(f"replayed frame: sequence number {seq}, expected {expected}",
                              WireCode.REPLAYED)
        if seq > expected:
            return FrameError(f"frame out of order: sequence number {seq}, expected {expected} "
                              f"(a frame was dropped or reordered)", WireCode.OUT_OF_ORDER)
        return None

    def _parse_scratch(self) -> None:
        scratch = self._scratch
        while self._error is None and self._hi - self._lo >= HEADER_LEN:
            lo = self._lo
            length, _, seq = HEADER.unpack_from(scratch, lo)
            error = self._check_header(length, seq)
            if error is not None:
                self._stop(error)
                return
            total = HEADER_LEN + length
            available = self._hi - lo
            if available >= total:
                body = lo + HEADER_LEN
                self._push(bytes(scratch[lo:body]), bytes(scratch[body:lo + total]))
                self._next_parse_seq += 1
                self._lo = lo + total
            elif total <= SCRATCH_SIZE:
                break  # fits the scratch buffer once it is compacted: wait for the rest
            else:
                # Large frame: give it its own buffer so the rest arrives in place.
                self._big_header = bytes(scratch[lo:lo + HEADER_LEN])
                self._big_buffer = self._frame_buffer(length)
                self._big = memoryview(self._big_buffer)[:length]
                have = available - HEADER_LEN
                self._big[:have] = scratch[lo + HEADER_LEN:self._hi]
                self._big_fill = have
                self._next_parse_seq += 1
                self._lo = self._hi = 0
                break
        if self._lo == self._hi:
            self._lo = self._hi = 0


