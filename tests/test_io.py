"""Checkpoints in PEFT's format, both ways, for every LoRA option; safety and error behaviour; merging."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from _models import MLP, ConvNet, EmbNet, conv_inputs, oracle, tiny_gpt2, tiny_llama, token_ids
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

import funcpeft as fp

peft = oracle("peft")


def _out(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return x.logits if hasattr(x, "logits") else x[0]


def _perturb(params: fp.Params, seed: int = 1) -> fp.Params:
    g = torch.Generator().manual_seed(seed)
    return optree.tree_map(
        lambda t: (t.detach() + 0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype)).requires_grad_(), params
    )


def _ids(vocab: int) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0)),)


# (name, model factory, inputs, LoRA kwargs shared by funcpeft and PEFT)
CASES: list[tuple[str, Any, Any, dict[str, Any]]] = [
    ("linear", MLP, lambda: (torch.randn(3, 10),), {"target_modules": ["lin0", "lin1"]}),
    ("linear-dora-rslora", MLP, lambda: (torch.randn(3, 10),), {"target_modules": ["lin0", "lin1"], "use_dora": True,
                                                                "use_rslora": True, "lora_alpha": 12}),
    ("linear-lora_bias", MLP, lambda: (torch.randn(3, 10),), {"target_modules": ["lin0", "lin1"], "lora_bias": True}),
    ("linear-bias-all-mts", MLP, lambda: (torch.randn(3, 10),), {"target_modules": ["lin0"], "bias": "all",
                                                                 "modules_to_save": ["head"]}),
    ("linear-bias-lora_only", MLP, lambda: (torch.randn(3, 10),), {"target_modules": ["lin0", "lin1"],
                                                                   "bias": "lora_only"}),
    ("linear-patterns", MLP, lambda: (torch.randn(3, 10),), {"target_modules": ["lin0", "lin1"], "r": 4,
                                                             "rank_pattern": {"lin1": 2},
                                                             "alpha_pattern": {"lin0": 3}}),
    ("embedding", EmbNet, lambda: _ids(20), {"target_modules": ["emb", "lin"]}),
    ("embedding-dora", EmbNet, lambda: _ids(20), {"target_modules": ["emb"], "use_dora": True}),
    ("conv", lambda: ConvNet(stride=2), conv_inputs, {"target_modules": ["c1", "c2", "c3"]}),
    ("conv-dora", ConvNet, conv_inputs, {"target_modules": ["c1", "c2", "c3"], "use_dora": True}),
    ("gpt2-all-linear", tiny_gpt2, lambda: (token_ids(),), {"target_modules": "all-linear", "fan_in_fan_out": True}),
    ("gpt2-default-targets-dora", tiny_gpt2, lambda: (token_ids(),), {"use_dora": True, "fan_in_fan_out": True}),
    ("llama-all-linear-mts", tiny_llama, lambda: (token_ids(),), {"target_modules": "all-linear",
                                                                   "modules_to_save": ["lm_head"]}),
]  # fmt: skip


def _twins(factory: Any) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = factory().double().eval()
    return model, copy.deepcopy(model)


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_funcpeft_checkpoint_loads_in_peft(tmp_path: Path, name: str, factory, inputs, kw) -> None:
    model, twin = _twins(factory)
    x = tuple(t.double() if t.is_floating_point() else t for t in inputs())
    config = fp.LoraConfig(init_lora_weights=False, **kw)
    params, fwd = fp.adapt(model, config)
    params = _perturb(params)
    fp.save(tmp_path, params, config)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:  # PEFT's metadata + the config's hash
        digest = hashlib.sha256((tmp_path / "adapter_config.json").read_bytes()).hexdigest()
        assert f.metadata() == {"format": "pt", "funcpeft_config_sha256": digest, "funcpeft_previous_config_sha256": ""}
    peft_model = peft.PeftModel.from_pretrained(twin, tmp_path).eval()
    expected = _out(fwd(params, *x))
    assert not torch.allclose(expected, _out(model(*x)))
    torch.testing.assert_close(_out(peft_model(*x)), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_peft_checkpoint_loads_in_funcpeft(tmp_path: Path, name: str, factory, inputs, kw) -> None:
    model, twin = _twins(factory)
    x = tuple(t.double() if t.is_floating_point() else t for t in inputs())
    peft_model = peft.get_peft_model(twin, peft.LoraConfig(init_lora_weights=False, **kw))
    with torch.no_grad():  # move every trainable tensor, so magnitudes and copies are not their initial values
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    params, config = fp.load(tmp_path)
    assert isinstance(config, fp.LoraConfig)
    _, fwd = fp.adapt(model, config)
    torch.testing.assert_close(_out(fwd(params, *x)), _out(peft_model(*x)), rtol=1e-9, atol=1e-9)
    # and back: funcpeft writes the same keys PEFT wrote
    fp.save(tmp_path / "again", params, config)
    with (
        safe_open(tmp_path / "adapter_model.safetensors", "pt") as a,
        safe_open(tmp_path / "again" / "adapter_model.safetensors", "pt") as b,
    ):
        written = a.keys()  # safe_open is not a dict: .keys() is its API
        peft_keys = {k for k in written if ".original_module." not in k and ".modules_to_save." not in k}
        assert set(b.keys()) == peft_keys
        for key in peft_keys:
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_config_records_every_field_peft_writes(tmp_path: Path) -> None:
    model, twin = _twins(MLP)
    kw = {"target_modules": ["lin0"], "r": 4, "lora_alpha": 8, "use_dora": True, "rank_pattern": {"lin0": 2}}
    config = fp.LoraConfig(**kw)
    fp.save(tmp_path / "fp", fp.adapt(model, config)[0], config)
    peft.get_peft_model(twin, peft.LoraConfig(**kw)).save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "fp" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ignored = {"peft_version", "auto_mapping"}  # provenance: which library and base class wrote the file
    assert set(theirs) - ignored <= set(ours)
    for key in set(theirs) - ignored:
        assert ours[key] == theirs[key], key


def test_all_linear_records_resolved_targets_as_peft(tmp_path: Path) -> None:
    model, twin = _twins(tiny_gpt2)
    config = fp.LoraConfig(target_modules="all-linear")
    params, fwd = fp.adapt(model, config)
    fp.save(tmp_path / "fp", params, config)
    peft.get_peft_model(twin, peft.LoraConfig(target_modules="all-linear")).save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "fp" / "adapter_config.json").read_text())["target_modules"]
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(ours) == sorted(theirs) == sorted(fwd.targets)


tensors = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])


@settings(max_examples=25, deadline=None)
@given(
    dtype=tensors,
    r=st.integers(1, 6),
    use_dora=st.booleans(),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    mts=st.booleans(),
)
def test_load_save_round_trip_is_exact(dtype: torch.dtype, r: int, use_dora: bool, bias: str, mts: bool) -> None:
    import tempfile

    model = EmbNet().to(dtype)
    config = fp.LoraConfig(
        r=r, target_modules=["emb", "lin"], use_dora=use_dora, bias=bias, modules_to_save=["head"] if mts else None
    )
    params, _ = fp.adapt(model, config)
    params = _perturb(params)
    with tempfile.TemporaryDirectory() as folder:
        fp.save(folder, params, config)
        loaded, loaded_config = fp.load(folder)
    assert loaded_config == config
    assert loaded.keys() == params.keys()
    for path in params:
        assert loaded[path].keys() == params[path].keys()
        for name, value in params[path].items():
            assert loaded[path][name].dtype == value.dtype
            assert torch.equal(loaded[path][name], value)
            assert loaded[path][name].is_leaf and loaded[path][name].requires_grad


def test_to_and_from_peft_state_dict_are_inverse() -> None:
    config = fp.LoraConfig(target_modules=["lin0", "lin1"], bias="lora_only", modules_to_save=["head"])
    params, _ = fp.adapt(MLP(), config)
    state = fp.to_peft_state_dict(params, config)
    assert "base_model.model.lin0.lora_A.weight" in state
    assert "base_model.model.lin0.base_layer.bias" in state
    assert "base_model.model.head.weight" in state
    back = fp.from_peft_state_dict(state, config)
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0), params, back)


# ----- safety and errors -------------------------------------------------------------------------------------------


class Payload:
    """A pickle that runs code when unpickled: creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _saved(tmp_path: Path) -> tuple[Path, fp.Params, fp.LoraConfig]:
    config = fp.LoraConfig(target_modules=["lin0", "lin1"])
    params, _ = fp.adapt(MLP(), config)
    fp.save(tmp_path / "ckpt", params, config)
    return tmp_path / "ckpt", params, config


