"""The README's first command: ``python -m funcpeft demo`` trains, saves, reloads and serves adapters."""

from __future__ import annotations

import re
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
    assert "in one mixed batch with the reloaded adapters (fwd.generate" in report
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
    # it ends by generating: one row per adapter, then the base row, each "prompt -> continuation  rule k/n ..."
    generated = report[report.index("(fwd.generate") :].splitlines()
    rows = {line.split()[0]: line for line in generated if line.startswith("  ") and "->" in line}
    assert list(rows) == ["successor", "mirror", "base"], generated
    assert generated[-1].lstrip().startswith("base model"), "generation is the demo's last step"
    follows = {label: dict(re.findall(r"(\w+) (\d+)/8", line.split("->")[1])) for label, line in rows.items()}
    assert all(len(line.split("->")[1].split()[:8]) == 8 for line in rows.values()), rows
    for task in ("successor", "mirror"):
        # each adapter's continuation follows its task's rule more often than the base model's does
        assert int(follows[task][task]) > int(follows["base"][task]), (task, rows)
    assert int(follows["successor"]["successor"]) >= 6, rows  # 60 steps suffice: ~100% per-token accuracy


def test_tinylm_generates_greedily_within_its_positions() -> None:
    import pytest
    import torch

    from funcpeft.demo import SEQ, TinyLM

    model = TinyLM().eval()
    prompts = torch.randint(0, 16, (3, 4), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompts, max_new_tokens=SEQ - 4)
    assert out.shape == (3, SEQ) and torch.equal(out[:, :4], prompts)
    for p in range(4, SEQ):  # each new token is the argmax of the model's logits on its prefix
        assert torch.equal(out[:, p], model(out[:, :p])[:, -1].argmax(-1))
    with pytest.raises(ValueError, match="at most 12 positions"):
        model.generate(prompts, max_new_tokens=SEQ - 3)


def test_demo_help_explains_the_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "funcpeft", "demo", "--help"], capture_output=True, text=True, check=True, timeout=120
    )
    for option in ("--steps", "--adapters", "--out"):
        assert option in result.stdout
