"""funcpeft.optim against torch.optim: every optimizer, clipping and schedule equals torch's over several steps;
stacked adapters train independently; the optimizers are pure; a JAX-style loop on ``funcpeft.adapt`` equals the
same loop with ``torch.optim.AdamW`` and plain autograd."""

from __future__ import annotations

import math

import numpy as np
import optree
import pytest
import torch
from _models import MLP, oracle
from hypothesis import given, settings
from hypothesis import strategies as st

import funcpeft
import funcpeft.optim as fo

SHAPES = {"lin0": {"lora_A": (4, 6), "lora_B": (5, 4)}, "head": {"weight": (3, 5), "bias": (3,)}}
STEPS = 6
TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-14}, torch.float32: {"rtol": 1e-6, "atol": 1e-6}}


def make_tree(seed: int, dtype: torch.dtype = torch.float64, k: int | None = None, grad: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    lead = () if k is None else (k,)
    return {
        path: {
            name: torch.randn(*lead, *shape, generator=g, dtype=dtype).requires_grad_(grad) for name, shape in e.items()
        }
        for path, e in SHAPES.items()
    }


def grad_seq(dtype: torch.dtype = torch.float64, k: int | None = None, steps: int = STEPS) -> list[dict]:
    return [make_tree(100 + i, dtype, k, grad=False) for i in range(steps)]


def run_ours(opt: fo.GradientTransformation, params: dict, grads: list[dict]) -> dict:
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = fo.apply_updates(params, updates)
    return params


def run_torch(make_opt, params: dict, grads: list[dict], clip: float | None = None, scheduler=None) -> dict:
    """The same steps with torch.optim on copies of the leaves (one spec, optree's, for both sides)."""
    leaves, spec = optree.tree_flatten(params)
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    opt = make_opt(leaves)
    sched = None if scheduler is None else scheduler(opt)
    for g in grads:
        for p, gi in zip(leaves, spec.flatten_up_to(g), strict=True):
            p.grad = gi.clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(leaves, clip)
        opt.step()
        if sched is not None:
            sched.step()
    return spec.unflatten(leaves)


def assert_trees_close(a: dict, b: dict, **tol) -> None:
    assert optree.tree_structure(a) == optree.tree_structure(b)
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("momentum", "nesterov", "weight_decay"),
    [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.0), (0.8, True, 0.05), (0.0, False, 0.05), (0.5, False, 0.1)],
)
def test_sgd_matches_torch(dtype, momentum, nesterov, weight_decay):
    params, grads = make_tree(0, dtype), grad_seq(dtype)
    ours = run_ours(fo.sgd(0.1, momentum, nesterov, weight_decay), params, grads)
    kw = {"momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}
    theirs = run_torch(lambda ps: torch.optim.SGD(ps, lr=0.1, **kw), params, grads)
    assert_trees_close(ours, theirs, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "kw", [{}, {"weight_decay": 0.1}, {"b1": 0.8, "b2": 0.95, "eps": 1e-3}, {"b1": 0.0, "b2": 0.5, "weight_decay": 0.3}]
)
def test_adam_matches_torch(dtype, kw):
    params, grads = make_tree(0, dtype), grad_seq(dtype)
    ours = run_ours(fo.adam(1e-2, **kw), params, grads)
    tkw = {"betas": (kw.get("b1", 0.9), kw.get("b2", 0.999)), "eps": kw.get("eps", 1e-8)}
    theirs = run_torch(
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=kw.get("weight_decay", 0.0), **tkw), params, grads
    )
    assert_trees_close(ours, theirs, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.2, "b1": 0.85, "b2": 0.99}, {"weight_decay": 0.0}])
def test_adamw_matches_torch(dtype, kw):
    params, grads = make_tree(0, dtype), grad_seq(dtype)
    ours = run_ours(fo.adamw(1e-2, **kw), params, grads)
    tkw = {"betas": (kw.get("b1", 0.9), kw.get("b2", 0.999)), "weight_decay": kw.get("weight_decay", 0.01)}
    theirs = run_torch(lambda ps: torch.optim.AdamW(ps, lr=1e-2, **tkw), params, grads)
    assert_trees_close(ours, theirs, **TOL[dtype])