def test_malicious_pickle_in_bin_does_not_run(tmp_path: Path) -> None:
    folder, _, _ = _saved(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.lin0.lora_A.weight": Payload(marker)}, f)
    with pytest.raises(ValueError, match="adapter_model.bin"):
        fp.load(folder)
    assert not marker.exists(), "the pickle payload ran"


def test_legacy_bin_of_tensors_loads(tmp_path: Path) -> None:
    folder, params, _ = _saved(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    torch.save(fp.to_peft_state_dict(params), folder / "adapter_model.bin")
    loaded, _ = fp.load(folder)
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0), params, loaded)


def test_truncated_weights_name_the_file(tmp_path: Path) -> None:
    folder, _, _ = _saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-20])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        fp.load(folder)


def test_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fp.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fp.load(tmp_path / "empty")
    folder, _, _ = _saved(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        fp.load(folder)


def test_unknown_or_unsupported_config(tmp_path: Path) -> None:
    folder, _, _ = _saved(tmp_path)
    config_file = folder / "adapter_config.json"
    data = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**data, "peft_type": "BOFT"}))
    with pytest.raises(ValueError, match="BOFT"):
        fp.load(folder)
    config_file.write_text(json.dumps({**data, "use_qalora": True}))
    with pytest.raises(ValueError, match="use_qalora"):
        fp.load(folder)
    config_file.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        fp.load(folder)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    folder, params, config = _saved(tmp_path)
    state = fp.to_peft_state_dict(params, config)
    del state["base_model.model.lin1.lora_B.weight"]
    with pytest.raises(ValueError, match=r"lin1\.lora_B\.weight"):
        fp.from_peft_state_dict(state, config)
    state = fp.to_peft_state_dict(params, config)
    state["base_model.model.lin1.weird"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"lin1\.weird"):
        fp.from_peft_state_dict(state, config)


