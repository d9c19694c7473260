"""The demo's progress bar: tqdm's when tqdm is importable, the plain text bar when it is not (tqdm is optional)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from funcpeft.__main__ import main
from funcpeft.demo import _Progress


def test_the_bar_is_tqdm_s_when_tqdm_is_installed(capsys) -> None:
    tqdm = pytest.importorskip("tqdm")
    with _Progress(20) as progress:
        assert isinstance(progress.bar, tqdm.tqdm)
        progress.update(10, 1.25)
        progress.update(20, 0.5)
    err = capsys.readouterr().err
    assert "training" in err and "20/20" in err and "loss=0.500" in err
    assert "steps  loss" not in err  # not the plain bar's format
    assert progress.bar.n == 20


def test_without_tqdm_the_plain_bar_is_printed(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    with _Progress(20) as progress:
        assert progress.bar is None
        progress.update(10, 1.25)
        progress.update(20, 0.5)
    err = capsys.readouterr().err
    assert f"[{'#' * 15}{'.' * 15}] 10/20 steps  loss 1.250" in err
    assert f"[{'#' * 30}] 20/20 steps  loss 0.500" in err and err.endswith("\n")


def test_the_demo_runs_without_tqdm(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["demo", "--steps", "10", "--adapters", "1", "--out", str(tmp_path / "adapters")]) == 0
    captured = capsys.readouterr()
    assert "10/10 steps" in captured.err and "(fwd.generate" in captured.out
