"""The one error tree of ferry: every failure is a FerryError saying whose fault it was."""

from enum import IntEnum
from typing import ClassVar


class FerryError(Exception):
    """Root of every error ferry raises on purpose.

    `failure_reason` is the failed job's reason in the report (`error_reason`) and the
    metrics' `reason` label: one of a small closed set, one per family of the tree, so
    a label never carries an error's text."""

    failure_reason: ClassVar[str] = "other"


class UserError(FerryError):
    """The caller asked for something impossible or malformed (bad path, bad option)."""

    failure_reason = "user"


class LocalError(FerryError):
    """Something on this host failed (file system, resources, our own bug)."""

    failure_reason = "local"


class PeerError(FerryError):
    """The remote agent misbehaved, refused, or vanished."""

    failure_reason = "peer"


class ProtocolError(PeerError):
    """Bytes from the peer broke the wire protocol; the connection must end."""

    failure_reason = "protocol"


class TrustError(PeerError):
    """The peer's identity is not in the trusted list (or ours is not in theirs)."""

    failure_reason = "trust"


class QemuError(FerryError):
    """QEMU refused a command, died, or could not be reached over QMP."""

    failure_reason = "qemu"


class VmNotMigratableError(UserError):
    """The VM is not set up so that ferry can migrate it (e.g. RAM not a shared file)."""

    failure_reason = "not_migratable"


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


def failure_reason(exc: BaseException) -> str:
    """The closed-set reason a job failed with `exc` (anything not ferry's: "other")."""
    return exc.failure_reason if isinstance(exc, FerryError) else "other"


# Every reason a failed job can have: the error families' own, a job the agent stopped
# (shutdown), an incoming job its source rolled back (aborted), and "other".
FAILURE_REASONS = ("user", "not_migratable", "timeout", "local", "peer", "protocol", "trust",
                   "destination", "qemu", "shutdown", "aborted", "other")


# --- The secure channel (agent/wire, agent/net): every way a link to a peer can fail. ---

class WireCode(IntEnum):
    """Why a channel ended; sent to the peer in an ERROR message when the link still allows."""

    NOT_FERRY = 1
    """The first bytes were not a ferry preamble (garbage before the handshake)."""
    VERSION_MISMATCH = 2
    """The two agents speak different wire protocol versions."""
    HANDSHAKE_FAILED = 3
    """A Noise handshake message was malformed or failed authentication."""
    UNTRUSTED_PEER = 4
    """The peer's static key is not in the trusted peers list."""
    FRAME_TOO_LARGE = 5
    """A frame's length prefix exceeds the frame size limit."""
    FRAME_TOO_SHORT = 6
    """A frame is too short to hold its authentication tag."""
    AUTH_FAILED = 7
    """A frame failed AES-GCM authentication (tampered with, or sealed under another key)."""
    REPLAYED = 8
    """A frame's sequence number was already used: a replayed frame."""
    OUT_OF_ORDER = 9
    """A frame's sequence number skips ahead: a frame was dropped or reordered."""
    UNKNOWN_TYPE = 10
    """A frame carries a message type code this agent does not know."""
    MALFORMED_MESSAGE = 11
    """A message's payload does not fit its type (e.g. a control payload that is not JSON)."""
    UNEXPECTED_MESSAGE = 12
    """A valid message arrived in a state that does not allow it."""
    TRAILING_DATA = 13
    """Bytes arrived after the peer said GOODBYE."""
    TRUNCATED = 14
    """The stream ended inside a frame, or without GOODBYE."""
    NONCE_EXHAUSTED = 15
    """A direction used up its 2**64 - 1 nonces (never happens in practice)."""


