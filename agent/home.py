"""Where an agent keeps its state (its home directory) when no --home is given.

Kept apart from agent.identity, which needs the cryptography package: every CLI command
resolves a home, and most of them never touch a key.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_HOME = Path("/var/lib/ferry")
"""Home of an agent run by root (the systemd service)."""
HOME_ENV = "FERRY_HOME"
"""Environment variable naming the home when --home is not given."""


def default_home() -> Path:
    """$FERRY_HOME, else /var/lib/ferry for root, else $XDG_STATE_HOME/ferry (~/.local/state)."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return ROOT_HOME
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "ferry"


def resolve_home(home: str | os.PathLike[str] | None) -> Path:
    """The home directory to use: `home` if given, else default_home()."""
    return Path(home) if home is not None else default_home()
