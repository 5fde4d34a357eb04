"""The asyncio NBD client against real servers (qemu-nbd, qemu-storage-daemon) and against a
scripted fake server for what real ones never do (garbage, silence, ESHUTDOWN)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import (
    NbdCommandError,
    NbdConnectError,
    NbdDisconnectedError,
    NbdOptionError,
    NbdProtocolError,
    NbdRequestError,
    NbdTimeoutError,
    NotNbdServerError,
)
from agent.storage import nbd_proto as P
from agent.storage.nbd import NbdClient, Runstate
from agent.storage.nbd_proto import (
    BASE_ALLOCATION,
    DIRTY,
    AllocationFlag,
    Command,
    Extent,
    NbdErrno,
    Option,
    OptionReply,
)
from tests.test_nbd_proto import Server

TOOLS = ("qemu-nbd", "qemu-img", "qemu-io", "qemu-storage-daemon")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
needs_qemu = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}")
CLUSTER = 64 << 10
BITMAP = "qemu:dirty-bitmap:bm0"
START_TIMEOUT = 10.0


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def qcow2(path: Path, size: int, *, bitmap: bool = False) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
    if bitmap:
        run("qemu-img", "bitmap", "--add", "--enable", str(path), "bm0")
    return path


@pytest.fixture
def servers(vm_dir: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts NBD servers (an argv whose socket is at `sock`); each is killed at teardown."""
    with contextlib.ExitStack() as cleanup:
        count = 0

        def start(argv: list[str], sock: Path | None = None) -> subprocess.Popen[bytes]:
            nonlocal count
            count += 1
            log = open(vm_dir / f"server{count}.log", "wb")
            cleanup.callback(log.close)
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            cleanup.callback(stop, proc)
            deadline = time.monotonic() + START_TIMEOUT
            # The socket file appears at bind(), before listen(): wait until it accepts
            # (a connect in between was refused once, in a full run).
            while sock is not None and not accepts(sock):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not start: "
                                       f"{(vm_dir / f'server{count}.log').read_text()}")
                time.sleep(0.01)
            return proc

        yield start


