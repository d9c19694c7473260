"""The README's first command: ``python -m funcpeft demo`` trains, saves, reloads and serves adapters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import funcpeft as fp
from funcpeft.__main__ import main


def test_demo_trains_saves_reloads_and_serves(tmp_path: Path, capsys) -> None:
    out = tmp_path / "adapters"
    assert main(["demo", "--steps", "60", "--adapters", "2", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "successor" in report and "mirror" in report and "base model" in report
    assert "served one mixed batch with the reloaded adapters" in report
    # every trained adapter is a PEFT-format folder that loads back
    for task in ("successor", "mirror"):
        params, config = fp.load(out / task)
        assert isinstance(config, fp.LoraConfig) and config.r == 8
        assert all(t.shape[0] == 8 or t.shape[1] == 8 for e in params.values() for t in e.values())
    # the adapters learned their tasks: the table's adapter column beats the base column
    rows = [line.split() for line in report.splitlines() if line.strip().startswith(("0 successor", "1 mirror"))]
    for row in rows:
        base, tuned = (float(v.rstrip("%")) for v in row[-2:])
        assert tuned > base + 30, row


def test_demo_help_explains_the_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "funcpeft", "demo", "--help"], capture_output=True, text=True, check=True, timeout=120
    )
    for option in ("--steps", "--adapters", "--out"):
        assert option in result.stdout
