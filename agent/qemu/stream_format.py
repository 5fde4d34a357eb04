"""Byte layout of QEMU 7.2's migration stream, as far as ferry reads it (DESIGN §2b).

Every section type, RAM record flag and limit has a name here; the native record loop
(ext/qstream.pyx) and its twin read their constants from this module. Definitions:
QEMU's migration/savevm.c (sections) and migration/ram.c (RAM records). All integers in
the stream are big-endian.
"""

from __future__ import annotations

import enum
import struct

from agent.batch.format import ZERO_OFFSET

MAGIC = b"QEVM"
VERSION = 3
HEADER = struct.Struct(">4sI")

BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")


class Section(enum.IntEnum):
    """The byte that opens each top-level item of the stream."""

    EOF = 0x00            # end of device state
    START = 0x01          # first section of an iterative device (RAM: its block list)
    PART = 0x02           # one pre-copy iteration of an iterative device
    END = 0x03            # the last iteration, with the guest stopped
    FULL = 0x04           # one device's whole state
    SUBSECTION = 0x05     # inside a section: an optional part of its state
    VMDESC = 0x06         # JSON description of the state just sent (after EOF)
    CONFIGURATION = 0x07  # the machine type, and validated capabilities
    COMMAND = 0x08        # postcopy and other commands: never sent in plain pre-copy
    FOOTER = 0x7E         # closes each section, followed by its id


RAM_SECTION = b"ram"
RAM_SECTION_VERSION = 4

# RAM record header: be64 (page offset | flags); flags live below the page size.
RAM_SAVE_FLAG_ZERO = 0x02       # a page of one fill byte (always 0 in QEMU 7.2)
RAM_SAVE_FLAG_MEM_SIZE = 0x04   # the block list of SECTION_START
RAM_SAVE_FLAG_PAGE = 0x08       # 4 KiB of page data follow
RAM_SAVE_FLAG_EOS = 0x10        # end of this section's records
RAM_SAVE_FLAG_CONTINUE = 0x20   # same block as the previous record: no block name
RECORD_FLAGS_MASK = 0xFFF
"""Flags a record header may carry; anything else (XBZRLE 0x40, HOOK 0x80, COMPRESS_PAGE
0x100, multifd) means a capability ferry did not set, and the stream is refused."""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ZERO_PAGE_OFFSET = ZERO_OFFSET
"""Offset the record loop gives a ZERO record's page (it has no bytes in the stream): the
page-batch encoder's mark for an all-zero block."""

# What the destination QEMU needs, with x-ignore-shared on, that a source without it does
# not send: the capability in the configuration section (byte-identical to what a source
# with x-ignore-shared sends), and each block's guest address after its length.
CAPABILITIES_SUBSECTION = b"configuration/capabilities"
IGNORE_SHARED = b"x-ignore-shared"
CAPABILITIES_VERSION = 1
BLOCK_ADDRESS = 0
"""mr->addr given for every block: the destination checks it only for shared (ignored)
blocks, and the main RAM backend's is 0 on x86 pc/q35 (mapped through aliases)."""

# Limits a parser enforces before buffering anything.
MAX_BLOCKS = 256                # RAM blocks in SECTION_START
MAX_CONFIG_NAME = 255


class Scan(enum.IntEnum):
    """Why the native record loop stopped."""

    NEED_DATA = 0      # the next record is not all in the buffer yet
    EOS = 1            # the next word is RAM_SAVE_FLAG_EOS (not consumed)
    FULL = 2           # an output (page list or forward buffer) is full
    BAD_FLAGS = 3      # a record flag ferry does not carry
    UNKNOWN_BLOCK = 4  # a block name not in SECTION_START's list
    NO_BLOCK = 5       # CONTINUE before any block was named
    BEYOND = 6         # a page offset past its block's end
    BAD_FILL = 7       # a ZERO record whose fill byte is not 0


def capabilities_subsection() -> bytes:
    """The configuration subsection announcing x-ignore-shared, as QEMU writes it."""
    return b"".join((bytes([Section.SUBSECTION, len(CAPABILITIES_SUBSECTION)]),
                     CAPABILITIES_SUBSECTION, BE32.pack(CAPABILITIES_VERSION), BE32.pack(1),
                     bytes([len(IGNORE_SHARED)]), IGNORE_SHARED))
