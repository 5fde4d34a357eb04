"""The agent's typed configuration: defaults in code, then a TOML file, then flags.

Each key is declared once, as a field of AgentConfig with `setting(kind, doc)`: its name,
type, default, check and one-line meaning. Loading, refusing a bad file and the key table
of docs/config.md all come from those declarations (`python -m agent.state.config
--write` regenerates the table, so it cannot drift). The nested tables `[networks.NAME]`,
`[accept]` and `[access]` are parsed by their own modules.
"""

from __future__ import annotations

import difflib
import grp
import shutil
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from agent import docgen
from agent.errors import UserError
from agent.hostnet.networks import Network, parse_networks
from agent.identity import parse_address
from agent.qemu.hostrules import Accept
from agent.state.access import Access
from agent.units import parse_rate

CONFIG_FILE = "agent.toml"
DEFAULT_PORT = 7370
DEFAULT_QEMU = "qemu-system-x86_64"
# tmpfs: a VM's RAM file must live in memory; /dev/shm is tmpfs on every Debian host.
DEFAULT_RAM_DIR = Path("/dev/shm")


class BadValue(ValueError):
    """A value of the wrong type or out of range; the message is the rule it broke."""


# ---------------------------------------------------------------------------- kinds

@dataclass(frozen=True)
class Kind:
    """How one key's TOML value is checked and turned into the field's value."""

    type: str   # as docs/config.md shows it

    def parse(self, value: Any, where: str) -> Any:
        raise NotImplementedError

    def show(self, value: Any) -> str:
        """A default as the docs show it."""
        return "unset" if value is None else f"`{value}`"


@dataclass(frozen=True)
class Address(Kind):
    type: str = "`\"HOST:PORT\"`"
    any_port: bool = False      # port 0 (any free one) allowed

    def parse(self, value: Any, where: str) -> tuple[str, int]:
        if not isinstance(value, str):
            raise BadValue("must be a \"HOST:PORT\" string")
        try:
            return parse_address(value, any_port=self.any_port)
        except UserError as exc:
            reason = str(exc)
            if reason.startswith("port"):
                raise BadValue(f"must have a port within {0 if self.any_port else 1}..65535"
                               ) from None
            if reason.startswith("not a host"):
                raise BadValue("must have a host name or address before the port") from None
            raise BadValue("must be HOST:PORT or [IPv6]:PORT") from None

    def show(self, value: Any) -> str:
        return "unset (off)" if value is None else f"`\"{value[0]}:{value[1]}\"`"


