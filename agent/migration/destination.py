"""The destination's side of one migration: start the twin QEMU, take pages and state, resume.

Everything the source sends is checked before it touches anything: the VM description
(agent.qemu.vmspec), every page batch (agent.batch.codec validates indices and sizes
before writing). QEMU's stream reaches the destination QEMU, which checks it itself, only
in order: each chunk after every page batch sent before it is in the RAM file, the device
state after RAM_DONE, once the disks are flushed (DESIGN §2b).
Until COMMIT arrives, any failure or a lost link removes the destination's QEMU and files;
after COMMIT the destination owns the VM and keeps it running whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import ramdir
from agent.batch import codec
from agent.errors import (
    FerryError,
    LocalError,
    PeerError,
    ProtocolError,
    QemuError,
    UserError,
    failure_reason,
)
from agent.hostnet import attach
from agent.migration import recovery
from agent.migration.claims import Claims
from agent.migration.conversation import CheckedLink, State
from agent.migration.link import parse_message, send_control
from agent.migration.protocol import Control, Kind, Op
from agent.migration.resume import ACK_EVERY_BYTES
from agent.migration.timeline import DESTINATION_FIELDS, Sampler
from agent.procfs import CpuMeter
from agent.qemu import firmware, vm
from agent.qemu import qmp as qmp_mod
from agent.qemu.destargv import DestinationPaths, DiskTarget, destination_argv
from agent.qemu.migrate import destination_capabilities, wait_migration_done
from agent.qemu.vmspec import PAGE_SIZE, VmSpec
from agent.state import journal, outcomes, vms
from agent.state.config import AgentConfig
from agent.storage.disk_sink import StorageSink, parse_disk_map, plan_targets

log = logging.getLogger(__name__)

# Messages received ahead of the one being applied: overlaps decryption (event loop) with
# decompression and copying (worker thread) while keeping memory bounded.
APPLY_QUEUE_DEPTH = 4
LOAD_TIMEOUT_S = 60.0
# What the receive loop hands the feeder, in stream order.
_Item = tuple[Kind | Op, bytes | memoryview]
RESUME_TIMEOUT_S = 10.0
# A write into QEMU's migration socket failed: how long QEMU gets to be seen exiting, which
# is why it usually fails (its exit is polled, so the write tends to notice first).
QEMU_EXIT_GRACE_S = 2.0
# QEMU's default announce parameters (qapi AnnounceParameters): 5 rounds, 50 ms first,
# 100 ms more each round, at most 550 ms apart.
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}
@dataclass
class IncomingVm:
    """The destination's resources for one incoming VM, so they can all be removed."""

    spec: VmSpec
    paths: DestinationPaths
    process: vm.QemuProcess | None = None
    qmp: qmp_mod.Qmp | None = None
    ram_fd: int = -1
    ram: mmap.mmap | None = None
    ram_huge: bool = False   # the RAM file is on a huge-page tmpfs: pages go in mapped
    storage: StorageSink | None = None
    nics: attach.NicAttachment | None = None
    created_vm_dir: bool = False

    def close_ram(self) -> None:
        if self.ram is not None:
            self.ram.close()
            self.ram = None
        if self.ram_fd >= 0:
            os.close(self.ram_fd)
            self.ram_fd = -1

    async def remove(self) -> None:
        """Kill the destination QEMU and delete every file made for it."""
        if self.qmp is not None:
            with contextlib.suppress(QemuError):
                await self.qmp.disconnect()
        if self.process is not None:
            self.process.kill()
        if self.nics is not None:
            self.nics.remove()   # after QEMU: its taps are gone with it
        self.close_ram()
        if self.storage is not None:
            await self.storage.abort()
        self.paths.ram_path.unlink(missing_ok=True)
        if self.created_vm_dir:
            shutil.rmtree(self.paths.vm_dir, ignore_errors=True)


