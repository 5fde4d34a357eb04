"""The destination's argv check and rewrite: accepted forms, refusals, host paths replaced."""


import json

import pytest

from agent.errors import UserError
from agent.qemu.destargv import DestinationPaths, destination_argv
from agent.qemu.vmspec import (
    VmSpec,
    format_keyval,
    parse_keyval,
    parse_size,
    ram_backend_of,
    split_options,
)

SRC_RAM = "/dev/shm/src-web01.ram"


def source_argv(*extra: str, ram: str = "size=1G") -> list[str]:
    return ["-name", "web01", "-machine", "pc,memory-backend=ram0",
            "-object", f"memory-backend-file,id=ram0,{ram},mem-path={SRC_RAM},share=on",
            "-m", "1G", "-smp", "2", "-accel", "tcg,thread=multi", "-cpu", "max",
            "-qmp", "unix:/src/web01.qmp,server=on,wait=off",
            "-serial", "file:/src/serial.log", "-pidfile", "/src/qemu.pid",
            "-display", "none", "-nodefaults", "-no-user-config", *extra]


@pytest.fixture
def dest(tmp_path):
    vm_dir = tmp_path / "vms" / "web01"
    vm_dir.mkdir(parents=True)
    return DestinationPaths.under(vm_dir, tmp_path, "web01"), [tmp_path]


def spec_for(argv, size=1 << 30):
    return VmSpec(name="web01", argv=tuple(argv), ram_size=size, ram_backend_id="ram0")


@pytest.mark.parametrize("text,default,expected", [
    ("1G", "", 1 << 30), ("1048584K", "", 1048584 * 1024), ("4096", "", 4096),
    ("512", "m", 512 << 20), ("2g", "", 2 << 30)])
def test_parse_size(text, default, expected):
    assert parse_size(text, default) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(UserError, match="not a size"):
        parse_size("1X")


def test_keyval_roundtrip_with_escaped_comma():
    pairs = parse_keyval("file,id=c0,path=/a,,b", "backend")
    assert pairs == [("backend", "file"), ("id", "c0"), ("path", "/a,b")]
    assert parse_keyval(format_keyval(pairs)) == pairs


def test_rewrite_replaces_host_resources(dest):
    paths, roots = dest
    argv = destination_argv(spec_for(source_argv()), paths, roots, "/usr/bin/qemu-system-x86_64")
    joined = " ".join(argv)
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert SRC_RAM not in joined and "/src/" not in joined
    assert f"mem-path={paths.ram_path}" in joined and "share=on" in joined
    assert f"file:{paths.serial_log}" in joined
    assert argv[-3:] == ["-S", "-incoming", "defer"]
    assert argv.count("-qmp") == 1 and f"unix:{paths.qmp_path}" in joined
    # guest-visible configuration is untouched
    for kept in ("pc,memory-backend=ram0", "tcg,thread=multi", "max"):
        assert kept in argv


def test_monitors_and_their_chardevs_are_dropped(dest):
    paths, roots = dest
    argv = destination_argv(spec_for(source_argv(
        "-chardev", "socket,id=mon1,path=/src/mon.sock,server=on,wait=off",
        "-mon", "chardev=mon1,mode=control", "-monitor", "none")), paths, roots, "qemu")
    assert "mon1" not in " ".join(argv) and "-mon" not in argv and "-monitor" not in argv


def test_guest_chardev_paths_move_into_vm_dir(dest):
    paths, roots = dest
    argv = destination_argv(spec_for(source_argv(
        "-chardev", "socket,id=ser1,path=/src/ser.sock,server=on,wait=off",
        "-device", "isa-serial,chardev=ser1")), paths, roots, "qemu")
    chardev = argv[argv.index("-chardev") + 1]
    assert str(paths.vm_dir) in chardev and "/src/" not in chardev


def test_sizes_in_other_units_are_accepted(dest):
    paths, roots = dest
    argv = source_argv(ram="size=1048584K")
    argv[argv.index("-m") + 1] = "1048584K"
    destination_argv(spec_for(argv, 1048584 * 1024), paths, roots, "qemu")


