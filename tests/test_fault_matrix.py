"""The fault matrix: for every step of the protocol (from its tables) and every fault, a
real migration between real agents is held at that step, the fault injected, what was
killed restarted, and the invariant checked once everything settled: exactly one copy of
the guest runs (none only when the source QEMU itself was killed before the destination
took over), its self-check found no error, nothing is left on the other host, and no
journal entry is left to recover."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import identity
from agent.guest import GuestConfig, RunningGuest
from agent.guest.build import default_cache_dir
from agent.migration import faults
from agent.migration.conversation import DATA, TABLES, Dir, Role, State, step_name
from agent.migration.protocol import Kind, Op
from agent.qemu import qmp
from agent.qemu.vm import TCG_RAM_PADDING
from agent.state import journal
from tests.agents import AgentPair, CuttableProxy, pid_alive, read_guest

pytestmark = pytest.mark.qemu

MIB = 1 << 20
LINK_TIMEOUT_S = 3          # agents give up on a stalled link after this
RESUME_WINDOW_S = 4         # a destination waits this long for the source to reconnect
SETTLE_S = 40.0
GUEST = GuestConfig(ws_pages=500, rate=2000, fill_pages=1024)
SIDE_MESSAGES = (Op.ABORT, Op.ABORTED, Op.ERROR, Op.STATUS, Op.RESUME, Op.RESUMED, Op.ACK)


def matrix_steps() -> list[str]:
    """Where to hold: walking the source's table along a migration, the receiver's step
    for each message (before it acts on it), the first page batch standing for pre-copy,
    plus COMMIT just sent (the source's side)."""
    table = TABLES[Role.SOURCE]
    state, out = State.IDLE, []
    while state is not State.DONE:
        moves = [(d, m, n) for (s, d, m), n in table.items()
                 if s is state and m not in SIDE_MESSAGES]
        for direction, message, nxt in moves:
            if nxt is state and message is not Kind.RAM_BATCH:
                continue   # the stream and disk blocks: held at the page batches instead
            receiver = Role.DESTINATION if direction is Dir.SEND else Role.SOURCE
            step = step_name(receiver, Dir.RECV, message)
            if step not in out:
                out.append(step)
        state = next(n for d, m, n in moves if n is not state)
    out.insert(out.index("destination:recv:commit"), "source:send:commit")
    assert all(m in DATA or isinstance(m, Op) for _, _, m in table)
    return out


FAULTS = ("kill-source-agent", "kill-destination-agent", "kill-destination-qemu",
          "kill-source-qemu", "cut-link", "stall-link")
NOT_FAULTS = {
    ("source:recv:committed", "kill-destination-qemu"):
        "the VM runs at the destination only: killing its QEMU is a crash there",
    ("source:send:commit", "kill-destination-qemu"):
        "races the destination's resume; held deterministically at destination:recv:commit",
}
CASES = [pytest.param(step, fault, id=f"{step}-{fault}",
                      marks=[pytest.mark.skip(reason=NOT_FAULTS[(step, fault)])]
                      if (step, fault) in NOT_FAULTS else [])
         for step in matrix_steps() for fault in FAULTS]


@pytest.fixture
def held(request, monkeypatch) -> Iterator[tuple[AgentPair, CuttableProxy]]:
    step = request.node.callspec.params["step"]
    monkeypatch.setenv(faults.HOLD_ENV, step)
    root = Path(tempfile.mkdtemp(prefix="fy-"))
    pair = AgentPair.create(root, allow=(default_cache_dir(),))
    for agent in (pair.a, pair.b):
        with open(agent.home / "agent.toml", "a") as f:
            f.write(f"link_timeout_s = {LINK_TIMEOUT_S}\n"
                    f"resume_window_s = {RESUME_WINDOW_S}\n")
    pair.start()
    proxy = CuttableProxy(pair.b.port)
    peer = identity.load_peers(pair.a.home).by_name("hostb")
    identity.trust_peer(pair.a.home, "hostb", peer.public_key, f"127.0.0.1:{proxy.port}")
    try:
        yield pair, proxy
    finally:
        proxy.close()
        pair.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def marker(pair: AgentPair, step: str) -> Path:
    home = pair.a.home if step.startswith("source") else pair.b.home
    return home / f"hold-{step.replace(':', '-')}"


def wait(check, what: str, timeout: float, context=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{context()}"
        time.sleep(0.02)


def source_status(guest: RunningGuest) -> str | None:
    """The source QEMU's run state, None once it is gone."""
    if guest.process.returncode is not None:
        return None

    async def ask() -> str:
        async with qmp.connect(guest.qmp_path) as q:
            return str((await q.execute("query-status")).get("status"))
    try:
        return asyncio.run(ask())
    except Exception:
        return None if guest.process.returncode is not None else "unreachable"


def settled(pair: AgentPair) -> bool:
    return not any(journal.entries(a.config) for a in (pair.a, pair.b))


def inject(fault: str, pair: AgentPair, proxy: CuttableProxy, guest: RunningGuest) -> None:
    if fault == "kill-source-agent":
        pair.a.stop(signal.SIGKILL)
    elif fault == "kill-destination-agent":
        pair.b.stop(signal.SIGKILL)
    elif fault == "kill-destination-qemu":
        pid = pair.b.incoming_pid("mig")
        if pid is not None and pid_alive(pid):
            subprocess.run(["kill", "-9", str(pid)], check=False)
    elif fault == "kill-source-qemu":
        guest.process.kill()
    elif fault == "cut-link":
        proxy.cut()
    elif fault == "stall-link":
        proxy.stall()


@pytest.mark.parametrize("step, fault", CASES)
def test_fault_at_step_leaves_exactly_one_copy(held, start_guest, step, fault) -> None:
    pair, proxy = held
    guest = start_guest(config=GUEST, ram_size=64 * MIB + TCG_RAM_PADDING, name="mig")
    guest.wait_until(lambda s: s.passes >= 1, timeout=30, what="the first pass")
    cli = pair.popen_migrate("--qmp", str(guest.qmp_path))
    hold = marker(pair, step)
    wait(lambda: hold.exists() or cli.poll() is not None, f"the hold at {step}", 60)
    assert hold.exists(), f"the migration ended before {step}: {cli.communicate()}"
    inject(fault, pair, proxy, guest)
    hold.unlink()
    for agent in (pair.a, pair.b):
        if agent.proc is not None and agent.proc.poll() is not None:
            agent.start()           # as systemd would: recovery runs at start
    out, err = cli.communicate(timeout=120)
    lines = out.strip().splitlines()
    report = json.loads(lines[-1]) if lines else {}
    wait(lambda: settled(pair), "every journal entry to be resolved", SETTLE_S,
         lambda: f"report {report}\n{err}\n{pair.logs()}")

    recorded = pair.b.home / "vms" / "mig" / "vm.json"
    record = pair.b.vm_record("mig") if recorded.exists() else None
    destination_runs = record is not None and pid_alive(record.pid)
    wait(lambda: source_status(guest) in (None, "running"),
         "the source QEMU to run or be gone", 10)
    status = source_status(guest)
    copies = int(destination_runs) + int(status == "running")
    context = f"{step} {fault}: report {report}\n{err}\n{pair.logs()}"
    if fault == "kill-source-qemu" and not destination_runs:
        assert copies == 0, context
    else:
        assert copies == 1, context
    if destination_runs:
        assert status is None, context           # the source QEMU quit
        first = read_guest(record.ram_path)
        wait(lambda: read_guest(record.ram_path).passes >= first.passes + 2,
             "two passes on the destination", 15)
        assert read_guest(record.ram_path).errors == 0, context
        assert report.get("status") in (None, "completed", "unknown"), context
    else:
        if status == "running":
            before = guest.mailbox()
            guest.wait_until(lambda s: s.heartbeat > before.heartbeat + 50, timeout=10,
                             what="the source guest to keep running")
            assert guest.mailbox().errors == 0, context
        wait(lambda: pair.b.leftovers() == [] and not any(
            pid_alive(p) for p in [pair.b.incoming_pid("mig") or 0] if p),
            "the destination to be clean", 15)
        assert report.get("status") in (None, "failed", "unknown"), context
