"""agent.qemu.vm: accelerator choice, QEMU argv, pid/argv discovery and describe_vm on real
QEMUs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent.errors import QemuError, QemuStartError, UserError, VmNotMigratableError
from agent.qemu import qmp, vm
from agent.qemu.vmspec import ram_backend_of, split_options

MIB = 1 << 20


def spec_in(directory: Path, **kwargs) -> vm.LaunchSpec:
    return vm.LaunchSpec.in_directory(directory, "t1", 64 * MIB, **kwargs)


# ---------------------------------------------------------------------------- no QEMU needed

def test_accel_override_from_environment():
    assert vm.choose_accel({vm.ACCEL_ENV: "tcg"}).accel is vm.Accel.TCG
    assert vm.choose_accel({vm.ACCEL_ENV: "KVM"}).accel is vm.Accel.KVM
    with pytest.raises(UserError, match="kvm.*tcg"):
        vm.choose_accel({vm.ACCEL_ENV: "hvf"})


@pytest.mark.skipif(not os.path.exists(vm.PVM_MODULE), reason="only on PVM hosts")
def test_pvm_is_not_taken_for_hardware_kvm():
    choice = vm.choose_accel({})
    assert choice.accel is vm.Accel.TCG
    assert choice.args() == ["-accel", "tcg,thread=multi", "-cpu", "max"]


def test_argv_is_migratable_and_accepted_by_vmspec(tmp_path):
    spec = spec_in(tmp_path, kernel=tmp_path / "k.elf", extra_args=("-incoming", "defer"))
    argv = vm.qemu_argv(spec, vm.AccelChoice(vm.Accel.TCG, "test"))
    assert argv[0] == vm.QEMU_BINARY
    assert argv[-2:] == ["-incoming", "defer"]
    assert "pc,memory-backend=ram0" in argv
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    backend_id, size, mem_path, share = ram_backend_of(split_options(argv[1:]))
    assert (backend_id, size, mem_path, share) == ("ram0", 64 * MIB, str(spec.ram_path), True)


def test_launch_spec_checks_its_sizes(tmp_path):
    with pytest.raises(UserError, match="multiple"):
        vm.LaunchSpec.in_directory(tmp_path, "t1", 64 * MIB + 1)
    with pytest.raises(UserError, match="CPU"):
        spec_in(tmp_path, cpus=0)


def test_read_argv_of_a_missing_process():
    with pytest.raises(QemuError, match="pid"):
        vm.read_argv(2**22 + 12345)


def test_peer_pid_of_a_dead_socket(tmp_path):
    with pytest.raises(QemuError, match="cannot reach"):
        vm.peer_pid(tmp_path / "nothing.sock")


# ---------------------------------------------------------------------------- real QEMU

@pytest.mark.qemu
def test_peer_pid_and_argv(guest):
    assert vm.peer_pid(guest.qmp_path) == guest.pid
    argv = vm.read_argv(guest.pid)
    assert argv == guest.process.argv


@pytest.mark.qemu
def test_peer_pid_while_another_client_holds_qmp(guest):
    async def main():
        async with qmp.connect(guest.qmp_path) as q:
            assert vm.peer_pid(guest.qmp_path) == guest.pid
            # QEMU queues our probe connection and drops it later; the session is unharmed.
            assert (await q.execute("query-status"))["running"]
    asyncio.run(main())


@pytest.mark.qemu
def test_describe_vm_with_shared_ram(guest):
    info = asyncio.run(vm.describe_vm(guest.qmp_path))
    assert info.pid == guest.pid
    assert info.name == "ferry-guest"
    assert info.ram_backend_id == "ram0"
    assert info.ram_path == str(guest.ram_path)
    assert info.ram_size == guest.ram_size
    assert info.ram_shared
    assert info.machine.startswith("pc-i440fx")
    assert info.argv == tuple(guest.process.argv)


@pytest.mark.qemu
def test_describe_vm_reuses_an_open_session(guest):
    async def main():
        async with qmp.connect(guest.qmp_path) as q:
            return await vm.describe_vm(guest.qmp_path, qmp=q)
    assert asyncio.run(main()).pid == guest.pid


def run_paused_qemu(directory: Path, memory_args: list[str]) -> subprocess.Popen[bytes]:
    """A QEMU started by hand (paused, no guest) with the given RAM options."""
    sock = directory / "qmp.sock"
    proc = subprocess.Popen(
        [vm.QEMU_BINARY, "-name", "plain", "-S", "-display", "none", "-nodefaults",
         "-no-user-config", "-accel", "tcg", *memory_args,
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail("QEMU did not start")
        time.sleep(0.01)
    return proc


@pytest.mark.qemu
@pytest.mark.parametrize("memory, expected", [
    (["-m", "64M"], "memory-backend-ram"),
    (["-object", "memory-backend-file,id=ram0,size=64M,mem-path={ram}",
      "-machine", "pc,memory-backend=ram0"], "share=off"),
], ids=["plain-m", "file-not-shared"])
def test_describe_vm_refuses_ram_ferry_cannot_read(vm_dir, memory, expected):
    ram = vm_dir / "plain.ram"
    proc = run_paused_qemu(vm_dir, [arg.format(ram=ram) for arg in memory])
    try:
        with pytest.raises(VmNotMigratableError) as info:
            asyncio.run(vm.describe_vm(vm_dir / "qmp.sock"))
    finally:
        proc.kill()
        proc.wait()
        ram.unlink(missing_ok=True)
    message = str(info.value)
    assert expected in message
    assert ("-object memory-backend-file,id=ram0,size=64M,mem-path=/dev/shm/plain.ram,"
            "share=on -machine memory-backend=ram0") in message
    assert "<access mode='shared'/>" in message


@pytest.mark.qemu
def test_launch_reports_why_qemu_exited(vm_dir):
    spec = spec_in(vm_dir, extra_args=("-no-such-option",))
    with pytest.raises(QemuStartError, match="no-such-option"):
        asyncio.run(vm.launch(spec))
    spec.ram_path.unlink(missing_ok=True)


@pytest.mark.qemu
def test_launch_stop_and_cleanup(vm_dir):
    spec = spec_in(vm_dir, extra_args=("-S",))

    async def main():
        proc = await vm.launch(spec)
        try:
            assert vm.peer_pid(spec.qmp_path) == proc.pid
            assert int(spec.pidfile.read_text()) == proc.pid
            # QEMU exits cleanly on SIGTERM, or dies of it if it has not set its handler yet.
            assert await proc.stop() in (0, -signal.SIGTERM)
            assert proc.returncode is not None
        finally:
            proc.cleanup()
    asyncio.run(main())
    assert not spec.ram_path.exists() and not spec.qmp_path.exists()