@pytest.mark.parametrize("extra,message", [
    (["-virtfs", "local,path=/"], "not accepted"),
    (["-object", "rng-random,id=r0,filename=/dev/random"], "rng-random is not accepted"),
    (["-netdev", "tap,id=n0"], "has no network on this host"),
    (["-netdev", "vde,id=n0"], "host-specific"),
    (["-netdev", "l2tpv3,id=n0"], "host-specific"),
    (["-kernel", "/etc/shadow"], "outside the destination's allowed paths"),
    (["-drive", "file=/var/other/disk.qcow2,if=virtio"], "outside the destination's allowed"),
    (["-blockdev", '{"driver":"file","filename":"/x/y.img","node-name":"f0"}'], "outside"),
    (["-kernel"], "needs a value"),
    (["stray"], "not an option"),
])
def test_refusals(dest, extra, message):
    paths, roots = dest
    with pytest.raises(UserError, match=message):
        destination_argv(spec_for(source_argv(*extra)), paths, roots, "qemu")


def test_paths_under_allowed_roots_are_kept(dest, tmp_path):
    paths, roots = dest
    kernel = tmp_path / "guest.elf"
    kernel.write_bytes(b"\x7fELF")
    argv = destination_argv(spec_for(source_argv("-kernel", str(kernel))), paths, roots, "q")
    assert str(kernel) in argv


def test_symlink_escaping_roots_is_refused(dest, tmp_path):
    paths, roots = dest
    link = tmp_path / "escape"
    link.symlink_to("/etc")
    with pytest.raises(UserError, match="outside"):
        destination_argv(spec_for(source_argv("-kernel", str(link / "passwd"))), paths, roots, "q")


def test_ram_backend_must_match_description(dest):
    paths, roots = dest
    with pytest.raises(UserError, match="disagrees"):
        destination_argv(spec_for(source_argv(), size=2 << 30), paths, roots, "qemu")


def test_ram_backend_of_reports_share():
    backend = ram_backend_of(split_options(source_argv()))
    assert backend is not None
    assert (backend.id, backend.size, backend.mem_path, backend.share) == (
        "ram0", 1 << 30, SRC_RAM, True)


def test_plain_m_source_gets_a_shared_file_backend_named_pc_ram(dest):
    paths, roots = dest
    argv = ["-name", "web01", "-machine", "pc", "-m", "1048584K", "-display", "none"]
    spec = VmSpec(name="web01", argv=tuple(argv), ram_size=1048584 * 1024,
                  ram_backend_id="pc.ram")
    out = destination_argv(spec, paths, roots, "qemu")
    objects = [out[i + 1] for i, a in enumerate(out) if a == "-object"]
    assert objects == [f"qom-type=memory-backend-file,id=pc.ram,size={1048584 * 1024},"
                       f"mem-path={paths.ram_path},share=on"]
    assert "memory-backend=pc.ram" in out and "-m" in out
    with pytest.raises(UserError, match="disagrees"):
        destination_argv(VmSpec(name="web01", argv=tuple(argv), ram_size=1 << 30,
                                ram_backend_id="pc.ram"), paths, roots, "qemu")


def test_private_backend_becomes_a_shared_file_without_host_properties(dest):
    paths, roots = dest
    argv = ["-name", "web01", "-machine", "pc,memory-backend=mem0", "-m", "1G",
            "-object", "memory-backend-ram,id=mem0,size=1G,host-nodes=0,policy=bind"]
    spec = VmSpec(name="web01", argv=tuple(argv), ram_size=1 << 30, ram_backend_id="mem0")
    out = destination_argv(spec, paths, roots, "qemu")
    objects = [out[i + 1] for i, a in enumerate(out) if a == "-object"]
    assert objects == [f"qom-type=memory-backend-file,id=mem0,size={1 << 30},"
                       f"mem-path={paths.ram_path},share=on"]


def test_other_memory_backends_are_refused(dest):
    paths, roots = dest
    argv = source_argv("-object", "memory-backend-file,id=extra,size=1G,mem-path=/etc/passwd")
    with pytest.raises(UserError, match="only the machine's RAM backend"):
        destination_argv(spec_for(argv), paths, roots, "qemu")


