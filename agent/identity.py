"""This host's identity (a static X25519 key) and its trusted peers, kept in the agent's home.

The home directory holds:

    identity.key   the private key, PKCS#8 PEM, mode 0600, created on first use
    peers.toml     the trusted peers: [[peer]] tables with name, public_key, address

Both files are replaced atomically (write a temporary file, fsync, rename), so a crash never
leaves half a file. peers.toml is written by hand-rolled code (tomllib only reads) from values
that are validated first, so what is written always reads back the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from agent.errors import LocalError, UserError
from agent.wire.keys import KEY_LEN, decode_key, encode_key, fingerprint
from agent.wire.noise import public_bytes

IDENTITY_FILE = "identity.key"
PEERS_FILE = "peers.toml"
LOCK_FILE = ".peers.lock"
HOME_MODE = 0o700
KEY_FILE_MODE = 0o600
PEERS_FILE_MODE = 0o644
PRIVATE_MODE_BITS = 0o077
"""Permission bits that must be clear on the identity key (no group or other access)."""
PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
"""A peer name: a host name or label, 1 to 63 characters, nothing that needs quoting."""
HOST = re.compile(r"[A-Za-z0-9._-]{1,253}")


# ---- the home directory ----


def ensure_home(home: Path) -> Path:
    """Create the home directory (mode 0700) if it does not exist."""
    try:
        home.mkdir(mode=HOME_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalError(f"cannot create ferry home {home}: {exc.strerror}") from exc
    if not home.is_dir():
        raise LocalError(f"ferry home {home} is not a directory")
    return home


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, data: bytes, mode: int) -> Path:
    """A fsynced temporary file in `directory` holding `data`, created with `mode`."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never half."""
    try:
        temp = _write_temp(path.parent, data, mode)
        os.replace(temp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise LocalError(f"cannot write {path}: {exc.strerror}") from exc


# ---- this host's identity ----


@dataclass(frozen=True, slots=True)
class Identity:
    """This host's static key pair."""

    private_key: X25519PrivateKey = field(repr=False, compare=False)
    public_key: bytes

    def __post_init__(self) -> None:
        if public_bytes(self.private_key) != self.public_key:
            raise ValueError("public_key does not belong to private_key")

    @classmethod
    def from_private_key(cls, private_key: X25519PrivateKey) -> Identity:
        return cls(private_key, public_bytes(private_key))

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity (not saved anywhere)."""
        return cls.from_private_key(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        """The identity of 32 raw private key bytes."""
        return cls.from_private_key(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """The 32 raw private key bytes (to hand to a child process; never log them)."""
        return self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def public_key_b64(self) -> str:
        return encode_key(self.public_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


def _identity_pem(identity: Identity) -> bytes:
    return identity.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def load_identity(home: Path, *, create: bool = True) -> tuple[Identity, bool]:
    """This host's identity from `home`, creating it on first use; (identity, created)."""
    path = home / IDENTITY_FILE
    if not path.exists():
        if not create:
            raise LocalError(f"no identity key at {path}")
        ensure_home(home)
        identity = Identity.generate()
        try:
            temp = _write_temp(home, _identity_pem(identity), KEY_FILE_MODE)
            try:
                os.link(temp, path)  # fails if another process created it meanwhile
                _fsync_dir(home)
                return identity, True
            except FileExistsError:
                pass  # someone else won the race: use theirs
            finally:
                os.unlink(temp)
        except OSError as exc:
            raise LocalError(f"cannot create identity key {path}: {exc.strerror}") from exc
    return _read_identity(path), False


def _read_identity(path: Path) -> Identity:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as exc:
        raise LocalError(f"cannot read identity key {path}: {exc.strerror}") from exc
    if mode & PRIVATE_MODE_BITS:
        raise LocalError(f"identity key {path} is accessible by others (mode "
                         f"{mode & 0o777:04o}); run: chmod 600 {path}")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise LocalError(f"identity key {path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, X25519PrivateKey):
        raise LocalError(f"identity key {path} is not an X25519 key")
    return Identity.from_private_key(key)


# ---- trusted peers ----


def parse_address(text: str, *, any_port: bool = False) -> tuple[str, int]:
    """(host, port) of "HOST:PORT" or "[IPv6]:PORT"; anything else is the user's error.
    With `any_port`, port 0 (any free port, for a server) is allowed."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text)
    if not match:
        raise UserError(f"address must be HOST:PORT (or [IPv6]:PORT), got {text!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if match.group(3) is not None and not HOST.fullmatch(host):
        raise UserError(f"not a host name or address: {host!r}")
    least = 0 if any_port else 1
    if not least <= port <= 65535:
        raise UserError(f"port must be within {least}..65535, got {port}")
    return host, port


@dataclass(frozen=True, slots=True)
class Peer:
    """A host whose agent may talk to ours: its name, static public key and agent address."""

    name: str
    public_key: bytes
    address: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not PEER_NAME.fullmatch(self.name):
            raise UserError(f"peer name must be 1-63 letters, digits, '.', '_' or '-' "
                            f"(starting with a letter or digit), got {self.name!r}")
        if not isinstance(self.public_key, bytes) or len(self.public_key) != KEY_LEN:
            raise UserError(f"peer {self.name}: public key must be {KEY_LEN} bytes")
        if self.address is not None:
            parse_address(self.address)

    @property
    def host_port(self) -> tuple[str, int]:
        """(host, port) of the peer's agent."""
        if self.address is None:
            raise UserError(f"peer {self.name} has no address; set one with "
                            f"ferry trust {self.name} KEY --address HOST:PORT")
        return parse_address(self.address)

    @property
    def public_key_b64(self) -> str:
        return encode_key(self.public_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


class TrustStore(Protocol):
    """What the channel asks about trust: which trusted peer, if any, owns a key."""

    def by_key(self, public_key: bytes) -> Peer | None: ...


def _toml_string(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


PEERS_HEADER = """\
# ferry trusted peers: the hosts whose agents may talk to this one.
# Written by `ferry trust`; each [[peer]] has a name, a public key (`ferry id` on
# that host prints it) and the address HOST:PORT of its agent.
"""


@dataclass(frozen=True, slots=True)
class TrustedPeers:
    """The trusted peers list: names and keys are unique."""

    peers: tuple[Peer, ...] = ()

    def __post_init__(self) -> None:
        names: set[str] = set()
        keys: dict[bytes, str] = {}
        for peer in self.peers:
            if peer.name in names:
                raise UserError(f"peer {peer.name} is listed twice")
            if peer.public_key in keys:
                raise UserError(f"peers {keys[peer.public_key]} and {peer.name} have the "
                                f"same public key")
            names.add(peer.name)
            keys[peer.public_key] = peer.name

    def __iter__(self) -> Iterator[Peer]:
        return iter(self.peers)

    def __len__(self) -> int:
        return len(self.peers)

    def by_key(self, public_key: bytes) -> Peer | None:
        """The trusted peer owning `public_key`, or None."""
        for peer in self.peers:
            if peer.public_key == public_key:
                return peer
        return None

    def by_name(self, name: str) -> Peer | None:
        for peer in self.peers:
            if peer.name == name:
                return peer
        return None

    def with_peer(self, peer: Peer) -> TrustedPeers:
        """This list with `peer` added, or replacing the peer of the same name."""
        owner = self.by_key(peer.public_key)
        if owner is not None and owner.name != peer.name:
            raise UserError(f"that key is already trusted as peer {owner.name}")
        kept = tuple(p for p in self.peers if p.name != peer.name)
        if len(kept) == len(self.peers):
            return TrustedPeers(self.peers + (peer,))
        return TrustedPeers(tuple(peer if p.name == peer.name else p for p in self.peers))

    def without(self, name: str) -> TrustedPeers:
        """This list without the peer called `name` (the same list if there is none)."""
        return TrustedPeers(tuple(p for p in self.peers if p.name != name))

    def to_toml(self) -> str:
        parts = [PEERS_HEADER]
        for peer in self.peers:
            parts.append("\n[[peer]]\n")
            parts.append(f"name = {_toml_string(peer.name)}\n")
            parts.append(f"public_key = {_toml_string(peer.public_key_b64)}\n")
            if peer.address is not None:
                parts.append(f"address = {_toml_string(peer.address)}\n")
        return "".join(parts)

    @classmethod
    def from_toml(cls, text: str, source: str = "peers.toml") -> TrustedPeers:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{source}: not valid TOML: {exc}") from exc
        unknown = set(doc) - {"peer"}
        if unknown:
            raise UserError(f"{source}: unknown keys {sorted(unknown)} (expected [[peer]] tables)")
        entries = doc.get("peer", [])
        if not isinstance(entries, list):
            raise UserError(f"{source}: 'peer' must be an array of tables ([[peer]])")
        peers = []
        for number, entry in enumerate(entries, 1):
            where = f"{source}: peer #{number}"
            if not isinstance(entry, dict):
                raise UserError(f"{where} is not a table")
            extra = set(entry) - {"name", "public_key", "address"}
            if extra:
                raise UserError(f"{where}: unknown keys {sorted(extra)}")
            name, key, address = entry.get("name"), entry.get("public_key"), entry.get("address")
            if not isinstance(name, str) or not isinstance(key, str):
                raise UserError(f"{where}: needs string 'name' and 'public_key'")
            if address is not None and not isinstance(address, str):
                raise UserError(f"{where}: 'address' must be a string")
            try:
                peers.append(Peer(name, decode_key(key), address))
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from exc
        try:
            return cls(tuple(peers))
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from exc


def load_peers(home: Path) -> TrustedPeers:
    """The trusted peers in `home` (none if the file does not exist yet)."""
    path = home / PEERS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return TrustedPeers()
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalError(f"cannot read {path}: {exc}") from exc
    return TrustedPeers.from_toml(text, str(path))


def save_peers(home: Path, peers: TrustedPeers) -> None:
    """Write the trusted peers to `home` atomically."""
    ensure_home(home)
    atomic_write(home / PEERS_FILE, peers.to_toml().encode("utf-8"), PEERS_FILE_MODE)


@contextlib.contextmanager
def _peers_lock(home: Path) -> Iterator[None]:
    ensure_home(home)
    try:
        fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise LocalError(f"cannot lock {home / LOCK_FILE}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def trust_peer(home: Path, name: str, public_key: bytes,
               address: str | None = None) -> tuple[Peer, bool]:
    """Add peer `name` or update it (an address not given is kept); (peer, added)."""
    with _peers_lock(home):
        peers = load_peers(home)
        old = peers.by_name(name)
        if address is None and old is not None:
            address = old.address
        peer = Peer(name, public_key, address)
        save_peers(home, peers.with_peer(peer))
    return peer, old is None


def untrust_peer(home: Path, name: str) -> bool:
    """Remove peer `name`; False if there was none."""
    with _peers_lock(home):
        peers = load_peers(home)
        if peers.by_name(name) is None:
            return False
        save_peers(home, peers.without(name))
    return True
