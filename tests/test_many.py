"""``funcpeft.stack`` / ``unstack`` / ``combine``: round trips, clear errors, vmap over a stack, and PEFT's
``add_weighted_adapter`` as the oracle for ``combine`` (tensors, outputs and the new config)."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _models import MLP, ConvNet, EmbNet, conv_inputs, oracle, tiny_gpt2, tiny_llama, token_ids
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcpeft as fp
from funcpeft.many import combine, stack, unstack

peft = oracle("peft")


@pytest.fixture(autouse=True)
def _one_thread():
    # LAPACK's SVD of these tiny matrices gains nothing from threads, and its OpenMP workers can stall for ~1 s
    # per call on an oversubscribed CI machine; run this file's numerics on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _out(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.logits


# ----- stack / unstack ------------------------------------------------------------------------------------------

NAMES = ["lora_A", "lora_B", "ia3_l", "bias"]


@st.composite
def adapter_lists(draw: st.DrawFn) -> list[dict[str, dict[str, torch.Tensor]]]:
    """K adapter trees of one random structure (1-3 modules, 1-3 tensors each, shapes with zero-size dims)."""
    k = draw(st.integers(1, 4))
    paths = draw(st.lists(st.from_regex(r"[a-z]{1,3}(\.[0-9])?", fullmatch=True), min_size=1, max_size=3, unique=True))
    shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
    structure = {p: {n: draw(shapes) for n in draw(st.lists(st.sampled_from(NAMES), min_size=1, unique=True))}
                 for p in paths}  # fmt: skip
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return [
        {p: {n: torch.randn(s, generator=g, dtype=dtype).requires_grad_(True) for n, s in e.items()}
         for p, e in structure.items()}
        for _ in range(k)
    ]  # fmt: skip


def _assert_fresh_leaf(t: torch.Tensor, *others: torch.Tensor) -> None:
    assert t.is_leaf and t.requires_grad
    if t.numel():
        assert all(t.untyped_storage().data_ptr() != o.untyped_storage().data_ptr() for o in others)


@settings(max_examples=40, deadline=None)
@given(adapters=adapter_lists())
def test_stack_then_unstack_round_trips(adapters: list[fp.Params]) -> None:
    stacked = stack(adapters)
    k = len(adapters)
    assert list(stacked) == list(adapters[0])  # the first adapter's module and tensor order
    for path, entry in stacked.items():
        assert list(entry) == list(adapters[0][path])
        for name, leaf in entry.items():
            assert leaf.shape == (k, *adapters[0][path][name].shape)
            _assert_fresh_leaf(leaf, *(a[path][name] for a in adapters))
            for i, adapter in enumerate(adapters):
                assert torch.equal(leaf[i], adapter[path][name])
    back = unstack(stacked)
    assert len(back) == k
    for adapter, again in zip(adapters, back, strict=True):
        assert list(again) == list(adapter)
        for path, entry in again.items():
            assert list(entry) == list(adapter[path])
            for name, leaf in entry.items():
                assert torch.equal(leaf, adapter[path][name]) and leaf.dtype == adapter[path][name].dtype
                _assert_fresh_leaf(leaf, stacked[path][name], *(b[path][name] for b in back if b is not again))


@settings(max_examples=40, deadline=None)
@given(adapters=adapter_lists(), data=st.data())
def test_stack_names_the_first_module_whose_shape_differs(adapters: list[fp.Params], data: st.DataObject) -> None:
    adapters = adapters if len(adapters) > 1 else adapters * 2
    index = data.draw(st.integers(1, len(adapters) - 1))
    path = data.draw(st.sampled_from(list(adapters[0])))
    name = data.draw(st.sampled_from(list(adapters[0][path])))
    old = adapters[0][path][name]
    bad = copy.copy(adapters[index])
    bad[path] = {**bad[path], name: torch.zeros(*old.shape, 7)}
    adapters = [*adapters[:index], bad, *adapters[index + 1 :]]
    with pytest.raises(ValueError) as err:
        stack(adapters)
    message = str(err.value)
    assert f"list_of_params[{index}][{path!r}][{name!r}]" in message
    assert str((*old.shape, 7)) in message and str(tuple(old.shape)) in message


def _pair(seed: int = 0) -> list[fp.Params]:
    _, fwd = fp.adapt(MLP(), fp.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False))
    return [fwd.init(torch.Generator().manual_seed(seed + i)) for i in range(2)]


def test_stack_errors_name_the_offending_module() -> None:
    a, b = _pair()
    with pytest.raises(ValueError, match=r"`list_of_params\[1\]` has no module 'lin1', which `list_of_params\[0\]`"):
        stack([a, {"lin0": b["lin0"]}])
    with pytest.raises(ValueError, match=r"`list_of_params\[1\]` has module 'head', which `list_of_params\[0\]` lacks"):
        stack([a, {**b, "head": b["lin0"]}])
    with pytest.raises(ValueError, match=r"Module 'lin1' holds \['lora_A', 'lora_B'\] .* but \['lora_A'\]"):
        stack([a, {**b, "lin1": {"lora_A": b["lin1"]["lora_A"]}}])
    with pytest.raises(ValueError, match=r"\[1\]\['lin0'\]\['lora_B'\]` has dtype torch.float64, .* torch.float32"):
        stack([a, {**b, "lin0": {**b["lin0"], "lora_B": b["lin0"]["lora_B"].double()}}])
    with pytest.raises(ValueError, match="is empty"):
        stack([])
    with pytest.raises(TypeError, match=r"got a single dict; wrap it in a list: `\[params\]`"):
        stack(a)
    with pytest.raises(TypeError, match=r"`list_of_params\[1\]\['lin0'\]\['lora_A'\]` must be a Tensor, got list"):
        stack([a, {**b, "lin0": {"lora_A": [1.0], "lora_B": b["lin0"]["lora_B"]}}])
    with pytest.raises(TypeError, match=r"`list_of_params\[0\]` must be an adapter dict"):
        stack([None])


def test_unstack_errors() -> None:
    stacked = stack(_pair())
    with pytest.raises(ValueError, match=r"`stacked\['lin1'\]\['lora_B'\]` has leading dimension 3, but "):
        unstack({**stacked, "lin1": {**stacked["lin1"], "lora_B": torch.zeros(3, 20, 2)}})
    with pytest.raises(ValueError, match=r"`stacked\['lin0'\]\['lora_A'\]` is a 0-d tensor"):
        unstack({"lin0": {"lora_A": torch.tensor(1.0)}})
    with pytest.raises(ValueError, match="holds no tensors"):
        unstack({})
    with pytest.raises(TypeError, match="`stacked` must be an adapter dict"):
        unstack([stacked])


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_vmap_over_a_stack_equals_a_loop(factory: Callable[[], nn.Module]) -> None:
    model = factory()
    _, fwd = fp.adapt(model, fp.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(3)]
    ids = token_ids()
    out = torch.func.vmap(fwd, in_dims=(0, None))(stack(adapters), ids, use_cache=False).logits
    assert out.shape[0] == 3
    for k, adapter in enumerate(adapters):
        torch.testing.assert_close(out[k], fwd(adapter, ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[1])


# ----- combine against PEFT's add_weighted_adapter --------------------------------------------------------------


def _adapters(model: nn.Module, config: fp.AdapterConfig, n: int) -> list[fp.Params]:
    _, fwd = fp.adapt(model, config)
    return [fwd.init(torch.Generator().manual_seed(10 + s)) for s in range(n)]


def _peft_combined(
    model: nn.Module, config: fp.AdapterConfig, peft_kwargs: dict, adapters: list[fp.Params], weights, **kwargs
) -> tuple[nn.Module, Any]:
    """PEFT's model holding ``adapters`` as a0, a1, ... and their ``add_weighted_adapter`` as "new" (active)."""
    peft_config = peft.IA3Config if isinstance(config, fp.IA3Config) else peft.LoraConfig
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config(**peft_kwargs), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, peft_config(**peft_kwargs))
    for name, adapter in zip(names, adapters, strict=True):
        peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(adapter, config), adapter_name=name)
    peft_model.add_weighted_adapter(names, weights, "new", **kwargs)
    peft_model.set_adapter("new")
    return peft_model.eval(), peft_model.peft_config["new"]


