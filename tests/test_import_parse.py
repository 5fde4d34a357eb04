"""Other hypervisors' configurations read into ferry VM definitions (agent.importer):
fixtures after real VMware, OVF/OVA and VirtualBox exports, images made with qemu-img,
hostile and malformed inputs refused, and `ferry import --inspect`."""

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from agent.cli import main
from agent.commands.import_cmd import report_lines
from agent.errors import UserError
from agent.importer.definition import DiskDef, Level, NicDef, VmDefinition
from agent.importer.inspect import read_source

DATA = Path(__file__).parent / "data" / "import"
MIB = 1 << 20


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def texts(defn: VmDefinition, level: Level) -> list[str]:
    return [n.text for n in defn.notes if n.level is level]


def refused_with(defn: VmDefinition, *words: str) -> str:
    """The one refusal mentioning every word (the test fails if there is none)."""
    matches = [t for t in texts(defn, Level.REFUSAL) if all(w in t for w in words)]
    assert matches, f"no refusal with {words}: {texts(defn, Level.REFUSAL)}"
    return matches[0]


def truncate(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


# ------------------------------------------------------------------------------ VMware

@pytest.fixture
def web01(tmp_path):
    vm = tmp_path / "web01"
    shutil.copytree(DATA / "vmware" / "web01", vm)
    truncate(vm / "web01-flat.vmdk", 8 * MIB)
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
             str(vm / "web01_1.vmdk"), "12M")
    # created under another name: its embedded descriptor's extent is the file itself
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicSparse",
             str(vm / "created-as.vmdk"), "4M")
    (vm / "created-as.vmdk").rename(vm / "web01_2.vmdk")
    return vm


def test_vmx_uefi_vm_with_disks_on_three_buses_two_nics_and_an_iso(web01):
    defn = read_source(web01 / "web01.vmx")
    assert (defn.name, defn.source, defn.cpus, defn.sockets, defn.cores) == \
        ("web01", "vmx", 4, 2, 2)
    assert defn.memory == 4096 * MIB
    assert (defn.firmware, defn.machine) == ("uefi", "q35")
    assert defn.uuid == "564d8a2c-1f3e-9b70-4c6d-210e5a77c319"
    assert defn.os_type == "ubuntu-64"
    got = [(d.path.name, d.format, d.bus, d.controller, d.unit, d.virtual_size, d.boot_order)
           for d in defn.disks]
    assert got == [("web01.vmdk", "vmdk", "scsi-pvscsi", 0, 0, 8 * MIB, 1),
                   ("web01_2.vmdk", "vmdk", "nvme", 0, 0, 4 * MIB, None),
                   ("web01_1.vmdk", "vmdk", "sata", 0, 0, 12 * MIB, None)]
    assert all(d.path.is_absolute() for d in defn.disks)
    assert defn.nics == (NicDef("vmxnet3", "00:50:56:3f:12:34", "VM Network"),
                         NicDef("e1000e", "00:0c:29:ab:cd:ef", "VMnet2"))
    warnings = " | ".join(texts(defn, Level.WARNING))
    assert "ubuntu-22.04.4-live-server-amd64.iso left out" in warnings
    assert "UEFI variables" in warnings and "Secure Boot" in warnings
    assert "no bios.hddOrder: boot from web01.vmdk, a guess" in warnings
    decisions = " | ".join(texts(defn, Level.DECISION))
    assert "kept on NVMe" in decisions
    assert "twoGbMaxExtentSparse" in decisions and "monolithicFlat" in decisions
    assert "monolithicSparse" in decisions         # read from the embedded descriptor
    assert not defn.refusals()
    for note in defn.notes:
        if note.level is Level.WARNING and "left out" in note.text:
            assert note.remedy


