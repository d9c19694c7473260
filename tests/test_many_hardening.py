"""Hostile cases for many adapters as one tree: ``funcpeft.stack``/``unstack``, vmap over stacked trees of every
stackable method (per-adapter outputs, batches and gradients, an ensemble trained in one step against K separate
runs), mixed batches, heterogeneous ``fwd.stack``/``fwd.unstack``, and the errors for trees of the wrong kind."""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import pytest
import torch
from _models import MLP, oracle

import funcpeft as fp
import funcpeft.optim as fo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::funcpeft.FuncpeftWarning")

TARGETS = ["lin0", "lin1"]
# Every method whose adapters stack (random init: the adapters must differ and matter).
METHODS = {
    "lora": lambda: fp.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False),
    "dora": lambda: fp.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False, use_dora=True),
    "rslora-lora_bias": lambda: fp.LoraConfig(
        r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False, use_rslora=True, lora_bias=True
    ),
    "ia3": lambda: fp.IA3Config(target_modules=TARGETS, feedforward_modules=["lin1"], init_ia3_weights=False),
    "loha": lambda: fp.LoHaConfig(r=2, target_modules=TARGETS, init_weights=False),
    "lokr": lambda: fp.LoKrConfig(r=2, target_modules=TARGETS, init_weights=False),
    "vera": lambda: fp.VeraConfig(r=4, target_modules=TARGETS, init_weights=False),
    "oft": lambda: fp.OFTConfig(r=0, oft_block_size=4, target_modules=TARGETS, init_weights=False),
    "adalora": lambda: fp.AdaLoraConfig(
        init_r=3, target_r=2, target_modules=TARGETS, total_step=10, init_lora_weights=False
    ),
}
K = 3
IDS = torch.tensor([0, 2, -1, 1, 2, 0])


def _adapters(fwd: Any, k: int = K) -> list[fp.Params]:
    """``k`` distinct adapters; VeRA's shared projections stay shared (PEFT's one ``projection_prng_key``)."""
    g = torch.Generator().manual_seed(7)
    trees = []
    for s in range(k):
        tree = fwd.init(torch.Generator().manual_seed(s))
        with torch.no_grad():
            for path, entry in tree.items():
                for t in entry.values():
                    if path != "":  # VeRA's shared vera_A / vera_B live at the root
                        t.add_(0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype))
        trees.append(tree)
    return trees


def _max_diff(a: fp.Params, b: fp.Params) -> float:
    """The largest difference between two trees of one structure and order, relative to ``b``'s largest entry."""
    assert list(a) == list(b) and all(list(a[p]) == list(b[p]) for p in a)
    return max(((a[p][n] - b[p][n]).abs().max() / b[p][n].abs().max().clamp_min(1.0)).item() for p in a for n in a[p])