def _assert_config_as_peft(ours: fp.AdapterConfig, theirs: Any, **differences: Any) -> None:
    """Every field of our config equals PEFT's (collections compared as sets: PEFT stores sets)."""
    for field in dataclasses.fields(ours):
        mine, yours = getattr(ours, field.name), getattr(theirs, field.name)
        if field.name in differences:
            assert (mine, yours) == differences[field.name], field.name
            continue
        if isinstance(mine, (list, tuple, set, frozenset)) or isinstance(yours, (list, tuple, set, frozenset)):
            mine, yours = set(mine), set(yours)
        assert mine == yours, f"{field.name}: ours {mine!r}, PEFT's {yours!r}"


def _delta(entry: dict[str, torch.Tensor]) -> torch.Tensor:
    a_name, b_name = ("lora_A", "lora_B") if "lora_A" in entry else ("lora_embedding_A", "lora_embedding_B")
    a, b = entry[a_name], entry[b_name]
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


def _compare(model, config, new, new_config, peft_model, inputs, kwargs, method: str, exact: bool = True) -> None:
    theirs = fp.from_peft_state_dict(peft.get_peft_model_state_dict(peft_model, adapter_name="new"), new_config)
    assert new.keys() == theirs.keys()
    for path, entry in new.items():
        assert entry.keys() == theirs[path].keys()
        for name, leaf in entry.items():
            assert leaf.is_leaf and leaf.requires_grad
            if exact and method != "svd":  # SVD factors are unique only up to the sign of each singular pair
                torch.testing.assert_close(leaf, theirs[path][name], msg=f"{path}.{name}")
        torch.testing.assert_close(_delta(entry), _delta(theirs[path]), rtol=1e-5, atol=1e-6, msg=path)
    _, fwd = fp.adapt(model, new_config)
    with torch.no_grad():
        torch.testing.assert_close(_out(fwd(new, *inputs, **kwargs)), _out(peft_model(*inputs, **kwargs)))


