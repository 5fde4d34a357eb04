"""Helpers shared by the subcommands: --home, sizes and rates, talking to the agent."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.errors import UserError
from agent.qemu.vmspec import parse_size


def add_home_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, default=None,
                        help="agent home directory (default: /var/lib/ferry for root, "
                             "else ~/.local/state/ferry)")


def resolve_home(args: argparse.Namespace) -> Path:
    """The --home given, or this user's default agent home."""
    from agent.identity import default_home
    return (args.home or default_home()).absolute()


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


def human_bytes(n: float) -> str:
    """1.5 GiB style sizes for progress lines and reports."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
