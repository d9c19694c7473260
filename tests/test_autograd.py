"""``funcpeft.grad_and_value`` / ``funcpeft.grad``: torch.func's results and errors, computed by autograd."""

from __future__ import annotations

import collections
import threading

import pytest
import torch
from _models import MLP, oracle, tiny_gpt2, tiny_llama, token_ids
from torch.utils.checkpoint import checkpoint

import funcpeft as fp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _mlp():
    torch.manual_seed(0)
    model = MLP().double()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    x = torch.randn(6, 10, dtype=torch.float64)
    y = torch.randn(6, 4, dtype=torch.float64)
    return fwd, params, x, y


def _close(a, b, **tol) -> None:
    """Same pytree structure (types, keys, order) and close leaves."""
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb, strict=True):
        torch.testing.assert_close(x, y, **tol)


def _snapshot(params):
    return {(k, n): (t.clone(), t.requires_grad, t.grad) for k, e in params.items() for n, t in e.items()}


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_equals_torch_func_on_transformers_lora(build) -> None:
    model = build()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules="all-linear", init_lora_weights=False))
    x = token_ids(batch=2)

    def loss_fn(p, ids):
        out = fwd(p, ids, labels=ids, use_cache=False)
        return out.loss, {"logits": out.logits}

    before = _snapshot(params)
    ours = fp.grad_and_value(loss_fn, has_aux=True)(params, x)
    theirs = torch.func.grad_and_value(loss_fn, has_aux=True)(params, x)
    _close(ours, theirs, rtol=1e-5, atol=1e-6)
    grads, (value, aux) = ours
    assert not value.requires_grad and value.grad_fn is None and not aux["logits"].requires_grad
    _close(fp.grad(lambda p: loss_fn(p, x)[0])(params), theirs[0], rtol=1e-5, atol=1e-6)
    _close(fp.grad(loss_fn, has_aux=True)(params, x), (theirs[0], theirs[1][1]), rtol=1e-5, atol=1e-6)
    for key, (t, flag, g) in before.items():  # the caller's params: same values, flags and (no) .grad
        now = params[key[0]][key[1]]
        assert torch.equal(now, t) and now.requires_grad == flag and now.grad is g is None
        assert grads[key[0]][key[1]].data_ptr() != now.data_ptr()


def test_tuple_argnums_structures_and_zeros_for_what_the_loss_does_not_reach() -> None:
    fwd, params, x, y = _mlp()

    def loss_fn(p, x, extra):
        return (fwd(p, x) * extra[0]).sum()

    extra = (torch.tensor(2.0, dtype=torch.float64), collections.OrderedDict(w=torch.ones(3, dtype=torch.float64)))
    for argnums in [(0, 1, 2), (2, -3), 1]:
        ours = fp.grad_and_value(loss_fn, argnums=argnums)(params, x, extra)
        _close(ours, torch.func.grad_and_value(loss_fn, argnums=argnums)(params, x, extra))
    (_, g_extra), _ = fp.grad_and_value(loss_fn, argnums=(0, 2))(params, x, extra)
    assert type(g_extra[1]) is collections.OrderedDict and torch.equal(g_extra[1]["w"], torch.zeros(3).double())
    # a loss that does not depend on the inputs at all (no graph): zeros, as torch.func
    _close(fp.grad(lambda p: torch.tensor(1.0))(params), torch.func.grad(lambda p: torch.tensor(1.0))(params))


def test_one_tensor_twice_in_the_tree_gets_a_gradient_per_occurrence_like_torch_func() -> None:
    w = torch.randn(3, requires_grad=True)
    v = torch.randn(3)

    def loss_fn(p):
        return (p["a"] * 2).sum() + (p["b"] ** 2).sum() + (p["c"] * p["d"]).sum()

    tree = {"a": w, "b": w, "c": v, "d": v}
    _close(fp.grad(loss_fn)(tree), torch.func.grad(loss_fn)(tree))


def test_gradients_are_fresh_tensors() -> None:
    a, b = torch.randn(4, requires_grad=True), torch.randn(4)
    ga, gb = fp.grad(lambda a, b: (a + b).sum(), argnums=(0, 1))(a, b)
    # autograd (and torch.func) give one stride-0 buffer to both; an in-place optimizer update needs two
    assert ga.data_ptr() != gb.data_ptr() and ga.stride() == gb.stride() == (1,)
    ga.add_(1.0)
    assert torch.equal(gb, torch.ones(4)) and torch.equal(ga, torch.full((4,), 2.0))
    (g,) = fp.grad(lambda t: (t[0] * 3).sum(), argnums=0)((a,))
    assert g.data_ptr() != a.data_ptr() and a.grad is None


