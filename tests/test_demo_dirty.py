"""The dirty-rate demo at small scale: it boots the guest, measures, shuts down, and reports sanely."""

from __future__ import annotations

import re

import pytest

from agent import demo_dirty as demo
from agent.errors import FerryError
from agent.guest import PAGE_SIZE


def test_guest_config_places_the_working_set_before_the_fill():
    config = demo.guest_config(ram_mib=1024, fill_mib=512, rate=5000)
    assert config.ws_pages == 5000 * demo.WORKING_SET_SECONDS
    assert config.fill_start_page >= config.ws_start_page + config.ws_pages
    assert config.fill_pages == 512 * (1 << 20) // PAGE_SIZE
    small = demo.guest_config(ram_mib=64, fill_mib=512, rate=1000)
    assert (small.fill_start_page + small.fill_pages) * PAGE_SIZE <= 63 << 20
    with pytest.raises(FerryError):
        demo.guest_config(ram_mib=16, fill_mib=0, rate=100_000)


@pytest.mark.qemu
def test_demo_runs_and_rates_agree():
    lines: list[str] = []
    args = demo.parse_args(["--seconds", "2", "--ram-mib", "64", "--fill-mib", "8",
                            "--rate", "2000"])
    assert demo.asyncio.run(demo.run(args, out=lines.append)) == 0
    text = "\n".join(lines)
    assert re.search(r"^accelerator: (kvm|tcg) ", text, re.M)
    assert "dirty tracker: " in text
    rows = [line.split() for line in lines if re.match(r"\s*\d+\.\d\s", line)]
    assert len(rows) == 2
    for _t, tracker_rate, _scan_ms, guest_rate, _passes, errors in rows:
        assert errors == "0"
        # Same span, distinct pages: the tracker sees what the guest wrote (+ its mailbox).
        assert abs(float(tracker_rate) - float(guest_rate)) < 0.15 * 2000
    assert "QEMU exit status 0" in text
