"""The operator's side without agents: tables and progress as drawn, the job history's
bound, the outbound queue, and the limits in agent.toml."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from agent.commands import jobs_cmds
from agent.commands.render import ProgressView, bar_figures, plain_table, print_table, progress_line
from agent.errors import UserError
from agent.service.jobs import History, JobRecord, Limiter, follow
from agent.state.config import load_config


def test_plain_table_aligns_columns_and_shows_none_as_dash() -> None:
    text = plain_table(("JOB", "STATE"), [["abc123", "running"], ["d", None]])
    assert text.splitlines() == ["JOB     STATE", "abc123  running", "d       -"]


def test_print_table_is_plain_off_a_terminal_and_rich_on_one() -> None:
    out = io.StringIO()
    print_table(("JOB", "STATE"), [["abc", "queued"]], stream=out)   # StringIO: no tty
    assert out.getvalue() == "JOB  STATE\nabc  queued\n"
    out = io.StringIO()
    print_table(("JOB", "STATE"), [["abc", "queued"]], stream=out, terminal=True)
    drawn = out.getvalue()
    assert "abc" in drawn and "queued" in drawn and "\x1b[" in drawn   # styled
    assert any(c in drawn for c in "┃│┏━")                              # and boxed


def test_job_rows_show_queue_position_and_progress() -> None:
    rows = jobs_cmds.job_rows([
        {"job": "j1", "direction": "outbound", "vm": "web", "peer": "b", "state": "running",
         "phase": "precopy", "started_at": None,
         "progress": {"event": "progress", "phase": "precopy", "round": 2,
                      "throughput_bps": 2048}},
        {"job": "j2", "direction": "outbound", "vm": "db", "peer": "b", "state": "queued",
         "phase": "queued", "position": 1, "started_at": None}])
    assert rows[0][6].startswith("round 2") and "2.0 KiB/s" in rows[0][6]
    assert rows[1][4:7] == ["queued", "queued", "position 1"]


def test_progress_view_plain_lines_are_rate_limited_but_phase_changes_show() -> None:
    out = io.StringIO()
    with ProgressView(out, terminal=False) as view:
        for phase in ("precopy", "precopy", "precopy", "switchover"):
            view.update({"event": "progress", "phase": phase, "round": 1})
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["precopy", "switchover"]


def test_progress_view_on_a_terminal_draws_a_bar() -> None:
    out = io.StringIO()
    with ProgressView(out, terminal=True) as view:
        view.update({"event": "queued", "position": 1, "running": 1, "limit": 1})
        view.update({"event": "progress", "phase": "precopy", "round": 3, "pages_sent": 256,
                     "remaining_bytes": 1 << 20, "throughput_bps": 1 << 20, "eta_s": 1.5})
    assert "precopy" in out.getvalue() or "\x1b[" in out.getvalue()


def test_bar_figures_and_queued_line() -> None:
    assert bar_figures({"pages_sent": 2}) == (8192, None)
    assert bar_figures({"pages_sent": 2, "remaining_bytes": 8192}) == (8192, 16384)
    assert progress_line({"event": "queued", "position": 2, "running": 1, "limit": 1}) \
        .split() == ["queued", "position", "2", "(1", "of", "1", "running)"]


def test_history_keeps_the_newest_and_survives_a_reload(tmp_path: Path) -> None:
    history = History(tmp_path, limit=3)
    for n in range(5):
        history.append({"job": f"job{n}", "status": "completed"})
    assert [e["job"] for e in history.newest()] == ["job4", "job3", "job2"]
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 3      # the file itself is bounded, not only the view
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"job": "torn')          # a killed agent's last, half-written line
    again = History(tmp_path, limit=3)
    assert [e["job"] for e in again.newest(2)] == ["job4", "job3"]
    assert again.find("job2") == {"job": "job2", "status": "completed"}
    assert again.find("nothing") is None


def test_history_finds_by_unique_prefix(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.append({"job": "abc111"})
    history.append({"job": "abc222"})
    assert history.find("abc2") == {"job": "abc222"}
    with pytest.raises(UserError, match="ambiguous"):
        history.find("abc")


def _record(job_id: str) -> JobRecord:
    return JobRecord(job_id=job_id, direction="outbound", vm="vm", peer="b")


def test_limiter_queues_in_order_and_tells_positions() -> None:
    async def scenario() -> None:
        limiter = Limiter(1)
        first, second, third = _record("1"), _record("2"), _record("3")
        assert limiter.enter(first).done()
        told = second.listen()
        waiting2, waiting3 = limiter.enter(second), limiter.enter(third)
        assert not waiting2.done() and (second.position, third.position) == (1, 2)
        assert (await told.get())["position"] == 1
        assert [r.job_id for r in limiter.queued()] == ["2", "3"]
        limiter.leave("3")                       # dropped while queued (cancelled)
        assert waiting3.cancelled()
        limiter.leave("1")
        assert waiting2.done() and limiter.running == {"2"} and not limiter.queued()
    asyncio.run(scenario())


def test_follow_sends_events_then_returns_the_report() -> None:
    async def scenario() -> None:
        record = _record("j")
        sent: list[dict] = []

        async def send(event: dict) -> None:
            sent.append(event)

        follower = asyncio.create_task(follow(record, send, asyncio.Event()))
        await asyncio.sleep(0)
        record.publish({"event": "progress", "phase": "precopy"})
        record.finish({"event": "result", "status": "completed", "phase": "completed"})
        report = await follower
        assert report is not None and report["status"] == "completed"
        assert sent == [{"event": "progress", "phase": "precopy"}]
        assert record.state == "completed"
        # Following a finished job: its report at once.
        assert await follow(record, send, asyncio.Event()) == report
    asyncio.run(scenario())


def test_limits_in_agent_toml(tmp_path: Path) -> None:
    assert (load_config(tmp_path).max_outbound, load_config(tmp_path).max_inbound,
            load_config(tmp_path).history_limit) == (2, 2, 500)
    (tmp_path / "agent.toml").write_text("max_outbound = 1\nmax_inbound = 0\n"
                                         "history_limit = 50\n")
    config = load_config(tmp_path)
    assert (config.max_outbound, config.max_inbound, config.history_limit) == (1, 0, 50)
    for bad in ("max_outbound = 0", "max_inbound = -1", 'history_limit = "x"',
                "max_outbound = true"):
        (tmp_path / "agent.toml").write_text(bad + "\n")
        with pytest.raises(UserError, match="whole number"):
            load_config(tmp_path)


def test_cli_parses_the_new_verbs() -> None:
    from agent.cli import build_parser
    parser = build_parser()
    args = parser.parse_args(["job", "abc", "--follow", "--json"])
    assert (args.id, args.follow, args.json) == ("abc", True, True)
    assert parser.parse_args(["history", "--limit", "5"]).limit == 5
    args = parser.parse_args(["migrate", "web", "--to", "b", "--detach"])
    assert args.detach
    json.dumps(vars(parser.parse_args(["status", "--json"])), default=str)
