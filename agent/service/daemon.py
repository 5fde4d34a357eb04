"""The agent process: serves peers over the secure channel and the CLI over the control
socket, runs migration jobs, and shuts down cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent import identity as identity_mod
from agent.errors import FerryError, PeerError, ProtocolError, TrustError, UserError
from agent.hostnet import attach
from agent.importer import talk
from agent.migration import faults, recovery
from agent.migration.claims import Claims
from agent.migration.convergence import Compression, CompressSetting, Pacer, TimeoutAction
from agent.migration.conversation import CheckedLink, Conversation, Role
from agent.migration.destination import DestinationJob
from agent.migration.link import Link, parse_message, send_control
from agent.migration.protocol import Op
from agent.migration.source import MigrationOptions, SourceJob
from agent.net import channel as channel_mod
from agent.qemu.hostrules import require_allowed
from agent.service import jobs as jobs_mod
from agent.service import metrics as metrics_mod
from agent.service import systemd
from agent.service.control import ControlServer, Handler, Reply
from agent.state import journal, outcomes, vms
from agent.state.config import AgentConfig
from agent.storage.disk_move import DiskMove
from agent.wire.messages import MsgType

if TYPE_CHECKING:
    from agent.importer.definition import VmDefinition
    from agent.importer.remote_source import ImportJob

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 10.0
PEER_PROBE_TIMEOUT_S = 1.0      # `status`: a TCP connect to each trusted peer
HISTORY_DEFAULT = 20            # `history` without a limit
RESOLVE_FIRST_S = 1.0
RESOLVE_MAX_S = 60.0
LOCAL = "local"                 # a job's direction when it stays on this host (disk move)
IMPORT = "import"               # `ferry import --to PEER` on the agent reading the images
IMPORT_IN = "import-in"         # ... and on the peer writing them
NOT_MIGRATIONS = (LOCAL, IMPORT, IMPORT_IN)   # jobs the migration metrics do not count
INBOUND_PROGRESS_S = 0.5        # how often an incoming job's progress is published
# The control ops that change nothing, which [access] readers may use (`job` with follow
# too: a follower's cancel only stops its following). Every other op needs an operator.
READ_ONLY_OPS = frozenset({"ping", "status", "vm-list", "jobs", "job", "history", "report"})


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
    jobs: dict[str, SourceJob] = field(default_factory=dict)          # running outbound
    job_tasks: set[asyncio.Task[Any]] = field(default_factory=set)    # outbound jobs
    records: dict[str, jobs_mod.JobRecord] = field(default_factory=dict)  # queued, running
    incoming: set[asyncio.Task[None]] = field(default_factory=set)
    claims: Claims = field(default_factory=Claims)
    dest_jobs: dict[str, DestinationJob] = field(default_factory=dict)   # by job id
    unresolved: dict[str, journal.Entry] = field(default_factory=dict)   # job -> entry
    resolver: asyncio.Task[None] | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    peer_server: channel_mod.ChannelServer | None = None
    control: ControlServer | None = None
    metrics_server: metrics_mod.MetricsServer | None = None
    history: jobs_mod.History = field(init=False)
    outbound: jobs_mod.Limiter = field(init=False)
    bandwidth: Pacer = field(init=False)        # the agent's cap, shared by outbound jobs
    pacers: dict[str, Pacer] = field(default_factory=dict)   # each outbound job's own cap
    metrics: metrics_mod.AgentMetrics = field(init=False)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.history = jobs_mod.History(self.config.home, self.config.history_limit)
        self.outbound = jobs_mod.Limiter(self.config.max_outbound)
        self.bandwidth = Pacer(self.config.bandwidth)
        # Migrations only: a disk move is no migration, and not counted as one.
        self.metrics = metrics_mod.AgentMetrics(
            lambda: [r for r in self.records.values() if r.direction not in NOT_MIGRATIONS])

    async def start(self) -> None:
        """Bind the servers (metrics first: a bad metrics_listen refuses the start before
        anything else listens); after this the agent is ready."""
        if self.config.metrics_listen is not None:
            server = metrics_mod.MetricsServer(self.metrics)
            await server.start(*self.config.metrics_listen)
            self.metrics_server = server
        host, port = self.config.listen
        self.peer_server = await channel_mod.serve(host, port, self.identity, self.trust,
                                                   self._serve_peer)
        self.control = ControlServer(self.config.control_socket, self.control_handlers(),
                                     group=self.config.control_group,
                                     access=self.config.access, read_only=READ_ONLY_OPS)
        await self.control.start()

    def control_handlers(self) -> dict[str, Handler]:
        """Every control op; the ones a reader may use are READ_ONLY_OPS."""
        return {"ping": self._ping, "vm-list": self._vm_list, "migrate": self._migrate,
                "jobs": self._jobs, "status": self._status, "job": self._job,
                "cancel": self._cancel, "history": self._history, "report": self._report,
                "limit": self._limit, "disk-move": self._disk_move, "import": self._import}

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
        for record in self.outbound.queued():
            record.cancel.set()               # never started: ends at once, cancelled
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
                for record in self.records.values():
                    if record.direction in (LOCAL, IMPORT):
                        record.cancel.set()   # a disk move not yet switched rolls back
                for task in still & self.incoming:
                    task.cancel()             # rolls back an uncommitted incoming VM
                await asyncio.wait(still)
        if self.control is not None:
            await self.control.close()
        if self.peer_server is not None:
            await self.peer_server.close()
        if self.metrics_server is not None:   # last: the grace period can be watched
            await self.metrics_server.close()

    # ------------------------------------------------------------------ peers

    async def _serve_peer(self, channel: channel_mod.Channel) -> None:
        """A peer's connection: a migration (PREPARE) or a question about one (STATUS)."""
        peer = channel.peer_name
        raw = ChannelLink(channel, self.config.link_timeout_s, receive_timeout=True)
        task = asyncio.current_task()
        assert task is not None
        self.incoming.add(task)
        try:
            # The first message says which conversation this connection is.
            kind, payload = await raw.receive()
            first = parse_message(kind, payload)
            if first is not None and first.op is Op.IMPORT:
                # An import's source may read for long without sending (a warm pass over
                # unchanged data): the link is lost when the channel says so.
                raw.receive_wait = None
                link = CheckedLink(raw, talk.conversation(Role.DESTINATION),
                                   faults.hold(self.config.home))
                await link.accept(kind, payload)
                busy = [r for r in self.records.values()
                        if r.direction in ("inbound", IMPORT_IN)]
                if len(busy) >= self.config.max_inbound:
                    await send_control(link, Op.ERROR, error_type="UserError", removed=[],
                                       message=f"busy: {len(busy)} incoming migrations and "
                                               f"imports running (max_inbound)")
                    return
                await self._run_import_in(link, first, peer)
                return
            link = CheckedLink(raw, Conversation(Role.DESTINATION),
                               faults.hold(self.config.home))
            await link.accept(kind, payload)
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
            inbound = [r for r in self.records.values() if r.direction in ("inbound", IMPORT_IN)]
            if len(inbound) >= self.config.max_inbound:
                await send_control(link, Op.ERROR, error_type="UserError",
                                   outcome=outcomes.Outcome.REMOVED.value,
                                   message=f"busy: {len(inbound)} incoming migrations "
                                           f"running (max_inbound)")
                return
            job = DestinationJob(config=self.config, link=link, peer=peer,
                                 job_id=os.urandom(6).hex(), claims=self.claims)
            key = str(first.body.get("job", ""))
            self.dest_jobs[key] = job     # found by a RESUME connection for this job
            try:
                await self._run_inbound(job, first)
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

    async def _run_inbound(self, job: DestinationJob, prepare: Any) -> None:
        """Serve an incoming migration, shown in `jobs` while it runs and kept in the
        history once it ends."""
        spec = prepare.body.get("vm")
        name = spec.get("name") if isinstance(spec, dict) else None
        record = jobs_mod.JobRecord(job_id=str(prepare.body.get("job") or job.job_id),
                                    direction="inbound", vm=str(name) if name else None,
                                    peer=job.peer, state="running", phase="receiving",
                                    running_at=time.time())
        if record.job_id in self.records:
            record.job_id = f"{record.job_id}-in"    # a migration between our own homes
        self.records[record.job_id] = record
        started = time.monotonic()
        watcher = asyncio.create_task(_watch_inbound(job, record, started))
        try:
            await job.run(prepare)
        finally:
            watcher.cancel()
            status = "completed" if job.committed else "failed"
            report = {"event": "result", "status": status,
                      "phase": "completed" if job.committed else "removed",
                      "job": record.job_id, "vm": record.vm, "peer": record.peer,
                      # to the resume here (the health window after it is the source's)
                      "total_ms": round(((job.resumed_at or time.monotonic()) - started)
                                        * 1000, 1),
                      "pages_applied": job.pages_applied,
                      "error_reason": None if job.committed else job.error_reason or "other"}
            self._finish(record, report)

    async def _run_import_in(self, link: CheckedLink, first: Any, peer: str) -> None:
        """Serve an incoming import pass (agent/importer/remote_sink.py), shown in `jobs`
        while it runs and kept in the history."""
        defn = first.body.get("definition")
        name = defn.get("name") if isinstance(defn, dict) else None
        job = str(first.body.get("job") or "")
        record = jobs_mod.JobRecord(job_id=job if talk.JOB_ID.fullmatch(job)
                                    else os.urandom(6).hex(),
                                    direction=IMPORT_IN,
                                    vm=str(name)[:64] if isinstance(name, str) else None,
                                    peer=peer, state="running", phase="receiving",
                                    running_at=time.time())
        if record.job_id in self.records:
            record.job_id = f"{record.job_id}-in"    # an import between our own homes
        self.records[record.job_id] = record
        started = time.monotonic()
        # The import's copy and verification load numpy (its OpenBLAS threads spin for
        # ~0.2 s of CPU as they start): only an agent that serves an import pays for them.
        from agent.importer.remote_sink import ImportSink
        sink = ImportSink(config=self.config, link=link, peer=peer,
                          start_vm=self._start_imported, claims=self.claims)

        async def watch() -> None:
            while True:
                await asyncio.sleep(INBOUND_PROGRESS_S)
                elapsed = time.monotonic() - started
                record.publish({"event": "progress", "phase": "receiving",
                                "step": link.conversation.state.value,
                                "elapsed_s": round(elapsed, 3),
                                "disks_done": sink.disks_done,
                                "wire_bytes": sink.received_bytes,
                                "throughput_bps": round(sink.received_bytes / elapsed)})

        watcher = asyncio.create_task(watch())
        try:
            await sink.run(first)
        finally:
            watcher.cancel()
            done = sink.finished is not None
            report: Reply = {"event": "result", "status": "completed" if done else "failed",
                             "phase": "completed" if done else "removed",
                             "job": record.job_id, "vm": record.vm, "peer": peer,
                             "kind": "import", "direction": IMPORT_IN,
                             "total_ms": round((time.monotonic() - started) * 1000, 1),
                             "wire_bytes": sink.received_bytes, "disks_done": sink.disks_done,
                             **(sink.finished or {}),
                             "error": sink.error,
                             "error_reason": None if done else sink.error_reason or "other"}
            self._finish(record, report)

    async def _start_imported(self, definition: VmDefinition, private: bool) -> vms.VmRecord:
        """Start an imported VM here as `ferry vm start` does (QEMU in its own session,
        recorded), in a thread: it waits for QEMU's QMP socket."""
        # The commands layer holds `vm start`; imported here only, when a VM starts.
        from agent.commands.vm_cmds import start_imported
        return await asyncio.to_thread(start_imported, self.config, definition,
                                       private=private)

    def _finish(self, record: jobs_mod.JobRecord, report: Reply) -> None:
        """A job ended: into the history and the metrics, then tell whoever follows it."""
        log.info("%s: %s%s", job_label(record, report.get("vm")), report.get("status"),
                 f" ({report['error']})" if report.get("error") else "")
        record.ended_at = time.time()
        self.history.append(jobs_mod.history_entry(record, report))
        if record.direction not in NOT_MIGRATIONS:
            self.metrics.job_finished(record, report)
        self.records.pop(record.job_id, None)
        record.finish(report)

    def _record(self, request: dict[str, Any]) -> jobs_mod.JobRecord | None:
        """The queued or running job the request names by id (or a unique prefix)."""
        job_id = str(request.get("id") or request.get("job") or "")
        if not job_id:
            raise UserError("name a job: {\"id\": JOB}")
        if job_id in self.records:
            return self.records[job_id]
        found = [r for r in self.records.values() if r.job_id.startswith(job_id)]
        if len(found) > 1:
            raise UserError(f"job id {job_id!r} is ambiguous: "
                            f"{', '.join(sorted(r.job_id for r in found))}")
        return found[0] if found else None

    def _job_rows(self) -> list[Reply]:
        order = {"running": 0, "queued": 1}
        rows = sorted(self.records.values(),
                      key=lambda r: (order.get(r.state, 2), r.position, r.started_at))
        return [r.summary() for r in rows]

    async def _jobs(self, request: dict[str, Any], send: Any, cancel: asyncio.Event) -> Reply:
        return {"ok": True, "jobs": self._job_rows()}

    async def _status(self, request: dict[str, Any], send: Any,
                      cancel: asyncio.Event) -> Reply:
        peers = list(self.trust.current())
        probes = await asyncio.gather(*(probe_peer(p.host_port) for p in peers))
        host, _ = self.config.listen
        vm_list = await self._vm_list(request, send, cancel)
        return {"ok": True, "version": __version__, "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started, 1),
                "listen": f"{host}:{self.port}", "control": str(self.config.control_socket),
                "metrics": self.metrics_server.address if self.metrics_server else None,
                "home": str(self.config.home), "public_key": self.identity.public_key_b64,
                "stopping": self.stopping.is_set(),
                "peers": [{"name": p.name, "address": f"{p.host_port[0]}:{p.host_port[1]}",
                           **probe} for p, probe in zip(peers, probes, strict=True)],
                "vms": vm_list["vms"], "jobs": self._job_rows(),
                "limits": {"max_outbound": self.config.max_outbound,
                           "max_inbound": self.config.max_inbound,
                           "history_limit": self.config.history_limit,
                           "bandwidth": self.bandwidth.rate},
                "history_jobs": len(self.history.entries)}

    async def _job(self, request: dict[str, Any], send: Any, cancel: asyncio.Event) -> Reply:
        record = self._record(request)
        if record is None:
            entry = self.history.find(str(request.get("id") or request.get("job")))
            if entry is None:
                raise UserError(f"no job {request.get('id') or request.get('job')!r} here "
                                f"(running, queued or in the history)")
            if request.get("follow"):
                return {"ok": entry.get("status") == "completed", "event": "result", **entry}
            return {"ok": True, "job": {"job": entry.get("job"), "state": entry.get("status"),
                                        "direction": entry.get("direction"),
                                        "vm": entry.get("vm"), "peer": entry.get("peer"),
                                        "phase": entry.get("phase"),
                                        "started_at": entry.get("started_at")},
                    "report": entry}
        if not request.get("follow"):
            return {"ok": True, "job": record.summary(), "report": None}
        report = await jobs_mod.follow(record, send, cancel)
        if report is None:          # the client went away
            return {"ok": False, "error": "stopped following"}
        return {"ok": report.get("status") == "completed", **report}

    async def _cancel(self, request: dict[str, Any], send: Any,
                      cancel: asyncio.Event) -> Reply:
        record = self._record(request)
        if record is None:
            entry = self.history.find(str(request.get("id") or request.get("job")))
            if entry is not None:
                raise UserError(f"job {entry.get('job')} already ended ({entry.get('status')})")
            raise UserError(f"no job {request.get('id') or request.get('job')!r} here")
        if record.direction not in ("outbound", LOCAL, IMPORT):
            raise UserError(f"job {record.job_id} is an incoming "
                            f"{'import' if record.direction == IMPORT_IN else 'migration'}: "
                            f"cancel it on its source, {record.peer}")
        record.cancel.set()
        return {"ok": True, "job": record.job_id, "state": record.state,
                "phase": record.phase}

    async def _limit(self, request: dict[str, Any], send: Any,
                     cancel: asyncio.Event) -> Reply:
        """Change a bandwidth cap now: the agent's (shared by every outbound job) or, with
        a job id, one outbound job's; running jobs send at the new rate at once."""
        if "bandwidth" not in request:
            raise UserError('limit: give "bandwidth" (bytes per second, or null for no cap)')
        rate = request["bandwidth"]
        if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool)
                                 or rate <= 0):
            raise UserError(f"limit: bandwidth must be a positive whole number of bytes "
                            f"per second or null, not {rate!r}")
        if request.get("id") or request.get("job"):
            record = self._record(request)
            if record is None or record.job_id not in self.pacers:
                raise UserError(f"no outbound job {request.get('id') or request.get('job')!r} "
                                f"queued or running here")
            self.pacers[record.job_id].set_rate(rate)
            log.info("job %s: bandwidth cap %s", record.job_id, _rate_text(rate))
            return {"ok": True, "job": record.job_id, "bandwidth": rate,
                    "agent_bandwidth": self.bandwidth.rate}
        self.bandwidth.set_rate(rate)
        log.info("agent bandwidth cap %s (%d outbound job(s) running)", _rate_text(rate),
                 len(self.jobs))
        return {"ok": True, "job": None, "bandwidth": rate, "agent_bandwidth": rate}

    async def _history(self, request: dict[str, Any], send: Any,
                       cancel: asyncio.Event) -> Reply:
        try:
            limit = int(request.get("limit") or HISTORY_DEFAULT)
        except (TypeError, ValueError):
            raise UserError("history: limit must be a number") from None
        return {"ok": True, "jobs": self.history.newest(limit),
                "total": len(self.history.entries), "history_limit": self.history.limit}

    async def _report(self, request: dict[str, Any], send: Any,
                      cancel: asyncio.Event) -> Reply:
        record = self._record(request)
        if record is not None:
            raise UserError(f"job {record.job_id} is still {record.state}; follow it with "
                            f"`ferry job {record.job_id} --follow`")
        entry = self.history.find(str(request.get("id") or request.get("job")))
        if entry is None:
            raise UserError(f"no report of job {request.get('id') or request.get('job')!r} "
                            f"(the history keeps the newest {self.history.limit})")
        return {"ok": True, "report": entry}

    async def _migrate(self, request: dict[str, Any], send: Any,
                       cancel: asyncio.Event) -> Reply:
        if self.stopping.is_set():
            raise UserError("the agent is shutting down")
        options = migration_options(request)
        name = request.get("vm")
        qmp_path = self._qmp_path(request)
        peer = str(request.get("to") or "")
        self.trusted_peer(peer)  # refuse an unknown peer before touching the VM
        job_id = uuid.uuid4().hex[:12]
        self.claims.claim(f"qmp:{qmp_path.resolve()}", job_id, f"VM {name or qmp_path}")
        record = jobs_mod.JobRecord(job_id=job_id, direction="outbound",
                                    vm=str(name) if name else str(qmp_path), peer=peer,
                                    detached=bool(request.get("detach")))
        self.records[job_id] = record
        self.pacers[job_id] = Pacer(options.bandwidth)
        admitted = self.outbound.enter(record)
        if admitted.done():
            record.state = record.phase = "running"
            record.running_at = time.time()
            log.info("%s: started", job_label(record))
        else:
            log.info("%s: queued at %d (max_outbound %d)", job_label(record), record.position,
                     self.config.max_outbound)
        # The job is the agent's own task: a detached one outlives this connection.
        task = asyncio.create_task(
            self._run_outbound(record, admitted, qmp_path, str(name) if name else None,
                               options), name=f"job-{job_id}")
        self.job_tasks.add(task)
        task.add_done_callback(self.job_tasks.discard)
        if record.detached:
            return {"ok": True, "job": job_id, "state": record.state,
                    "position": record.position}
        return await _attached(record, send, cancel)

    def _qmp_path(self, request: dict[str, Any]) -> Path:
        """The QMP socket of the VM a request names: a running VM this agent knows, or
        a socket given as `qmp` (a VM started by other tools)."""
        name = request.get("vm")
        if name:
            record = vms.load(self.config, str(name))
            if not record.alive():
                raise UserError(f"VM {name} is not running (its QEMU, pid {record.pid}, "
                                f"has exited)" if record.pid else
                                f"VM {name} is not running; start it with ferry vm start {name}")
            return Path(record.qmp_path)
        if request.get("qmp"):
            qmp_path = Path(str(request["qmp"]))
            if not qmp_path.exists():
                raise UserError(f"no QMP socket at {qmp_path}")
            return qmp_path
        raise UserError("name a VM or give --qmp PATH")

    async def _disk_move(self, request: dict[str, Any], send: Any,
                         cancel: asyncio.Event) -> Reply:
        """Move one disk of a running VM to other storage here (agent/storage/disk_move.py):
        a job of its own, shown in `jobs`, cancellable, its report in the history."""
        if self.stopping.is_set():
            raise UserError("the agent is shutting down")
        name = request.get("vm")
        qmp_path = self._qmp_path(request)
        disk, target = request.get("disk"), request.get("target")
        if not isinstance(disk, str) or not disk:
            raise UserError('disk-move: give "disk" (its drive or device id, node name or '
                            'image path)')
        if not isinstance(target, str) or not target.startswith("/"):
            raise UserError(f'disk-move: "target" must be an absolute path, not {target!r}')
        fmt = request.get("format")
        if fmt is not None and fmt not in ("qcow2", "raw"):
            raise UserError(f'disk-move: "format" must be qcow2 or raw, not {fmt!r}')
        speed = request.get("speed")
        if speed is not None and (not isinstance(speed, int) or isinstance(speed, bool)
                                  or speed <= 0):
            raise UserError(f'disk-move: "speed" must be a positive number of bytes per '
                            f'second, not {speed!r}')
        job_id = uuid.uuid4().hex[:12]
        vm_label = str(name) if name else str(qmp_path)
        self.claims.claim(f"qmp:{qmp_path.resolve()}", job_id, f"VM {vm_label}")
        record = jobs_mod.JobRecord(job_id=job_id, direction=LOCAL, vm=vm_label, peer="",
                                    state="running", phase="running", running_at=time.time(),
                                    detached=bool(request.get("detach")))
        self.records[job_id] = record
        log.info("%s: started (disk %s to %s)", job_label(record), disk, target)

        async def progress(event: Reply) -> None:
            record.publish(event)

        def journal_target(path: Path) -> None:
            # A restarted agent undoes what a move it lost left (disk_move.recover).
            journal.write(self.config, journal.Entry(
                job=job_id, role="disk-move", step=journal.Step.MOVING, vm=vm_label,
                qmp_path=str(qmp_path), disks=[str(path)]))

        move = DiskMove(qmp_path=qmp_path, disk_name=disk, target=target, format=fmt,
                        roots=self.config.roots, job_id=job_id, progress=progress,
                        cancel=record.cancel, vm_name=str(name) if name else None,
                        speed=speed, before_create=journal_target)
        return await self._start_job(record, self._run_local(record, move), send, cancel)

    async def _import(self, request: dict[str, Any], send: Any,
                      cancel: asyncio.Event) -> Reply:
        """`ferry import SOURCE --to PEER`: one pass of an import job
        (agent/importer/remote_source.py), shown in `jobs`, cancellable, its report in the
        history. The CLI read SOURCE and printed its notes; the definition is checked here
        again as a peer checks it, its images under this agent's allowed paths."""
        if self.stopping.is_set():
            raise UserError("the agent is shutting down")
        peer = str(request.get("to") or "")
        self.trusted_peer(peer)           # refuse an unknown peer before reading anything
        try:
            definition = talk.check_definition(request.get("definition"))
        except ProtocolError as exc:
            raise UserError(f"import: {exc}") from None
        for disk in definition.disks:
            if disk.media == "disk":
                require_allowed(str(disk.path), self.config.roots, "import source")
        refusals = definition.refusals()
        if refusals:
            raise UserError(f"import of {definition.name} refused: "
                            + "; ".join(n.line() for n in refusals))
        fmt = request.get("format") or "qcow2"
        if fmt not in ("qcow2", "raw"):
            raise UserError(f'import: "format" must be qcow2 or raw, not {fmt!r}')
        directory = request.get("dir")
        if directory is not None and (not isinstance(directory, str)
                                      or not directory.startswith("/")):
            raise UserError(f'import: "dir" must be an absolute path on {peer}, not '
                            f'{directory!r}')
        flags = {k: request.get(k, False) for k in ("warm", "cutover", "start", "private")}
        if not all(isinstance(v, bool) for v in flags.values()) or \
                (flags["warm"] and flags["cutover"]):
            raise UserError("import: warm, cutover, start and private are true/false, and "
                            "not warm and cutover at once")
        try:
            compress = CompressSetting.parse(str(request.get("compress") or "off"))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        # Loads numpy, as ImportSink does: only for an import.
        from agent.importer.remote_source import ImportJob, ImportOptions
        options = ImportOptions(target_format=fmt, directory=directory, warm=flags["warm"],
                                cutover=flags["cutover"], start=flags["start"],
                                private_ram=flags["private"],
                                compress_level=compress.level if compress.mode is not
                                Compression.AUTO else None)
        job_id = uuid.uuid4().hex[:12]
        self.claims.claim(f"import:{peer}:{definition.name}", job_id,
                          f"import of {definition.name} to {peer}")
        record = jobs_mod.JobRecord(job_id=job_id, direction=IMPORT, vm=definition.name,
                                    peer=peer, state="running", phase="running",
                                    running_at=time.time(),
                                    detached=bool(request.get("detach")))
        self.records[job_id] = record
        log.info("%s: started", job_label(record))

        async def progress(event: Reply) -> None:
            record.phase = str(event.get("phase") or record.phase)
            record.publish(event)

        job = ImportJob(config=self.config, definition=definition, peer=peer,
                        options=options, connect_peer=self.connect_peer, job_id=job_id,
                        progress=progress, cancel=record.cancel)
        return await self._start_job(record, self._run_import(record, job), send, cancel)

    async def _start_job(self, record: jobs_mod.JobRecord, work: Coroutine[Any, Any, None],
                         send: Any, cancel: asyncio.Event) -> Reply:
        """Run a local job as the agent's own task; answer at once when detached, else
        follow it to its report (the caller going away cancels it)."""
        task = asyncio.create_task(work, name=f"job-{record.job_id}")
        self.job_tasks.add(task)
        task.add_done_callback(self.job_tasks.discard)
        if record.detached:
            return {"ok": True, "job": record.job_id, "state": record.state}
        return await _attached(record, send, cancel)

    async def _run_import(self, record: jobs_mod.JobRecord, job: ImportJob) -> None:
        report: Reply | None = None
        try:
            report = await job.run()
        finally:
            self.claims.release(record.job_id)
            if report is None:
                report = queued_report(record, "the agent stopped the job")
                report.update(status="failed", error_reason="shutdown")
            report["direction"] = IMPORT
            self._finish(record, report)

    async def _run_local(self, record: jobs_mod.JobRecord, move: DiskMove) -> None:
        report: Reply | None = None
        try:
            report = await move.run()
            journal.remove(self.config, record.job_id)   # settled, either way
        finally:
            self.claims.release(record.job_id)
            if report is None:
                report = queued_report(record, "the agent stopped the job")
                report.update(status="failed", error_reason="shutdown")
            report["direction"] = LOCAL     # what `ferry job` and `report` render it by
            self._finish(record, report)

    async def _run_outbound(self, record: jobs_mod.JobRecord, admitted: asyncio.Future[None],
                            qmp_path: Path, name: str | None,
                            options: MigrationOptions) -> None:
        report: Reply | None = None
        try:
            if not admitted.done():
                waiter: asyncio.Future[Any] = asyncio.ensure_future(record.cancel.wait())
                watched: set[asyncio.Future[Any]] = {admitted, waiter}
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if not admitted.done() or admitted.cancelled():
                    report = queued_report(record, "cancelled while queued")
                else:
                    record.state = record.phase = "running"
                    record.running_at = time.time()
                    log.info("%s: started after waiting in the queue", job_label(record))
            if report is None:
                async def progress(event: Reply) -> None:
                    record.publish(event)

                job = SourceJob(config=self.config, qmp_path=qmp_path, peer=record.peer,
                                options=options, connect_peer=self.connect_peer,
                                progress=progress, cancel=record.cancel, vm_name=name,
                                job_id=record.job_id, pacer=self.pacers[record.job_id],
                                agent_pacer=self.bandwidth)
                self.jobs[job.job_id] = job
                try:
                    report = await job.run()
                finally:
                    del self.jobs[job.job_id]
                if report["status"] == "unknown":
                    # COMMIT may have reached the peer: ask it (now, and after any restart).
                    self.resolve_later([e for e in journal.entries(self.config)
                                        if e.job == job.job_id])
        finally:
            self.outbound.leave(record.job_id)
            self.pacers.pop(record.job_id, None)
            self.claims.release(record.job_id)
            if report is None:
                report = queued_report(record, "the agent stopped the job")
                report.update(status="failed", error_reason="shutdown")
            self._finish(record, report)