def accepts(sock: Path) -> bool:
    """Whether a server listens on the unix socket at `sock` now."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(sock))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
    proc.wait(timeout=10)


@pytest.fixture
def qemu_nbd(servers: Callable[..., Any], vm_dir: Path) -> Callable[..., tuple[str, Any]]:
    """qemu-nbd serving an image on a unix socket: returns (socket path, process)."""
    count = 0

    def start(image: Path, fmt: str = "qcow2", *extra: str) -> tuple[str, Any]:
        nonlocal count
        count += 1
        sock = vm_dir / f"nbd{count}.sock"
        proc = servers(["qemu-nbd", f"--socket={sock}", f"--format={fmt}", "--persistent",
                        "--shared=8", *extra, str(image)], sock)
        return str(sock), proc

    return start


@pytest.fixture
def storage_daemon(servers: Callable[..., Any], vm_dir: Path) -> Callable[..., str]:
    """qemu-storage-daemon exporting a qcow2 image writable as 'disk0', with bitmap bm0."""

    def start(image: Path) -> str:
        sock = vm_dir / "qsd.sock"
        servers(["qemu-storage-daemon",
                 "--blockdev", f"driver=file,node-name=file0,filename={image}",
                 "--blockdev", "driver=qcow2,node-name=fmt0,file=file0",
                 "--nbd-server", f"addr.type=unix,addr.path={sock}",
                 "--export", ("type=nbd,id=exp0,node-name=fmt0,name=disk0,writable=on,"
                              "bitmaps.0=bm0")], sock)
        return str(sock)

    return start


def arun(coro: Awaitable[Any], *, uv: bool = False) -> Any:
    if uv:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


def runs(extents: list[Extent], mask: int) -> list[tuple[int, int, bool]]:
    """(offset, end, flag set?) runs of one flag, neighbours merged."""
    out: list[tuple[int, int, bool]] = []
    for extent in extents:
        on = bool(extent.flags & mask)
        if out and out[-1][2] == on and out[-1][1] == extent.offset:
            out[-1] = (out[-1][0], extent.end, on)
        else:
            out.append((extent.offset, extent.end, on))
    return out


# ------------------------------------------------------------------ real servers


@needs_qemu
@pytest.mark.qemu
def test_handshake_reports_size_flags_block_sizes_and_contexts(qemu_nbd, vm_dir):
    sock, _ = qemu_nbd(qcow2(vm_dir / "a.qcow2", 10 << 20, bitmap=True), "qcow2",
                       "-x", "disk0", "-B", "bm0", "-A")

    async def main() -> None:
        contexts = [BASE_ALLOCATION, BITMAP, "qemu:allocation-depth"]
        async with NbdClient.connect(sock, "disk0", meta_contexts=contexts) as nbd:
            assert nbd.runstate is Runstate.RUNNING
            assert nbd.size == 10 << 20
            assert not nbd.read_only
            assert nbd.can_flush and nbd.can_fua and nbd.can_trim and nbd.can_write_zeroes
            assert nbd.can_fast_zero and nbd.can_multi_conn
            assert nbd.block_sizes.maximum == 32 << 20 and nbd.max_io_size == 32 << 20
            assert set(nbd.contexts) == set(contexts)
            assert len(set(nbd.contexts.values())) == 3
        assert nbd.runstate is Runstate.CLOSED

    arun(main())


@needs_qemu
@pytest.mark.qemu
def test_read_only_export_and_refused_options(qemu_nbd, vm_dir):
    sock, _ = qemu_nbd(qcow2(vm_dir / "a.qcow2", 1 << 20), "qcow2", "-x", "disk0", "-r")

    async def main() -> None:
        async with NbdClient.connect(sock, "disk0") as nbd:
            assert nbd.read_only
            with pytest.raises(NbdRequestError, match="read-only"):
                await nbd.write(0, b"x")
            assert await nbd.read(0, 16) == bytes(16)
            with pytest.raises(NbdRequestError, match="outside"):
                await nbd.read(nbd.size - 8, 16)
            with pytest.raises(NbdRequestError, match="not selected"):
                await nbd.block_status(0, 512, BASE_ALLOCATION)
        with pytest.raises(NbdOptionError, match="no export named 'other'"):
            await NbdClient.connect(sock, "other")
        with pytest.raises(NbdOptionError, match="qemu:dirty-bitmap:nope"):
            await NbdClient.connect(sock, "disk0", meta_contexts=["qemu:dirty-bitmap:nope"])
        # The server is still fine after the refusals.
        async with NbdClient.connect(sock, "disk0", meta_contexts=[BASE_ALLOCATION]) as nbd:
            assert await nbd.block_status(0, nbd.size, BASE_ALLOCATION) == [
                Extent(0, 1 << 20, AllocationFlag.HOLE | AllocationFlag.ZERO)]

    arun(main())


@needs_qemu
@pytest.mark.qemu
@pytest.mark.parametrize("uv", [False, True], ids=["asyncio", "uvloop"])
def test_unaligned_writes_and_reads_round_trip(qemu_nbd, vm_dir, uv):
    image = vm_dir / "r.raw"
    image.write_bytes(b"")
    os.truncate(image, 3 * CLUSTER + 777)
    sock, _ = qemu_nbd(image, "raw")

    async def main() -> None:
        rng = random.Random(7)
        async with NbdClient.connect(sock) as nbd:
            size = nbd.size
            model = bytearray(size)
            for _ in range(40):
                offset = rng.randrange(size)
                data = rng.randbytes(rng.randrange(1, min(9000, size - offset) + 1))
                await nbd.write(offset, data, fua=rng.random() < 0.2)
                model[offset:offset + len(data)] = data
            await nbd.flush()
            assert await nbd.read(0, size) == model
            for _ in range(40):
                offset = rng.randrange(size)
                length = rng.randrange(1, size - offset + 1)
                assert await nbd.read(offset, length) == model[offset:offset + length]
            view = memoryview(bytearray(b"\xff" * 1000))
            await nbd.readinto(size - 1000, view)
            assert view == model[-1000:]
            assert await nbd.read(5, 0) == b""

    arun(main(), uv=uv)


@needs_qemu
@pytest.mark.qemu
def test_large_reads_and_writes_are_split_at_the_servers_maximum(qemu_nbd, vm_dir):
    image = vm_dir / "big.raw"
    image.write_bytes(b"")
    os.truncate(image, 48 << 20)
    sock, _ = qemu_nbd(image, "raw")
    data = random.Random(3).randbytes(1 << 20) * 40   # 40 MiB, more than 32 MiB max payload

    async def main() -> None:
        async with NbdClient.connect(sock) as nbd:
            await nbd.write(4096, data)
            assert await nbd.read(4096, len(data)) == data
            assert await nbd.read(0, 4096) == bytes(4096)

    arun(main(), uv=True)


@needs_qemu
@pytest.mark.qemu
def test_write_zeroes_trim_flush_and_fast_zero(qemu_nbd, vm_dir):
    sock, _ = qemu_nbd(qcow2(vm_dir / "z.qcow2", 1 << 20), "qcow2", "--discard=unmap")

    async def main() -> None:
        async with NbdClient.connect(sock, meta_contexts=[BASE_ALLOCATION]) as nbd:
            await nbd.write(0, b"\x77" * (4 * CLUSTER))
            await nbd.write_zeroes(100, 1000)
            await nbd.write_zeroes(CLUSTER, CLUSTER, no_hole=True, fua=True)
            expected = bytearray(b"\x77" * (4 * CLUSTER))
            expected[100:1100] = bytes(1000)
            expected[CLUSTER:2 * CLUSTER] = bytes(CLUSTER)
            assert await nbd.read(0, 4 * CLUSTER) == expected
            await nbd.trim(2 * CLUSTER, CLUSTER)
            assert (await nbd.read(3 * CLUSTER, CLUSTER)) == b"\x77" * CLUSTER
            try:
                await nbd.write_zeroes(3 * CLUSTER, CLUSTER, fast=True)
            except NbdCommandError as exc:   # allowed: "not faster than writing"
                assert exc.code == NbdErrno.ENOTSUP and exc.command == "WRITE_ZEROES"
            else:
                assert await nbd.read(3 * CLUSTER, CLUSTER) == bytes(CLUSTER)
            await nbd.flush()
            extents = await nbd.block_status(0, nbd.size, BASE_ALLOCATION)
            assert extents[0] == Extent(0, CLUSTER, 0)
            assert sum(e.length for e in extents) == nbd.size

    arun(main())


LAYOUT = st.lists(st.tuples(st.sampled_from(["data", "zero", "hole"]), st.integers(1, 6),
                            st.booleans()), min_size=1, max_size=12)


@pytest.fixture
def layout_server(qemu_nbd, vm_dir) -> str:
    """One qemu-nbd for every example of the layout test (each example resets the disk)."""
    return qemu_nbd(qcow2(vm_dir / "layout.qcow2", 64 * CLUSTER), "qcow2")[0]


@needs_qemu
@pytest.mark.qemu
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(layout=LAYOUT, seed=st.integers(0, 2**32 - 1))
def test_block_status_matches_a_generated_layout(layout_server, layout, seed):
    sock = layout_server
    rng = random.Random(seed)

    async def main() -> None:
        async with NbdClient.connect(sock, meta_contexts=[BASE_ALLOCATION]) as nbd:
            await nbd.write_zeroes(0, nbd.size)        # every cluster a zero cluster again
            model = bytearray(nbd.size)
            data_runs: list[tuple[int, int]] = []
            position = 0
            for kind, clusters, no_hole in layout:
                length = min(clusters * CLUSTER, nbd.size - position)
                if length <= 0:
                    break
                if kind in ("data", "zero"):
                    data = rng.randbytes(length)
                    await nbd.write(position, data)
                    model[position:position + length] = data
                if kind == "zero":
                    await nbd.write_zeroes(position, length, no_hole=no_hole)
                    model[position:position + length] = bytes(length)
                if kind == "data":
                    data_runs.append((position, position + length))
                position += length
            extents = await nbd.block_status(0, nbd.size, BASE_ALLOCATION)
            assert extents[0].offset == 0 and extents[-1].end == nbd.size
            assert all(a.end == b.offset for a, b in itertools.pairwise(extents))
            # Data reads as data (no ZERO flag); zeroed and untouched clusters read as zero.
            expected: list[tuple[int, int]] = []
            for start, end in data_runs:
                if expected and expected[-1][1] == start:
                    expected[-1] = (expected[-1][0], end)
                else:
                    expected.append((start, end))
            got = [(a, b) for a, b, zero in runs(extents, AllocationFlag.ZERO) if not zero]
            assert got == expected
            assert all(e.flags == 0 for e in extents if not e.flags & AllocationFlag.ZERO)
            assert await nbd.read(0, nbd.size) == model
            once = await nbd.block_status_once(0, nbd.size, req_one=True)
            (first,) = once[BASE_ALLOCATION]
            assert first.offset == 0 and first.end == extents[0].end

    arun(main())


WRITES = st.lists(st.tuples(st.integers(0, 16 * CLUSTER - 1), st.integers(1, 3 * CLUSTER)),
                  min_size=1, max_size=5)


@needs_qemu
@pytest.mark.qemu
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(writes=WRITES)
def test_dirty_bitmap_extents_match_what_qemu_io_wrote(qemu_nbd, vm_dir, writes):
    size = 16 * CLUSTER
    image = vm_dir / "dirty.qcow2"
    image.unlink(missing_ok=True)
    qcow2(image, size, bitmap=True)
    commands = []
    dirty = [False] * (size // CLUSTER)
    for offset, length in writes:
        length = min(length, size - offset)
        commands += ["-c", f"write -P 0xab {offset} {length}"]
        for cluster in range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1):
            dirty[cluster] = True
    run("qemu-io", "-f", "qcow2", *commands, str(image))
    sock, proc = qemu_nbd(image, "qcow2", "-B", "bm0")

    async def main() -> None:
        async with NbdClient.connect(sock, meta_contexts=[BITMAP, BASE_ALLOCATION]) as nbd:
            extents = await nbd.block_status(0, size, BITMAP)
            got = [(a, b) for a, b, on in runs(extents, DIRTY) if on]
            expected = [(a, b) for a, b, on in runs([Extent(i * CLUSTER, CLUSTER, int(d))
                                                     for i, d in enumerate(dirty)], DIRTY) if on]
            assert got == expected

    try:
        arun(main())
    finally:
        stop(proc)


@needs_qemu
@pytest.mark.qemu
def test_storage_daemon_export_tracks_writes_in_its_bitmap(storage_daemon, vm_dir):
    sock = storage_daemon(qcow2(vm_dir / "q.qcow2", 4 << 20, bitmap=True))

    async def main() -> None:
        contexts = [BASE_ALLOCATION, BITMAP]
        async with NbdClient.connect(sock, "disk0", meta_contexts=contexts) as nbd:
            assert await nbd.block_status(0, nbd.size, BITMAP) == [Extent(0, 4 << 20, 0)]
            await nbd.write(3 * CLUSTER + 5, b"abc")
            await nbd.write(10 * CLUSTER - 1, b"xy")        # straddles two clusters
            await nbd.write_zeroes(20 * CLUSTER, CLUSTER)
            dirty = [(a, b) for a, b, on in runs(await nbd.block_status(0, nbd.size, BITMAP),
                                                 DIRTY) if on]
            assert dirty == [(3 * CLUSTER, 4 * CLUSTER), (9 * CLUSTER, 11 * CLUSTER),
                             (20 * CLUSTER, 21 * CLUSTER)]
            assert bytes(await nbd.read(3 * CLUSTER, 8)) == b"\0\0\0\0\0abc"
            allocation = await nbd.block_status(0, nbd.size, BASE_ALLOCATION)
            (written,) = [e for e in allocation if e.offset <= 3 * CLUSTER + 5 < e.end]
            assert written.flags == 0    # allocated, not known to be zero
            assert allocation[0] == Extent(0, 3 * CLUSTER, AllocationFlag.HOLE
                                           | AllocationFlag.ZERO)
            # A second connection (the export allows several) sees the same bytes.
            async with NbdClient.connect(sock, "disk0") as other:
                assert bytes(await other.read(10 * CLUSTER - 1, 2)) == b"xy"

    arun(main(), uv=True)


@needs_qemu
@pytest.mark.qemu
def test_many_pipelined_requests_stay_within_the_in_flight_bound(storage_daemon, vm_dir):
    sock = storage_daemon(qcow2(vm_dir / "p.qcow2", 8 << 20, bitmap=True))
    rng = random.Random(11)
    blocks = {i: rng.randbytes(rng.randrange(1, 32 << 10)) for i in range(128)}

    async def main() -> None:
        async with NbdClient.connect(sock, "disk0", max_in_flight=8) as nbd:
            peak = 0
            done = False

            async def watch() -> None:
                nonlocal peak
                while not done:
                    peak = max(peak, nbd._proto.in_flight)
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            await asyncio.gather(*(nbd.write(i * (64 << 10), data)
                                   for i, data in blocks.items()))
            reads = await asyncio.gather(*(nbd.read(i * (64 << 10), len(data))
                                           for i, data in blocks.items()))
            done = True
            await watcher
            assert [bytes(r) for r in reads] == list(blocks.values())
            assert 1 < peak <= 8

    arun(main(), uv=True)


@needs_qemu
@pytest.mark.qemu
def test_tcp_connection(servers, vm_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    image = vm_dir / "t.raw"
    image.write_bytes(b"hello" + bytes(507))
    servers(["qemu-nbd", "-b", "127.0.0.1", "-p", str(port), "-f", "raw", "-t", str(image)])

    async def main() -> bytes:
        for _ in range(200):
            try:
                async with NbdClient.connect(("127.0.0.1", port)) as nbd:
                    return bytes(await nbd.read(0, 5))
            except NbdConnectError:
                await asyncio.sleep(0.02)
        raise AssertionError("qemu-nbd did not listen")

    assert arun(main()) == b"hello"


@needs_qemu
@pytest.mark.qemu
def test_server_killed_mid_request_fails_every_pending_request_at_once(qemu_nbd, vm_dir):
    sock, proc = qemu_nbd(qcow2(vm_dir / "k.qcow2", 8 << 20), "qcow2")

    async def main() -> None:
        nbd = await NbdClient.connect(sock)
        proc.send_signal(signal.SIGSTOP)       # requests now hang inside the server ...
        pending = [asyncio.create_task(nbd.read(i << 20, 1 << 20)) for i in range(6)]
        await asyncio.sleep(0.2)
        assert not any(task.done() for task in pending)
        started = time.monotonic()
        proc.kill()                              # ... until it dies
        results = await asyncio.wait_for(
            asyncio.gather(*pending, return_exceptions=True), 5)
        assert time.monotonic() - started < 2
        assert all(isinstance(r, NbdDisconnectedError) for r in results), results
        assert "unanswered" in str(results[0])
        with pytest.raises(NbdDisconnectedError, match="has failed"):
            await nbd.read(0, 512)
        assert nbd.runstate is Runstate.CLOSED
        with pytest.raises(NbdDisconnectedError):
            await nbd.disconnect()             # the failure is not lost

    arun(main())


@needs_qemu
@pytest.mark.qemu
def test_a_hung_server_times_out_and_the_connection_is_given_up(qemu_nbd, vm_dir):
    sock, proc = qemu_nbd(qcow2(vm_dir / "h.qcow2", 1 << 20), "qcow2")

    async def main() -> None:
        async with NbdClient.connect(sock, request_timeout=0.3) as nbd:
            proc.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            first, second = await asyncio.gather(nbd.read(0, 512), nbd.flush(),
                                                 return_exceptions=True)
            assert time.monotonic() - started < 2
            assert isinstance(first, NbdTimeoutError) and isinstance(second, NbdTimeoutError)
            assert "no reply to" in str(first)
            with pytest.raises(NbdDisconnectedError):
                await nbd.read(0, 512)
            proc.send_signal(signal.SIGCONT)
            with pytest.raises(NbdTimeoutError):
                await nbd.disconnect()

    arun(main())


# ------------------------------------------------------------------ not NBD at all

ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(path: str, handler: ConnectionHandler) -> AsyncIterator[None]:
    """A unix socket server whose connections are all closed and awaited on exit."""
    tasks: set[asyncio.Task[Any]] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(connection, path)
    try:
        yield
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        await asyncio.sleep(0.01)   # let the closed transports finish


def test_connecting_to_something_that_is_not_nbd(vm_dir):
    path = str(vm_dir / "qmp.sock")

    async def qmp_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"QMP": {"version": {}}}\r\n')
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with serving(path, qmp_like):
            started = time.monotonic()
            with pytest.raises(NotNbdServerError, match="not an NBD server"):
                await NbdClient.connect(path, timeout=5)
            assert time.monotonic() - started < 1

    arun(main())


def test_silent_closed_or_missing_servers_are_connect_errors(vm_dir):
    silent, closing = str(vm_dir / "silent.sock"), str(vm_dir / "closing.sock")

    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass

    async def main() -> None:
        async with serving(silent, say_nothing), serving(closing, hang_up):
            with pytest.raises(NbdConnectError, match="no NBD handshake within 0.3 s"):
                await NbdClient.connect(silent, timeout=0.3)
            with pytest.raises(NbdConnectError, match="closed the connection during the "
                                                      "handshake"):
                await NbdClient.connect(closing, timeout=5)
        with pytest.raises(NbdConnectError, match="cannot connect"):
            await NbdClient.connect(str(vm_dir / "nobody.sock"))

    arun(main())


# ------------------------------------------------------------------ a scripted server

Handler = Callable[[int, int, int, int, int, asyncio.StreamWriter], Awaitable[None]]


def fake_server(path: str, on_request: Handler, *, size: int = 1 << 20,
                contexts: tuple[str, ...] = ()) -> contextlib.AbstractAsyncContextManager[None]:
    """A minimal NBD server: a real handshake, then every request handed to `on_request`
    (flags, command, cookie, offset, length, writer); WRITE payloads are read and dropped."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(Server.greeting())
        await reader.readexactly(4)
        while True:
            _, option, length = P.OPTION_HEADER.unpack(await reader.readexactly(16))
            await reader.readexactly(length)
            if option == Option.STRUCTURED_REPLY:
                writer.write(Server.option_reply(option, OptionReply.ACK))
            elif option == Option.SET_META_CONTEXT:
                for i, name in enumerate(contexts):
                    writer.write(Server.meta_context(i + 1, name))
                writer.write(Server.option_reply(option, OptionReply.ACK))
            elif option == Option.GO:
                writer.write(Server.info_export(size) + Server.option_reply(option,
                                                                            OptionReply.ACK))
                break
        while True:
            header = await reader.readexactly(P.REQUEST.size)
            _, flags, command, cookie, offset, length = P.REQUEST.unpack(header)
            if command == Command.WRITE:
                await reader.readexactly(length)
            await on_request(flags, command, cookie, offset, length, writer)
            if command == Command.DISC:
                break

    return serving(path, serve)


