"""The test guest's standard working set and fill layout (demo, benchmark, end-to-end tests).

The working set starts above the guest's own pages and holds WORKING_SET_SECONDS of writes
at the chosen rate, so that each second's writes land on distinct pages; the fill (pages
written once at boot) follows it, below the top of RAM that SeaBIOS keeps for its tables.
"""

from __future__ import annotations

from agent.errors import UserError
from agent.guest.mailbox import FREE_BASE_PAGE, PAGE_SIZE, GuestConfig

MIB = 1 << 20
PAGES_PER_MIB = MIB // PAGE_SIZE
# The working set holds this many seconds of writes, so one-second rounds see distinct pages.
WORKING_SET_SECONDS = 2
WS_START_PAGE = 0x400               # 4 MiB, above the guest's own pages
# SeaBIOS keeps tables at the top of RAM; leave them alone.
TOP_RESERVE_PAGES = PAGES_PER_MIB


def guest_config(ram_mib: int, fill_mib: int, rate: int) -> GuestConfig:
    """Working set first (two seconds of writes), then the fill, all inside guest RAM."""
    ws_pages = max(1, rate * WORKING_SET_SECONDS)
    fill_start = -(-(WS_START_PAGE + ws_pages) // PAGES_PER_MIB) * PAGES_PER_MIB
    usable_end = ram_mib * PAGES_PER_MIB - TOP_RESERVE_PAGES
    if fill_start > usable_end:
        raise UserError(f"{ram_mib} MiB of RAM cannot hold a working set of {ws_pages} pages")
    fill_pages = min(fill_mib * PAGES_PER_MIB, usable_end - fill_start)
    config = GuestConfig(ws_start_page=WS_START_PAGE, ws_pages=ws_pages, rate=rate,
                         fill_start_page=fill_start, fill_pages=fill_pages)
    config.check(ram_pages=usable_end)
    assert config.ws_start_page >= FREE_BASE_PAGE
    return config
