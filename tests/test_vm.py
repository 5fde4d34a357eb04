"""agent.qemu.vm: accelerator choice, QEMU argv, pid/argv discovery and describe_vm on real
QEMUs."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import time
from pathlib import Path

import pytest

from agent.errors import QemuError, UserError
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
    backend = ram_backend_of(split_options(argv[1:]))
    assert backend is not None
    assert (backend.id, backend.qom_type, backend.size, backend.mem_path, backend.share) == (
        "ram0", "memory-backend-file", 64 * MIB, str(spec.ram_path), True)
    private = vm.qemu_argv(dataclasses.replace(spec, private_ram=True),
                           vm.AccelChoice(vm.Accel.TCG, "test"))
    assert ram_backend_of(split_options(private[1:])) is None
    assert "-object" not in private and ["-m", "64M"] == private[
        private.index("-m"):private.index("-m") + 2]


def test_launch_runs_qemu_with_the_malloc_tunables(tmp_path, monkeypatch):
    # glibc drops GLIBC_TUNABLES from a process's visible environment once it has read it,
    # so what QEMU is started with is checked where it is started (the effect: bench disk).
    seen = {}

    def popen(argv, **kwargs):
        seen.update(kwargs)
        raise OSError(2, "No such file or directory")
    monkeypatch.setattr(vm.subprocess, "Popen", popen)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with pytest.raises(vm.QemuStartError):
        asyncio.run(vm.launch(spec_in(tmp_path), argv=["qemu-system-x86_64"]))
    assert seen["env"]["GLIBC_TUNABLES"] == ("glibc.malloc.trim_threshold=67108864:"
                                             "glibc.malloc.mmap_threshold=8388608")


def test_tcg_dirty_log_bug_sizes():
    tcg, kvm, old, new = vm.Accel.TCG, vm.Accel.KVM, (7, 2, 22), (9, 0, 0)
    assert vm.tcg_dirty_log_unsafe(64 * MIB, tcg, old)
    assert not vm.tcg_dirty_log_unsafe(64 * MIB + 8192, tcg, old)
    assert not vm.tcg_dirty_log_unsafe(64 * MIB, kvm, old)
    assert not vm.tcg_dirty_log_unsafe(64 * MIB, tcg, new)
    assert vm.dirty_log_safe_size(64 * MIB, tcg, old) == 64 * MIB + 8192
    assert vm.dirty_log_safe_size(64 * MIB + 4096, tcg, old) == 64 * MIB + 4096
    assert vm.qemu_binary_version() >= (7, 0, 0)


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
    assert info.ram_backend_id == info.ram_block == "ram0"
    assert info.ram_backend_type == "memory-backend-file"
    assert info.ram_path == str(guest.ram_path)
    assert info.ram_size == guest.ram_size
    assert info.accel is vm.Accel.TCG
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
@pytest.mark.parametrize("memory, block, backend_type, path", [
    # QEMU >= 5 gives plain -m RAM an implicit backend named after the block.
    (["-m", "64M"], "pc.ram", "memory-backend-ram", False),
    (["-object", "memory-backend-ram,id=mem0,size=64M", "-m", "64M",
      "-machine", "pc,memory-backend=mem0"], "mem0", "memory-backend-ram", False),
    (["-object", "memory-backend-file,id=ram0,size=64M,mem-path={ram}", "-m", "64M",
      "-machine", "pc,memory-backend=ram0"], "ram0", "memory-backend-file", True),
], ids=["plain-m", "backend-ram", "file-not-shared"])
def test_describe_vm_names_the_main_ram_block(vm_dir, memory, block, backend_type, path):
    ram = vm_dir / "plain.ram"
    proc = run_paused_qemu(vm_dir, [arg.format(ram=ram) for arg in memory])
    try:
        info = asyncio.run(vm.describe_vm(vm_dir / "qmp.sock"))
    finally:
        proc.kill()
        proc.wait()
        ram.unlink(missing_ok=True)
    assert (info.ram_block, info.ram_size, info.ram_backend_type) == (block, 64 * MIB,
                                                                      backend_type)
    assert info.ram_path == (str(ram) if path else "")
