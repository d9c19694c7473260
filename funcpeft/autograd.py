"""``funcpeft.grad_and_value`` / ``funcpeft.grad``: ``torch.func``'s signatures, computed by plain autograd.

``torch.func.grad_and_value(loss_fn)(params, batch)`` is the JAX way to train, but in PyTorch it runs every op
through functorch's interpreter (measured 1.2-1.5x plain autograd on small models), and it cannot transform
activation checkpointing or ``torch.autograd.Function``s without ``setup_context`` (bitsandbytes' kernels).
These functions keep the functional signature and results, and compute them with ``torch.autograd.grad`` on
fresh leaves that share the inputs' storage:

- ``grad_and_value(loss_fn, argnums=0, has_aux=False)(*args)`` returns ``(grads, value)``, or
  ``(grads, (value, aux))`` with ``has_aux``; ``grads`` has the structure of ``args[argnums]`` (a tuple of such
  for a tuple ``argnums``); nothing keeps a graph, and the inputs are not modified (their ``.grad`` neither);
- an input leaf that does not influence the loss gets a zero gradient (as ``torch.func``), never ``None``.

Use ``torch.func.grad`` where a transform must see the gradient itself: ``vmap`` of ``grad`` for per-example or
per-adapter gradients, ``jvp`` of ``grad``, or a gradient inside another ``torch.func`` transform.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import Tensor

__all__ = ["grad", "grad_and_value"]


def grad_and_value(
    loss_fn: Callable[..., Any], argnums: int | tuple[int, ...] = 0, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """``torch.func.grad_and_value``'s signature and results, by ``torch.autograd.grad`` (see the module docstring).

    Raises (when called):
        TypeError: ``argnums`` is not an int or a tuple of ints, the loss is not a scalar tensor, or with
            ``has_aux`` the function does not return a ``(loss, aux)`` pair.
        ValueError: ``argnums`` is out of range for the call's arguments, or an input holds no floating tensor.
    """
    _check_argnums(argnums)
    if not isinstance(has_aux, bool):
        raise TypeError(f"`has_aux` must be a bool, got {type(has_aux).__name__}.")

    def wrapper(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        nums = (argnums,) if isinstance(argnums, int) else argnums
        for n in nums:
            if not -len(args) <= n < len(args):
                raise ValueError(f"`argnums` {n} is out of range for {len(args)} positional arguments.")
        args = list(args)
        specs, leaves = [], []
        for n in nums:
            flat, spec = optree.tree_flatten(args[n])
            fresh = [_fresh(t) for t in flat]
            if not any(t is not None for t in fresh):
                raise ValueError(f"Argument {n} holds no floating-point tensor to differentiate with respect to.")
            args[n] = optree.tree_unflatten(spec, [f if f is not None else t for f, t in zip(fresh, flat, strict=True)])
            specs.append((spec, flat, fresh))
            leaves.extend(t for t in fresh if t is not None)
        with torch.enable_grad():
            out = loss_fn(*args, **kwargs)
            value, aux = _split(out, has_aux)
            found = (
                torch.autograd.grad(value, leaves, allow_unused=True) if value.requires_grad else [None] * len(leaves)
            )
        found = iter(found)
        grads = []
        for spec, flat, fresh in specs:
            per = []
            for t, f in zip(flat, fresh, strict=True):
                if f is None:
                    per.append(torch.zeros_like(t) if isinstance(t, Tensor) else t)
                else:
                    g = next(found)
                    per.append(torch.zeros_like(f) if g is None else g)
            grads.append(optree.tree_unflatten(spec, per))
        result = grads[0] if isinstance(argnums, int) else tuple(grads)
        value = value.detach()
        return (result, (value, _detach(aux))) if has_aux else (result, value)

    return wrapper


def grad(loss_fn: Callable[..., Any], argnums: int | tuple[int, ...] = 0, has_aux: bool = False) -> Callable[..., Any]:
    """``torch.func.grad``'s signature and results by autograd: the gradients (and ``aux`` with ``has_aux``)."""
    inner = grad_and_value(loss_fn, argnums, has_aux)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        grads, value = inner(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapper


def _fresh(t: Any) -> Tensor | None:
    """A new leaf sharing ``t``'s storage (so the user's tensor and its ``.grad`` are left alone), or None for
    what is not differentiable."""
    if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()):
        return t.detach().requires_grad_(True)
    return None


def _split(out: Any, has_aux: bool) -> tuple[Tensor, Any]:
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"With has_aux=True the function must return a (loss, aux) pair, got {type(out).__name__}.")
        value, aux = out
    else:
        value, aux = out, None
    if not isinstance(value, Tensor) or value.numel() != 1:
        what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"The function must return a scalar loss tensor (one element), got {what}.")
    return value.reshape(()), aux


def _detach(aux: Any) -> Any:
    return optree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, aux)


def _check_argnums(argnums: Any) -> None:
    ok = isinstance(argnums, int) and not isinstance(argnums, bool)
    ok = ok or (
        isinstance(argnums, tuple)
        and len(argnums) > 0
        and all(isinstance(n, int) and not isinstance(n, bool) for n in argnums)
    )
    if not ok:
        raise TypeError(f"`argnums` must be an int or a non-empty tuple of ints, got {argnums!r}.")
