"""The secure channel over real TCP sockets on loopback (uvloop), end to end."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest
import xxhash

from agent.errors import (
    ChannelClosedError,
    FrameError,
    NotFerryPeerError,
    PeerError,
    PeerReportedError,
    PeerTimeoutError,
    RefusedByPeerError,
    StreamEndError,
    UntrustedPeerError,
    VersionMismatchError,
    WireCode,
)
from agent.identity import Identity, Peer, TrustedPeers
from agent.net import channel as channel_mod
from agent.net.channel import connect, run, serve
from agent.wire.messages import Message, MsgType
from agent.wire.session import PREAMBLE, WIRE_VERSION, preamble

HOST = "127.0.0.1"
CLIENT, SERVER, STRANGER = Identity.generate(), Identity.generate(), Identity.generate()
SERVER_TRUSTS = TrustedPeers((Peer("client", CLIENT.public_key),))
CLIENT_TRUSTS = TrustedPeers((Peer("server", SERVER.public_key, "127.0.0.1:1"),))


class Recorder:
    """Collects what the server saw: channels handed to the handler, handshake errors."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self.error_seen = asyncio.Event()

    def on_error(self, label: str, error: Exception) -> None:
        self.errors.append(error)
        self.error_seen.set()


async def wait_for_error(recorder: Recorder) -> Exception:
    await asyncio.wait_for(recorder.error_seen.wait(), 5)
    return recorder.errors[0]


def test_trusted_peers_talk_both_ways():
    async def main():
        seen = []

        async def handler(channel):
            assert channel.peer.name == "client" and channel.peer_name == "client"
            async for message in channel:
                seen.append(message)
                if message.type is MsgType.CONTROL:
                    await channel.send_control(MsgType.CONTROL, {"echo": message.control()})
                else:
                    await channel.send(MsgType.DATA, message.payload[::-1])

        async with await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler) as server:
            async with await connect(HOST, server.port, CLIENT, CLIENT_TRUSTS) as channel:
                assert channel.peer.name == "server" and channel.peer_key == SERVER.public_key
                assert channel.is_open
                await channel.send_control(MsgType.CONTROL, {"hello": [1, 2]})
                reply = await channel.receive(timeout=5)
                assert reply.control() == {"echo": {"hello": [1, 2]}}
                payload = os.urandom(3 << 20)
                await channel.send(MsgType.DATA, payload)
                msg_type, data = await channel.receive(timeout=5)
                assert (msg_type, data) == (MsgType.DATA, payload[::-1])
            assert not channel.is_open
            with pytest.raises(ChannelClosedError):
                await channel.send(MsgType.DATA, b"late")
            await channel.close()  # closing twice is fine
        assert [m.type for m in seen] == [MsgType.CONTROL, MsgType.DATA]

    run(main())


def test_peer_goodbye_ends_receive_and_iteration():
    async def main():
        async def handler(channel):
            await channel.send(MsgType.DATA, b"only message")

        async with await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler) as server:
            channel = await connect(HOST, server.port, CLIENT, CLIENT_TRUSTS)
            got = [m async for m in channel]
            assert got == [Message(MsgType.DATA, b"only message")]
            with pytest.raises(ChannelClosedError):
                await channel.receive()
            await channel.close()

    run(main())


def test_untrusted_client_is_refused_on_both_sides():
    async def main():
        recorder = Recorder()

        async def handler(channel):
            raise AssertionError("an untrusted peer reached the handler")

        async with await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler,
                               on_error=recorder.on_error) as server:
            stranger_trusts = TrustedPeers((Peer("server", SERVER.public_key),))
            with pytest.raises(RefusedByPeerError, match="ferry trust"):
                await connect(HOST, server.port, STRANGER, stranger_trusts)
            error = await wait_for_error(recorder)
            assert isinstance(error, UntrustedPeerError)
            assert STRANGER.fingerprint in str(error) and STRANGER.public_key_b64 in str(error)

    run(main())


def test_untrusted_server_is_refused_on_both_sides():
    async def main():
        recorder = Recorder()

        async def handler(channel):
            raise AssertionError("the handshake should not have finished")

        trusts_stranger = TrustedPeers((Peer("client", CLIENT.public_key),))
        async with await serve(HOST, 0, STRANGER, trusts_stranger, handler,
                               on_error=recorder.on_error) as server:
            with pytest.raises(UntrustedPeerError) as info:
                await connect(HOST, server.port, CLIENT, CLIENT_TRUSTS)
            assert STRANGER.fingerprint in str(info.value)
            assert isinstance(await wait_for_error(recorder), RefusedByPeerError)

    run(main())


