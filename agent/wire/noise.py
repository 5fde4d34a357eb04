"""The Noise_XX_25519_AESGCM_SHA256 handshake, exactly as the Noise Protocol Framework specifies.

Written from the specification (revision 34, sections 5 and 7.5) rather than taken from the
`noiseprotocol` package: that package does work with current `cryptography`, but it keeps the
split keys and the remote static key in private attributes it deletes when the handshake ends,
and its transport (65535-byte messages, copies) is not the one ferry needs. The transport of
ferry lives in `agent.wire.frames`; this module only hands it the two keys from Split().
tests/test_wire_noise.py checks it against the published cacophony and snow test vectors and
against `noiseprotocol` itself.

No sockets here: `write_message` returns bytes, `read_message` takes bytes.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.errors import HandshakeError, LocalError

PROTOCOL_NAME = b"Noise_XX_25519_AESGCM_SHA256"
DHLEN = 32
"""Bytes of an X25519 public key and of a DH output."""
HASHLEN = 32
"""Bytes of a SHA-256 digest."""
KEYLEN = 32
"""Bytes of an AES-256 key."""
TAGLEN = 16
"""Bytes of an AES-GCM authentication tag."""
MAX_NONCE = 2**64 - 1
"""Reserved nonce: never used to encrypt a message, only by REKEY."""
MAX_MESSAGE_LEN = 65535
"""Largest Noise message the specification allows."""

# The XX pattern (spec section 7.5): -> e; <- e, ee, s, es; -> s, se.
XX_MESSAGE_PATTERNS: tuple[tuple[str, ...], ...] = (
    ("e",),
    ("e", "ee", "s", "es"),
    ("s", "se"),
)


def aesgcm_nonce(n: int) -> bytes:
    """The 96-bit AESGCM nonce of Noise: 32 zero bits, then n as a 64-bit big-endian integer."""
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "big")


def hmac_hash(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256."""
    return hmac.digest(key, data, "sha256")


def hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """Noise's HKDF (spec section 4.3): two or three HASHLEN outputs."""
    temp_key = hmac_hash(chaining_key, input_key_material)
    output1 = hmac_hash(temp_key, b"\x01")
    output2 = hmac_hash(temp_key, output1 + b"\x02")
    if num_outputs == 2:
        return output1, output2
    return output1, output2, hmac_hash(temp_key, output2 + b"\x03")


def rekey(key: bytes) -> bytes:
    """Noise's default REKEY(k): the first 32 bytes of ENCRYPT(k, maxnonce, empty, 32 zeros)."""
    return AESGCM(key).encrypt(aesgcm_nonce(MAX_NONCE), bytes(KEYLEN), b"")[:KEYLEN]


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public half of an X25519 key."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519 of our private key and the peer's public key; a low-order point is a handshake
    error."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        # cryptography refuses an all-zero shared secret (the peer sent a low-order point).
        raise HandshakeError(f"invalid X25519 public key from peer: {exc}") from exc


class CipherState:
    """A key and a nonce counter (spec section 5.1); only used during the handshake here."""

    __slots__ = ("_aead", "k", "n")

    def __init__(self) -> None:
        self.k: bytes | None = None
        self.n = 0
        self._aead: AESGCM | None = None

    def initialize_key(self, key: bytes | None) -> None:
        self.k = key
        self.n = 0
        self._aead = AESGCM(key) if key is not None else None

    def has_key(self) -> bool:
        return self.k is not None

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise LocalError("Noise nonce exhausted")
        ciphertext = self._aead.encrypt(aesgcm_nonce(self.n), plaintext, ad)
        self.n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            raise LocalError("Noise nonce exhausted")
        try:
            plaintext = self._aead.decrypt(aesgcm_nonce(self.n), ciphertext, ad)
        except InvalidTag as exc:
            raise HandshakeError("handshake message failed authentication (wrong prologue, "
                                 "tampered message, or not the expected peer)") from exc
        self.n += 1
        return plaintext


