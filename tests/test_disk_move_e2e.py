"""`ferry disk move` end to end: a running test guest's disks, written to while QEMU's mirror
copies them, moved by a real agent to other storage on the same host; the refusals; and a
move that fails or is cancelled half way leaves the VM on its old image."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.guest import GuestConfig, RunningGuest
from agent.guest.build import default_cache_dir
from agent.qemu import qmp
from agent.qemu.blockargv import current_disk_argv
from agent.qemu.vm import TCG_RAM_PADDING
from agent.service.control import ControlClient
from agent.state import vms
from agent.storage.disk_move import find_disk, move_name, plan_move, vm_disks
from agent.storage.disk_move import recover as recover_move
from agent.storage.disk_sink import SPACE_MARGIN
from agent.storage.disk_source import copyable_disks
from tests.agents import AgentPair, read_guest
from tests.test_storage_e2e import DiskWriter, disk_args, fill_up, make_disks

MIB = 1 << 20
VD0 = "/machine/peripheral/vd0/virtio-backend"
VD1 = "/machine/peripheral/vd1/virtio-backend"


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fdm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(root: Path) -> Iterator[Any]:
    """One real agent (b of a pair: the one with allowed paths) that may write in
    root/fast and root/tight."""
    for name in ("fast", "tight", "elsewhere"):
        (root / name).mkdir()
    pair = AgentPair.create(root, allow=(root / "fast", root / "tight"))
    with open(pair.b.home / "agent.toml", "a") as f:
        f.write("shutdown_grace_s = 1\n")   # a move still running then rolls back
    try:
        pair.b.start()
        yield pair.b
    finally:
        pair.cleanup()


def move(agent: Any, *args: str, timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    """`ferry disk move ... --json` against the agent: (exit code, report, stderr)."""
    try:
        done = subprocess.run(move_argv(agent, *args), capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"ferry disk move timed out:\n{agent.log()[-6000:]}") from exc
    lines = done.stdout.strip().splitlines()
    return done.returncode, json.loads(lines[-1]) if lines else {}, done.stderr


def move_argv(agent: Any, *args: str) -> list[str]:
    return [sys.executable, "-m", "agent", "disk", "move", "--home", str(agent.home), "--json",
            *args]


def boot(start_guest: Any, root: Path, *extra: str) -> tuple[RunningGuest, Path, Path, Path]:
    qcow2, raw = make_disks(root)
    writer_sock = root / "w.sock"
    guest = start_guest(config=GuestConfig(ws_pages=500, rate=2000),
                        ram_size=64 * MIB + TCG_RAM_PADDING, name="mv",
                        extra_args=(*disk_args(qcow2, raw, writer_sock), *extra))
    guest.wait_until(lambda s: s.passes >= 1, timeout=30, what="the first pass")
    return guest, qcow2, raw, writer_sock


async def _ask(sock: Path, command: str, args: dict[str, Any] | None = None) -> Any:
    async with qmp.connect(sock) as monitor:
        return await monitor.execute(command, args)


def ask(sock: Path, command: str, args: dict[str, Any] | None = None) -> Any:
    return asyncio.run(_ask(sock, command, args))


def files_of(sock: Path) -> dict[str, str]:
    """Each disk's image file as QEMU shows it now, by qdev path."""
    return {b["qdev"]: b["inserted"]["file"] for b in ask(sock, "query-block")
            if b.get("inserted")}


def ferry_nodes(sock: Path) -> list[str]:
    return [n["node-name"] for n in ask(sock, "query-named-block-nodes", {"flat": True})
            if n["node-name"].startswith("ferry-")]


def open_images(sock: Path) -> set[str]:
    return {n["file"] for n in ask(sock, "query-named-block-nodes", {"flat": True})}


def heartbeat_advances(guest: RunningGuest) -> None:
    beat = guest.mailbox().heartbeat
    guest.wait_until(lambda s: s.heartbeat > beat, timeout=10, what="the heartbeat")
    assert guest.process.returncode is None and guest.mailbox().errors == 0


def expected_image(original: Path, fmt: str, writes: list[tuple[int, int]], out: Path) -> Path:
    """The raw content a disk must have: the image as it was before the VM started, with
    the writer's writes (offset, pattern, 64 KiB each, in order) applied."""
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(original), str(out)],
                   check=True)
    with open(out, "r+b") as f:
        for offset, pattern in writes:
            f.seek(offset)
            f.write(bytes([pattern]) * 65536)
    return out