def test_defaults_are_torchs():
    params, grads = make_tree(0), grad_seq()
    assert_trees_close(
        run_ours(fo.adamw(1e-3), params, grads), run_torch(lambda ps: torch.optim.AdamW(ps, 1e-3), params, grads)
    )
    assert_trees_close(
        run_ours(fo.adam(1e-3), params, grads), run_torch(lambda ps: torch.optim.Adam(ps, 1e-3), params, grads)
    )
    assert_trees_close(
        run_ours(fo.sgd(1e-3), params, grads), run_torch(lambda ps: torch.optim.SGD(ps, 1e-3), params, grads)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e3])
def test_clip_by_global_norm_is_clip_grad_norm(dtype, max_norm):
    grads = make_tree(1, dtype, grad=False)
    ours, _ = fo.clip_by_global_norm(max_norm).update(grads, fo.EmptyState())
    leaves, spec = optree.tree_flatten(make_tree(1, dtype))
    for p, g in zip(leaves, spec.flatten_up_to(grads), strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(leaves, max_norm)
    assert_trees_close(ours, spec.unflatten([p.grad for p in leaves]), rtol=0, atol=0)  # bit-identical


def test_clip_in_a_chain_matches_torch_loop():
    params, grads = make_tree(0), [optree.tree_map(lambda t: t * 3, g) for g in grad_seq()]
    ours = run_ours(fo.chain(fo.clip_by_global_norm(2.0), fo.sgd(0.1, momentum=0.9, nesterov=True)), params, grads)
    theirs = run_torch(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), params, grads, clip=2.0)
    assert_trees_close(ours, theirs)


def test_schedules_follow_optax_and_transformers():
    transformers = oracle("transformers")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    cos = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=10).lr_lambdas[0]
    warm = transformers.get_constant_schedule_with_warmup(opt, num_warmup_steps=4).lr_lambdas[0]
    ours_cos, ours_warm = fo.warmup_cosine_decay(2.0, 3, 10), fo.linear_warmup(2.0, 4)
    for step in range(14):
        if step <= 10:  # transformers' cosine is not clamped after num_training_steps; optax's (and ours) is
            assert ours_cos(step) == pytest.approx(2.0 * cos(step), abs=1e-15)
        assert ours_warm(step) == pytest.approx(2.0 * warm(step), abs=1e-15)
    assert ours_cos(11) == ours_cos(50) == 0.0
    assert fo.constant(0.3)(7) == 0.3
    lin = fo.linear(1.0, 0.0, 4)
    assert [lin(s) for s in (0, 2, 4, 9)] == [1.0, 0.5, 0.0, 0.0]
    assert fo.linear(1.0, 5.0, 0)(0) == 5.0
    decay = fo.cosine_decay(1.0, 4, end=0.2)
    assert [decay(0), decay(2), decay(4), decay(100)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    assert fo.warmup_cosine_decay(1.0, 2, 6, end=0.1, init=0.5)(0) == 0.5


def test_schedule_first_update_uses_step_0_like_lambdalr():
    transformers = oracle("transformers")
    params, grads = make_tree(0), grad_seq(steps=10)
    ours = run_ours(fo.adamw(fo.warmup_cosine_decay(0.05, 3, 10), weight_decay=0.1), params, grads)
    theirs = run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
        params,
        grads,
        scheduler=lambda opt: transformers.get_cosine_schedule_with_warmup(opt, 3, 10),
    )
    assert_trees_close(ours, theirs)
    # sgd with a schedule and momentum, against a plain LambdaLR
    sched = fo.cosine_decay(0.2, 7, end=0.01)
    ours = run_ours(fo.sgd(sched, momentum=0.9), params, grads)
    theirs = run_torch(
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9),
        params,
        grads,
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: sched(s) / 0.2),
    )
    assert_trees_close(ours, theirs)