def test_activation_checkpointing_where_torch_func_cannot() -> None:
    model = tiny_gpt2()
    model.train()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    x = token_ids(batch=2)

    def loss_fn(p):
        return fwd(p, x, labels=x, use_cache=False).loss

    expected = torch.func.grad_and_value(loss_fn)(params)
    model.gradient_checkpointing_enable()  # transformers' default: non-reentrant
    try:
        _close(fp.grad_and_value(loss_fn)(params), expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="checkpointing"):
            torch.func.grad(loss_fn)(params)
    finally:
        model.gradient_checkpointing_disable()


def test_torch_utils_checkpoint_and_reentrant_refused_clearly() -> None:
    fwd, params, x, _ = _mlp()

    def loss_fn(p, reentrant):
        return checkpoint(lambda q: fwd(q, x), p, use_reentrant=reentrant).pow(2).sum()

    _close(fp.grad(loss_fn)(params, False), fp.grad(lambda p, _: fwd(p, x).pow(2).sum())(params, False))
    with pytest.raises(ValueError, match=r"use_reentrant=True.*use_reentrant=False"):
        fp.grad(lambda t: checkpoint(torch.sin, t, use_reentrant=True).sum())(x)


class _Cube(torch.autograd.Function):
    """Old-style autograd.Function (no setup_context), as bitsandbytes' matmuls are."""

    @staticmethod
    def forward(ctx, t):
        ctx.save_for_backward(t)
        return t**3

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return 3 * t**2 * g


def test_autograd_function_without_setup_context() -> None:
    fwd, params, x, _ = _mlp()

    def loss_fn(p):
        return _Cube.apply(fwd(p, x)).sum()

    _close(fp.grad(loss_fn)(params), fp.grad(lambda p: (fwd(p, x) ** 3).sum())(params))
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(loss_fn)(params)


def test_bitsandbytes_base_equals_plain_autograd() -> None:
    bnb = oracle("bitsandbytes")
    torch.manual_seed(0)
    model = MLP(64, 64, 64).eval()
    for name in ("lin0", "lin1", "head"):
        layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=0.0)
        layer.load_state_dict(getattr(model, name).state_dict())
        setattr(model, name, layer.to("cpu"))  # bitsandbytes quantizes on .to(device)
    model.requires_grad_(False)
    # the head stays unadapted: it runs bitsandbytes' own forward
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))

    def loss_fn(p):
        return fwd(p, x).square().mean()

    grads = fp.grad(loss_fn)(params)
    loss_fn(params).backward()
    for path, entry in params.items():
        for name, tensor in entry.items():
            torch.testing.assert_close(grads[path][name], tensor.grad)
            assert grads[path][name].abs().sum() > 0


def test_under_torch_compile() -> None:
    fwd, params, x, y = _mlp()

    def loss_fn(p):
        return ((fwd(p, x) - y) ** 2).mean()

    expected = torch.func.grad_and_value(loss_fn)(params)
    # a compiled loss inside an eager call: its compiled forward and backward graphs
    _close(fp.grad_and_value(torch.compile(loss_fn))(params), expected)
    # the whole step compiled: under dynamo the call is torch.func's, so fullgraph works
    step = torch.compile(lambda p: fp.grad_and_value(loss_fn)(p), fullgraph=True)
    grads, value = step(params)
    _close((grads, value), expected)
    assert all(not g.requires_grad for e in grads.values() for g in e.values())
    t = torch.tensor([0.5, -1.5, 2.0])
    nested = torch.compile(lambda t: fp.grad(lambda u: fp.grad(lambda v: (v.sin() * v**3).sum())(u).sum())(t))
    _close(nested(t), torch.func.grad(lambda u: torch.func.grad(lambda v: (v.sin() * v**3).sum())(u).sum())(t))


