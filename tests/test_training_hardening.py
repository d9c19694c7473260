"""Hostile cases for the training-side utilities: ``funcpeft.grad_and_value`` / ``grad`` against ``torch.func``."""

from __future__ import annotations

import pytest
import torch
from _models import MLP, tiny_gpt2, token_ids
from torch.utils.checkpoint import checkpoint

import funcpeft as fp
from funcpeft import autograd

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _close(a, b) -> None:
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb, strict=True):
        torch.testing.assert_close(x, y)


def _mlp():
    torch.manual_seed(0)
    model = MLP().double()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    return fwd, params, torch.randn(6, 10, dtype=torch.float64)


def test_a_leaf_computed_from_another_leaf_gets_only_its_own_gradient() -> None:
    """torch.func gives each input its own gradient; autograd on the tensors as given added the gradient of the
    uses of ``b`` into ``a`` when ``b`` is a view of, or computed from, ``a``."""
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(p):
        return (p["a"][:2] * p["b"][:2] * p["b"][-1]).sum()

    for tree in ({"a": w, "b": w * 2}, {"a": w, "b": w.view(3)}, {"a": w, "b": w.flip(0)}):
        _close(fp.grad(f)(tree), torch.func.grad(f)(tree))
    # as separate arguments too, and the caller's tensors are left as they were
    g = fp.grad(lambda a, b: (a * b).sum(), argnums=(0, 1))(w, w.t())
    _close(g, (w.detach(), w.detach()))
    assert w.grad is None


def test_params_made_under_inference_mode() -> None:
    """Tensors created under ``torch.inference_mode()`` (params from ``fwd.init`` there, or a batch) can be
    differentiated, and a batch made there used, as with torch.func; they failed with torch's 'Setting
    requires_grad=True on inference tensor' / 'Inference tensors cannot be saved for backward' errors."""
    fwd, params, x = _mlp()
    with torch.inference_mode():
        frozen = {k: {n: t.detach().clone() for n, t in e.items()} for k, e in params.items()}
        batch = x.clone()

    def loss_fn(p, x):
        return fwd(p, x).pow(2).sum()

    expected = torch.func.grad_and_value(loss_fn)(params, x)
    _close(fp.grad_and_value(loss_fn)(frozen, x), expected)
    with torch.inference_mode():
        _close(fp.grad_and_value(loss_fn)(frozen, batch), expected)
        _close(fp.grad_and_value(loss_fn)(params, batch), expected)  # a batch made under inference_mode
        _close(fp.grad_and_value(lambda p, *, x: loss_fn(p, x))(params, x=batch), expected)
    _close(fp.grad_and_value(loss_fn)(frozen, batch), expected)  # both made there, called outside: as torch.func
    assert all(t.is_inference() and not t.requires_grad for e in frozen.values() for t in e.values())


def test_reentrant_checkpointing_over_closed_over_params_is_refused_not_zeros() -> None:
    """The adapter params are read inside the checkpointed layers, not passed to them: torch.autograd.grad never
    runs reentrant checkpointing's recomputation and every gradient came back as zeros, silently."""
    fwd, params, x = _mlp()
    x = x.requires_grad_()  # the layer input tracks (transformers' hidden states do: the embeddings require grad)
    with pytest.raises(ValueError, match=r"use_reentrant=True.*use_reentrant=False") as info:
        fp.grad(lambda p: checkpoint(lambda z: fwd(p, z), x, use_reentrant=True).sum())(params)
    assert isinstance(info.value, RuntimeError) and autograd._depth.value == 0
    _close(
        fp.grad(lambda p: checkpoint(lambda z: fwd(p, z), x, use_reentrant=False).sum())(params),
        fp.grad(lambda p: fwd(p, x).sum())(params),
    )

    model = tiny_gpt2()
    model.train()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["c_attn"], init_lora_weights=False))
    ids = token_ids(batch=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    try:
        with pytest.raises(ValueError, match=r"reentrant activation checkpointing"):
            fp.grad(lambda p: fwd(p, ids, labels=ids, use_cache=False).loss)(params)
    finally:
        model.gradient_checkpointing_disable()


def test_torch_func_parity_on_odd_signatures() -> None:
    """Cases no other test covers, each against torch.func: negative argnums, aux trees, complex params, kwargs."""
    x = torch.randn(3, dtype=torch.float64)
    y = torch.randn(3, dtype=torch.float64)
    c = torch.randn(3, dtype=torch.complex128)
    cases = [
        (lambda a, b: (a * b.exp()).sum(), {"argnums": -1}, (x, y), {}),
        (lambda a, b: (a * b**2).sum(), {"argnums": (1, -2)}, (x, y), {}),
        (lambda a: ((a**2).sum(), {"k": [a * 2, (a.sum(), a)], "n": [a.mean()]}), {"has_aux": True}, (x,), {}),
        (lambda a: (a * a.conj()).real.sum() + a.imag.sum(), {}, (c,), {}),
        (lambda a, *, b: (a * b).sum(), {}, (x,), {"b": y}),
        (lambda p: (p[0] * p[1][0]).sum(), {}, ((x, [y, torch.zeros(0, dtype=torch.float64)]),), {}),
    ]
    for f, kw, args, kwargs in cases:
        _close(fp.grad_and_value(f, **kw)(*args, **kwargs), torch.func.grad_and_value(f, **kw)(*args, **kwargs))


def test_a_loss_raising_midway_resets_nesting() -> None:
    """After a loss raises inside a nested call, the next top-level call is top-level again (no graph kept)."""
    x = torch.randn(3, requires_grad=True)

    def bad(a):
        fp.grad(lambda b: (b**3).sum())(a)
        raise KeyError("boom")

    with pytest.raises(KeyError):
        fp.grad(bad)(x)
    assert autograd._depth.value == 0
    g = fp.grad(lambda a: (a**3).sum())(x)
    assert g.grad_fn is None and not g.requires_grad and x.grad is None


def test_grad_and_value_of_a_sparse_grad_loss_gives_the_sparse_gradients() -> None:
    """`sparse_grad=True` gives storage-less sparse gradients: the aliasing check read their data pointers and
    failed ("Cannot access data pointer of Tensor that doesn't have storage")."""
    torch.manual_seed(0)
    model = MLP()
    _, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    stacked = fp.stack([fwd.init(torch.Generator().manual_seed(s)) for s in range(3)])
    x, ids = torch.randn(4, 10), torch.tensor([0, 2, 2, -1])
    grads, value = fp.grad_and_value(lambda p: fwd(p, x, adapter_ids=ids, sparse_grad=True).square().sum())(stacked)
    dense, expected = torch.func.grad_and_value(lambda p: fwd(p, x, adapter_ids=ids).square().sum())(stacked)
    torch.testing.assert_close(value, expected)
    for path, entry in dense.items():
        for name, g in entry.items():
            assert grads[path][name].is_sparse
            torch.testing.assert_close(grads[path][name].to_dense(), g)