LABELS = {"lin0": {"lora_A": "fast", "lora_B": "slow"}, "head": "frozen"}  # a prefix of the params tree


def test_multi_transform_freezes_and_sets_lrs_like_param_groups():
    params, grads = make_tree(0), grad_seq()
    opt = fo.multi_transform({"fast": fo.adamw(1e-2), "slow": fo.adamw(1e-3), "frozen": fo.set_to_zero()}, LABELS)
    ours = run_ours(opt, params, grads)
    for name, t in ours["head"].items():
        assert torch.equal(t, params["head"][name])  # frozen leaves are exactly unchanged

    def groups(ps):  # optree order: head.bias, head.weight, lin0.lora_A, lin0.lora_B
        return torch.optim.AdamW([{"params": [ps[2]], "lr": 1e-2}, {"params": [ps[3]], "lr": 1e-3}])

    theirs = run_torch(groups, params, grads)
    assert_trees_close(ours["lin0"], theirs["lin0"])
    # labels as a function of the params give the same result
    fn = lambda p: {"lin0": {"lora_A": "fast", "lora_B": "slow"}, "head": {k: "frozen" for k in p["head"]}}
    opt2 = fo.multi_transform({"fast": fo.adamw(1e-2), "slow": fo.adamw(1e-3), "frozen": fo.set_to_zero()}, fn)
    assert_trees_close(run_ours(opt2, params, grads), ours, rtol=0, atol=0)


def test_masked_passes_the_rest_through_and_freeze_zeroes_it():
    params, grads = make_tree(0), grad_seq()
    mask = {"lin0": True, "head": False}
    updates, _ = fo.masked(fo.sgd(0.1), mask).update(grads[0], fo.masked(fo.sgd(0.1), mask).init(params), params)
    assert torch.equal(updates["head"]["weight"], grads[0]["head"]["weight"])  # optax: untouched
    torch.testing.assert_close(updates["lin0"]["lora_A"], -0.1 * grads[0]["lin0"]["lora_A"])
    # masked adamw + freeze of the rest == adamw on the trainable part only
    opt = fo.chain(fo.masked(fo.adamw(1e-2), mask), fo.freeze({"lin0": False, "head": True}))
    ours = run_ours(opt, params, grads)
    assert all(torch.equal(ours["head"][k], params["head"][k]) for k in params["head"])
    alone = run_ours(fo.adamw(1e-2), {"lin0": params["lin0"]}, [{"lin0": g["lin0"]} for g in grads])
    assert_trees_close(ours["lin0"], alone["lin0"], rtol=0, atol=0)
    # freeze last in a chain keeps frozen leaves exact even with weight decay
    ours = run_ours(
        fo.chain(fo.adamw(1e-2, weight_decay=0.5), fo.freeze(lambda p: {"lin0": False, "head": True})), params, grads
    )
    assert all(torch.equal(ours["head"][k], params["head"][k]) for k in params["head"])


def test_mask_and_label_errors_name_the_leaf():
    params, grads = make_tree(0), grad_seq(steps=1)[0]
    with pytest.raises(ValueError, match=r"head.*'oops'.*not one of"):
        fo.multi_transform({"a": fo.sgd(0.1)}, {"lin0": "a", "head": "oops"}).init(params)
    with pytest.raises(TypeError, match="bools.*lin0"):
        fo.masked(fo.sgd(0.1), {"lin0": "yes", "head": False}).init(params)
    with pytest.raises(ValueError, match="prefix"):
        fo.masked(fo.sgd(0.1), {"nope": True}).init(params)
    with pytest.raises(ValueError, match="needs the params"):
        opt = fo.adamw(1e-3)
        opt.update(grads, opt.init(params))
    with pytest.raises(ValueError, match="structure"):
        opt = fo.adam(1e-3)
        opt.update(grads, opt.init({"lin0": params["lin0"]}), params)


