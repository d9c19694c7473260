"""Hostile review of the non-LoRA methods and of funcpeft.optim: edge cases PEFT and torch.optim are the oracles for.

- AdaLoRA on a half-precision base is PEFT's bit for bit (PEFT adds the float32 update to the half output in place,
  one rounding);
- every method runs an empty batch as the base does, with zero gradients, and merges;
- trainable tokens on a Linear with a bias keep the bias, as PEFT's merged model (PEFT's unmerged forward drops it);
- an optimizer state made for another tree (a stacked tree's state for an unstacked one, or the other way; another
  dtype) is refused by leaf instead of broadcasting into params of the wrong shape; ``apply_updates`` refuses updates
  of another shape; per-adapter clipping handles zero-size leaves and an empty stack;
- NaN / inf gradients propagate exactly as in torch.optim;
- the AdaLoRA allocator and ``orth_regularization`` refuse a stacked tree by name (``vmap`` works for the latter).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import optree
import pytest
import torch
from _models import MLP, oracle, tiny_gpt2, token_ids
from torch import nn

import funcpeft as fp
import funcpeft.optim as fo

peft = oracle("peft")


class Conv(nn.Module):
    def __init__(self, kernel_size: int = 3, **kw: Any) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 8, kernel_size, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(x).mean((-1, -2)))


def _conv_in(batch: int = 2) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 4, 7, 6, generator=torch.Generator().manual_seed(4)),)


def _mlp_in(batch: int = 3) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 10, generator=torch.Generator().manual_seed(5)),)


def _out(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.logits


def _perturbed(params: fp.Params) -> fp.Params:
    """Random non-zero adapter tensors (a fresh AdaLoRA has E = 0); the root entry (VeRA's projections) kept."""
    g = torch.Generator().manual_seed(3)
    return {
        path: {
            name: t
            if path == ""
            else (t.detach() + 0.3 * torch.randn(t.shape, generator=g).to(t.dtype)).requires_grad_()
            for name, t in entry.items()
        }
        for path, entry in params.items()
    }


# ----- AdaLoRA on a half-precision base: PEFT's rounding -----------------------------------------------------------
ADALORA = {"init_r": 4, "target_r": 2, "total_step": 10}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("factory", "inputs", "targets"),
    [(MLP, _mlp_in, ["lin0", "lin1"]), (lambda: Conv(kernel_size=3, padding=1), _conv_in, ["c"]),
     (tiny_gpt2, lambda: (token_ids(),), ["c_attn"])],
    ids=["linear", "conv2d", "gpt2-conv1d"],
)  # fmt: skip
def test_adalora_on_a_half_precision_base_is_peft_s_bit_for_bit(dtype: torch.dtype, factory, inputs, targets) -> None:
    torch.manual_seed(0)
    model = factory().to(dtype).eval()
    x = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs())
    config = fp.AdaLoraConfig(target_modules=targets, **ADALORA)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(1))
    params = _perturbed(params)
    assert {t.dtype for e in params.values() for t in e.values()} == {torch.float32}, "PEFT's float32 adapters"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(target_modules=targets, **ADALORA))
    peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(params, config))
    ours, theirs = _out(fwd(params, *x)), _out(twin.eval()(*x))
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    for path, entry in params.items():
        for name, t in entry.items():
            torch.testing.assert_close(t.grad, grads[f"base_model.model.{path}.{name}.default"], rtol=0, atol=0)


# ----- empty batches --------------------------------------------------------------------------------------------------
EMPTY = [
    ("loha-conv-cp", fp.LoHaConfig, Conv, {"target_modules": ["c"], "r": 2, "use_effective_conv2d": True}),
    ("lokr-linear", fp.LoKrConfig, MLP, {"target_modules": ["lin0", "lin1"], "r": 1, "decompose_both": True}),
    ("vera", fp.VeraConfig, MLP, {"target_modules": ["lin0", "lin1"], "r": 4}),
    ("oft-conv1x1", fp.OFTConfig, lambda: Conv(kernel_size=1), {"target_modules": ["c"], "oft_block_size": 2}),
    ("ia3-conv", fp.IA3Config, Conv, {"target_modules": ["c"], "feedforward_modules": ["c"]}),
    ("adalora-linear", fp.AdaLoraConfig, MLP, {"target_modules": ["lin0"], **ADALORA}),
]