def test_vmx_bios_vm_boot_order_escapes_and_remapped_devices(tmp_path):
    vm = tmp_path / "legacy"
    shutil.copytree(DATA / "vmware" / "legacy", vm)
    qemu_img("create", "-f", "vmdk", "-o", "subformat=streamOptimized",
             str(vm / "legacy.vmdk"), "2M")
    truncate(vm / "legacy_1-f001.vmdk", 4 * MIB)
    truncate(vm / "legacy_1-f002.vmdk", 2 * MIB)
    defn = read_source(vm / "legacy.vmx")
    assert defn.name == 'db "legacy"'
    assert (defn.cpus, defn.sockets, defn.cores, defn.firmware, defn.machine) == \
        (4, 1, 4, "bios", "pc")
    assert defn.uuid == "564d0102-0304-0506-0708-090a0b0c0d0e"
    got = [(d.path.name, d.bus, d.controller, d.unit, d.virtual_size, d.boot_order)
           for d in defn.disks]
    assert got == [("legacy_1.vmdk", "scsi-lsi", 0, 1, 6 * MIB, 1),   # bios.hddOrder
                   ("legacy.vmdk", "ide", 0, 0, 2 * MIB, None)]
    assert "boot from legacy_1.vmdk (bios.hddOrder)" in texts(defn, Level.DECISION)
    assert defn.nics == (NicDef("e1000", "00:0c:29:11:22:33", "nat"),)
    warnings = " | ".join(texts(defn, Level.WARNING))
    assert "lsisas1068" in warnings and "vlance" in warnings
    assert "CD/DVD auto detect left out" in warnings
    assert not defn.refusals()


def test_vmx_boot_order_starting_with_the_cd_warned(web01):
    vmx = web01 / "web01.vmx"
    vmx.write_text(vmx.read_text() + 'bios.bootOrder = "cdrom,hdd"\n')
    assert any("bios.bootOrder boots cdrom first" in t
               for t in texts(read_source(vmx), Level.WARNING))


def test_vmx_truncated_flat_extent_is_refused(web01):
    truncate(web01 / "web01-flat.vmdk", 4 * MIB)         # the descriptor says 8 MiB
    defn = read_source(web01 / "web01.vmx")
    refused_with(defn, "web01-flat.vmdk", "holds 4194304 bytes", "8388608")


@pytest.mark.parametrize("fixture,words", [
    ("escape.vmdk", ("'../outside-flat.vmdk'", "outside the VM's directory")),
    ("absolute.vmdk", ("'/etc/passwd'", "outside the VM's directory")),
    ("vmfssparse.vmdk", ("subformat 'vmfsSparse'",)),
    ("sesparse.vmdk", ("subformat 'seSparse'",)),
])
def test_vmx_hostile_or_unsupported_vmdk_refused(web01, fixture, words):
    shutil.copy(DATA / "hostile" / fixture, web01 / "web01.vmdk")
    truncate(web01.parent / "outside-flat.vmdk", MIB)
    defn = read_source(web01 / "web01.vmx")
    text = refused_with(defn, *words)
    assert "web01.vmdk" in text
    assert all(d.path.name != "web01.vmdk" for d in defn.disks)
    if fixture == "vmfssparse.vmdk":
        refused_with(defn, "snapshot delta")


def test_vmx_disk_outside_the_vm_directory_and_missing_disk_refused(web01):
    vmx = web01 / "web01.vmx"
    text = vmx.read_text().replace('"web01_2.vmdk"', '"../other/web01_2.vmdk"')
    vmx.write_text(text.replace('"web01_1.vmdk"', '"gone.vmdk"'))
    defn = read_source(vmx)
    refused_with(defn, "nvme0:0", "outside the VM's directory")
    refused_with(defn, "sata0:0", "gone.vmdk is missing")


@pytest.mark.parametrize("line,words", [
    ('memsize = "99999999999"', ("memory", "out of range")),
    ('numvcpus = "5000"', ("5000 vCPUs", "out of range")),
])
def test_vmx_absurd_sizes_refused(web01, line, words):
    vmx = web01 / "web01.vmx"
    vmx.write_text(vmx.read_text() + line + '\ncpuid.coresPerSocket = "1"\n')
    refused_with(read_source(vmx), *words)


def test_vmx_running_or_suspended_vm_warned(web01):
    (web01 / "web01.vmx.lck").mkdir()
    (web01 / "web01-4a3b.vmss").write_bytes(b"")
    warnings = " | ".join(texts(read_source(web01 / "web01.vmx"), Level.WARNING))
    assert "looks running" in warnings and "suspended" in warnings