def compare(a: Path, fmt_a: str, b: Path, fmt_b: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
                          capture_output=True, text=True, check=False)


@pytest.mark.qemu
def test_disks_move_live_to_qcow2_and_raw_while_written(agent, start_guest, root) -> None:
    guest, qcow2, raw, writer_sock = boot(start_guest, root)
    # What the disks held before the VM wrote anything, for the final check.
    before = {VD0: root / "before0.qcow2", VD1: root / "before1.img"}
    shutil.copyfile(qcow2, before[VD0])
    shutil.copyfile(raw, before[VD1])
    fast = root / "fast"
    # Capped so each copy takes seconds: the writer gets in before the switch.
    moves = (("d0", fast / "d0.qcow2", "qcow2", VD0, "8M"),   # -drive qcow2 -> qcow2, by id
             ("d0", fast / "d0.img", "raw", VD0, "8M"),       # the moved disk again, to raw
             ("vd1", fast / "d1.qcow2", "qcow2", VD1, "4M"))  # -blockdev raw -> qcow2
    log: list[tuple[str, int, int]] = []     # every write, in order: (qdev, offset, pattern)
    for disk, target, fmt, qdev, speed in moves:
        old = files_of(guest.qmp_path)[qdev]
        writer = DiskWriter(writer_sock)
        writer.start()
        proc = subprocess.Popen(move_argv(agent, "--qmp", str(guest.qmp_path), disk,
                                          str(target), "--format", fmt, "--speed", speed),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Written while QEMU mirrors the disk; the writer stops while the copy still has
            # megabytes to go. HMP qemu-io writes from a nested event loop, and QEMU 7.2
            # aborts (block/io.c: `child->perm & BLK_PERM_WRITE`) when a mirror switches
            # the node under such a write; a guest's own writes wait in the switch's drain.
            wait_for_progress(agent, lambda p: p.get("phase") == "mirroring"
                              and p.get("bytes_done", 0) >= 3 * MIB // 2)
        finally:
            writer.stop.set()
            writer.join(10)
            out, err = proc.communicate(timeout=120)
        assert writer.error is None and len(writer.log) > 5, (writer.error, writer.log)
        log += writer.log
        report = json.loads(out.strip().splitlines()[-1])
        assert proc.returncode == 0, f"{report}\n{err}\n{agent.log()}"
        assert report["status"] == "completed" and report["format"] == fmt, report
        assert report["old_image"] == old and old in report["note"], report
        assert report["bytes"] >= report["virtual_size"], report
        assert files_of(guest.qmp_path)[qdev] == str(target)
        assert os.path.exists(old)                # kept for the operator
        # QEMU let go of the old image (an earlier move's node, a -blockdev's nodes).
        assert report["old_image_released"] is True
        assert old not in open_images(guest.qmp_path)
        assert ask(guest.qmp_path, "query-jobs") == []
        heartbeat_advances(guest)
    # A later migration copies what QEMU's block graph shows: the new images.
    disks = asyncio.run(_copyable(guest.qmp_path))
    assert sorted(d.path for d in disks) == [str(fast / "d0.img"), str(fast / "d1.qcow2")]
    # Written after the moves: through the new images.
    writer = DiskWriter(writer_sock)
    writer.start()
    deadline = time.monotonic() + 30
    while len(writer.log) < 40 and writer.is_alive():
        assert time.monotonic() < deadline, len(writer.log)
        time.sleep(0.05)
    writer.stop.set()
    writer.join(10)
    assert writer.error is None, writer.error
    log += writer.log
    ask(guest.qmp_path, "stop")          # nothing changes the images from here on
    for qdev, original, fmt, new, new_fmt in ((VD0, before[VD0], "qcow2", fast / "d0.img", "raw"),
                                              (VD1, before[VD1], "raw", fast / "d1.qcow2",
                                               "qcow2")):
        writes = [(offset, pattern) for device, offset, pattern in log if device == qdev]
        expected = expected_image(original, fmt, writes, root / f"expected-{fmt}.raw")
        result = compare(expected, "raw", new, new_fmt)
        assert result.returncode == 0, f"{new}: {result.stdout}{result.stderr}"
    assert open_images(guest.qmp_path) == {str(fast / "d0.img"), str(fast / "d1.qcow2")}
    ask(guest.qmp_path, "cont")
    heartbeat_advances(guest)
    # The jobs are in the agent's history as disk moves.
    with ControlClient(agent.home / "control.sock") as client:
        history = client.call({"op": "history"})["jobs"]
    assert [(e["direction"], e["status"]) for e in history] == [("local", "completed")] * 3


async def _copyable(sock: Path) -> Any:
    async with qmp.connect(sock) as monitor:
        return await copyable_disks(monitor)


@pytest.mark.qemu
def test_refusals_name_what_is_wrong_and_change_nothing(agent, start_guest, root) -> None:
    guest, qcow2, raw, writer_sock = boot(
        start_guest, root, "-drive", "if=none,id=cd0,media=cdrom",
        "-device", "ide-cd,drive=cd0,id=cdrom0")
    files = files_of(guest.qmp_path)
    existing = root / "fast" / "there.img"
    existing.write_bytes(b"")
    cases = [
        (("d0", str(root / "elsewhere" / "d0.qcow2")), "outside the agent's allowed paths"),
        (("d0", str(existing)), "already exists"),
        (("nosuch", str(root / "fast" / "x.img")), "no disk 'nosuch' in this VM; its disks: d0"),
        (("cd0", str(root / "fast" / "cd.img")), "removable media"),
        (("vd1", str(root / "fast" / "missing" / "x.img")), "does not exist"),
    ]
    for (disk, target), message in cases:
        rc, report, stderr = move(agent, "--qmp", str(guest.qmp_path), disk, target)
        assert rc == 1 and message in report["error"], (disk, report, stderr)
    # The unknown disk's refusal lists every disk of the VM, the -blockdev one included.
    rc, report, _ = move(agent, "--qmp", str(guest.qmp_path), "nosuch", str(root / "fast" / "x"))
    assert str(raw) in report["error"] and str(qcow2) in report["error"], report

    # Not enough space: a tmpfs smaller than the disk's data plus the margin.
    tight = root / "tight"
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={8 * MIB}", "ferry-test", str(tight)],
                   check=True)
    try:
        rc, report, _ = move(agent, "--qmp", str(guest.qmp_path), "d0", str(tight / "d0.qcow2"))
        assert rc == 1 and "not enough space for" in report["error"], report
        assert str(tight) in report["error"]
        assert list(tight.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(tight)], check=False)

    # A disk already in a block job.
    ask(writer_sock, "drive-mirror", {"device": "d0", "target": str(root / "slow.qcow2"),
                                      "format": "qcow2", "sync": "full", "speed": 1,
                                      "job-id": "slow"})
    try:
        rc, report, _ = move(agent, "--qmp", str(guest.qmp_path), "vd1", str(root / "fast" / "a"))
        assert rc == 1 and "in a block job (mirror job 'slow')" in report["error"], report
    finally:
        ask(writer_sock, "block-job-cancel", {"device": "slow", "force": True})

    # A VM the agent knows whose QEMU has gone, and an unknown name.
    vms.register(agent.config, vms.VmRecord(name="ghost", pid=os.getpid(),
                                            qmp_path=str(root / "none.sock"), ram_path="",
                                            vm_dir=str(root)))
    rc, report, stderr = move(agent, "ghost", "d0", str(root / "fast" / "g"))
    assert rc == 1 and f"VM ghost is not running (its QEMU, pid {os.getpid()}" in stderr, stderr
    rc, report, stderr = move(agent, "nobody", "d0", str(root / "fast" / "g"))
    assert rc == 1 and "no VM named 'nobody' on this agent (known: ghost)" in stderr, stderr
    vms.forget(agent.config, "ghost")

    # A VM that is not running.
    ask(writer_sock, "stop")
    try:
        rc, report, _ = move(agent, "--qmp", str(guest.qmp_path), "d0", str(root / "fast" / "b"))
        assert rc == 1 and "the VM is not running (QEMU status 'paused')" in report["error"]
    finally:
        ask(writer_sock, "cont")

    assert files_of(guest.qmp_path) == files
    assert sorted(p.name for p in (root / "fast").iterdir()) == ["there.img"]
    assert ferry_nodes(guest.qmp_path) == []
    heartbeat_advances(guest)