@pytest.mark.parametrize("method", list(METHODS))
def test_every_stackable_method_maps_batches_and_differentiates_per_adapter(method: str) -> None:
    model = MLP().double().eval()
    _, fwd = fp.adapt(model, METHODS[method]())
    adapters = [{p: {n: t.detach().double().requires_grad_() for n, t in e.items()} for p, e in a.items()}
                for a in _adapters(fwd)]  # fmt: skip
    stacked = fp.stack(adapters)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 10, generator=g, dtype=torch.float64)
    xs = torch.randn(K, 6, 10, generator=g, dtype=torch.float64)
    ys = torch.randn(K, 6, 4, generator=g, dtype=torch.float64)

    # in_dims=(0, None): every adapter on the same batch; (0, 0): each adapter on its own batch
    shared = torch.func.vmap(fwd, in_dims=(0, None))(stacked, x)
    own = torch.func.vmap(fwd, in_dims=(0, 0))(stacked, xs)
    for k, adapter in enumerate(adapters):
        torch.testing.assert_close(shared[k], fwd(adapter, x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(own[k], fwd(adapter, xs[k]), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(shared[0], shared[1]) and not torch.allclose(shared[0], model(x))

    # a mixed batch: row i with adapter IDS[i], -1 the base
    mixed = fwd(stacked, x, adapter_ids=IDS)
    for i, k in enumerate(IDS.tolist()):
        torch.testing.assert_close(mixed[i : i + 1], fwd(adapters[k] if k >= 0 else None, x[i : i + 1]))

    # per-adapter gradients: vmap of torch.func.grad_and_value and of funcpeft.grad_and_value
    def loss(params: fp.Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (fwd(params, x) - y).pow(2).mean()

    for grad_and_value in (torch.func.grad_and_value, fp.grad_and_value):
        grads, values = torch.func.vmap(grad_and_value(loss))(stacked, xs, ys)
        for k, (g_k, adapter) in enumerate(zip(fp.unstack(grads), adapters, strict=True)):
            expected, value = torch.func.grad_and_value(loss)(adapter, xs[k], ys[k])
            assert _max_diff(g_k, expected) < 1e-12 and abs(values[k].item() - value.item()) < 1e-12 * max(
                1.0, abs(value.item())
            )

    # an ensemble trained in one vmapped step equals K separate runs, step by step (per-adapter clipping)
    def opt(stacked: bool) -> fo.GradientTransformation:
        return fo.chain(fo.clip_by_global_norm(0.05, stacked=stacked), fo.adamw(1e-2))

    ensemble, state = stacked, opt(True).init(stacked)
    runs = [(a, opt(False).init(a)) for a in adapters]
    for _ in range(3):
        grads, _ = torch.func.vmap(torch.func.grad_and_value(loss))(ensemble, xs, ys)
        updates, state = opt(True).update(grads, state, ensemble)
        ensemble = fo.apply_updates(ensemble, updates)
        for k, (params, s) in enumerate(runs):
            updates, s = opt(False).update(torch.func.grad(loss)(params, xs[k], ys[k]), s, params)
            runs[k] = (fo.apply_updates(params, updates), s)
        for trained, (params, _) in zip(fp.unstack(ensemble), runs, strict=True):
            assert _max_diff(trained, params) < 1e-12

    # a stacked tree where one adapter is expected, and one adapter where a stacked tree is: clear errors
    with pytest.raises(ValueError, match=r"has shape \(3, "):
        fwd(stacked, x)
    with pytest.raises(ValueError, match=r"needs stacked \(K, "):
        fwd(adapters[0], x, adapter_ids=IDS)


def test_stack_matches_by_name_for_any_key_order_k1_and_the_same_tree_twice() -> None:
    model = MLP().eval()
    _, fwd = fp.adapt(model, METHODS["dora"]())
    a, b = _adapters(fwd, 2)
    reordered = {p: {n: b[p][n] for n in reversed(list(b[p]))} for p in reversed(list(b))}
    stacked = fp.stack([a, reordered])
    assert list(stacked) == list(a) and all(list(stacked[p]) == list(a[p]) for p in a)  # the first tree's order
    assert all(torch.equal(stacked[p][n][1], b[p][n]) for p in b for n in b[p])
    x = torch.randn(4, 10)
    for trees in ([a], [a, a]):  # K=1, and one tree twice (fresh storage each: no aliasing between slices)
        stacked = fp.stack(trees)
        out = torch.func.vmap(fwd, in_dims=(0, None))(stacked, x)
        assert out.shape[0] == len(trees)
        for k in range(len(trees)):
            torch.testing.assert_close(out[k], fwd(a, x))
        with torch.no_grad():
            stacked["lin0"]["lora_A"][0].add_(1.0)
        assert not torch.equal(stacked["lin0"]["lora_A"][0], a["lin0"]["lora_A"])
        if len(trees) == 2:
            assert torch.equal(stacked["lin0"]["lora_A"][1], a["lin0"]["lora_A"])
    meta = {p: {n: t.to("meta") for n, t in e.items()} for p, e in b.items()}
    with pytest.raises(ValueError, match=r"`list_of_params\[1\]\['lin0'\]\['lora_A'\]` has device meta"):
        fp.stack([a, meta])
    with pytest.raises(ValueError, match="is empty"):
        fp.stack([])


def test_stack_of_loaded_adapters_runs_as_the_saved_ones_and_a_load_pair_is_named() -> None:
    model = MLP().eval()
    config = METHODS["lokr"]()
    _, fwd = fp.adapt(model, config)
    adapters = _adapters(fwd, 2)
    x = torch.randn(4, 10)
    with tempfile.TemporaryDirectory() as folder:
        for k, adapter in enumerate(adapters):
            fp.save(f"{folder}/{k}", adapter, config)
        loaded = [fp.load(f"{folder}/{k}") for k in range(2)]
    out = torch.func.vmap(fwd, in_dims=(0, None))(fp.stack([params for params, _ in loaded]), x)
    for k, adapter in enumerate(adapters):
        torch.testing.assert_close(out[k], fwd(adapter, x))
    # funcpeft.load returns (params, config): passing the pairs must say so
    with pytest.raises(TypeError, match=r"`list_of_params\[0\]` must be an adapter dict .*got tuple.*funcpeft.load"):
        fp.stack(loaded)


def test_stack_and_unstack_inside_torch_func_transforms_are_refused_by_name() -> None:
    _, fwd = fp.adapt(MLP(), METHODS["lora"]())
    adapters = _adapters(fwd, 2)
    x = torch.randn(4, 10)
    ids = torch.tensor([0, 1, 1, 0])
    stacked = fp.stack(adapters)
    before = {p: {n: t.clone() for n, t in e.items()} for p, e in stacked.items()}
    # stack's leaves are detached fresh leaves: inside grad it would cut the gradient off (torch's own error names
    # no funcpeft call), so it refuses by name and says what to do instead
    with pytest.raises(ValueError, match=r"funcpeft.stack cannot run inside torch.func.grad, vmap or jvp"):
        torch.func.grad(lambda trees: fwd(fp.stack(trees), x, adapter_ids=ids).sum())(adapters)
    with pytest.raises(ValueError, match=r"funcpeft.unstack cannot run inside"):
        torch.func.grad(lambda s: sum(fwd(p, x).sum() for p in fp.unstack(s)))(stacked)
    with pytest.raises(ValueError, match=r"funcpeft.stack cannot run inside"):
        torch.func.vmap(lambda p: fp.stack([p])["lin0"]["lora_A"].sum())(stacked)
    assert all(torch.equal(stacked[p][n], before[p][n]) for p in before for n in before[p])
    # the suggested way: differentiate with respect to the stacked tree, unstack the gradient outside
    grads = torch.func.grad(lambda s: fwd(s, x, adapter_ids=ids).sum())(stacked)
    for k, (g_k, adapter) in enumerate(zip(fp.unstack(grads), adapters, strict=True)):
        sub = x[ids == k]
        assert _max_diff(g_k, torch.func.grad(lambda p, sub=sub: fwd(p, sub).sum())(adapter)) < 1e-5

    hetero, hfwd = fp.adapt(MLP(), [METHODS["lora"](), fp.LoraConfig(r=3, target_modules=["lin1", "head"])])
    own = hfwd.unstack(hetero)
    with pytest.raises(ValueError, match=r"fwd.stack cannot run inside"):
        torch.func.grad(lambda trees: hfwd(hfwd.stack(trees), x, adapter_ids=ids).sum())(own)
    with pytest.raises(ValueError, match=r"fwd.unstack cannot run inside"):
        torch.func.grad(lambda s: hfwd.unstack(s)[0]["lin0"]["lora_A"].sum())(hetero)


HETERO = [
    {"r": 2, "target_modules": ["lin0", "lin1"]},
    {"r": 3, "use_dora": True, "target_modules": ["lin1", "head"]},
    {"r": 4, "lora_bias": True, "use_rslora": True, "target_modules": ["head", "lin0"]},
]


def test_hetero_unstack_of_sparse_and_dense_gradients_equals_each_adapter_alone() -> None:
    model = MLP().double().eval()
    configs = [fp.LoraConfig(init_lora_weights=False, **kw) for kw in HETERO]
    stacked, fwd = fp.adapt(model, configs)
    own = fwd.unstack(stacked)
    x = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def loss(s: fp.Params, **kw: Any) -> torch.Tensor:
        return fwd(s, x, adapter_ids=IDS, **kw).pow(2).sum()

    dense = fwd.unstack(torch.func.grad(loss)(stacked))
    leaves = [t for e in stacked.values() for t in e.values()]
    flat = iter(torch.autograd.grad(loss(stacked, sparse_grad=True), leaves))  # sparse_grad needs plain autograd
    sparse_grads = {p: {n: next(flat) for n in e} for p, e in stacked.items()}
    assert all(t.layout == torch.sparse_coo for e in sparse_grads.values() for t in e.values())
    sparse = fwd.unstack(sparse_grads)  # was NotImplementedError ('aten::as_strided' on SparseCPU)
    for k, config in enumerate(configs):
        _, alone = fp.adapt(model, config)
        sub = x[IDS.eq(k)]
        expected = torch.func.grad(lambda p, f=alone, sub=sub: f(p, sub).pow(2).sum())(own[k])
        assert _max_diff(dense[k], expected) < 1e-12
        assert _max_diff(sparse[k], expected) < 1e-12
        assert all(t.layout == torch.strided and t.is_leaf and t.requires_grad for e in sparse[k].values()
                   for t in e.values())  # fmt: skip


def test_hetero_round_trips_loaded_reordered_and_repeated_adapters_and_matches_peft() -> None:
    peft = oracle("peft")
    model = MLP().double().eval()
    configs = [fp.LoraConfig(init_lora_weights=False, **kw) for kw in HETERO]
    stacked, fwd = fp.adapt(model, configs)
    own = fwd.unstack(stacked)
    with tempfile.TemporaryDirectory() as folder:
        for k, (params, config) in enumerate(zip(own, configs, strict=True)):
            fp.save(f"{folder}/{k}", params, config)
        loaded = [fp.load(f"{folder}/{k}")[0] for k in range(len(configs))]
    reordered = [{p: {n: e[n] for n in reversed(list(e))} for p, e in reversed(list(t.items()))} for t in loaded]
    again = fwd.stack(reordered)
    assert list(again) == list(stacked) and _max_diff(again, stacked) == 0
    back = fwd.unstack(again)
    assert all(_max_diff(b, o) == 0 for b, o in zip(back, own, strict=True))  # exact, in the own order
    # the same tree in two slots of equal configs runs as that adapter in both
    twice, tfwd = fp.adapt(model, [configs[0], configs[1], configs[0]])
    twice = tfwd.stack([own[0], own[1], own[0]])
    x = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        tfwd(twice, x, adapter_ids=torch.full((6,), 2)), fwd(stacked, x, adapter_ids=torch.zeros(6, dtype=torch.long))
    )
    # PEFT holding the same three adapters, each row with its own one active (PEFT refuses DoRA in adapter_names)
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**HETERO[0]), adapter_name="a0")
    for k, kw in enumerate(HETERO[1:], 1):
        twin.add_adapter(f"a{k}", peft.LoraConfig(**kw))
    for k, (params, config) in enumerate(zip(back, configs, strict=True)):
        peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(params, config), adapter_name=f"a{k}")
    twin.eval()
    theirs = torch.cat([_peft_row(twin, x[i : i + 1], k) for i, k in enumerate(IDS.tolist())])
    torch.testing.assert_close(fwd(again, x, adapter_ids=IDS), theirs, rtol=1e-10, atol=1e-10)
    # funcpeft.unstack on a packed tree points to fwd.unstack
    with pytest.raises(ValueError, match=r"packed by rank: take it apart with fwd.unstack"):
        fp.unstack(stacked)


def _peft_row(twin: Any, x: torch.Tensor, k: int) -> torch.Tensor:
    if k < 0:
        with twin.disable_adapter():
            return twin(x)
    twin.set_adapter(f"a{k}")
    return twin(x)
