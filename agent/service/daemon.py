"""The agent process: serves peers over the secure channel and the CLI over the control
socket, runs migration jobs, and shuts down cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import identity as identity_mod
from agent.errors import FerryError, PeerError, TrustError, UserError
from agent.hostnet import attach
from agent.migration.convergence import CompressSetting, TimeoutAction
from agent.migration.destination import DestinationJob
from agent.migration.link import Link
from agent.migration.source import MigrationOptions, SourceJob
from agent.net import channel as channel_mod
from agent.service import systemd
from agent.service.control import ControlServer, Reply
from agent.state import journal, vms
from agent.state.config import AgentConfig
from agent.wire.messages import MsgType

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30.0


class ChannelLink:
    """A secure channel seen as a migration Link (message kinds are channel types)."""

    def __init__(self, channel: channel_mod.Channel) -> None:
        self.channel = channel

    async def send(self, kind: int, payload: bytes | memoryview) -> None:
        try:
            await self.channel.send(MsgType(kind), payload)
        except OSError as exc:  # the socket's own errors, e.g. a reset link
            raise PeerError(f"link to {self.channel.peer_name} lost: {exc}") from exc

    async def receive(self) -> tuple[int, bytes | memoryview]:
        try:
            msg_type, payload = await self.channel.receive()
        except OSError as exc:
            raise PeerError(f"link to {self.channel.peer_name} lost: {exc}") from exc
        return int(msg_type), payload

    async def close(self) -> None:
        await self.channel.close()


class LiveTrust:
    """The trusted-peers file, re-read when it changes so `ferry trust` needs no restart."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._stamp: tuple[int, int] | None = None
        self._peers = identity_mod.load_peers(home)

    def current(self) -> identity_mod.TrustedPeers:
        path = self.home / identity_mod.PEERS_FILE
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self._stamp:
            self._peers = identity_mod.load_peers(self.home)
            self._stamp = stamp
        return self._peers

    def by_key(self, public_key: bytes) -> identity_mod.Peer | None:
        return self.current().by_key(public_key)