def test_connecting_to_the_wrong_trusted_peer():
    async def main():
        async def handler(channel):
            pass

        async with await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler) as server:
            with pytest.raises(UntrustedPeerError, match="not the key expected"):
                await connect(HOST, server.port, CLIENT, CLIENT_TRUSTS,
                              expected_key=STRANGER.public_key)

    run(main())


async def _tampering_proxy(target_port: int, flip_at: int):
    """Forwards to target; flips one bit of the client's stream at byte offset `flip_at`."""
    tasks = set()

    async def pipe(reader, writer, flip):
        offset = 0
        try:
            while data := await reader.read(65536):
                if flip is not None and offset <= flip < offset + len(data):
                    data = bytearray(data)
                    data[flip - offset] ^= 0x20
                offset += len(data)
                writer.write(bytes(data))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def on_client(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection(HOST, target_port)
        for coro in (pipe(client_reader, server_writer, flip_at),
                     pipe(server_reader, client_writer, None)):
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    return await asyncio.start_server(on_client, HOST, 0), tasks


def test_a_tampered_byte_on_the_wire_is_detected():
    async def main():
        server_saw: asyncio.Future = asyncio.get_running_loop().create_future()

        async def handler(channel):
            try:
                message = await channel.receive(timeout=5)
                server_saw.set_result(message)
            except Exception as exc:
                server_saw.set_result(exc)

        async with await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler) as server:
            # The client's handshake bytes: preamble, message 1 and message 3 with lengths.
            handshake_len = PREAMBLE.size + 2 + 32 + 2 + 65
            proxy, tasks = await _tampering_proxy(server.port, handshake_len + 13 + 100)
            async with proxy:
                port = proxy.sockets[0].getsockname()[1]
                channel = await connect(HOST, port, CLIENT, CLIENT_TRUSTS)
                await channel.send(MsgType.DATA, b"guest page " * 100)
                error = await asyncio.wait_for(server_saw, 5)
                assert isinstance(error, FrameError) and error.code is WireCode.AUTH_FAILED
                with pytest.raises(PeerReportedError) as info:  # the server says why
                    await channel.receive(timeout=5)
                assert info.value.code == WireCode.AUTH_FAILED
                await channel.close()
                await asyncio.gather(*tasks)

    run(main())


@pytest.mark.slow
def test_one_gib_arrives_intact():
    total_messages = 1024  # of 1 MiB
    block = bytearray(os.urandom(1 << 20))

    async def main():
        result: asyncio.Future = asyncio.get_running_loop().create_future()

        async def handler(channel):
            digest, count, size = xxhash.xxh3_128(), 0, 0
            async for msg_type, payload in channel:
                assert msg_type is MsgType.RAM_PAGES
                assert int.from_bytes(payload[:8], "little") == count  # in order, none lost
                digest.update(payload)
                count += 1
                size += len(payload)
            result.set_result((count, size, digest.hexdigest()))

        async with await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler) as server:
            start = time.perf_counter()
            digest = xxhash.xxh3_128()
            async with await connect(HOST, server.port, CLIENT, CLIENT_TRUSTS) as channel:
                for index in range(total_messages):
                    block[:8] = index.to_bytes(8, "little")  # reused at once: send copies
                    digest.update(block)
                    await channel.send(MsgType.RAM_PAGES, block)
            count, size, received = await asyncio.wait_for(result, 60)
            elapsed = time.perf_counter() - start
        assert (count, size) == (total_messages, total_messages << 20)
        assert received == digest.hexdigest()
        return elapsed

    elapsed = run(main())
    print(f"1 GiB through one process: {elapsed:.2f} s")


def test_garbage_client_is_refused():
    async def main():
        recorder = Recorder()

        async def handler(channel):
            raise AssertionError("garbage reached the handler")

        async with await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler,
                               on_error=recorder.on_error) as server:
            reader, writer = await asyncio.open_connection(HOST, server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert isinstance(await wait_for_error(recorder), NotFerryPeerError)
            assert await reader.read(100) == preamble()  # all it ever said
            writer.close()
            await writer.wait_closed()

    run(main())


def test_version_mismatch_over_tcp():
    async def main():
        recorder = Recorder()

        async def handler(channel):
            pass

        async with await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler,
                               on_error=recorder.on_error) as server:
            _reader, writer = await asyncio.open_connection(HOST, server.port)
            writer.write(preamble(WIRE_VERSION + 1))
            error = await wait_for_error(recorder)
            assert isinstance(error, VersionMismatchError)
            assert error.peer_version == WIRE_VERSION + 1
            writer.close()
            await writer.wait_closed()

    run(main())


