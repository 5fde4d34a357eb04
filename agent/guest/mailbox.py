"""The test guest's mailbox: its layout, and reading status / writing config through RAM.

The guest (guest.S, which must agree with every constant here, as a test in
tests/test_guest.py checks) keeps one page at guest-physical MAILBOX_ADDR. On
`-machine pc` low RAM is mapped 1:1, so that page is at the same offset in the VM's
shared RAM file, and the host reads it without asking QEMU (agent.guest.remote reads it
over QMP for a guest in private RAM).

    offset  field (little-endian u32 unless said)     written by
    0x00    magic 0x59524546 ("FERY")                  guest, last at boot
    0x04    layout version                             guest
    0x08    heartbeat: +1 per millisecond running      guest
    0x0C    passes over the working set completed      guest
    0x10    error count (pages not as last written)    guest
    0x14    first error page (0xFFFFFFFF: none)        guest
    0x18    last error page                            guest
    0x1C    state: 1 booting, 2 filling, 3 running     guest
    0x20    pages written (u64)                        guest
    0x28    TSC ticks per millisecond (calibrated)     guest
    0x2C    RAM pages below the first hole             guest
    0x30    working set in effect: start page          guest
    0x34    working set in effect: page count          guest
    0x38    config status: 0 ok, 1 bad set, 2 bad fill guest
    0x40    config: working-set start page             host (guest sets defaults at boot)
    0x44    config: working-set page count             host
    0x48    config: target pages per second (0: max)   host
    0x4C    config: fill start page (boot only)        build time
    0x50    config: fill page count (boot only)        build time
    0x54    config seqlock: odd while the host writes  host
    0x800   guest-private state; the stack is the top of the page

The guest takes a new working set at the start of a pass (the rate at once), and skips the
check for one pass after a change. Write config only after the magic appears: at boot the
guest overwrites the config area with its built-in defaults.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields

PAGE_SIZE = 4096
PAGE_DWORDS = PAGE_SIZE // 4
MASK32 = 0xFFFFFFFF

KERNEL_ADDR = 0x00100000            # where the guest's code is loaded (never written)
MAILBOX_ADDR = 0x00200000
MAILBOX_PAGE = MAILBOX_ADDR // PAGE_SIZE
FREE_BASE_PAGE = 0x300              # lowest page the working set or fill may use (3 MiB)
MAGIC = 0x59524546
LAYOUT_VERSION = 1
NO_PAGE = MASK32
MAX_RATE = 0x01000000               # pages per second; higher rates count as this

# Page pattern: dword j of page p on pass n is seed(p, n) + j * PATTERN_STEP (mod 2**32).
SEED_PAGE_MUL = 0x9E3779B1
SEED_PASS_MUL = 0x85EBCA77
SEED_ADD = 0x27D4EB2F
PATTERN_STEP = 0x6A09E667

STATUS_OFFSET = 0x00
CONFIG_OFFSET = 0x40
CONFIG_SEQ_OFFSET = 0x54
_STATUS = struct.Struct("<7I I Q 6I")   # 0x00 .. 0x3B
_CONFIG = struct.Struct("<5I")          # 0x40 .. 0x53
_SEQ = struct.Struct("<I")


class GuestState(enum.IntEnum):
    """Where the guest is in its life."""

    NOT_BOOTED = 0   # mailbox still zero
    BOOTING = 1      # calibrating its clock
    FILLING = 2      # writing the boot-time fill
    RUNNING = 3      # dirtying and checking the working set


class ConfigStatus(enum.IntEnum):
    """The guest's verdict on the config it last read."""

    OK = 0
    BAD_WORKING_SET = 1   # outside free RAM: the guest idles instead
    BAD_FILL = 2          # fill outside free RAM: skipped


@dataclass(frozen=True, slots=True)
class GuestConfig:
    """What the guest dirties (pages), how fast, and what it fills once at boot."""

    ws_start_page: int = 0x400          # 4 MiB
    ws_pages: int = 256                 # 1 MiB
    rate: int = 2000                    # pages per second; 0 = as fast as it can
    fill_start_page: int = 0x1000       # 16 MiB
    fill_pages: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or not 0 <= value <= MASK32:
                raise ValueError(f"guest config {f.name}={value!r} is not a u32")

    def check(self, ram_pages: int | None = None) -> None:
        """Raise ValueError where the guest would refuse this config (it just idles)."""
        for start, count, what in ((self.ws_start_page, self.ws_pages, "working set"),
                                   (self.fill_start_page, self.fill_pages, "fill")):
            if count and start < FREE_BASE_PAGE:
                raise ValueError(f"{what} starts at page {start:#x}, below the guest's own "
                                 f"pages (use >= {FREE_BASE_PAGE:#x})")
            if count and ram_pages is not None and start + count > ram_pages:
                raise ValueError(f"{what} pages {start:#x}+{count} go beyond the guest's "
                                 f"{ram_pages} pages of RAM")

    @property
    def ws_pages_range(self) -> range:
        return range(self.ws_start_page, self.ws_start_page + self.ws_pages)

    @property
    def fill_pages_range(self) -> range:
        return range(self.fill_start_page, self.fill_start_page + self.fill_pages)

    def defsyms(self) -> dict[str, int]:
        """The assembler symbols that make this the guest's boot-time config."""
        return {"CFG_WS_START": self.ws_start_page, "CFG_WS_PAGES": self.ws_pages,
                "CFG_RATE": self.rate, "CFG_FILL_START": self.fill_start_page,
                "CFG_FILL_PAGES": self.fill_pages}