@pytest.mark.parametrize(
    "make",
    [
        lambda stacked: fo.chain(fo.clip_by_global_norm(1.0, stacked=stacked), fo.adamw(1e-2, weight_decay=0.1)),
        lambda stacked: fo.chain(
            fo.clip_by_global_norm(0.5, stacked=stacked), fo.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
        ),
        lambda stacked: fo.adam(fo.linear_warmup(1e-2, 3), weight_decay=0.1),
    ],
)
def test_stacked_adapters_train_independently(make):
    # the adapters' gradients differ in scale by 100x, so the clip is active for some and not for others
    scales = torch.tensor([0.05, 1.0, 5.0], dtype=torch.float64)
    per = [[optree.tree_map(lambda t, k=k, s=s: t[k] * s, g) for g in grad_seq(k=3)] for k, s in enumerate(scales)]
    starts = [make_tree(k) for k in range(3)]
    separate = [run_ours(make(False), starts[k], per[k]) for k in range(3)]
    stacked = run_ours(
        make(True), funcpeft.stack(starts), [funcpeft.stack([per[k][i] for k in range(3)]) for i in range(STEPS)]
    )
    for k, tree in enumerate(funcpeft.unstack(stacked)):
        assert_trees_close(tree, separate[k])
    non_stacked_clip = fo.clip_by_global_norm(1.0)
    clipped, _ = non_stacked_clip.update(funcpeft.stack([per[k][0] for k in range(3)]), fo.EmptyState())
    assert not torch.allclose(clipped["head"]["bias"][2], per[2][0]["head"]["bias"])  # one global norm clips all


def test_stacked_clip_needs_a_common_leading_dim():
    tree = {"a": {"x": torch.ones(3, 2)}, "b": {"y": torch.ones(2, 2)}}
    with pytest.raises(ValueError, match=r"'b.y' has shape \(2, 2\)"):
        fo.clip_by_global_norm(1.0, stacked=True).update(tree, fo.EmptyState())


@settings(max_examples=15, deadline=None)
@given(
    k=st.integers(1, 4),
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4),
    scale=st.floats(0.01, 100.0),
)
def test_stacked_clip_equals_per_adapter_clip(k, shapes, scale):
    g = torch.Generator().manual_seed(0)
    trees = [
        {f"m{i}": {"w": torch.randn(tuple(s), generator=g, dtype=torch.float64) * scale} for i, s in enumerate(shapes)}
        for _ in range(k)
    ]
    clip = fo.clip_by_global_norm(1.0, stacked=True)
    stacked, _ = clip.update(funcpeft.stack(trees), fo.EmptyState())
    for tree, got in zip(trees, funcpeft.unstack(stacked), strict=True):
        want, _ = fo.clip_by_global_norm(1.0).update(tree, fo.EmptyState())
        assert_trees_close(got, want)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fo.chain(fo.clip_by_global_norm(0.1), fo.adamw(1e-2)),
        lambda: fo.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        lambda: fo.sgd(fo.constant(0.1), momentum=0.9),
        lambda: fo.multi_transform(
            {"a": fo.adam(1e-2), "b": fo.chain(fo.scale(2.0), fo.sgd(0.1, momentum=0.5))}, {"lin0": "a", "head": "b"}
        ),
        lambda: fo.multi_steps(fo.adamw(1e-2), 2),  # the second update is the inner step
        lambda: fo.multi_steps(fo.sgd(0.1, momentum=0.9), 3),  # both updates accumulate
    ],
)
def test_updates_are_pure(make):
    opt, params, grads = make(), make_tree(0), grad_seq(steps=2)
    state = opt.init(params)
    _, state = opt.update(grads[0], state, params)
    before = optree.tree_map(torch.clone, (params, grads, state))
    first = opt.update(grads[1], state, params)
    after = (params, grads, state)
    for x, y in zip(optree.tree_leaves(before), optree.tree_leaves(after), strict=True):
        assert torch.equal(x, y)  # nothing the caller holds was written to
    again = opt.update(grads[1], state, params)  # an old state stays valid: same result again
    for x, y in zip(optree.tree_leaves(first), optree.tree_leaves(again), strict=True):
        assert torch.equal(x, y)


