"""The import conversation (agent.importer.talk): its tables pass the legal sequence on
both sides and refuse anything else; every field of its messages is checked; a peer
that gets a hostile or malformed message says so with ERROR and removes what it created
(agent.importer.remote_sink, with real qemu-img and qemu-storage-daemon, over an
in-memory link)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from agent.batch.format import HASH_SIZE
from agent.errors import PeerError, ProtocolError
from agent.importer import talk
from agent.importer.definition import DiskDef, NicDef, VmDefinition
from agent.importer.remote_sink import ImportSink
from agent.importer.talk import DiskOffer, ImportRequest, ImportState
from agent.migration.conversation import CheckedLink, Role
from agent.migration.protocol import Control, Kind, Op, control
from agent.state.config import AgentConfig
from agent.storage.disk_source import DISK_HEADER
from tests.test_conversation import exchange

MIB = 1 << 20

PASS = [  # (who says it, message): a two-disk pass
    (Role.SOURCE, Op.IMPORT), (Role.DESTINATION, Op.IMPORT_READY),
    (Role.SOURCE, Kind.DISK_BATCH), (Role.SOURCE, Kind.DISK_BATCH),
    (Role.SOURCE, Op.DISK_END), (Role.DESTINATION, Op.HASHES),
    (Role.DESTINATION, Op.HASHES), (Role.DESTINATION, Op.DISK_WRITTEN),
    (Role.SOURCE, Op.DISK_END), (Role.DESTINATION, Op.HASHES),
    (Role.DESTINATION, Op.DISK_WRITTEN),
    (Role.SOURCE, Op.FINISH), (Role.DESTINATION, Op.FINISHED)]


def play(script: list[tuple[Role, Kind | Op]]) -> tuple[Any, Any]:
    return exchange(talk.conversation(Role.SOURCE), talk.conversation(Role.DESTINATION),
                    script)


def test_a_pass_walks_both_tables_to_closed() -> None:
    src, dst = play(PASS)
    assert src.state is dst.state is ImportState.CLOSED


def test_an_abort_is_answered_and_late_replies_are_heard() -> None:
    src, dst = play(PASS[:3] + [(Role.SOURCE, Op.ABORT), (Role.DESTINATION, Op.ABORTED)])
    assert src.state is dst.state is ImportState.CLOSED
    src = talk.conversation(Role.SOURCE)
    src.sent(Op.IMPORT)
    src.sent(Op.ABORT)
    src.received(Op.IMPORT_READY)        # crossed the ABORT
    assert src.state is ImportState.ABORTING


@pytest.mark.parametrize("script,error", [
    ([(Role.SOURCE, Kind.DISK_BATCH)], "may not send disk-batch in state idle"),
    ([(Role.SOURCE, Op.IMPORT), (Role.SOURCE, Kind.DISK_BATCH)],
     "may not send disk-batch in state preparing"),
    (PASS[:5] + [(Role.SOURCE, Kind.DISK_BATCH)], "in state verifying"),
    (PASS[:4] + [(Role.DESTINATION, Op.HASHES)], "may not send hashes in state copying"),
    ([(Role.SOURCE, Op.PREPARE)], "of an import may not send prepare"),
    ([(Role.SOURCE, Op.IMPORT), (Role.DESTINATION, Op.IMPORT_READY),
      (Role.SOURCE, Kind.RAM_BATCH)], "ram-batch"),
])
def test_anything_else_is_a_protocol_error(script: list[tuple[Role, Kind | Op]],
                                           error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        play(script)


def test_the_docs_show_the_tables_as_they_are() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    assert talk.with_tables(doc) == doc, "run python -m agent.importer.talk --write"


# ------------------------------------------------------------------ message checks

def definition(**changes: Any) -> VmDefinition:
    base = VmDefinition(name="web01", memory=64 * MIB, disks=(
        DiskDef(path=Path("/src/web01.vmdk"), format="vmdk", bus="ide", virtual_size=MIB),),
        nics=(NicDef(model="e1000", mac="00:50:56:aa:bb:cc", network="lan"),))
    return VmDefinition.from_json({**base.to_json(), **changes})


def request(**changes: Any) -> Control:
    body = ImportRequest(job="0123456789ab", definition=definition(),
                         disks=(DiskOffer(0, MIB, 4096),), target_format="qcow2",
                         directory=None, warm=False, token="ab" * 16, first_pass=True).body()
    return control(Op.IMPORT, **{**body, **changes})


def test_a_request_round_trips() -> None:
    parsed = ImportRequest.parse(request())
    assert parsed.definition == definition() and parsed.disks == (DiskOffer(0, MIB, 4096),)


@pytest.mark.parametrize("changes,error", [
    ({"job": "../../x"}, "job"),
    ({"token": "short"}, "token"),
    ({"format": "vmdk"}, "format"),
    ({"dir": "relative/dir"}, "absolute"),
    ({"dir": 7}, "absolute"),
    ({"warm": "yes"}, "warm"),
    ({"disks": []}, "0 disks offered, the definition has 1"),
    ({"disks": [{"index": 1, "virtual_size": MIB, "allocated": 0}]}, "index 1"),
    ({"disks": [{"index": 0, "virtual_size": MIB, "allocated": 2 * MIB}]}, "allocated"),
    ({"disks": [{"index": 0, "virtual_size": -1, "allocated": 0}]}, "virtual_size"),
    ({"disks": [{"index": 0, "virtual_size": MIB, "allocated": 0, "path": "/x"}]},
     "index, virtual_size, allocated"),
    ({"disks": "all"}, "not a list"),
    ({"definition": "x"}, "not an object"),
    ({"definition": {"name": "x"}}, "memory"),
    ({"definition": {**definition().to_json(), "name": "../etc"}}, "VM name"),
    ({"definition": {**definition().to_json(), "bogus": 1}}, "malformed definition"),
    ({"definition": {**definition().to_json(), "memory": 1 << 62}}, "memory"),
    ({"definition": {**definition().to_json(), "cpus": True}}, "cpus"),
    ({"definition": {**definition().to_json(), "firmware": "coreboot"}}, "firmware"),
    ({"definition": {**definition().to_json(),
                     "disks": [{"path": "/a", "bus": "usb"}]}}, "disk bus"),
    ({"definition": {**definition().to_json(), "nics": [{"model": "ne2k_pci"}]}},
     "NIC model"),
    ({"definition": {**definition().to_json(), "nics": [{"mac": "zz"}]}}, "MAC"),
    ({"definition": {**definition().to_json(), "disks": [{"path": 5}]}}, "malformed"),
])
def test_malformed_requests_are_refused(changes: dict[str, Any], error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        ImportRequest.parse(request(**changes))


def hashes(disk: int, first: int, blocks: int, **changes: Any) -> Control:
    return control(Op.HASHES, **{**talk.hashes_body(disk, first, bytes(blocks * HASH_SIZE)),
                                 **changes})


def test_hashes_follow_on_without_gap_or_overlap() -> None:
    assert talk.parse_hashes(hashes(0, 0, 3), 0, 5, 0) == bytes(3 * HASH_SIZE)
    assert talk.parse_hashes(hashes(0, 3, 2), 0, 5, 3) == bytes(2 * HASH_SIZE)


@pytest.mark.parametrize("msg,error", [
    (hashes(1, 0, 2), "about disk 1, not 0"),
    (hashes(0, 1, 2), "expected them from block 0"),
    (hashes(0, 0, 6), "of 5"),
    (hashes(0, 0, 2, count=3), "bytes for 3 blocks"),
    (hashes(0, 0, 2, hashes="not base64!"), "base64"),
    (hashes(0, 0, 2, hashes=None), "without its hashes"),
    (control(Op.HASHES, disk=0, first=-1, count=1, hashes=""), "first"),
])
def test_bad_hashes_are_refused(msg: Control, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        talk.parse_hashes(msg, 0, 5, 0)


def test_a_hash_run_fits_a_control_message() -> None:
    body = talk.hashes_body(0, 0, bytes(talk.HASH_RUN_BLOCKS * HASH_SIZE))
    assert len(json.dumps(body)) < 1 << 20
    assert len(base64.b64decode(body["hashes"])) == talk.HASH_RUN_BLOCKS * HASH_SIZE


# ------------------------------------------------------------------ the peer's side

class QueueLink:
    """Messages in from a list, out into a list: the peer's side of a link."""

    def __init__(self, incoming: list[tuple[int, bytes]]) -> None:
        self.incoming = list(incoming)
        self.sent: list[tuple[int, bytes]] = []

    async def send(self, kind: int, payload: bytes | memoryview) -> None:
        self.sent.append((kind, bytes(payload)))

    async def receive(self) -> tuple[int, bytes]:
        if not self.incoming:
            raise PeerError("link to hosta lost: the source went away")   # as ChannelLink
        return self.incoming.pop(0)

    async def close(self) -> None:
        pass