def test_vmx_naming_a_flat_extent_instead_of_its_descriptor_refused(web01):
    vmx = web01 / "web01.vmx"
    vmx.write_text(vmx.read_text().replace('"web01.vmdk"', '"web01-flat.vmdk"'))
    refused_with(read_source(vmx), "web01-flat.vmdk", "neither a sparse vmdk nor a descriptor")


def test_vmx_malformed_line_is_an_error(web01):
    (web01 / "web01.vmx").write_text('displayName = "x"\nthis is not a setting\n')
    with pytest.raises(UserError, match="not a setting"):
        read_source(web01 / "web01.vmx")


# ------------------------------------------------------------------------- OVF and OVA

def make_ovf_disks(where: Path, names_sizes: dict[str, str]) -> None:
    for name, size in names_sizes.items():
        qemu_img("create", "-f", "vmdk", "-o", "subformat=streamOptimized",
                 str(where / name), size)


def set_file_sizes(ovf: str, sizes: dict[str, int]) -> str:
    for name, size in sizes.items():
        ovf = re.sub(rf'(ovf:href="{re.escape(name)}"[^>]*ovf:size=")\d+"',
                     rf'\g<1>{size}"', ovf)
    return ovf


def manifest(files: dict[str, bytes], algo: str = "SHA256") -> bytes:
    return "".join(f"{algo}({name})= {hashlib.new(algo.lower(), data).hexdigest()}\n"
                   for name, data in files.items()).encode()


@pytest.fixture
def appliance_files(tmp_path):
    """The appliance's .ovf (file sizes filled in) and its two streamOptimized disks."""
    disks = tmp_path / "disks"
    disks.mkdir()
    make_ovf_disks(disks, {"appliance-disk1.vmdk": "16M", "appliance-disk2.vmdk": "8M"})
    files = {p.name: p.read_bytes() for p in sorted(disks.iterdir())}
    ovf = set_file_sizes((DATA / "ovf" / "appliance.ovf").read_text(),
                         {n: len(b) for n, b in files.items()})
    return {"appliance.ovf": ovf.encode(), **files}


