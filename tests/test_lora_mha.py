"""LoRA on nn.MultiheadAttention against PEFT: outputs, gradients, merge, checkpoints both ways, mixed batches, vmap,
torch.func, compile, the CLI, and every refusal.

PEFT 0.21.2 applies out_proj's delta twice (huggingface/peft#3774); funcpeft applies it once. The oracle is
therefore PEFT run with out_proj's ``lora_B`` halved (:func:`_to_peft`): the same function as funcpeft's with
``lora_B``, so outputs must match exactly (PEFT's out_proj gradients are off by a known factor: see
``_PEFT_GRAD_FACTOR``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import test_contract as contract
import torch
from _models import oracle
from torch import Tensor, nn

import funcpeft as fp

peft = oracle("peft")

pytestmark = pytest.mark.filterwarnings(
    "ignore:LoRA on nn.MultiheadAttention applies out_proj:funcpeft.FuncpeftWarning"
)

E, HEADS, BATCH, LQ, LK = 8, 2, 3, 5, 4
OUT_A, OUT_B = ".base_layer.out_proj.lora_A.weight", ".base_layer.out_proj.lora_B.weight"
# PEFT 0.21.2 adds out_proj's second delta in place on `.data`, so autograd sees one: its gradients are those of
# W + s (B/2) A at the point W + 2 s (B/2) A, i.e. half of its own forward's. funcpeft's are its forward's, so (with
# PEFT's B = ours / 2) ours = 2 x PEFT's for out_proj.lora_A, and equal for out_proj.lora_B.
_PEFT_GRAD_FACTOR = {OUT_A: 2.0}


class SelfAttn(nn.Module):
    def __init__(self, batch_first: bool = True, **kw: Any) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kw)
        self.head = nn.Linear(E, 3)

    def forward(self, x: Tensor, **kw: Any) -> tuple[Tensor, Tensor | None]:
        out, weights = self.attn(x, x, x, **kw)
        return self.head(out), weights


class CrossAttn(nn.Module):
    """Cross-attention: query != key; ``distinct`` also gives value its own tensor."""

    def __init__(self, batch_first: bool = True, distinct: bool = False, **kw: Any) -> None:
        super().__init__()
        self.q = nn.Linear(E, E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kw)
        self.distinct = distinct

    def forward(self, x: Tensor, memory: Tensor, **kw: Any) -> tuple[Tensor, Tensor | None]:
        value = memory * 2.0 if self.distinct else memory
        return self.attn(self.q(x), memory, value, **kw)


def _seq(batch_first: bool, length: int, seed: int) -> Tensor:
    x = torch.randn(BATCH, length, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x if batch_first else x.transpose(0, 1).contiguous()


def _padding() -> Tensor:
    mask = torch.zeros(BATCH, LQ, dtype=torch.bool)
    mask[0, -2:] = True
    mask[2, -1] = True
    return mask


def _causal(n: int) -> Tensor:
    return torch.triu(torch.ones(n, n, dtype=torch.bool), 1)


def _encoder(batch_first: bool, layers: int = 1) -> nn.Module:
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=batch_first)
    return layer if layers == 1 else nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


# (name, model factory, inputs -> (args, kwargs), LoRA kwargs for both libraries)
CASES: list[tuple[str, Any, Any, dict[str, Any]]] = [
    ("self-batch_first", lambda: SelfAttn(True), lambda: ((_seq(True, LQ, 1),),
     {"key_padding_mask": _padding(), "average_attn_weights": False}), {"target_modules": ["attn"]}),
    ("self-seq_first-causal", lambda: SelfAttn(False), lambda: ((_seq(False, LQ, 1),),
     {"attn_mask": _causal(LQ), "is_causal": True}), {"target_modules": ["attn"]}),
    ("self-no_bias-bias_kv-zero_attn", lambda: SelfAttn(True, bias=False, add_bias_kv=True, add_zero_attn=True),
     lambda: ((_seq(True, LQ, 1),), {"need_weights": False}), {"target_modules": ["attn"], "use_rslora": True}),
    ("cross-batch_first", lambda: CrossAttn(True), lambda: ((_seq(True, LQ, 1), _seq(True, LK, 2)), {}),
     {"target_modules": ["attn", "q"]}),
    ("cross-seq_first-distinct_value", lambda: CrossAttn(False, distinct=True),
     lambda: ((_seq(False, LQ, 1), _seq(False, LK, 2)), {"attn_mask": torch.randn(LQ, LK, dtype=torch.float64)}),
     {"target_modules": ["attn"]}),
    ("encoder-batch_first", lambda: _encoder(True),
     lambda: ((_seq(True, LQ, 1),), {"src_key_padding_mask": _padding()}),
     {"target_modules": ["self_attn", "linear1"]}),
    ("encoder-seq_first-2_layers", lambda: _encoder(False, 2), lambda: ((_seq(False, LQ, 1),),
     {"mask": _causal(LQ), "is_causal": True}), {"target_modules": ["self_attn"]}),
    ("decoder", lambda: nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True),
     lambda: ((_seq(True, LQ, 1), _seq(True, LK, 2)), {}), {"target_modules": ["self_attn", "multihead_attn"]}),
    ("rank_pattern", lambda: CrossAttn(True), lambda: ((_seq(True, LQ, 1), _seq(True, LK, 2)), {}),
     {"target_modules": ["attn", "q"], "r": 2, "rank_pattern": {"attn": 4}, "alpha_pattern": {"attn": 3}}),
]  # fmt: skip
IDS = [c[0] for c in CASES]


def _outputs(out: Any) -> list[Tensor]:
    return [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]


def _to_peft(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """funcpeft's checkpoint as PEFT 0.21.2 needs it to compute the same function: out_proj's lora_B halved."""
    return {k: v / 2 if k.endswith(OUT_B) else v for k, v in state.items()}


def _setup(factory: Any, inputs: Any, kw: dict[str, Any]):
    torch.manual_seed(0)
    # train mode (no dropout anywhere): in eval, torch's fused TransformerEncoderLayer path makes PEFT skip LoRA
    model = factory().double().train()
    args, kwargs = inputs()
    config = fp.LoraConfig(init_lora_weights=False, **kw)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(1))
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **kw))
    result = peft.set_peft_model_state_dict(peft_model, _to_peft(fp.to_peft_state_dict(params, config)))
    assert not result.unexpected_keys
    return model, args, kwargs, config, params, fwd, peft_model


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=IDS)
def test_outputs_and_gradients_equal_peft(name: str, factory, inputs, kw) -> None:
    model, args, kwargs, config, params, fwd, peft_model = _setup(factory, inputs, kw)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == sum(len(e) for e in params.values()), "PEFT trains exactly what params holds"
    ours, theirs, base = _outputs(fwd(params, *args, **kwargs)), _outputs(peft_model(*args, **kwargs)), model(*args)
    assert not torch.allclose(ours[0], _outputs(base)[0])
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(2), dtype=t.dtype) for t in ours]
    sum((t * w).sum() for t, w in zip(ours, weights, strict=True)).backward()
    sum((t * w).sum() for t, w in zip(theirs, weights, strict=True)).backward()
    grads = {k.replace(".default", ""): v.grad for k, v in trainable.items()}
    for key, tensor in fp.to_peft_state_dict({p: {n: t.grad for n, t in e.items()} for p, e in params.items()}).items():
        torch.testing.assert_close(
            tensor, grads[key] * _PEFT_GRAD_FACTOR.get(key[-len(OUT_A) :], 1.0), rtol=1e-9, atol=1e-12
        )
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=IDS)
def test_merge_equals_the_forward_and_peft(name: str, factory, inputs, kw) -> None:
    model, args, kwargs, config, params, fwd, peft_model = _setup(factory, inputs, kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged_state = fwd.merge(params)
    merged = copy.deepcopy(model)
    merged.load_state_dict(merged_state)
    for a, b in zip(_outputs(merged(*args, **kwargs)), _outputs(fwd(params, *args, **kwargs)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    theirs = peft_model.merge_and_unload().state_dict()
    assert theirs.keys() == merged_state.keys()
    for key, value in merged_state.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-10, atol=1e-12)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the model is untouched"


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=IDS)
def test_checkpoints_both_ways(tmp_path: Path, name: str, factory, inputs, kw) -> None:
    model, args, kwargs, config, params, fwd, _ = _setup(factory, inputs, kw)
    fp.save(tmp_path / "ours", params, config)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").train()
    theirs = {k: v for k, v in peft.get_peft_model_state_dict(loaded).items()}
    assert theirs.keys() == fp.to_peft_state_dict(params, config).keys()
    for key, value in fp.to_peft_state_dict(params, config).items():
        assert torch.equal(theirs[key], value)  # the file holds funcpeft's tensors as they are
    doubled = {p: {n: t * 2 if n == "out_proj.lora_B" else t for n, t in e.items()} for p, e in params.items()}
    for a, b in zip(_outputs(loaded(*args, **kwargs)), _outputs(fwd(doubled, *args, **kwargs)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # PEFT 0.21.2 runs out_proj's delta twice
    loaded.save_pretrained(tmp_path / "theirs")
    back, back_config = fp.load(tmp_path / "theirs")
    assert set(back_config.target_modules) == set(config.target_modules)  # (PEFT keeps a set)
    assert (back_config.r, back_config.rank_pattern) == (config.r, config.rank_pattern)
    assert back.keys() == params.keys()
    for path, entry in params.items():
        assert back[path].keys() == entry.keys()
        for leaf, tensor in entry.items():
            assert torch.equal(back[path][leaf], tensor)
    for a, b in zip(_outputs(fwd(back, *args, **kwargs)), _outputs(fwd(params, *args, **kwargs)), strict=True):
        assert torch.equal(a, b)


def test_fresh_adapter_is_the_base_and_init_matches_peft_shapes() -> None:
    torch.manual_seed(0)
    model = SelfAttn(True).eval()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["attn"], r=4))
    entry = params["attn"]
    assert {n: tuple(t.shape) for n, t in entry.items()} == {
        "lora_A": (4, E), "lora_B": (3 * E, 4), "out_proj.lora_A": (4, E), "out_proj.lora_B": (E, 4)
    }  # fmt: skip
    assert not entry["lora_B"].any() and not entry["out_proj.lora_B"].any() and entry["lora_A"].any()
    assert all(t.is_leaf and t.requires_grad for t in entry.values())
    x = _seq(True, LQ, 1).float()
    for a, b in zip(fwd(params, x), model(x), strict=True):
        torch.testing.assert_close(a, b)
    gaussian, _ = fp.adapt(model, fp.LoraConfig(target_modules=["attn"], r=4, init_lora_weights="gaussian"))
    assert not gaussian["attn"]["out_proj.lora_B"].any()
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["attn"], r=4))
    shapes = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(peft_model).items()}
    assert shapes == {k: tuple(v.shape) for k, v in fp.to_peft_state_dict(params).items()}


def test_lora_dropout_is_not_applied_as_in_peft() -> None:
    """PEFT's forward merges the weights, so lora_dropout never runs there; the MHA's own dropout does."""
    torch.manual_seed(0)
    model = SelfAttn(True, dropout=0.3).double().train()
    kw = {"target_modules": ["attn"], "lora_dropout": 0.5, "init_lora_weights": False}
    with pytest.warns(fp.FuncpeftWarning, match=r"`lora_dropout=0.5` does not apply to the nn.MultiheadAttention"):
        params, fwd = fp.adapt(model, fp.LoraConfig(**kw))
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    peft.set_peft_model_state_dict(peft_model, _to_peft(fp.to_peft_state_dict(params)))
    x = _seq(True, LQ, 1)
    torch.manual_seed(5)
    ours = fwd(params, x)
    torch.manual_seed(5)
    theirs = peft_model(x)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_adapt_warns_about_peft_out_proj_double_delta() -> None:
    with pytest.warns(fp.FuncpeftWarning, match=r"applies it twice \(huggingface/peft#3774\)"):
        fp.adapt(SelfAttn(), fp.LoraConfig(target_modules=["attn"]))


def test_peft_eval_fast_path_skips_lora_but_funcpeft_does_not() -> None:
    """PEFT 0.21.2 quirk: in eval mode, torch's fused TransformerEncoderLayer path reads in_proj_weight directly,
    so PEFT's LoRA on self_attn has no effect there; funcpeft's view runs the reference path."""
    torch.manual_seed(0)
    model = _encoder(True).eval()
    kw = {"target_modules": ["self_attn"], "init_lora_weights": False}
    params, fwd = fp.adapt(model, fp.LoraConfig(**kw))
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw)).eval()
    x = _seq(True, LQ, 1).float()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), model(x))  # PEFT: the base model
        merged = copy.deepcopy(model)
        merged.load_state_dict(fwd.merge(params))
        torch.testing.assert_close(fwd(params, x), merged(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fwd(params, x), model(x), atol=1e-3)


def test_inspect_describes_a_saved_attention_adapter(tmp_path: Path, capsys) -> None:
    from funcpeft.__main__ import main

    config = fp.LoraConfig(target_modules=["attn"], r=4)
    params, _ = fp.adapt(SelfAttn(), config)
    fp.save(tmp_path, params, config)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["targets"] == ["attn"] and report["ranks"] == {"attn": 4} and report["scaling"] == {"attn": 2.0}
    assert report["parameters"]["adapter"] == sum(t.numel() for t in params["attn"].values()) == 4 * (E + 3 * E + 2 * E)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "1 module: attn" in capsys.readouterr().out


# ----- the method contract (tests/test_contract.py's checks) on attention models ---------------------------------
CONTRACT = [
    # (exact_identity=False: with gradients, the grad view's detached base weights make torch's matmul take another
    # kernel on non-contiguous batch-first activations, a last-bit difference that fwd(None, x) shows as well)
    contract.Case(
        "mha-self-batch_first",
        lambda: SelfAttn(True),
        lambda: (_seq(True, LQ, 1),),
        {"target_modules": ["attn"]},
        exact_identity=False,
    ),
    contract.Case(
        "mha-cross-batch_first",
        lambda: CrossAttn(True),
        lambda: (_seq(True, LQ, 1), _seq(True, LK, 2)),
        {"target_modules": ["attn"]},
        exact_identity=False,
    ),
    contract.Case(
        "mha-cross-seq_first",
        lambda: CrossAttn(False, distinct=True),
        lambda: (_seq(False, LQ, 1), _seq(False, LK, 2)),
        {"target_modules": ["attn", "q"], "use_rslora": True, "rank_pattern": {"attn": 2}, "alpha_pattern": {"q": 3}},
    ),
    contract.Case(
        "mha-no_bias-bias_kv-zero_attn",
        lambda: SelfAttn(False, bias=False, add_bias_kv=True, add_zero_attn=True),
        lambda: (_seq(False, LQ, 1),),
        {"target_modules": ["attn"], "init_lora_weights": "gaussian"},
    ),
]


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.name)
def test_method_contract(case: Any, grad: bool) -> None:
    """Fresh == base (exactly, also on torch's fused no-grad path), adapted == merged, gradients reach the adapter
    only, vmap over adapters == loop."""
    if case.exact_identity or not grad:
        contract.test_fresh_adapter_is_the_base_model(case, grad)
    else:
        model, inputs, params, fwd = contract._build(case, dtype=torch.float32)
        for out in (fwd(params, *inputs), fwd(None, *inputs)):
            torch.testing.assert_close(out, model(*inputs), rtol=1e-6, atol=1e-7)
    contract.test_adapted_equals_merged(case, grad)
    contract.test_vmap_over_adapters_equals_loop(case, grad)
    if grad:
        contract.test_gradients_reach_adapter_leaves_only(case)