@pytest.mark.parametrize(("name", "config_type", "factory", "kw"), EMPTY, ids=[c[0] for c in EMPTY])
def test_an_empty_batch_runs_as_the_base_with_zero_gradients(name: str, config_type, factory, kw) -> None:
    """(PEFT's OFT fails on an empty Conv2d batch: its reshape cannot infer -1 from 0 elements.)"""
    torch.manual_seed(0)
    model = factory().eval()
    params, fwd = fp.adapt(model, config_type(**kw), generator=torch.Generator().manual_seed(1))
    params = _perturbed(params)
    x = _conv_in(0) if "conv" in name else _mlp_in(0)
    out = fwd(params, *x)
    assert out.shape == model(*x).shape == (0, out.shape[1])
    out.sum().backward()
    for path, entry in params.items():
        for t in entry.values():
            assert path == "" or (t.grad is not None and not t.grad.any())
    twin = copy.deepcopy(model)
    twin.load_state_dict(fwd.merge(params))
    x = _conv_in() if "conv" in name else _mlp_in()
    torch.testing.assert_close(twin(*x), fwd(params, *x))


# ----- trainable tokens on a biased Linear ---------------------------------------------------------------------------
def test_trainable_tokens_on_a_biased_linear_keep_the_bias_as_peft_s_merge() -> None:
    torch.manual_seed(0)
    model = MLP().double().eval()
    config = fp.TrainableTokensConfig(token_indices=[2, 7], target_modules=["lin1"])
    params, fwd = fp.adapt(model, config)
    with torch.no_grad():
        params["lin1"]["trainable_tokens_delta"].normal_(generator=torch.Generator().manual_seed(3))
    twin = peft.get_peft_model(copy.deepcopy(model), peft.TrainableTokensConfig(token_indices=[2, 7],
                                                                                target_modules=["lin1"]))  # fmt: skip
    peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(params, config))
    x = _mlp_in()[0].double()
    h = torch.relu(model.lin0(x))
    rows = torch.nn.functional.linear(h, params["lin1"]["trainable_tokens_delta"], model.lin1.bias[[2, 7]])
    ours = fwd.method(lambda m, h: m.lin1(h))(params, h)
    torch.testing.assert_close(ours[:, [2, 7]], rows)  # the trained rows, with their bias
    torch.testing.assert_close(ours[:, [0, 1]], model.lin1(h)[:, [0, 1]], rtol=0, atol=0)
    unmerged = twin.eval()(x)
    merged = twin.merge_and_unload()(x)
    torch.testing.assert_close(fwd(params, x), merged, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(unmerged, merged), "PEFT's unmerged Linear path drops the bias (F.linear without it)"


# ----- optimizer states that belong to another tree -----------------------------------------------------------------
SHAPES = {"lin0": {"lora_A": (4, 6), "lora_B": (5, 4)}, "head": {"bias": (3,)}}


def _tree(seed: int, k: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    lead = () if k is None else (k,)
    return {p: {n: torch.randn(*lead, *s, generator=g).to(dtype) for n, s in e.items()} for p, e in SHAPES.items()}


OPTIMIZERS = {
    "adamw": lambda: fo.adamw(1e-2),
    "sgd-momentum": lambda: fo.sgd(0.1, momentum=0.9),
    "multi_steps": lambda: fo.multi_steps(fo.sgd(0.1), 1),
    "chain-clip-adam": lambda: fo.chain(fo.clip_by_global_norm(1.0), fo.adam(1e-2, weight_decay=0.1)),
}


@pytest.mark.parametrize("make", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
@pytest.mark.parametrize("init_k", [2, 1], ids=["stacked-state-on-unstacked", "K1-state-on-unstacked"])
def test_a_state_made_for_a_stacked_tree_is_refused_on_an_unstacked_one(make, init_k: int) -> None:
    """torch's foreach ops broadcast: the (K, ...) moments used to turn the updates, and so the params, into (K, ...)
    tensors without a word."""
    opt = make()
    state = opt.init(_tree(0, k=init_k))
    params, grads = _tree(1), _tree(2)
    before = optree.tree_map(torch.clone, (params, grads, state))
    with pytest.raises(
        ValueError, match=r"optimizer state's `(mu|trace|acc_grads)` at '(head\.bias|lin0\.lora_A)' has shape"
    ):
        opt.update(grads, state, params)
    for a, b in zip(optree.tree_leaves(before), optree.tree_leaves((params, grads, state)), strict=True):
        assert torch.equal(a, b)


def test_an_unstacked_state_on_a_stacked_tree_and_one_of_another_dtype_are_refused_by_leaf() -> None:
    opt = fo.adamw(1e-2)
    stacked = _tree(1, k=2)
    with pytest.raises(
        ValueError, match=r"`mu` at 'head\.bias' has shape \(3,\), but the update there has shape \(2, 3\)"
    ):
        opt.update(stacked, opt.init(_tree(0)), stacked)
    state = opt.init(_tree(0))  # float32 moments
    double = _tree(1, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"`mu` at 'head\.bias' is torch\.float32, but the update there is torch\.float64"
    ):
        opt.update(double, state, double)
    other_rank = {"lin0": {"lora_A": torch.zeros(2, 6), "lora_B": torch.zeros(5, 2)}, "head": {"bias": torch.zeros(3)}}
    with pytest.raises(
        ValueError, match=r"`trace` at 'lin0\.lora_A' has shape \(4, 6\), but the update there has shape \(2, 6\)"
    ):
        sgd = fo.sgd(0.1, momentum=0.9)
        sgd.update(other_rank, sgd.init(_tree(0)), other_rank)


def test_apply_updates_refuses_updates_of_another_shape() -> None:
    params = _tree(0)
    for bad in (lambda t: torch.zeros(2, *t.shape), lambda t: torch.zeros(())):
        with pytest.raises(ValueError, match=r"`updates` at '(head\.bias|lin0\.lora_A)' has shape .* but the param"):
            fo.apply_updates(params, optree.tree_map(bad, params))
    new = fo.apply_updates(params, optree.tree_map(torch.ones_like, params))  # the right shapes still work
    assert all(torch.equal(n, p + 1) for n, p in zip(optree.tree_leaves(new), optree.tree_leaves(params), strict=True))


def test_stacked_clipping_with_zero_size_leaves_and_an_empty_stack() -> None:
    """AdaLoRA entries pruned to rank 0 are zero-size leaves; K = 0 adapters is an empty stack."""
    g = torch.Generator().manual_seed(0)
    grads = {
        "a": {"lora_A": torch.randn(3, 0, 5), "lora_E": torch.randn(3, 0, 1)},
        "b": {"x": torch.randn(3, 4, generator=g)},
    }
    out, _ = fo.clip_by_global_norm(0.5, stacked=True).update(grads, fo.EmptyState())
    for k in range(3):
        leaf = grads["b"]["x"][k].clone().requires_grad_()
        leaf.grad = grads["b"]["x"][k].clone()
        torch.nn.utils.clip_grad_norm_([leaf], 0.5)
        torch.testing.assert_close(out["b"]["x"][k], leaf.grad, rtol=0, atol=0)
    assert out["a"]["lora_A"].shape == (3, 0, 5)
    empty = {"b": {"x": torch.zeros(0, 4)}, "c": {"y": torch.zeros(0)}}
    out, _ = fo.clip_by_global_norm(0.5, stacked=True).update(empty, fo.EmptyState())
    assert out["b"]["x"].shape == (0, 4) and out["c"]["y"].shape == (0,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradients_propagate_as_in_torch_optim(bad: float) -> None:
    grads = [_tree(1), _tree(2)]
    grads[0]["lin0"]["lora_A"][0, 0] = bad
    cases = [
        (fo.adamw(1e-2), lambda ps: torch.optim.AdamW(ps, 1e-2), None),
        (
            fo.sgd(0.1, momentum=0.9, nesterov=True),
            lambda ps: torch.optim.SGD(ps, 0.1, momentum=0.9, nesterov=True),
            None,
        ),
        (fo.chain(fo.clip_by_global_norm(1.0), fo.sgd(0.1)), lambda ps: torch.optim.SGD(ps, 0.1), 1.0),
    ]
    for opt, make_torch, clip in cases:
        params = _tree(0)
        state = opt.init(params)
        leaves, spec = optree.tree_flatten(params)
        theirs = [t.clone().requires_grad_() for t in leaves]
        torch_opt = make_torch(theirs)
        for g in grads:
            updates, state = opt.update(g, state, params)
            params = fo.apply_updates(params, updates)
            for p, gi in zip(theirs, spec.flatten_up_to(g), strict=True):
                p.grad = gi.clone()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(theirs, clip)
            torch_opt.step()
        for a, b in zip(optree.tree_leaves(params), theirs, strict=True):
            torch.testing.assert_close(a, b, equal_nan=True)


# ----- the AdaLoRA allocator on a stacked tree ---------------------------------------------------------------------
def test_the_adalora_allocator_and_orth_regularization_refuse_a_stacked_tree() -> None:
    config = fp.AdaLoraConfig(target_modules=["lin0", "lin1"], init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2)
    first, fwd = fp.adapt(MLP(), config, generator=torch.Generator().manual_seed(0))
    second = fwd.init(torch.Generator().manual_seed(1))
    stacked = fp.stack([first, second])
    alloc = fp.adalora.allocator(config)
    with pytest.raises(ValueError, match=r"`params\['lin0'\]` holds lora_A \(2, 4, 10\).*funcpeft\.unstack"):
        alloc.init(stacked)  # it used to count K as the rank budget, then fail deep in torch.cat
    state = alloc.init(first)
    with pytest.raises(ValueError, match=r"not one AdaLoRA adapter's"):
        alloc.update(stacked, stacked, state, 0)
    with pytest.raises(ValueError, match=r"orth_regularization also under torch\.func\.vmap"):
        fp.adalora.orth_regularization(stacked)
    each = torch.func.vmap(fp.adalora.orth_regularization)(stacked)
    expected = torch.stack([fp.adalora.orth_regularization(first), fp.adalora.orth_regularization(second)])
    torch.testing.assert_close(each, expected)


def test_trainable_tokens_errors_name_the_configs_own_field() -> None:
    """TrainableTokensConfig's field is `token_indices`: its errors named LoraConfig's `trainable_token_indices`, and
    an empty list was told to 'leave the field None', which that config does not accept."""
    model = tiny_gpt2(n_layer=1)
    with pytest.raises(ValueError, match=r"^`token_indices` \[5000\] for 'transformer\.wte' are out of range"):
        fp.adapt(model, fp.TrainableTokensConfig(token_indices=[1, 5000], target_modules=["wte"]))
    with pytest.raises(ValueError, match=r"^`token_indices` selects 'transformer\.h\.0\.ln_1', a LayerNorm"):
        fp.adapt(model, fp.TrainableTokensConfig(token_indices=[1], target_modules=["ln_1"]))
    with pytest.raises(ValueError, match="is empty") as empty:
        fp.TrainableTokensConfig(token_indices=[], target_modules=["wte"])
    assert "None" not in str(empty.value)
    with pytest.raises(ValueError, match=r"is empty: list at least one token index \(or leave the field None\)"):
        fp.LoraConfig(target_modules=["c_attn"], trainable_token_indices=[])
