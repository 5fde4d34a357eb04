"""Helpers shared by the subcommands: --home, sizes and rates, talking to the agent."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.state.config import AgentConfig


def add_home_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, default=None,
                        help="agent home directory (default: /var/lib/ferry for root, "
                             "else ~/.local/state/ferry)")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="agent settings, TOML (default HOME/agent.toml if it exists; "
                             "docs/config.md)")


def load_agent_config(args: argparse.Namespace) -> AgentConfig:
    """The agent's settings: defaults, then --config FILE or HOME/agent.toml."""
    from agent.state.config import load_config
    return load_config(resolve_home(args), args.config)


def resolve_home(args: argparse.Namespace) -> Path:
    """The --home given, or this user's default agent home."""
    from agent.home import resolve_home as home_or_default
    return home_or_default(args.home).absolute()


def human_bytes(n: float) -> str:
    """1.5 GiB style sizes for progress lines and reports."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