def test_states_are_namedtuple_pytrees():
    params = make_tree(0)
    opt = fo.chain(
        fo.clip_by_global_norm(1.0),
        fo.adamw(fo.linear_warmup(1e-3, 2)),
        fo.masked(fo.trace(0.9), {"lin0": True, "head": False}),
    )
    state = opt.init(params)
    assert isinstance(state[1][0], fo.ScaleByAdamState) and isinstance(state[2], fo.MaskedState)
    assert state[1][0].mu["lin0"]["lora_A"].shape == (4, 6) and not state[1][0].mu["lin0"]["lora_A"].requires_grad
    assert state[2].inner_state.trace["head"] == {"bias": None, "weight": None}
    leaves = optree.tree_leaves(state)
    assert leaves and all(isinstance(t, torch.Tensor) for t in leaves)
    assert len(torch.utils._pytree.tree_leaves(state)) == len(leaves) + 2  # torch's pytree keeps the Nones as leaves
    # a state copied through optree (as a checkpoint would) gives the same updates
    grads = grad_seq(steps=1)[0]
    a, _ = opt.update(grads, state, params)
    b, _ = opt.update(grads, optree.tree_map(torch.clone, state), params)
    assert_trees_close(a, b, rtol=0, atol=0)


def test_apply_updates():
    params = make_tree(0, torch.bfloat16)
    updates = optree.tree_map(lambda t: torch.full(t.shape, 0.5), params)
    new = fo.apply_updates(params, updates)
    for p, n in zip(optree.tree_leaves(params), optree.tree_leaves(new), strict=True):
        assert n.is_leaf and n.requires_grad and n.grad_fn is None and n.dtype == torch.bfloat16
        assert torch.equal(n, (p.detach().float() + 0.5).bfloat16())
        assert n.data_ptr() != p.data_ptr()
    with pytest.raises(ValueError, match="structure"):
        fo.apply_updates(params, {"lin0": updates["lin0"]})


def test_argument_errors():
    with pytest.raises(ValueError, match="nesterov"):
        fo.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match="learning_rate"):
        fo.adamw(-1.0)
    with pytest.raises(ValueError, match="b2"):
        fo.adam(1e-3, b2=1.0)
    with pytest.raises(TypeError, match="b1"):
        fo.adam(1e-3, b1="0.9")
    with pytest.raises(ValueError, match="decay_steps"):
        fo.warmup_cosine_decay(1.0, 5, 5)
    with pytest.raises(TypeError, match="GradientTransformation"):
        fo.chain(fo.sgd(0.1), "adam")
    opt, params = fo.sgd(lambda step: "fast"), make_tree(0)
    with pytest.raises(TypeError, match="schedule returned 'fast' at step 0"):
        opt.update(params, opt.init(params))


def test_empty_trees_and_empty_parts():
    for opt in [fo.adamw(1e-2), fo.sgd(0.1, momentum=0.9, weight_decay=0.1), fo.clip_by_global_norm(1.0, stacked=True)]:
        updates, _ = opt.update({}, opt.init({}), {})
        assert updates == {} and fo.apply_updates({}, updates) == {}
    params, grads = make_tree(0), grad_seq(steps=2)
    nothing = fo.multi_transform({"unused": fo.adamw(1e-2), "all": fo.sgd(0.1)}, {"lin0": "all", "head": "all"})
    assert_trees_close(run_ours(nothing, params, grads), run_ours(fo.sgd(0.1), params, grads), rtol=0, atol=0)


def test_user_transformations_compose():
    """A plain (init, update) pair written against trees works inside chain and multi_transform."""
    halve = fo.GradientTransformation(lambda p: (), lambda u, s, p=None: (optree.tree_map(lambda t: t / 2, u), s))
    params, grads = make_tree(0), grad_seq()
    ours = run_ours(fo.chain(halve, fo.sgd(0.2, momentum=0.9)), params, grads)
    assert_trees_close(ours, run_ours(fo.sgd(0.1, momentum=0.9), params, grads))