def wait_for_progress(agent: Any, until: Callable[[dict[str, Any]], bool],
                      timeout: float = 30) -> dict[str, Any]:
    """The agent's one running job once its latest progress passes `until`."""
    deadline = time.monotonic() + timeout
    while True:
        with ControlClient(agent.home / "control.sock") as client:
            jobs = client.call({"op": "jobs"})["jobs"]
        if jobs and until(jobs[0].get("progress") or {}):
            return dict(jobs[0])
        assert time.monotonic() < deadline, (jobs, agent.log()[-4000:])
        time.sleep(0.05)


def wait_for_phase(agent: Any, phase: str, timeout: float = 30) -> dict[str, Any]:
    """The agent's one running job once it shows `phase`."""
    return wait_for_progress(agent, lambda p: p.get("phase") == phase, timeout)


@contextlib.contextmanager
def slow_move(agent: Any, guest: RunningGuest, target: Path
              ) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """`ferry disk move` of d0 to a raw `target` at 1 MiB/s, once QEMU mirrors it: (the CLI
    process, the agent's job); the CLI is killed on the way out if still there."""
    proc = subprocess.Popen(move_argv(agent, "--qmp", str(guest.qmp_path), "d0", str(target),
                                      "--format", "raw", "--speed", "1M"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc, wait_for_phase(agent, "mirroring")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def left_on_old_image(guest: RunningGuest, files: dict[str, str], target: Path) -> None:
    assert files_of(guest.qmp_path) == files
    assert not target.exists()
    assert ferry_nodes(guest.qmp_path) == [] and ask(guest.qmp_path, "query-jobs") == []
    heartbeat_advances(guest)


def history_of(agent: Any, timeout: float = 30) -> list[dict[str, Any]]:
    """The agent's finished jobs, once it has one."""
    deadline = time.monotonic() + timeout
    while True:
        with ControlClient(agent.home / "control.sock") as client:
            history = client.call({"op": "history"})["jobs"]
        if history:
            return list(history)
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.05)


@pytest.mark.qemu
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_cli_stopped_mid_move_cancels_it_and_the_vm_stays_on_its_old_image(
        agent, start_guest, root, sig) -> None:
    guest, _, _, _ = boot(start_guest, root)
    files = files_of(guest.qmp_path)
    target = root / "fast" / "d0.img"
    with slow_move(agent, guest, target) as (proc, job):
        assert job["direction"] == "local" and target.exists()
        assert job["progress"]["bytes_total"] > 0
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:   # Ctrl-C: the CLI asks for the cancel and prints the report
        report = json.loads(out.strip().splitlines()[-1])
        assert proc.returncode == 1 and report["status"] == "cancelled", (report, err)
        assert "cancelling (the VM stays on its old image)" in err
    else:                      # killed: its connection closing cancels the job
        assert proc.returncode == -signal.SIGTERM
        [report] = history_of(agent)
        assert report["status"] == "cancelled", report
    assert report["note"] == f"the VM stays on its old image {files[VD0]}; the target was removed"
    left_on_old_image(guest, files, target)


@pytest.mark.qemu
def test_the_agent_stopping_mid_move_rolls_it_back(agent, start_guest, root) -> None:
    guest, _, _, _ = boot(start_guest, root)
    files = files_of(guest.qmp_path)
    target = root / "fast" / "d0.img"
    with slow_move(agent, guest, target) as (proc, _):
        agent.proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert agent.proc.wait(timeout=30) == 0, agent.log()
    report = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 1 and report["status"] == "cancelled", (report, err)
    left_on_old_image(guest, files, target)
    [entry] = [json.loads(line) for line in (agent.home / "history.jsonl").read_text()
               .splitlines()]
    assert entry["direction"] == "local" and entry["status"] == "cancelled", entry


@pytest.mark.qemu
def test_an_agent_killed_mid_move_undoes_it_when_restarted(agent, start_guest, root) -> None:
    """SIGKILL leaves QEMU mirroring into the target: the restarted agent finds the job it
    journaled, cancels the mirror, removes its node and the target."""
    guest, _, _, _ = boot(start_guest, root)
    files = files_of(guest.qmp_path)
    target = root / "fast" / "d0.img"
    with slow_move(agent, guest, target) as (proc, job):
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(timeout=30)
        proc.communicate(timeout=60)
    # What the dead agent left: QEMU still mirrors, the target grows.
    assert [j["id"] for j in ask(guest.qmp_path, "query-jobs")] == [f"ferry-mv-{job['job']}"]
    assert target.exists() and ferry_nodes(guest.qmp_path)
    agent.start()          # recovery runs before the agent listens
    left_on_old_image(guest, files, target)
    assert list((agent.home / "journal").glob("*.json")) == []
    assert (f"recovered disk move of {guest.qmp_path} (job {job['job']}): rolled back"
            in agent.log())


@pytest.mark.qemu
def test_recovery_keeps_a_move_that_had_switched(start_guest, root) -> None:
    """The agent died after QEMU switched the disk but before it dismissed the job: the
    move stands (the VM runs on the target), the job is dismissed, the target kept."""
    guest, _, _, _ = boot(start_guest, root)
    (root / "fast").mkdir()
    target = root / "fast" / "d0.qcow2"
    disk = find_disk(vm_disks(ask(guest.qmp_path, "query-block")), "d0")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target),
                    str(disk.virtual_size)], check=True)
    name = move_name("j1")

    async def move_by_hand() -> None:
        async with qmp.connect(guest.qmp_path) as monitor:
            await monitor.execute("blockdev-add", {
                "driver": "qcow2", "node-name": name,
                "file": {"driver": "file", "filename": str(target)}})
            mark = monitor.event_mark()
            await monitor.execute("blockdev-mirror", {"job-id": name, "device": disk.node,
                                                      "target": name, "sync": "full",
                                                      "auto-dismiss": False})
            await monitor.wait_event("BLOCK_JOB_READY", after=mark, timeout=60)
            await monitor.execute("job-complete", {"id": name})
            await monitor.wait_event("JOB_STATUS_CHANGE", after=mark, timeout=60,
                                     match=lambda e: e.data.get("status") == "concluded")
    asyncio.run(move_by_hand())
    line = asyncio.run(recover_move(str(guest.qmp_path), "j1", target))
    assert line == f"the move to {target} had completed: the VM runs on it"
    assert ask(guest.qmp_path, "query-jobs") == [] and target.exists()
    assert files_of(guest.qmp_path)[VD0] == str(target)
    # Asked again (a second restart), it still stands.
    assert asyncio.run(recover_move(str(guest.qmp_path), "j1", target)) == line
    heartbeat_advances(guest)