def test_garbage_after_the_handshake_fails_every_pending_request_with_a_protocol_error(
        vm_dir):
    path = str(vm_dir / "fake.sock")
    seen: list[int] = []

    async def on_request(flags, command, cookie, offset, length, writer) -> None:
        seen.append(cookie)
        if len(seen) == 3:
            writer.write(Server.data(seen[0], offset + length + 4096, b"evil"))

    async def main() -> None:
        async with fake_server(path, on_request):
            nbd = await NbdClient.connect(path)
            results = await asyncio.wait_for(asyncio.gather(
                *(nbd.read(i * 4096, 4096) for i in range(3)), return_exceptions=True), 5)
            assert all(isinstance(r, NbdProtocolError) for r in results), results
            assert "outside the READ" in str(results[0])
            with pytest.raises(NbdProtocolError):
                await nbd.disconnect()

    arun(main())


@pytest.mark.parametrize("others_pending", [False, True])
def test_eshutdown_fails_the_request_and_the_client_says_goodbye(vm_dir, others_pending):
    path = str(vm_dir / "fake.sock")
    commands: list[int] = []

    async def on_request(flags, command, cookie, offset, length, writer) -> None:
        commands.append(command)
        if command == Command.FLUSH:
            writer.write(Server.error(cookie, NbdErrno.ESHUTDOWN, "going down"))
        elif command == Command.WRITE:        # still in flight when ESHUTDOWN arrives
            asyncio.get_running_loop().call_later(0.2, writer.write, Server.simple(cookie))

    async def main() -> None:
        async with fake_server(path, on_request):
            nbd = await NbdClient.connect(path)
            write = asyncio.create_task(nbd.write(0, b"x")) if others_pending else None
            await asyncio.sleep(0.01)
            with pytest.raises(NbdCommandError, match="ESHUTDOWN: going down") as info:
                await nbd.flush()
            assert info.value.code == NbdErrno.ESHUTDOWN
            with pytest.raises(NbdDisconnectedError, match="shutting down"):
                await nbd.read(0, 512)
            if write is not None:
                await write                       # earlier requests still complete
            for _ in range(100):                  # the client says goodbye by itself ...
                if Command.DISC in commands:
                    break
                await asyncio.sleep(0.01)
            assert commands == ([Command.WRITE] if others_pending else []) + [
                Command.FLUSH, Command.DISC]
            await nbd.disconnect()                # ... and disconnect() has nothing to add
            assert nbd.runstate is Runstate.CLOSED

    arun(main())


