"""How the CLI draws listings and live progress: `rich` tables and a progress bar on a
terminal, plain lines (aligned columns; one progress line at a time) when the output is a
pipe or a file."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from agent.commands.common import human_bytes

PAGE_SIZE = 4096
PLAIN_PROGRESS_EVERY_S = 2.0    # not a terminal: a progress line this often, or on a change


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def plain_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A header line and one line per row, columns aligned with two spaces between them
    (the last one not padded); None shows as "-"."""
    cells = [[str(c) for c in columns]] + [["-" if v is None else str(v) for v in row]
                                          for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     .rstrip() for line in cells)


def rich_table(columns: Sequence[str], rows: Sequence[Sequence[Any]],
               title: str | None = None) -> Any:
    from rich.table import Table
    table = Table(title=title, header_style="bold", title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    return table


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                title: str | None = None, stream: IO[str] | None = None,
                terminal: bool | None = None) -> None:
    """A table on a terminal, plain aligned lines otherwise."""
    out = stream or sys.stdout
    if terminal if terminal is not None else is_terminal(out):
        from rich.console import Console
        Console(file=out, force_terminal=True).print(rich_table(columns, rows, title))
    else:
        if title:
            out.write(title + "\n")
        out.write(plain_table(columns, rows) + "\n")
    out.flush()


def progress_line(event: dict[str, Any]) -> str:
    """One line of live progress (the plain form)."""
    if event.get("event") == "queued":
        return (f"{'queued':<13}  position {event.get('position')} "
                f"({event.get('running')} of {event.get('limit')} running)")
    if "bytes_total" in event:     # a job copying one known amount (a disk move)
        return (f"{event.get('phase', '?'):<13}  {human_bytes(event.get('bytes_done', 0))} of "
                f"{human_bytes(event['bytes_total'])}  "
                f"{human_bytes(event.get('throughput_bps', 0))}/s")
    parts = [f"{event.get('phase', '?'):<13}", f"round {event.get('round', 0)}"]
    if "pages_left" in event:
        parts.append(f"{event['pages_left']} pages left")
    if "dirty_pages_per_s" in event:
        parts.append(f"dirty {human_bytes(event['dirty_pages_per_s'] * PAGE_SIZE)}/s")
    parts.append(f"{human_bytes(event.get('throughput_bps', 0))}/s")
    if "eta_s" in event:
        parts.append(f"ETA {event['eta_s']:.1f} s")
    if event.get("throttle"):
        parts.append(f"throttled {event['throttle']:.0%}")
    return "  ".join(parts)


def bar_figures(event: dict[str, Any]) -> tuple[int, int | None]:
    """(bytes done, bytes done + remaining) of a progress event: pages sent so far against
    those plus what QEMU says is left (None until it says); a disk move's bytes copied of
    the disk's."""
    if "bytes_total" in event:
        return int(event.get("bytes_done", 0)), int(event["bytes_total"]) or None
    done = int(event.get("pages_sent", 0)) * PAGE_SIZE
    if "remaining_bytes" not in event:
        return done, None
    return done, done + int(event["remaining_bytes"])


class ProgressView:
    """Live progress of one job: a rich bar on a terminal (bytes done of done + remaining,
    rate, ETA, phase, iteration); else the plain line, every PLAIN_PROGRESS_EVERY_S or
    when the phase changes."""

    def __init__(self, stream: IO[str] | None = None, *, terminal: bool | None = None,
                 enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.terminal = is_terminal(self.stream) if terminal is None else terminal
        self._progress: Any = None
        self._task: Any = None
        self._last_plain = 0.0
        self._last_phase: str | None = None

    def __enter__(self) -> ProgressView:
        if self.enabled and self.terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
            self._progress = Progress(
                TextColumn("[bold]{task.fields[phase]:<13}"), BarColumn(),
                DownloadColumn(binary_units=True), TextColumn("{task.fields[rate]}"),
                TextColumn("ETA {task.fields[eta]}"), TextColumn("iter {task.fields[round]}"),
                TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                console=Console(file=self.stream, force_terminal=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task("migrate", total=None, phase="starting",
                                                 rate="", eta="-", round=0, note="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def update(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            if event.get("event") == "queued":
                self._progress.update(self._task, phase="queued",
                                      note=f"position {event.get('position')}")
                return
            done, total = bar_figures(event)
            eta = event.get("eta_s")
            note = f"throttled {event['throttle']:.0%}" if event.get("throttle") else ""
            self._progress.update(
                self._task, completed=done, total=total, phase=event.get("phase", "?"),
                rate=f"{human_bytes(event.get('throughput_bps', 0))}/s",
                eta=f"{eta:.1f} s" if eta is not None else "-",
                round=event.get("round", 0), note=note)
            return
        now = time.monotonic()
        phase = str(event.get("phase"))
        if phase == self._last_phase and now - self._last_plain < PLAIN_PROGRESS_EVERY_S:
            return
        self._last_phase, self._last_plain = phase, now
        self.stream.write(progress_line(event) + "\n")
        self.stream.flush()


def ago(seconds: float | None, now: float | None = None) -> str:
    """"12 s ago" style ages of wall-clock times."""
    if seconds is None:
        return "-"
    delta = max(0.0, (now or time.time()) - seconds)
    if delta < 120:
        return f"{delta:.0f} s ago"
    if delta < 7200:
        return f"{delta / 60:.0f} min ago"
    if delta < 172800:
        return f"{delta / 3600:.0f} h ago"
    return f"{delta / 86400:.0f} d ago"


def when(seconds: float | None) -> str:
    """A wall-clock time as local YYYY-MM-DD HH:MM:SS."""
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