@pytest.mark.qemu
def test_ferry_cancel_of_a_detached_move(agent, start_guest, root) -> None:
    guest, _, raw, _ = boot(start_guest, root)
    files = files_of(guest.qmp_path)
    target = root / "fast" / "d1.qcow2"
    # Named as a VM the agent knows (its record), the disk by its image path.
    vms.register(agent.config, vms.VmRecord(name="mv", pid=guest.pid,
                                            qmp_path=str(guest.qmp_path), ram_path="",
                                            vm_dir=str(root), managed=False))
    done = subprocess.run(move_argv(agent, "mv", str(raw), str(target),
                                    "--format", "qcow2", "--speed", "512K", "--detach"),
                          capture_output=True, text=True, check=True)
    job_id = json.loads(done.stdout)["job"]
    wait_for_phase(agent, "mirroring")
    subprocess.run([sys.executable, "-m", "agent", "cancel", "--home", str(agent.home), job_id],
                   check=True, capture_output=True)
    history = history_of(agent)
    assert history[0]["job"] == job_id and history[0]["status"] == "cancelled", history
    left_on_old_image(guest, files, target)
    text = subprocess.run([sys.executable, "-m", "agent", "report", "--home", str(agent.home),
                           job_id], capture_output=True, text=True, check=True).stdout
    assert text.startswith(f"disk move cancelled: mv disk vd1 -> {target}"), text
    assert f"the VM stays on its old image {raw}; the target was removed" in text