def test_spec_json_roundtrip_and_validation():
    spec = spec_for(source_argv())
    assert VmSpec.from_json(spec.to_json()) == spec
    with pytest.raises(UserError, match="malformed"):
        VmSpec.from_json({"name": "x", "argv": "not-a-list", "ram_size": 4096,
                          "ram_backend_id": "r"})
    with pytest.raises(UserError, match="invalid VM name"):
        VmSpec(name="../evil", argv=(), ram_size=4096, ram_backend_id="r")


@pytest.mark.parametrize("field", ["ram_size", "disk_size"])
def test_infinite_numbers_are_a_malformed_description(field):
    """Found by `python -m bench fuzz`: json reads Infinity as a float, int() of it raised
    OverflowError instead of the description's UserError."""
    text = ('{"name": "x", "argv": [], "ram_backend_id": "r", "ram_size": %s, "disks": '
            '[{"index": 0, "path": "/a", "format": "raw", "virtual_size": %s, "node": "n"}]}')
    data = json.loads(text % (("Infinity", 4096) if field == "ram_size" else (4096, "1e999")))
    with pytest.raises(UserError, match="malformed"):
        VmSpec.from_json(data)


def test_copied_disks_are_redirected_in_drive_and_blockdev(dest, tmp_path):
    from agent.qemu.destargv import DiskTarget
    paths, roots = dest
    argv = source_argv("-drive", "file=/src/d0.qcow2,format=qcow2,if=virtio",
                       "-blockdev", "driver=file,filename=/src/d1.img,node-name=f1",
                       "-blockdev", "driver=raw,file=f1,node-name=d1")
    targets = {"/src/d0.qcow2": DiskTarget(str(tmp_path / "d0.raw"), "raw", converts=True),
               "/src/d1.img": DiskTarget(str(tmp_path / "d1.img"), "raw")}
    out = destination_argv(spec_for(argv), paths, roots, "qemu", targets)
    assert f"file={tmp_path / 'd0.raw'},format=raw,if=virtio" in out
    assert f"driver=file,filename={tmp_path / 'd1.img'},node-name=f1" in out
    assert "/src/" not in " ".join(out)


def test_blockdev_format_conversion_is_refused(dest, tmp_path):
    from agent.qemu.destargv import DiskTarget
    paths, roots = dest
    argv = source_argv("-blockdev", "driver=file,filename=/src/d1.img,node-name=f1")
    targets = {"/src/d1.img": DiskTarget(str(tmp_path / "d1.qcow2"), "qcow2", converts=True)}
    with pytest.raises(UserError, match="cannot be converted"):
        destination_argv(spec_for(argv), paths, roots, "qemu", targets)


def test_disk_spec_refuses_unknown_formats():
    from agent.qemu.vmspec import DiskSpec
    with pytest.raises(UserError, match="cannot be copied"):
        DiskSpec(index=0, path="/x/d.vmdk", format="vmdk", virtual_size=1 << 20, node="n")
    spec = VmSpec(name="a", argv=(), ram_size=4096, ram_backend_id="r",
                  disks=(DiskSpec(0, "/x/d.qcow2", "qcow2", 1 << 20, "#block1"),))
    assert VmSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("text,implied,expected", [
    # QEMU's QemuOpts: a name ends at the first '=' or ','; ',,' escapes only in values
    ("e1000,id=x,,romfile=/a", "driver", [("driver", "e1000"), ("id", "x,romfile=/a")]),
    ("e1000,x,,romfile=/a", "driver",
     [("driver", "e1000"), ("x", None), ("", None), ("romfile", "/a")]),
    ("e1000,,x", "driver", [("driver", "e1000,x")]),
    ("server,nowait,path=/s", None, [("server", None), ("nowait", None), ("path", "/s")]),
    ("a=b,", None, [("a", "b")]),
    ("a=,b=c,,,d", None, [("a", ""), ("b", "c,"), ("d", None)]),
])
def test_keyval_is_split_as_qemu_splits_it(text, implied, expected):
    pairs = parse_keyval(text, implied)
    assert pairs == expected
    assert parse_keyval(format_keyval(pairs), implied) == pairs
