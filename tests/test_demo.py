"""`make demo` at small scale: a real migration between two agents, reported and verified."""

from __future__ import annotations

import pytest

from agent import demo


@pytest.mark.qemu
def test_demo_migrates_the_guest(capfd):
    lines: list[str] = []
    status = demo.run(demo.parse_args(["--ram-mib", "128", "--fill-mib", "16",
                                       "--rate", "2000", "--disk-mib", "64"]),
                      out=lines.append)
    printed = capfd.readouterr().out
    text = "\n".join(lines)
    assert status == 0, f"{text}\n{printed}"
    assert "migration completed: demo -> hostb" in printed
    assert "downtime:" in printed
    assert ", 0 corrupted pages" in text
    assert "has quit" in text
    assert "disk:" in printed and "equals the original" in text