def test_wrong_shapes_fail_on_first_call_naming_path_and_shapes(tmp_path: Path) -> None:
    folder, _, _ = _saved(tmp_path)
    model = MLP(d_in=12)  # a different model than the adapter was made for
    params, config = fp.load(folder)
    _, fwd = fp.adapt(model, config)
    with pytest.raises(ValueError, match=r"'lin0'.*\(8, 10\).*\(8, 12\)"):
        fwd(params, torch.randn(2, 12))


def test_bad_save_leaves_disk_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, params, config = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(TypeError, match="lin0"):
        fp.save(folder, {"lin0": {"lora_A": "not a tensor"}}, config)
    with pytest.raises(TypeError, match="config"):
        fp.save(folder, params, {"r": 8})

    # an interrupted write (here: the config write fails) leaves the old checkpoint intact and no temp files
    import funcpeft.io as fio

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fio.json, "dumps", explode)
    with pytest.raises(OSError, match="disk full"):
        fp.save(folder, _perturb(params), config)
    monkeypatch.undo()
    real_write = fio._atomic._write_temporary

    def failing_write(target: Path, data: bytes) -> Path:
        if target.name == "adapter_config.json":
            raise OSError("interrupted")
        return real_write(target, data)

    monkeypatch.setattr(fio._atomic, "_write_temporary", failing_write)
    with pytest.raises(OSError, match="interrupted"):
        fp.save(folder, _perturb(params), config)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ----- merging ---------------------------------------------------------------------------------------------------


def test_merge_of_half_precision_model_is_computed_in_float32() -> None:
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16).eval()
    config = fp.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False)
    params, fwd = fp.adapt(model, config)
    assert params["lin0"]["lora_A"].dtype == torch.float32  # adapters of half models are float32, as in PEFT
    merged = fwd.merge(params)
    assert merged["lin0.weight"].dtype == torch.bfloat16
    expected = (model.lin0.weight.float() + params["lin0"]["lora_B"] @ params["lin0"]["lora_A"]).to(torch.bfloat16)
    assert torch.equal(merged["lin0.weight"], expected)


def test_merge_refuses_tied_weights() -> None:
    model = tiny_gpt2()  # wte is tied to lm_head
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["wte"], init_lora_weights=False))
    before = model.transformer.wte.weight.clone()
    with pytest.raises(ValueError, match="tied"):
        fwd.merge(params)
    assert torch.equal(model.transformer.wte.weight, before)


def test_merge_leaves_model_and_params_unchanged_and_matches_peft() -> None:
    model, twin = _twins(tiny_gpt2)
    kw = {"target_modules": "all-linear", "fan_in_fan_out": True}
    config = fp.LoraConfig(init_lora_weights=False, **kw)
    params, fwd = fp.adapt(model, config)
    frozen = optree.tree_map(torch.clone, params)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = fwd.merge(params)
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0), params, frozen)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k])
    peft_model = peft.get_peft_model(twin, peft.LoraConfig(**kw))
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config))
    peft_merged = peft_model.merge_and_unload().state_dict()
    assert merged.keys() == peft_merged.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], peft_merged[k], rtol=1e-12, atol=1e-12)


def test_loaded_params_follow_module_order_and_files_are_readable(tmp_path: Path) -> None:
    model = tiny_gpt2(n_layer=12, n_embd=16)
    config = fp.LoraConfig(target_modules=["c_attn"])
    params, fwd = fp.adapt(model, config)
    fp.save(tmp_path, params, config)
    loaded, _ = fp.load(tmp_path)
    assert list(loaded) == list(params) == list(fwd.targets)  # h.2 before h.10, as in the model
    assert [list(e) for e in loaded.values()] == [list(e) for e in params.values()]
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "adapter_config.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_config_errors_name_the_file(tmp_path: Path) -> None:
    folder, _, _ = _saved(tmp_path)
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "r": 0}))
    with pytest.raises(ValueError, match=r"adapter_config\.json.*`r` must be a positive integer, got 0"):
        fp.load(folder)


def test_integer_buffers_in_a_checkpoint_are_refused_clearly() -> None:
    config = fp.LoraConfig(target_modules=["lin0"], modules_to_save=["bn"])
    state = {"base_model.model.bn.num_batches_tracked": torch.tensor(3)}
    with pytest.raises(ValueError, match="num_batches_tracked.*int64"):
        fp.from_peft_state_dict(state, config)
