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


class QmpConnectError(QemuError):
    """No QMP session could be opened (no socket, nobody listening, no greeting in time)."""


class QmpCommandError(QemuError):
    """QEMU answered a QMP command with an error; carries QEMU's error class and text."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpTimeoutError(QemuError):
    """QEMU did not answer a command, or an awaited event did not come, in time."""


class QmpDisconnectedError(QemuError):
    """The QMP connection ended (QEMU quit or died) while we still needed it."""


class QemuStartError(QemuError):
    """A QEMU we launched exited or never opened its QMP socket."""


class GuestBuildError(LocalError):
    """The test guest could not be assembled or linked (binutils missing or failing)."""
