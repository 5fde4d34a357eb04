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
from agent.errors import FerryError, PeerError, ProtocolError, TrustError, UserError
from agent.hostnet import attach
from agent.migration import faults, recovery
from agent.migration.claims import Claims
from agent.migration.convergence import CompressSetting, TimeoutAction
from agent.migration.conversation import CheckedLink, Conversation, Role
from agent.migration.destination import DestinationJob
from agent.migration.link import Link, parse_message, send_control
from agent.migration.protocol import Op
from agent.migration.source import MigrationOptions, SourceJob
from agent.net import channel as channel_mod
from agent.service import systemd
from agent.service.control import ControlServer, Reply
from agent.state import journal, outcomes, vms
from agent.state.config import AgentConfig
from agent.wire.messages import MsgType

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 10.0
RESOLVE_FIRST_S = 1.0
RESOLVE_MAX_S = 60.0


class ChannelLink:
    """A secure channel seen as a migration Link (message kinds are channel types). A
    message that cannot be sent for `timeout` seconds means the link is lost (a stalled
    link looks alive to TCP); so does none arriving, where `receive_timeout` (the
    destination, to which the source talks all the time; the source waits for replies
    with timeouts of its own)."""

    def __init__(self, channel: channel_mod.Channel, timeout: float | None = None, *,
                 receive_timeout: bool = False) -> None:
        self.channel = channel
        self.timeout = timeout or None
        self.receive_wait = self.timeout if receive_timeout else None

    async def send(self, kind: int, payload: bytes | memoryview) -> None:
        try:
            await asyncio.wait_for(self.channel.send(MsgType(kind), payload), self.timeout)
        except TimeoutError:
            raise PeerError(f"link to {self.channel.peer_name} stalled: nothing could be "
                            f"sent for {self.timeout:g} s") from None
        except OSError as exc:  # the socket's own errors, e.g. a reset link
            raise PeerError(f"link to {self.channel.peer_name} lost: {exc}") from exc

    async def receive(self) -> tuple[int, bytes | memoryview]:
        try:
            msg_type, payload = await asyncio.wait_for(self.channel.receive(),
                                                       self.receive_wait)
        except TimeoutError:
            raise PeerError(f"link to {self.channel.peer_name} stalled: nothing arrived "
                            f"for {self.receive_wait:g} s") from None
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
    job_tasks: set[asyncio.Task[Any]] = field(default_factory=set)    # control requests
    incoming: set[asyncio.Task[None]] = field(default_factory=set)
    claims: Claims = field(default_factory=Claims)
    dest_jobs: dict[str, DestinationJob] = field(default_factory=dict)   # by job id
    unresolved: dict[str, journal.Entry] = field(default_factory=dict)   # job -> entry
    resolver: asyncio.Task[None] | None = None
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
        """Stop taking work; let running jobs end within the grace period, then roll back
        the ones that have not (a source job past COMMIT finishes regardless)."""
        if self.control is not None:
            self.control.stop_listening()
        if self.peer_server is not None:
            # Not close(): that would cancel incoming jobs the grace period lets end.
            self.peer_server.stop_listening()
        if self.resolver is not None:
            self.resolver.cancel()
        grace = self.config.shutdown_grace_s
        running = {t for t in (*self.job_tasks, *self.incoming) if not t.done()}
        if running:
            log.info("waiting up to %g s for %d running job(s)", grace, len(running))
            _, still = await asyncio.wait(running, timeout=grace)
            if still:
                log.warning("shutting down: rolling back %d job(s) still running after "
                            "%g s", len(still), grace)
                for job in self.jobs.values():
                    job.cancel.set()          # a source job rolls back unless committing
                for task in still & self.incoming:
                    task.cancel()             # rolls back an uncommitted incoming VM
                await asyncio.wait(still)
        if self.control is not None:
            await self.control.close()
        if self.peer_server is not None:
            await self.peer_server.close()

    # ------------------------------------------------------------------ peers

    async def _serve_peer(self, channel: channel_mod.Channel) -> None:
        """A peer's connection: a migration (PREPARE) or a question about one (STATUS)."""
        peer = channel.peer_name
        link = CheckedLink(ChannelLink(channel, self.config.link_timeout_s,
                                       receive_timeout=True),
                           Conversation(Role.DESTINATION),
                           faults.hold(self.config.home))
        task = asyncio.current_task()
        assert task is not None
        self.incoming.add(task)
        try:
            kind, payload = await link.receive()
            first = parse_message(kind, payload)
            if first is not None and first.op is Op.STATUS:
                job_id = str(first.body.get("job", ""))
                await send_control(link, Op.STATUS, job=job_id, outcome=self.status_of(job_id))
                return
            if first is not None and first.op is Op.RESUME:
                await self._resume(link, str(first.body.get("job", "")), peer)
                return
            if first is None or first.op is not Op.PREPARE:
                await send_control(link, Op.ERROR, message="a migration must begin with "
                                   "PREPARE", error_type="ProtocolError")
                return
            job = DestinationJob(config=self.config, link=link, peer=peer,
                                 job_id=os.urandom(6).hex(), claims=self.claims)
            key = str(first.body.get("job", ""))
            self.dest_jobs[key] = job
            try:
                await job.run(first)
            finally:
                if self.dest_jobs.get(key) is job:
                    del self.dest_jobs[key]
        except (FerryError, ConnectionError, OSError) as exc:
            log.info("peer %s: %s", peer, exc)
        finally:
            self.incoming.discard(task)

    async def _resume(self, link: CheckedLink, job_id: str, peer: str) -> None:
        """A RESUME connection: hand it to its job, which answers on it; this handler
        keeps the connection open until the job is done with it."""
        job = self.dest_jobs.get(job_id)
        if job is None or job.peer != peer or not job.resume(link):
            await send_control(link, Op.ERROR, message=f"no migration job {job_id[:40]} "
                               f"waits for a resume here", error_type="PeerError")
            return
        await job.finished.wait()

    def status_of(self, job_id: str) -> str:
        """What became of an incoming job here: resumed, removed, pending or unknown."""
        if self.claims.holds(job_id) or any(e.job == job_id
                                            for e in journal.entries(self.config)):
            return "pending"
        found = outcomes.lookup(self.config, job_id)
        return found.value if found is not None else "unknown"

    async def ask_status(self, peer: str, job_id: str) -> str:
        """Ask peer what became of job_id (recovery.AskStatus)."""
        link = CheckedLink(await self.connect_peer(peer), Conversation(Role.SOURCE))
        try:
            await send_control(link, Op.STATUS, job=job_id)
            kind, payload = await asyncio.wait_for(link.receive(), STATUS_TIMEOUT_S)
            reply = parse_message(kind, payload)
            if reply is None or reply.op is not Op.STATUS:
                raise ProtocolError("the peer answered STATUS with something else")
            return str(reply.body.get("outcome", "unknown"))
        finally:
            with contextlib.suppress(FerryError, ConnectionError, OSError):
                await link.close()

    def resolve_later(self, entries: list[journal.Entry]) -> None:
        """Keep asking the destinations of these COMMITTING jobs until each answers."""
        for entry in entries:
            self.unresolved[entry.job] = entry
        if self.unresolved and (self.resolver is None or self.resolver.done()):
            self.resolver = asyncio.create_task(self._resolve(), name="resolve-commits")

    async def _resolve(self) -> None:
        delay = RESOLVE_FIRST_S
        while self.unresolved:
            for job_id, entry in list(self.unresolved.items()):
                if await recovery.resolve(self.config, entry, self.ask_status) is not None:
                    del self.unresolved[job_id]
            if self.unresolved:
                await asyncio.sleep(delay)   # the peer is down or busy: ask again later
                delay = min(delay * 2, RESOLVE_MAX_S)

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
        return ChannelLink(channel, self.config.link_timeout_s)

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
        self.claims.claim(f"qmp:{qmp_path.resolve()}", job.job_id, f"VM {name or qmp_path}")
        task = asyncio.current_task()
        assert task is not None
        self.jobs[job.job_id] = job
        self.job_tasks.add(task)
        try:
            report = await job.run()
        finally:
            del self.jobs[job.job_id]
            self.job_tasks.discard(task)
            self.claims.release(job.job_id)
        if report["status"] == "unknown":
            # COMMIT may have reached the peer: ask it (now, and after any restart).
            self.resolve_later([e for e in journal.entries(self.config)
                                if e.job == job.job_id])
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
    unresolved = await recovery.recover(config)  # jobs a killed agent left half done
    for record in vms.list_vms(config):
        if not record.alive():
            attach.remove_recorded(record.nics)   # macvtaps of VMs that quit meanwhile
    agent = Agent(config=config, identity=identity, trust=LiveTrust(config.home))
    await agent.start()
    agent.resolve_later(unresolved)
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