# (id, model factory, inputs, LoRA kwargs shared by funcpeft and PEFT, forward kwargs)
LORA_CASES = [
    ("mlp", MLP, lambda: (torch.randn(3, 10),), {"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"]}, {}),
    ("gpt2", tiny_gpt2, lambda: (token_ids(),),
     {"r": 4, "lora_alpha": 16, "target_modules": r".*\.(c_attn|c_fc)", "fan_in_fan_out": True}, {"use_cache": False}),
    ("embedding", EmbNet, lambda: (token_ids(vocab=20),), {"r": 3, "lora_alpha": 6, "target_modules": ["emb", "lin"]},
     {}),
]  # fmt: skip
WEIGHTS = [[0.7, -1.3], [1.0, 0.5, -0.25]]


@pytest.mark.parametrize("weights", WEIGHTS, ids=["2", "3"])
@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
@pytest.mark.parametrize(("name", "factory", "inputs", "kw", "fwd_kw"), LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_combine_equals_peft(name, factory, inputs, kw, fwd_kw, method: str, weights: list[float]) -> None:
    model = factory()
    config = fp.LoraConfig(init_lora_weights=False, **kw)
    adapters = _adapters(model, config, len(weights))
    new, new_config = combine(adapters, weights, config, method)
    peft_model, peft_config = _peft_combined(model, config, kw, adapters, weights, combination_type=method)
    _assert_config_as_peft(new_config, peft_config, init_lora_weights=(False, True))
    r = kw["r"]
    assert new_config.r == new_config.lora_alpha == (len(weights) * r if method == "cat" else r)
    _compare(model, config, new, new_config, peft_model, inputs(), fwd_kw, method)


def test_combine_regex_targets_are_joined_as_peft_does() -> None:
    config = fp.LoraConfig(r=2, target_modules="lin[01]", init_lora_weights=False)
    adapters = _adapters(MLP(), config, 3)
    assert combine(adapters, [1, 2, 3], config, "cat")[1].target_modules == "(lin[01])|(lin[01])|(lin[01])"
    listed = config.replace(target_modules=["lin0", "lin1"])
    assert combine(adapters, [1, 2, 3], listed, "cat")[1].target_modules == ["lin0", "lin1"]
    assert combine(adapters, [1, 2, 3], config.replace(target_modules="all-linear"))[1].target_modules == "all-linear"


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_combine_svd_rank_and_a_single_adapter_as_peft(method: str) -> None:
    model, kw = MLP(), {"r": 4, "lora_alpha": 4, "target_modules": ["lin0", "lin1"]}
    config = fp.LoraConfig(init_lora_weights=False, **kw)
    adapters = _adapters(model, config, 2)
    x = (torch.randn(3, 10),)
    # one adapter: PEFT always combines linearly, whatever the method, and keeps the rank
    new, new_config = combine(adapters[:1], [-0.6], config, method)
    peft_model, peft_config = _peft_combined(model, config, kw, adapters[:1], [-0.6], combination_type=method)
    _assert_config_as_peft(new_config, peft_config, init_lora_weights=(False, True))
    _compare(model, config, new, new_config, peft_model, x, {}, "linear")
    if method == "svd":
        new, new_config = combine(adapters, [0.5, 2.0], config, "svd", rank=7)
        peft_model, peft_config = _peft_combined(model, config, kw, adapters, [0.5, 2.0], svd_rank=7)
        assert new_config.r == new_config.lora_alpha == 7
        _assert_config_as_peft(new_config, peft_config, init_lora_weights=(False, True))
        _compare(model, config, new, new_config, peft_model, x, {}, "svd")


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_combine_with_rank_and_alpha_patterns_as_peft(method: str) -> None:
    model = MLP()
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"], "rank_pattern": {"lin1": 6},
          "alpha_pattern": {"lin0": 3}}  # fmt: skip
    config = fp.LoraConfig(init_lora_weights=False, **kw)
    adapters = _adapters(model, config, 2)
    new, new_config = combine(adapters, [0.8, -0.4], config, method)
    peft_model, peft_config = _peft_combined(model, config, kw, adapters, [0.8, -0.4], combination_type=method)
    _assert_config_as_peft(new_config, peft_config, init_lora_weights=(False, True))
    # the new rank is the largest of the config's (6), times 2 for 'cat'
    assert new_config.r == new_config.lora_alpha == (12 if method == "cat" else 6)
    assert new_config.rank_pattern == {} and new_config.alpha_pattern == {}
    # PEFT leaves 'linear' at lin0's own rank 4 under a config of rank 6; funcpeft zero-pads it to fit the config
    assert new["lin0"]["lora_A"].shape[0] == new_config.r
    _compare(model, config, new, new_config, peft_model, (torch.randn(3, 10),), {}, method, exact=method == "cat")