@dataclass
class Agent:
    """One running agent: its servers and the jobs in flight."""

    config: AgentConfig
    identity: identity_mod.Identity
    trust: LiveTrust
    jobs: dict[str, SourceJob] = field(default_factory=dict)
    incoming: set[asyncio.Task[None]] = field(default_factory=set)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    peer_server: channel_mod.ChannelServer | None = None
    control: ControlServer | None = None

    async def start(self) -> None:
        """Bind both servers; after this the agent is ready."""
        host, port = self.config.listen
        self.peer_server = await channel_mod.serve(host, port, self.identity, self.trust,
                                                   self._serve_peer)
        self.control = ControlServer(self.config.control_socket, {
            "ping": self._ping, "vm-list": self._vm_list, "migrate": self._migrate,
            "jobs": self._jobs,
        }, group=self.config.control_group)
        await self.control.start()

    @property
    def port(self) -> int:
        assert self.peer_server is not None
        return self.peer_server.port

    async def close(self) -> None:
        """Stop taking work, let running jobs finish (or roll back), then release."""
        if self.control is not None:
            await self.control.close()
        if self.peer_server is not None:
            # Not close(): that would cancel incoming jobs the grace period below lets end.
            self.peer_server.stop_listening()
        for job in self.jobs.values():
            job.cancel.set()  # source jobs roll back unless already committing
        deadline = asyncio.get_running_loop().time() + SHUTDOWN_GRACE_S
        while self.jobs and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        pending = [t for t in self.incoming if not t.done()]
        if pending:
            log.info("waiting up to %g s for %d incoming job(s)", SHUTDOWN_GRACE_S, len(pending))
            _, still = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE_S)
            for task in still:
                task.cancel()  # rolls back an incoming VM that was not committed
            if still:
                await asyncio.wait(still)
        if self.peer_server is not None:
            await self.peer_server.close()

    # ------------------------------------------------------------------ peers

    async def _serve_peer(self, channel: channel_mod.Channel) -> None:
        peer = channel.peer_name
        job = DestinationJob(config=self.config, link=ChannelLink(channel), peer=peer,
                             job_id=os.urandom(6).hex())
        task = asyncio.current_task()
        assert task is not None
        self.incoming.add(task)
        try:
            await job.run()
        finally:
            self.incoming.discard(task)

    def trusted_peer(self, name: str) -> identity_mod.Peer:
        """The trusted peer `name`, or a TrustError saying how to add it."""
        peer = self.trust.current().by_name(name)
        if peer is None:
            known = ", ".join(p.name for p in self.trust.current()) or "none"
            raise TrustError(f"no trusted peer named {name!r} (known: {known}); add it with "
                             f"`ferry trust --home {self.config.home} {name} PUBKEY "
                             f"--address HOST:PORT`")
        return peer

    async def connect_peer(self, name: str) -> Link:
        """An open channel to the trusted peer `name`."""
        peer = self.trusted_peer(name)
        host, port = peer.host_port
        channel = await channel_mod.connect(host, port, self.identity, self.trust.current(),
                                            expected_key=peer.public_key)
        return ChannelLink(channel)

    # ------------------------------------------------------------------ control ops

    async def _ping(self, request: dict[str, Any], send: Any, cancel: asyncio.Event) -> Reply:
        return {"ok": True, "port": self.port, "pid": os.getpid(),
                "public_key": self.identity.public_key_b64}

    async def _vm_list(self, request: dict[str, Any], send: Any,
                       cancel: asyncio.Event) -> Reply:
        return {"ok": True, "vms": [{"name": r.name, "pid": r.pid, "alive": r.alive(),
                                     "qmp": r.qmp_path} for r in vms.list_vms(self.config)]}

    async def _jobs(self, request: dict[str, Any], send: Any, cancel: asyncio.Event) -> Reply:
        return {"ok": True, "jobs": [{"job": j.job_id, "phase": j.phases.phase.value,
                                      "peer": j.peer} for j in self.jobs.values()]}

    async def _migrate(self, request: dict[str, Any], send: Any,
                       cancel: asyncio.Event) -> Reply:
        if self.stopping.is_set():
            raise UserError("the agent is shutting down")
        options = migration_options(request)
        name = request.get("vm")
        if name:
            qmp_path = Path(vms.load(self.config, str(name)).qmp_path)
        elif request.get("qmp"):
            qmp_path = Path(str(request["qmp"]))
            if not qmp_path.exists():
                raise UserError(f"no QMP socket at {qmp_path}")
        else:
            raise UserError("name a VM or give --qmp PATH")
        peer = str(request.get("to") or "")
        self.trusted_peer(peer)  # refuse an unknown peer before touching the VM
        job = SourceJob(config=self.config, qmp_path=qmp_path, peer=peer, options=options,
                        connect_peer=self.connect_peer, progress=send, cancel=cancel,
                        vm_name=str(name) if name else None)
        self.jobs[job.job_id] = job
        try:
            report = await job.run()
        finally:
            del self.jobs[job.job_id]
        return {"ok": report["status"] == "completed", **report}


def migration_options(request: dict[str, Any]) -> MigrationOptions:
    """MigrationOptions from a control request, with clear errors for bad values."""
    bandwidth = request.get("bandwidth")
    try:
        return MigrationOptions(
            downtime_ms=int(request.get("downtime_ms") or 300),
            bandwidth=int(bandwidth) if bandwidth else None,
            compress=CompressSetting.parse(str(request.get("compress") or "auto")),
            dedup=bool(request.get("dedup", True)),
            timeout_s=float(request.get("timeout_s") or 120.0),
            timeout_action=TimeoutAction(request.get("timeout_action") or "abort"),
            storage=str(request.get("storage") or "copy"),
            disk_map=tuple(str(m) for m in request.get("disk_map") or ()),
            disk_format=str(request["disk_format"]) if request.get("disk_format") else None,
            net_map=tuple(str(m) for m in request.get("net_map") or ()),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad migration options: {exc}") from exc


async def run_agent(config: AgentConfig, *, ready: asyncio.Event | None = None) -> None:
    """Run an agent until SIGTERM or SIGINT."""
    identity_mod.ensure_home(config.home)
    identity, created = identity_mod.load_identity(config.home)
    if created:
        log.warning("created identity %s in %s", identity.fingerprint, config.home)
    await journal.recover(config)  # jobs a crashed agent left half done
    for record in vms.list_vms(config):
        if not record.alive():
            attach.remove_recorded(record.nics)   # macvtaps of VMs that quit meanwhile
    agent = Agent(config=config, identity=identity, trust=LiveTrust(config.home))
    await agent.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    host, _ = config.listen
    print(f"ferry agent: listening on {host}:{agent.port}, control {config.control_socket}, "
          f"key {identity.public_key_b64}", flush=True)
    systemd.notify("READY=1")
    if ready is not None:
        ready.set()
    try:
        await agent.stopping.wait()
    finally:
        systemd.notify("STOPPING=1")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(FerryError):
            await agent.close()