def build_ova(path: Path, files: dict[str, bytes], mf: bytes | None = None,
              extra: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if mf is not None:
            info = tarfile.TarInfo(path.stem + ".mf")
            info.size = len(mf)
            tar.addfile(info, io.BytesIO(mf))
        for info in extra or ():
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return path


def check_appliance(defn: VmDefinition) -> None:
    assert (defn.name, defn.cpus, defn.sockets, defn.cores, defn.memory) == \
        ("appliance", 2, 1, 2, 2048 * MIB)
    assert (defn.firmware, defn.machine, defn.os_type) == ("uefi", "q35", "debian11_64Guest")
    got = [(d.format, d.bus, d.controller, d.unit, d.virtual_size, d.boot_order)
           for d in defn.disks]
    # in the OVF's order, the first disk booting (Hard disk 2 is on IDE 0, Address 0)
    assert got == [("vmdk", "scsi-lsi", 0, 0, 16 * MIB, 1), ("vmdk", "ide", 0, 1, 8 * MIB, None)]
    assert defn.nics == (NicDef("vmxnet3", "00:50:56:aa:bb:01", "VM Network"),
                         NicDef("e1000", None, "Storage"))
    warnings = " | ".join(texts(defn, Level.WARNING))
    assert "CD/DVD" in warnings and "UEFI variables" in warnings
    decisions = " | ".join(texts(defn, Level.DECISION))
    assert "USB controller left out" in decisions and "graphics card left out" in decisions


def test_ova_read_in_place_with_its_manifest_verified(tmp_path, appliance_files):
    ova = build_ova(tmp_path / "appliance.ova", appliance_files, manifest(appliance_files))
    defn = read_source(ova)
    assert defn.source == "ova" and not defn.refusals()
    check_appliance(defn)
    assert "appliance.mf: 3 file(s) verified" in texts(defn, Level.DECISION)
    assert "virtual hardware vmx-19 becomes a QEMU machine" in texts(defn, Level.DECISION)
    # each disk is found in the tar, in place: its bytes at member_offset are the image's
    raw = ova.read_bytes()
    for d in defn.disks:
        assert d.path == ova.absolute()
        assert d.member is not None and d.member_offset is not None
        assert raw[d.member_offset:d.member_offset + d.member_size] == \
            appliance_files[d.member]
    assert not list(tmp_path.glob("*.vmdk"))          # nothing extracted
    # QEMU's block layer reads the member in place: vmdk over a raw window of the .ova
    d = defn.disks[0]
    spec = {"driver": "vmdk", "file": {"driver": "raw", "offset": d.member_offset,
                                       "size": d.member_size,
                                       "file": {"driver": "file", "filename": str(ova)}}}
    info = subprocess.run(["qemu-img", "info", "--output=json", "json:" + json.dumps(spec)],
                          check=True, capture_output=True, text=True).stdout
    assert json.loads(info)["virtual-size"] == d.virtual_size == 16 * MIB


def test_ovf_directory_with_sha1_manifest(tmp_path, appliance_files):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for name, data in appliance_files.items():
        (pkg / name).write_bytes(data)
    (pkg / "appliance.mf").write_bytes(manifest(appliance_files, "SHA1"))
    defn = read_source(pkg)                           # a directory holding one .ovf
    assert defn.source == "ovf" and not defn.refusals()
    assert "appliance.mf: 3 file(s) verified" in texts(defn, Level.DECISION)
    check_appliance(defn)
    assert all(d.member is None and d.path.parent == pkg for d in defn.disks)


def test_ovf2_virtualbox_export_sata_and_epasd_items(tmp_path):
    make_ovf_disks(tmp_path, {"devvm-disk001.vmdk": "16M"})
    size = (tmp_path / "devvm-disk001.vmdk").stat().st_size
    ovf = set_file_sizes((DATA / "ovf" / "vbox-export.ovf").read_text(),
                         {"devvm-disk001.vmdk": size})
    (tmp_path / "devvm.ovf").write_text(ovf)
    defn = read_source(tmp_path / "devvm.ovf")
    assert (defn.name, defn.cpus, defn.memory, defn.firmware, defn.machine, defn.os_type) == \
        ("devvm", 1, 1024 * MIB, "bios", "q35", "Debian_64")
    assert [(d.bus, d.unit, d.virtual_size, d.boot_order) for d in defn.disks] == \
        [("sata", 0, 16 * MIB, 1)]
    assert defn.nics == (NicDef("e1000", None, "NAT"),)
    assert "no manifest devvm.mf" in texts(defn, Level.WARNING)[0]
    assert not defn.refusals()


def test_ova_tampered_manifest_refused_naming_the_file(tmp_path, appliance_files):
    mf = manifest(appliance_files)
    tampered = dict(appliance_files)
    disk = tampered["appliance-disk2.vmdk"]
    tampered["appliance-disk2.vmdk"] = disk[:-1] + bytes([disk[-1] ^ 1])
    defn = read_source(build_ova(tmp_path / "appliance.ova", tampered, mf))
    text = refused_with(defn, "appliance-disk2.vmdk", "SHA256 does not match")
    assert "disk1" not in text and len(defn.refusals()) == 1


def test_ovf_directory_manifest_missing_a_disk_warned(tmp_path, appliance_files):
    for name, data in appliance_files.items():
        (tmp_path / name).write_bytes(data)
    del appliance_files["appliance-disk2.vmdk"]
    (tmp_path / "appliance.mf").write_bytes(manifest(appliance_files))
    defn = read_source(tmp_path / "appliance.ovf")
    assert "does not cover appliance-disk2.vmdk" in " | ".join(texts(defn, Level.WARNING))
    assert not defn.refusals()


def test_ova_manifest_naming_a_missing_file_refused(tmp_path, appliance_files):
    mf = manifest({**appliance_files, "appliance-nvram.bin": b"x"})
    defn = read_source(build_ova(tmp_path / "appliance.ova", appliance_files, mf))
    refused_with(defn, "names appliance-nvram.bin, which the package lacks")


def test_ova_disk_missing_from_the_package_refused(tmp_path, appliance_files):
    del appliance_files["appliance-disk2.vmdk"]
    defn = read_source(build_ova(tmp_path / "appliance.ova", appliance_files))
    refused_with(defn, "appliance-disk2.vmdk is missing from the package")


def test_ova_file_size_other_than_the_ovf_says_refused(tmp_path, appliance_files):
    ovf = appliance_files["appliance.ovf"].decode()
    size = len(appliance_files["appliance-disk1.vmdk"])
    appliance_files["appliance.ovf"] = ovf.replace(f'ovf:size="{size}"',
                                                   f'ovf:size="{size * 1000}"').encode()
    defn = read_source(build_ova(tmp_path / "appliance.ova", appliance_files))
    refused_with(defn, "appliance-disk1.vmdk", f"says {size * 1000} bytes")


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _plain(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 3
    return info


@pytest.mark.parametrize("member,words", [
    (_plain("../evil.vmdk"), "unsafe name"),
    (_plain("/etc/cron.d/evil"), "unsafe name"),
    (_plain("sub/dir.vmdk"), "unsafe name"),
    (_link("appliance-disk3.vmdk", "/etc/shadow", tarfile.SYMTYPE), "not a plain file"),
    (_link("hard.vmdk", "appliance.ovf", tarfile.LNKTYPE), "not a plain file"),
    (_link("dev", "", tarfile.CHRTYPE), "not a plain file"),
])
def test_ova_unsafe_members_refused(tmp_path, appliance_files, member, words):
    ova = build_ova(tmp_path / "appliance.ova", appliance_files, extra=[member])
    with pytest.raises(UserError, match=re.escape(words)) as err:
        read_source(ova)
    assert repr(member.name) in str(err.value)


def test_ova_duplicate_member_refused(tmp_path, appliance_files):
    ova = build_ova(tmp_path / "appliance.ova", appliance_files,
                    extra=[_plain("appliance-disk1.vmdk")])
    with pytest.raises(UserError, match="'appliance-disk1.vmdk' appears twice"):
        read_source(ova)


def test_ova_members_named_dot_slash_are_found(tmp_path, appliance_files):
    files = {f"./{name}": data for name, data in appliance_files.items()}
    defn = read_source(build_ova(tmp_path / "appliance.ova", files, manifest(appliance_files)))
    assert not defn.refusals() and len(defn.disks) == 2


def test_ova_must_start_with_its_ovf(tmp_path, appliance_files):
    files = dict(reversed(list(appliance_files.items())))
    with pytest.raises(UserError, match="first member must be the .ovf"):
        read_source(build_ova(tmp_path / "appliance.ova", files))


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><x>&lol3;</x></Envelope>"""
EXTERNAL = b"""<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e SYSTEM "file:///etc/passwd">]>
<VirtualBox xmlns="http://www.virtualbox.org/"><Machine name="&e;"/></VirtualBox>"""


@pytest.mark.parametrize("name,data,words", [
    ("bomb.ovf", BOMB, "DOCTYPE or ENTITY"),
    ("external.vbox", EXTERNAL, "DOCTYPE or ENTITY"),
    ("truncated.ovf", (DATA / "ovf" / "appliance.ovf").read_bytes()[:3000],
     "not well-formed XML"),
    ("truncated.vbox", (DATA / "vbox" / "devbox" / "devbox.vbox").read_bytes()[:2500],
     "not well-formed XML"),
])
def test_hostile_and_truncated_xml_refused(tmp_path, name, data, words):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=words):
        read_source(tmp_path / name)


def test_ova_with_entity_bomb_refused(tmp_path):
    with pytest.raises(UserError, match="DOCTYPE or ENTITY"):
        read_source(build_ova(tmp_path / "bomb.ova", {"bomb.ovf": BOMB}))


def test_ovf_absurd_memory_and_unknown_required_item_refused(tmp_path, appliance_files):
    ovf = appliance_files["appliance.ovf"].decode()
    ovf = ovf.replace("<rasd:VirtualQuantity>2048</rasd:VirtualQuantity>",
                      "<rasd:VirtualQuantity>99999999999</rasd:VirtualQuantity>")
    ovf = ovf.replace("<rasd:ResourceType>24</rasd:ResourceType>",
                      "<rasd:ResourceType>42</rasd:ResourceType>")
    ovf = ovf.replace('<Item ovf:required="false">\n        <rasd:ElementName>Video card',
                      '<Item>\n        <rasd:ElementName>Video card')
    appliance_files["appliance.ovf"] = ovf.encode()
    defn = read_source(build_ova(tmp_path / "appliance.ova", appliance_files))
    refused_with(defn, "memory", "out of range")
    refused_with(defn, "Video card", "resource type 42", "required")


# ---------------------------------------------------------------------------- VirtualBox

@pytest.fixture
def devbox(tmp_path):
    vm = tmp_path / "devbox"
    shutil.copytree(DATA / "vbox" / "devbox", vm)
    for name, size in (("devbox.vdi", "10M"), ("devbox-data.vdi", "6M"),
                       ("scratch.vdi", "2M")):
        qemu_img("create", "-f", "vdi", str(vm / name), size)
    return vm


def test_vbox_efi_vm_sata_and_nvme_disks_two_adapters_dvd(devbox):
    defn = read_source(devbox / "devbox.vbox")
    assert (defn.name, defn.source, defn.cpus, defn.memory, defn.firmware, defn.machine) == \
        ("devbox", "vbox", 2, 3072 * MIB, "uefi", "q35")
    assert (defn.uuid, defn.os_type) == ("b7a3c2d1-0e4f-4a5b-9c8d-7e6f5a4b3c2d", "Ubuntu_64")
    got = [(d.path.name, d.format, d.bus, d.controller, d.unit, d.boot_order)
           for d in defn.disks]
    assert got == [("devbox.vdi", "vdi", "sata", 0, 0, 1),
                   ("devbox-data.vdi", "vdi", "sata", 0, 1, None),
                   ("scratch.vdi", "vdi", "nvme", 0, 0, None)]
    assert defn.nics == (NicDef("e1000", "08:00:27:aa:bb:cc", "nat"),
                         NicDef("virtio-net-pci", "08:00:27:dd:ee:ff", "bridged:enp3s0"))
    warnings = " | ".join(texts(defn, Level.WARNING))
    assert "ubuntu-22.04.4-desktop-amd64.iso left out" in warnings
    assert "NVRAM" in warnings
    assert not defn.refusals()


def test_vbox_snapshot_differencing_disk_and_escaping_location_refused(devbox):
    vbox = devbox / "devbox.vbox"
    text = vbox.read_text().replace(
        'location="devbox-data.vdi" format="VDI" type="Normal"/>',
        'location="devbox-data.vdi" format="VDI" type="Normal">\n<HardDisk uuid='
        '"{99999999-0000-0000-0000-000000000001}" location="Snapshots/{diff}.vdi" '
        'format="VDI"/></HardDisk>')
    text = text.replace("{66666666-7777-8888-9999-000000000000}\"/>",
                        "{99999999-0000-0000-0000-000000000001}\"/>")
    vbox.write_text(text.replace('location="scratch.vdi"', 'location="../../scratch.vdi"'))
    defn = read_source(vbox)
    refused_with(defn, "Snapshots/{diff}.vdi", "differencing")
    refused_with(defn, "'../../scratch.vdi'", "outside the VM's directory")
    assert [d.path.name for d in defn.disks] == ["devbox.vdi"]


def test_vbox_unregistered_image_refused(devbox):
    vbox = devbox / "devbox.vbox"
    vbox.write_text(vbox.read_text().replace(
        '<Image uuid="{aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee}"/>',
        '<Image uuid="{aaaaaaaa-bbbb-cccc-dddd-000000000000}"/>'))
    refused_with(read_source(vbox), "aaaaaaaa-bbbb-cccc-dddd-000000000000",
                 "not in the machine's media registry")


# --------------------------------------------------------------------------- bare images

@pytest.mark.parametrize("fmt,options,suffix,expect", [
    ("vpc", "subformat=fixed", "vhd", "vpc"),
    ("vpc", "subformat=dynamic", "vhd", "vpc"),
    ("vhdx", "", "vhdx", "vhdx"),
    ("vdi", "", "vdi", "vdi"),
    ("vmdk", "subformat=monolithicSparse", "vmdk", "vmdk"),
    ("vmdk", "subformat=monolithicFlat", "vmdk", "vmdk"),
    ("vmdk", "subformat=twoGbMaxExtentSparse", "vmdk", "vmdk"),
    ("vmdk", "subformat=twoGbMaxExtentFlat", "vmdk", "vmdk"),
    ("vmdk", "subformat=streamOptimized", "vmdk", "vmdk"),
    ("qcow2", "", "qcow2", "qcow2"),
    ("raw", "", "img", "raw"),
])
def test_bare_image_format_and_size(tmp_path, fmt, options, suffix, expect):
    image = tmp_path / f"disk.{suffix}"
    qemu_img("create", "-f", fmt, *(["-o", options] if options else []), str(image), "24M")
    defn = read_source(image, memory=512 * MIB, cpus=2,
                       nics=[NicDef("virtio-net-pci", None, "lan", "lan")])
    disk, = defn.disks
    assert (disk.format, disk.bus, disk.boot_order) == (expect, "sata", 1)
    # VHD's CHS geometry rounds the size; every other format keeps it exactly
    assert disk.virtual_size == 24 * MIB if fmt != "vpc" else 24 * MIB <= disk.virtual_size \
        < 25 * MIB
    assert (defn.name, defn.memory, defn.cpus, defn.source) == ("disk", 512 * MIB, 2, "image")
    assert defn.nics[0].network == "lan" and not defn.refusals()
    if options == "subformat=fixed":       # QEMU's probe says raw: the footer tells
        assert any("a fixed VHD" in t for t in texts(defn, Level.DECISION))
    assert not texts(defn, Level.WARNING)


def test_bare_file_no_format_recognizes_is_raw_and_warned(tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"hello" * 1000)
    defn = read_source(tmp_path / "notes.txt", memory=256 * MIB)
    assert defn.disks[0].format == "raw"
    assert "taken as a raw disk" in texts(defn, Level.WARNING)[0]


def test_bare_qcow2_with_backing_file_refused(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "8M")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
             str(tmp_path / "top.qcow2"))
    defn = read_source(tmp_path / "top.qcow2", memory=256 * MIB)
    refused_with(defn, "top.qcow2", "backing file")


def test_bare_image_without_memory_refused(tmp_path):
    qemu_img("create", "-f", "qcow2", str(tmp_path / "a.qcow2"), "8M")
    refused_with(read_source(tmp_path / "a.qcow2"), "no memory size")


# ----------------------------------------------------------------------- net map and CLI

def test_net_map_sets_networks_and_refuses_unknown_sources(web01):
    defn = read_source(web01 / "web01.vmx", net_map={"VM Network": "lan", "VMnet9": "x"})
    assert [n.network for n in defn.nics] == ["lan", None]
    assert any("VMnet2" in t for t in texts(defn, Level.WARNING))
    refused_with(defn, "--net-map VMnet9=x", "no NIC")


def test_definition_round_trips_through_json(tmp_path, appliance_files):
    defn = read_source(build_ova(tmp_path / "appliance.ova", appliance_files))
    assert VmDefinition.from_json(json.loads(json.dumps(defn.to_json()))) == defn


def test_cli_inspect_report_json_and_exit_status(web01, capsys):
    assert main(["import", str(web01 / "web01.vmx"), "--inspect",
                 "--net-map", "VM Network=lan", "--net-map", "VMnet2=storage"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("web01 (vmx): 4 vCPU (2 socket(s) x 2 core(s)), 4.0 GiB, uefi")
    assert "  disk scsi-pvscsi 0:0 vmdk 8.0 MiB, boot 1: " in out
    assert "nic 0: vmxnet3 mac 00:50:56:3f:12:34 source network VM Network -> lan" in out
    assert "warning: sata0:1: CD/DVD ubuntu-22.04.4-live-server-amd64.iso left out (" in out
    assert out.rstrip().endswith("ready to import")
    lines = out.splitlines()
    levels = [line.split(":")[0] for line in lines if line.split(":")[0] in
              ("decision", "warning", "refusal")]
    assert levels == sorted(levels, key=["decision", "warning", "refusal"].index)

    (web01 / "web01_1.vmdk").unlink()
    assert main(["import", str(web01 / "web01.vmx"), "--inspect", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert any(n["level"] == "refusal" and "web01_1.vmdk is missing" in n["text"]
               for n in data["notes"])


def test_cli_bare_image_options(tmp_path, capsys):
    qemu_img("create", "-f", "vhdx", str(tmp_path / "win.vhdx"), "16M")
    assert main(["import", str(tmp_path / "win.vhdx"), "--inspect", "--json", "--memory",
                 "2G", "--cpus", "2", "--firmware", "uefi",
                 "--nic", "lan,mac=52:54:00:12:34:56,model=e1000e"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["memory"], data["cpus"], data["firmware"], data["machine"]) == \
        (2 << 30, 2, "uefi", "q35")
    assert data["nics"] == [{"model": "e1000e", "mac": "52:54:00:12:34:56",
                             "source_network": "lan", "network": "lan"}]
    assert data["disks"][0]["format"] == "vhdx"


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bomb.ovf").write_bytes(BOMB)
    assert main(["import", str(tmp_path / "bomb.ovf"), "--inspect"]) == 1
    assert "DOCTYPE or ENTITY" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "nothing.vmx"), "--inspect"]) == 1
    assert "no such file" in capsys.readouterr().err
    qemu_img("create", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
    assert main(["import", str(tmp_path / "a.qcow2"), "--memory", "64M"]) == 1
    assert "say where the VM goes: --local" in capsys.readouterr().err


def test_report_lists_refusals_last(web01):
    truncate(web01 / "web01-flat.vmdk", MIB)
    lines = report_lines(read_source(web01 / "web01.vmx"))
    assert lines[-1] == "1 refusal(s): nothing can be imported"
    assert lines[-2].startswith("refusal: web01.vmdk: flat extent")


def test_ovf_raw_disk_larger_than_its_file_refused(tmp_path):
    truncate(tmp_path / "devvm-disk001.img", 4 * MIB)
    ovf = (DATA / "ovf" / "vbox-export.ovf").read_text()
    ovf = ovf.replace('ovf:href="devvm-disk001.vmdk" ovf:size="0"',
                      f'ovf:href="devvm-disk001.img" ovf:size="{4 * MIB}"')
    ovf = re.sub(r'ovf:format="[^"]*"', "", ovf)          # capacity says 16 MiB
    (tmp_path / "devvm.ovf").write_text(ovf)
    refused_with(read_source(tmp_path / "devvm.ovf"), "devvm-disk001.img",
                 "raw disk of 16777216 bytes in a file of 4194304")


def test_ide_disks_go_on_q35s_ahci_ports_and_on_pcs_piix_buses():
    from agent.importer.argv import disk_arguments
    disks = [DiskDef(path=Path(f"/d{n}"), bus="ide", controller=c, unit=u)
             for n, (c, u) in enumerate(((0, 0), (0, 1), (1, 0)))]
    for machine, buses in (("q35", ["bus=ide.0", "bus=ide.1", "bus=ide.2"]),
                           ("pc", ["bus=ide.0,unit=0", "bus=ide.0,unit=1",
                                   "bus=ide.1,unit=0"])):
        definition = VmDefinition(name="x", memory=1 << 26, machine=machine,
                                  disks=tuple(disks))
        args = disk_arguments(definition, [(d, d.path, "raw") for d in disks])
        devices = [a for a in args if a.startswith("ide-hd,")]
        assert [d.split(",", 2)[2] for d in devices] == buses
