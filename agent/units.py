"""Rates as operators write them (100M, 1G, 800Mbit), for flags and agent.toml alike."""

from __future__ import annotations

from agent.errors import UserError
from agent.qemu.vmspec import parse_size


def parse_rate(text: str) -> int:
    """Bytes per second from RATE such as 100M, 1G, 500M/s or 800Mbit."""
    value = text.strip().lower().removesuffix("/s")
    bits = value.endswith("bit")
    value = value.removesuffix("bit").removesuffix("b") if bits else value.removesuffix("b")
    try:
        amount = parse_size(value)
    except UserError:
        raise UserError(f"bad rate {text!r}: use e.g. 100M (bytes/s), 1G or 800Mbit") from None
    if amount <= 0:
        raise UserError(f"bad rate {text!r}: must be positive")
    return amount // 8 if bits else amount
