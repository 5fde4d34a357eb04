"""What a restarted agent does with each job its journal holds: the one safe thing.

  destination, INCOMING         the VM is not ours: kill every QEMU of the job (its pid, or
                                any QEMU naming its RAM file: one launched an instant
                                before the agent died), remove its files; outcome REMOVED
  destination, COMMIT_RECEIVED  the VM is ours, the source stopped for good: keep it,
                                `cont` it if it is paused, record it; outcome RESUMED (if
                                its QEMU is gone, REMOVED: the source may resume)
  source, PRECOPY / STOPPED     COMMIT never left: resume the source VM, its disks' write
                                caps lifted (the journal holds their own limits)
  source, COMMITTING            COMMIT may have left: ask the destination (STATUS) and
                                resume or quit as it answers; until it answers, the VM
                                stays stopped and the agent keeps asking
  source, COMMITTED             the VM runs at the destination: the source QEMU quits
  disk-move, MOVING             agent.storage.disk_move.recover: a switched move stands,
                                anything short of it is undone (job, node, target)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.errors import FerryError, QemuError
from agent.hostnet import devices
from agent.qemu import qmp as qmp_mod
from agent.qemu import vm
from agent.state import journal, outcomes, vms
from agent.state.config import AgentConfig
from agent.state.journal import Entry, Step
from agent.storage import disk_move, disk_throttle

log = logging.getLogger(__name__)

AskStatus = Callable[[str, str], Awaitable[str]]
"""(peer, job) -> the destination's answer: resumed, removed, pending or unknown."""


async def recover(config: AgentConfig) -> list[Entry]:
    """Finish or undo every journaled job that needs no peer; the source jobs whose
    outcome only the destination knows are returned (journal kept) for resolve()."""
    unresolved = []
    for entry in journal.entries(config):
        if entry.role == "disk-move":
            target = Path(entry.disks[0]) if entry.disks else None
            line = (await disk_move.recover(entry.qmp_path, entry.job, target)
                    if target is not None else "no target was recorded: nothing to undo")
            journal.remove(config, entry.job)
            log.warning("recovered disk move of %s (job %s): %s", entry.vm, entry.job, line)
            continue
        if entry.role == "destination":
            line = (await keep_committed(config, entry) if entry.step is Step.COMMIT_RECEIVED
                    else remove_incoming(config, entry))
        elif entry.step is Step.COMMITTING:
            unresolved.append(entry)
            log.error("outgoing %s (job %s): COMMIT may have reached %s; the source VM stays "
                      "stopped until %s says whether it runs the VM", entry.vm, entry.job,
                      entry.peer, entry.peer)
            continue
        elif entry.step is Step.COMMITTED:
            line = await quit_source(config, entry)
        else:
            line = await resume_source(entry)
        journal.remove(config, entry.job)
        log.warning("recovered %s %s (job %s): %s",
                    "incoming" if entry.role == "destination" else "outgoing", entry.vm,
                    entry.job, line)
    return unresolved


async def resolve(config: AgentConfig, entry: Entry, ask: AskStatus) -> str | None:
    """Settle a source job left COMMITTING by asking its destination; what was done, or
    None while the destination cannot tell yet (unreachable, or the job still runs)."""
    try:
        answer = await ask(entry.peer, entry.job)
    except (FerryError, OSError) as exc:
        log.info("job %s (vm %s): %s cannot be asked yet: %s", entry.job, entry.vm, entry.peer,
                 exc)
        return None
    if answer == outcomes.Outcome.RESUMED:
        line = await quit_source(config, entry)
    elif answer in (outcomes.Outcome.REMOVED, "unknown"):
        line = await resume_source(entry)
    else:
        return None
    journal.remove(config, entry.job)
    line = f"{entry.peer} answered {answer}: {line}"
    log.warning("resolved outgoing %s (job %s): %s", entry.vm, entry.job, line)
    return line