class SymmetricState:
    """The chaining key and handshake hash (spec section 5.2)."""

    __slots__ = ("cipher", "ck", "h")

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = hashlib.sha256(protocol_name).digest()
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, input_key_material, 2)
        self.cipher.initialize_key(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        temp_k1, temp_k2 = hkdf(self.ck, b"", 2)
        return temp_k1[:KEYLEN], temp_k2[:KEYLEN]


class HandshakeState:
    """One side of an XX handshake (spec section 5.3): three messages, then `split()`."""

    def __init__(self, *, initiator: bool, static_key: X25519PrivateKey, prologue: bytes,
                 ephemeral_key: X25519PrivateKey | None = None) -> None:
        """`ephemeral_key` is for test vectors only; normally a fresh key is generated."""
        self.initiator = initiator
        self._s = static_key
        self._e = ephemeral_key
        self._re: bytes | None = None
        self.remote_static: bytes | None = None
        self._symmetric = SymmetricState(PROTOCOL_NAME)
        self._symmetric.mix_hash(prologue)
        self._index = 0  # next message pattern in XX_MESSAGE_PATTERNS

    @property
    def finished(self) -> bool:
        return self._index == len(XX_MESSAGE_PATTERNS)

    @property
    def message_index(self) -> int:
        """Index in XX_MESSAGE_PATTERNS of the next message to write or read."""
        return self._index

    @property
    def handshake_hash(self) -> bytes:
        """h: unique to this handshake; equal on both sides once it is finished."""
        return self._symmetric.h

    def is_my_turn_to_write(self) -> bool:
        return not self.finished and (self._index % 2 == 0) == self.initiator

    def write_message(self, payload: bytes = b"") -> bytes:
        """The next handshake message of this side, carrying `payload`."""
        if not self.is_my_turn_to_write():
            raise LocalError("Noise write_message called out of turn")
        sym = self._symmetric
        out = bytearray()
        for token in XX_MESSAGE_PATTERNS[self._index]:
            if token == "e":
                if self._e is None:
                    self._e = X25519PrivateKey.generate()
                e_pub = public_bytes(self._e)
                out += e_pub
                sym.mix_hash(e_pub)
            elif token == "s":
                out += sym.encrypt_and_hash(public_bytes(self._s))
            else:
                self._mix_dh(token)
        out += sym.encrypt_and_hash(bytes(payload))
        self._index += 1
        if len(out) > MAX_MESSAGE_LEN:
            raise LocalError("Noise handshake message too long")
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message; returns its payload."""
        if self.finished or self.is_my_turn_to_write():
            raise LocalError("Noise read_message called out of turn")
        if len(message) > MAX_MESSAGE_LEN:
            raise HandshakeError(f"handshake message of {len(message)} bytes exceeds "
                                 f"{MAX_MESSAGE_LEN}")
        sym = self._symmetric
        message = bytes(message)
        pos = 0
        for token in XX_MESSAGE_PATTERNS[self._index]:
            if token == "e":
                self._re = self._take(message, pos, DHLEN)
                pos += DHLEN
                sym.mix_hash(self._re)
            elif token == "s":
                size = DHLEN + TAGLEN if sym.cipher.has_key() else DHLEN
                self.remote_static = sym.decrypt_and_hash(self._take(message, pos, size))
                pos += size
            else:
                self._mix_dh(token)
        if sym.cipher.has_key() and len(message) - pos < TAGLEN:
            raise HandshakeError("handshake message too short for its payload tag")
        payload = sym.decrypt_and_hash(message[pos:])
        self._index += 1
        return payload

    def split(self) -> tuple[bytes, bytes]:
        """(send key, receive key) of this side for the transport phase."""
        if not self.finished:
            raise LocalError("Noise split() before the handshake finished")
        initiator_to_responder, responder_to_initiator = self._symmetric.split()
        if self.initiator:
            return initiator_to_responder, responder_to_initiator
        return responder_to_initiator, initiator_to_responder

    def _mix_dh(self, token: str) -> None:
        # Token names say which keys meet: first letter the initiator's, second the responder's.
        assert self._e is not None
        if token == "ee":
            assert self._re is not None
            self._symmetric.mix_key(dh(self._e, self._re))
            return
        ours_first = self.initiator
        initiator_key, responder_key = token[0], token[1]
        mine = initiator_key if ours_first else responder_key
        theirs = responder_key if ours_first else initiator_key
        private = self._e if mine == "e" else self._s
        public = self._re if theirs == "e" else self.remote_static
        assert public is not None
        self._symmetric.mix_key(dh(private, public))

    @staticmethod
    def _take(message: bytes, pos: int, size: int) -> bytes:
        if len(message) < pos + size:
            raise HandshakeError(f"handshake message too short: {len(message)} bytes")
        return message[pos:pos + size]
