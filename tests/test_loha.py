"""LoHa against PEFT 0.21.2: outputs, gradients, merged weights, train-mode dropouts and checkpoints both ways on the
same weights, PEFT's initialisation, config refusals. What LoHa shares with LoKr (mixed batches, vmap, torch.func,
compile, quantized bases, refused layers, combine, inspect, the drop-in API, the contract matrix): ``test_lycoris.py``.

PEFT quirk pinned here: with ``use_effective_conv2d`` on a ``k x k`` conv, PEFT's hand-written backward
(``HadaWeightCP``) gives wrong gradients for ``hada_w1_a``/``hada_w2_a``; funcpeft's gradients are compared with
autograd through PEFT's own forward math and with finite differences instead.
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


def _mlp_in() -> tuple[torch.Tensor, ...]:
    return (torch.randn(3, 10, generator=torch.Generator().manual_seed(5)),)


LIN = {"target_modules": ["lin0", "lin1"], "r": 3, "alpha": 5}
CONV = {"target_modules": ["c1", "c2"], "r": 3, "alpha": 2}
EFF = {**CONV, "use_effective_conv2d": True}
CASES: list[tuple[str, Any, Any, dict[str, Any]]] = [
    ("linear", MLP, _mlp_in, LIN),
    ("linear-no-bias", lambda: MLP(bias=False), _mlp_in, LIN),
    ("linear-patterns", MLP, _mlp_in, {**LIN, "rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin0": 2.5}}),
    ("linear-modules_to_save", MLP, _mlp_in, {**LIN, "modules_to_save": ["head"]}),
    ("conv", ConvNet, conv_inputs, CONV),
    ("conv-effective", ConvNet, conv_inputs, EFF),
    ("conv-effective-grouped", lambda: ConvNet(groups=2, dilation=2, stride=2), conv_inputs, EFF),
    ("conv-grouped", lambda: ConvNet(groups=2, stride=2), conv_inputs, CONV),
    ("conv1x1-effective", lambda: ConvNet(kernel_size=1, padding=0), conv_inputs, EFF),  # 1x1: the flat form
    ("llama-defaults", tiny_llama, lambda: (token_ids(),), {"r": 4}),
    ("llama-layers", tiny_llama, lambda: (token_ids(),),
     {"r": 2, "target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    ("bert-defaults", tiny_bert, lambda: (token_ids(),), {"r": 4, "alpha": 16}),
]  # fmt: skip
BY_NAME = {c[0]: c for c in CASES}
# k x k convs in the CP form, whose hada_w*_a gradients PEFT gets wrong
CP_MODULES = {"conv-effective": ("c1", "c2"), "conv-effective-grouped": ("c1", "c2")}


class _Ctx:
    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


def _autograd_cp(t1, w1a, w1b, t2, w2a, w2b, scale):  # noqa: ANN001, ANN202 - PEFT's signature
    """PEFT's make_weight_cp differentiated by autograd through its own forward (not its backward)."""
    return peft.tuners.loha.layer.HadaWeightCP.forward(_Ctx(), t1, w1a, w1b, t2, w2a, w2b, scale)


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_outputs_and_gradients_equal_peft(
    name: str, factory: Any, inputs: Any, kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x, config, params, fwd, peft_model = setup("LoHa", factory, inputs, kw)
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
    wrong = {f"{m}.{n}" for m in CP_MODULES.get(name, ()) for n in ("hada_w1_a", "hada_w2_a")}
    for key, tensor in ours.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, key
        if key in wrong:  # PEFT's HadaWeightCP.backward is wrong here
            assert not torch.allclose(tensor.grad, theirs[key].grad, rtol=1e-3, atol=1e-6), key
        else:
            torch.testing.assert_close(tensor.grad, theirs[key].grad, rtol=1e-9, atol=1e-12, msg=key)
    if not wrong:
        return
    monkeypatch.setattr(peft.tuners.loha.layer, "make_weight_cp", _autograd_cp)
    peft_model.zero_grad()
    (out(peft_model(*x)) * weights).sum().backward()
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor.grad, theirs[key].grad, rtol=1e-9, atol=1e-12, msg=key)


def test_cp_gradients_match_finite_differences() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params, fwd = fp.adapt(model, fp.LoHaConfig(target_modules=["0"], r=2, use_effective_conv2d=True,
                                                init_weights=False))  # fmt: skip
    names = sorted(params["0"])
    assert "hada_t1" in names

    def f(*leaves: torch.Tensor) -> torch.Tensor:
        return fwd({"0": dict(zip(names, leaves, strict=True))}, x)

    assert torch.autograd.gradcheck(f, tuple(params["0"][n] for n in names))


@pytest.mark.parametrize("name", ["linear", "conv", "conv-effective", "llama-defaults"])
def test_bfloat16_base_equals_peft(name: str) -> None:
    check_bfloat16_base("LoHa", BY_NAME[name])