# ---------------------------------------------------------------------------- destination

def remove_incoming(config: AgentConfig, entry: Entry) -> str:
    """Kill the unfinished copy's QEMU(s) and remove everything made for it."""
    pids = set(vm.qemu_pids_mentioning(entry.ram_path)) if entry.ram_path else set()
    if entry.pid and vm.is_qemu(entry.pid):
        pids.add(entry.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if entry.ram_path:
        Path(entry.ram_path).unlink(missing_ok=True)
    for disk in entry.disks:
        Path(disk).unlink(missing_ok=True)
    for link in entry.links:
        devices.delete_link(link)
    if entry.vm_dir:
        shutil.rmtree(entry.vm_dir, ignore_errors=True)
    outcomes.record(config, entry.job, outcomes.Outcome.REMOVED, entry.vm)
    return f"removed the unfinished copy (QEMU {sorted(pids) or 'none'} killed)"


async def keep_committed(config: AgentConfig, entry: Entry) -> str:
    """COMMIT had arrived: the guest is ours; make sure it runs and is recorded."""
    if not (entry.pid and vm.is_qemu(entry.pid)):
        remove_incoming(config, entry)
        return "COMMIT had arrived but the QEMU is gone: nothing runs here (source may resume)"
    try:
        async with qmp_mod.connect(entry.qmp_path) as q:
            status = (await q.execute("query-status")).get("status")
            if status != "running":
                await q.execute("cont")
    except QemuError as exc:
        return f"COMMIT had arrived; could not reach its QEMU {entry.pid} to resume it: {exc}"
    vms.register(config, vms.VmRecord(name=entry.vm, pid=entry.pid, qmp_path=entry.qmp_path,
                                      ram_path=entry.ram_path, vm_dir=entry.vm_dir,
                                      managed=True, nics=list(entry.nics)))
    outcomes.record(config, entry.job, outcomes.Outcome.RESUMED, entry.vm)
    return f"COMMIT had arrived: kept the VM (pid {entry.pid}, was {status})"


# ---------------------------------------------------------------------------- source

async def resume_source(entry: Entry) -> str:
    """Resume a source VM whose COMMIT never took effect."""
    try:
        async with qmp_mod.connect(entry.qmp_path) as q:
            with contextlib.suppress(QemuError):
                await q.execute("migrate_cancel")
            uncapped = await _lift_disk_caps(q, entry)
            status = (await q.execute("query-status")).get("status")
            if status == "running":
                return f"source VM was running{uncapped}"
            await q.execute("cont")
            return f"source VM resumed (was {status}){uncapped}"
    except QemuError as exc:
        return f"could not reach the source VM to resume it: {exc}"


async def _lift_disk_caps(q: qmp_mod.Qmp, entry: Entry) -> str:
    """Put back the own limits of the disks whose writes the job capped."""
    lifted = 0
    for args in entry.disk_limits:
        try:
            await disk_throttle.restore(q, args)
            lifted += 1
        except QemuError as exc:
            log.error("job %s (vm %s): could not lift the write cap of %s: %s", entry.job,
                      entry.vm, args.get("device") or args.get("id"), exc)
    return f"; write caps lifted on {lifted} disk(s)" if lifted else ""


async def quit_source(config: AgentConfig, entry: Entry) -> str:
    """The VM runs at the destination: the stopped source QEMU quits, its RAM freed."""
    line = "source QEMU already gone"
    with contextlib.suppress(QemuError):
        async with qmp_mod.connect(entry.qmp_path) as q:
            status = (await q.execute("query-status")).get("status")
            if status == "running":   # never: it would be a second copy. Say so loudly.
                log.error("job %s (vm %s): the source VM runs although %s took it over; "
                          "stopping it", entry.job, entry.vm, entry.peer)
            await q.quit()
            line = f"source QEMU quit (was {status})"
    if entry.vm:
        vms.release_departed(config, entry.vm)
    return line
