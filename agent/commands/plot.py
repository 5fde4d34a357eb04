"""`ferry report ID --png FILE`: a job's timeline drawn with matplotlib (the optional
extra `ferry[plots]`), from the report's `timeline` (agent.migration.timeline).

Four panels on one time axis (seconds since the job began): wire throughput with the
bytes QEMU still had to send, QEMU's dirty rate, the guest's vCPU pace (at the source
before the switchover, at the destination after the resume), and the CPU the agents and
QEMUs used. The downtime window (source STOP to destination RESUME) is shaded on each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.errors import UserError

WIDTH_PX, HEIGHT_PX, DPI = 1200, 800, 100
MIB = 1 << 20
PLOTS_EXTRA = "pip install 'ferry[plots]'"
# A rate sample covers the interval before its time: drawn as a step ending there.
STEPS = "steps-pre"


def _columns(part: dict[str, Any] | None) -> dict[str, list[Any]]:
    """{field: values} of a timeline part ({"fields", "samples"})."""
    if not isinstance(part, dict):
        return {}
    fields = part.get("fields") or []
    rows = [r for r in part.get("samples") or [] if isinstance(r, list) and len(r) == len(fields)]
    return {name: [row[i] for row in rows] for i, name in enumerate(fields)}


def _scaled(values: list[Any], unit: float) -> list[float]:
    """Values divided by unit, None (not measured) as NaN: a gap in the line."""
    return [v / unit if isinstance(v, (int, float)) else float("nan") for v in values]


def _step_start(times: list[Any], interval_s: float) -> list[Any]:
    """Times with the first sample's interval start put before them: a rate sample covers
    the interval before its time, so the first one is drawn from there."""
    if not times or not isinstance(times[0], (int, float)):
        return times
    return [max(0.0, times[0] - interval_s), *times]


def draw_timeline(report: dict[str, Any], path: Path) -> None:
    """Draw report's timeline into a PNG of WIDTH_PX x HEIGHT_PX at path."""
    timeline = report.get("timeline")
    if not isinstance(timeline, dict) or not timeline.get("samples"):
        raise UserError(f"the report of job {report.get('job')} has no timeline to draw "
                        f"(an incoming job's report, or one from an agent before timelines)")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"drawing a timeline needs matplotlib: {PLOTS_EXTRA}") from None
    src = _columns(timeline)
    dst = _columns(timeline.get("destination"))
    interval = float(timeline.get("interval_s") or 1.0)
    t0, dt0 = src.get("t", []), dst.get("t", [])
    # Rates are drawn as steps back to each interval's start: the first value twice.
    t, dt = _step_start(t0, interval), _step_start(dt0, 1.0)
    levels = src   # remaining bytes: a level at each sample's time, drawn as a line
    src = {k: v[:1] + v for k, v in src.items()}
    dst = {k: v[:1] + v for k, v in dst.items()}
    fig = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI)
    axes = fig.subplots(4, 1, sharex=True)
    fig.suptitle(f"ferry job {report.get('job')}: {report.get('vm')} -> {report.get('peer')} "
                 f"({report.get('status')}, downtime {report.get('downtime_ms')} ms)")

    wire, remaining = axes[0], axes[0].twinx()
    wire.plot(t, _scaled(src.get("wire_bps", []), MIB), color="tab:blue", label="wire",
              drawstyle=STEPS)
    wire.set_ylabel("wire MiB/s")
    remaining.plot(t0, _scaled(levels.get("remaining_bytes", []), MIB), color="tab:orange",
                   label="remaining")
    remaining.set_ylabel("remaining MiB")
    handles = wire.get_legend_handles_labels()[0] + remaining.get_legend_handles_labels()[0]
    wire.legend(handles=handles, loc="upper right", fontsize="small")

    axes[1].plot(t, _scaled(src.get("dirty_bps", []), MIB), color="tab:red", drawstyle=STEPS)
    axes[1].set_ylabel("dirty MiB/s")
    if not any(v is not None for v in src.get("dirty_bps", [])):
        # A short job may end before QEMU measures: an empty panel is not a rate of 0.
        axes[1].text(0.5, 0.5, "not measured (QEMU measures from its second dirty-log sync)",
                     transform=axes[1].transAxes, ha="center", va="center",
                     fontsize="small", color="gray")

    pace = axes[2]
    pace.plot(t, _scaled(src.get("vcpu_pace", []), 1), color="tab:green", label="source",
              drawstyle=STEPS)
    pace.plot(dt, _scaled(dst.get("vcpu_pace", []), 1), color="tab:purple",
              label="destination", drawstyle=STEPS)
    pace.set_ylabel("vCPU-s/s")
    pace.legend(loc="upper right", fontsize="small")

    cpu = axes[3]
    for label, part, times, name in (("source agent", src, t, "agent_cpu"),
                                     ("source QEMU", src, t, "qemu_cpu"),
                                     ("destination agent", dst, dt, "agent_cpu"),
                                     ("destination QEMU", dst, dt, "qemu_cpu")):
        if times:
            cpu.plot(times, _scaled(part.get(name, []), 1), label=label, drawstyle=STEPS)
    cpu.set_ylabel("CPU-s/s")
    cpu.set_xlabel("seconds since the job began")
    cpu.legend(loc="upper right", fontsize="small", ncol=2)

    for ax in (*axes, remaining):
        ax.set_ylim(bottom=0)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    marks = timeline.get("marks") or {}
    stop, resume = marks.get("stop_s"), marks.get("resume_s")
    if isinstance(stop, (int, float)) and isinstance(resume, (int, float)):
        for ax in axes:
            # A downtime of milliseconds would not show as a span: at least a hairline.
            ax.axvspan(stop, max(resume, stop + 0.02), color="grey", alpha=0.35, lw=0)
        # Above the frame: inside it the legends (upper right, where the stop is) cover it.
        axes[0].annotate("downtime", (stop, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(0, 3), textcoords="offset points", fontsize="small",
                         ha="center", va="bottom")
    health = report.get("health") or {}
    if health.get("verdict"):
        why = f" ({health['reason']})" if health.get("reason") else ""   # unknown, idle
        axes[2].set_title(f"guest pace after the resume: {health['verdict']}{why}",
                          fontsize="small", loc="left")
    fig.savefig(path, format="png", dpi=DPI)
