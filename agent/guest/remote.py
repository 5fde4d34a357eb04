"""Reading the test guest's mailbox over QMP, for a guest whose RAM is not a file we map
(plain -m private memory): HMP `xp` reads guest-physical memory."""

from __future__ import annotations

import struct

from agent.errors import QemuError
from agent.guest.mailbox import MAILBOX_ADDR, MailboxState, read_mailbox
from agent.qemu import qmp as qmp_mod

# The mailbox's status and config words (mailbox.py: 0x00 .. 0x57).
MAILBOX_WORDS = 0x58 // 4
MAILBOX_BYTES = MAILBOX_ADDR + MAILBOX_WORDS * 4


async def read_mailbox_over_qmp(qmp: qmp_mod.Qmp) -> MailboxState:
    """The guest's mailbox as read_mailbox gives it from RAM."""
    text = await qmp.hmp(f"xp /{MAILBOX_WORDS}wx {MAILBOX_ADDR:#x}")
    words = [int(word, 16) for line in text.splitlines() if ":" in line
             for word in line.split(":", 1)[1].split()]
    if len(words) != MAILBOX_WORDS:
        raise QemuError(f"cannot read the guest's mailbox over HMP: {text.strip()!r}")
    buffer = bytearray(MAILBOX_BYTES)
    struct.pack_into(f"<{MAILBOX_WORDS}I", buffer, MAILBOX_ADDR, *words)
    return read_mailbox(buffer)
