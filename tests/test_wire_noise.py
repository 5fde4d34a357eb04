"""The Noise XX handshake against published test vectors and against the noiseprotocol package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from agent.errors import HandshakeError, LocalError
from agent.wire import noise
from agent.wire.noise import CipherState, HandshakeState, public_bytes

VECTORS = json.loads((Path(__file__).parent / "data" / "noise_vectors.json").read_text())["vectors"]


def _key(hex_text: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_text))


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _pair(prologue: bytes = b"p", *, resp_prologue: bytes | None = None):
    init = HandshakeState(initiator=True, static_key=X25519PrivateKey.generate(), prologue=prologue)
    resp = HandshakeState(initiator=False, static_key=X25519PrivateKey.generate(),
                          prologue=prologue if resp_prologue is None else resp_prologue)
    return init, resp


@pytest.mark.parametrize("vector", VECTORS, ids=[v["source"].split("/")[4] for v in VECTORS])
def test_published_vector(vector):
    assert vector["protocol_name"] == noise.PROTOCOL_NAME.decode()
    init = HandshakeState(initiator=True, static_key=_key(vector["init_static"]),
                          prologue=bytes.fromhex(vector["init_prologue"]),
                          ephemeral_key=_key(vector["init_ephemeral"]))
    resp = HandshakeState(initiator=False, static_key=_key(vector["resp_static"]),
                          prologue=bytes.fromhex(vector["resp_prologue"]),
                          ephemeral_key=_key(vector["resp_ephemeral"]))
    ciphers = None
    for index, message in enumerate(vector["messages"]):
        payload = bytes.fromhex(message["payload"])
        expected = bytes.fromhex(message["ciphertext"])
        initiator_sends = index % 2 == 0
        if index < 3:
            writer, reader = (init, resp) if initiator_sends else (resp, init)
            assert writer.write_message(payload) == expected
            assert reader.read_message(expected) == payload
            continue
        if ciphers is None:
            assert init.finished and resp.finished
            if "handshake_hash" in vector:
                assert init.handshake_hash.hex() == vector["handshake_hash"]
            assert resp.handshake_hash == init.handshake_hash
            assert init.remote_static == public_bytes(_key(vector["resp_static"]))
            assert resp.remote_static == public_bytes(_key(vector["init_static"]))
            ciphers = {}
            for name, state in (("init", init), ("resp", resp)):
                send, receive = CipherState(), CipherState()
                send_key, receive_key = state.split()
                send.initialize_key(send_key)
                receive.initialize_key(receive_key)
                ciphers[name] = (send, receive)
        sender, receiver = ("init", "resp") if initiator_sends else ("resp", "init")
        assert ciphers[sender][0].encrypt_with_ad(b"", payload) == expected
        assert ciphers[receiver][1].decrypt_with_ad(b"", expected) == payload


def test_vectors_present():
    # One from cacophony (with the handshake hash), one from snow.
    assert len(VECTORS) >= 2
    assert any("handshake_hash" in v for v in VECTORS)


def test_handshake_roundtrip_and_split_keys_match():
    init, resp = _pair()
    resp.read_message(init.write_message(b"hello"))
    assert init.read_message(resp.write_message(b"")) == b""
    assert resp.read_message(init.write_message(b"\x01")) == b"\x01"
    assert init.finished and resp.finished
    assert init.split() == tuple(reversed(resp.split()))
    assert init.handshake_hash == resp.handshake_hash


def test_prologue_mismatch_fails_authentication():
    init, resp = _pair(b"ferry v1", resp_prologue=b"ferry v2")
    resp.read_message(init.write_message())
    with pytest.raises(HandshakeError):
        init.read_message(resp.write_message())


def test_every_tampered_byte_is_refused():
    # Message 2 is 96 bytes (e, encrypted s, empty payload), message 3 is 65 (s, 1-byte payload).
    for position in range(96):
        init, resp = _pair()
        resp.read_message(init.write_message())
        msg2 = bytearray(resp.write_message())
        msg2[position] ^= 0x01
        with pytest.raises(HandshakeError):
            init.read_message(bytes(msg2))
    for position in range(65):
        init, resp = _pair()
        resp.read_message(init.write_message())
        init.read_message(resp.write_message())
        msg3 = bytearray(init.write_message(b"\x01"))
        msg3[position] ^= 0x80
        with pytest.raises(HandshakeError):
            resp.read_message(bytes(msg3))


def test_short_messages_are_handshake_errors():
    init, resp = _pair()
    with pytest.raises(HandshakeError):
        resp.read_message(b"\x00" * 31)
    init, resp = _pair()
    resp.read_message(init.write_message())
    msg2 = resp.write_message()
    for cut in (0, 10, 32, 79, len(msg2) - 1):
        a, b = _pair()
        b.read_message(a.write_message())
        with pytest.raises(HandshakeError):
            a.read_message(b.write_message()[:cut])


def test_low_order_point_is_a_handshake_error():
    _, resp = _pair()
    resp.read_message(bytes(32))  # the all-zero point as the initiator's ephemeral key
    with pytest.raises(HandshakeError):
        resp.write_message()


def test_out_of_turn_calls_are_local_bugs():
    init, resp = _pair()
    with pytest.raises(LocalError):
        resp.write_message()
    with pytest.raises(LocalError):
        init.read_message(b"")
    with pytest.raises(LocalError):
        init.split()


def test_rekey_is_noise_default():
    key = bytes(range(32))
    expected = AESGCM(key).encrypt(b"\x00" * 4 + b"\xff" * 8, bytes(32), b"")[:32]
    assert noise.rekey(key) == expected
    assert noise.aesgcm_nonce(1) == bytes(11) + b"\x01"


# ---- cross-check against the noiseprotocol package ----

noise_connection = pytest.importorskip("noise.connection")


def _their(initiator: bool, static: X25519PrivateKey, prologue: bytes):
    conn = noise_connection.NoiseConnection.from_name(noise.PROTOCOL_NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_keypair_from_private_bytes(noise_connection.Keypair.STATIC, _raw(static))
    conn.set_prologue(prologue)
    conn.start_handshake()
    return conn


@pytest.mark.parametrize("we_initiate", [True, False])
def test_interoperates_with_noiseprotocol(we_initiate):
    prologue = b"FERRY\n\x00\x01"
    our_static, their_static = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ours = HandshakeState(initiator=we_initiate, static_key=our_static, prologue=prologue)
    theirs = _their(not we_initiate, their_static, prologue)
    payloads = [b"", b"second", b"\x01"]
    for index, payload in enumerate(payloads):
        if (index % 2 == 0) == we_initiate:
            assert theirs.read_message(ours.write_message(payload)) == payload
        else:
            assert ours.read_message(theirs.write_message(payload)) == payload
    assert ours.finished and theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()
    assert ours.remote_static == public_bytes(their_static)
    send_key, receive_key = ours.split()
    send, receive = CipherState(), CipherState()
    send.initialize_key(send_key)
    receive.initialize_key(receive_key)
    for round_ in range(3):
        text = b"transport %d" % round_
        assert theirs.decrypt(send.encrypt_with_ad(b"", text)) == text
        assert receive.decrypt_with_ad(b"", theirs.encrypt(text)) == text
    # Rekey as Noise defines it, on both implementations.
    theirs.rekey_inbound_cipher()
    send.initialize_key(noise.rekey(send_key))
    send.n = 3
    assert theirs.decrypt(send.encrypt_with_ad(b"", b"after rekey")) == b"after rekey"