class WireError(ProtocolError):
    """The peer's bytes broke the secure channel protocol; `code` says how."""

    code: WireCode = WireCode.MALFORMED_MESSAGE

    def __init__(self, message: str, code: WireCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFerryPeerError(WireError):
    """The other end does not speak ferry's wire protocol at all."""

    code = WireCode.NOT_FERRY


class VersionMismatchError(WireError):
    """Both ends speak ferry, but different versions of the wire protocol."""

    code = WireCode.VERSION_MISMATCH

    def __init__(self, local_version: int, peer_version: int) -> None:
        super().__init__(f"peer speaks ferry wire protocol version {peer_version}, this agent "
                         f"speaks version {local_version}: run the same ferry release on both "
                         f"hosts")
        self.local_version = local_version
        self.peer_version = peer_version


class HandshakeError(WireError):
    """A Noise handshake message was malformed or did not authenticate."""

    code = WireCode.HANDSHAKE_FAILED


class FrameError(WireError):
    """A transport frame was oversized, tampered with, replayed or out of order."""


class MessageError(WireError):
    """An authentic frame carried a message of unknown type, bad payload or at the wrong time."""


class StreamEndError(WireError):
    """The byte stream ended where it must not (inside a frame, without GOODBYE) or went on
    after GOODBYE."""


class PeerReportedError(PeerError):
    """The peer told us it hit an error and closed the channel; carries the peer's code and text."""

    def __init__(self, code: int, message: str) -> None:
        try:
            name = WireCode(code).name
        except ValueError:
            name = f"code {code}"
        super().__init__(f"peer closed the channel: {message} ({name})")
        self.code = code
        self.peer_message = message


class UntrustedPeerError(TrustError):
    """This agent refused the peer: its static key is not in our trusted peers."""

    code = WireCode.UNTRUSTED_PEER

    def __init__(self, public_key_b64: str, fingerprint: str, detail: str = "") -> None:
        super().__init__(
            f"refused peer with untrusted key {fingerprint}{detail}; if this is the host you "
            f"expect, trust it with: ferry trust NAME {public_key_b64} --address HOST:PORT")
        self.public_key_b64 = public_key_b64
        self.fingerprint = fingerprint


class RefusedByPeerError(TrustError):
    """The peer refused us: our static key is not in its trusted peers."""

    def __init__(self, our_key_b64: str, our_fingerprint: str) -> None:
        super().__init__(
            f"the peer does not trust this host's key {our_fingerprint}; on the peer run: "
            f"ferry trust NAME {our_key_b64} --address HOST:PORT  (NAME and address of this host)")
        self.our_key_b64 = our_key_b64
        self.our_fingerprint = our_fingerprint


class ChannelClosedError(PeerError):
    """The channel is closed: the peer said GOODBYE, or this side closed it."""


class PeerTimeoutError(PeerError):
    """The peer did not answer (connect, handshake, send or receive) within the timeout."""


# --- NBD (agent/storage): disks read and written through an NBD export that QEMU serves. ---

class NbdError(QemuError):
    """An NBD export (qemu-nbd, qemu-storage-daemon or a VM's NBD server) failed or misbehaved."""


class NbdConnectError(NbdError):
    """No NBD session could be opened: no socket, nobody listening, or no handshake in time."""


class NbdProtocolError(NbdError):
    """The NBD server's bytes broke the NBD protocol (malformed, out of range, unknown cookie);
    the connection ends and every request on it fails with this error."""


class NotNbdServerError(NbdProtocolError):
    """The other end of the socket does not speak fixed-newstyle NBD at all."""


class NbdOptionError(NbdError):
    """The server refused an option of the handshake: no such export, no such metadata
    context, or a feature it does not support; carries the option and the reply code."""

    def __init__(self, option: str, reply: str, code: int, message: str) -> None:
        super().__init__(f"NBD server refused {option}: {message} ({reply})")
        self.option = option
        self.reply = reply
        self.code = code
        self.server_message = message


class NbdCommandError(NbdError):
    """The server answered one request with an NBD error (EIO, ENOSPC, EPERM, ...); the
    connection stays usable. `code` is the NBD error value, `error_offset` where it happened
    if the server said."""

    def __init__(self, command: str, offset: int, length: int, code: int, code_name: str,
                 message: str = "", error_offset: int | None = None) -> None:
        where = f" at offset {error_offset}" if error_offset is not None else ""
        text = f": {message}" if message else ""
        super().__init__(f"NBD {command} of {length} bytes at {offset} failed{where}: "
                         f"{code_name}{text}")
        self.command = command
        self.offset = offset
        self.length = length
        self.code = code
        self.code_name = code_name
        self.server_message = message
        self.error_offset = error_offset


class NbdTimeoutError(NbdError):
    """The NBD server did not answer a request in time; the connection is ended, because a
    late reply could no longer be told apart from a hostile one."""


class NbdDisconnectedError(NbdError):
    """The NBD connection ended (the server quit or died, or this side disconnected) while a
    request still needed it."""


class NbdRequestError(UserError):
    """The caller asked the NBD client for something the export cannot take: a range past its
    end or off its block size, a write to a read-only export, a feature it does not offer."""