def test_jax_style_training_loop_matches_torch_autograd():
    torch.manual_seed(0)
    model = MLP().double()
    config = funcpeft.LoraConfig(
        r=4, target_modules=["lin0", "lin1"], init_lora_weights=False, modules_to_save=["head"]
    )
    params, fwd = funcpeft.adapt(model, config, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 10, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in (0, 4, 0, 4, 0, 4, 0, 4)]

    def loss_fn(p, x, y):
        return torch.nn.functional.mse_loss(fwd(p, x), y)

    opt = fo.chain(fo.clip_by_global_norm(1.0), fo.adamw(fo.warmup_cosine_decay(1e-1, 2, 8), weight_decay=0.1))
    state, p, ours_losses = opt.init(params), params, []
    for x, y in batches:
        grads, loss = torch.func.grad_and_value(loss_fn)(p, x, y)
        updates, state = opt.update(grads, state, p)
        p = fo.apply_updates(p, updates)
        ours_losses.append(loss.item())

    leaves, spec = optree.tree_flatten(params)
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    torch_opt = torch.optim.AdamW(leaves, lr=1e-1, weight_decay=0.1)
    sched = fo.warmup_cosine_decay(1e-1, 2, 8)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda s: sched(s) / 1e-1)
    torch_losses = []
    for x, y in batches:
        loss = loss_fn(spec.unflatten(leaves), x, y)
        torch_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(leaves, 1.0)
        torch_opt.step()
        lr_sched.step()
        torch_losses.append(loss.item())
    assert ours_losses == pytest.approx(torch_losses, rel=1e-12)
    assert ours_losses[-2] + ours_losses[-1] < ours_losses[0] + ours_losses[1]  # it learns
    assert_trees_close(p, spec.unflatten(leaves), rtol=1e-10, atol=1e-12)
    assert all(math.isfinite(t.sum().item()) for t in optree.tree_leaves(p))