@pytest.mark.qemu
def test_target_filling_up_mid_way_fails_and_the_vm_stays_on_its_old_image(
        agent, start_guest, root) -> None:
    guest, qcow2, _, _ = boot(start_guest, root)
    files = files_of(guest.qmp_path)
    tight = root / "tight"
    allocated = vm_disks(ask(guest.qmp_path, "query-block"))[0].allocated
    # Room enough to pass the space check; then the file system fills up under the mirror.
    size = allocated + SPACE_MARGIN + 4 * MIB
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "ferry-test", str(tight)],
                   check=True)
    target = tight / "d0.qcow2"
    try:
        proc = subprocess.Popen(move_argv(agent, "--qmp", str(guest.qmp_path), "d0",
                                          str(target), "--speed", "2M"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_phase(agent, "mirroring")
            fill_up(tight / "filler", leave=MIB)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        report = json.loads(out.strip().splitlines()[-1])
        assert proc.returncode == 1 and report["status"] == "failed", (report, err)
        assert "QEMU's mirror job failed" in report["error"], report
        assert "No space left on device" in report["error"], report
        left_on_old_image(guest, files, target)
        assert sorted(p.name for p in tight.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", "-l", str(tight)], check=False)
    assert qcow2.exists()


# ---------------------------------------------------------------------------- without QEMU

BLOCKS = [
    {"device": "d0", "qdev": VD0, "removable": False,
     "inserted": {"node-name": "#block1", "file": "/img/d0.qcow2", "drv": "qcow2", "ro": False,
                  "image": {"virtual-size": 8 * MIB, "actual-size": MIB, "cluster-size": 4096,
                            "backing-image": {"actual-size": 2 * MIB}}}},
    {"device": "", "qdev": VD1, "removable": False,
     "inserted": {"node-name": "n1", "file": "/img/d1.img", "drv": "raw", "ro": True,
                  "image": {"virtual-size": MIB, "actual-size": MIB}}},
]


def test_disks_are_found_by_drive_device_node_or_path() -> None:
    disks = vm_disks(BLOCKS)
    assert [find_disk(disks, n).node for n in ("d0", "vd0", "#block1", "/img/d0.qcow2")] == \
        ["#block1"] * 4
    assert find_disk(disks, "vd1").node == find_disk(disks, "n1").node == "n1"
    assert disks[0].allocated == 3 * MIB          # the backing chain counts: sync=full
    with pytest.raises(Exception, match=r"no disk 'x' in this VM; its disks: d0 \(node #block1"):
        find_disk(disks, "x")


def test_plan_refuses_a_read_only_disk_and_keeps_cluster_sizes_sane(tmp_path) -> None:
    disks = vm_disks(BLOCKS)
    with pytest.raises(Exception, match="is read-only"):
        plan_move(disks[1], [], str(tmp_path / "x.img"), None, (tmp_path,))
    plan = plan_move(disks[0], [], str(tmp_path / "x.qcow2"), None, (tmp_path,))
    assert plan.format == "qcow2" and plan.cluster_size == 64 << 10   # 4 KiB is not kept
    assert plan_move(disks[0], [], str(tmp_path / "x.img"), "raw",
                     (tmp_path,)).cluster_size is None
    assert plan.needed == 3 * MIB + SPACE_MARGIN


def test_argv_follows_the_block_graph_after_moves() -> None:
    argv = ["-m", "64M", "-drive", "file=/old/d0.qcow2,format=qcow2,if=none,id=d0",
            "-device", "virtio-blk-pci,drive=d0,id=vd0",
            "-blockdev", "driver=file,filename=/old/d1.img,node-name=f1",
            "-blockdev", "driver=raw,file=f1,node-name=n1",
            "-device", "virtio-blk-pci,drive=n1,id=vd1",
            "-drive", "file=/old/d2.img,format=raw,if=virtio", "-nodefaults"]
    blocks = [{"device": "d0", "qdev": VD0,
               "inserted": {"file": "/new/d0.img", "drv": "raw"}},
              {"device": "", "qdev": VD1,
               "inserted": {"file": "/new/d1.qcow2", "drv": "qcow2"}},
              {"device": "virtio0", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
               "inserted": {"file": "/new/d2.img", "drv": "raw"}}]
    assert current_disk_argv(argv, blocks) == [
        "-m", "64M", "-drive", "file=/new/d0.img,format=raw,if=none,id=d0",
        "-device", "virtio-blk-pci,drive=d0,id=vd0",
        "-blockdev", "driver=file,filename=/new/d1.qcow2,node-name=f1",
        "-blockdev", "driver=qcow2,file=f1,node-name=n1",
        "-device", "virtio-blk-pci,drive=n1,id=vd1",
        "-drive", "file=/new/d2.img,format=raw,if=virtio", "-nodefaults"]
    unchanged = [{"device": "d0", "qdev": VD0,
                  "inserted": {"file": "/old/d0.qcow2", "drv": "qcow2"}}]
    assert current_disk_argv(argv, unchanged) == argv


@pytest.fixture
def pair(root: Path) -> Iterator[AgentPair]:
    """Two real agents; b may write in root/fast (disk moves, migrated disks)."""
    (root / "fast").mkdir()
    agents = AgentPair.create(root, allow=(default_cache_dir(), root / "fast"))
    try:
        agents.start()
        yield agents
    finally:
        agents.cleanup()


@pytest.mark.qemu
def test_a_migration_after_a_move_copies_the_new_images(pair, start_guest, root) -> None:
    guest, qcow2, raw, writer_sock = boot(start_guest, root)
    fast = root / "fast"
    moved = {VD0: fast / "d0.img", VD1: fast / "d1.qcow2"}
    # Moved while nothing writes (see the first test: HMP qemu-io against a switch), then
    # written to through the new images while the migration copies them.
    for disk, target, fmt in (("d0", moved[VD0], "raw"), ("vd1", moved[VD1], "qcow2")):
        rc, report, stderr = move(pair.b, "--qmp", str(guest.qmp_path), disk, str(target),
                                  "--format", fmt)
        assert rc == 0, f"{report}\n{stderr}\n{pair.b.log()}"
    writer = DiskWriter(writer_sock)
    writer.start()
    try:
        writes_before = len(writer.log)
        copies = {VD0: fast / "m0.img", VD1: fast / "m1.qcow2"}
        rc, report, stderr = pair.migrate(
            "--qmp", str(guest.qmp_path), "--bandwidth", "40M",
            "--disk-map", f"{moved[VD0]}={copies[VD0]}", "--disk-map",
            f"{moved[VD1]}={copies[VD1]}")
    finally:
        writer.stop.set()
        writer.join(10)
    assert rc == 0, f"{report}\n{stderr}\n{pair.logs()}"
    assert sorted(d["path"] for d in report["disks"]) == sorted(map(str, moved.values()))
    assert len(writer.log) > writes_before    # the guest's disks changed during the copy
    deadline = time.monotonic() + 10
    while guest.process.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # The destination's disks are the moved images as the source left them, and they differ
    # from the images the VM started with (written after the move).
    for qdev, new_fmt, old, old_fmt in ((VD0, "raw", qcow2, "qcow2"),
                                        (VD1, "qcow2", raw, "raw")):
        assert compare(moved[qdev], new_fmt, copies[qdev], new_fmt).returncode == 0, qdev
        assert compare(old, old_fmt, copies[qdev], new_fmt).returncode == 1, qdev
    record = pair.b.vm_record("mv")
    assert read_guest(record.ram_path).errors == 0
    assert set(files_of(Path(record.qmp_path)).values()) == set(map(str, copies.values()))


def test_a_disk_moves_progress_shows_bytes_of_the_disk() -> None:
    from agent.commands.render import bar_figures, progress_line
    event = {"event": "progress", "phase": "mirroring", "bytes_done": 48 * MIB,
             "bytes_total": 96 * MIB, "throughput_bps": 8 * MIB}
    assert progress_line(event) == "mirroring      48.0 MiB of 96.0 MiB  8.0 MiB/s"
    assert bar_figures(event) == (48 * MIB, 96 * MIB)


def test_the_command_line_takes_a_vm_name_or_a_qmp_socket(tmp_path) -> None:
    from agent.cli import build_parser
    from agent.commands.disk_cmds import request_from_args
    parser = build_parser()
    by_socket = parser.parse_args(["disk", "move", "--qmp", "/run/q.sock", "d0", "new.img"])
    request = request_from_args(by_socket)
    assert request["vm"] is None and request["disk"] == "d0"
    assert request["target"] == str(Path.cwd() / "new.img")   # the agent has its own cwd
    by_name = parser.parse_args(["disk", "move", "web01", "vd0", "/p/x.img", "--format", "raw",
                                 "--speed", "200M"])
    assert request_from_args(by_name)["vm"] == "web01"
    assert request_from_args(by_name)["speed"] == 200 * MIB   # as --bandwidth reads rates
    with pytest.raises(Exception, match="name a VM, or give --qmp PATH"):
        request_from_args(parser.parse_args(["disk", "move", "web01", "vd0", "/p/x.img",
                                             "--qmp", "/q"]))