def serve(tmp_path: Path, messages: list[tuple[int, bytes]]) -> tuple[ImportSink, QueueLink]:
    config = AgentConfig(home=tmp_path / "home", ram_dir=tmp_path)
    config.home.mkdir()
    raw = QueueLink(messages)
    link = CheckedLink(raw, talk.conversation(Role.DESTINATION))

    async def start(defn: VmDefinition, private: bool) -> Any:
        raise AssertionError("nothing is started here")

    sink = ImportSink(config=config, link=link, peer="hosta", start_vm=start)
    first = request()

    async def run() -> None:
        await link.accept(Kind.CONTROL, first.encode())
        await sink.run(first)
    asyncio.run(run())
    return sink, raw


def replies(link: QueueLink) -> list[Control]:
    return [Control.decode(p) for k, p in link.sent if k == Kind.CONTROL]


@pytest.mark.parametrize("payload,error", [
    (DISK_HEADER.pack(1) + b"x" * 64, "disk batch for disk 1 while disk 0"),
    (DISK_HEADER.pack(0) + b"\x00" * 40, "batch"),
    (b"\x00", "without its disk index"),
])
def test_a_hostile_batch_gets_an_error_and_the_target_is_removed(
        tmp_path: Path, payload: bytes, error: str) -> None:
    sink, link = serve(tmp_path, [(Kind.DISK_BATCH, payload)])
    said = replies(link)
    assert [m.op for m in said] == [Op.IMPORT_READY, Op.ERROR]
    assert error in said[-1].body["message"]
    target = Path(said[0].body["targets"][0])
    assert said[-1].body["removed"] == [str(target)]
    assert not target.exists() and not (tmp_path / "home" / "vms" / "web01").exists()
    assert sink.finished is None and sink.error_reason == "protocol"


