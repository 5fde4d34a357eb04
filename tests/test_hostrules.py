"""What a destination accepts of a source argv (agent.qemu.hostrules through destargv):
each attack on the destination host and its close variants refused, naming option, value
and rule; ordinary VMs and bundled ROMs accepted."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.errors import UserError
from agent.qemu.destargv import DestinationPaths, DiskTarget, destination_argv
from agent.qemu.hostrules import Accept
from agent.qemu.vmspec import VmSpec, parse_keyval
from agent.state.config import load_config

BASE = ("-name", "w", "-machine", "pc", "-m", "64M", "-display", "none", "-nodefaults")
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    (root / "vms" / "w").mkdir(parents=True)
    (root / "guest.rom").write_bytes(b"\x55\xaa")
    (root / "tftp").mkdir()
    data = tmp_path / "qemu-data"
    data.mkdir()
    (data / "efi-e1000.rom").write_bytes(b"rom")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (root / "escape").symlink_to(outside)
    return {"root": root, "data": data, "outside": outside}


def rewrite(env: dict[str, Path], *extra: str, accept: Accept | None = None,
            disks: dict[str, DiskTarget] | None = None,
            widened: list[str] | None = None) -> list[str]:
    spec = VmSpec(name="w", argv=(*BASE, *extra), ram_size=64 << 20, ram_backend_id="pc.ram")
    paths = DestinationPaths.under(env["root"] / "vms" / "w", env["root"], "w")
    return destination_argv(spec, paths, [env["root"]], "qemu-system-x86_64", disks,
                            accept=accept, widened=widened, data_dirs=[env["data"]])


def fill(env: dict[str, Path], args: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a.replace("{o}", str(env["outside"])).replace("{r}", str(env["root"]))
                 for a in args)


REFUSED = [
    # files read into the guest
    (("-device", "e1000,romfile={o}/secret"), "romfile '{o}/secret' is outside"),
    (("-device", "e1000,romfile={r}/escape/secret"), "is outside"),        # symlink out
    (("-device", "e1000,romfile={r}/../outside/secret"), "is outside"),    # .. out
    (("-device", "e1000,romfile=secret"), "not a file this QEMU bundles"),
    (("-device", "e1000,romfile=../outside/secret"), "is outside"),
    (("-device", "e1000,noromfile"), "not a file this QEMU bundles"),      # romfile=off
    (("-device", "loader,file={o}/secret,addr=0x1000"), "loader file '{o}/secret' is outside"),
    (("-device", '{"driver": "e1000", "romfile": "{o}/secret"}'), "romfile"),
    (("-device", '{"driver": "loader", "file": "{o}/secret"}'), "loader file"),
    (("-global", "e1000.romfile={o}/secret"), "romfile '{o}/secret' is outside"),
    (("-global", "driver=e1000,property=romfile,value={o}/secret"), "is outside"),
    (("-global", "loader.file={o}/secret"), "loader file"),
    (("-device", "e1000,id=n1", "-set", "device.n1.romfile={o}/secret"), "romfile"),
    (("-bios", "{o}/secret"), "-bios file '{o}/secret' is outside"),
    (("-bios", "no-such-bios.bin"), "not a file this QEMU bundles"),
    (("-machine", "pc,firmware={o}/secret"), "machine firmware"),
    (("-machine", "pc,dumpdtb={r}/x.dtb"), "writes a file"),
    (("-initrd", "{r}/guest.rom,{o}/secret"), "initrd module '{o}/secret' is outside"),
    (("-boot", "menu=on,splash={o}/secret"), "boot splash"),
    # escaped commas: QEMU sees x=on, ""=on, romfile=...: checked as QEMU reads it
    (("-device", "e1000,x,,romfile={o}/secret"), "empty property name"),
    # host devices and host-side properties
    (("-device", "qemu-xhci"), None),   # placeholder replaced below (accepted)
    (("-device", "usb-host,hostbus=1,hostaddr=2"), "device type 'usb-host' is not on"),
    (("-device", '{"driver": "usb-host", "vendorid": 1}'), "usb-host"),
    (("-device", "vfio-pci,host=01:00.0"), "vfio-pci"),
    (("-device", "vhost-vsock-pci,guest-cid=3"), "vhost-vsock-pci"),
    (("-device", "virtio-9p-pci,fsdev=f"), "virtio-9p-pci"),
    (("-device", "virtio-input-host-pci,evdev=/dev/input/event0"), "virtio-input-host-pci"),
    (("-device", "e1000,id=n1", "-set", "device.n1.driver=usb-host"), "usb-host"),
    (("-device", "e1000,x-foo=1"), "e1000.x-foo may name a host resource"),
    (("-device", "virtio-net-pci,vhostfd=3"), "vhostfd"),
    (("-device", "e1000,serial=/dev/sda"), "looks like a host path"),
    (("-global", "e1000.host_mtu=1"), "host_mtu"),
    # block: drivers that are not local files, backing files are checked separately
    (("-drive", "file=nbd://10.0.0.1/x,if=virtio"), "is outside"),
    (("-drive", "file={r}/d.img,format=vmdk"), "block driver 'vmdk'"),
    (("-drive", "driver=nbd,host=10.0.0.1,if=virtio"), "block driver 'nbd'"),
    (("-drive", "file.driver=host_device,file.filename=/dev/sda"), "host_device"),
    (("-blockdev", "driver=iscsi,portal=10.0.0.1,target=t,lun=0,node-name=n"), "iscsi"),
    (("-blockdev", '{"driver": "qcow2", "node-name": "d", "file": '
                   '{"driver": "http", "url": "http://x/y"}}'), "block driver 'http'"),
    (("-blockdev", '{"driver": "file", "node-name": "f", "filename": "{o}/secret"}'),
     "outside"),
    (("-blockdev", "driver=file,filename={o}/secret,node-name=f"), "outside"),
    (("-blockdev", "driver=file,read-only,filename={r}/x,node-name=f"), "no flags"),
    # user networking: host ports, directories, programs
    (("-netdev", "user,id=n0,hostfwd=tcp::2222-:22"), "hostfwd forwards a port"),
    (("-netdev", "user,id=n0,hostfwd=tcp::1-:1,hostfwd=tcp::2-:2"), "hostfwd"),
    (("-netdev", "user,id=n0,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh"), "guestfwd"),
    (("-netdev", "user,id=n0,tftp={o}"), "tftp serves a host directory"),
    (("-netdev", "user,id=n0,bootfile=pxelinux.0"), "bootfile"),
    (("-netdev", "user,id=n0,smb={o}"), "smb runs smbd"),
    (("-netdev", "user,id=n0,notftp"), "tftp"),
    (("-netdev", "user,id=n0,type=tap"), "host-specific"),
    (("-netdev", "tap,id=n0,script=/bin/sh"), "has no network on this host"),
    (("-nic", "user,model=usb-host"), "usb-host"),
    (("-netdev", "user,id=n0", "-set", "netdev.n0.tftp={o}"), "tftp"),
    # chardevs and serial ports: host sockets, programs, devices
    (("-chardev", "socket,id=c,host=0.0.0.0,port=4444,server=on"), "over TCP"),
    (("-chardev", "socket,id=c,path={r}/s,server=on,websocket=on"), "websocket"),
    (("-chardev", "socket,id=c,path={r}/s"), "client socket"),
    (("-chardev", "socket,id=c,path={r}/s,noserver"), "client socket"),
    (("-chardev", "socket,id=c,path={r}/s,server=on,abstract=on"), "abstract"),
    (("-chardev", "socket,id=c,path={r}/s,server=on,tls-creds=t"), "TLS"),
    (("-chardev", "pipe,id=c,path={r}/p"), "FIFOs"),
    (("-chardev", "tty,id=c,path=/dev/ttyS0"), "-chardev tty is not accepted"),
    (("-chardev", "file,id=c,path={r}/f,input-path={o}/secret"), "reads a host file"),
    (("-serial", "tcp:0.0.0.0:4444,server=on"), "host-specific"),
    (("-serial", "unix:/tmp/s,server=on"), "host-specific"),
    (("-serial", "/dev/ttyS0"), "host-specific"),
    (("-serial", "pipe:/tmp/p"), "host-specific"),
    (("-serial", "pty"), "host-specific"),
    # listeners and other host-facing options
    (("-display", "vnc=0.0.0.0:0"), "host UI or listener"),
    (("-display", "gtk"), "host UI or listener"),
    (("-vnc", ":0"), "VNC listener"),
    (("-spice", "port=5900"), "SPICE listener"),
    (("-L", "{o}"), "ROMs and firmware"),
    (("-k", "{o}/secret"), "keymap"),
    (("-readconfig", "{o}/secret"), "not accepted"),
    (("-fw_cfg", "name=opt/x,file={o}/secret"), "not accepted"),
    (("-smbios", "file={o}/secret"), "not accepted"),
    (("-acpitable", "file={o}/secret"), "not accepted"),
    (("-option-rom", "{o}/secret"), "not accepted"),
    (("-plugin", "{o}/lib.so"), "host library"),
    (("-trace", "file={o}/trace"), "not accepted"),
    (("-set", "object.r.filename={o}/secret"), "-set to device"),
    (("-set", "device.nope.romfile=x"), "no -device with id 'nope'"),
]
REFUSED = [case for case in REFUSED if case[1] is not None]


@pytest.mark.parametrize("extra,message", REFUSED, ids=[" ".join(c[0])[:60] for c in REFUSED])
def test_refused(env, extra, message):
    with pytest.raises(UserError) as caught:
        rewrite(env, *fill(env, extra))
    text = str(caught.value)
    assert message.replace("{o}", str(env["outside"])) in text, text
    if "is refused by the destination" in text:   # names the option and its value
        option = fill(env, extra)[-2]
        assert f"{option} '" in text or option == "-set", text


ACCEPTED = [
    ("-device", "e1000,romfile=efi-e1000.rom,mac=52:54:00:12:34:56"),
    ("-device", "e1000,romfile={r}/guest.rom"),
    ("-device", "e1000,romfile="),
    ("-device", "e1000,id=x,,romfile={o}/secret"),   # one id value with a comma in it
    ("-device", "loader,file={r}/guest.rom,addr=0x100000"),
    ("-device", '{"driver": "virtio-net-pci", "id": "n1", "bootindex": 1, "romfile": ""}'),
    ("-device", "qemu-xhci", "-device", "usb-tablet", "-device", "usb-kbd"),
    ("-device", "virtio-blk-pci,drive=d0,bootindex=1", "-device", "pvpanic",
     "-device", "i6300esb", "-device", "VGA", "-device", "ahci,id=sata"),
    ("-global", "kvm-pit.lost_tick_policy=delay", "-global",
     "driver=cfi.pflash01,property=secure,value=on", "-global", "e1000.romfile="),
    ("-device", "e1000,id=n1", "-set", "device.n1.mac=52:54:00:00:00:01"),
    ("-netdev", "user,id=n0,restrict=on,net=10.1.0.0/24,hostname=w,dns=10.1.0.3",
     "-device", "virtio-net-pci,netdev=n0"),
    ("-nic", "user,model=virtio"), ("-nic", "none"), ("-netdev", "hubport,id=h,hubid=0"),
    ("-chardev", "socket,id=c,path={o}/s,server,nowait", "-device", "isa-serial,chardev=c"),
    ("-chardev", "ringbuf,id=r,size=65536", "-device", "isa-debugcon,chardev=r"),
    ("-chardev", "null,id=z", "-serial", "chardev:z"),
    ("-bios", "efi-e1000.rom"),
    ("-initrd", "{r}/guest.rom arg1,{r}/guest.rom arg2"),
    ("-boot", "order=c,menu=on"), ("-machine", "pc,hpet=off"),
]


@pytest.mark.parametrize("extra", ACCEPTED, ids=[" ".join(c)[:60] for c in ACCEPTED])
def test_accepted(env, extra):
    widened: list[str] = []
    out = rewrite(env, *fill(env, extra), widened=widened)
    assert widened == []
    chardevs = [out[i + 1] for i, a in enumerate(out) if a == "-chardev"]
    assert not any(str(env["outside"]) in c for c in chardevs)   # paths moved


def test_bundled_rom_is_the_destinations_own_copy_by_path(env):
    out = rewrite(env, "-device", "e1000,romfile=efi-e1000.rom", "-bios", "efi-e1000.rom",
                  "-global", "e1000.romfile=efi-e1000.rom")
    own = str(env["data"] / "efi-e1000.rom")
    assert f"driver=e1000,romfile={own}" in out
    assert out[out.index("-bios") + 1] == own
    assert f"driver=e1000,property=romfile,value={own}" in out


def test_escaped_comma_stays_inside_the_value(env):
    out = rewrite(env, "-device", fill(env, ("e1000,id=x,,romfile={o}/secret",))[0])
    device = out[out.index("-device") + 1]
    assert parse_keyval(device, "driver") == [
        ("driver", "e1000"), ("id", f"x,romfile={env['outside']}/secret")]


def test_server_socket_never_waits_for_a_client(env):
    out = rewrite(env, "-chardev", "socket,id=c,path=/src/s,server=on")
    chardev = out[out.index("-chardev") + 1]
    assert "wait=off" in chardev and "/src/" not in chardev


@pytest.mark.parametrize("accept,extra,note", [
    (Accept(netdev_user=frozenset({"hostfwd"})),
     ("-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22"), "hostfwd=tcp:127.0.0.1"),
    (Accept(netdev_user=frozenset({"tftp"})), ("-netdev", "user,id=n0,tftp={r}/tftp"),
     "tftp="),
    (Accept(netdev_user=frozenset({"guestfwd", "guestfwd-cmd"})),
     ("-netdev", "user,id=n0,guestfwd=tcp:10.0.2.100:1-cmd:/bin/true"), "(a program)"),
    (Accept(devices=frozenset({"usb-host"}), properties=frozenset({"usb-host.hostbus",
                                                                    "*.hostaddr"})),
     ("-device", "qemu-xhci", "-device", "usb-host,hostbus=1,hostaddr=2"), "usb-host"),
    (Accept(drivers=frozenset({"null-co", "nbd"})),
     ("-blockdev", "driver=nbd,server.type=unix,server.path=/run/x,node-name=n"), "nbd"),
])
def test_accept_widens_and_says_so(env, accept, extra, note):
    widened: list[str] = []
    rewrite(env, *fill(env, extra), accept=accept, widened=widened)
    assert widened and any(note in n for n in widened), widened
    with pytest.raises(UserError, match="refused"):
        rewrite(env, *fill(env, extra))


def test_accepted_tftp_directory_must_still_be_under_roots(env):
    with pytest.raises(UserError, match="tftp directory .* is outside"):
        rewrite(env, "-netdev", f"user,id=n0,tftp={env['outside']}",
                accept=Accept(netdev_user=frozenset({"tftp"})))


def test_guestfwd_program_needs_its_own_acceptance(env):
    with pytest.raises(UserError, match="runs a program"):
        rewrite(env, "-netdev", "user,id=n0,guestfwd=tcp:10.0.2.100:1-cmd:/bin/true",
                accept=Accept(netdev_user=frozenset({"guestfwd"})))


def test_accept_section_in_agent_toml(tmp_path):
    (tmp_path / "agent.toml").write_text(
        '[accept]\ndevices = ["usb-host"]\nnetdev_user = ["hostfwd"]\ndrivers = ["nbd"]\n'
        'properties = ["usb-host.hostbus"]\n')
    accept = load_config(tmp_path).accept
    assert accept.devices == {"usb-host"} and accept.netdev_user == {"hostfwd"}
    assert accept.drivers == {"nbd"} and accept.properties == {"usb-host.hostbus"}
    (tmp_path / "agent.toml").write_text('[accept]\nnetdev_user = ["tap"]\n')
    with pytest.raises(UserError, match="netdev_user knows"):
        load_config(tmp_path)
    (tmp_path / "agent.toml").write_text('[accept]\nports = ["22"]\n')
    with pytest.raises(UserError, match="unknown \\[accept\\] settings ports"):
        load_config(tmp_path)


# ---------------------------------------------------------------------------- disk chains

def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@needs_qemu_img
def test_shared_qcow2_with_backing_file_outside_roots_is_refused(env):
    base = env["outside"] / "base.raw"
    qemu_img("create", "-f", "raw", str(base), "1M")
    top = env["root"] / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    for extra in (("-drive", f"file={top},format=qcow2,if=virtio"),
                  ("-drive", f"file={top},if=virtio"),
                  ("-blockdev", f"driver=file,filename={top},node-name=f0"),
                  ("-blockdev", f'{{"driver": "qcow2", "node-name": "d0", "file": '
                                f'{{"driver": "file", "filename": "{top}"}}}}')):
        with pytest.raises(UserError, match=f"backing file '{base}' is outside"):
            rewrite(env, *extra)


@needs_qemu_img
def test_backing_chain_inside_roots_is_accepted_and_checked_to_its_end(env):
    base = env["root"] / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "1M")
    mid = env["root"] / "mid.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid))  # relative
    top = env["root"] / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    rewrite(env, "-drive", f"file={top},format=qcow2,if=virtio")
    # the end of the chain moved out through a symlink: refused
    base.unlink()
    (env["root"] / "base.qcow2").symlink_to(env["outside"] / "base.qcow2")
    qemu_img("create", "-f", "qcow2", str(env["outside"] / "base.qcow2"), "1M")
    with pytest.raises(UserError, match="backing file .* is outside"):
        rewrite(env, "-drive", f"file={top},format=qcow2,if=virtio")


@needs_qemu_img
def test_shared_image_in_an_unaccepted_format_is_refused(env):
    disk = env["root"] / "d.vmdk"
    qemu_img("create", "-f", "vmdk", str(disk), "1M")
    with pytest.raises(UserError, match="block driver 'vmdk'"):
        rewrite(env, "-drive", f"file={disk},if=virtio")


def test_missing_shared_image_is_refused_before_anything_starts(env):
    with pytest.raises(UserError, match="cannot inspect disk image"):
        rewrite(env, "-drive", f"file={env['root']}/nothing.qcow2,if=virtio")


def test_copied_disks_skip_the_chain_check_and_json_blockdev_is_redirected(env):
    target = env["root"] / "copy.img"
    out = rewrite(env, "-blockdev",
                  '{"driver": "file", "filename": "/src/d.img", "node-name": "f0"}',
                  disks={"/src/d.img": DiskTarget(str(target), "raw")})
    assert str(target) in out[out.index("-blockdev") + 1]
