"""The one error tree of ferry: every failure is a FerryError saying whose fault it was."""


class FerryError(Exception):
    """Root of every error ferry raises on purpose."""


class UserError(FerryError):
    """The caller asked for something impossible or malformed (bad path, bad option)."""


class LocalError(FerryError):
    """Something on this host failed (file system, resources, our own bug)."""


class PeerError(FerryError):
    """The remote agent misbehaved, refused, or vanished."""


class ProtocolError(PeerError):
    """Bytes from the peer broke the wire protocol; the connection must end."""


class TrustError(PeerError):
    """The peer's identity is not in the trusted list (or ours is not in theirs)."""


class QemuError(FerryError):
    """QEMU refused a command, died, or could not be reached over QMP."""


class VmNotMigratableError(UserError):
    """The VM is not set up so that ferry can migrate it (e.g. RAM not a shared file)."""


class BatchError(ProtocolError):
    """A page batch from the peer is malformed; nothing of it was applied."""
