"""``funcpeft.grad_and_value`` / ``funcpeft.grad``: torch.func's results, computed by autograd."""

from __future__ import annotations

import pytest
import torch
from _models import MLP, tiny_gpt2, token_ids

import funcpeft as fp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _setup():
    torch.manual_seed(0)
    model = MLP().double()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    x = torch.randn(6, 10, dtype=torch.float64)
    y = torch.randn(6, 4, dtype=torch.float64)
    return fwd, params, x, y


def _assert_trees_close(a, b):
    assert list(a) == list(b)
    for path in a:
        assert list(a[path]) == list(b[path])
        for name in a[path]:
            torch.testing.assert_close(a[path][name], b[path][name], rtol=1e-12, atol=1e-12)


def test_equals_torch_func_with_and_without_aux() -> None:
    fwd, params, x, y = _setup()

    def loss_fn(p, x, y):
        out = fwd(p, x)
        return ((out - y) ** 2).mean(), {"out": out}

    ours_g, (ours_v, ours_aux) = fp.grad_and_value(loss_fn, has_aux=True)(params, x, y)
    theirs_g, (theirs_v, theirs_aux) = torch.func.grad_and_value(loss_fn, has_aux=True)(params, x, y)
    _assert_trees_close(ours_g, theirs_g)
    torch.testing.assert_close(ours_v, theirs_v)
    torch.testing.assert_close(ours_aux["out"], theirs_aux["out"])
    assert not ours_v.requires_grad and not ours_aux["out"].requires_grad
    plain = fp.grad(lambda p: loss_fn(p, x, y)[0])(params)
    _assert_trees_close(plain, theirs_g)
    g, aux = fp.grad(loss_fn, has_aux=True)(params, x, y)
    _assert_trees_close(g, theirs_g)
    assert all(t.grad is None for e in params.values() for t in e.values())  # inputs left alone


def test_tuple_argnums_and_unused_leaves_get_zeros() -> None:
    fwd, params, x, y = _setup()

    def loss_fn(p, x, scale):
        return (fwd(p, x) * scale).sum()

    scale = torch.tensor(2.0, dtype=torch.float64)
    (gp, gx), value = fp.grad_and_value(loss_fn, argnums=(0, 1))(params, x, scale)
    (tp, tx), tvalue = torch.func.grad_and_value(loss_fn, argnums=(0, 1))(params, x, scale)
    _assert_trees_close(gp, tp)
    torch.testing.assert_close(gx, tx)
    torch.testing.assert_close(value, tvalue)
    extra = {**params, "unused": {"w": torch.ones(3, dtype=torch.float64)}}
    grads = fp.grad(lambda p: fwd({k: v for k, v in p.items() if k != "unused"}, x).sum())(extra)
    assert torch.equal(grads["unused"]["w"], torch.zeros(3, dtype=torch.float64))


def test_works_with_activation_checkpointing_where_torch_func_cannot() -> None:
    model = tiny_gpt2()
    model.gradient_checkpointing_enable()
    model.train()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    x = token_ids(batch=2)

    def loss_fn(p):
        return fwd(p, x, labels=x, use_cache=False).loss

    grads, value = fp.grad_and_value(loss_fn)(params)
    model.gradient_checkpointing_disable()
    expected, expected_value = fp.grad_and_value(loss_fn)(params)
    torch.testing.assert_close(value, expected_value)
    for path in grads:
        for name in grads[path]:
            torch.testing.assert_close(grads[path][name], expected[path][name], rtol=1e-5, atol=1e-6)
    model.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="checkpointing"):
        torch.func.grad(loss_fn)(params)


def test_runs_under_no_grad_like_torch_func() -> None:
    fwd, params, x, y = _setup()
    with torch.no_grad():
        g = fp.grad(lambda p: fwd(p, x).sum())(params)
    _assert_trees_close(g, torch.func.grad(lambda p: fwd(p, x).sum())(params))


def test_bad_uses_are_refused_clearly() -> None:
    fwd, params, x, y = _setup()
    with pytest.raises(TypeError, match=r"`argnums` must be an int or a non-empty tuple"):
        fp.grad_and_value(lambda p: p, argnums="0")
    with pytest.raises(ValueError, match=r"`argnums` 3 is out of range for 1"):
        fp.grad(lambda p: fwd(p, x).sum(), argnums=3)(params)
    with pytest.raises(TypeError, match=r"scalar loss tensor.*shape \(6, 4\)"):
        fp.grad(lambda p: fwd(p, x))(params)
    with pytest.raises(TypeError, match=r"\(loss, aux\) pair"):
        fp.grad(lambda p: fwd(p, x).sum(), has_aux=True)(params)
    with pytest.raises(ValueError, match=r"no floating-point tensor"):
        fp.grad(lambda n: torch.tensor(1.0))(torch.tensor([1, 2]))