async def _watch_inbound(job: DestinationJob, record: jobs_mod.JobRecord,
                         started: float) -> None:
    """Publish an incoming job's progress as the source's is: what has arrived so far."""
    while True:
        await asyncio.sleep(INBOUND_PROGRESS_S)
        elapsed = time.monotonic() - started
        record.publish({"event": "progress", "phase": "receiving",
                        "step": job.link.conversation.state.value,
                        "elapsed_s": round(elapsed, 3), "pages_applied": job.pages_applied,
                        "wire_bytes": job.received_bytes,
                        "throughput_bps": round(job.received_bytes / elapsed)})


def _rate_text(rate: int | None) -> str:
    return "none" if rate is None else f"{rate} B/s"


def job_label(record: jobs_mod.JobRecord, vm_name: str | None = None) -> str:
    """A job as its log lines name it (as the migration's own lines do); vm_name once the
    job knows it (a VM given by its QMP socket is named when described)."""
    vm_name = vm_name or record.vm or "?"
    if record.direction == LOCAL:
        return f"disk move {record.job_id} of {vm_name}"
    if record.direction == IMPORT:
        return f"import {record.job_id} of {vm_name} to {record.peer}"
    if record.direction == IMPORT_IN:
        return f"incoming import {record.job_id} of {vm_name} from {record.peer}"
    if record.direction == "outbound":
        return f"migration {record.job_id} of {vm_name} to {record.peer}"
    return f"incoming {record.job_id} of {vm_name} from {record.peer}"


