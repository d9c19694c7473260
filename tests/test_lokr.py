"""LoKr against PEFT 0.21.2: outputs, gradients, merged weights, train-mode dropouts and checkpoints both ways on the
same weights, PEFT's initialisation, config refusals. What LoKr shares with LoHa (mixed batches, vmap, torch.func,
compile, quantized bases, refused layers, combine, inspect, the drop-in API, the contract matrix): ``test_lycoris.py``.

PEFT quirks pinned here: a Conv1d with a full ``lokr_w2`` gets PEFT's non-Kronecker ``kron(w1[None], w2)`` layout
(followed), and a Conv1d with ``use_effective_conv2d`` and ``r = 1`` crashes in PEFT (computed here as PEFT does for
``r >= 2``).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from _lycoris import (
    check_bfloat16_adapters,
    check_bfloat16_base,
    check_dropouts_draw_as_peft,
    check_effective_weight,
    check_merge,
    flat,
    out,
    peft,
    peft_trainable,
    quiet,
    setup,
)
from _models import MLP, ConvNet, conv_inputs, tiny_bert, tiny_llama, token_ids
from torch import nn

import funcpeft as fp
from funcpeft.methods.lycoris_math import factorization


def _mlp_in() -> tuple[torch.Tensor, ...]:
    return (torch.randn(3, 10, generator=torch.Generator().manual_seed(5)),)


def _wide() -> nn.Module:
    return ConvNet(channels=16)


def _wide_in() -> tuple[torch.Tensor, ...]:
    return conv_inputs(16)


LIN = {"target_modules": ["lin0", "lin1"], "r": 3, "alpha": 5}  # r >= max(b, d) / 2: full w1 and w2
CONV = {"target_modules": ["c1", "c2"], "r": 3, "alpha": 2}  # full w2; the Conv1d's in PEFT's kron layout
CP = {"target_modules": ["c1", "c2"], "r": 2, "use_effective_conv2d": True}  # on 16 channels: the CP form
CASES: list[tuple[str, Any, Any, dict[str, Any]]] = [
    ("linear", MLP, _mlp_in, LIN),
    ("linear-no-bias", lambda: MLP(bias=False), _mlp_in, LIN),
    ("linear-decomposed", MLP, _mlp_in, {**LIN, "r": 1}),
    ("linear-decompose_both", MLP, _mlp_in, {**LIN, "r": 1, "decompose_both": True}),
    ("linear-decompose_factor", MLP, _mlp_in, {**LIN, "r": 1, "decompose_factor": 2}),
    ("linear-patterns", MLP, _mlp_in, {**LIN, "rank_pattern": {"lin1": 1}, "alpha_pattern": {"lin0": 2.5}}),
    ("linear-modules_to_save", MLP, _mlp_in, {**LIN, "modules_to_save": ["head"]}),
    ("conv", ConvNet, conv_inputs, CONV),
    ("conv-flat", ConvNet, conv_inputs, {**CONV, "r": 1}),
    ("conv-cp", _wide, _wide_in, CP),
    ("conv-cp-decompose_both", _wide, _wide_in, {**CP, "r": 1, "decompose_both": True, "target_modules": ["c2"]}),
    ("conv-cp-grouped", lambda: ConvNet(channels=16, groups=2, dilation=2, stride=2), _wide_in, CP),
    ("conv1x1-effective", lambda: ConvNet(channels=16, kernel_size=1, padding=0), _wide_in, CP),  # 1x1: flat
    ("llama-defaults", tiny_llama, lambda: (token_ids(),), {"r": 2}),
    ("llama-layers", tiny_llama, lambda: (token_ids(),),
     {"r": 1, "target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1], "layers_pattern": "layers",
      "decompose_both": True}),
    ("bert-defaults", tiny_bert, lambda: (token_ids(),), {"r": 4, "alpha": 16}),
]  # fmt: skip
BY_NAME = {c[0]: c for c in CASES}


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_outputs_and_gradients_equal_peft(name: str, factory: Any, inputs: Any, kw: dict[str, Any]) -> None:
    model, x, config, params, fwd, peft_model = setup("LoKr", factory, inputs, kw)
    theirs, ours = peft_trainable(peft_model), flat(params)
    assert theirs.keys() == ours.keys(), "PEFT trains exactly what params holds"
    assert all(theirs[k].shape == t.shape for k, t in ours.items())
    result = out(fwd(params, *x))
    assert not torch.allclose(result, out(model(*x)))
    peft_out = out(peft_model(*x))
    torch.testing.assert_close(result, peft_out, rtol=1e-12, atol=1e-12)
    weights = torch.randn(result.shape, generator=torch.Generator().manual_seed(2), dtype=result.dtype)
    (result * weights).sum().backward()
    (peft_out * weights).sum().backward()
    for key, tensor in ours.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, key
        torch.testing.assert_close(tensor.grad, theirs[key].grad, rtol=1e-9, atol=1e-12, msg=key)


def test_the_forms_are_peft_s() -> None:
    def names(name: str) -> dict[str, set[str]]:
        _, factory, inputs, kw = BY_NAME[name]
        params, _ = fp.adapt(factory(), fp.LoKrConfig(**kw))
        return {p: set(e) for p, e in params.items()}

    assert names("linear")["lin0"] == {"lokr_w1", "lokr_w2"}
    assert names("linear-decomposed")["lin1"] == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    assert names("linear-decompose_both")["lin1"] == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    assert names("conv-cp")["c1"] == {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    assert names("conv1x1-effective")["c2"] == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    for dim in range(1, 130):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(dim, factor) == peft.tuners.lokr.layer.factorization(dim, factor), (dim, factor)


def test_conv1d_full_w2_is_peft_s_kron_layout() -> None:
    # PEFT's torch.kron pads the 2-D w1 to (1, a, c) against w2 (b, d, k): not the Kronecker structure
    model, x, config, params, fwd, peft_model = setup("LoKr", ConvNet, conv_inputs, CONV)
    entry = params["c1"]
    w1, w2 = entry["lokr_w1"], entry["lokr_w2"]
    assert w2.dim() == 3
    layer = peft_model.base_model.model.c1
    delta = fwd.merge(params)["c1.weight"] - model.state_dict()["c1.weight"]
    expected = torch.kron(w1, w2).reshape(delta.shape) * layer.scaling["default"]
    torch.testing.assert_close(delta, expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    structured = torch.kron(w1[:, :, None], w2).reshape(delta.shape) * layer.scaling["default"]
    assert not torch.allclose(delta, structured.detach())


def test_conv1d_cp_with_rank_1_works_where_peft_crashes() -> None:
    kw = {"target_modules": ["c1"], "r": 1, "use_effective_conv2d": True}
    model, x, config, params, fwd, peft_model = setup("LoKr", ConvNet, conv_inputs, kw)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        peft_model(*x)
    entry = {n: t.detach() for n, t in params["c1"].items()}
    w2 = torch.einsum("ijkl,ip,jr->prkl", entry["lokr_t2"], entry["lokr_w2_a"], entry["lokr_w2_b"])
    assert w2.is_contiguous() and w2.stride()[-1] != 1  # "contiguous", but a size-1 dim with an odd stride
    w2 = torch.empty(w2.shape, dtype=w2.dtype).copy_(w2)  # on which torch.kron's internal view works
    expected = torch.kron(entry["lokr_w1"][:, :, None, None], w2).reshape(8, 4, 3) * config.alpha
    torch.testing.assert_close(fwd.merge(params)["c1.weight"] - model.state_dict()["c1.weight"], expected)
    twin = copy.deepcopy(model)
    twin.load_state_dict(fwd.merge(params))
    torch.testing.assert_close(fwd(params, *x), twin(*x))


@pytest.mark.parametrize("name", ["linear", "conv", "conv-cp", "llama-defaults"])
def test_bfloat16_base_equals_peft(name: str) -> None:
    check_bfloat16_base("LoKr", BY_NAME[name])


@pytest.mark.parametrize("name", ["linear", "conv-cp"])
def test_bfloat16_adapters_equal_peft(name: str) -> None:
    check_bfloat16_adapters("LoKr", BY_NAME[name])


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_merge_equals_forward_and_peft_merge(name: str, factory: Any, inputs: Any, kw: dict[str, Any]) -> None:
    check_merge("LoKr", factory, inputs, kw)


def test_effective_weight_runs_the_base_layer() -> None:
    for name in ("linear", "conv", "conv-cp-grouped"):
        check_effective_weight("LoKr", name, BY_NAME[name])


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_a_fresh_adapter_is_the_base_model_with_peft_s_zeros(init: bool | str) -> None:
    for name in ("linear", "linear-decompose_both", "conv", "conv-flat", "conv-cp", "conv1x1-effective"):
        _, factory, inputs, kw = BY_NAME[name]
        model = factory().eval()
        params, fwd = fp.adapt(model, fp.LoKrConfig(**kw, init_weights=init))
        theirs = peft_trainable(peft.get_peft_model(copy.deepcopy(model), peft.LoKrConfig(**kw, init_weights=init)))
        ours = flat(params)
        assert {k: t.shape for k, t in theirs.items()} == {k: t.shape for k, t in ours.items()}
        assert {k for k, t in theirs.items() if not t.any()} == {k for k, t in ours.items() if not t.any()}
        assert any(not t.any() for t in ours.values())
        x = inputs()
        assert torch.equal(out(fwd(params, *x)), out(model(*x))), name
    model = tiny_llama()
    params, fwd = fp.adapt(model, fp.LoKrConfig(r=4, init_weights=init))
    assert torch.equal(fwd(params, token_ids()).logits, model(token_ids()).logits)
    params, _ = fp.adapt(_wide(), fp.LoKrConfig(**CP))
    assert params["c1"]["lokr_t2"].shape == (2, 2, 3, 1)  # a Conv1d's core, as PEFT's


@pytest.mark.parametrize("name", ["linear-patterns", "conv-cp", "llama-layers"])
def test_checkpoints_both_ways(tmp_path: Path, name: str) -> None:
    _, factory, inputs, kw = BY_NAME[name]
    model, x, config, params, fwd, peft_model = setup("LoKr", factory, inputs, kw)
    fp.save(tmp_path / "fp", params, config)
    reloaded = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(model), tmp_path / "fp").eval()
    torch.testing.assert_close(out(reloaded(*x)), out(fwd(params, *x)), rtol=1e-12, atol=1e-12)
    quiet(peft_model.save_pretrained, tmp_path / "peft")
    loaded, loaded_config = fp.load(tmp_path / "peft")
    assert set(loaded_config.target_modules or ()) == set(config.target_modules or ())
    assert dataclasses.replace(loaded_config, target_modules=config.target_modules) == config
    assert flat(loaded).keys() == flat(params).keys()
    assert all(torch.equal(t, flat(params)[k]) for k, t in flat(loaded).items())
    _, fwd2 = fp.adapt(model, loaded_config)
    torch.testing.assert_close(out(fwd2(loaded, *x)), out(peft_model(*x)), rtol=1e-12, atol=1e-12)


def test_from_peft_dict_refuses_what_it_cannot_compute() -> None:
    data = {**peft.LoKrConfig(target_modules=["lin0"]).to_dict(), "peft_type": "LOKR"}
    data["target_modules"] = ["lin0"]
    assert fp.LoKrConfig.from_peft_dict(data) == fp.LoKrConfig(target_modules=["lin0"])
    with pytest.raises(ValueError, match="`lokr_future`=3"):
        fp.LoKrConfig.from_peft_dict({**data, "lokr_future": 3})


# ----- train-mode dropouts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "conv-cp-grouped"])
@pytest.mark.parametrize(
    "drop",
    [{"rank_dropout": 0.5}, {"rank_dropout": 0.5, "rank_dropout_scale": True},
     {"rank_dropout": 0.3, "module_dropout": 0.4, "rank_dropout_scale": True}],
)  # fmt: skip
def test_train_mode_dropouts_draw_as_peft(name: str, drop: dict[str, float]) -> None:
    check_dropouts_draw_as_peft("LoKr", BY_NAME[name], drop)


def test_module_dropout_skips_the_whole_delta_and_all_dropped_rows_give_zero_not_nan() -> None:
    model = MLP().train()
    x = _mlp_in()
    params, fwd = fp.adapt(model, fp.LoKrConfig(**LIN, module_dropout=0.5, init_weights=False))
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        seen.add(torch.equal(fwd(params, *x), model(*x)))
    assert seen == {True, False}
    head = nn.Sequential(nn.Linear(4, 2)).train()  # 2 output rows: all dropped with probability 0.9^2
    kw = {"target_modules": ["0"], "r": 1, "rank_dropout": 0.9, "rank_dropout_scale": True}
    params, fwd = fp.adapt(head, fp.LoKrConfig(**kw, init_weights=False))
    peft_model = peft.get_peft_model(copy.deepcopy(head), peft.LoKrConfig(**kw))
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, fwd.config))
    xs = torch.randn(3, 4)
    torch.manual_seed(0)
    assert not (torch.rand(2) > 0.9).any()  # seed 0 drops both rows
    torch.manual_seed(0)
    assert torch.equal(fwd(params, xs), head(xs))
    torch.manual_seed(0)
    assert peft_model(xs).isnan().all(), "PEFT divides by the zero mean"


# ----- refusals ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"r": 0}, r"`r` must be a positive integer, got 0"),
        ({"alpha": "8"}, r"`alpha` must be a number"),
        ({"alpha": float("nan")}, r"`alpha` must be a finite number"),
        ({"rank_dropout": 1.0}, r"`rank_dropout` must be a probability in \[0, 1\), got 1.0"),
        ({"module_dropout": -0.1}, r"`module_dropout`"),
        ({"use_effective_conv2d": 1}, r"`use_effective_conv2d` must be True or False"),
        ({"init_weights": "lora"}, r"`init_weights` must be True, False or 'lycoris', got 'lora'"),
        ({"init_weights": 1}, r"`init_weights` must be True, False or 'lycoris', got 1"),
        ({"decompose_factor": 0}, r"`decompose_factor` must be -1 .* or a positive integer, got 0"),
        ({"decompose_factor": 2.0}, r"`decompose_factor`"),
        ({"decompose_both": "no"}, r"`decompose_both` must be True or False"),
        ({"rank_dropout_scale": None}, r"`rank_dropout_scale` must be True or False"),
        ({"rank_pattern": {"lin0": 0}}, r"`rank_pattern\['lin0'\]`"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
        ({"task_type": "SEQ2SEQ"}, "task_type"),
    ],
)
def test_bad_configs_name_the_field(kw: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        fp.LoKrConfig(**kw)


def test_padding_mode_follows_the_base_layer_as_peft_s_merge() -> None:
    # PEFT's unmerged conv delta zero-pads whatever the base's padding_mode: it then differs from its own merged
    # model; funcpeft computes the merged one (the base layer run with W + dW)
    kw = {"target_modules": ["c2"], "r": 3}
    model, x, config, params, fwd, peft_model = setup("LoKr", lambda: ConvNet(padding_mode="reflect"), conv_inputs, kw)
    unmerged = out(peft_model(*x))
    merged = out(peft_model.merge_and_unload()(*x))
    assert not torch.allclose(unmerged, merged, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out(fwd(params, *x)), merged, rtol=1e-12, atol=1e-12)


def test_checkpoints_whose_factors_do_not_fit_the_config_are_refused(tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    model = MLP()
    params, fwd = fp.adapt(model, fp.LoKrConfig(**{**LIN, "r": 1, "decompose_both": True}))
    fp.save(tmp_path, params, fwd.config)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "decompose_both": False}))
    loaded, config = fp.load(tmp_path)
    _, fwd2 = fp.adapt(model, config)
    with pytest.raises(ValueError, match=r"`params\['lin0'\]` must hold \['lokr_w1', 'lokr_w2_a', 'lokr_w2_b'\]"):
        fwd2(loaded, _mlp_in()[0])
    state = load_file(tmp_path / "adapter_model.safetensors")
    del state["base_model.model.lin0.lokr_w1_b"]
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(
        ValueError, match=r"missing \['base_model.model.lin0.lokr_w1_b'\] for the adapted module 'lin0'"
    ):
        fp.load(tmp_path)