@dataclass(frozen=True, slots=True)
class MailboxState:
    """One reading of the mailbox."""

    magic: int
    version: int
    heartbeat: int
    passes: int
    errors: int
    first_error_page: int | None
    last_error_page: int | None
    state: GuestState
    pages_written: int
    tsc_per_ms: int
    ram_pages: int
    active_start_page: int
    active_pages: int
    config_status: ConfigStatus
    config: GuestConfig

    @property
    def ready(self) -> bool:
        """The guest has booted this layout and published its config."""
        return self.magic == MAGIC and self.version == LAYOUT_VERSION

    @property
    def running(self) -> bool:
        return self.ready and self.state == GuestState.RUNNING


def _page_or_none(value: int) -> int | None:
    return None if value == NO_PAGE else value


def read_mailbox(ram: object) -> MailboxState:
    """Decode the mailbox from a buffer holding the guest's RAM from address 0."""
    (magic, version, heartbeat, passes, errors, first, last, state, pages_written,
     tsc_per_ms, ram_pages, active_start, active_pages, config_status,
     _reserved) = _STATUS.unpack_from(ram, MAILBOX_ADDR + STATUS_OFFSET)  # type: ignore[arg-type]
    ws_start, ws_pages, rate, fill_start, fill_pages = _CONFIG.unpack_from(
        ram, MAILBOX_ADDR + CONFIG_OFFSET)  # type: ignore[arg-type]
    try:
        guest_state = GuestState(state)
        status = ConfigStatus(config_status)
    except ValueError:
        guest_state, status = GuestState.NOT_BOOTED, ConfigStatus.OK
    config = GuestConfig(ws_start_page=ws_start, ws_pages=ws_pages, rate=rate,
                         fill_start_page=fill_start, fill_pages=fill_pages)
    return MailboxState(magic=magic, version=version, heartbeat=heartbeat, passes=passes,
                        errors=errors, first_error_page=_page_or_none(first),
                        last_error_page=_page_or_none(last), state=guest_state,
                        pages_written=pages_written, tsc_per_ms=tsc_per_ms,
                        ram_pages=ram_pages, active_start_page=active_start,
                        active_pages=active_pages, config_status=status, config=config)


def write_config(ram: object, config: GuestConfig) -> None:
    """Publish a new working set and rate to a running guest (the fill fields are ignored).

    A seqlock keeps the guest from taking half of an update: it skips the config while the
    sequence number is odd or changes under it.
    """
    addr = MAILBOX_ADDR + CONFIG_SEQ_OFFSET
    seq = _SEQ.unpack_from(ram, addr)[0] | 1  # type: ignore[arg-type]
    _SEQ.pack_into(ram, addr, seq)  # type: ignore[arg-type]
    _CONFIG.pack_into(ram, MAILBOX_ADDR + CONFIG_OFFSET,  # type: ignore[arg-type]
                      config.ws_start_page, config.ws_pages, config.rate,
                      config.fill_start_page, config.fill_pages)
    _SEQ.pack_into(ram, addr, (seq + 1) & MASK32)  # type: ignore[arg-type]


def page_seed(page: int, pass_no: int) -> int:
    """First dword of `page`'s content after pass `pass_no` (the guest's page_seed)."""
    return (page * SEED_PAGE_MUL + pass_no * SEED_PASS_MUL + SEED_ADD) & MASK32


def page_pattern(page: int, pass_no: int) -> bytes:
    """The exact 4 KiB the guest writes into `page` on pass `pass_no`."""
    seed = page_seed(page, pass_no)
    return struct.pack(f"<{PAGE_DWORDS}I",
                       *((seed + j * PATTERN_STEP) & MASK32 for j in range(PAGE_DWORDS)))


def guest_pages(config: GuestConfig) -> set[int]:
    """Pages the running guest writes: its working set and the mailbox (which holds its stack)."""
    return set(config.ws_pages_range) | {MAILBOX_PAGE}