async def _attached(record: jobs_mod.JobRecord, send: Any, cancel: asyncio.Event) -> Reply:
    """Follow a job on the connection that asked for it, to its report: the connection's
    cancel (Ctrl-C, or the CLI going away) cancels the job."""
    linked = asyncio.create_task(_forward_cancel(cancel, record.cancel))

    async def forward(event: Reply) -> None:
        try:
            await send(event)
        except (ConnectionError, OSError):
            record.cancel.set()     # nobody is listening any more: roll back

    try:
        report = await jobs_mod.follow(record, forward, asyncio.Event())
    finally:
        linked.cancel()
    assert report is not None
    return {"ok": report["status"] == "completed", **report}


async def _forward_cancel(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


def queued_report(record: jobs_mod.JobRecord, why: str) -> Reply:
    """The report of a job that ended before it ran."""
    return {"event": "result", "status": "cancelled", "phase": "cancelled", "error": why,
            "error_reason": None,
            "job": record.job_id, "vm": record.vm, "peer": record.peer,
            "total_ms": round((time.time() - record.started_at) * 1000, 1)}


async def probe_peer(address: tuple[str, int]) -> Reply:
    """Whether a TCP connection to a peer's address opens within PEER_PROBE_TIMEOUT_S (no
    handshake: the peer logs a connection that closed before it)."""
    started = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(*address),
                                           PEER_PROBE_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        return {"reachable": False,
                "error": "timed out" if isinstance(exc, TimeoutError) else str(exc)}
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return {"reachable": True, "connect_ms": round((time.monotonic() - started) * 1000, 1)}


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
    metrics = (f", metrics http://{agent.metrics_server.address}/metrics"
               if agent.metrics_server else "")
    print(f"ferry agent: listening on {host}:{agent.port}, control {config.control_socket}"
          f"{metrics}, key {identity.public_key_b64}", flush=True)
    systemd.notify("READY=1")
    interval = systemd.watchdog_interval()
    # Fed through the shutdown too: running jobs may take shutdown_grace_s to end.
    watchdog = (asyncio.create_task(systemd.keep_watchdog_fed(interval), name="watchdog")
                if interval is not None else None)
    if ready is not None:
        ready.set()
    try:
        await agent.stopping.wait()
    finally:
        systemd.notify("STOPPING=1")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        try:
            with contextlib.suppress(FerryError):
                await agent.close()
        finally:
            if watchdog is not None:
                watchdog.cancel()
