"""The source's side of one migration: pre-copy rounds, switchover, commit or roll back.

Safety (DESIGN §2): at most one copy of the VM runs, and one can always run. Until COMMIT
is sent, every failure, a lost link or a cancel resumes the source VM and tells the
destination to remove its copy. Once COMMIT is sent the source never resumes by itself;
if the destination's answer is lost the job ends UNKNOWN with the source stopped.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import mmap
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.batch import codec
from agent.errors import FerryError, LocalError, QemuError, UserError
from agent.memory import scan
from agent.memory.prefault import coarse_extents
from agent.memory.tracker import HashScanTracker
from agent.migration.convergence import ConvergencePolicy, Decision, RoundStats, TimeoutAction
from agent.migration.link import Inbox, Link, send_control
from agent.migration.protocol import Kind, Op
from agent.migration.states import Phase, PhaseTracker
from agent.migration.throttle import Throttle
from agent.qemu import vm
from agent.qemu import qmp as qmp_mod
from agent.qemu.migrate import enable_capabilities, wait_migration_done
from agent.qemu.vmspec import PAGE_SIZE, VmSpec
from agent.state import journal, vms
from agent.state.config import AgentConfig
from agent.storage.disk_source import StorageSource, copyable_disks

log = logging.getLogger(__name__)

PREPARE_TIMEOUT_S = 60.0
LOADED_TIMEOUT_S = 60.0
COMMIT_TIMEOUT_S = 30.0
ABORT_TIMEOUT_S = 5.0
DEVICE_STATE_CHUNK = 256 << 10
# QEMU's default max-bandwidth (128 MiB/s in 7.2) would pace even the device state.
QEMU_MAX_BANDWIDTH = 1 << 40
PROGRESS_INTERVAL_S = 0.25
# The final scan runs in this many parts so that sending overlaps hashing.
FINAL_SCAN_PARTS = 4
# Below this the countdown has run out before the work did (a later round found more
# dirty pages than predicted); progress then shows no ETA rather than a stuck zero.
ETA_FLOOR_S = 0.05

class ConvergenceTimeout(UserError):
    """Pre-copy ran out of its time budget without converging (timeout action: abort)."""


Progress = Callable[[dict[str, Any]], Awaitable[None]]
ConnectPeer = Callable[[str], Awaitable[Link]]


@dataclass(frozen=True, slots=True)
class MigrationOptions:
    """What the user asked for (CLI flags), with the defaults of DESIGN §2."""

    downtime_ms: int = 300
    bandwidth: int | None = None          # bytes per second on the wire; None: unlimited
    compress_level: int | None = None     # zstd level; None: off
    dedup: bool = True
    timeout_s: float = 120.0
    timeout_action: TimeoutAction = TimeoutAction.ABORT
    threads: int | None = None            # scanner threads; None: all cores
    storage: str = "copy"                 # copy: copy writable disks; shared: same paths
    disk_map: tuple[str, ...] = ()        # SRC=DST target paths on the destination
    disk_format: str | None = None        # convert copied disks to this format

    @staticmethod
    def parse_compress(text: str, bandwidth: int | None) -> int | None:
        """`off`, `zstd:N`, or `auto` (zstd:1 when the link is slower than zstd, else off)."""
        if text == "off":
            return None
        if text == "auto":
            # zstd level 1 runs at ~0.5-0.75 GB/s per core here: it pays only when the link
            # is slower than that; on a fast link it would become the bottleneck.
            return 1 if bandwidth is not None and bandwidth < 400_000_000 else None
        if text.startswith("zstd:"):
            try:
                level = int(text[5:])
            except ValueError:
                level = 0
            if -7 <= level <= 19 and level != 0:
                return level
        raise UserError(f"bad --compress {text!r}: use auto, off or zstd:N (N from -7 to 19)")


@dataclass
class Counters:
    """What went over the wire, for the report."""

    rounds: int = 0
    pages_sent: int = 0
    zero_pages: int = 0
    dedup_pages: int = 0
    data_pages: int = 0
    unchanged_pages: int = 0
    raw_data_bytes: int = 0
    wire_bytes: int = 0
    device_state_bytes: int = 0
    disk_wire_bytes: int = 0

    def add(self, batch: codec.EncodedBatch) -> None:
        self.pages_sent += batch.entry_count
        self.zero_pages += batch.zero_count
        self.dedup_pages += batch.copy_count
        self.data_pages += batch.data_count
        self.unchanged_pages += batch.unchanged_count
        self.raw_data_bytes += batch.raw_data_bytes
        self.wire_bytes += batch.nbytes


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
    ram: mmap.mmap | None = None
    ram_fd: int = -1
    tracker: HashScanTracker | None = None
    encoder: codec.BatchEncoder | None = None
    throttle: Throttle | None = None
    storage: StorageSource | None = None
    migrate_socket: Path | None = None
    migrate_started: bool = False
    stop_us: int | None = None
    resume_us: int | None = None
    dest_pid: int | None = None
    started: float = field(default_factory=time.monotonic)
    _eta: float | None = None
    _eta_at: float = 0.0
    _dirty_rate: float | None = None
    _last_progress: float = 0.0
    _migrate_writer: asyncio.StreamWriter | None = None
    _ram_done: asyncio.Event = field(default_factory=asyncio.Event)
    switchover: dict[str, float] = field(default_factory=dict)
    _ram_extents: list[tuple[int, int]] = field(default_factory=list)

    # ------------------------------------------------------------------ driver

    async def run(self) -> dict[str, Any]:
        """Run the job to its end and return the report; raises only CancelledError."""
        body = asyncio.create_task(self._migrate(), name=f"migrate-{self.job_id}")
        cancel_wait = asyncio.create_task(self.cancel.wait())
        error: str | None = None
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
                log.exception("migration %s: unexpected error", self.job_id)
                exc = LocalError(f"internal error: {exc!r}")
            if self.inbox is not None:
                exc = await self.inbox.explain(exc)
            error = str(exc)
            log.error("migration %s of %s failed: %s", self.job_id, self.qmp_path, exc)
            log.debug("traceback", exc_info=True)
            if self.phases.may_roll_back:
                await self._roll_back(Phase.FAILED, error)
            elif self.phases.phase is Phase.COMMITTING:
                self.phases.advance(Phase.UNKNOWN)
        finally:
            cancel_wait.cancel()
            await self._release()
            if self.phases.phase is not Phase.UNKNOWN:
                journal.remove(self.config, self.job_id)
        return self.report(error)

    async def _migrate(self) -> None:
        await self._prepare()
        self.phases.advance(Phase.PRECOPY)
        await self._precopy()
        self.phases.advance(Phase.STOP_AND_COPY)
        await self._switchover()
        self.phases.advance(Phase.COMMITTING)
        await self._commit()
        self.phases.advance(Phase.COMPLETED)
        await self._emit(force=True)

    # ------------------------------------------------------------------ prepare

    async def _prepare(self) -> None:
        self.qmp = await qmp_mod.connect(self.qmp_path)
        self.info = info = await vm.describe_vm(self.qmp_path, qmp=self.qmp)
        if self.options.storage not in ("copy", "shared"):
            raise UserError(f"bad --storage {self.options.storage!r}: use copy or shared")
        disks = await copyable_disks(self.qmp) if self.options.storage == "copy" else ()
        spec = VmSpec(name=self.vm_name or info.name, argv=info.argv[1:],
                      ram_size=info.ram_size, ram_backend_id=info.ram_backend_id, disks=disks)
        status = (await self.qmp.execute("query-status")).get("status")
        if status != "running":
            raise UserError(f"VM {spec.name} is {status}, not running; resume it first")
        self.ram_fd = os.open(info.ram_path, os.O_RDONLY)
        self.ram = mmap.mmap(self.ram_fd, info.ram_size, mmap.MAP_SHARED, mmap.PROT_READ)
        self.tracker = HashScanTracker(self.ram, threads=self.options.threads, fd=self.ram_fd)
        self.encoder = codec.BatchEncoder(self.ram, PAGE_SIZE, self.tracker.sent_hashes,
                                          dedup=self.options.dedup,
                                          compress_level=self.options.compress_level)
        await self.qmp.execute("migrate-set-capabilities", enable_capabilities())
        await self.qmp.execute("migrate-set-parameters", {"max-bandwidth": QEMU_MAX_BANDWIDTH})
        await self._emit(force=True)
        self.link = await self.connect_peer(self.peer)
        self.inbox = Inbox(self.link)
        # Where the RAM file holds data: the destination populates those pages early.
        self._ram_extents = scan.data_extents(self.ram_fd, info.ram_size)
        extents = coarse_extents(self._ram_extents)
        await send_control(self.link, Op.PREPARE, vm=spec.to_json(), job=self.job_id,
                           ram_extents=extents, disk_map=list(self.options.disk_map),
                           disk_format=self.options.disk_format)
        reply = await self.inbox.expect({Op.PREPARED}, timeout=PREPARE_TIMEOUT_S,
                                        what="preparing the destination")
        self.dest_pid = int(reply.body.get("dest_pid", 0)) or None
        self.throttle = Throttle(self.qmp)
        self._journal(journal.Step.PRECOPY)
        self.storage = StorageSource(self.qmp, disks, self.config.run_dir / f"{self.job_id}.nbd",
                                     self.job_id, dedup=self.options.dedup,
                                     compress_level=self.options.compress_level)
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        await self.storage.start()  # bitmaps record writes from here on
        log.info("migration %s: destination ready after %.0f ms (QEMU pid %s)", self.job_id,
                 (time.monotonic() - self.started) * 1000, self.dest_pid)

    def _journal(self, step: journal.Step) -> None:
        """Record how far the job got, for an agent restarted after a crash."""
        journal.write(self.config, journal.Entry(
            job=self.job_id, role="source", step=step, vm=self.vm_name or "",
            qmp_path=str(self.qmp_path), peer=self.peer))

    # ------------------------------------------------------------------ pre-copy

    async def _precopy(self) -> None:
        assert self.tracker is not None and self.throttle is not None
        policy = ConvergencePolicy(downtime_limit_s=self.options.downtime_ms / 1000,
                                   timeout_s=self.options.timeout_s,
                                   timeout_action=self.options.timeout_action)
        # Round 0 needs no scan: every page that may hold data goes to the encoder, which
        # hashes its copy anyway and skips pages still zero (what the destination holds).
        dirty, scan_s = self._data_pages(), 0.0
        disk_rate = 0.0   # bytes per second the disk rounds achieved (best so far)
        while True:
            round_start = time.monotonic()
            send_s = await self._send_round(dirty)
            disk_rate = max(disk_rate, await self._send_disk_round(
                first=self.counters.rounds == 0, final=False))
            await send_control(self.link, Op.ROUND, index=self.counters.rounds,
                               pages=len(dirty))
            stats = RoundStats(index=self.counters.rounds, dirty_pages=len(dirty),
                               scan_s=scan_s, send_s=send_s,
                               elapsed_s=time.monotonic() - round_start + scan_s)
            self.counters.rounds += 1
            log.info("migration %s round %d: %d pages in %.0f ms after a %.0f ms scan",
                     self.job_id, stats.index, stats.dirty_pages, send_s * 1000, scan_s * 1000)
            dirty, scan_s = await self._scan()
            # The disks' last round adds to the stop-and-copy time (counted with the scan);
            # before any rate is known, a second stands for it.
            disk_dirty = await self.storage.dirty_bytes() if self.storage else 0
            disk_final_s = (disk_dirty / disk_rate if disk_rate else 1.0) if disk_dirty else 0.0
            decision = policy.observe(stats, time.monotonic() - self.started, len(dirty),
                                      scan_s + disk_final_s)
            self._dirty_rate = len(dirty) / max(stats.elapsed_s, 1e-3)
            await self._emit(pages_left=len(dirty), policy=policy)
            if decision is Decision.SWITCHOVER:
                return
            if decision is Decision.ABORT:
                raise ConvergenceTimeout(
                    f"pre-copy did not converge within {self.options.timeout_s:g} s "
                    f"({len(dirty)} pages still dirty, predicted downtime "
                    f"{policy.predicted_downtime_s(len(dirty), scan_s) * 1000:.0f} ms > "
                    f"{self.options.downtime_ms} ms); use --timeout-action force to accept "
                    f"a longer downtime")
            if decision is Decision.THROTTLE:
                if self.phases.phase is Phase.PRECOPY:
                    self.phases.advance(Phase.THROTTLING)
                log.info("migration %s: throttling guest to %.0f%% stopped", self.job_id,
                         policy.throttle_share * 100)
                self.throttle.set_share(policy.throttle_share)

    def _data_pages(self) -> array.array[int]:
        """Indices of the pages inside the RAM file's data extents at prepare time (holes
        read as zero; pages written since are found by the next scan)."""
        assert self.info is not None
        return scan.run_indices(scan.extent_pages(self._ram_extents,
                                                  self.info.ram_size // PAGE_SIZE))

    async def _scan(self) -> tuple[Any, float]:
        """Dirty pages now, and how long finding them took (in a worker thread)."""
        assert self.tracker is not None
        start = time.monotonic()
        dirty = await asyncio.get_running_loop().run_in_executor(None, self.tracker.collect)
        return dirty, time.monotonic() - start

    async def _send_round(self, dirty: Any) -> float:
        """Encode and send the pages in `dirty`; the next batch encodes while one is sent."""
        assert self.encoder is not None and self.link is not None
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        total = len(dirty)
        pending = loop.run_in_executor(None, self.encoder.encode, dirty, 0) if total else None
        while pending is not None:
            batch, position = await pending
            pending = (loop.run_in_executor(None, self.encoder.encode, dirty, position)
                       if position < total else None)
            if batch.entry_count:
                await self._send(Kind.RAM_BATCH, batch.payload)
                self.counters.add(batch)
            await self._emit(pages_left=total - position)
            self._check_deadline(total - position)
        return time.monotonic() - start

    async def _send_disk_round(self, *, first: bool, final: bool) -> float:
        """One round of every copied disk's changed blocks; its rate in bytes per second
        (0 when it moved too little to tell)."""
        if self.storage is None or not self.storage.disks:
            return 0.0
        start, before = time.monotonic(), self.counters.disk_wire_bytes
        async for payload in self.storage.round_batches(first=first, final=final):
            await self._send(Kind.DISK_BATCH, payload)
            self.counters.disk_wire_bytes += len(payload)
            await self._emit()
        seconds, moved = time.monotonic() - start, self.counters.disk_wire_bytes - before
        return moved / seconds if seconds > 0.01 and moved > (1 << 20) else 0.0

    async def _send(self, kind: Kind, payload: bytes | memoryview) -> None:
        """Send one batch, unless the destination already reported a failure; then keep
        the wire rate under --bandwidth."""
        assert self.link is not None
        if self.inbox is not None:
            self.inbox.check()
        await self.link.send(kind, payload)
        await self._pace()

    def _check_deadline(self, pages_left: int) -> None:
        """Abort a pre-copy round that overruns the time budget (rounds on a slow link can
        be long); with --timeout-action force the round finishes and switchover follows."""
        if (self.phases.phase in (Phase.PRECOPY, Phase.THROTTLING)
                and self.options.timeout_action is TimeoutAction.ABORT
                and time.monotonic() - self.started > self.options.timeout_s):
            raise ConvergenceTimeout(
                f"pre-copy did not converge within {self.options.timeout_s:g} s "
                f"({pages_left} pages of this round still to send); raise --timeout, "
                f"--bandwidth, or use --timeout-action force to accept a longer downtime")

    async def _pace(self) -> None:
        """Sleep as needed to keep the wire rate under --bandwidth."""
        if self.options.bandwidth is None:
            return
        sent = self.counters.wire_bytes + self.counters.disk_wire_bytes
        ahead = sent / self.options.bandwidth - (time.monotonic() - self.started)
        if ahead > 0:
            await asyncio.sleep(ahead)

    # ------------------------------------------------------------------ switchover

    async def _switchover(self) -> None:
        """Stop the guest, send the last pages while QEMU streams its device state."""
        assert self.qmp is not None and self.throttle is not None and self.link is not None
        await self.throttle.stop()
        self._journal(journal.Step.STOPPED)
        mark = self.qmp.event_mark()
        await self.qmp.execute("stop")
        stop = await self.qmp.wait_event("STOP", after=mark, timeout=10)
        self.stop_us = stop.timestamp_us
        await self._emit(force=True)
        tunnel = asyncio.create_task(self._tunnel_device_state(), name="device-state")
        try:
            pages = await self._final_ram_round()
            self._mark("pages_sent")
            log.info("migration %s final round: %d pages, sent %.0f ms after stop", self.job_id,
                     pages, self.switchover["pages_sent"])
            await self._send_disk_round(first=False, final=True)
            self.counters.rounds += 1
            await send_control(self.link, Op.RAM_DONE, pages=self.counters.pages_sent)
            self._mark("ram_done")
            self._ram_done.set()
            await tunnel
            self._mark("device_state_sent")
        finally:
            if not tunnel.done():
                tunnel.cancel()
                with contextlib.suppress(asyncio.CancelledError, FerryError):
                    await tunnel
        await self.inbox.expect({Op.LOADED}, timeout=LOADED_TIMEOUT_S,
                                what="destination loading the device state")
        self._mark("loaded")
        log.info("migration %s: device state (%d bytes) loaded %.0f ms after stop",
                 self.job_id, self.counters.device_state_bytes, self.switchover["loaded"])

    def _mark(self, step: str) -> None:
        """Note when a switchover step ended, in ms after the source's STOP event."""
        if self.stop_us is not None:
            self.switchover[step] = round(time.time() * 1000 - self.stop_us / 1000, 1)

    async def _final_ram_round(self) -> int:
        """Scan RAM in parts (exact: the guest is stopped), sending each part's dirty pages
        while the next part is hashed; the number of pages found."""
        assert self.tracker is not None
        loop = asyncio.get_running_loop()
        parts = self.tracker.parts(FINAL_SCAN_PARTS)
        pending = loop.run_in_executor(None, self.tracker.collect_part, parts[0])
        found = 0
        for index in range(len(parts)):
            dirty = await pending
            if index + 1 < len(parts):
                pending = loop.run_in_executor(None, self.tracker.collect_part, parts[index + 1])
            else:
                self._mark("scanned")
            found += len(dirty)
            await self._send_round(dirty)
        return found

    async def _tunnel_device_state(self) -> None:
        """Serve QEMU's `migrate` on a unix socket and forward its bytes to the peer."""
        assert self.qmp is not None and self.link is not None
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        self.migrate_socket = self.config.run_dir / f"{self.job_id}.migrate.sock"
        self.migrate_socket.unlink(missing_ok=True)
        accepted: asyncio.Future[asyncio.StreamReader] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not accepted.done():
                accepted.set_result(reader)
                self._migrate_writer = writer

        server = await asyncio.start_unix_server(on_connect, path=str(self.migrate_socket))
        try:
            await self.qmp.execute("migrate", {"uri": f"unix:{self.migrate_socket}"})
            self.migrate_started = True
            reader = await asyncio.wait_for(accepted, timeout=10)
            while chunk := await reader.read(DEVICE_STATE_CHUNK):
                if not self.counters.device_state_bytes:
                    self._mark("device_state_first_bytes")
                self.counters.device_state_bytes += len(chunk)
                await self.link.send(Kind.DEVICE_STATE, chunk)
            await self._wait_source_migration()
            self._mark("source_qemu_done")
            await self._ram_done.wait()  # the destination expects RAM_DONE first
            await send_control(self.link, Op.DEVICE_STATE_END,
                               bytes=self.counters.device_state_bytes)
        except TimeoutError:
            raise QemuError("source QEMU did not connect to the device-state socket") from None
        finally:
            if self._migrate_writer is not None:
                self._migrate_writer.close()
            server.close()
            await server.wait_closed()

    async def _wait_source_migration(self) -> None:
        assert self.qmp is not None
        await wait_migration_done(self.qmp, self.qmp.event_mark(), timeout=30)

    # ------------------------------------------------------------------ commit

    async def _commit(self) -> None:
        """Hand the VM over; from here the source never resumes on its own."""
        assert self.link is not None and self.qmp is not None
        self._journal(journal.Step.COMMITTING)
        await send_control(self.link, Op.COMMIT)
        reply = await self.inbox.expect({Op.COMMITTED}, timeout=COMMIT_TIMEOUT_S,
                                        what="destination resuming the VM")
        self.resume_us = int(reply.body.get("resume_us", 0)) or None
        self._mark("committed")
        self.dest_pid = int(reply.body.get("dest_pid", 0)) or self.dest_pid
        with contextlib.suppress(QemuError):
            await self.qmp.quit()
        self.qmp = None
        self._forget_source_vm()

    def _forget_source_vm(self) -> None:
        """The VM left this host: drop its record and, if ferry made it, its RAM file."""
        if self.vm_name is None:
            return
        with contextlib.suppress(UserError):
            record = vms.load(self.config, self.vm_name)
            vms.forget(self.config, self.vm_name)
            if record.managed:
                Path(record.ram_path).unlink(missing_ok=True)

    # ------------------------------------------------------------------ rollback

    async def _roll_back(self, outcome: Phase, why: str) -> None:
        """Source keeps running; destination removes its copy. Best effort on each step."""
        self.phases.advance(Phase.ROLLING_BACK)
        log.info("migration %s: rolling back (%s)", self.job_id, why)
        if self.link is not None:
            with contextlib.suppress(FerryError, ConnectionError, OSError):
                await send_control(self.link, Op.ABORT, reason=why)
                if self.inbox is not None:
                    await self.inbox.expect({Op.ABORTED}, timeout=ABORT_TIMEOUT_S,
                                            what="destination rolling back")
        if self.qmp is not None:
            try:
                if self.throttle is not None:
                    await self.throttle.stop()
                if self.migrate_started:
                    with contextlib.suppress(QemuError):
                        await self.qmp.execute("migrate_cancel")
                status = (await self.qmp.execute("query-status")).get("status")
                if status != "running":
                    await self.qmp.execute("cont")
            except QemuError as exc:
                log.error("migration %s: could not resume the source VM: %s", self.job_id, exc)
        self.phases.advance(outcome)

    async def _release(self) -> None:
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
        if self.tracker is not None:
            self.tracker.close()
        if self.ram is not None:
            self.ram.close()
        if self.ram_fd >= 0:
            os.close(self.ram_fd)
            self.ram_fd = -1
        if self.migrate_socket is not None:
            self.migrate_socket.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reporting

    async def _emit(self, *, force: bool = False, pages_left: int | None = None,
                    policy: ConvergencePolicy | None = None) -> None:
        """Send a progress event (at most every PROGRESS_INTERVAL_S unless forced)."""
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        elapsed = now - self.started
        throughput = self.counters.wire_bytes / elapsed if elapsed > 0 else 0.0
        event: dict[str, Any] = {
            "event": "progress", "phase": self.phases.phase.value,
            "round": self.counters.rounds, "elapsed_s": round(elapsed, 3),
            "pages_sent": self.counters.pages_sent, "wire_bytes": self.counters.wire_bytes,
            "throughput_bps": round(throughput),
        }
        if pages_left is not None:
            event["pages_left"] = pages_left
            rate = self.counters.pages_sent / elapsed if elapsed > 0 else 0
            # Later rounds resend what the guest dirties meanwhile: with dirty rate d and
            # send rate r they add up to pages_left / r * 1 / (1 - d / r).
            dirtying = min((self._dirty_rate or 0.0) / rate, 0.9) if rate > 0 else 0.0
            estimate = pages_left / rate / (1 - dirtying) if rate > 0 else None
            if estimate is not None:
                # The ETA only moves forward: it may shrink faster than time, never grow.
                if self._eta is not None:
                    estimate = min(estimate, max(0.0, self._eta - (now - self._eta_at)))
                self._eta, self._eta_at = estimate, now
                if estimate >= ETA_FLOOR_S:
                    event["eta_s"] = round(estimate, 2)
        if self._dirty_rate is not None:
            event["dirty_pages_per_s"] = round(self._dirty_rate)
        if self.throttle is not None and self.throttle.share:
            event["throttle"] = self.throttle.share
        with contextlib.suppress(Exception):
            await self.progress(event)

    def report(self, error: str | None) -> dict[str, Any]:
        """The final report (the JSON object `ferry migrate --json` prints last)."""
        phase = self.phases.phase
        status = {Phase.COMPLETED: "completed", Phase.CANCELLED: "cancelled"}.get(phase,
                                                                                 "failed")
        c = self.counters
        downtime_ms = ((self.resume_us - self.stop_us) / 1000
                       if self.resume_us and self.stop_us else None)
        return {
            "event": "result", "status": status, "phase": phase.value,
            "error": error if status != "completed" else None,
            "job": self.job_id, "vm": self.vm_name or (self.info.name if self.info else None),
            "peer": self.peer,
            "total_ms": round((time.monotonic() - self.started) * 1000, 1),
            "downtime_ms": round(downtime_ms, 1) if downtime_ms is not None else None,
            "rounds": c.rounds,
            "ram_bytes": self.info.ram_size if self.info else 0,
            "pages_sent": c.pages_sent, "zero_pages": c.zero_pages,
            "dedup_pages": c.dedup_pages, "data_pages": c.data_pages,
            "unchanged_pages": c.unchanged_pages,
            "wire_bytes": c.wire_bytes + c.device_state_bytes + c.disk_wire_bytes,
            "disk_bytes": c.disk_wire_bytes,
            "disks": self.storage.report() if self.storage else [],
            "device_state_bytes": c.device_state_bytes,
            "compression": (f"zstd:{self.options.compress_level}"
                            if self.options.compress_level is not None else "off"),
            "compression_ratio": round(c.raw_data_bytes / max(1, c.wire_bytes), 3)
            if c.wire_bytes else 1.0,
            "dest_pid": self.dest_pid if status == "completed" else None,
            "throttle": self.throttle.share if self.throttle else 0.0,
            "switchover_ms": self.switchover,
        }