def test_silent_peers_time_out():
    async def main():
        recorder = Recorder()

        async def handler(channel):
            pass

        async with await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler, timeout=0.3,
                               on_error=recorder.on_error) as server:
            _reader, writer = await asyncio.open_connection(HOST, server.port)
            assert isinstance(await wait_for_error(recorder), PeerTimeoutError)
            writer.close()
            await writer.wait_closed()

        with socket.create_server((HOST, 0)) as mute:  # accepts, never speaks
            port = mute.getsockname()[1]
            with pytest.raises(PeerTimeoutError):
                await connect(HOST, port, CLIENT, CLIENT_TRUSTS, timeout=0.3)

    run(main())


def test_nobody_listening():
    with socket.create_server((HOST, 0)) as sock:
        port = sock.getsockname()[1]

    async def main():
        with pytest.raises(PeerError, match="cannot connect"):
            await connect(HOST, port, CLIENT, CLIENT_TRUSTS)

    run(main())


def test_backpressure_bounds_what_a_slow_reader_buffers():
    async def main():
        release = asyncio.Event()

        async def handler(channel):
            await release.wait()  # never reads until released

        async with await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler) as server:
            channel = await connect(HOST, server.port, CLIENT, CLIENT_TRUSTS)
            payload = bytes(1 << 20)
            sent = 0
            with pytest.raises(PeerTimeoutError):
                for _ in range(512):
                    await channel.send(MsgType.DATA, payload, timeout=0.5)
                    sent += 1
            # Write and read high-water marks plus the kernel's socket buffers.
            assert 8 <= sent < 64
            with pytest.raises(PeerTimeoutError):  # a timed-out send left the brake on
                await channel.send(MsgType.DATA, payload, timeout=0.2)
            release.set()
            channel.abort()

    run(main())


def test_receive_timeout_leaves_the_channel_usable():
    async def main():
        go = asyncio.Event()

        async def handler(channel):
            await go.wait()
            await channel.send(MsgType.DATA, b"late but fine")

        async with (await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler) as server,
                    await connect(HOST, server.port, CLIENT, CLIENT_TRUSTS) as channel):
            with pytest.raises(PeerTimeoutError):
                await channel.receive(timeout=0.1)
            go.set()
            assert (await channel.receive(timeout=5)).payload == b"late but fine"

    run(main())


def test_peer_vanishing_without_goodbye():
    async def main():
        async def handler(channel):
            channel.abort()

        async with await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler) as server:
            channel = await connect(HOST, server.port, CLIENT, CLIENT_TRUSTS)
            with pytest.raises(StreamEndError) as info:
                await channel.receive(timeout=5)
            assert info.value.code is WireCode.TRUNCATED
            with pytest.raises(StreamEndError):  # and it stays failed
                await channel.send(MsgType.DATA, b"")
            await channel.close()

    run(main())


def test_module_is_the_only_asyncio_glue():
    # The wire package must stay free of I/O: no asyncio, no sockets.
    import agent.wire.frames
    import agent.wire.noise
    import agent.wire.session
    for module in (agent.wire.frames, agent.wire.noise, agent.wire.session):
        source = Path(module.__file__).read_text()
        assert "import asyncio" not in source and "import socket" not in source
    assert channel_mod.READ_HIGH_WATER and channel_mod.WRITE_HIGH_WATER


def test_close_wakes_pending_receivers():
    async def main():
        async def handler(channel):
            await asyncio.sleep(5)

        async with await serve(HOST, 0, SERVER, SERVER_TRUSTS, handler) as server:
            channel = await connect(HOST, server.port, CLIENT, CLIENT_TRUSTS)
            receivers = [asyncio.create_task(channel.receive()) for _ in range(2)]
            await asyncio.sleep(0.05)
            await channel.close()
            for task in receivers:
                with pytest.raises(ChannelClosedError):
                    await asyncio.wait_for(task, 5)

    run(main())