def test_combine_convolutions_as_peft() -> None:
    model, kw = ConvNet(), {"r": 2, "lora_alpha": 4, "target_modules": ["c1", "c2", "c3"]}
    config = fp.LoraConfig(init_lora_weights=False, **kw)
    adapters = _adapters(model, config, 2)
    for method in ("cat", "linear"):
        new, new_config = combine(adapters, [0.3, -1.1], config, method)
        peft_model, _ = _peft_combined(model, config, kw, adapters, [0.3, -1.1], combination_type=method)
        _compare(model, config, new, new_config, peft_model, conv_inputs(), {}, method)
    # PEFT's SVD flattens Conv2d kernels only (Conv1d/3d get a batched SVD over the kernel dims)
    kw2 = {**kw, "target_modules": ["c2"]}
    config2 = fp.LoraConfig(init_lora_weights=False, **kw2)
    adapters2 = _adapters(model, config2, 2)
    new, new_config = combine(adapters2, [0.3, -1.1], config2, "svd")
    peft_model, _ = _peft_combined(model, config2, kw2, adapters2, [0.3, -1.1])
    _compare(model, config2, new, new_config, peft_model, conv_inputs(), {}, "svd")


def _weighted_delta(adapters: list[fp.Params], weights: list[float], path: str, scaling: float) -> torch.Tensor:
    return sum(w * scaling * _delta(a[path]) for a, w in zip(adapters, weights, strict=True))


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_cat_and_full_rank_svd_are_the_exact_weighted_sum_of_deltas(method: str) -> None:
    # Conv1d/Conv3d SVD (where PEFT's is not the delta's SVD) and a rank above the head's min(out, in) = 4 (where
    # PEFT's factors do not even multiply): funcpeft's factors reproduce sum_i w_i s_i B_i A_i exactly.
    model = ConvNet()
    config = fp.LoraConfig(r=2, lora_alpha=3, target_modules=["c1", "c2", "c3", "head"], init_lora_weights=False)
    adapters = _adapters(model, config, 3)
    weights = [0.5, -2.0, 1.5]
    new, new_config = combine(adapters, weights, config, method, rank=6 if method == "svd" else None)
    assert new_config.r == 6
    for path, entry in new.items():
        assert entry["lora_A"].shape[0] == entry["lora_B"].shape[1] == 6, path
        expected = _weighted_delta(adapters, weights, path, 3 / 2)
        torch.testing.assert_close(_delta(entry), expected, rtol=1e-4, atol=1e-5, msg=path)