@dataclass
class DestinationJob:
    """One incoming migration, driven by the messages of one link."""

    config: AgentConfig
    link: CheckedLink              # every message checked by the conversation's table
    peer: str
    job_id: str
    claims: Claims = field(default_factory=Claims)
    incoming: IncomingVm | None = None
    loaded: bool = False
    state_writer: asyncio.StreamWriter | None = None
    committed: bool = False
    pages_applied: int = 0
    outcome: outcomes.Outcome | None = None   # told the source with an ERROR, when known
    error_reason: str | None = None       # why it failed (errors.failure_reason)
    received: int = 1                     # messages received, PREPARE included (RESUMED)
    received_bytes: int = 0               # their payloads: what `ferry jobs` shows here
    vm_name: str | None = None            # from PREPARE, for the log
    _unacked_bytes: int = 0
    _new_link: asyncio.Future[CheckedLink] | None = None   # a RESUME connection
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    sampler: Sampler | None = None        # this agent and its QEMU, from QEMU's start
    _vcpus: list[int] = field(default_factory=list)
    resumed_at: float | None = None       # monotonic, when the RESUME event came
    _pace_after: CpuMeter | None = None   # the guest's vCPUs from the resume on

    @property
    def label(self) -> str:
        """What each log line of this job starts with: its id, its VM and its peer."""
        return f"incoming {self.job_id} of {self.vm_name or '?'} from {self.peer}"

    def resume(self, link: CheckedLink) -> bool:
        """Take over a new connection on which the source said RESUME for this job
        (the daemon's); False if this job cannot resume now (not in pre-copy)."""
        if (self.finished.is_set() or self.incoming is None
                or self.link.conversation.state is not State.TRANSFER
                or (self._new_link is not None and self._new_link.done())):
            return False
        if self._new_link is None:
            self._new_link = asyncio.get_running_loop().create_future()
        self._new_link.set_result(link)
        return True

    async def run(self, prepare: Control) -> None:
        """Serve the job PREPARE began until it completes or is rolled back; raises only
        CancelledError."""
        try:
            job = str(prepare.body.get("job") or "")
            if not outcomes.JOB_ID.fullmatch(job):
                raise ProtocolError(f"PREPARE names no valid job id ({job[:40]!r})")
            self.job_id = job   # the source's: STATUS questions name it
            self.claims.claim(f"job:{job}", job, f"job id {job}")
            await self._prepare(prepare.body)
            await self._serve()
            if self.committed:
                await self._report_health()
        except asyncio.CancelledError:
            self.error_reason = "shutdown"
            await self._roll_back("the agent is shutting down")
            raise
        except Exception as exc:
            if isinstance(exc, FerryError):
                log.error("%s failed: %s", self.label, exc)   # expected: no traceback
            else:
                # A bug, or an untranslated library error: the copy is removed all the same.
                log.exception("%s: unexpected error", self.label)
                exc = LocalError(f"destination internal error: {exc!r}")
            self.error_reason = failure_reason(exc)
            with contextlib.suppress(FerryError, ConnectionError):
                await send_control(self.link, Op.ERROR, message=str(exc),
                                   error_type=type(exc).__name__,
                                   outcome=self._outcome_for_source())
            await self._roll_back(str(exc))
        finally:
            if self.sampler is not None:
                await self.sampler.stop()
            self.claims.release(self.job_id)
            self.finished.set()

    def _outcome_for_source(self) -> str | None:
        """What an ERROR tells the source of our copy: removed before COMMIT (it is about
        to be), what _commit_failed found after it, else nothing (the source asks)."""
        if self.outcome is not None:
            return self.outcome.value
        return None if self.committed else outcomes.Outcome.REMOVED.value

    # ------------------------------------------------------------------ prepare

    async def _prepare(self, body: dict[str, Any]) -> None:
        spec = VmSpec.from_json(body.get("vm") or {})
        self.vm_name = spec.name
        vm_dir = self.config.vms_dir / spec.name
        self.claims.claim(f"vm:{spec.name}", self.job_id, f"VM name {spec.name}")
        if vms.is_running(self.config, spec.name):
            raise UserError(f"the destination already runs a VM named {spec.name}")
        if vms.record_path(self.config, spec.name).exists():
            raise UserError(f"the destination has a stopped VM named {spec.name} "
                            f"({vm_dir}); remove it there first, or migrate under another "
                            f"name")
        paths = DestinationPaths.under(vm_dir, self.config.ram_dir,
                                       f"{spec.name}-{self.job_id}")
        targets = plan_targets(spec.disks, parse_disk_map(body.get("disk_map")),
                               body.get("disk_format"), self.config.roots)
        nics = attach.plan([attach.NicRequest(n.key, n.network, n.mac) for n in spec.nics],
                           self.config.networks)
        widened: list[str] = []
        # Checked in full before anything exists (in a thread: the backing-chain checks
        # run qemu-img); run below with the real tap descriptors.
        await asyncio.to_thread(self._argv, spec, paths, targets, nics.placeholders(),
                                widened)
        for note in widened:
            log.warning("%s: %s (agent.toml)", self.label, note)
        self._check_ram_space(spec.ram_size)
        incoming = self.incoming = IncomingVm(spec=spec, paths=paths, nics=nics)
        incoming.storage = StorageSink(spec.disks, targets, paths.vm_dir / "nbd.sock")
        self._journal(incoming)  # before creating anything a crash could leave
        # A directory without a record is what a VM that left keeps (its logs): reused.
        incoming.created_vm_dir = not vm_dir.exists()
        vm_dir.mkdir(parents=True, exist_ok=True)
        incoming.storage.create_images()
        # The RAM file exists (sparse, all zero) before QEMU maps it: pages not sent are zero.
        incoming.ram_fd = os.open(paths.ram_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(incoming.ram_fd, spec.ram_size)
        incoming.ram = mmap.mmap(incoming.ram_fd, spec.ram_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        incoming.ram_huge = ramdir.huge_pages(paths.ram_path)
        if incoming.ram_huge:   # huge=advise asks for it; the other modes don't mind
            incoming.ram.madvise(mmap.MADV_HUGEPAGE)
            log.info("%s: RAM file on a huge-page tmpfs (%s)", self.label, self.config.ram_dir)
        launch = vm.LaunchSpec(name=spec.name, ram_size=spec.ram_size, ram_path=paths.ram_path,
                               qmp_path=paths.qmp_path, serial_path=paths.serial_log,
                               pidfile=paths.pidfile, log_path=paths.qemu_log)
        vars_copies: list[tuple[Path, Path]] = []
        argv = await asyncio.to_thread(self._argv, spec, paths, targets, nics.create(),
                                       vars_copies=vars_copies)
        for template, target in vars_copies:
            # This host's own UEFI variable store (never the source's path), the size of
            # its template; QEMU writes the source's variables into it at resume.
            firmware.ensure_vars(template, target, fresh=True)
        try:
            incoming.process = await vm.launch(launch, argv=argv, pass_fds=nics.pass_fds)
        finally:
            nics.handed_over()   # QEMU holds the taps now, or nobody does
        self._journal(incoming)
        incoming.qmp = await qmp_mod.connect(paths.qmp_path)
        await incoming.qmp.execute("migrate-set-capabilities", destination_capabilities())
        await incoming.qmp.execute("migrate-incoming", {"uri": f"unix:{paths.incoming_path}"})
        await incoming.storage.open(incoming.qmp)
        self._vcpus = await vm.vcpu_threads(incoming.qmp, incoming.process.pid)
        self.sampler = Sampler(DESTINATION_FIELDS)
        self.sampler.watch_qemu(incoming.process.pid, self._vcpus)
        self.sampler.start()
        log.info("%s: QEMU pid %d waits for pages", self.label, incoming.process.pid)
        await send_control(self.link, Op.PREPARED, dest_pid=incoming.process.pid,
                           npages=spec.npages, widened=widened)

    def _argv(self, spec: VmSpec, paths: DestinationPaths, targets: dict[str, DiskTarget],
              host_nics: dict[str, str], widened: list[str] | None = None, *,
              vars_copies: list[tuple[Path, Path]] | None = None) -> list[str]:
        return destination_argv(spec, paths, self.config.roots, self.config.qemu_path(),
                                targets, accept=self.config.accept, widened=widened,
                                host_nics=host_nics, vars_copies=vars_copies)

    def _journal(self, incoming: IncomingVm, step: journal.Step = journal.Step.INCOMING) -> None:
        journal.write(self.config, self._entry(incoming, step))

    def _entry(self, incoming: IncomingVm, step: journal.Step) -> journal.Entry:
        return journal.Entry(
            job=self.job_id, role="destination", step=step, vm=incoming.spec.name,
            pid=incoming.process.pid if incoming.process else 0,
            qmp_path=str(incoming.paths.qmp_path), vm_dir=str(incoming.paths.vm_dir),
            ram_path=str(incoming.paths.ram_path), peer=self.peer,
            disks=[t.path for t in (incoming.storage.targets.values()
                                    if incoming.storage else ())],
            links=incoming.nics.outliving_names() if incoming.nics else [],
            nics=incoming.nics.records() if incoming.nics else [])

    def _check_ram_space(self, ram_size: int) -> None:
        usage = shutil.disk_usage(self.config.ram_dir)
        if usage.free < ram_size:
            raise UserError(f"not enough room for {ram_size >> 20} MiB of guest RAM in "
                            f"{self.config.ram_dir} ({usage.free >> 20} MiB free)")

    # ------------------------------------------------------------------ serve

    async def _serve(self) -> None:
        """Receive until COMMIT or ABORT; everything for QEMU goes through one ordered
        queue, so its stream never overtakes the pages before it."""
        incoming = self.incoming
        assert incoming is not None and incoming.process is not None
        queue: asyncio.Queue[_Item] = asyncio.Queue(APPLY_QUEUE_DEPTH)
        feeder = asyncio.create_task(self._feed(queue), name="feed-qemu")
        qemu_exit = asyncio.create_task(incoming.process.wait(float("inf")), name="qemu-exit")
        watched = {feeder, qemu_exit}  # either ending early is a failure
        self._new_link = asyncio.get_running_loop().create_future()
        # One receive at a time, kept across wake-ups for other reasons: cancelling a
        # receive that has taken a message off the link loses that message (the feeder
        # ends with LOADED just as COMMIT arrives: a lost COMMIT stalled the job 60 s).
        receive: asyncio.Task[tuple[int, bytes | memoryview]] | None = None
        try:
            while True:
                if receive is None:
                    receive = asyncio.create_task(self.link.receive())
                waits: set[asyncio.Future[Any]] = {receive, self._new_link, *watched}
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if self._new_link in done or (receive in done and self._lost(receive)):
                    await self._take_new_link(receive)   # the old link's receive ends there
                    receive = None
                    continue
                if receive not in done:
                    if qemu_exit in done and not self.committed:
                        raise _qemu_exited(incoming, qemu_exit.result())
                    if feeder in done:
                        feeder.result()  # raises the feeder's failure
                        watched.discard(feeder)
                        if self.loaded:
                            continue     # the pending receive goes on
                    raise ProtocolError("the destination's QEMU feeder stopped unexpectedly")
                # The link's conversation table has let through only what is legal now
                # (agent.migration.conversation): no batch after RAM_DONE, no COMMIT
                # before LOADED, ...
                kind, payload = receive.result()
                receive = None
                self.received += 1
                self.received_bytes += len(payload)
                self._unacked_bytes += len(payload)
                if self._unacked_bytes >= ACK_EVERY_BYTES:
                    self._unacked_bytes = 0
                    await send_control(self.link, Op.ACK, received=self.received)
                if kind == Kind.RAM_BATCH or kind == Kind.QEMU_STREAM:
                    await queue.put((Kind(kind), payload))
                    continue
                if kind == Kind.DISK_BATCH:
                    assert incoming.storage is not None
                    await incoming.storage.apply(memoryview(payload))
                    continue
                msg = parse_message(kind, payload)
                if msg is None:
                    raise ProtocolError(f"unexpected data message kind {kind}")
                if msg.op is Op.RAM_DONE:
                    await queue.put((Op.RAM_DONE, b""))
                elif msg.op is Op.STREAM_END:
                    await queue.put((Op.STREAM_END, b""))
                elif msg.op is Op.COMMIT:
                    await self._commit()
                    return
                elif msg.op is Op.ABORT:
                    log.info("%s: source aborted: %s", self.label,
                             msg.body.get("reason", "no reason given"))
                    self.error_reason = "aborted"
                    await self._roll_back("aborted by the source")
                    with contextlib.suppress(FerryError, ConnectionError):
                        await send_control(self.link, Op.ABORTED)
                    return
                elif msg.op is Op.ERROR:
                    raise PeerError(f"source failed: {msg.body.get('message')}")
                else:
                    raise ProtocolError(f"unexpected {msg.op.value} during a migration")
        finally:
            for task in (feeder, qemu_exit, *([receive] if receive is not None else [])):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, FerryError,
                                             ConnectionError):
                        await task

    def _lost(self, receive: asyncio.Task[tuple[int, bytes | memoryview]]) -> bool:
        """Whether the link failed in pre-copy, where the source may come back (RESUME)."""
        return (isinstance(receive.exception(), PeerError)
                and self.link.conversation.state is State.TRANSFER)

    async def _take_new_link(self, receive: asyncio.Task[tuple[int, bytes | memoryview]]
                             ) -> None:
        """Go on with the RESUME connection: now, or once it comes within the window (else
        the loss stands and the job rolls back). What the old link still had in flight is
        dropped: the source resends everything after what RESUMED says was received."""
        assert self._new_link is not None
        lost = receive.exception() if receive.done() else None
        if not receive.done():
            receive.cancel()
            with contextlib.suppress(asyncio.CancelledError, FerryError, ConnectionError):
                await receive
        if not self._new_link.done():
            log.warning("%s: link lost in pre-copy (%s); waiting %g s for the "
                        "source to resume", self.label, lost, self.config.resume_window_s)
            try:
                await asyncio.wait_for(asyncio.shield(self._new_link),
                                       self.config.resume_window_s)
            except TimeoutError:
                assert lost is not None
                raise lost from None
        new = self._new_link.result()
        self._new_link = asyncio.get_running_loop().create_future()
        with contextlib.suppress(FerryError, ConnectionError, OSError):
            await self.link.close()
        self.link = new
        self._unacked_bytes = 0
        await send_control(new, Op.RESUMED, received=self.received)
        log.warning("%s: resumed on a new connection after %d messages",
                    self.label, self.received)

    async def _feed(self, queue: asyncio.Queue[_Item]) -> None:
        """In order: page batches into the RAM file, stream chunks into QEMU, disks
        finished at RAM_DONE, LOADED once QEMU took the whole stream.

        Batches are applied on this thread (native, GIL released): handing each to a
        worker thread cost more CPU than it overlapped (measured, as for the source)."""
        incoming = self.incoming
        assert incoming is not None and incoming.ram is not None and incoming.qmp is not None
        try:
            _, writer = await asyncio.open_unix_connection(str(incoming.paths.incoming_path))
        except OSError as exc:
            raise await self._stream_failed(exc) from exc
        self.state_writer = writer
        while True:
            what, payload = await queue.get()
            if what is Kind.RAM_BATCH:
                self.pages_applied += apply_pages(incoming, payload)
            elif what is Kind.QEMU_STREAM:
                try:
                    writer.write(payload)
                    await writer.drain()
                except OSError as exc:   # ConnectionResetError, BrokenPipeError, ...
                    raise await self._stream_failed(exc) from exc
            elif what is Op.RAM_DONE:
                assert incoming.storage is not None
                await incoming.storage.finish()   # disks flushed, exports gone
            elif what is Op.STREAM_END:
                mark = incoming.qmp.event_mark()
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
                await wait_migration_done(incoming.qmp, mark, LOAD_TIMEOUT_S)
                self.loaded = True
                await send_control(self.link, Op.LOADED, pages=self.pages_applied)
                return

    async def _stream_failed(self, exc: OSError) -> QemuError:
        """QEMU's migration socket failed: the error says whether QEMU died meanwhile."""
        incoming = self.incoming
        assert incoming is not None and incoming.process is not None
        try:
            status = await incoming.process.wait(QEMU_EXIT_GRACE_S)
        except QemuError:
            detail = exc.strerror or repr(exc)
            return QemuError(f"the destination QEMU's migration socket failed ({detail}) "
                             f"while QEMU still runs: {incoming.process.log_tail()}")
        return _qemu_exited(incoming, status)

    async def _commit(self) -> None:
        """The destination owns the VM from here on: resume it, whatever the link does.

        Journaled first: a restarted agent then keeps (and resumes) the guest instead of
        removing it, since the source has stopped for good."""
        incoming = self.incoming
        assert incoming is not None and incoming.qmp is not None and incoming.process
        self._journal(incoming, step=journal.Step.COMMIT_RECEIVED)
        self.committed = True
        try:
            mark = incoming.qmp.event_mark()
            await incoming.qmp.execute("cont")
            resume = await incoming.qmp.wait_event("RESUME", timeout=RESUME_TIMEOUT_S,
                                                   after=mark)
        except FerryError as exc:
            await self._commit_failed(exc)
            raise
        self.resumed_at = time.monotonic()
        self._pace_after = CpuMeter(incoming.process.pid, self._vcpus)
        if incoming.spec.nics:
            await self._announce(incoming.qmp)
        nic_records = incoming.nics.records() if incoming.nics else []
        vms.register(self.config, vms.VmRecord(
            name=incoming.spec.name, pid=incoming.process.pid,
            qmp_path=str(incoming.paths.qmp_path), ram_path=str(incoming.paths.ram_path),
            vm_dir=str(incoming.paths.vm_dir), managed=True, nics=nic_records))
        outcomes.record(self.config, self.job_id, outcomes.Outcome.RESUMED,
                        incoming.spec.name)
        journal.remove(self.config, self.job_id)
        incoming.close_ram()
        with contextlib.suppress(QemuError):
            await incoming.qmp.disconnect()
        incoming.qmp = None
        log.info("%s: resumed here as pid %d", self.label, incoming.process.pid)
        with contextlib.suppress(FerryError, ConnectionError):
            await send_control(self.link, Op.COMMITTED, resume_us=resume.timestamp_us,
                               dest_pid=incoming.process.pid,
                               health_window_s=self.config.health_window_s)
        incoming.process.detach(on_exit=lambda: attach.remove_recorded(nic_records))

    async def _report_health(self) -> None:
        """Watch the resumed guest for the health window, then tell the source its pace
        (HEALTH) with this side's samples, t in seconds after the resume. Best effort: the
        VM is ours and runs whatever the link does."""
        window = self.config.health_window_s
        if window <= 0 or self.resumed_at is None or self._pace_after is None:
            return
        await asyncio.sleep(max(0.0, self.resumed_at + window - time.monotonic()))
        pace = self._pace_after.read().threads
        samples: list[list[object]] = []
        if self.sampler is not None:
            await self.sampler.stop()
            shift = self.resumed_at - self.sampler.started
            samples = [[round(row[0] - shift, 3), *row[1:]]
                       for row in self.sampler.series.snapshot()]
        log.info("%s: guest pace %s vCPU-s/s in the %g s after the resume",
                 self.label, None if pace is None else round(pace, 3), window)
        with contextlib.suppress(FerryError, ConnectionError, OSError):
            await send_control(self.link, Op.HEALTH, window_s=window,
                               pace=None if pace is None else round(pace, 3),
                               samples=samples)

    async def _commit_failed(self, exc: FerryError) -> None:
        """`cont` did not take. A QEMU that died never ran the guest here: its copy goes
        and the source may resume (the ERROR says so). One that lives is kept as recovery
        keeps a committed VM: it may have run."""
        incoming = self.incoming
        assert incoming is not None and incoming.process is not None
        if incoming.process.returncode is None:
            log.error("%s: resuming the VM failed (%s); keeping it", self.label, exc)
            if incoming.qmp is not None:   # QEMU serves one QMP client: recovery's own
                with contextlib.suppress(QemuError):
                    await incoming.qmp.disconnect()
                incoming.qmp = None
            entry = self._entry(incoming, journal.Step.COMMIT_RECEIVED)
            log.warning("%s: %s", self.label,
                        await recovery.keep_committed(self.config, entry))
            incoming.close_ram()
            incoming.process.detach()
        else:
            log.error("%s: the QEMU died before it resumed: %s", self.label, exc)
            await incoming.remove()
            self.outcome = outcomes.Outcome.REMOVED
            outcomes.record(self.config, self.job_id, self.outcome, incoming.spec.name)
        journal.remove(self.config, self.job_id)

    async def _announce(self, q: qmp_mod.Qmp) -> None:
        """Make the guest's NICs announce themselves on their new ports (RARP, or the
        guest's own gratuitous ARP where virtio's GUEST_ANNOUNCE is on), so switches and
        peers learn at once; QEMU's announce parameters. The VM is committed: a failure
        here is logged, never fatal."""
        try:
            await q.execute("announce-self", ANNOUNCE)
        except QemuError as exc:
            log.warning("%s: announce-self failed: %s", self.label, exc)

    async def _roll_back(self, why: str) -> None:
        if self.committed or self.incoming is None:
            return
        log.info("%s: removing destination VM (%s)", self.label, why)
        if self.state_writer is not None:
            self.state_writer.close()
        await self.incoming.remove()
        outcomes.record(self.config, self.job_id, outcomes.Outcome.REMOVED,
                        self.incoming.spec.name)
        self.incoming = None
        journal.remove(self.config, self.job_id)


def _qemu_exited(incoming: IncomingVm, status: int) -> QemuError:
    assert incoming.process is not None
    return QemuError(f"destination QEMU exited with status {status}: "
                     f"{incoming.process.log_tail()}")


def apply_pages(incoming: IncomingVm, payload: bytes | memoryview) -> int:
    """One page batch into the RAM file (checked whole first); the entries applied. A
    write that fails (a full tmpfs) names the file."""
    assert incoming.ram is not None
    try:
        return codec.decode_and_apply(payload, incoming.ram, incoming.spec.npages, PAGE_SIZE,
                                      incoming.ram_fd, pwrite_data=not incoming.ram_huge)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise LocalError(f"the destination's RAM file {incoming.paths.ram_path}: "
                         f"{reason}") from exc
