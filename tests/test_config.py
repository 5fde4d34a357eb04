"""agent.toml: one declaration per key drives loading, refusals and docs/config.md."""

from __future__ import annotations

import grp
import os
from pathlib import Path

import pytest

from agent.errors import UserError
from agent.hostnet.networks import Network, NetworkKind
from agent.state.config import SETTINGS, AgentConfig, load_config, markdown, with_table

DOC = Path(__file__).parent.parent / "docs" / "config.md"
# Every key agent.toml had before the table: none may go or change its name.
KEYS = ("listen", "allow_paths", "qemu_binary", "ram_dir", "control_group", "networks",
        "shutdown_grace_s", "link_timeout_s", "resume_window_s", "accept", "max_outbound",
        "max_inbound", "history_limit", "bandwidth", "metrics_listen", "health_window_s", "access")


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "agent.toml").write_text(text)
    return tmp_path / "agent.toml"


def test_every_key_is_declared_with_a_doc() -> None:
    assert set(SETTINGS) == set(KEYS)
    for name, (_, declared) in SETTINGS.items():
        assert declared.doc and declared.kind.type, name


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(tmp_path)
    assert config == AgentConfig(home=tmp_path)
    assert (config.listen, config.max_outbound, config.bandwidth, config.metrics_listen,
            config.health_window_s, config.source) == (("127.0.0.1", 7370), 2, None, None,
                                                       3.0, None)


def test_every_key_read_and_typed(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    path = write(tmp_path, f"""
listen = "0.0.0.0:7400"
allow_paths = ["/srv/a", "/srv/b"]
qemu_binary = "/usr/bin/qemu-system-x86_64"
ram_dir = "/dev/shm/x"
control_group = "{group}"
shutdown_grace_s = 5
link_timeout_s = 2.5
max_outbound = 1
max_inbound = 0
history_limit = 9
bandwidth = "10M"
metrics_listen = "127.0.0.1:9370"
health_window_s = 1
[networks.lan]
bridge = "br0"
[accept]
drivers = ["nbd"]
[access]
readers = {{ users = [4242] }}
""")
    config = load_config(tmp_path)
    assert config.source == path
    assert config.listen == ("0.0.0.0", 7400)
    assert config.allow_paths == (Path("/srv/a"), Path("/srv/b"))
    assert config.qemu_binary == "/usr/bin/qemu-system-x86_64"
    assert config.ram_dir == Path("/dev/shm/x")
    assert config.control_group == os.getgid()
    assert (config.shutdown_grace_s, config.link_timeout_s) == (5.0, 2.5)
    assert isinstance(config.shutdown_grace_s, float)
    assert (config.max_outbound, config.max_inbound, config.history_limit) == (1, 0, 9)
    assert config.bandwidth == 10 << 20
    assert config.metrics_listen == ("127.0.0.1", 9370)
    assert config.health_window_s == 1.0 and isinstance(config.health_window_s, float)
    assert config.networks == {"lan": Network("lan", NetworkKind.BRIDGE, "br0")}
    assert config.accept.drivers == {"nbd"}
    assert config.access.configured and config.access.readers.uids == {4242}
    assert load_config(tmp_path, path) == config      # the same file named by --config


@pytest.mark.parametrize(("line", "message"), [
    ('max_outbound = "two"', "max_outbound must be a whole number >= 1, not 'two'"),
    ("max_outbound = 0", "max_outbound must be a whole number >= 1, not 0"),
    ("max_outbound = true", "max_outbound must be a whole number >= 1, not true"),
    ("max_inbound = -1", "max_inbound must be a whole number >= 0, not -1"),
    ("history_limit = 1.5", "history_limit must be a whole number >= 1, not 1.5"),
    ("shutdown_grace_s = -1", "shutdown_grace_s must be a number of seconds >= 0, not -1"),
    ('health_window_s = "3s"', "health_window_s must be a number of seconds >= 0, not '3s'"),
    ("link_timeout_s = 0", "link_timeout_s must be a number of seconds > 0, not 0"),
    ("listen = 7370", 'listen must be a "HOST:PORT" string, not 7370'),
    ('listen = "nowhere"', "listen must be HOST:PORT or [IPv6]:PORT"),
    ('listen = "127.0.0.1:0"', "listen must have a port within 1..65535"),
    ('metrics_listen = "127.0.0.1:99999"', "metrics_listen must have a port within 0..65535"),
    ('allow_paths = "/srv"', "allow_paths must be a list of absolute paths, not '/srv'"),
    ('allow_paths = ["srv"]', "allow_paths must be an absolute path"),
    ('ram_dir = "shm"', "ram_dir must be an absolute path"),
    ('qemu_binary = ""', "qemu_binary must be a non-empty string, not ''"),
    ('control_group = "no-such-group-fy"', "control_group must name a group of this host"),
    ('bandwidth = "fast"', "bandwidth must be a rate like \"100M\""),
    ("bandwidth = 0", "bandwidth must be a rate like \"100M\" or a number of bytes/s > 0"),
    ("max_outbond = 1", "unknown setting max_outbond (did you mean max_outbound?)"),
    ("[networks.lan]\nmtu = 9000", "[networks.lan]: unknown keys mtu"),
    ("[accept]\nports = [1]", "unknown [accept] settings ports"),
    ("[access]\nwriters = {}", "unknown [access] settings writers"),
    ("[access]\nreaders = { users = ['no-such-user-fy'] }",
     "[access] readers.users: no user 'no-such-user-fy' on this host"),
    ("max_outbound = ", "cannot read"),
])
def test_a_bad_key_or_value_is_refused_naming_file_key_and_reason(
        tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, line + "\n")
    with pytest.raises(UserError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith(f"{path}: ") or message == "cannot read"
    assert message in str(info.value)


def test_an_explicit_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file .*missing.toml does not exist"):
        load_config(tmp_path, tmp_path / "missing.toml")


def test_an_explicit_file_is_read_instead_of_the_home_one(tmp_path: Path) -> None:
    write(tmp_path, "max_outbound = 3\n")
    other = tmp_path / "other.toml"
    other.write_text("max_inbound = 5\n")
    config = load_config(tmp_path, other)
    assert (config.max_outbound, config.max_inbound, config.source) == (2, 5, other)


def test_flags_override_only_when_given(tmp_path: Path) -> None:
    write(tmp_path, 'listen = "0.0.0.0:7400"\nqemu_binary = "qemu-x"\n')
    config = load_config(tmp_path).with_overrides(listen=("127.0.0.1", 7500),
                                                  qemu_binary=None, ram_dir=None)
    assert (config.listen, config.qemu_binary, config.ram_dir) == (
        ("127.0.0.1", 7500), "qemu-x", Path("/dev/shm"))


def test_the_config_document_shows_the_table_as_declared() -> None:
    doc = DOC.read_text()
    assert markdown() in doc
    assert with_table(doc) == doc
    for name in KEYS:
        assert f"| `{name}` |" in doc
