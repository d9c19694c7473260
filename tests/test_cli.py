"""``funcpeft inspect``: the facts it reports about folders written by funcpeft and by PEFT, checked against the
tensors in the file and against PEFT's own model; and its one-line errors with exit status 2."""

from __future__ import annotations

import builtins
import json
import math
import os
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from safetensors.torch import load_file

import funcpeft as fp
from funcpeft.__main__ import main
from tests._models import oracle, tiny_gpt2

peft = oracle("peft")

# PEFT's save_pretrained calls a transformers method that transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

REPO = Path(__file__).resolve().parents[1]


def _inspect_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["inspect", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return json.loads(out)


@pytest.fixture(scope="module")
def funcpeft_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """GPT-2, all-linear rsLoRA r=8 alpha 16, trainable biases of the adapted layers, saved in bfloat16."""
    path = tmp_path_factory.mktemp("funcpeft_adapter")
    config = fp.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear", bias="lora_only")
    params, fwd = fp.adapt(tiny_gpt2(n_layer=3), config, generator=torch.Generator().manual_seed(0))
    fp.save(path, optree.tree_map(lambda t: t.to(torch.bfloat16), params), config)
    return path, list(fwd.targets)


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """GPT-2 adapted by PEFT with a rank and an alpha pattern and a modules_to_save, via ``save_pretrained``."""
    path = tmp_path_factory.mktemp("peft_adapter")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc"],
        rank_pattern={"h.1.attn.c_attn": 2},
        alpha_pattern={"c_fc": 16},
        modules_to_save=["ln_f"],
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(tiny_gpt2(n_layer=3), config)
    model.save_pretrained(path)
    return path, model


def test_funcpeft_folder(funcpeft_folder: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    path, targets = funcpeft_folder
    facts = _inspect_json(path, capsys)
    tensors = load_file(path / "adapter_model.safetensors")
    lora = {k: t for k, t in tensors.items() if ".lora_" in k}
    biases = {k: t for k, t in tensors.items() if k.endswith(".base_layer.bias")}
    assert len(lora) + len(biases) == len(tensors)  # the split below covers the file

    assert facts["peft_type"] == "LORA"
    assert facts["task_type"] is None
    assert facts["targets"] == targets  # layer order, as adapt found them
    assert len(targets) == 12
    assert facts["target_modules"] == sorted(targets)  # PEFT records the resolved paths for "all-linear"
    assert facts["ranks"] == dict.fromkeys(targets, 8)
    assert facts["lora_alpha"] == 16 and facts["use_rslora"] is True
    assert facts["scaling"] == pytest.approx(dict.fromkeys(targets, 16 / math.sqrt(8)))
    assert (facts["use_dora"], facts["lora_bias"], facts["bias"]) == (False, False, "lora_only")
    assert facts["parameters"] == {
        "total": sum(t.numel() for t in tensors.values()),
        "adapter": sum(t.numel() for t in lora.values()),
        "full_copies": sum(t.numel() for t in biases.values()),
    }
    assert facts["full_copies"] == {p: ["bias"] for p in targets}
    assert facts["dtypes"] == {"bfloat16": len(tensors)}
    assert facts["files"]["weights"]["bytes"] == (path / "adapter_model.safetensors").stat().st_size
    assert facts["files"]["config"]["bytes"] == (path / "adapter_config.json").stat().st_size
    assert facts["warnings"] == []

    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "r=8 (all 12 modules)" in text
    assert f"scaling={16 / math.sqrt(8):.6g} (all 12 modules)" in text
    assert "transformer.h.{0-2}.attn.c_attn" in text
    assert "bfloat16 (36 tensors)" in text


def test_peft_folder_matches_peft_model(peft_folder: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    path, model = peft_folder
    facts = _inspect_json(path, capsys)
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert facts["targets"] == list(layers)
    assert facts["ranks"] == {p: m.r["default"] for p, m in layers.items()}
    assert facts["scaling"] == pytest.approx({p: m.scaling["default"] for p, m in layers.items()})
    assert sorted(set(facts["ranks"].values())) == [2, 4]  # the pattern is visible
    assert sorted(set(facts["scaling"].values())) == [2.0, 4.0]
    assert facts["rank_pattern"] == {"h.1.attn.c_attn": 2}
    assert facts["alpha_pattern"] == {"c_fc": 16}
    assert sorted(facts["target_modules"]) == ["c_attn", "c_fc"]
    assert facts["task_type"] == "CAUSAL_LM"
    assert facts["modules_to_save"] == ["ln_f"]
    trainable, _ = model.get_nb_trainable_parameters()
    assert facts["parameters"]["total"] == trainable
    ln_f_copy = model.base_model.model.transformer.ln_f.modules_to_save["default"]
    assert facts["parameters"]["full_copies"] == sum(p.numel() for p in ln_f_copy.parameters())
    assert facts["full_copies"] == {"transformer.ln_f": ["bias", "weight"]}
    assert facts["dtypes"] == {"float32": len(load_file(path / "adapter_model.safetensors"))}

    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "r=2 (1 module): transformer.h.1.attn.c_attn" in text
    assert "task_type" in text and "CAUSAL_LM" in text


def test_config_rank_that_disagrees_with_the_tensors_is_flagged(
    funcpeft_folder: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, targets = funcpeft_folder
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["rank_pattern"] = {"h.0.attn.c_attn": 4}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    facts = _inspect_json(tmp_path, capsys)
    assert facts["ranks"]["transformer.h.0.attn.c_attn"] == 8  # read from the tensors
    assert len(facts["warnings"]) == 1 and "transformer.h.0.attn.c_attn" in facts["warnings"][0]


def test_python_dash_m(funcpeft_folder: tuple[Path, list[str]]) -> None:
    path, targets = funcpeft_folder
    run = subprocess.run(
        [sys.executable, "-m", "funcpeft", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["targets"] == targets


def test_python_dash_m_error_is_one_line(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "funcpeft", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("funcpeft inspect: error: ")
    assert "missing" in run.stderr and "does not exist" in run.stderr


def _truncate(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _unknown_type(folder: Path) -> None:
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "BOFT"}))


@pytest.mark.parametrize(
    ("start_from_adapter", "break_it", "expected"),
    [
        (False, lambda folder: folder.rmdir(), "does not exist"),
        (False, lambda folder: None, "has no adapter_config.json"),
        (True, _truncate, "truncated"),
        (True, _unknown_type, "'BOFT' is not supported"),
        (True, lambda folder: (folder / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
    ],
    ids=["missing-folder", "empty-folder", "truncated-weights", "unknown-peft_type", "no-weights"],
)
def test_errors_are_one_line_with_status_2(
    funcpeft_folder: tuple[Path, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    start_from_adapter: bool,
    break_it: Callable[[Path], object],
    expected: str,
) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    if start_from_adapter:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            (folder / name).write_bytes((funcpeft_folder[0] / name).read_bytes())
    break_it(folder)
    assert main(["inspect", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("funcpeft inspect: error: ") and err.count("\n") == 1
    assert expected in err
    assert str(folder) in err


def test_help_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--help"]) == 0
    assert "--json" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out
    assert main([]) == 2  # a subcommand is required
    assert "COMMAND" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# never a traceback: odd tensors, bad configs, unsafe or odd files -> one line, exit 2, nothing else on stderr
# --------------------------------------------------------------------------------------------------------------


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor], str], None]) -> None:
    from safetensors.torch import save_file

    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    edit(state, next(k for k in sorted(state) if k.endswith("lora_A.weight")))
    save_file(state, weights)


def _edit_config(folder: Path, **changes: Any) -> None:
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))


def _as_bin(folder: Path, write: Callable[[dict[str, torch.Tensor], Path], None]) -> None:
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    weights.unlink()
    write(state, folder / "adapter_model.bin")


def _zero_rank(state: dict[str, torch.Tensor], key: str) -> None:
    state[key] = state[key][:0]
    b_key = key.replace("lora_A", "lora_B")
    state[b_key] = state[b_key][:, :0]


BROKEN = [
    ("scalar-tensor", lambda f: _edit_tensors(f, lambda s, k: s.__setitem__(k, torch.tensor(1.0))), "shape ()"),
    ("1-d-tensor", lambda f: _edit_tensors(f, lambda s, k: s.__setitem__(k, s[k][0])), "at least 2-D"),
    ("rank-0-tensors", lambda f: _edit_tensors(f, _zero_rank), "rank-0"),
    ("regex-rank_pattern", lambda f: _edit_config(f, rank_pattern={"h.(1": 2}), "`rank_pattern` key 'h.(1'"),
    ("regex-target_modules", lambda f: _edit_config(f, target_modules="h.[0-9"), "`target_modules` 'h.[0-9'"),
    ("regex-exclude_modules", lambda f: _edit_config(f, exclude_modules="*"), "`exclude_modules` '*'"),
    ("nan-lora_alpha", lambda f: _edit_config(f, lora_alpha=math.nan), "`lora_alpha` must be a finite number"),
    ("bad-task_type", lambda f: _edit_config(f, task_type="causal"), "`task_type`"),
    ("string-r", lambda f: _edit_config(f, r="8"), "`r` must be a positive integer"),
    ("pickle-protocol-4", lambda f: _as_bin(f, lambda s, p: p.write_bytes(pickle.dumps(s, protocol=4))), "safely"),
    (
        "torch-save-protocol-4",
        lambda f: _as_bin(f, lambda s, p: torch.save(s, p, pickle_protocol=4, _use_new_zipfile_serialization=False)),
        "safely",
    ),
    ("directory-weights", lambda f: _replace_with_dir(f / "adapter_model.safetensors"), "is a directory"),
    ("directory-config", lambda f: _replace_with_dir(f / "adapter_config.json"), "is a directory"),
    ("empty-weights", lambda f: (f / "adapter_model.safetensors").write_bytes(b""), "truncated"),
    ("empty-config", lambda f: (f / "adapter_config.json").write_bytes(b""), "not valid JSON"),
]


def _replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _copy_adapter(source: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    return folder


def _one_error_line(folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["inspect", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("funcpeft inspect: error: ") and err.count("\n") == 1, err
    assert [str(w.message) for w in caught] == []  # nothing escapes as a warning either
    return err


@pytest.mark.parametrize(("break_it", "expected"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_adapters_are_one_line_never_a_traceback(
    funcpeft_folder: tuple[Path, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    break_it: Callable[[Path], object],
    expected: str,
) -> None:
    folder = _copy_adapter(funcpeft_folder[0], tmp_path / "adapter")
    break_it(folder)
    err = _one_error_line(folder, capsys)
    assert expected in err and str(folder) in err, err


def test_permission_denied_is_one_line(
    funcpeft_folder: tuple[Path, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = _copy_adapter(funcpeft_folder[0], tmp_path / "adapter")
    config = folder / "adapter_config.json"
    config.chmod(0)
    if os.geteuid() == 0:  # chmod does not stop root (CI containers): raise what opening an unreadable file raises

        def refusing(real_open: Callable[..., Any]) -> Callable[..., Any]:
            def opener(file: Any, *args: Any, **kwargs: Any) -> Any:
                if isinstance(file, (str, os.PathLike)) and Path(os.fspath(file)) == config:
                    raise PermissionError(13, "Permission denied", str(file))
                return real_open(file, *args, **kwargs)

            return opener

        monkeypatch.setattr(builtins, "open", refusing(builtins.open))
        monkeypatch.setattr(Path, "open", refusing(Path.open))
    try:
        assert "Permission denied" in _one_error_line(folder, capsys)
    finally:
        config.chmod(0o644)


def test_an_unforeseen_error_is_one_line(
    funcpeft_folder: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import funcpeft._describe as describing

    def boom(*args: Any, **kwargs: Any) -> None:
        raise KeyError("surprise\nsecond line")

    monkeypatch.setattr(describing, "from_peft_state_dict", boom)
    err = _one_error_line(funcpeft_folder[0], capsys)
    assert "unexpected KeyError" in err and "surprise" in err


def test_protocol_4_pickle_stderr_is_exactly_one_line(funcpeft_folder: tuple[Path, list[str]], tmp_path: Path) -> None:
    # in a real process torch's "Detected pickle protocol 4" UserWarning would be printed: it must not be
    folder = _copy_adapter(funcpeft_folder[0], tmp_path / "adapter")
    _as_bin(folder, lambda s, p: p.write_bytes(pickle.dumps(s, protocol=4)))
    run = subprocess.run(
        [sys.executable, "-m", "funcpeft", "inspect", str(folder)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("funcpeft inspect: error: "), run.stderr


# --------------------------------------------------------------------------------------------------------------
# AdaLoRA: per-module ranks from the rank_pattern masks (else the tensors), checked against PEFT's loaded model
# --------------------------------------------------------------------------------------------------------------

ADALORA_WARNINGS = (
    "ignore:fan_in_fan_out is set to False but the target module is `Conv1D`",  # PEFT fixes it up for GPT-2
    "ignore:The following rank_pattern keys did not match",  # PEFT also reads AdaLoRA's masks as LoRA patterns
    "ignore:Adapter 'default'.*invalid shape",  # PEFT suspects unsharded ZeRO-3 in a module pruned to rank 0
)
ADALORA = {"init_r": 4, "target_r": 2, "total_step": 10, "target_modules": ["c_attn", "c_fc"], "lora_alpha": 3}


@pytest.fixture(scope="module")
def peft_adalora_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[bool]]]:
    """GPT-2 AdaLoRA pruned by masks as PEFT's allocator leaves them (one module to rank 0, one to 2, one kept at
    4, the rest without a mask), saved by PEFT's ``save_pretrained`` (which cuts the tensors to the masks)."""
    path = tmp_path_factory.mktemp("peft_adalora")
    model = peft.get_peft_model(tiny_gpt2(n_layer=3), peft.AdaLoraConfig(**ADALORA, init_lora_weights=False))
    paths = [n.removesuffix(".lora_E.default") for n, _ in model.base_model.model.named_parameters()
             if n.endswith(".lora_E.default")]  # fmt: skip
    shapes = [[False] * 4, [True, False, False, True], [True] * 4]
    masks = {f"{p}.lora_E": m for p, m in zip(paths, shapes, strict=False)}
    model.peft_config["default"].rank_pattern = {f"{k}.default": m for k, m in masks.items()}
    model.save_pretrained(path)
    return path, masks


@pytest.mark.filterwarnings(*ADALORA_WARNINGS)
def test_adalora_ranks_from_rank_pattern_match_peft(
    peft_adalora_folder: tuple[Path, dict[str, list[bool]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, masks = peft_adalora_folder
    facts = _inspect_json(path, capsys)
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(n_layer=3), path)  # PEFT resizes its modules to the masks
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in loaded.named_modules()
        if isinstance(module, peft.tuners.adalora.AdaLoraLayer)
    }
    assert facts["peft_type"] == "ADALORA"
    assert facts["targets"] == list(layers) and len(layers) == 6
    assert facts["ranks"] == {p: m.lora_E["default"].shape[0] for p, m in layers.items()}
    assert sorted(facts["ranks"].values()) == [0, 2, 4, 4, 4, 4]  # the masks are visible, a pruned-away module too
    masked = {k.removesuffix(".lora_E") for k in masks}
    assert facts["rank_source"] == {p: "rank_pattern" if p in masked else "tensors" for p in layers}
    assert (facts["init_r"], facts["target_r"]) == (4, 2)
    assert facts["budget"] == {"kept": 18, "initial": 24, "target": 12}
    assert facts["scaling"] == pytest.approx(dict.fromkeys(layers, 3 / 4), rel=1e-4)  # lora_alpha / init_r
    assert facts["warnings"] == []
    stored = load_file(path / "adapter_model.safetensors")
    assert facts["parameters"]["adapter"] == sum(t.numel() for t in stored.values())

    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    first, second = (k.removesuffix(".lora_E") for k in list(masks)[:2])
    assert f"r=0 (1 module): {first}" in text
    assert f"r=2 (1 module): {second}" in text
    assert "r=4 (4 modules)" in text
    assert "from rank_pattern for 3 modules, the tensors for the others" in text
    assert "init_r=4, target_r=2; 18 of 24 triplets kept, target budget 12" in text


def test_adalora_without_rank_pattern_reads_the_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = fp.AdaLoraConfig(**ADALORA)
    params, fwd = fp.adapt(tiny_gpt2(n_layer=2), config, generator=torch.Generator().manual_seed(0))
    fp.save(tmp_path, params, config)
    facts = _inspect_json(tmp_path, capsys)
    assert facts["ranks"] == dict.fromkeys(fwd.targets, 4)
    assert set(facts["rank_source"].values()) == {"tensors"}
    assert facts["warnings"] == []
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "r=4 (all 4 modules)" in text and "from the tensors: no rank_pattern, not pruned yet" in text


def test_adalora_funcpeft_pruned_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full, fwd = fp.adapt(tiny_gpt2(n_layer=2), fp.AdaLoraConfig(**ADALORA), generator=torch.Generator().manual_seed(0))
    masks = {f"{p}.lora_E": [i <= j for i in range(4)] for j, p in enumerate(fwd.targets)}  # keeps 1, 2, 3, 4
    fp.save(tmp_path, full, fp.AdaLoraConfig(**ADALORA, rank_pattern=masks))  # writes the cut tensors
    facts = _inspect_json(tmp_path, capsys)
    assert facts["ranks"] == {p: j + 1 for j, p in enumerate(fwd.targets)}
    assert set(facts["rank_source"].values()) == {"rank_pattern"}
    assert facts["budget"]["kept"] == 10 and facts["warnings"] == []
    assert main(["inspect", str(tmp_path)]) == 0
    assert "(ranks from rank_pattern; init_r=4, target_r=2; 10 of 16 triplets kept, target budget 8)" in (
        capsys.readouterr().out
    )


def test_adalora_rank_pattern_that_disagrees_with_the_tensors_is_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = fp.AdaLoraConfig(**ADALORA)
    params, fwd = fp.adapt(tiny_gpt2(n_layer=2), config, generator=torch.Generator().manual_seed(0))
    fp.save(tmp_path, params, config)
    first = fwd.targets[0]
    _edit_config(tmp_path, rank_pattern={f"{first}.lora_E": [True, False, False, False], "nowhere.lora_E": [True] * 4})
    facts = _inspect_json(tmp_path, capsys)
    assert facts["ranks"][first] == 1  # the mask says what PEFT and fwd would build
    assert len(facts["warnings"]) == 2
    assert first in facts["warnings"][0] and "keeps 1 of 4" in facts["warnings"][0] and "rank 4" in facts["warnings"][0]
    assert "'nowhere.lora_E'" in facts["warnings"][1]


def test_adalora_broken_tensors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = fp.AdaLoraConfig(**ADALORA)
    params, _ = fp.adapt(tiny_gpt2(n_layer=1), config, generator=torch.Generator().manual_seed(0))
    fp.save(tmp_path, params, config)
    from safetensors.torch import save_file

    state = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in sorted(state) if k.endswith(".lora_E"))
    state[key] = state[key][:2]  # E no longer fits A and B
    save_file(state, tmp_path / "adapter_model.safetensors")
    err = _one_error_line(tmp_path, capsys)
    assert "lora_E (2, 1)" in err and "do not fit lora_A" in err and str(tmp_path) in err
