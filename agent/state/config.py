"""The agent's typed configuration: defaults in code, `agent.toml` in its home, then flags."""

from __future__ import annotations

import shutil
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import UserError
from agent.hostnet.networks import Network, parse_networks
from agent.identity import parse_address
from agent.qemu.hostrules import Accept
from agent.units import parse_rate

CONFIG_FILE = "agent.toml"
DEFAULT_PORT = 7370
DEFAULT_QEMU = "qemu-system-x86_64"
# tmpfs: a VM's RAM file must live in memory; /dev/shm is tmpfs on every Debian host.
DEFAULT_RAM_DIR = Path("/dev/shm")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything an agent needs to know about its host."""

    home: Path
    listen: tuple[str, int] = ("127.0.0.1", DEFAULT_PORT)
    allow_paths: tuple[Path, ...] = ()
    qemu_binary: str = DEFAULT_QEMU
    ram_dir: Path = DEFAULT_RAM_DIR
    control_group: int | None = None
    networks: dict[str, Network] = field(default_factory=dict)   # [networks.NAME]
    shutdown_grace_s: float = 30.0   # SIGTERM: running jobs may end within this, then roll back
    link_timeout_s: float = 60.0     # a link on which nothing moves this long is lost
    accept: Accept = field(default_factory=Accept)   # [accept]: the argv rules widened
    max_outbound: int = 2            # outbound jobs at once; more wait in a queue
    max_inbound: int = 2             # incoming migrations at once; more are refused (busy)
    history_limit: int = 500         # finished jobs' reports kept in HOME/history.jsonl
    bandwidth: int | None = None     # bytes/s on the wire for all outbound jobs together
    metrics_listen: tuple[str, int] | None = None   # Prometheus endpoint; off when None
    health_window_s: float = 3.0     # after resume, how long the guest's pace is watched
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def control_socket(self) -> Path:
        return self.home / "control.sock"

    @property
    def vms_dir(self) -> Path:
        return self.home / "vms"

    @property
    def run_dir(self) -> Path:
        """Sockets and scratch files of running jobs."""
        return self.home / "run"

    @property
    def journal_dir(self) -> Path:
        return self.home / "journal"

    @property
    def roots(self) -> tuple[Path, ...]:
        """Directories the agent may read VM files from or create them in."""
        return (self.home, *self.allow_paths)

    def qemu_path(self) -> str:
        """Absolute path of the configured QEMU binary, or a clear error."""
        found = shutil.which(self.qemu_binary)
        if found is None:
            raise UserError(f"QEMU binary {self.qemu_binary!r} not found; install "
                            f"qemu-system-x86 or set qemu_binary in {self.home / CONFIG_FILE}")
        return found

    def with_overrides(self, **changes: Any) -> AgentConfig:
        """A copy with the given fields replaced (flags given on the command line)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_metrics_listen(text: str, where: str) -> tuple[str, int]:
    """The Prometheus endpoint's HOST:PORT (port 0: any free one); errors name `where`."""
    try:
        return parse_address(text, any_port=True)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def load_config(home: Path) -> AgentConfig:
    """Defaults, then `agent.toml` in home if it exists."""
    config = AgentConfig(home=home)
    path = home / CONFIG_FILE
    if not path.exists():
        return config
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    changes: dict[str, Any] = {}
    if "listen" in data:
        changes["listen"] = parse_address(str(data["listen"]))
    if "allow_paths" in data:
        changes["allow_paths"] = tuple(Path(p) for p in data["allow_paths"])
    if "qemu_binary" in data:
        changes["qemu_binary"] = str(data["qemu_binary"])
    if "ram_dir" in data:
        changes["ram_dir"] = Path(data["ram_dir"])
    if "control_group" in data:
        import grp
        try:
            changes["control_group"] = grp.getgrnam(str(data["control_group"])).gr_gid
        except KeyError:
            raise UserError(f"{path}: no group {data['control_group']!r}") from None
    if "bandwidth" in data:
        changes["bandwidth"] = parse_rate(str(data["bandwidth"]))
    if "metrics_listen" in data:
        changes["metrics_listen"] = parse_metrics_listen(str(data["metrics_listen"]),
                                                         f"{path}: metrics_listen")
    for key in ("shutdown_grace_s", "link_timeout_s", "health_window_s"):
        if key in data:
            seconds = data[key]
            if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
                raise UserError(f"{path}: {key} must be a number of seconds >= 0")
            changes[key] = float(seconds)
    for key, least in (("max_outbound", 1), ("max_inbound", 0), ("history_limit", 1)):
        if key in data:
            count = data[key]
            if not isinstance(count, int) or isinstance(count, bool) or count < least:
                raise UserError(f"{path}: {key} must be a whole number >= {least}")
            changes[key] = count
    if "networks" in data:
        changes["networks"] = parse_networks(data["networks"], str(path))
    if "accept" in data:
        changes["accept"] = Accept.from_table(data["accept"], str(path))
    unknown = set(data) - {"listen", "allow_paths", "qemu_binary", "ram_dir", "control_group",
                           "networks", "shutdown_grace_s", "link_timeout_s", "accept",
                           "max_outbound", "max_inbound", "history_limit", "bandwidth",
                           "metrics_listen", "health_window_s"}
    if unknown:
        raise UserError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    return replace(config, **changes)