def test_a_finish_before_every_disk_is_refused(tmp_path: Path) -> None:
    sink, link = serve(tmp_path, [(Kind.CONTROL, control(Op.FINISH, create=True,
                                                         start=False).encode())])
    assert sink.finished is None
    said = replies(link)
    assert said[-1].op is Op.ERROR and "finish after 0 of 1 disks" in said[-1].body["message"]
    assert not (tmp_path / "home" / "vms" / "web01").exists()


def test_a_lost_link_removes_the_targets(tmp_path: Path) -> None:
    sink, link = serve(tmp_path, [])
    ready = replies(link)[0]             # the target was made, then the link went
    assert ready.op is Op.IMPORT_READY and not Path(ready.body["targets"][0]).exists()
    assert not (tmp_path / "home" / "vms" / "web01").exists()
    assert "went away" in str(sink.error)


def test_a_target_outside_the_allowed_paths_is_refused_before_anything(tmp_path: Path) -> None:
    config = AgentConfig(home=tmp_path / "home", ram_dir=tmp_path)
    config.home.mkdir()
    (tmp_path / "other").mkdir()
    raw = QueueLink([])
    link = CheckedLink(raw, talk.conversation(Role.DESTINATION))

    async def start(defn: VmDefinition, private: bool) -> Any:
        raise AssertionError

    sink = ImportSink(config=config, link=link, peer="hosta", start_vm=start)
    first = request(dir=str(tmp_path / "other"))

    async def run() -> None:
        await link.accept(Kind.CONTROL, first.encode())
        await sink.run(first)
    asyncio.run(run())
    (said,) = replies(raw)
    assert said.op is Op.ERROR and "allowed" in said.body["message"]
    assert list((tmp_path / "other").iterdir()) == []
