"""Control messages between the agents: decoding hostile payloads, reading their fields."""

from __future__ import annotations

import pytest

from agent.errors import ProtocolError, UserError
from agent.migration.link import parse_message
from agent.migration.protocol import MAX_INT_FIELD, Control, Kind, Op, control
from agent.storage.disk_sink import parse_disk_map


def test_roundtrip_and_data_kinds():
    msg = control(Op.PREPARED, dest_pid=7)
    assert parse_message(Kind.CONTROL, msg.encode()) == msg
    assert parse_message(Kind.RAM_BATCH, b"\x00") is None
    with pytest.raises(ProtocolError, match="unknown message kind"):
        parse_message(0x99, b"{}")


@pytest.mark.parametrize("payload", [
    b'{"op": "commit", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"op": "commit", "x": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
])
def test_deeply_nested_json_is_a_protocol_error(payload):
    """Found by `python -m bench fuzz`: json's RecursionError escaped Control.decode."""
    with pytest.raises(ProtocolError, match="malformed control message"):
        parse_message(Kind.CONTROL, payload)


@pytest.mark.parametrize("payload", [b"[]", b"1", b'"op"', b'{"op": 1}', b'{"op": "nope"}',
                                     b"\xff", b'{"x": 1}'])
def test_malformed_control_messages(payload):
    with pytest.raises(ProtocolError):
        Control.decode(payload)


@pytest.mark.parametrize("value", ["12", 1.5, True, -1, MAX_INT_FIELD + 1, None, [1],
                                   float("inf")])
def test_int_field_refuses_what_is_not_a_count(value):
    """int(reply.body.get(...)) raised ValueError/TypeError/OverflowError on a malformed
    PREPARED or COMMITTED; now a ProtocolError, or the default where the job only reports
    the figure (COMMITTED: the destination runs the VM already)."""
    msg = control(Op.COMMITTED, resume_us=value)
    with pytest.raises(ProtocolError, match="resume_us"):
        msg.int_field("resume_us")
    assert msg.int_field("resume_us", 5, strict=False) == 5
    assert control(Op.COMMITTED, resume_us=1500).int_field("resume_us") == 1500
    assert control(Op.COMMITTED).int_field("dest_pid") == 0


@pytest.mark.parametrize("items", [{"/a": "/b"}, "/a=/b", 5, [1], ["/a=/b", None]])
def test_disk_map_of_the_wrong_type_is_refused(items):
    """Found by `python -m bench fuzz`: PREPARE's disk_map of another type raised TypeError
    or AttributeError in the destination."""
    with pytest.raises(UserError, match="bad disk map"):
        parse_disk_map(items)
    assert parse_disk_map(["/a=/b"]) == {"/a": "/b"}
    assert parse_disk_map(None) == {}
