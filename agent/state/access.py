"""Who may use the control socket: the `[access]` table of agent.toml, and a caller's role.

Two roles: an operator may use every op, a reader only the read-only ones (which ops those
are: `agent/service/daemon.py`, READ_ONLY_OPS). Root and the agent's own user are always
operators. Without an `[access]` table the members of `control_group` are operators (what
they were before `[access]` existed); with one, only the users and groups it lists have a
role. Users and groups are named or given by number; names are resolved when the config
is loaded, so a typo is refused at start instead of never matching.
"""

from __future__ import annotations

import enum
import grp
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.errors import UserError

ROLES = ("operators", "readers")
MEMBER_KINDS = ("users", "groups")


class Role(enum.IntEnum):
    """What a caller may do; a higher role may do everything a lower one may."""

    NONE = 0
    READER = 1
    OPERATOR = 2


class Directory(Protocol):
    """The host's users and groups (pwd, grp); tests give a fake one."""

    def uid_of(self, name: str) -> int | None: ...
    def gid_of(self, name: str) -> int | None: ...
    def user_of(self, uid: int) -> tuple[str, int] | None:
        """(name, primary gid) of a uid, None when the uid has no account."""
    def groups_of(self, name: str, primary_gid: int) -> frozenset[int]:
        """Every group the user is in: the primary one and the supplementary ones."""


class SystemDirectory:
    """The real user and group database, through NSS."""

    def uid_of(self, name: str) -> int | None:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            return None

    def gid_of(self, name: str) -> int | None:
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            return None

    def user_of(self, uid: int) -> tuple[str, int] | None:
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return None
        return entry.pw_name, entry.pw_gid

    def groups_of(self, name: str, primary_gid: int) -> frozenset[int]:
        return frozenset(os.getgrouplist(name, primary_gid))


SYSTEM = SystemDirectory()


@dataclass(frozen=True, slots=True)
class Caller:
    """The process at the other end of the control socket, as SO_PEERCRED and the user
    database tell: its uid, its user's name (None without an account) and its groups."""

    uid: int
    name: str | None
    gids: frozenset[int]

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid})" if self.name else f"uid {self.uid}"


def identify(uid: int, gid: int, directory: Directory = SYSTEM) -> Caller:
    """The caller with this peer uid and gid: the gid it runs with, and every group its
    user is a member of."""
    user = directory.user_of(uid)
    if user is None:
        return Caller(uid, None, frozenset({gid}))
    name, primary = user
    return Caller(uid, name, frozenset({gid}) | directory.groups_of(name, primary))


@dataclass(frozen=True, slots=True)
class Members:
    """Users and groups (resolved to ids) holding one role."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def include(self, caller: Caller) -> bool:
        return caller.uid in self.uids or bool(self.gids & caller.gids)


@dataclass(frozen=True, slots=True)
class Access:
    """The `[access]` table: who is an operator, who a reader."""

    operators: Members = field(default_factory=Members)
    readers: Members = field(default_factory=Members)
    configured: bool = False     # an [access] table was given: control_group grants nothing

    @classmethod
    def from_table(cls, table: Any, where: str, directory: Directory = SYSTEM) -> Access:
        """Parse `[access]`, e.g. operators = {users = ["alice"], groups = ["ferry-ops"]}."""
        if not isinstance(table, dict):
            raise UserError(f"{where}: [access] must be a table")
        unknown = sorted(set(table) - set(ROLES))
        if unknown:
            raise UserError(f"{where}: unknown [access] settings {', '.join(unknown)} "
                            f"(known: {', '.join(ROLES)})")
        roles = {role: _members(table.get(role, {}), f"{where}: [access] {role}", directory)
                 for role in ROLES}
        return cls(operators=roles["operators"], readers=roles["readers"], configured=True)

    def role(self, caller: Caller, *, agent_uid: int, control_gid: int | None) -> Role:
        """The caller's role: root and agent_uid operate; then the lists; without [access],
        control_gid's members operate."""
        if caller.uid in (0, agent_uid) or self.operators.include(caller):
            return Role.OPERATOR
        if self.readers.include(caller):
            return Role.READER
        if not self.configured and control_gid is not None and control_gid in caller.gids:
            return Role.OPERATOR
        return Role.NONE


def _members(table: Any, where: str, directory: Directory) -> Members:
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table like {{users = [...], groups = [...]}}")
    unknown = sorted(set(table) - set(MEMBER_KINDS))
    if unknown:
        raise UserError(f"{where}: unknown keys {', '.join(unknown)} (known: users, groups)")
    uids = _ids(table.get("users", []), f"{where}.users", "user", directory.uid_of)
    gids = _ids(table.get("groups", []), f"{where}.groups", "group", directory.gid_of)
    return Members(uids, gids)


def _ids(names: Any, where: str, what: str,
         lookup: Callable[[str], int | None]) -> frozenset[int]:
    """Names or numbers to ids; a name this host does not know is refused."""
    if not isinstance(names, list):
        raise UserError(f"{where} must be a list of {what} names or ids, not {names!r}")
    ids = set()
    for name in names:
        if isinstance(name, int) and not isinstance(name, bool) and name >= 0:
            ids.add(name)
        elif isinstance(name, str) and name:
            found = lookup(name)
            if found is None:
                raise UserError(f"{where}: no {what} {name!r} on this host")
            ids.add(found)
        else:
            raise UserError(f"{where}: {name!r} is not a {what} name or id")
    return frozenset(ids)