def test_rslora_combines_to_scaling_one() -> None:
    # PEFT's tensors, but PEFT keeps use_rslora=True, scaling the new adapter by sqrt(new_rank) (peft#3449)
    model, kw = MLP(), {"r": 4, "lora_alpha": 4, "target_modules": ["lin0", "lin1"], "use_rslora": True}
    config = fp.LoraConfig(init_lora_weights=False, **kw)
    adapters = _adapters(model, config, 2)
    new, new_config = combine(adapters, [1.0, -0.5], config, "cat")
    peft_model, peft_config = _peft_combined(model, config, kw, adapters, [1.0, -0.5], combination_type="cat")
    _assert_config_as_peft(new_config, peft_config, init_lora_weights=(False, True), use_rslora=(False, True))
    theirs = fp.from_peft_state_dict(peft.get_peft_model_state_dict(peft_model, adapter_name="new"), new_config)
    for path in new:
        torch.testing.assert_close(new[path], theirs[path])
    # a single adapter with weight 1 is that adapter again
    x = torch.randn(3, 10)
    one, one_config = combine(adapters[:1], [1.0], config)
    torch.testing.assert_close(fp.adapt(model, one_config)[1](one, x), fp.adapt(model, config)[1](adapters[0], x))


@pytest.mark.parametrize("n", [1, 2])
def test_combine_refuses_trainable_biases_as_peft(n: int) -> None:
    # PEFT allows one adapter with bias per model, so add_weighted_adapter cannot create one either
    model, kw = MLP(), {"r": 2, "target_modules": ["lin0", "lin1"], "bias": "all"}
    config = fp.LoraConfig(init_lora_weights=False, **kw)
    adapters = _adapters(model, config, n)
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        _peft_combined(model, config, kw, adapters, [0.5] * n, combination_type="linear")
    with pytest.raises(ValueError, match="Cannot combine adapters with `bias='all'`: .*supports only 1 adapter with"):
        combine(adapters, [0.5] * n, config, "linear")


IA3_CASES = [
    ("gpt2", tiny_gpt2, lambda: (token_ids(),),
     {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"], "fan_in_fan_out": True},
     {"use_cache": False}),
    ("mlp-regex", MLP, lambda: (torch.randn(3, 10),), {"target_modules": "lin[01]|head", "feedforward_modules": "lin1"},
     {}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "factory", "inputs", "kw", "fwd_kw"), IA3_CASES, ids=[c[0] for c in IA3_CASES])
def test_ia3_combine_equals_peft(name, factory, inputs, kw, fwd_kw) -> None:
    model = factory()
    config = fp.IA3Config(init_ia3_weights=False, **kw)
    adapters = _adapters(model, config, 3)
    weights = [0.6, -0.9, 1.7]
    new, new_config = combine(adapters, weights, config, method="whatever: ignored for IA3")
    peft_model, peft_config = _peft_combined(model, config, kw, adapters, weights)
    _assert_config_as_peft(new_config, peft_config, init_ia3_weights=(False, True))
    theirs = fp.from_peft_state_dict(peft.get_peft_model_state_dict(peft_model, adapter_name="new"), new_config)
    assert new.keys() == theirs.keys()
    for path, entry in new.items():
        assert entry["ia3_l"].is_leaf and entry["ia3_l"].requires_grad
        torch.testing.assert_close(entry["ia3_l"], theirs[path]["ia3_l"])
        expected = sum(w * a[path]["ia3_l"] for a, w in zip(adapters, weights, strict=True))
        torch.testing.assert_close(entry["ia3_l"], expected)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            _out(fp.adapt(model, new_config)[1](new, *x, **fwd_kw)), _out(peft_model(*x, **fwd_kw))
        )


# ----- combine: what PEFT refuses or gets wrong, and bad arguments ------------------------------------------------


