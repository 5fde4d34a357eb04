"""The destination's side of one migration: start the twin QEMU, take pages and state, resume.

Everything the source sends is checked before it touches anything: the VM description
(agent.vmspec), every page batch (agent.codec validates indices and sizes before writing).
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
from dataclasses import dataclass, field
from typing import Any

from agent.batch import codec
from agent.errors import (FerryError, LocalError, PeerError, ProtocolError, QemuError,
                          UserError)
from agent.memory.prefault import MAX_EXTENTS, Prefaulter
from agent.migration.link import Link, parse_message, send_control
from agent.migration.protocol import Kind, Op
from agent.qemu import vm
from agent.qemu import qmp as qmp_mod
from agent.qemu.migrate import enable_capabilities, wait_migration_done
from agent.qemu.vmspec import PAGE_SIZE, DestinationPaths, VmSpec, destination_argv
from agent.state import journal, vms
from agent.state.config import AgentConfig
from agent.storage.disk_sink import StorageSink, parse_disk_map, plan_targets

log = logging.getLogger(__name__)

# Batches decoded ahead of the one being applied: overlaps decryption (event loop) with
# decompression and copying (worker thread) while keeping memory bounded.
APPLY_QUEUE_DEPTH = 4
LOAD_TIMEOUT_S = 60.0
RESUME_TIMEOUT_S = 10.0
def _extents(value: Any) -> list[tuple[int, int]]:
    """The source's list of RAM extents holding data (a hint: bad input is ignored)."""
    if not isinstance(value, list):
        return []
    try:
        return [(int(o), int(n)) for o, n in value[:MAX_EXTENTS]]
    except (TypeError, ValueError):
        return []


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
    prefault: Prefaulter | None = None
    created_vm_dir: bool = False

    def close_ram(self) -> None:
        if self.prefault is not None:
            self.prefault.stop()
            self.prefault = None
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
    device_state: list[bytes] = field(default_factory=list)
    ram_done: bool = False
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
        argv = destination_argv(spec, paths, self.config.roots, self.config.qemu_path(),
                                targets)
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
        incoming.prefault = Prefaulter(incoming.ram, _extents(body.get("ram_extents")))
        launch = vm.LaunchSpec(name=spec.name, ram_size=spec.ram_size, ram_path=paths.ram_path,
                               qmp_path=paths.qmp_path, serial_path=paths.serial_log,
                               pidfile=paths.pidfile, log_path=paths.qemu_log)
        incoming.process = await vm.launch(launch, argv=argv)
        self._journal(incoming, pid=incoming.process.pid)
        incoming.qmp = await qmp_mod.connect(paths.qmp_path)
        await incoming.qmp.execute("migrate-set-capabilities", enable_capabilities())
        await incoming.qmp.execute("migrate-incoming", {"uri": f"unix:{paths.incoming_path}"})
        await incoming.storage.open(incoming.qmp)
        log.info("incoming %s from %s: QEMU pid %d waits for pages", spec.name, self.peer,
                 incoming.process.pid)
        await send_control(self.link, Op.PREPARED, dest_pid=incoming.process.pid,
                           npages=spec.npages)

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
        incoming = self.incoming
        assert incoming is not None and incoming.process is not None
        queue: asyncio.Queue[bytes | memoryview | None] = asyncio.Queue(APPLY_QUEUE_DEPTH)
        applier = asyncio.create_task(self._apply_pages(queue), name="apply-pages")
        qemu_exit = asyncio.create_task(incoming.process.wait(float("inf")), name="qemu-exit")
        watched = {applier, qemu_exit}  # either ending early is a failure
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
                    applier.result()  # raises the applier's failure
                    raise ProtocolError("page applier stopped unexpectedly")
                kind, payload = receive.result()
                if kind == Kind.RAM_BATCH:
                    await queue.put(payload)
                    continue
                if kind == Kind.DISK_BATCH:
                    assert incoming.storage is not None
                    await incoming.storage.apply(memoryview(payload))
                    continue
                if kind == Kind.DEVICE_STATE:
                    await self._device_state(bytes(payload))
                    continue
                msg = parse_message(kind, payload)
                if msg is None:
                    raise ProtocolError(f"unexpected data message kind {kind}")
                if msg.op is Op.ROUND:
                    continue
                if msg.op is Op.RAM_DONE:
                    await queue.put(None)
                    await applier  # every page is in the RAM file before devices load
                    watched.discard(applier)
                    assert incoming.storage is not None
                    await incoming.storage.finish()  # disks flushed, exports gone
                    self.ram_done = True
                    await self._device_state(b"")
                elif msg.op is Op.DEVICE_STATE_END:
                    await self._finish_device_state()
                elif msg.op is Op.COMMIT:
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
            for task in (applier, qemu_exit):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, FerryError):
                        await task

    async def _apply_pages(self, queue: asyncio.Queue[bytes | memoryview | None]) -> None:
        """Decode, validate and write page batches in order, off the event loop."""
        incoming = self.incoming
        assert incoming is not None and incoming.ram is not None
        npages = incoming.spec.npages
        loop = asyncio.get_running_loop()
        while (payload := await queue.get()) is not None:
            applied = await loop.run_in_executor(
                None, codec.decode_and_apply, payload, incoming.ram, npages, PAGE_SIZE)
            self.pages_applied += applied

    async def _device_state(self, chunk: bytes) -> None:
        """Buffer device state until RAM is complete, then stream it into QEMU."""
        if chunk:
            self.device_state.append(chunk)
        if not self.ram_done:
            return
        incoming = self.incoming
        assert incoming is not None
        if self.state_writer is None:
            _, self.state_writer = await asyncio.open_unix_connection(
                str(incoming.paths.incoming_path))
        for buffered in self.device_state:
            self.state_writer.write(buffered)
        self.device_state.clear()
        await self.state_writer.drain()

    async def _finish_device_state(self) -> None:
        """Close QEMU's incoming stream and wait for it to load; then tell the source."""
        incoming = self.incoming
        assert incoming is not None and incoming.qmp is not None
        if not self.ram_done:
            raise ProtocolError("device state ended before RAM was complete")
        mark = incoming.qmp.event_mark()
        await self._device_state(b"")
        assert self.state_writer is not None
        self.state_writer.close()
        with contextlib.suppress(ConnectionError):
            await self.state_writer.wait_closed()
        await wait_migration_done(incoming.qmp, mark, LOAD_TIMEOUT_S)
        await send_control(self.link, Op.LOADED, pages=self.pages_applied)

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
