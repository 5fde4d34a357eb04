"""Identity keys, trusted peers files, and the `ferry id / trust / untrust / peers` commands."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent import home, identity
from agent.cli import main
from agent.errors import LocalError, UserError
from agent.identity import Identity, Peer, TrustedPeers
from agent.wire.keys import decode_key, encode_key, fingerprint

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


# ---- home directory ----


def test_default_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FERRY_HOME", str(tmp_path / "h"))
    assert home.default_home() == tmp_path / "h"
    monkeypatch.delenv("FERRY_HOME")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert home.default_home() == home.ROOT_HOME
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert home.default_home() == tmp_path / "state" / "ferry"
    assert home.resolve_home("/x") == Path("/x")


# ---- identity key ----


def test_identity_created_once_with_mode_0600(tmp_path):
    home = tmp_path / "home"
    first, created = identity.load_identity(home)
    assert created
    path = home / identity.IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    again, created = identity.load_identity(home)
    assert not created and again == first
    assert again.private_bytes() == first.private_bytes()
    assert [p.name for p in home.iterdir()] == [identity.IDENTITY_FILE]  # no temp files left


def test_identity_refused_when_readable_by_others(tmp_path):
    identity.load_identity(tmp_path)
    (tmp_path / identity.IDENTITY_FILE).chmod(0o640)
    with pytest.raises(LocalError, match="chmod 600"):
        identity.load_identity(tmp_path)


def test_identity_garbage_file(tmp_path):
    path = tmp_path / identity.IDENTITY_FILE
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(LocalError, match="not a PEM"):
        identity.load_identity(tmp_path)


def test_identity_not_created_when_asked_not_to(tmp_path):
    with pytest.raises(LocalError):
        identity.load_identity(tmp_path, create=False)


def test_identity_dataclass():
    me = Identity.generate()
    assert Identity.from_private_bytes(me.private_bytes()).public_key == me.public_key
    assert me.public_key_b64 == encode_key(me.public_key)
    assert me.fingerprint.startswith("SHA256:")
    assert "private_key" not in repr(me)
    with pytest.raises(ValueError):
        Identity(me.private_key, bytes(32))


# ---- keys ----


def test_key_text_forms():
    text = encode_key(KEY_A)
    assert len(text) == 44 and decode_key(text) == KEY_A
    assert decode_key(f"  {text}\n") == KEY_A
    for bad in ("", "abc", encode_key(KEY_A)[:-4], "!" * 44, "AAAA"):
        with pytest.raises(UserError):
            decode_key(bad)
    assert fingerprint(KEY_A) == fingerprint(KEY_A) != fingerprint(KEY_B)
    assert len(fingerprint(KEY_A)) == len("SHA256:") + 43


# ---- peers ----


@pytest.mark.parametrize("address, expected", [
    ("hostb:7700", ("hostb", 7700)),
    ("10.0.0.2:1", ("10.0.0.2", 1)),
    ("[::1]:65535", ("::1", 65535)),
    ("host-b.example.org:80", ("host-b.example.org", 80)),
])
def test_parse_address(address, expected):
    assert identity.parse_address(address) == expected


@pytest.mark.parametrize("address", ["hostb", "hostb:", ":80", "hostb:0", "hostb:70000",
                                     "::1:80", "host b:80", "hostb:80x", '"x":1'])
def test_parse_address_refuses(address):
    with pytest.raises(UserError):
        identity.parse_address(address)


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 64, 'q"uote', "ü"])
def test_peer_names_are_checked(name):
    with pytest.raises(UserError):
        Peer(name, KEY_A)


def test_trusted_peers_roundtrip_through_toml():
    peers = TrustedPeers((Peer("hosta", KEY_A, "10.0.0.1:7700"), Peer("b.example", KEY_B)))
    text = peers.to_toml()
    assert TrustedPeers.from_toml(text) == peers
    assert peers.by_key(KEY_B).name == "b.example"
    assert peers.by_key(bytes(32)) is None
    assert peers.by_name("hosta").host_port == ("10.0.0.1", 7700)
    with pytest.raises(UserError, match="no address"):
        _ = peers.by_name("b.example").host_port


def test_toml_strings_are_escaped():
    assert identity._toml_string('a"b\\c\n') == '"a\\"b\\\\c\\u000a"'
    import tomllib
    assert tomllib.loads("x = " + identity._toml_string('a"b\\c\n\x7f'))["x"] == 'a"b\\c\n\x7f'


def test_duplicates_are_refused():
    with pytest.raises(UserError):
        TrustedPeers((Peer("a", KEY_A), Peer("a", KEY_B)))
    with pytest.raises(UserError):
        TrustedPeers((Peer("a", KEY_A), Peer("b", KEY_A)))
    peers = TrustedPeers((Peer("a", KEY_A),))
    with pytest.raises(UserError, match="already trusted as peer a"):
        peers.with_peer(Peer("b", KEY_A))
    updated = peers.with_peer(Peer("a", KEY_B, "x:1"))
    assert updated.peers == (Peer("a", KEY_B, "x:1"),)
    assert updated.without("a").peers == ()


@pytest.mark.parametrize("text", [
    "peer = 1",
    "[[peer]]\nname = 'a'",
    "[[peer]]\nname = 'a'\npublic_key = 'xyz'",
    f"[[peer]]\nname = 'a'\npublic_key = '{encode_key(KEY_A)}'\naddress = 5",
    f"[[peer]]\nname = 'a'\npublic_key = '{encode_key(KEY_A)}'\nadress = 'x:1'",
    "other = 1",
    "[[peer\n",
])
def test_bad_peers_files(text):
    with pytest.raises(UserError):
        TrustedPeers.from_toml(text)


def test_trust_peer_keeps_the_address_when_not_given(tmp_path):
    peer, added = identity.trust_peer(tmp_path, "a", KEY_A, "h:1")
    assert added and peer.address == "h:1"
    peer, added = identity.trust_peer(tmp_path, "a", KEY_B)
    assert not added and peer == Peer("a", KEY_B, "h:1")
    assert identity.load_peers(tmp_path).peers == (peer,)
    assert identity.untrust_peer(tmp_path, "a")
    assert not identity.untrust_peer(tmp_path, "a")
    assert identity.load_peers(tmp_path).peers == ()


def test_missing_peers_file_is_an_empty_list(tmp_path):
    assert len(identity.load_peers(tmp_path / "nowhere")) == 0


# ---- the commands ----


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_id_prints_one_line_and_is_stable(tmp_path, capsys):
    code, out, err = run(capsys, "id", "--home", str(tmp_path))
    assert code == 0 and "created a new identity" in err
    key = out.strip()
    assert out.count("\n") == 1 and len(decode_key(key)) == 32
    code, out, err = run(capsys, "id", "--home", str(tmp_path))
    assert out.strip() == key and err == ""
    code, out, _ = run(capsys, "id", "--home", str(tmp_path), "--fingerprint")
    assert out.strip() == fingerprint(decode_key(key))


def test_trust_and_peers(tmp_path, capsys):
    key = encode_key(KEY_A)
    code, out, _ = run(capsys, "trust", "--home", str(tmp_path), "hosta", key,
                       "--address", "10.0.0.1:7700")
    assert code == 0 and out.startswith("trusted hosta SHA256:")
    code, out, _ = run(capsys, "trust", "--home", str(tmp_path), "hosta", key,
                       "--address", "10.0.0.9:7700")
    assert out.startswith("updated hosta")
    code, out, _ = run(capsys, "peers", "--home", str(tmp_path))
    assert code == 0
    assert out.splitlines()[1].split() == ["hosta", "10.0.0.9:7700", key]
    code, out, _ = run(capsys, "peers", "--home", str(tmp_path), "--json")
    assert json.loads(out) == [{"name": "hosta", "address": "10.0.0.9:7700", "public_key": key,
                                "fingerprint": fingerprint(KEY_A)}]
    code, out, _ = run(capsys, "untrust", "--home", str(tmp_path), "hosta")
    assert code == 0
    code, out, err = run(capsys, "peers", "--home", str(tmp_path))
    assert out == "" and "no trusted peers" in err


@pytest.mark.parametrize("argv", [
    ["trust", "hosta", "not-a-key", "--address", "h:1"],
    ["trust", "hosta", encode_key(KEY_A), "--address", "no-port"],
    ["trust", "bad name", encode_key(KEY_A)],
    ["untrust", "nobody"],
])
def test_command_errors_are_one_line(tmp_path, capsys, argv):
    code, _, err = run(capsys, argv[0], "--home", str(tmp_path), *argv[1:])
    assert code == 1 and err.startswith("ferry: error:") and err.count("\n") == 1
    assert not (tmp_path / identity.PEERS_FILE).exists()
