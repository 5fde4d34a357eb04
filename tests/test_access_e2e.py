"""[access] against a real agent and real users: throwaway system users and groups, each
request made by a child process that has become that user before it connects."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_ops_e2e import (  # noqa: F401 (make_agents is a fixture)
    SLOW,
    ferry_json,
    job_state,
    make_agents,
    small_guest,
    wait_for,
)


@dataclass(frozen=True)
class Users:
    control: str      # the control socket's group; every user below is in it
    operator: str     # primary group `ops`, which [access] makes operators
    reader: str       # supplementary group `watch`, which [access] makes readers
    stranger: str     # in no [access] list
    ops: str
    watch: str


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"


@pytest.fixture
def users() -> Iterator[Users]:
    """Three system users and three groups with unique names, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create throwaway users and groups (useradd, groupadd)")
    tag = os.urandom(3).hex()
    made = Users(control=f"fy{tag}c", operator=f"fy{tag}op", reader=f"fy{tag}rd",
                 stranger=f"fy{tag}no", ops=f"fy{tag}o", watch=f"fy{tag}w")
    groups: list[str] = []
    accounts: list[str] = []
    try:
        for group in (made.control, made.ops, made.watch):
            _run("groupadd", "--system", group)
            groups.append(group)
        for user, primary, extra in ((made.operator, made.ops, made.control),
                                     (made.reader, made.control, made.watch),
                                     (made.stranger, made.control, made.control)):
            _run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 "--gid", primary, "--groups", extra, user)
            accounts.append(user)
        yield made
    finally:
        for user in accounts:
            subprocess.run(["userdel", user], capture_output=True, check=False)
        for group in groups:
            subprocess.run(["groupdel", group], capture_output=True, check=False)


def as_user(user: str, path: Path, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Every reply line to `request`, sent by a child that runs as `user` (its primary
    and supplementary groups too)."""
    entry = pwd.getpwnam(user)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:       # the child: become the user, ask, hand the replies back, exit
        code = 0
        try:
            os.close(read_end)
            os.setgroups(os.getgrouplist(user, entry.pw_gid))
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(60)
                sock.connect(str(path))
                sock.sendall(json.dumps(request).encode() + b"\n")
                answer = sock.makefile("rb").read()
        except BaseException as exc:   # the parent reports it
            answer, code = json.dumps({"child_error": repr(exc)}).encode(), 1
        with os.fdopen(write_end, "wb") as out:
            out.write(answer)
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as replies:
        data = replies.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    return [json.loads(line) for line in data.splitlines()]


def one(user: str, path: Path, request: dict[str, Any]) -> dict[str, Any]:
    replies = as_user(user, path, request)
    assert len(replies) == 1, replies
    return replies[0]


@pytest.mark.qemu
def test_strangers_readers_and_operators_on_a_running_job(users: Users, make_agents,  # noqa: F811
                                                          start_guest) -> None:
    agents = make_agents(a_toml=f'control_group = "{users.control}"\n[access]\n'
                                f'operators = {{ groups = ["{users.ops}"] }}\n'
                                f'readers = {{ groups = ["{users.watch}"] }}\n')
    os.chmod(agents.root, 0o711)   # the test's own temporary root: let the users through
    home = agents.a.home
    sock = home / "control.sock"
    uid = {name: pwd.getpwnam(name).pw_uid for name in (users.reader, users.stranger)}

    refused = one(users.stranger, sock, {"op": "status"})
    assert refused == {"ok": False, "code": "forbidden",
                       "error": f"user {users.stranger} (uid {uid[users.stranger]}) may not "
                                f"use this agent ([access] in agent.toml)"}

    guest = small_guest(start_guest, "acl")
    job_id = ferry_json(home, "migrate", "--qmp", str(guest.qmp_path), "--to", "hostb",
                        "--bandwidth", SLOW, "--detach")["job"]
    wait_for(lambda: (job_state(home, job_id) or {}).get("state") == "running",
             "the detached job to run")

    # A reader lists and watches ...
    status = one(users.reader, sock, {"op": "status"})
    assert status["ok"] and [j["job"] for j in status["jobs"]] == [job_id]
    assert [j["job"] for j in one(users.reader, sock, {"op": "jobs"})["jobs"]] == [job_id]
    assert one(users.reader, sock, {"op": "job", "id": job_id})["job"]["state"] == "running"
    # ... but may not change anything.
    for request in ({"op": "cancel", "id": job_id},
                    {"op": "migrate", "vm": "acl", "to": "hostb"}):
        reply = one(users.reader, sock, request)
        assert reply == {"ok": False, "code": "forbidden",
                         "error": f"user {users.reader} (uid {uid[users.reader]}) may only "
                                  f"read: {request['op']} needs an operator ([access] in "
                                  f"agent.toml)"}
    assert (job_state(home, job_id) or {}).get("state") == "running"

    # An operator (by its primary group) cancels; the reader follows the job to its end.
    cancelled = one(users.operator, sock, {"op": "cancel", "id": job_id})
    assert cancelled["ok"] and cancelled["job"] == job_id
    followed = as_user(users.reader, sock, {"op": "job", "id": job_id, "follow": True})
    assert followed[-1]["event"] == "result" and followed[-1]["status"] == "cancelled"

    log = agents.a.log()
    # journald-friendly: one line per event naming the job and its VM, no traceback for
    # an expected end (a cancel).
    assert f"migration {job_id} of {guest.qmp_path} to hostb: started" in log
    label = f"migration {job_id} of acl to hostb"     # named once QEMU described it
    for event in ("rolling back (cancelled by the user)", "cancelled"):
        assert f"{label}: {event}" in log, log
    assert "Traceback" not in log
    assert (f"control: refused uid {uid[users.stranger]} ({users.stranger}): no role in "
            f"[access]") in log
    for op in ("cancel", "migrate"):
        assert (f"control: refused op {op} to uid {uid[users.reader]} ({users.reader}): "
                f"a reader") in log