@pytest.mark.parametrize("name", ["linear", "conv-effective"])
def test_bfloat16_adapters_equal_peft(name: str) -> None:
    check_bfloat16_adapters("LoHa", BY_NAME[name])


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_merge_equals_forward_and_peft_merge(name: str, factory: Any, inputs: Any, kw: dict[str, Any]) -> None:
    check_merge("LoHa", factory, inputs, kw)


def test_effective_weight_runs_the_base_layer() -> None:
    for name in ("linear", "conv", "conv-effective-grouped"):
        check_effective_weight("LoHa", name, BY_NAME[name])


def test_a_fresh_adapter_is_the_base_model_and_peft_s_init() -> None:
    for name in ("linear", "conv", "conv-effective", "conv1x1-effective"):
        _, factory, inputs, kw = BY_NAME[name]
        model = factory().eval()
        params, fwd = fp.adapt(model, fp.LoHaConfig(**kw))
        for entry in params.values():
            assert not entry["hada_w2_b"].any() and all(t.any() for n, t in entry.items() if n != "hada_w2_b")
        x = inputs()
        assert torch.equal(out(fwd(params, *x)), out(model(*x))), name
    model = tiny_llama()
    params, fwd = fp.adapt(model, fp.LoHaConfig(r=4))
    assert torch.equal(fwd(params, token_ids()).logits, model(token_ids()).logits)
    # PEFT's shapes for a fresh adapter (init True), including the CP form's cores
    peft_model = peft.get_peft_model(copy.deepcopy(ConvNet()), peft.LoHaConfig(**EFF))
    params, _ = fp.adapt(ConvNet(), fp.LoHaConfig(**EFF))
    assert {k: t.shape for k, t in peft_trainable(peft_model).items()} == {k: t.shape for k, t in flat(params).items()}
    assert params["c1"]["hada_t1"].shape == (3, 3, 3, 1)  # a Conv1d's core, as PEFT's


@pytest.mark.parametrize("name", ["linear-patterns", "conv-effective", "llama-layers"])
def test_checkpoints_both_ways(tmp_path: Path, name: str) -> None:
    _, factory, inputs, kw = BY_NAME[name]
    model, x, config, params, fwd, peft_model = setup("LoHa", factory, inputs, kw)
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
    data = {**peft.LoHaConfig(target_modules=["lin0"]).to_dict(), "peft_type": "LOHA"}
    data["target_modules"] = ["lin0"]
    assert fp.LoHaConfig.from_peft_dict(data) == fp.LoHaConfig(target_modules=["lin0"])
    with pytest.raises(ValueError, match="`hada_future`=3"):
        fp.LoHaConfig.from_peft_dict({**data, "hada_future": 3})


# ----- train-mode dropouts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "conv-effective-grouped"])
@pytest.mark.parametrize("drop", [{"rank_dropout": 0.5}, {"rank_dropout": 0.3, "module_dropout": 0.4}])
def test_train_mode_dropouts_draw_as_peft(name: str, drop: dict[str, float]) -> None:
    check_dropouts_draw_as_peft("LoHa", BY_NAME[name], drop)


def test_module_dropout_skips_the_whole_delta_and_all_dropped_rows_give_zero_not_nan() -> None:
    model = MLP().train()
    x = _mlp_in()
    params, fwd = fp.adapt(model, fp.LoHaConfig(**LIN, module_dropout=0.5, init_weights=False))
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        seen.add(torch.equal(fwd(params, *x), model(*x)))
    assert seen == {True, False}
    head = nn.Sequential(nn.Linear(4, 2)).train()  # 2 output rows: all dropped with probability 0.9^2
    params, fwd = fp.adapt(head, fp.LoHaConfig(target_modules=["0"], r=1, rank_dropout=0.9, init_weights=False))
    peft_model = peft.get_peft_model(copy.deepcopy(head), peft.LoHaConfig(target_modules=["0"], r=1, rank_dropout=0.9))
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
        ({"init_weights": "lycoris"}, r"`init_weights` must be True or False"),
        ({"rank_pattern": {"lin0": 0}}, r"`rank_pattern\['lin0'\]`"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
        ({"task_type": "SEQ2SEQ"}, "task_type"),
    ],
)
def test_bad_configs_name_the_field(kw: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        fp.LoHaConfig(**kw)


def test_padding_mode_follows_the_base_layer_as_peft_s_merge() -> None:
    # PEFT's unmerged conv delta zero-pads whatever the base's padding_mode: it then differs from its own merged
    # model; funcpeft computes the merged one (the base layer run with W + dW)
    kw = {"target_modules": ["c2"], "r": 3}
    model, x, config, params, fwd, peft_model = setup("LoHa", lambda: ConvNet(padding_mode="reflect"), conv_inputs, kw)
    unmerged = out(peft_model(*x))
    merged = out(peft_model.merge_and_unload()(*x))
    assert not torch.allclose(unmerged, merged, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out(fwd(params, *x)), merged, rtol=1e-12, atol=1e-12)
