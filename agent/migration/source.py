"""The source's side of one migration: QEMU's own pre-copy, carried page-aware; commit or roll back.

The source QEMU migrates into a unix socket this job serves (DESIGN §2). QEMU's dirty log
picks each iteration's pages and QEMU decides when to stop the guest; the job parses the
stream (agent.qemu.stream), ships the main RAM block's pages as page batches (dedup,
zstd when it pays, AES-GCM on the channel) and forwards everything else, rewritten for
a destination QEMU running x-ignore-shared. It reads from QEMU only as fast as the link
takes the result, so QEMU's bandwidth estimate, and its switchover, are the real link's.
Disks run their bitmap rounds alongside; with disks QEMU pauses in `pre-switchover`
and the disks' final round starts there.

Safety (DESIGN §2): at most one copy of the VM runs, and one can always run. Until COMMIT
is sent, every failure, a lost link or a cancel cancels QEMU's migration (or `cont`s a
source already in postmigrate) and tells the destination to remove its copy. Once COMMIT
is sent the source never resumes by itself; if the destination's answer is lost the job
ends UNKNOWN with the source stopped.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.batch import codec
from agent.batch.format import HASH_SIZE
from agent.buffers import BufferPool
from agent.errors import (
    FerryError,
    LocalError,
    QemuError,
    UserError,
    VmNotMigratableError,
    failure_reason,
)
from agent.migration import faults
from agent.migration.convergence import (
    MIN_RAM_SHARE,
    Compression,
    CompressionPolicy,
    CompressSetting,
    Eta,
    Pacer,
    TimeoutAction,
    downtime_target_s,
    ram_downtime_s,
)
from agent.migration.conversation import CheckedLink, Conversation, Role
from agent.migration.link import Inbox, Link, RemoteFailure, send_control
from agent.migration.protocol import MAX_STREAM_CHUNK, Kind, Op
from agent.migration.resume import ResumableLink
from agent.migration.states import Phase, PhaseTracker
from agent.migration.timeline import (
    DESTINATION_FIELDS,
    HEALTH_MARGIN_S,
    MAX_HEALTH_WINDOW_S,
    SOURCE_FIELDS,
    Sampler,
    destination_rows,
    health,
    pace_before,
    peer_number,
)
from agent.qemu import migrate as qemu_migrate
from agent.qemu import nics, vm
from agent.qemu import qmp as qmp_mod
from agent.qemu.blockargv import current_disk_argv
from agent.qemu.stream import (
    ZERO_PAGE_OFFSET,
    Forward,
    Pages,
    RamSection,
    Section,
    StreamError,
    StreamParser,
)
from agent.qemu.vmspec import PAGE_SIZE, NicSpec, VmSpec
from agent.state import journal, vms
from agent.state.config import AgentConfig
from agent.state.outcomes import Outcome
from agent.storage.disk_source import StorageSource, copyable_disks

log = logging.getLogger(__name__)

MAX_DISK_ROUNDS_BEFORE_RAM = 12
"""Disk rounds before RAM's pre-copy starts, at most: with the writes capped each leaves at
most half of the one before, so a dozen bring any disk close to in sync."""

ABORT_TIMEOUT_S = 5.0
ACCEPT_TIMEOUT_S = 10.0
SOURCE_DONE_TIMEOUT_S = 30.0
PROGRESS_INTERVAL_S = 0.25
WATCH_FOREVER_S = 7 * 24 * 3600.0
# Page-batch buffers kept for reuse: two sets being encoded and sent in turn, and those a
# ResumableLink keeps (viewed) until the destination acknowledges them (ACK_EVERY_BYTES
# plus what is in flight).
BATCH_POOL = 128
# Stream bytes translated at once, at most (when that much has arrived).
RECEIVE_TARGET = 2 << 20
# zstd worker threads per job: compression overlaps reading, hashing and sealing.
ZSTD_THREADS = max(1, min(4, len(os.sched_getaffinity(0))))


class ConvergenceTimeout(UserError):
    """Pre-copy ran out of its time budget without converging (timeout action: abort)."""

    failure_reason = "timeout"


Progress = Callable[[dict[str, Any]], Awaitable[None]]
ConnectPeer = Callable[[str], Awaitable[Link]]


@dataclass(frozen=True, slots=True)
class MigrationOptions:
    """What the user asked for (CLI flags), with the defaults of DESIGN §2."""

    downtime_ms: int = 300
    bandwidth: int | None = None          # bytes per second on the wire; None: unlimited
    compress: CompressSetting = field(default_factory=lambda: CompressSetting.parse("auto"))
    dedup: bool = True
    timeout_s: float = 120.0
    timeout_action: TimeoutAction = TimeoutAction.ABORT
    storage: str = "copy"                 # copy: copy writable disks; shared: same paths
    disk_map: tuple[str, ...] = ()        # SRC=DST target paths on the destination
    disk_format: str | None = None        # convert copied disks to this format
    net_map: tuple[str, ...] = ()         # SRC=NETWORK: the destination network of a NIC

    def __post_init__(self) -> None:
        if self.downtime_ms <= 0:
            raise UserError(f"--downtime-ms must be positive, not {self.downtime_ms}")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise UserError(f"--bandwidth must be positive, not {self.bandwidth}")
        if self.timeout_s <= 0:
            raise UserError(f"--timeout must be positive, not {self.timeout_s:g}")
        if self.storage not in ("copy", "shared"):
            raise UserError(f"bad --storage {self.storage!r}: use copy or shared")


@dataclass
class Counters:
    """What went over the wire, for the report."""

    pages_sent: int = 0          # main-block records QEMU sent (every iteration)
    zero_pages: int = 0
    dedup_pages: int = 0
    data_pages: int = 0
    unchanged_pages: int = 0
    compressed_batches: int = 0
    raw_data_bytes: int = 0
    wire_bytes: int = 0          # page batches
    stream_bytes: int = 0        # read from QEMU
    stream_reads: int = 0        # in this many chunks
    forward_bytes: int = 0       # QEMU's stream bytes sent on (device state included)
    device_state_bytes: int = 0  # of those, after RAM's last section
    disk_wire_bytes: int = 0
    sent_bytes: int = 0          # handed to the link so far (encoding runs ahead of it)

    def add(self, batch: codec.EncodedBatch, records: int) -> None:
        self.pages_sent += records
        self.zero_pages += batch.zero_count
        self.dedup_pages += batch.copy_count
        self.data_pages += batch.data_count
        self.unchanged_pages += batch.unchanged_count
        self.raw_data_bytes += batch.raw_data_bytes
        self.wire_bytes += batch.nbytes
        self.compressed_batches += batch.compressed

    @property
    def total_wire_bytes(self) -> int:
        return self.wire_bytes + self.forward_bytes + self.disk_wire_bytes


class _RamDone:
    """Marker in the outgoing messages: RAM's last section was forwarded."""


