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
from dataclasses import dataclass
from typing import Any

from agent.batch import codec
from agent.errors import FerryError, LocalError, PeerError, ProtocolError, QemuError, UserError
from agent.migration.link import Link, parse_message, send_control
from agent.migration.protocol import Kind, Op
from agent.qemu import qmp as qmp_mod
from agent.qemu import vm
from agent.qemu.destargv import DestinationPaths, destination_argv
from agent.qemu.migrate import destination_capabilities, wait_migration_done
from agent.qemu.vmspec import PAGE_SIZE, VmSpec
from agent.state import journal, vms
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
@dataclass
class IncomingVm:
    """The destination's resources for one incoming VM, so they can all be removed."""

    spec: VmSpec
    paths: DestinationPaths
    process: vm.QemuProcess | None = None
    qmp: qmp_mod.Qmp | None = None
    ram_fd: int = -1
    ram: mmap.mmap | None = None
    storage: StorageSink | None = None
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
    link: Link
    peer: str
    job_id: str
    incoming: IncomingVm | None = None
    ram_done: bool = False
    stream_ended: bool = False
    loaded: bool = False
    state_writer: asyncio.StreamWriter | None = None
    committed: bool = False
    pages_applied: int = 0

    async def run(self) -> None:
        """Serve the job until it completes or is rolled back; raises only CancelledError."""
        try:
            kind, payload = await self.link.receive()
            msg = parse_message(kind, payload)
            if msg is None or msg.op is not Op.PREPARE:
                raise ProtocolError("a migration must begin with PREPARE")
            await self._prepare(msg.body)
            await self._serve()
        except asyncio.CancelledError:
            await self._roll_back("the agent is shutting down")
            raise
        except Exception as exc:
            if isinstance(exc, FerryError):
                log.error("incoming migration %s from %s failed: %s", self.job_id, self.peer,
                          exc)
                log.debug("traceback", exc_info=True)
            else:
                # A bug, or an untranslated library error: the copy is removed all the same.
                log.exception("incoming migration %s from %s: unexpected error", self.job_id,
                              self.peer)
                exc = LocalError(f"destination internal error: {exc!r}")
            with contextlib.suppress(FerryError, ConnectionError):
                await send_control(self.link, Op.ERROR, message=str(exc),
                                   error_type=type(exc).__name__)
            await self._roll_back(str(exc))

    # ------------------------------------------------------------------ prepare

    async def _prepare(self, body: dict[str, Any]) -> None:
        spec = VmSpec.from_json(body.get("vm") or {})
        vm_dir = self.config.vms_dir / spec.name
        if vms.is_running(self.config, spec.name):
            raise UserError(f"the destination already runs a VM named {spec.name}")
        paths = DestinationPaths.under(vm_dir, self.config.ram_dir,
                                       f"{spec.name}-{self.job_id}")
        targets = plan_targets(spec.disks, parse_disk_map(body.get("disk_map")),
                               body.get("disk_format"), self.config.roots)
        widened: list[str] = []
        # In a thread: the backing-chain checks run qemu-img.
        argv = await asyncio.to_thread(destination_argv, spec, paths, self.config.roots,
                                       self.config.qemu_path(), targets,
                                       accept=self.config.accept, widened=widened)
        for note in widened:
            log.warning("incoming %s from %s: %s (agent.toml)", spec.name, self.peer, note)
        self._check_ram_space(spec.ram_size)
        incoming = self.incoming = IncomingVm(spec=spec, paths=paths)
        incoming.storage = StorageSink(spec.disks, targets, paths.vm_dir / "nbd.sock")
        self._journal(incoming, pid=0)  # before creating anything a crash could leave
        if vm_dir.exists():
            shutil.rmtree(vm_dir)  # a stale directory of a VM that is not running
        vm_dir.mkdir(parents=True)
        incoming.created_vm_dir = True
        incoming.storage.create_images()
        # The RAM file exists (sparse, all zero) before QEMU maps it: pages not sent are zero.
        incoming.ram_fd = os.open(paths.ram_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(incoming.ram_fd, spec.ram_size)
        incoming.ram = mmap.mmap(incoming.ram_fd, spec.ram_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        launch = vm.LaunchSpec(name=spec.name, ram_size=spec.ram_size, ram_path=paths.ram_path,
                               qmp_path=paths.qmp_path, serial_path=paths.serial_log,
                               pidfile=paths.pidfile, log_path=paths.qemu_log)
        incoming.process = await vm.launch(launch, argv=argv)
        self._journal(incoming, pid=incoming.process.pid)
        incoming.qmp = await qmp_mod.connect(paths.qmp_path)
        await incoming.qmp.execute("migrate-set-capabilities", destination_capabilities())
        await incoming.qmp.execute("migrate-incoming", {"uri": f"unix:{paths.incoming_path}"})
        await incoming.storage.open(incoming.qmp)
        log.info("incoming %s from %s: QEMU pid %d waits for pages", spec.name, self.peer,
                 incoming.process.pid)
        await send_control(self.link, Op.PREPARED, dest_pid=incoming.process.pid,
                           npages=spec.npages, widened=widened)

    def _journal(self, incoming: IncomingVm, pid: int) -> None:
        journal.write(self.config, journal.Entry(
            job=self.job_id, role="destination", step=journal.Step.INCOMING,
            vm=incoming.spec.name, pid=pid, vm_dir=str(incoming.paths.vm_dir),
            ram_path=str(incoming.paths.ram_path), peer=self.peer,
            disks=[t.path for t in (incoming.storage.targets.values()
                                    if incoming.storage else ())]))

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
        try:
            while True:
                receive = asyncio.create_task(self.link.receive())
                done, _ = await asyncio.wait({receive, *watched},
                                             return_when=asyncio.FIRST_COMPLETED)
                if receive not in done:
                    receive.cancel()
                    with contextlib.suppress(asyncio.CancelledError, FerryError, ConnectionError):
                        await receive
                    if qemu_exit in done and not self.committed:
                        raise QemuError(f"destination QEMU exited with status "
                                        f"{qemu_exit.result()}: {incoming.process.log_tail()}")
                    if feeder in done:
                        feeder.result()  # raises the feeder's failure
                        watched.discard(feeder)
                        if self.loaded:
                            continue
                    raise ProtocolError("the destination's QEMU feeder stopped unexpectedly")
                kind, payload = receive.result()
                if kind == Kind.RAM_BATCH or kind == Kind.QEMU_STREAM:
                    if self.ram_done and kind == Kind.RAM_BATCH:
                        raise ProtocolError("a RAM batch after RAM_DONE")
                    if self.stream_ended:
                        raise ProtocolError("QEMU stream data after STREAM_END")
                    await queue.put((Kind(kind), payload))
                    continue
                if kind == Kind.DISK_BATCH:
                    if self.ram_done:
                        raise ProtocolError("a disk batch after RAM_DONE")
                    assert incoming.storage is not None
                    await incoming.storage.apply(memoryview(payload))
                    continue
                msg = parse_message(kind, payload)
                if msg is None:
                    raise ProtocolError(f"unexpected data message kind {kind}")
                if msg.op is Op.RAM_DONE:
                    if self.ram_done:
                        raise ProtocolError("RAM_DONE twice")
                    self.ram_done = True
                    await queue.put((Op.RAM_DONE, b""))
                elif msg.op is Op.STREAM_END:
                    if not self.ram_done or self.stream_ended:
                        raise ProtocolError("STREAM_END before RAM_DONE, or twice")
                    self.stream_ended = True
                    await queue.put((Op.STREAM_END, b""))
                elif msg.op is Op.COMMIT:
                    if not self.loaded:
                        raise ProtocolError("COMMIT before the destination reported LOADED")
                    await self._commit()
                    return
                elif msg.op is Op.ABORT:
                    log.info("incoming %s: source aborted: %s", self.job_id,
                             msg.body.get("reason", "no reason given"))
                    await self._roll_back("aborted by the source")
                    with contextlib.suppress(FerryError, ConnectionError):
                        await send_control(self.link, Op.ABORTED)
                    return
                elif msg.op is Op.ERROR:
                    raise PeerError(f"source failed: {msg.body.get('message')}")
                else:
                    raise ProtocolError(f"unexpected {msg.op.value} during a migration")
        finally:
            for task in (feeder, qemu_exit):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, FerryError):
                        await task

    async def _feed(self, queue: asyncio.Queue[_Item]) -> None:
        """In order: page batches into the RAM file, stream chunks into QEMU, disks
        finished at RAM_DONE, LOADED once QEMU took the whole stream.

        Batches are applied on this thread (native, GIL released): handing each to a
        worker thread cost more CPU than it overlapped (measured, as for the source)."""
        incoming = self.incoming
        assert incoming is not None and incoming.ram is not None and incoming.qmp is not None
        npages = incoming.spec.npages
        _, writer = await asyncio.open_unix_connection(str(incoming.paths.incoming_path))
        self.state_writer = writer
        while True:
            what, payload = await queue.get()
            if what is Kind.RAM_BATCH:
                self.pages_applied += codec.decode_and_apply(
                    payload, incoming.ram, npages, PAGE_SIZE, incoming.ram_fd)
            elif what is Kind.QEMU_STREAM:
                writer.write(payload)
                await writer.drain()
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

    async def _commit(self) -> None:
        """The destination owns the VM from here on: resume it, whatever the link does."""
        self.committed = True
        incoming = self.incoming
        assert incoming is not None and incoming.qmp is not None and incoming.process
        mark = incoming.qmp.event_mark()
        await incoming.qmp.execute("cont")
        resume = await incoming.qmp.wait_event("RESUME", timeout=RESUME_TIMEOUT_S, after=mark)
        vms.register(self.config, vms.VmRecord(
            name=incoming.spec.name, pid=incoming.process.pid,
            qmp_path=str(incoming.paths.qmp_path), ram_path=str(incoming.paths.ram_path),
            vm_dir=str(incoming.paths.vm_dir), managed=True))
        journal.remove(self.config, self.job_id)
        incoming.close_ram()
        with contextlib.suppress(QemuError):
            await incoming.qmp.disconnect()
        incoming.qmp = None
        log.info("incoming %s: %s resumed here as pid %d", self.job_id, incoming.spec.name,
                 incoming.process.pid)
        with contextlib.suppress(FerryError, ConnectionError):
            await send_control(self.link, Op.COMMITTED, resume_us=resume.timestamp_us,
                               dest_pid=incoming.process.pid)
        incoming.process.detach()

    async def _roll_back(self, why: str) -> None:
        if self.committed or self.incoming is None:
            return
        log.info("incoming %s: removing destination VM (%s)", self.job_id, why)
        if self.state_writer is not None:
            self.state_writer.close()
        await self.incoming.remove()
        self.incoming = None
        journal.remove(self.config, self.job_id)
