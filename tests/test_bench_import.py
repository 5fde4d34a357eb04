"""bench import: one small real run (two formats), its JSON and its table."""

from __future__ import annotations

import json
import os
import statistics

import pytest

from bench import importer as bi
from bench.disk import plan_layout, shares

MIB = 1 << 20


@pytest.mark.qemu
def test_bench_import_small_run(capsys: pytest.CaptureFixture[str]) -> None:
    before = set(os.listdir("/dev/shm"))
    assert shares(plan_layout(64 * MIB))["zero"] > 0    # the images hold zero runs
    code = bi.main(["--json", "--size-mib", "64", "--repeat", "2",
                    "--formats", "vmdk-streamOptimized,vpc-fixed"])
    captured = capsys.readouterr()
    assert captured.out, f"no result (exit {code}): {captured.err}"
    result = json.loads(captured.out)
    assert code == (0 if result["met"] else 1)
    rows = {row["format"]: row for row in result["formats"]}
    assert set(rows) == {"vmdk-streamOptimized", "vpc-fixed"}
    for row in rows.values():
        assert row["verified"] and row["data_bytes"] > MIB
        assert len(row["ferry_seconds"]) == len(row["qemu_img_seconds"]) == 2
        assert len(row["ferry_codec_seconds"]) == 2 and row["engine"] == "qemu"
        # Judged without the verification (convert does none); with it, apart.
        copy_s = statistics.median(f - v for f, v in zip(row["ferry_seconds"],
                                                          row["ferry_verify_seconds"],
                                                          strict=True))
        assert row["ratio"] == pytest.approx(
            statistics.median(row["qemu_img_seconds"]) / copy_s, abs=0.01)
        assert row["ratio_with_verify"] == pytest.approx(
            statistics.median(row["qemu_img_seconds"]) / statistics.median(row["ferry_seconds"]),
            abs=0.01)
        assert row["met"] == (row["ratio"] >= bi.TARGET_RATIO)
        # The zero runs written as data are read but never written into the target.
        assert row["written_bytes"] < row["data_bytes"] or not row["zero_runs_as_data"]
    assert rows["vpc-fixed"]["zero_runs_as_data"]
    assert set(os.listdir("/dev/shm")) <= before
    table = bi.readable(result)
    missed = [name for name, row in rows.items() if not row["met"]]
    assert ("every format met the target" in table) == (not missed)
    assert all(name in table.splitlines()[-1] for name in missed)