@dataclass(slots=True)
class _RamBatch:
    """A page batch on its way out: encoded, or still being compressed in a worker thread
    (sent in its place in the stream all the same)."""

    batch: codec.EncodedBatch | asyncio.Future[codec.EncodedBatch]
    records: int


_RAM_DONE = _RamDone()
Outgoing = tuple[Kind, bytes | memoryview] | _RamBatch | _RamDone


@dataclass
class SourceJob:
    """One outgoing migration of one VM to one peer."""

    config: AgentConfig
    qmp_path: Path
    peer: str
    options: MigrationOptions
    connect_peer: ConnectPeer
    progress: Progress
    cancel: asyncio.Event
    vm_name: str | None = None            # set when the agent knows the VM by name
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    phases: PhaseTracker = field(default_factory=PhaseTracker)
    counters: Counters = field(default_factory=Counters)
    qmp: qmp_mod.Qmp | None = None
    info: vm.VmInfo | None = None
    link: Link | None = None
    inbox: Inbox | None = None
    encoder: codec.BatchEncoder | None = None
    storage: StorageSource | None = None
    migrate_socket: Path | None = None
    migrate_started: bool = False
    stop_us: int | None = None
    resume_us: int | None = None
    nics: tuple[NicSpec, ...] = ()
    resumable: ResumableLink | None = None
    dest_pid: int | None = None
    dest_widened: list[str] = field(default_factory=list)   # what the peer's [accept] let in
    started: float = field(default_factory=time.monotonic)
    switchover: dict[str, float] = field(default_factory=dict)
    iterations: int = 0                   # QEMU's dirty-log syncs (dirty-sync-count)
    sections: int = 0                     # RAM sections in QEMU's stream
    throttle_pct: int = 0                 # QEMU's auto-converge now, and the most it took
    throttle_max: int = 0
    _compression: CompressionPolicy | None = None
    _sent_all_at: float = 0.0             # when the last translated chunk was all sent
    _listener: socket.socket | None = None   # QEMU's migration socket, once listened on
    _migrate_mark: int = 0                # QMP event mark taken before `migrate`
    _zstd: concurrent.futures.ThreadPoolExecutor | None = None
    _pool: BufferPool = field(default_factory=lambda: BufferPool(BATCH_POOL))
    _disks_final: asyncio.Event = field(default_factory=asyncio.Event)
    _switchover_started: asyncio.Event = field(default_factory=asyncio.Event)
    _downtime_ms_set: int | None = None
    _step: journal.Step = journal.Step.PRECOPY   # the last one journaled
    _disk_budget_s: float | None = None     # what the disks leave of the pause; None: no disks
    _forced: bool = False
    _eta: Eta = field(default_factory=Eta)
    _last_progress: float = 0.0
    _last_query: dict[str, Any] = field(default_factory=dict)
    faults: frozenset[faults.Fault] = field(default_factory=faults.active)
    # The wire caps: the job's own (--bandwidth, `ferry limit JOB`) and the agent's, which
    # every outbound job shares (`bandwidth` in agent.toml, `ferry limit`); both may change
    # while the job runs.
    pacer: Pacer | None = None
    agent_pacer: Pacer | None = None
    _dropped_page: int | None = None
    _sent_hashes: bytearray = field(default_factory=bytearray)   # what the destination holds
    sampler: Sampler | None = None
    health: dict[str, Any] | None = None  # the guest's pace after the resume vs before
    health_wait_ms: float | None = None   # how long the source waited for it
    _ended: float | None = None           # monotonic time the job completed (the resume)
    _dest_window_s: float = 0.0           # the destination's health window (COMMITTED)
    _dest_samples: list[list[Any]] = field(default_factory=list)

    # ------------------------------------------------------------------ driver

    async def run(self) -> dict[str, Any]:
        """Run the job to its end and return the report; raises only CancelledError."""
        self.sampler = Sampler(SOURCE_FIELDS, self._sample_figures, started=self.started,
                               rates={"wire_bps": "wire_bytes"})
        self.sampler.start()
        body = asyncio.create_task(self._migrate(), name=f"migrate-{self.job_id}")
        cancel_wait: asyncio.Task[object] = asyncio.create_task(self.cancel.wait())
        error: str | None = None
        reason: str | None = None
        try:
            while True:
                done, _ = await asyncio.wait({body, cancel_wait},
                                             return_when=asyncio.FIRST_COMPLETED)
                if body in done:
                    body.result()
                    break
                if self.phases.may_roll_back:
                    body.cancel()
                    with contextlib.suppress(asyncio.CancelledError, FerryError):
                        await body
                    await self._roll_back(Phase.CANCELLED, "cancelled by the user")
                    break
                # After COMMIT a cancel changes nothing: the destination owns the VM now.
                cancel_wait = asyncio.create_task(asyncio.sleep(3600))
        except Exception as exc:
            if not isinstance(exc, FerryError):
                # A bug, or an error some library let through untranslated: still roll back.
                log.exception("%s: unexpected error", self.label)
                exc = LocalError(f"internal error: {exc!r}")
            exc = await self._explain(exc)
            error, reason = str(exc), failure_reason(exc)
            log.error("%s failed: %s", self.label, exc)   # expected: one line, no traceback
            if self.phases.may_roll_back:
                await self._roll_back(Phase.FAILED, error)
            elif self.phases.phase is Phase.COMMITTING:
                self.phases.advance(Phase.UNKNOWN)
                if isinstance(exc, RemoteFailure) and exc.outcome == Outcome.REMOVED:
                    # The destination says its copy is gone (it never ran the guest).
                    await self._roll_back(Phase.FAILED, error)
                else:
                    log.error("%s: COMMIT may have reached %s; the source stays "
                              "stopped until %s tells (asking)", self.label, self.peer,
                              self.peer)
        finally:
            cancel_wait.cancel()
            await self.sampler.stop()
            await self._release()
            if self.phases.phase is not Phase.UNKNOWN:
                journal.remove(self.config, self.job_id)
        return self.report(error, reason)

    async def _explain(self, exc: FerryError) -> FerryError:
        """The root cause of a failure: the peer's own report, or QEMU's error when its
        migration failed (the stream then ends early, which is only the symptom)."""
        if self.inbox is not None:
            explained = await self.inbox.explain(exc)
            if explained is not exc and isinstance(explained, FerryError):
                return explained
        if self.qmp is not None and self.migrate_started and isinstance(exc, StreamError):
            with contextlib.suppress(FerryError):
                info = await self.qmp.execute("query-migrate")
                if info.get("status") == "failed":
                    return QemuError(f"the source QEMU's migration failed: "
                                     f"{info.get('error-desc', 'no detail')} ({exc})")
        return exc

    async def _migrate(self) -> None:
        await self._prepare()
        self.phases.advance(Phase.PRECOPY)
        await self._transfer()
        await self._commit()
        self.phases.advance(Phase.COMPLETED)
        self._ended = time.monotonic()
        await self._emit(force=True)
        await self._await_health()

    # ------------------------------------------------------------------ prepare

    async def _prepare(self) -> None:
        self.qmp = await qmp_mod.connect(self.qmp_path)
        self.info = info = await vm.describe_vm(self.qmp_path, qmp=self.qmp)
        if self.sampler is not None:
            self.sampler.watch_qemu(info.pid, await vm.vcpu_threads(self.qmp, info.pid))
        if vm.tcg_dirty_log_unsafe(info.ram_size, info.accel, info.qemu_version):
            raise VmNotMigratableError(
                f"VM {info.name} runs under TCG on QEMU "
                f"{'.'.join(map(str, info.qemu_version))} with {info.ram_size} bytes of RAM, "
                f"a multiple of {vm.TCG_DIRTY_BUG_PAGES} pages: QEMU before 9.0 loses dirty "
                f"pages of such a block under TCG (fixed upstream by 03bfc2188f) and the guest "
                f"would be corrupted. Run it under KVM, on QEMU >= 9.0, or with "
                f"{(info.ram_size + vm.TCG_RAM_PADDING) // 1024}K of RAM (ferry vm start pads "
                f"TCG guests so)")
        disks = await copyable_disks(self.qmp) if self.options.storage == "copy" else ()
        # The command line names the images the VM started with; a disk moved since then
        # (ferry disk move) is elsewhere now: describe the VM as its block graph is.
        argv = current_disk_argv(info.argv[1:], await self.qmp.execute("query-block"))
        spec = VmSpec(name=self.vm_name or info.name, argv=tuple(argv),
                      ram_size=info.ram_size, ram_backend_id=info.ram_block, disks=disks,
                      nics=await self._describe_nics(info))
        self.nics = spec.nics
        status = (await self.qmp.execute("query-status")).get("status")
        if status != "running":
            raise UserError(f"VM {spec.name} is {status}, not running; resume it first")
        migration = (await self.qmp.execute("query-migrate")).get("status", "none")
        if migration in qemu_migrate.ACTIVE_STATUSES:
            raise UserError(f"VM {spec.name} is already migrating (QEMU migration {migration})")
        self._compression = CompressionPolicy(self.options.compress)
        self._sent_hashes = bytearray(codec.zero_block_hash(PAGE_SIZE) * spec.npages)
        # The encoder never compresses: batches are packed in the zstd workers, at the
        # level the policy picks for each (_encode).
        self.encoder = codec.BatchEncoder(
            None, PAGE_SIZE, self._sent_hashes, dedup=self.options.dedup, compress_level=None)
        if self.options.compress.level is not None:
            self._zstd = concurrent.futures.ThreadPoolExecutor(
                ZSTD_THREADS, thread_name_prefix=f"zstd-{self.job_id}")
        pause = bool(disks) or faults.Fault.PRE_SWITCHOVER in self.faults
        await self.qmp.execute("migrate-set-capabilities",
                               qemu_migrate.source_capabilities(pause=pause))
        self._disk_budget_s = None if not disks else 0.0   # hold QEMU until disks converge
        await self._update_downtime_limit()
        await self.qmp.execute("migrate-set-parameters", qemu_migrate.SOURCE_PARAMETERS)
        await self._emit(force=True)
        conversation = Conversation(Role.SOURCE)
        self.link = self.resumable = ResumableLink(
            CheckedLink(await self.connect_peer(self.peer), conversation,
                        faults.hold(self.config.home)),
            conversation, self.job_id, connect=lambda: self.connect_peer(self.peer),
            label=self.label)
        self.inbox = Inbox(self.link)
        await send_control(self.link, Op.PREPARE, vm=spec.to_json(), job=self.job_id,
                           disk_map=list(self.options.disk_map),
                           disk_format=self.options.disk_format)
        self._journal(journal.Step.PRECOPY)
        if not disks:
            # QEMU's migration setup (its dirty log started, 0.24-0.46 s under TCG here)
            # runs while the destination prepares (0.11-0.19 s): nothing is read from its
            # socket before PREPARED. With disks, their first round must come first.
            await self._start_qemu_migration()
        reply = await self.inbox.expect({Op.PREPARED}, timeout=self.config.link_timeout_s,
                                        what="preparing the destination")
        self.dest_pid = reply.int_field("dest_pid") or None
        widened = reply.body.get("widened")
        self.dest_widened = [str(n) for n in widened] if isinstance(widened, list) else []
        for note in self.dest_widened:
            log.warning("%s: the destination accepts by its config: %s",
                        self.label, note)
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        self.storage = StorageSource(self.qmp, disks, self.config.run_dir / f"{self.job_id}.nbd",
                                     self.job_id, dedup=self.options.dedup,
                                     compress_level=self._disk_compress_level())
        await self.storage.start()  # bitmaps record writes from here on
        log.info("%s: destination ready after %.0f ms (QEMU pid %s)", self.label,
                 (time.monotonic() - self.started) * 1000, self.dest_pid)

    async def _describe_nics(self, info: vm.VmInfo) -> tuple[NicSpec, ...]:
        """The VM's NICs on host networks, each with the network it goes to (refused here
        if ferry cannot tell which)."""
        options = nics.netdev_options(info.argv[1:])
        if not nics.argv_nics(options) and not self.options.net_map:
            return ()
        recorded = {}
        if self.vm_name is not None:
            with contextlib.suppress(UserError):
                recorded = vms.load(self.config, self.vm_name).nic_networks()
        assert self.qmp is not None
        return nics.describe_nics(options, info.pid, await nics.guest_macs(self.qmp), recorded,
                                  nics.parse_net_map(self.options.net_map),
                                  self.config.networks)

    def _disk_compress_level(self) -> int | None:
        """Disk batches compress only when asked for explicitly (zstd:N): `auto` decides
        per RAM batch, and disk rounds keep their own encoders."""
        setting = self.options.compress
        return setting.level if setting.mode is Compression.FIXED else None

    def _journal(self, step: journal.Step | None = None) -> None:
        """Record how far the job got (`step`, else the last one), and what undoes its
        disks' write caps, for an agent restarted after a crash."""
        self._step = step or self._step
        # Every source step is about our QEMU, which a host crash takes down with the
        # journal's readers: no fsync (STOPPED and COMMITTING fall inside the pause).
        journal.write(self.config, journal.Entry(
            job=self.job_id, role="source", step=self._step, vm=self.vm_name or "",
            qmp_path=str(self.qmp_path), peer=self.peer,
            disk_limits=self.storage.saved_limits() if self.storage else []),
            survive_host_crash=False)

    async def _update_downtime_limit(self) -> None:
        """QEMU's downtime-limit: the pause the iteration count allows so far, no more than
        the disks leave (0 s holds QEMU in pre-copy); lifted once forced."""
        assert self.qmp is not None
        seconds = downtime_target_s(self.options.downtime_ms / 1000, self.iterations)
        if self._disk_budget_s is not None:
            seconds = min(seconds, self._disk_budget_s)
        ms = (qemu_migrate.MAX_DOWNTIME_MS if self._forced
              else qemu_migrate.downtime_limit_ms(seconds))
        if ms != self._downtime_ms_set:
            await self.qmp.execute("migrate-set-parameters", {"downtime-limit": ms})
            self._downtime_ms_set = ms

    # ------------------------------------------------------------------ transfer

    async def _transfer(self) -> None:
        """Disk round 0, then QEMU's migration through our socket until its stream ends;
        disk rounds, progress and the time budget are watched alongside."""
        assert self.qmp is not None and self.storage is not None
        if self._listener is None:
            if self.storage.disks:
                await self._disks_before_ram()
            await self._start_qemu_migration()
        assert self._listener is not None
        listener, mark = self._listener, self._migrate_mark
        tasks: list[asyncio.Task[None]] = []
        try:
            stopped = asyncio.create_task(self._watch_stop(mark), name="watch-stop")
            tasks = [asyncio.create_task(self._watch(mark), name="watch-qemu"), stopped]
            if self.storage.disks:
                rounds = asyncio.create_task(self._disk_rounds(), name="disk-rounds")
                tasks += [rounds, asyncio.create_task(self._disks_at_switchover(rounds),
                                                      name="disk-final")]
            loop = asyncio.get_running_loop()
            try:
                conn, _ = await asyncio.wait_for(loop.sock_accept(listener), ACCEPT_TIMEOUT_S)
            except TimeoutError:
                raise QemuError("the source QEMU did not connect to the migration socket "
                                f"within {ACCEPT_TIMEOUT_S:g} s") from None
            with conn:
                pump = asyncio.create_task(self._pump(conn), name="stream-pump")
                try:
                    await _first_failure(pump, tasks)
                finally:
                    # Cancelled from outside (a cancel, a shutdown): stop the pump before
                    # its socket closes under a pending read (an unretrieved EBADF).
                    if not pump.done():
                        pump.cancel()
                        with contextlib.suppress(asyncio.CancelledError, FerryError, OSError):
                            await pump
            # QEMU stopped the guest before its last section; the event may still be on
            # its way to us.
            await asyncio.wait_for(stopped, ACCEPT_TIMEOUT_S)
        finally:
            listener.close()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, FerryError):
                    await task
        assert self.link is not None
        await send_control(self.link, Op.STREAM_END, bytes=self.counters.forward_bytes)
        self._mark("stream_sent")
        await qemu_migrate.wait_migration_done(self.qmp, self.qmp.event_mark(),
                                               SOURCE_DONE_TIMEOUT_S)
        self._mark("source_qemu_done")
        self._note_query(await self.qmp.execute("query-migrate"))   # QEMU's final figures
        assert self.inbox is not None
        await self.inbox.expect({Op.LOADED}, timeout=self.config.link_timeout_s,
                                what="destination loading the device state")
        self._mark("loaded")
        log.info("%s: %d iterations, device state (%d bytes) loaded %.0f ms after "
                 "stop", self.label, self.iterations, self.counters.device_state_bytes,
                 self.switchover.get("loaded", -1))

    async def _start_qemu_migration(self) -> None:
        """Listen on the job's socket and start QEMU's migration into it; QEMU sets up,
        then waits for the stream to be read."""
        assert self.qmp is not None
        self._listener = self._listen()
        self._migrate_mark = self.qmp.event_mark()
        await self.qmp.execute("migrate", {"uri": f"unix:{self.migrate_socket}"})
        self.migrate_started = True

    def _listen(self) -> socket.socket:
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        self.migrate_socket = self.config.run_dir / f"{self.job_id}.migrate.sock"
        self.migrate_socket.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.migrate_socket))
            listener.listen(1)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        return listener

    # QEMU's socket is left at the kernel's default buffer (~200 KB): an 8 MiB one cut the
    # reads twentyfold but hid seconds of a slow link from QEMU's bandwidth estimate, so it
    # switched over far too early (a guest that cannot converge at 1 MB/s "converged").
    async def _pump(self, conn: socket.socket) -> None:
        """Read QEMU's stream, translate it, send the result; the next chunk is read and
        translated while the last one's messages are sent.

        Translating runs native loops (GIL released) on the event loop's own thread: a
        worker thread was measured to cost more in hand-offs (a chunk is what the socket
        holds, ~200 KB) than it gained in overlap on 2 cores (agents 1.2-1.4 vs 1.0-1.1
        CPU s for a 1 GiB guest)."""
        assert self.info is not None
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        parser = StreamParser(self.info.ram_block, self.info.ram_size)
        sending: asyncio.Task[None] | None = None
        try:
            while True:
                waiting = time.monotonic()
                n = await self._receive(loop, conn, parser)
                self._note_starved(waiting, sending)
                if n == 0:
                    parser.close()
                    break
                self.counters.stream_bytes += n
                self.counters.stream_reads += 1
                if (faults.Fault.CUT_STREAM in self.faults
                        and self.counters.stream_bytes > faults.CUT_STREAM_AFTER):
                    conn.shutdown(socket.SHUT_RDWR)
                out = self._translate(parser)
                if sending is not None:
                    await sending
                sending = asyncio.create_task(self._send_all(out))
            if sending is not None:
                await sending
        finally:
            if sending is not None and not sending.done():
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError, FerryError):
                    await sending

    def _note_starved(self, waiting: float, sending: asyncio.Task[None] | None) -> None:
        """Tell auto compression how long everything was sent while QEMU sent nothing."""
        if self._compression is not None and (sending is None or sending.done()):
            idle_from = max(waiting, self._sent_all_at)
            self._compression.starved(max(0.0, time.monotonic() - idle_from))

    @staticmethod
    async def _receive(loop: asyncio.AbstractEventLoop, conn: socket.socket,
                       parser: StreamParser) -> int:
        """Wait for stream bytes, then take all that have arrived (a socket holds ~200 KB:
        translating more at once costs fewer thread hand-offs); 0 at the end."""
        with parser.space() as room:
            n = await loop.sock_recv_into(conn, room)
        parser.commit(n)
        total = n
        while n and total < RECEIVE_TARGET:
            with parser.space() as room:
                try:
                    n = conn.recv_into(room)
                except BlockingIOError:
                    break
            parser.commit(n)
            total += n
        return total

    def _translate(self, parser: StreamParser) -> list[Outgoing]:
        """Every event the parser has now, as messages."""
        assert self.encoder is not None and self._compression is not None
        out: list[Outgoing] = []
        forward: list[bytes] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if forward:
                data = b"".join(forward)
                forward.clear()
                size = 0
                for at in range(0, len(data), MAX_STREAM_CHUNK):
                    out.append((Kind.QEMU_STREAM, data[at:at + MAX_STREAM_CHUNK]))

        tail = parser.ram_complete
        while (event := parser.next_event()) is not None:
            if isinstance(event, Forward):
                forward.append(event.data)
                size += len(event.data)
                if tail:
                    self.counters.device_state_bytes += len(event.data)
                if size >= MAX_STREAM_CHUNK:
                    flush()
            elif isinstance(event, Pages):
                flush()
                out += self._encode(event)
            elif isinstance(event, RamSection):
                self.sections = event.number
                if event.kind is Section.END:
                    flush()
                    out.append(_RAM_DONE)
                    tail = True
        flush()
        return out

    def _encode(self, pages: Pages) -> list[Outgoing]:
        """The pages as batches. Hashing and dedup run here, in stream order; a batch to
        compress goes to a worker thread (zstd, GIL released) while this thread reads,
        hashes, seals and sends on."""
        assert self.encoder is not None and self._compression is not None
        if faults.Fault.DROP_LATE_PAGE in self.faults and (
                pages.section is Section.END or self.iterations >= faults.DROP_FROM_ITERATION):
            pages = self._drop_a_page(pages)
        out: list[Outgoing] = []
        level = self._compression.level
        loop = asyncio.get_running_loop()
        position, total = 0, len(pages)
        while position < total:
            compress = self._compression.compress_next()
            start = position
            batch, position = self.encoder.encode(
                pages.indices, position, src=pages.data, offsets=pages.offsets,
                into=self._pool.take(self.encoder.buffer_size()), compress=False)
            pending: codec.EncodedBatch | asyncio.Future[codec.EncodedBatch] = batch
            if compress and batch.raw_data_bytes and level is not None and self._zstd:
                pending = loop.run_in_executor(self._zstd, codec.compress_batch, batch, level)
            out.append(_RamBatch(pending, position - start))
        return out

    def _drop_a_page(self, pages: Pages) -> Pages:
        """The negative control (test only): lose one page the guest rewrote late, from the
        first copy whose content the destination does not hold yet on, every copy of it.

        One copy alone may be lost to nothing: QEMU re-sends a page rewritten after it read
        it, and the last section may carry no page of the working set at all (a switchover
        right after a dirty sync). Dropping every later copy too leaves the destination
        with content the guest has since rewritten, whenever the switchover comes."""
        dropped = self._dropped_page
        if dropped is None:
            hashes = self._sent_hashes
            for index, offset in zip(pages.indices, pages.offsets, strict=True):
                held = hashes[index * HASH_SIZE:(index + 1) * HASH_SIZE]
                if (offset != ZERO_PAGE_OFFSET and index >= faults.DROP_PAGE_FROM
                        and codec.block_hash(pages.data[offset:offset + PAGE_SIZE]) != held):
                    self._dropped_page = dropped = index
                    log.warning("%s: injected fault: page %d not sent (nor any later copy)",
                                self.label, index)
                    break
            else:
                return pages
        keep = [k for k, index in enumerate(pages.indices) if index != dropped]
        if len(keep) == len(pages):
            return pages
        return dataclasses.replace(
            pages, indices=memoryview(array.array("Q", [pages.indices[k] for k in keep])),
            offsets=memoryview(array.array("Q", [pages.offsets[k] for k in keep])))

    async def _send_all(self, out: list[Outgoing]) -> None:
        assert self._compression is not None
        for item in out:
            if isinstance(item, _RamDone):
                await self._ram_done()
                continue
            if isinstance(item, _RamBatch):
                batch = (item.batch if isinstance(item.batch, codec.EncodedBatch)
                         else await item.batch)
                self._compression.encoded(batch.raw_data_bytes, batch.nbytes,
                                          batch.compressed)
                self.counters.add(batch, item.records)
                if batch.entry_count:
                    await self._send(Kind.RAM_BATCH, batch.payload)
            else:
                kind, payload = item
                await self._send(kind, payload)
                self.counters.forward_bytes += len(payload)
            await self._emit()
        self._sent_all_at = time.monotonic()

    async def _ram_done(self) -> None:
        """RAM's last section is out: the disks' final round must be too before device
        state follows, since the destination feeds it to QEMU only after RAM_DONE."""
        self._mark("ram_sent")
        if self.storage is not None and self.storage.disks:
            await self._disks_final.wait()
            self._mark("disks_sent")
        assert self.link is not None
        await send_control(self.link, Op.RAM_DONE, pages=self.counters.pages_sent)

    async def _send(self, kind: Kind, payload: bytes | memoryview) -> None:
        """Send one message, unless the destination already reported a failure; then keep
        the wire rate under --bandwidth."""
        assert self.link is not None
        if self.inbox is not None:
            self.inbox.check()
        started = time.monotonic()
        await self.link.send(kind, payload)
        if kind is Kind.RAM_BATCH and self._compression is not None:
            self._compression.waited(time.monotonic() - started)
        self.counters.sent_bytes += len(payload)
        await self._pace(len(payload))

    async def _pace(self, nbytes: int) -> None:
        """Sleep as needed to keep the wire rate under the job's and the agent's caps."""
        wait = max(pacer.take(nbytes) for pacer in self._pacers())
        if wait > 0:
            await asyncio.sleep(wait)

    def _pacers(self) -> tuple[Pacer, ...]:
        if self.pacer is None:
            self.pacer = Pacer(self.options.bandwidth)
        return (self.pacer,) if self.agent_pacer is None else (self.pacer, self.agent_pacer)

    def bandwidth_cap(self) -> int | None:
        """The rate the job may send at now: the lower of its caps (None: uncapped)."""
        rates = [p.rate for p in self._pacers() if p.rate is not None]
        return min(rates) if rates else None

    # ------------------------------------------------------------------ QEMU's side

    async def _watch_stop(self, mark: int) -> None:
        """The guest stopped for the switchover: the downtime starts here."""
        assert self.qmp is not None
        stop = await self.qmp.wait_event("STOP", after=mark, timeout=WATCH_FOREVER_S)
        self.stop_us = stop.timestamp_us
        if self._compression is not None:
            self._compression.pause()
        if self.phases.phase in (Phase.PRECOPY, Phase.THROTTLING):
            self.phases.advance(Phase.STOP_AND_COPY)
        self._journal(journal.Step.STOPPED)
        await self._emit(force=True)

    async def _watch(self, mark: int) -> None:
        """Follow QEMU's migration: progress, throttling, the time budget, pre-switchover."""
        assert self.qmp is not None
        while True:
            info: dict[str, Any] = await self.qmp.execute("query-migrate")
            if self._note_query(info):
                await self._update_downtime_limit()
            status = info.get("status")
            if status in ("failed", "cancelled"):
                raise QemuError(f"the source QEMU's migration {status}: "
                                f"{info.get('error-desc', 'no detail')}")
            if status == "pre-switchover":
                if faults.Fault.PRE_SWITCHOVER in self.faults:
                    raise LocalError("injected fault: failure in pre-switchover")
                self._switchover_started.set()
            self.throttle_pct = int(info.get("cpu-throttle-percentage", 0) or 0)
            self.throttle_max = max(self.throttle_max, self.throttle_pct)
            if self.throttle_pct and self.phases.phase is Phase.PRECOPY:
                self.phases.advance(Phase.THROTTLING)
                log.info("%s: QEMU throttles the guest (%d%%)", self.label,
                         self.throttle_pct)
            await self._check_budget()
            await self._emit()
            if status == "completed":
                return
            mark = self.qmp.event_mark()
            with contextlib.suppress(QemuError):
                await self.qmp.wait_event("MIGRATION", after=mark, timeout=PROGRESS_INTERVAL_S)

    def _note_query(self, info: dict[str, Any]) -> bool:
        """Keep QEMU's figures; True when a new iteration began (a dirty-log sync)."""
        self._last_query = info
        syncs = int((info.get("ram") or {}).get("dirty-sync-count") or 0)
        if syncs > self.iterations:
            self.iterations = syncs
            return True
        return False

    async def _check_budget(self) -> None:
        """Past --timeout in pre-copy: abort (the source keeps running) or force."""
        if self.phases.phase not in (Phase.PRECOPY, Phase.THROTTLING):
            return
        if time.monotonic() - self.started <= self.options.timeout_s or self._forced:
            return
        ram = self._last_query.get("ram", {})
        if self.options.timeout_action is TimeoutAction.ABORT:
            raise ConvergenceTimeout(
                f"pre-copy did not converge within {self.options.timeout_s:g} s "
                f"({int(ram.get('remaining', 0)) >> 20} MiB still dirty after "
                f"{int(ram.get('dirty-sync-count', 0))} iterations, dirtied at "
                f"{int(ram.get('dirty-pages-rate', 0)) * PAGE_SIZE >> 20} MiB/s); raise "
                f"--timeout or --bandwidth, or use --timeout-action force to accept a "
                f"longer downtime")
        log.warning("%s: pre-copy did not converge within %g s; switching over "
                    "with no downtime limit (--timeout-action force)", self.label,
                    self.options.timeout_s)
        self._forced = True
        await self._update_downtime_limit()

    async def _disks_at_switchover(self, rounds: asyncio.Task[None]) -> None:
        """Once QEMU pauses in pre-switchover (guest stopped, END and device state not yet
        sent): close the disks' last bitmaps, let QEMU go on, then (after the round under
        way, if any) read them while it sends."""
        assert self.qmp is not None and self.storage is not None
        await self._switchover_started.wait()
        self._mark("pre_switchover")
        await self.storage.seal_final_round()
        await self.qmp.execute("migrate-continue", {"state": "pre-switchover"})
        self._mark("continued")
        await rounds   # it stops after its current round, once the switchover started
        await self._send_disk_round(first=False, final=True)
        self._disks_final.set()

    async def _disks_before_ram(self) -> None:
        """Round 0, then rounds (the guest's writes capped where they outpace the copy)
        until what the disks leave fits their share of the pause: RAM's pre-copy then
        starts with the disks nearly in sync, and its switchover does not wait on a long
        final disk round (QEMU's downtime limit cannot hold it in pre-copy for long)."""
        assert self.storage is not None
        pause = (1 - MIN_RAM_SHARE) * self.options.downtime_ms / 1000
        rate, first = 0.0, True
        for _ in range(MAX_DISK_ROUNDS_BEFORE_RAM):
            started = time.monotonic()
            rate = max(rate, await self._send_disk_round(first=first, final=False))
            first = False
            await self.storage.converge(time.monotonic() - started, rate, pause,
                                        self._journal)
            dirty = await self.storage.dirty_bytes()
            # A rate of 0: the rounds moved too little to time (under 1 MiB): close enough.
            if dirty == 0 or rate == 0 or dirty / rate <= pause:
                return

    async def _disk_rounds(self) -> None:
        """Bitmap rounds while QEMU iterates; QEMU's downtime limit leaves room for the
        final round (held at its minimum while that would take most of the pause)."""
        assert self.storage is not None
        rate = 0.0
        requested = self.options.downtime_ms / 1000
        while not self._switchover_started.is_set():
            started = time.monotonic()
            rate = max(rate, await self._send_disk_round(first=False, final=False))
            if not self._switchover_started.is_set():
                # A guest that dirties its disk faster than the rounds copy it gets its
                # writes capped, as auto-converge slows its vCPUs (disk_throttle).
                await self.storage.converge(time.monotonic() - started, rate,
                                            (1 - MIN_RAM_SHARE) * requested,
                                            self._journal)
            dirty = await self.storage.dirty_bytes()
            self._disk_budget_s = ram_downtime_s(requested, dirty, rate)
            await self._update_downtime_limit()
            if not dirty:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._switchover_started.wait(), 0.1)

    async def _send_disk_round(self, *, first: bool, final: bool) -> float:
        """One round of every copied disk's changed blocks; its rate in bytes per second
        (0 when it moved too little to tell)."""
        assert self.storage is not None
        start, before = time.monotonic(), self.counters.disk_wire_bytes
        async for payload in self.storage.round_batches(first=first, final=final):
            await self._send(Kind.DISK_BATCH, payload)
            self.counters.disk_wire_bytes += len(payload)
            await self._emit()
        seconds, moved = time.monotonic() - start, self.counters.disk_wire_bytes - before
        return moved / seconds if seconds > 0.01 and moved > (1 << 20) else 0.0

    def _mark(self, step: str) -> None:
        """Note when a switchover step ended, in ms after the source's STOP event."""
        if self.stop_us is not None:
            self.switchover[step] = round(time.time() * 1000 - self.stop_us / 1000, 1)

    # ------------------------------------------------------------------ commit

    async def _commit(self) -> None:
        """Hand the VM over; from here the source never resumes on its own."""
        assert self.link is not None and self.qmp is not None and self.inbox is not None
        # Journaled before COMMIT can leave: a restarted agent then asks the destination
        # instead of resuming. Should the journal fail, COMMIT never left: roll back.
        self._journal(journal.Step.COMMITTING)
        self.phases.advance(Phase.COMMITTING)
        await send_control(self.link, Op.COMMIT)
        reply = await self.inbox.expect({Op.COMMITTED}, timeout=self.config.link_timeout_s,
                                        what="destination resuming the VM")
        # The destination runs the VM now: a garbled figure in its reply must not make the
        # outcome unknown.
        self.resume_us = reply.int_field("resume_us", strict=False) or None
        self._mark("committed")
        self.dest_pid = reply.int_field("dest_pid", strict=False) or self.dest_pid
        window = reply.body.get("health_window_s")
        if isinstance(window, (int, float)) and not isinstance(window, bool) and window > 0:
            self._dest_window_s = min(float(window), MAX_HEALTH_WINDOW_S)
        self._journal(journal.Step.COMMITTED)   # from here a restart quits our QEMU
        with contextlib.suppress(QemuError):
            await self.qmp.quit()
        self.qmp = None
        self._forget_source_vm()

    async def _await_health(self) -> None:
        """The destination's HEALTH (the guest's pace after the resume), waited for at most
        its health window plus a margin. The VM has moved: whatever happens here the job
        stays completed, and a reply that does not come leaves the health unknown."""
        assert self.sampler is not None and self.inbox is not None
        self.sampler.finish()       # the source QEMU has quit: nothing more to sample here
        before, throttled = pace_before(self.sampler.series)
        window = self._dest_window_s
        if window <= 0:
            self.health = health(before, None, window_s=0.0, before_throttled=throttled,
                                 reason="the destination does not watch the guest after "
                                        "the resume (its health_window_s is 0)")
            return
        waited = time.monotonic()
        expect = asyncio.create_task(self.inbox.expect(
            {Op.HEALTH}, timeout=window + HEALTH_MARGIN_S,
            what="the destination watching the guest"))
        cancelled = asyncio.create_task(self.cancel.wait())
        try:
            # A cancel (or the agent stopping) ends the wait: the VM has moved already.
            await asyncio.wait({expect, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if not expect.done():
                raise LocalError("the job was cancelled before the destination's reply")
            reply = expect.result()
            after = peer_number(reply.body.get("pace"))
            self._dest_samples = destination_rows(reply.body.get("samples"))
            self.health = health(before, after, window_s=window, before_throttled=throttled)
        except (FerryError, ConnectionError, OSError) as exc:
            log.warning("%s: no health reply: %s", self.label, exc)
            self.health = health(before, None, window_s=window, before_throttled=throttled,
                                 reason=f"no health reply from the destination: {exc}")
        finally:
            for task in (expect, cancelled):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, FerryError):
                    await task
            self.health_wait_ms = round((time.monotonic() - waited) * 1000, 1)
        log.info("%s: guest pace after the resume %s", self.label, self.health.get("verdict"))

    def _forget_source_vm(self) -> None:
        """The VM left this host: drop its record and what ferry made for it."""
        if self.vm_name is not None:
            vms.release_departed(self.config, self.vm_name)

    # ------------------------------------------------------------------ rollback

    async def _roll_back(self, outcome: Phase, why: str) -> None:
        """Source keeps running; destination removes its copy. Best effort on each step."""
        self.phases.advance(Phase.ROLLING_BACK)
        log.info("%s: rolling back (%s)", self.label, why)
        if self.link is not None:
            with contextlib.suppress(FerryError, ConnectionError, OSError):
                await send_control(self.link, Op.ABORT, reason=why)
                if self.inbox is not None:
                    await self.inbox.expect({Op.ABORTED}, timeout=ABORT_TIMEOUT_S,
                                            what="destination rolling back")
        if self.qmp is not None:
            try:
                if self.migrate_started:
                    await qemu_migrate.cancel_migration(self.qmp)
                status = (await self.qmp.execute("query-status")).get("status")
                if status != "running":
                    await self.qmp.execute("cont")
            except QemuError as exc:
                log.error("%s: could not resume the source VM: %s", self.label, exc)
        self.phases.advance(outcome)

    async def _release(self) -> None:
        if self._zstd is not None:
            self._zstd.shutdown(wait=False, cancel_futures=True)
        if self.inbox is not None:
            await self.inbox.close()
        if self.link is not None:
            with contextlib.suppress(FerryError, ConnectionError, OSError):
                await self.link.close()
        if self.storage is not None and self.qmp is not None:
            await self.storage.close()
        if self.qmp is not None:
            with contextlib.suppress(QemuError):
                await self.qmp.disconnect()
        if self._listener is not None:
            self._listener.close()
        if self.migrate_socket is not None:
            self.migrate_socket.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reporting

    def _sample_figures(self) -> dict[str, Any]:
        """The job's own figures for the timeline (agent.migration.timeline)."""
        ram = self._last_query.get("ram", {})
        remaining = ram.get("remaining")
        dirty = _dirty_pages_rate(self._last_query)
        return {"phase": self.phases.phase.value, "wire_bytes": self.counters.total_wire_bytes,
                "remaining_bytes": int(remaining) if remaining is not None else None,
                "dirty_bps": round(dirty * PAGE_SIZE) if dirty is not None else None,
                "throttle": self.throttle_pct / 100}

    def timeline(self) -> dict[str, Any] | None:
        """The report's timeline: the source's samples, the downtime window (STOP and
        RESUME, seconds after the job began) and the destination's samples on the same
        axis."""
        if self.sampler is None:
            return None
        wall = self.sampler.wall_started
        stop_s = round(self.stop_us / 1e6 - wall, 3) if self.stop_us else None
        resume_s = round(self.resume_us / 1e6 - wall, 3) if self.resume_us else None
        destination = [[round(resume_s + row[0], 3), *row[1:]] for row in self._dest_samples
                       ] if resume_s is not None else []
        return {**self.sampler.to_json(), "marks": {"stop_s": stop_s, "resume_s": resume_s},
                "destination": {"fields": list(DESTINATION_FIELDS), "samples": destination}}

    async def _emit(self, *, force: bool = False) -> None:
        """Send a progress event (at most every PROGRESS_INTERVAL_S unless forced)."""
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        elapsed = now - self.started
        c = self.counters
        ram = self._last_query.get("ram", {})
        event: dict[str, Any] = {
            "event": "progress", "phase": self.phases.phase.value,
            "round": self.iterations,
            "elapsed_s": round(elapsed, 3), "pages_sent": c.pages_sent,
            "wire_bytes": c.sent_bytes,
            "throughput_bps": round(c.sent_bytes / elapsed) if elapsed > 0 else 0,
        }
        if "remaining" in ram:
            remaining = int(ram["remaining"])
            dirty_rate = _dirty_pages_rate(self._last_query)
            event["pages_left"] = remaining // PAGE_SIZE
            event["remaining_bytes"] = remaining
            if dirty_rate is not None:
                event["dirty_pages_per_s"] = round(dirty_rate)
            # QEMU's own rate on our socket (stream bytes, before dedup and compression).
            rate = c.stream_bytes / elapsed if elapsed > 0 else 0.0
            eta = self._eta.update(remaining, rate, (dirty_rate or 0.0) * PAGE_SIZE)
            if eta is not None:
                event["eta_s"] = round(eta, 2)
        if self.throttle_pct:
            event["throttle"] = self.throttle_pct / 100
        cap = self.bandwidth_cap()
        if cap is not None:
            event["bandwidth_cap_bps"] = cap
        with contextlib.suppress(Exception):
            await self.progress(event)

    @property
    def label(self) -> str:
        """What each log line of this job starts with: its id, its VM and its peer."""
        vm_name = self.vm_name or (self.info.name if self.info else None) or self.qmp_path
        return f"migration {self.job_id} of {vm_name} to {self.peer}"

    def report(self, error: str | None, reason: str | None = None) -> dict[str, Any]:
        """The final report (the JSON object `ferry migrate --json` prints last); `reason`
        is the error's closed-set family (errors.failure_reason)."""
        phase = self.phases.phase
        status = {Phase.COMPLETED: "completed", Phase.CANCELLED: "cancelled",
                  Phase.UNKNOWN: "unknown"}.get(phase, "failed")
        c = self.counters
        downtime_ms = ((self.resume_us - self.stop_us) / 1000
                       if self.resume_us and self.stop_us else None)
        return {
            "event": "result", "status": status, "phase": phase.value,
            "error": error if status != "completed" else None,
            "error_reason": reason if status != "completed" else None,
            "job": self.job_id, "vm": self.vm_name or (self.info.name if self.info else None),
            "peer": self.peer,
            # Until the guest resumed at the destination (the health wait is apart).
            "total_ms": round(((self._ended or time.monotonic()) - self.started) * 1000, 1),
            "downtime_ms": round(downtime_ms, 1) if downtime_ms is not None else None,
            "rounds": self.iterations,
            "sections": self.sections,
            "qemu_downtime_ms": self._last_query.get("downtime"),
            "ram_bytes": self.info.ram_size if self.info else 0,
            "ram_block": self.info.ram_block if self.info else None,
            "pages_sent": c.pages_sent, "zero_pages": c.zero_pages,
            "dedup_pages": c.dedup_pages, "data_pages": c.data_pages,
            "unchanged_pages": c.unchanged_pages,
            "wire_bytes": c.total_wire_bytes,
            "ram_wire_bytes": c.wire_bytes,
            "stream_bytes": c.stream_bytes, "stream_reads": c.stream_reads,
            "disk_bytes": c.disk_wire_bytes,
            "disks": self.storage.report() if self.storage else [],
            "device_state_bytes": c.device_state_bytes,
            "compression": str(self.options.compress),
            "compressed_batches": c.compressed_batches,
            "compression_seen": self._compression.seen() if self._compression else {},
            "compression_ratio": round(c.raw_data_bytes / max(1, c.wire_bytes), 3)
            if c.wire_bytes else 1.0,
            "dest_pid": self.dest_pid if status == "completed" else None,
            "dest_widened": self.dest_widened,
            "throttle": self.throttle_max / 100,
            "switchover_ms": self.switchover,
            "resume_us": self.resume_us,
            "reconnects": self.resumable.counters.reconnects if self.resumable else 0,
            "resent_bytes": self.resumable.counters.resent_bytes if self.resumable else 0,
            "resume_saved_bytes": (self.resumable.counters.saved_bytes
                                   if self.resumable else 0),
            "nics": [n.to_json() for n in self.nics],
            "health": self.health,
            "health_wait_ms": self.health_wait_ms,
            "timeline": self.timeline(),
        }


async def _first_failure(main: asyncio.Task[None], helpers: list[asyncio.Task[None]]) -> None:
    """Wait for `main`; a helper that fails first fails it (and is raised)."""
    watched = {main, *helpers}
    while True:
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if main in done:
            main.result()
            return
        for task in done:
            watched.discard(task)
            if not task.cancelled() and task.exception() is not None:
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError, FerryError):
                    await main
                raise task.exception()  # type: ignore[misc]


def _dirty_pages_rate(info: dict[str, Any]) -> float | None:
    """QEMU's dirty rate in pages per second (query-migrate's `info`), or None: before
    its second dirty-log sync (it measures between two syncs, so the 0 it reports until
    then means "not yet") and once the guest stopped for the switchover (the 0 it reports
    at the end is the count its final sync started, not a rate)."""
    ram = info.get("ram", {})
    if info.get("status") != "active" or int(ram.get("dirty-sync-count") or 0) < 2:
        return None
    return float(ram.get("dirty-pages-rate") or 0)