@dataclass(frozen=True)
class Text(Kind):
    type: str = "string"

    def parse(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise BadValue("must be a non-empty string")
        return value

    def show(self, value: Any) -> str:
        return f"`\"{value}\"`"


@dataclass(frozen=True)
class AbsPath(Kind):
    type: str = "absolute path"

    def parse(self, value: Any, where: str) -> Path:
        if not isinstance(value, str) or not value.startswith("/"):
            raise BadValue("must be an absolute path (a string starting with /)")
        return Path(value)

    def show(self, value: Any) -> str:
        return f"`\"{value}\"`"


@dataclass(frozen=True)
class AbsPaths(Kind):
    type: str = "list of absolute paths"

    def parse(self, value: Any, where: str) -> tuple[Path, ...]:
        if not isinstance(value, list):
            raise BadValue("must be a list of absolute paths")
        return tuple(AbsPath().parse(item, where) for item in value)

    def show(self, value: Any) -> str:
        return "`[]`" if not value else f"`{[str(p) for p in value]}`"


@dataclass(frozen=True)
class Group(Kind):
    type: str = "group name or gid"

    def parse(self, value: Any, where: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if not isinstance(value, str) or not value:
            raise BadValue("must be a group name or a gid")
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise BadValue("must name a group of this host") from None


@dataclass(frozen=True)
class Seconds(Kind):
    positive: bool = False     # 0 allowed or not
    type: str = "seconds"

    def parse(self, value: Any, where: str) -> float:
        if (not isinstance(value, int | float) or isinstance(value, bool) or value < 0
                or (self.positive and value == 0)):
            raise BadValue(f"must be a number of seconds {'> 0' if self.positive else '>= 0'}")
        return float(value)

    def show(self, value: Any) -> str:
        return f"`{value:g}`"


@dataclass(frozen=True)
class Count(Kind):
    least: int = 0
    type: str = "whole number"

    def parse(self, value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < self.least:
            raise BadValue(f"must be a whole number >= {self.least}")
        return value


@dataclass(frozen=True)
class Rate(Kind):
    type: str = "rate (`\"100M\"`, `\"1G\"`, `\"800Mbit\"`) or bytes/s"

    def parse(self, value: Any, where: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if not isinstance(value, str):
            raise BadValue("must be a rate like \"100M\" or a number of bytes/s > 0")
        try:
            return parse_rate(value)
        except UserError:
            raise BadValue("must be a rate like \"100M\", \"1G\" or \"800Mbit\"") from None

    def show(self, value: Any) -> str:
        return "unset (no cap)" if value is None else f"`{value}`"


@dataclass(frozen=True)
class Table(Kind):
    """A nested table with a parser of its own, which names the file in its errors."""

    type: str = "table"
    parser: Callable[[Any, str], Any] = lambda value, where: value
    shown: str = "empty"

    def parse(self, value: Any, where: str) -> Any:
        return self.parser(value, where)

    def show(self, value: Any) -> str:
        return self.shown


@dataclass(frozen=True)
class Setting:
    """One key's declaration (the field's name and default are the key's)."""

    kind: Kind
    doc: str


def setting(kind: Kind, doc: str, default: Any = MISSING,
            factory: Callable[[], Any] | None = None) -> Any:
    """A field of AgentConfig that agent.toml may set."""
    metadata = {"setting": Setting(kind, doc)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------- the config

@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything an agent needs to know about its host."""

    home: Path
    listen: tuple[str, int] = setting(
        Address(), "where peer agents connect (`--listen`)", ("127.0.0.1", DEFAULT_PORT))
    allow_paths: tuple[Path, ...] = setting(
        AbsPaths(), "directories besides the home that VM files may be read from or "
        "created in (`--allow-path`, added to these)", ())
    qemu_binary: str = setting(Text(), "QEMU binary, a name on PATH or a path (`--qemu`)",
                               DEFAULT_QEMU)
    ram_dir: Path = setting(AbsPath(), "where incoming VMs' RAM files go; must be tmpfs "
                            "(mounted with `huge=`: 2 MiB pages) (`--ram-dir`)", DEFAULT_RAM_DIR)
    control_group: int | None = setting(
        Group(), "group of the control socket (mode 0660) and of the home (0710, so its "
        "members reach the socket); without `[access]` its members are operators", None)
    networks: dict[str, Network] = setting(
        Table(parser=parse_networks, shown="none"), "the networks this host offers VMs' NICs: "
        "`[networks.NAME]` tables (below)", factory=dict)
    shutdown_grace_s: float = setting(
        Seconds(), "on SIGTERM, running jobs may end within this; then they roll back", 30.0)
    link_timeout_s: float = setting(
        Seconds(positive=True), "a link on which nothing moves this long is lost", 60.0)
    resume_window_s: float = setting(
        Seconds(positive=True), "a destination that lost its link in pre-copy waits this "
        "long for the source to reconnect and resume before it rolls back (the source's "
        "reconnect attempts take about 8 s)", 15.0)
    accept: Accept = setting(
        Table(parser=Accept.from_table, shown="the built-in rules"),
        "what a destination accepts of a source's QEMU arguments beyond its built-in "
        "rules: `[accept]` (below)",
        factory=Accept)
    access: Access = setting(
        Table(parser=Access.from_table,
              shown="root and the agent's user only (and `control_group`)"),
        "who may use the control socket, as operator or reader: `[access]` (below)",
        factory=Access)
    max_outbound: int = setting(
        Count(least=1), "outbound jobs running at once; more wait in a FIFO queue", 2)
    max_inbound: int = setting(
        Count(least=0), "incoming migrations and imports at once; more are refused (busy)", 2)
    history_limit: int = setting(
        Count(least=1), "finished jobs' reports kept in HOME/history.jsonl", 500)
    bandwidth: int | None = setting(
        Rate(), "bytes/s on the wire for all outbound jobs together (`ferry limit` "
        "changes it live); none when unset", None)
    metrics_listen: tuple[str, int] | None = setting(
        Address(any_port=True), "address of the Prometheus endpoint (docs/metrics.md; "
        "port 0: any free one, shown by `ferry status`); off when unset", None)
    health_window_s: float = setting(
        Seconds(), "after a resume, how long the guest's pace is watched", 3.0)
    source: Path | None = None     # the file these settings came from, if any

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
                            f"qemu-system-x86 or set qemu_binary in "
                            f"{self.source or self.home / CONFIG_FILE}")
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


def _settings() -> dict[str, tuple[Field[Any], Setting]]:
    return {f.name: (f, f.metadata["setting"]) for f in fields(AgentConfig)
            if "setting" in f.metadata}


SETTINGS = _settings()


def default_of(f: Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def load_config(home: Path, path: Path | None = None) -> AgentConfig:
    """Defaults, then the config file: `path` if given (it must exist), else
    HOME/agent.toml if it exists. A key it does not know, or a value of the wrong type or
    out of range, is refused naming the file, the key and the reason."""
    file = path if path is not None else home / CONFIG_FILE
    if not file.exists():
        if path is not None:
            raise UserError(f"config file {path} does not exist")
        return AgentConfig(home=home)
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read {file}: {exc}") from exc
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        hints = [f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(
            key, SETTINGS, n=1)) else key for key in unknown]
        raise UserError(f"{file}: unknown setting{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(hints)}; the settings are in docs/config.md")
    changes: dict[str, Any] = {}
    for key, value in data.items():
        _, declared = SETTINGS[key]
        try:
            changes[key] = declared.kind.parse(value, str(file))
        except BadValue as exc:
            raise UserError(f"{file}: {key} {exc}, not {_toml(value)}") from None
    return AgentConfig(home=home, source=file, **changes)


def _toml(value: Any) -> str:
    """A bad value as the file had it (shortened)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------- docs

DOC_FILE = Path("docs/config.md")
DOC_BEGIN = "<!-- settings table: generated by python -m agent.state.config -->"
DOC_END = "<!-- end of settings table -->"


def markdown() -> str:
    """Every key of agent.toml: type, default, meaning."""
    lines = [DOC_BEGIN, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, (f, declared) in SETTINGS.items():
        kind = declared.kind
        lines.append(f"| `{name}` | {kind.type} | "
                     f"{kind.show(default_of(f))} | {declared.doc} |")
    lines += ["", DOC_END]
    return "\n".join(lines)


def with_table(doc: str) -> str:
    """doc with its generated section replaced by the current table."""
    return docgen.splice(doc, DOC_BEGIN, DOC_END, markdown())


def main(argv: Iterable[str] | None = None) -> int:
    return docgen.main(argv, description="Print or rewrite the agent.toml table.",
                       default_doc=DOC_FILE, render=markdown, rewrite=with_table)


if __name__ == "__main__":
    sys.exit(main())