def test_under_no_grad_inference_mode_and_inside_torch_func_transforms() -> None:
    fwd, params, x, y = _mlp()

    def loss_fn(p, x):
        return fwd(p, x).sum()

    with torch.no_grad():
        g = fp.grad(loss_fn)(params, x)
        assert not torch.is_grad_enabled()
    _close(g, torch.func.grad(loss_fn)(params, x))
    with torch.inference_mode():
        _close(fp.grad(loss_fn)(params, x), g)
        assert torch.is_inference_mode_enabled()
    # vmap of grad: per-example gradients, as torch.func.grad gives them
    per_example = torch.func.vmap(fp.grad(loss_fn), in_dims=(None, 0))(params, x[:, None])
    _close(per_example, torch.func.vmap(torch.func.grad(loss_fn), in_dims=(None, 0))(params, x[:, None]))


def test_nested_gives_higher_order_gradients_like_torch_func() -> None:
    t = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)

    def f(x):
        return (x.sin() * x**3).sum()

    def inner_norm(x):  # a loss built from an inner call's gradient and value
        g, v = fp.grad_and_value(f)(x)
        return (g**2).sum() + v

    def inner_norm_tf(x):
        g, v = torch.func.grad_and_value(f)(x)
        return (g**2).sum() + v

    _close(fp.grad(lambda x: fp.grad(f)(x).sum())(t), torch.func.grad(lambda x: torch.func.grad(f)(x).sum())(t))
    _close(fp.grad(inner_norm)(t), torch.func.grad(inner_norm_tf)(t))
    third = fp.grad(lambda x: fp.grad(lambda y: fp.grad(f)(y).sum())(x).sum())(t)
    expected = torch.func.grad(lambda x: torch.func.grad(lambda y: torch.func.grad(f)(y).sum())(x).sum())(t)
    _close(third, expected)
    # nesting is per thread: a top-level call in another thread, while this one is nested, keeps no graph
    seen = []

    def outer(x):
        worker = threading.Thread(target=lambda: seen.append(fp.grad(f)(t.clone())))
        worker.start()
        worker.join()
        return fp.grad(f)(x).sum()

    fp.grad(outer)(t)
    assert seen[0].grad_fn is None and not seen[0].requires_grad
    # the top-level result keeps no graph, also after nesting
    assert not fp.grad(lambda x: fp.grad(f)(x).sum())(t.requires_grad_()).requires_grad


def test_bad_uses_are_refused_like_torch_func() -> None:
    fwd, params, x, _ = _mlp()
    with pytest.raises(TypeError, match=r"`argnums` must be an int or a non-empty tuple"):
        fp.grad_and_value(lambda p: p, argnums="0")
    with pytest.raises(TypeError, match=r"`argnums` must be"):
        fp.grad(lambda p: p, argnums=())
    with pytest.raises(TypeError, match=r"`has_aux` must be a bool"):
        fp.grad(lambda p: p, has_aux=1)
    cases = [
        (lambda: fp.grad(lambda p: fwd(p, x).sum(), argnums=3)(params), ValueError, r"`argnums` 3 is out of range"),
        (lambda: fp.grad(lambda p, q: p.sum(), argnums=(1, -1))(x, x), ValueError, r"names one argument twice"),
        (lambda: fp.grad(lambda p: fwd(p, x))(params), TypeError, r"scalar Tensor, got tensor with 2 dims"),
        (lambda: fp.grad(lambda p: fwd(p, x).sum()[None])(params), TypeError, r"with 1 dims \(shape \(1,\)\)"),
        (lambda: fp.grad(lambda p: 1.0)(params), TypeError, r"return a Tensor, got float"),
        (lambda: fp.grad(lambda p: fwd(p, x).sum(), has_aux=True)(params), TypeError, r"\(output, aux\)"),
        (lambda: fp.grad(lambda p: (x.sum(), 1, 2), has_aux=True)(params), TypeError, r"got a tuple of 3"),
        (lambda: fp.grad(lambda p: p["a"].sum())({"a": x, "n": 3}), ValueError, r"int at path \['n'\]"),
        (lambda: fp.grad(lambda p: p["a"].sum())({"a": x, "i": torch.ones(2).long()}), TypeError, r"int64.*\['i'\]"),
    ]
    for call, kind, pattern in cases:
        with pytest.raises(kind, match=pattern) as info:
            call()
        assert isinstance(info.value, RuntimeError)  # what torch.func raises, for code written against it
        assert "funcpeft.grad_and_value(f)(*args)" in str(info.value)