def test_a_cancelled_read_leaves_its_buffer_alone_and_the_connection_usable(vm_dir):
    path = str(vm_dir / "fake.sock")
    held: list[tuple[int, int, int]] = []

    async def on_request(flags, command, cookie, offset, length, writer) -> None:
        if command == Command.READ and not held:
            held.append((cookie, offset, length))     # answered later, after the cancel
            return
        if command == Command.READ:
            old_cookie, old_offset, old_length = held[0]
            writer.write(Server.data(old_cookie, old_offset, b"\x99" * old_length, 1))
            writer.write(Server.data(cookie, offset, b"\x42" * length, 1))
        elif command != Command.DISC:
            writer.write(Server.simple(cookie))

    async def main() -> None:
        async with fake_server(path, on_request), NbdClient.connect(path) as nbd:
            buffer = bytearray(4096)
            task = asyncio.create_task(nbd.readinto(0, buffer))
            while not held:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert bytes(await nbd.read(8192, 100)) == b"\x42" * 100
            assert buffer == bytes(4096)      # the late reply went nowhere
            await nbd.flush()

    arun(main())


def test_requests_are_checked_before_anything_is_sent(vm_dir):
    path = str(vm_dir / "fake.sock")
    sent: list[int] = []

    async def on_request(flags, command, cookie, offset, length, writer) -> None:
        sent.append(command)
        if command != Command.DISC:
            writer.write(Server.simple(cookie))

    async def main() -> None:
        async with fake_server(path, on_request, size=100 << 20), \
                NbdClient.connect(path) as nbd:
            with pytest.raises(NbdRequestError, match="outside"):
                await nbd.write(99 << 20, bytes(2 << 20))      # would be split in two
            with pytest.raises(NbdRequestError, match="readinto needs a writable"):
                await nbd.readinto(0, memoryview(b"const"))
            with pytest.raises(NbdRequestError, match="not selected"):
                await nbd.block_status(0, 512, BASE_ALLOCATION)
            await nbd.flush()
        assert sent == [Command.FLUSH, Command.DISC]

    arun(main())


def test_disc_is_sent_and_waits_for_pending_replies(vm_dir):
    path = str(vm_dir / "fake.sock")
    order: list[str] = []

    async def on_request(flags, command, cookie, offset, length, writer) -> None:
        order.append(Command(command).name)
        if command == Command.WRITE:
            await asyncio.sleep(0.1)
            writer.write(Server.simple(cookie))

    async def main() -> None:
        async with fake_server(path, on_request):
            nbd = await NbdClient.connect(path)
            write = asyncio.create_task(nbd.write(0, b"x" * 100))
            await asyncio.sleep(0.02)
            await nbd.disconnect()
            await write
            assert nbd.runstate is Runstate.CLOSED
            with pytest.raises(NbdDisconnectedError, match="closed"):
                await nbd.flush()

    arun(main())
    assert order == ["WRITE", "DISC"]