def test_combine_refuses_what_peft_refuses_or_builds_wrong() -> None:
    model = MLP()
    lora = fp.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False)
    for kwargs, pattern in [
        ({"use_dora": True}, "DoRA adapters .* magnitude at its initial value"),
        ({"lora_bias": True}, "`lora_bias=True`: PEFT's add_weighted_adapter leaves the new lora_B bias"),
        ({"modules_to_save": ["head"]}, "PEFT refuses to add weighted adapters that target the same module"),
    ]:
        config = lora.replace(**kwargs)
        with pytest.raises(ValueError, match=pattern):
            combine(_adapters(model, config, 2), [1.0, 1.0], config)
    config = lora.replace(modules_to_save=["head"])
    with pytest.raises(ValueError, match="a fresh copy of the base model's module"):
        combine(_adapters(model, config, 1), [1.0], config)
    ia3 = fp.IA3Config(target_modules=["lin0"], feedforward_modules=[], modules_to_save=["head"])
    with pytest.raises(ValueError, match="modules_to_save"):
        combine(_adapters(model, ia3, 2), [1.0, 1.0], ia3)
    ada = fp.AdaLoraConfig(target_modules=["lin0"], total_step=10)
    with pytest.raises(TypeError, match="AdaLoraModel does not support add_weighted_adapter"):
        combine(_adapters(model, ada, 2), [1.0, 1.0], ada)
    grouped = fp.LoraConfig(r=4, target_modules=["c2"], init_lora_weights=False)
    adapters = _adapters(ConvNet(groups=2), grouped, 2)
    with pytest.raises(ValueError, match="'c2' is a grouped convolution .*groups=2"):
        combine(adapters, [1.0, 1.0], grouped, "cat")
    combine(adapters, [1.0, 1.0], grouped, "linear")  # sums keep the block structure


def test_combine_argument_errors() -> None:
    config = fp.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False)
    adapters = _adapters(MLP(), config, 2)
    for kwargs, error, pattern in [
        ({"weights": [1.0]}, ValueError, "`weights` has 1 entries but `list_of_params` has 2 adapters"),
        ({"weights": 1.0}, TypeError, "`weights` must be a list of numbers"),
        ({"weights": [1.0, True]}, TypeError, r"`weights\[1\]` must be a real number, got True"),
        ({"weights": [1.0, torch.tensor(1.0)]}, TypeError, r"use .item\(\) for a tensor"),
        ({"weights": [math.nan, 1.0]}, ValueError, r"`weights\[0\]` must be finite"),
        ({"method": "mean"}, ValueError, r"`method` must be one of \['cat', 'linear', 'svd'\]"),
        ({"method": "ties"}, ValueError, "prunes by PEFT's `density`"),
        ({"method": "cat", "rank": 3}, ValueError, "`rank` only applies to method='svd'"),
        ({"rank": 0}, ValueError, "`rank` must be a positive integer"),
        ({"config": fp.IA3Config(target_modules=["lin0"])}, ValueError, r"holds \['lora_A', 'lora_B'\], but a IA3"),
        ({"config": config.replace(r=3)}, ValueError, r"has rank 2, but `config` gives module 'lin0' rank 3"),
        ({"config": None}, TypeError, "`config` must be a funcpeft.LoraConfig or IA3Config"),
        ({"list_of_params": adapters[0]}, TypeError, "got a single dict"),
        ({"list_of_params": [adapters[0], {"lin0": adapters[1]["lin0"]}]}, ValueError, "has no module 'lin1'"),
    ]:
        call = {"list_of_params": adapters, "weights": [1.0, -1.0], "config": config, **kwargs}
        with pytest.raises(error, match=pattern):
            combine(**call)
    with pytest.raises(ValueError, match=re.escape("`rank=3` has no effect on a single adapter")):
        combine(adapters[:1], [1.0], config, "svd", rank=3)
    with pytest.raises(ValueError, match="`rank` does not apply to IA3"):
        ia3 = fp.IA3Config(target_modules=["lin0"], feedforward_modules=[])
        combine(_adapters(MLP(), ia3, 2), [1.0, 1.0], ia3, rank=2)


def test_public_names() -> None:
    assert fp.stack is stack and fp.unstack is unstack and fp.combine is combine
    assert {"stack", "unstack", "combine"} <= set(fp.__all__)
