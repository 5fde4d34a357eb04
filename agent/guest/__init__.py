"""The self-checking test guest: a multiboot kernel built at run time, and its mailbox.

`build_guest` assembles guest.S; `boot_guest` runs it in a migratable QEMU; the mailbox
module reads its status straight from the VM's RAM file (layout documented there);
`guest_config` lays out the standard working set and fill (workload module).
"""

from agent.guest.build import build_guest
from agent.guest.mailbox import (
    FREE_BASE_PAGE,
    KERNEL_ADDR,
    MAGIC,
    MAILBOX_ADDR,
    MAILBOX_PAGE,
    PAGE_SIZE,
    ConfigStatus,
    GuestConfig,
    GuestState,
    MailboxState,
    guest_pages,
    page_pattern,
    read_mailbox,
    write_config,
)
from agent.guest.runner import RunningGuest, boot_guest
from agent.guest.workload import PAGES_PER_MIB, WORKING_SET_SECONDS, guest_config

__all__ = [
    "FREE_BASE_PAGE", "KERNEL_ADDR", "MAGIC", "MAILBOX_ADDR", "MAILBOX_PAGE", "PAGES_PER_MIB",
    "PAGE_SIZE", "WORKING_SET_SECONDS", "ConfigStatus", "GuestConfig", "GuestState",
    "MailboxState", "RunningGuest", "boot_guest", "build_guest", "guest_config", "guest_pages",
    "page_pattern", "read_mailbox", "write_config",
]
