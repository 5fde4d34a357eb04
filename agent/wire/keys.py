"""Text forms of X25519 public keys: base64 for files and commands, SHA-256 fingerprints for
people."""

from __future__ import annotations

import base64
import binascii
import hashlib

from agent.errors import UserError

KEY_LEN = 32
"""Bytes of an X25519 public key."""
FINGERPRINT_PREFIX = "SHA256:"


def encode_key(public_key: bytes) -> str:
    """The standard base64 form (44 characters) used in peers.toml and by `ferry id`."""
    if len(public_key) != KEY_LEN:
        raise ValueError(f"an X25519 public key has {KEY_LEN} bytes, not {len(public_key)}")
    return base64.b64encode(public_key).decode("ascii")


def decode_key(text: str) -> bytes:
    """The 32 key bytes from base64 text; anything else is the user's error."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UserError(f"not a base64 public key: {text!r}") from exc
    if len(raw) != KEY_LEN:
        raise UserError(f"a public key is {KEY_LEN} bytes in base64 (44 characters), "
                        f"got {len(raw)} bytes: {text!r}")
    return raw


def fingerprint(public_key: bytes) -> str:
    """Short, unambiguous name of a key for logs and errors, like OpenSSH's: SHA256:<base64>."""
    digest = hashlib.sha256(public_key).digest()
    return FINGERPRINT_PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")
