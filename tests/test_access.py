"""Access to the control socket: the [access] table, a caller's role, which ops need an
operator. The host's user database is faked here; tests/test_access_e2e.py uses real
users against a real agent."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent import identity
from agent.errors import UserError
from agent.service.control import ControlServer
from agent.service.daemon import READ_ONLY_OPS, Agent, LiveTrust
from agent.state.access import Access, Caller, Role, identify
from agent.state.config import AgentConfig

AGENT_UID = 990


class FakeDirectory:
    """Users alice (1001, primary group ops 2001), bob (1002, primary group staff 2000,
    also in watch 2002), carol (1003, staff, nothing else)."""

    users: ClassVar = {"alice": (1001, 2001), "bob": (1002, 2000), "carol": (1003, 2000)}
    groups: ClassVar = {"staff": 2000, "ops": 2001, "watch": 2002, "ferry": 2003}
    supplementary: ClassVar = {"bob": {2002}, "alice": {2003}}

    def uid_of(self, name: str) -> int | None:
        return self.users[name][0] if name in self.users else None

    def gid_of(self, name: str) -> int | None:
        return self.groups.get(name)

    def user_of(self, uid: int) -> tuple[str, int] | None:
        for name, (user_uid, primary) in self.users.items():
            if user_uid == uid:
                return name, primary
        return None

    def groups_of(self, name: str, primary_gid: int) -> frozenset[int]:
        return frozenset({primary_gid} | self.supplementary.get(name, set()))


FAKE = FakeDirectory()


def caller(uid: int, gid: int = 5000) -> Caller:
    return identify(uid, gid, FAKE)


def role(access: Access, uid: int, gid: int = 5000, control_gid: int | None = None) -> Role:
    return access.role(caller(uid, gid), agent_uid=AGENT_UID, control_gid=control_gid)


def parse(table: dict[str, Any]) -> Access:
    return Access.from_table(table, "agent.toml", FAKE)


def test_identify_collects_the_peer_gid_the_primary_and_supplementary_groups() -> None:
    assert caller(1002, gid=7) == Caller(1002, "bob", frozenset({7, 2000, 2002}))
    assert caller(4444, gid=7) == Caller(4444, None, frozenset({7}))
    assert str(caller(1002)) == "bob (uid 1002)" and str(caller(4444)) == "uid 4444"


def test_users_match_by_name_and_by_uid() -> None:
    access = parse({"operators": {"users": ["alice"]}, "readers": {"users": [1002]}})
    assert access.operators.uids == {1001} and access.readers.uids == {1002}
    assert role(access, 1001) is Role.OPERATOR
    assert role(access, 1002) is Role.READER
    assert role(access, 1003) is Role.NONE
    assert role(access, 4444) is Role.NONE            # a uid without an account


def test_groups_match_by_primary_supplementary_and_the_peer_gid() -> None:
    access = parse({"operators": {"groups": ["ops"]}, "readers": {"groups": ["watch", 6000]}})
    assert role(access, 1001) is Role.OPERATOR        # ops is alice's primary group
    assert role(access, 1002) is Role.READER          # bob is in watch (supplementary)
    assert role(access, 1003) is Role.NONE            # carol: staff only
    assert role(access, 1003, gid=6000) is Role.READER   # runs with gid 6000 (setgid)
    assert role(access, 4444, gid=2001) is Role.OPERATOR


def test_operator_beats_reader_and_root_and_the_agent_user_always_operate() -> None:
    access = parse({"operators": {"users": ["bob"]}, "readers": {"groups": ["watch"]}})
    assert role(access, 1002) is Role.OPERATOR
    assert role(access, 0) is Role.OPERATOR
    assert role(access, AGENT_UID) is Role.OPERATOR
    assert role(Access(), 0) is Role.OPERATOR


def test_control_group_operates_only_without_an_access_table() -> None:
    staff = FAKE.groups["staff"]
    assert role(Access(), 1003, control_gid=staff) is Role.OPERATOR
    assert role(Access(), 1001, control_gid=staff) is Role.NONE
    assert role(Access(), 1003) is Role.NONE
    listed = parse({"readers": {"users": ["bob"]}})
    assert role(listed, 1003, control_gid=staff) is Role.NONE
    assert role(listed, 1002, control_gid=staff) is Role.READER


@pytest.mark.parametrize(("table", "message"), [
    ({"admins": {}}, "unknown [access] settings admins"),
    ({"readers": ["bob"]}, "[access] readers must be a table"),
    ({"readers": {"people": ["bob"]}}, "unknown keys people"),
    ({"readers": {"users": "bob"}}, "readers.users must be a list"),
    ({"readers": {"users": ["dave"]}}, "readers.users: no user 'dave' on this host"),
    ({"operators": {"groups": ["wheel"]}}, "operators.groups: no group 'wheel' on this host"),
    ({"operators": {"users": [-1]}}, "-1 is not a user name or id"),
    ({"operators": {"users": [True]}}, "True is not a user name or id"),
])
def test_bad_access_tables_are_refused(table: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as info:
        parse(table)
    assert message in str(info.value) and str(info.value).startswith("agent.toml: ")


def test_every_read_only_op_is_a_control_op_and_changing_ones_are_not(tmp_path: Path) -> None:
    identity.ensure_home(tmp_path)
    ident, _ = identity.load_identity(tmp_path)
    agent = Agent(config=AgentConfig(home=tmp_path), identity=ident,
                  trust=LiveTrust(tmp_path))
    ops = set(agent.control_handlers())
    assert READ_ONLY_OPS <= ops
    assert ops - READ_ONLY_OPS == {"migrate", "cancel", "limit", "disk-move", "import"}


class ReaderServer(ControlServer):
    """The control server with every caller seen as reader bob (the test runs as root,
    who is always an operator)."""

    def role_of(self, uid: int, gid: int) -> tuple[Caller, Role]:
        return Caller(1002, "bob", frozenset({2000})), Role.READER


def request(path: Path, obj: dict[str, Any]) -> dict[str, Any]:
    import socket
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(json.dumps(obj).encode() + b"\n")
        return dict(json.loads(sock.makefile("rb").readline()))


def test_a_reader_gets_read_only_ops_and_forbidden_for_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def reply(request: Any, send: Any, cancel: Any) -> dict[str, Any]:
        return {"ok": True, "op": request["op"]}

    async def scenario() -> list[dict[str, Any]]:
        server = ReaderServer(tmp_path / "control.sock",
                              {"status": reply, "cancel": reply, "unclassified": reply},
                              read_only=frozenset({"status"}))
        await server.start()
        try:
            return [await asyncio.to_thread(request, server.path, {"op": op})
                    for op in ("status", "cancel", "unclassified", "nope")]
        finally:
            await server.close()

    with caplog.at_level(logging.WARNING, logger="agent.service.control"):
        status, cancel, unclassified, unknown = asyncio.run(scenario())
    assert status == {"ok": True, "op": "status"}
    assert cancel == {"ok": False, "code": "forbidden",
                      "error": "user bob (uid 1002) may only read: cancel needs an operator "
                               "([access] in agent.toml)"}
    assert unclassified["code"] == "forbidden"      # not classified: needs an operator
    assert unknown["error"].startswith("bad request: unknown op")
    refusals = [r.getMessage() for r in caplog.records]
    assert refusals == ["control: refused op cancel to uid 1002 (bob): a reader",
                        "control: refused op unclassified to uid 1002 (bob): a reader"]


def test_the_socket_and_home_are_the_control_groups(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    # Root may give it any group: one the test runs without shows the chown happened.
    gid = 54321 if os.geteuid() == 0 else os.getgid()

    async def scenario() -> tuple[os.stat_result, os.stat_result]:
        server = ControlServer(home / "control.sock", {}, group=gid)
        await server.start()
        try:
            return os.stat(server.path), os.stat(home)
        finally:
            await server.close()

    sock, home_st = asyncio.run(scenario())
    assert (sock.st_mode & 0o777, sock.st_gid) == (0o660, gid)
    assert (home_st.st_mode & 0o777, home_st.st_gid) == (0o710, gid)
