"""A disk that proves it was imported intact by booting: sector 0 is a boot sector,
assembled at test time with binutils, that reads the disk's data area (sectors 1..N)
through the BIOS (INT 13h extended reads), hashes it, compares the hash with the one
written into it, and says FERRY-BOOT-OK (or BAD, or READ-ERROR) on COM1, then halts.

The data area has a pattern, zero runs and a hole, so a copy that loses, moves or
invents data fails the boot's own check."""

from __future__ import annotations

import struct
import subprocess
import tempfile
from pathlib import Path

SECTOR = 512
CHUNK_SECTORS = 64                   # sectors per INT 13h read: 32 KiB into 0x1000:0000
DATA_SECTORS = 2048                  # 1 MiB of data area
EXPECTED_AT = 0x1F0                  # where in the boot sector the hash goes
OK, BAD, READ_ERROR = "FERRY-BOOT-OK", "FERRY-BOOT-BAD", "FERRY-BOOT-READ-ERROR"

SOURCE = rf"""
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7C00, %sp
    sti
    mov %dl, drive
    xor %ebx, %ebx                  /* the hash */
    mov ${DATA_SECTORS // CHUNK_SECTORS}, %cx
next_chunk:
    push %cx
    mov $dap, %si
    mov $0x42, %ah
    mov drive, %dl
    int $0x13
    jc read_error
    push %ds
    mov $0x1000, %ax
    mov %ax, %ds
    xor %si, %si
    mov ${CHUNK_SECTORS * SECTOR}, %cx
hash_byte:
    lodsb
    movzbl %al, %eax
    imul $31, %ebx, %ebx
    add %eax, %ebx
    loop hash_byte
    pop %ds
    addl ${CHUNK_SECTORS}, dap_lba
    pop %cx
    loop next_chunk
    cmpl expected, %ebx
    jne bad
    mov $ok_text, %si
    jmp say
bad:
    mov $bad_text, %si
    jmp say
read_error:
    mov $read_text, %si
say:
    lodsb
    test %al, %al
    jz halt
    mov $0x3F8, %dx
    out %al, %dx
    jmp say
halt:
    cli
    hlt
    jmp halt
drive: .byte 0
    .balign 4
dap: .byte 16, 0
    .word {CHUNK_SECTORS}, 0x0000, 0x1000
dap_lba: .long 1, 0
ok_text: .asciz "{OK}\r\n"
bad_text: .asciz "{BAD}\r\n"
read_text: .asciz "{READ_ERROR}\r\n"
    .org {EXPECTED_AT}
expected: .long 0
    .org 510
    .word 0xAA55
"""


def data_area() -> bytes:
    """1 MiB: a pattern in most sectors, a zero run and a stretch left a hole."""
    out = bytearray()
    for s in range(DATA_SECTORS):
        if 512 <= s < 768 or 1536 <= s < 1600:      # zeros (and, in the image, a hole)
            out += bytes(SECTOR)
        else:
            out += bytes((s * 7 + j) & 0xFF for j in range(SECTOR))
    return bytes(out)


def boot_hash(data: bytes) -> int:
    h = 0
    for b in data:
        h = (h * 31 + b) & 0xFFFFFFFF
    return h


def make_boot_image(path: Path, size_mib: int = 16) -> Path:
    """A raw image: the boot sector, the data area, then a hole to size_mib."""
    with tempfile.TemporaryDirectory() as work:
        src, obj, out = Path(work, "boot.S"), Path(work, "boot.o"), Path(work, "boot.bin")
        src.write_text(SOURCE)
        subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True,
                       capture_output=True)
        subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7C00", "--oformat", "binary",
                        "-o", str(out), str(obj)], check=True, capture_output=True)
        sector = bytearray(out.read_bytes())
    assert len(sector) == SECTOR, f"boot sector is {len(sector)} bytes"
    data = data_area()
    struct.pack_into("<I", sector, EXPECTED_AT, boot_hash(data))
    with open(path, "wb") as f:
        f.write(sector)
        for s in range(DATA_SECTORS):             # zero sectors left as holes
            chunk = data[s * SECTOR:(s + 1) * SECTOR]
            if any(chunk):
                f.seek(SECTOR * (1 + s))
                f.write(chunk)
        f.truncate(size_mib << 20)
    return path
