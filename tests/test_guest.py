"""The self-checking test guest: it boots, counts, dirties at its rate, and catches bad pages."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import struct
import time

import pytest

from agent.errors import FerryError
from agent.guest import (
    WORKING_SET_SECONDS,
    ConfigStatus,
    GuestConfig,
    GuestState,
    build_guest,
    guest_config,
    mailbox,
    page_pattern,
)
from agent.guest.build import SOURCE
from agent.qemu import qmp

PAGE = mailbox.PAGE_SIZE
# Generous: the guest usually boots in ~0.2 s under TCG, but the machine is shared.
BOOT_SECONDS = 3.0


def page_bytes(guest, page: int) -> bytes:
    return bytes(guest.ram[page * PAGE:(page + 1) * PAGE])


def wait_passes(guest, count: int, timeout: float = 5.0):
    """Wait until `count` more passes over the working set have completed."""
    target = guest.mailbox().passes + count
    return guest.wait_until(lambda s: s.passes >= target, timeout=timeout,
                            what=f"{count} more passes")


# ---------------------------------------------------------------------------- no QEMU needed

def test_layout_constants_match_the_assembly():
    """guest.S and mailbox.py each name the layout; they must agree on every value."""
    source = SOURCE.read_text()
    defined = dict(re.findall(r"^\s*\.set\s+(\w+),\s*(0x[0-9A-Fa-f]+|\d+)\b", source, re.MULTILINE))
    defined = {name: int(value, 0) for name, value in defined.items()}
    expected = {
        "MAILBOX": mailbox.MAILBOX_ADDR, "FREE_BASE_PAGE": mailbox.FREE_BASE_PAGE,
        "MAGIC": mailbox.MAGIC, "LAYOUT_VERSION": mailbox.LAYOUT_VERSION,
        "NO_PAGE": mailbox.NO_PAGE, "MAX_RATE": mailbox.MAX_RATE,
        "SEED_PAGE_MUL": mailbox.SEED_PAGE_MUL, "SEED_PASS_MUL": mailbox.SEED_PASS_MUL,
        "SEED_ADD": mailbox.SEED_ADD, "PATTERN_STEP": mailbox.PATTERN_STEP,
        "MB_CFG_WS_START": mailbox.CONFIG_OFFSET, "MB_CFG_SEQ": mailbox.CONFIG_SEQ_OFFSET,
        "STATE_RUNNING": GuestState.RUNNING, "CONFIG_BAD_WS": ConfigStatus.BAD_WORKING_SET,
        # The status fields in the order mailbox._STATUS decodes them.
        "MB_MAGIC": 0x00, "MB_HEARTBEAT": 0x08, "MB_ERRORS": 0x10, "MB_STATE": 0x1C,
        "MB_PAGES_LO": 0x20, "MB_TSC_PER_MS": 0x28, "MB_ACTIVE_START": 0x30,
        "MB_CONFIG_STATUS": 0x38, "MB_CFG_RATE": 0x48, "MB_CFG_FILL_PAGES": 0x50,
    }
    assert {name: defined.get(name) for name in expected} == expected
    assert mailbox._STATUS.size == mailbox.CONFIG_OFFSET
    assert mailbox.CONFIG_OFFSET + mailbox._CONFIG.size == mailbox.CONFIG_SEQ_OFFSET
    assert f"{mailbox.KERNEL_ADDR:#010x}" in (SOURCE.parent / "guest.ld").read_text()


def test_build_is_cached_per_config(tmp_path):
    first = build_guest(GuestConfig(), cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build_guest(GuestConfig(), cache_dir=tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    other = build_guest(GuestConfig(rate=1), cache_dir=tmp_path)
    assert other != first and other.read_bytes() != first.read_bytes()
    assert first.read_bytes()[:4] == b"\x7fELF"


def test_config_refuses_the_guests_own_pages():
    with pytest.raises(ValueError, match="below"):
        GuestConfig(ws_start_page=mailbox.MAILBOX_PAGE).check()
    with pytest.raises(ValueError, match="beyond"):
        GuestConfig(ws_start_page=0x400, ws_pages=100).check(ram_pages=0x420)
    GuestConfig(ws_start_page=0, ws_pages=0).check()   # an idle guest is fine


def test_guest_config_places_the_working_set_before_the_fill():
    config = guest_config(ram_mib=1024, fill_mib=512, rate=5000)
    assert config.ws_pages == 5000 * WORKING_SET_SECONDS
    assert config.fill_start_page >= config.ws_start_page + config.ws_pages
    assert config.fill_pages == 512 * (1 << 20) // PAGE
    small = guest_config(ram_mib=64, fill_mib=512, rate=1000)
    assert (small.fill_start_page + small.fill_pages) * PAGE <= 63 << 20
    with pytest.raises(FerryError):
        guest_config(ram_mib=16, fill_mib=0, rate=100_000)


def test_pattern_depends_on_page_and_pass():
    assert len(page_pattern(0x400, 3)) == PAGE
    assert page_pattern(0x400, 3) != page_pattern(0x401, 3)
    assert page_pattern(0x400, 3) != page_pattern(0x400, 4)
    first = struct.unpack_from("<I", page_pattern(0x400, 3))[0]
    assert first == mailbox.page_seed(0x400, 3)


# ---------------------------------------------------------------------------- real QEMU

@pytest.mark.qemu
def test_boots_quickly_and_counts(start_guest):
    start = time.monotonic()
    guest = start_guest()
    assert time.monotonic() - start < BOOT_SECONDS
    first = guest.mailbox()
    assert first.ready and first.state is GuestState.RUNNING
    assert first.tsc_per_ms > 0
    assert first.ram_pages > guest.config.ws_start_page + guest.config.ws_pages
    assert (first.active_start_page, first.active_pages) == (0x400, 256)
    time.sleep(0.5)
    later = guest.mailbox()
    assert later.heartbeat > first.heartbeat
    assert later.passes > first.passes
    assert later.errors == 0 and later.first_error_page is None


@pytest.mark.qemu
def test_dirties_at_the_configured_rate(start_guest):
    guest = start_guest(config=GuestConfig(ws_pages=1000, rate=4000))
    t0, s0 = time.monotonic(), guest.mailbox()
    time.sleep(1.0)
    t1, s1 = time.monotonic(), guest.mailbox()
    rate = (s1.pages_written - s0.pages_written) / (t1 - t0)
    # TCG timing is approximate and the host is shared; steady within a wide band.
    assert 0.7 * 4000 < rate < 1.15 * 4000
    beat_rate = (s1.heartbeat - s0.heartbeat) / (t1 - t0)
    assert 700 < beat_rate < 1150


@pytest.mark.qemu
def test_pages_hold_the_pattern_of_a_recent_pass(guest):
    state = wait_passes(guest, 2)
    for page in (0x400, 0x400 + 128, 0x400 + 255):
        content = page_bytes(guest, page)
        assert any(content == page_pattern(page, n)
                   for n in range(state.passes - 1, state.passes + 3)), hex(page)


@pytest.mark.qemu
def test_a_foreign_write_is_detected(guest):
    wait_passes(guest, 2)
    victim = 0x400 + 200
    # The guest may rewrite the page between our write and its check (that pass then
    # writes over ours unseen); poke again until it notices.
    for _ in range(5):
        offset = victim * PAGE + 1000 * 4   # a dword near the end of the page
        guest.ram[offset:offset + 4] = b"\xde\xad\xbe\xef"
        try:
            state = guest.wait_until(lambda s: s.errors > 0, timeout=1.0, what="an error")
            break
        except Exception:
            continue
    else:
        pytest.fail("the guest never noticed a corrupted page")
    assert state.first_error_page == victim
    assert state.last_error_page == victim


@pytest.mark.qemu
def test_config_change_at_run_time(guest):
    wait_passes(guest, 1)
    old_page = 0x400
    new = dataclasses.replace(guest.config, ws_start_page=0x800, ws_pages=64, rate=8000)
    guest.set_config(new)
    guest.wait_until(lambda s: (s.active_start_page, s.active_pages) == (0x800, 64),
                     timeout=2.0, what="the new working set")
    state = wait_passes(guest, 3)
    assert state.errors == 0
    assert state.config_status is ConfigStatus.OK
    content = page_bytes(guest, 0x800 + 10)
    assert any(content == page_pattern(0x800 + 10, n)
               for n in range(state.passes - 1, state.passes + 3))
    frozen = page_bytes(guest, old_page)
    wait_passes(guest, 2)
    assert page_bytes(guest, old_page) == frozen   # the old set is left alone


@pytest.mark.qemu
def test_a_bad_working_set_is_refused_and_the_guest_idles(guest):
    guest.set_config(dataclasses.replace(guest.config, ws_start_page=mailbox.MAILBOX_PAGE))
    state = guest.wait_until(lambda s: s.config_status is ConfigStatus.BAD_WORKING_SET,
                             timeout=2.0, what="the guest to refuse the config")
    written = state.pages_written
    time.sleep(0.2)
    later = guest.mailbox()
    assert later.active_pages == 0
    assert later.heartbeat > state.heartbeat
    assert later.pages_written == written
    assert later.magic == mailbox.MAGIC   # the mailbox page itself was not overwritten


@pytest.mark.qemu
def test_fill_writes_guest_like_pages(start_guest):
    fill = GuestConfig(fill_start_page=0x1000, fill_pages=512)
    guest = start_guest(config=fill)
    kinds = {"zero": 0, "text": 0, "random": 0}
    letters = bytes(range(ord("a"), ord("a") + 16))
    for page in fill.fill_pages_range:
        content = page_bytes(guest, page)
        if content == bytes(PAGE):
            kinds["zero"] += 1
        elif not content.translate(None, letters):
            kinds["text"] += 1
        else:
            kinds["random"] += 1
    # A quarter zero, half text-like, a quarter random (by a hash of the page number).
    assert 0.15 < kinds["zero"] / 512 < 0.35
    assert 0.4 < kinds["text"] / 512 < 0.6
    assert 0.15 < kinds["random"] / 512 < 0.35
    assert page_bytes(guest, 0x1000 + 512) == bytes(PAGE)   # nothing beyond the fill


async def migrate_shared_ram(src, dst, *, lose_page: int | None) -> None:
    """What ferry will do, in miniature: stop, copy RAM file to RAM file, migrate device
    state with x-ignore-shared, resume on the destination. `lose_page` is left unsent."""
    async with qmp.connect(src.qmp_path) as qs, qmp.connect(dst.qmp_path) as qd:
        for q in (qs, qd):
            await q.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "x-ignore-shared", "state": True}]})
        uri = f"unix:{dst.qmp_path.parent / 'migrate.sock'}"
        await qd.execute("migrate-incoming", {"uri": uri})
        mark = qs.event_mark()
        await qs.execute("stop")
        await qs.wait_event("STOP", after=mark, timeout=5)
        dst.ram[:] = src.ram[:]
        if lose_page is not None:
            dst.ram[lose_page * PAGE:(lose_page + 1) * PAGE] = bytes(PAGE)
        await qs.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + 10
        while (await qs.execute("query-migrate"))["status"] != "completed":
            assert time.monotonic() < deadline, "device state migration did not complete"
            await asyncio.sleep(0.01)
        while (await qd.execute("query-status"))["status"] != "paused":
            assert time.monotonic() < deadline, "destination did not finish loading"
            await asyncio.sleep(0.01)
        mark = qd.event_mark()
        await qd.execute("cont")
        await qd.wait_event("RESUME", after=mark, timeout=5)


@pytest.mark.qemu
@pytest.mark.parametrize("lose_page", [None, 0x400 + 77], ids=["complete", "one-page-lost"])
def test_the_guest_checks_itself_across_a_shared_ram_migration(start_guest, lose_page):
    config = GuestConfig(ws_pages=300, rate=20_000)
    src = start_guest(config=config)
    dst = start_guest(config=config, extra_args=("-incoming", "defer"), wait=False)
    wait_passes(src, 2)
    asyncio.run(migrate_shared_ram(src, dst, lose_page=lose_page))
    state = wait_passes(dst, 3)
    assert state.running
    if lose_page is None:
        assert state.errors == 0
    else:
        assert state.errors == 1 and state.first_error_page == lose_page