def test_compiled_training_step_matches_eager():
    """Under torch.compile the loss and gradients compile and the optimizer runs eagerly (one graph break each for
    update and apply_updates): no recompilation as the step count changes, and the same numbers as eager."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    opt = fo.chain(fo.clip_by_global_norm(1.0), fo.adamw(fo.warmup_cosine_decay(1e-2, 2, 10), weight_decay=0.1))

    def loss_fn(p, x):
        hidden = (x @ p["lin0"]["lora_A"].T) @ p["lin0"]["lora_B"].T
        return torch.tanh(hidden @ p["head"]["weight"].T + p["head"]["bias"]).square().mean()

    def step(p, state, x):
        grads, loss = torch.func.grad_and_value(loss_fn)(p, x)
        updates, state = opt.update(grads, state, p)
        return fo.apply_updates(p, updates), state, loss.detach()

    compiled = torch.compile(step)
    params = make_tree(0, torch.float32)
    xs = torch.randn(12, 4, 6, generator=torch.Generator().manual_seed(1))
    p_eager = p_comp = params
    s_eager = s_comp = opt.init(params)
    for x in xs:
        p_eager, s_eager, loss_eager = step(p_eager, s_eager, x)
        p_comp, s_comp, loss_comp = compiled(p_comp, s_comp, x)
        torch.testing.assert_close(loss_comp, loss_eager)
    assert_trees_close(p_comp, p_eager, **TOL[torch.float32])
    assert all(t.requires_grad and t.is_leaf for t in optree.tree_leaves(p_comp))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


# --------------------------------------------------------------------------------------------------------------
# multi_steps: gradient accumulation (optax's MultiSteps)
# --------------------------------------------------------------------------------------------------------------


def mean_tree(trees: list[dict]) -> dict:
    return optree.tree_map(lambda *xs: sum(xs) / len(xs), *trees)


INNER = {
    "adamw-schedule": lambda stacked=False: fo.adamw(fo.linear_warmup(1e-2, 2), weight_decay=0.1),
    "sgd-nesterov": lambda stacked=False: fo.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
    "clip-adam": lambda stacked=False: fo.chain(fo.clip_by_global_norm(0.3, stacked=stacked), fo.adam(1e-2)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("every_k", [1, 3, 4])
@pytest.mark.parametrize("inner", list(INNER))
def test_multi_steps_equal_inner_steps_on_the_mean_gradient(dtype, every_k, inner):
    params, micro = make_tree(0, dtype), grad_seq(dtype, steps=3 * every_k)
    opt = fo.multi_steps(INNER[inner](), every_k)
    state, p = opt.init(params), params
    for i, g in enumerate(micro):
        updates, state = opt.update(g, state, p)
        stepped = (i + 1) % every_k == 0
        assert int(state.mini_step) == (i + 1) % every_k and int(state.gradient_step) == (i + 1) // every_k
        if not stepped:
            assert all(not t.any() for t in optree.tree_leaves(updates))  # zero updates in between
        p = fo.apply_updates(p, updates)
    means = [mean_tree(micro[i : i + every_k]) for i in range(0, len(micro), every_k)]
    assert_trees_close(p, run_ours(INNER[inner](), params, means), rtol=0, atol=0)
    if every_k > 1:  # not simply the inner optimizer on each micro-batch
        assert not torch.allclose(p["lin0"]["lora_A"], run_ours(INNER[inner](), params, micro)["lin0"]["lora_A"])


def test_multi_steps_train_stacked_adapters_independently():
    k, every_k = 3, 2
    scales = [0.05, 1.0, 5.0]  # the per-adapter clip is active for some adapters only
    per = [[optree.tree_map(lambda t, a=a, s=s: t[a] * s, g) for g in grad_seq(k=k)] for a, s in enumerate(scales)]
    starts = [make_tree(a) for a in range(k)]
    separate = [run_ours(fo.multi_steps(INNER["clip-adam"](), every_k), starts[a], per[a]) for a in range(k)]
    stacked = run_ours(
        fo.multi_steps(INNER["clip-adam"](stacked=True), every_k),
        funcpeft.stack(starts),
        [funcpeft.stack([per[a][i] for a in range(k)]) for i in range(STEPS)],
    )
    for a, tree in enumerate(funcpeft.unstack(stacked)):
        assert_trees_close(tree, separate[a])


def test_multi_steps_compose_in_chains_and_with_user_transformations():
    params, micro = make_tree(0), grad_seq(steps=4)
    halve = fo.GradientTransformation(lambda p: (), lambda u, s, p=None: (optree.tree_map(lambda t: t / 2, u), s))
    means = [mean_tree(micro[:2]), mean_tree(micro[2:])]
    want = run_ours(fo.sgd(0.1, momentum=0.9), params, means)
    for opt in (
        fo.chain(fo.scale(0.5), fo.multi_steps(fo.sgd(0.2, momentum=0.9), 2)),
        fo.multi_steps(fo.chain(halve, fo.sgd(0.2, momentum=0.9)), 2),
        fo.multi_steps(fo.multi_steps(fo.sgd(0.1, momentum=0.9), 1), 2),
    ):
        assert_trees_close(run_ours(opt, params, micro), want, **TOL[torch.float64])


def test_multi_steps_accumulate_half_precision_in_float32():
    params = make_tree(0, torch.bfloat16)
    micro = [optree.tree_map(lambda t: t * 1e-3 + 1.0, g) for g in grad_seq(torch.bfloat16, steps=8)]
    opt = fo.multi_steps(fo.sgd(1.0), 8)
    state = opt.init(params)
    assert all(t.dtype == torch.float32 for t in optree.tree_leaves(state.acc_grads))
    p = run_ours(opt, params, micro)
    mean = optree.tree_map(lambda *xs: (sum(x.float() for x in xs) / len(xs)).bfloat16(), *micro)
    assert_trees_close(p, run_ours(fo.sgd(1.0), params, [mean]), rtol=0, atol=0)


def test_multi_steps_match_torch_gradient_accumulation():
    """A loop of micro-batches on funcpeft.adapt equals torch's recipe: (loss / k).backward() per micro-batch, then
    clip_grad_norm_, AdamW.step() and the scheduler once per k."""
    torch.manual_seed(0)
    model = MLP().double()
    config = funcpeft.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False)
    params, fwd = funcpeft.adapt(model, config, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    micro = [
        (torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64))
        for _ in range(12)
    ]
    every_k, sched = 3, fo.warmup_cosine_decay(1e-1, 1, 4)

    def loss_fn(p, x, y):
        return torch.nn.functional.mse_loss(fwd(p, x), y)

    opt = fo.multi_steps(fo.chain(fo.clip_by_global_norm(0.5), fo.adamw(sched, weight_decay=0.1)), every_k)
    state, p = opt.init(params), params
    for x, y in micro:
        grads = torch.func.grad(loss_fn)(p, x, y)
        updates, state = opt.update(grads, state, p)
        p = fo.apply_updates(p, updates)

    leaves, spec = optree.tree_flatten(params)
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    torch_opt = torch.optim.AdamW(leaves, lr=1e-1, weight_decay=0.1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda s: sched(s) / 1e-1)
    for i, (x, y) in enumerate(micro):
        (loss_fn(spec.unflatten(leaves), x, y) / every_k).backward()
        if (i + 1) % every_k == 0:
            torch.nn.utils.clip_grad_norm_(leaves, 0.5)
            torch_opt.step()
            lr_sched.step()
            torch_opt.zero_grad()
    assert_trees_close(p, spec.unflatten(leaves), rtol=1e-10, atol=1e-12)
    assert int(state.gradient_step) == len(micro) // every_k


def test_multi_steps_argument_errors():
    for bad in (0, -2):
        with pytest.raises(ValueError, match=rf"`every_k` must be >= 1.*got {bad}"):
            fo.multi_steps(fo.sgd(0.1), bad)
    for bad in (2.0, True, "2", None):
        with pytest.raises(TypeError, match="`every_k` must be an integer"):
            fo.multi_steps(fo.sgd(0.1), bad)
    with pytest.raises(TypeError, match="GradientTransformation"):
        fo.multi_steps("adamw", 2)
    opt, params = fo.multi_steps(fo.sgd(0.1), 2), make_tree(0)
    with pytest.raises(ValueError, match="multi_steps got the state"):
        opt.update(params, fo.sgd(0.1).init(params), params)
    assert fo.multi_steps(fo.sgd(0.1), np.int64(2)).init(params).mini_step == 0  # numpy integers are integers


@pytest.mark.parametrize("method", ["pissa", "vera"])
def test_weight_decay_leaves_frozen_adapter_leaves_alone(method):
    """PiSSA/OLoRA's initial factors and VeRA's shared projections are frozen: torch.optim skips them (no .grad);
    funcpeft.optim's weight decay, the one step that acts without a gradient, must skip them too, or every step
    would silently change the adapter. The trainable leaves still decay exactly as torch's AdamW decays them."""
    torch.manual_seed(0)
    model = MLP()
    if method == "pissa":
        config = funcpeft.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights="pissa")
    else:
        config = funcpeft.VeraConfig(r=4, target_modules=["lin1"], save_projection=True)
    params, fwd = funcpeft.adapt(model, config)
    x = torch.randn(4, 10)
    grads = torch.func.grad(lambda p: fwd(p, x).square().sum())(params)
    opt = fo.adamw(1e-2, weight_decay=0.5)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = fo.apply_updates(params, updates)
    frozen = [(p, n) for p, e in params.items() for n in e if p == "" or n in ("lora_A0", "lora_B0")]
    assert frozen, "the adapter has frozen leaves (or the test proves nothing)"
    for path, name in frozen:
        assert torch.equal(new[path][name], params[path][name]), f"{path}.{name} changed"
    # a trainable leaf: torch's AdamW on the same gradient gives the same step
    path, name = next((p, n) for p, e in params.items() for n in e if (p, n) not in frozen)
    leaf = params[path][name].detach().clone().requires_grad_(True)
    leaf.grad = grads[path][name].clone()
    torch_opt = torch.optim.AdamW([leaf], lr=1e-2, weight_decay=0.5)
    torch_opt.step()
    torch.testing.assert_close(new[path][name], leaf.detach())
