"""Gradient transformations: the building blocks of :mod:`funcpeft.optim` (optax's ``transform.py``).

A transformation is a pair of pure functions ``(init, update)``: ``state = init(params)`` and
``updates, state = update(updates, state, params)``. Neither mutates its arguments: every call returns new
tensors and a new state (a NamedTuple pytree), so an old state stays valid (for checkpoints, rollbacks or
comparing runs). Trees are any optree pytree of tensors; in funcpeft they are ``{module_path: {name: Tensor}}``,
possibly stacked with a leading adapter dim K. Every op is elementwise, except :func:`clip_by_global_norm`, whose
``stacked=True`` computes one norm per adapter, so the K adapters of a stacked tree are updated independently.

This module defines the elementwise transformations and :func:`apply_updates`; it re-exports the state
NamedTuples (defined in :mod:`funcpeft.optim._flat`, with the shared machinery: how updates travel through a
chain, flattened once and scaled lazily) and the combinators of :mod:`funcpeft.optim.combine` (:func:`chain`,
:func:`masked`, :func:`freeze`, :func:`multi_transform`, :func:`multi_steps`), so every name stays importable
from here.

Under ``torch.compile`` an ``update`` and :func:`apply_updates` run eagerly (``torch.compiler.disable``): a compiled
training step compiles the loss and its gradients, the expensive part, and the optimizer stays the few foreach
ops of :mod:`funcpeft.optim._flat`. Tracing them would gain little and cost a recompile per step (the step count
sets the bias corrections and schedule), and ``apply_updates`` must return leaves that require grad, which a
compiled graph cannot output anyway.
"""

from __future__ import annotations

import math
from typing import Any

import optree
import torch
from torch import Tensor

from funcpeft.methods.lora_init import INITIAL
from funcpeft.optim._flat import (
    EmptyState,
    GradientTransformation,
    MaskedState,
    MultiStepsState,
    MultiTransformState,
    ScaleByAdamState,
    ScaleByScheduleState,
    Spec,
    TraceState,
    Tree,
    _add_scalar_,
    _check_dtypes,
    _check_number,
    _count0,
    _Flat,
    _LeafUpdate,
    _leaves_like,
    _mul,
    _path,
    _shapes,
    _state_leaves,
    _stateless,
    _zeros,
)
from funcpeft.optim.combine import chain, freeze, masked, multi_steps, multi_transform
from funcpeft.optim.schedule import Schedule

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "MaskedState",
    "MultiStepsState",
    "MultiTransformState",
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "TraceState",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "freeze",
    "identity",
    "masked",
    "multi_steps",
    "multi_transform",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "set_to_zero",
    "trace",
]


def identity() -> GradientTransformation:
    """Pass the updates through unchanged (optax's ``identity``)."""
    return _stateless(lambda u, state, p, spec: (u, state))


def set_to_zero() -> GradientTransformation:
    """Replace every update by zeros (optax's ``set_to_zero``): with :func:`multi_transform`, freezes leaves."""
    return _stateless(lambda u, state, p, spec: (_Flat([torch.zeros_like(t) for t in u.tensors], True), state))


def scale(factor: float) -> GradientTransformation:
    """Multiply the updates by a constant ``factor`` (optax's ``scale``)."""
    factor = _check_number("factor", factor, low=float("-inf"))
    return _stateless(lambda u, state, p, spec: (u._replace(scale=u.scale * factor), state))


def scale_by_learning_rate(learning_rate: float | Schedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply the updates by ``-learning_rate`` (``+`` with ``flip_sign=False``), optax's convention.

    Args:
        learning_rate: a float, or a schedule ``step -> float``; update ``n`` (from 0) uses ``schedule(n)``, as
            optax and ``torch.optim.lr_scheduler.LambdaLR`` stepped after each optimizer step.
        flip_sign: negate, so that :func:`apply_updates` descends.

    Returns:
        The transformation; its state is :class:`EmptyState` for a float, :class:`ScaleByScheduleState` for a
        schedule.
    """
    sign = -1.0 if flip_sign else 1.0
    if not callable(learning_rate):
        return scale(sign * _check_number("learning_rate", learning_rate))
    schedule = learning_rate

    def leaves(u: _Flat, state: ScaleByScheduleState, p: Any, spec: Spec) -> tuple[_Flat, Any]:
        step = int(state.count)
        lr = schedule(step)
        if isinstance(lr, bool) or not isinstance(lr, int | float):
            raise TypeError(f"The learning-rate schedule returned {lr!r} at step {step}; it must return a float.")
        return u._replace(scale=u.scale * sign * lr), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(lambda params: ScaleByScheduleState(_count0()), _LeafUpdate(leaves))


def add_decayed_weights(weight_decay: float = 0.0) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates (optax's ``add_decayed_weights``).

    Before :func:`scale_by_adam` this is torch ``Adam``'s L2 penalty (``grad += wd * p``); after it, followed by
    :func:`scale_by_learning_rate`, it is ``AdamW``'s decoupled decay ``p -= lr * wd * p``.

    The frozen leaves of an adapter tree are never decayed: the root entry ``params[""]`` (VeRA's shared
    projections) and LoRA's initial factors ``lora_A0``/``lora_B0`` (PiSSA/OLoRA). Their gradient is zero, so
    every other transformation leaves them alone; weight decay alone would shrink them and silently change the
    adapter (torch's optimizers skip them too: their ``.grad`` stays None).
    """
    weight_decay = _check_number("weight_decay", weight_decay)
    frozen_by_spec: dict[Spec, list[int]] = {}

    def leaves(u: _Flat, state: Any, p: list[Tensor] | None, spec: Spec) -> tuple[_Flat, Any]:
        if weight_decay == 0.0 or not u.tensors:
            return u, state
        if p is None:
            raise ValueError("add_decayed_weights needs the params: call `update(grads, state, params)`.")
        frozen = frozen_by_spec.get(spec)
        if frozen is None:
            if len(frozen_by_spec) > 64:
                frozen_by_spec.clear()
            frozen = frozen_by_spec[spec] = [i for i, path in enumerate(spec.paths()) if _frozen(path)]
        if frozen:
            p = list(p)
            for i in frozen:
                p[i] = torch.zeros_like(p[i])
        if u.scale == 0.0:
            u = u.materialize()
        alpha = weight_decay / u.scale  # scale * (t + wd / scale * p) == scale * t + wd * p
        if u.owned:
            torch._foreach_add_(u.tensors, p, alpha=alpha)
            return u, state
        return _Flat(list(torch._foreach_add(u.tensors, p, alpha=alpha)), True, u.scale), state

    return _stateless(leaves)


def _frozen(path: tuple[Any, ...]) -> bool:
    """A frozen leaf of a funcpeft adapter tree (see :func:`add_decayed_weights`)."""
    return len(path) == 2 and (path[0] == "" or path[1] in INITIAL)


def trace(decay: float, *, nesterov: bool = False) -> GradientTransformation:
    """Momentum (optax's ``trace``), as torch ``SGD`` with ``dampening=0``: ``buf = decay * buf + g``.

    The buffer starts at zero, so the first step's buffer is ``g`` (torch's first-step copy). The update is
    ``buf``, or ``g + decay * buf`` with ``nesterov=True``.
    """
    decay = _check_number("momentum", decay)

    def leaves(u: _Flat, state: TraceState, p: Any, spec: Spec) -> tuple[_Flat, Any]:
        g = u.materialize()
        if not g.tensors:
            return g, state
        old = _state_leaves(state.trace, spec, "trace", _shapes(g.tensors))
        if g.owned and not nesterov:  # a fresh gradient buffer (e.g. after weight decay) becomes the new trace
            buf = g.tensors
            torch._foreach_add_(buf, old, alpha=decay)
        else:
            buf = list(torch._foreach_add(g.tensors, old, alpha=decay))
        new_state = TraceState(spec.unflatten(buf))
        if not nesterov:
            return _Flat(buf), new_state  # not owned: the state holds these tensors
        if g.owned:
            torch._foreach_add_(g.tensors, buf, alpha=decay)
            return g, new_state
        return _Flat(list(torch._foreach_add(g.tensors, buf, alpha=decay)), True), new_state

    return GradientTransformation(lambda params: TraceState(_zeros(params)), _LeafUpdate(leaves))


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` (Kingma & Ba 2015; optax's ``scale_by_adam``).

    Moments and bias corrections as torch ``Adam``: ``m = lerp(m, g, 1 - b1)``, ``v = b2 v + (1 - b2) g^2``,
    ``t`` counting from 1, ``eps`` added after the square root and the ``sqrt(1 - b2^t)`` correction.
    """
    b1 = _check_number("b1", b1, 0.0, 1.0)
    b2 = _check_number("b2", b2, 0.0, 1.0)
    eps = _check_number("eps", eps)

    def leaves(u: _Flat, state: ScaleByAdamState, p: Any, spec: Spec) -> tuple[_Flat, Any]:
        g = u.materialize().tensors
        if not g:
            return _Flat(g, True), state._replace(count=state.count + 1)
        t = int(state.count) + 1
        shapes = _shapes(g)
        mu, nu = _state_leaves(state.mu, spec, "mu", shapes), _state_leaves(state.nu, spec, "nu", shapes)
        try:
            mu = list(torch._foreach_lerp(mu, g, 1.0 - b1))
        except RuntimeError:
            _check_dtypes(mu, g, spec, "mu")  # the clear error for a state of other dtypes, else torch's
            raise
        nu = _mul(nu, b2, False)
        torch._foreach_addcmul_(nu, g, g, 1.0 - b2)
        bc1, bc2_sqrt = 1.0 - b1**t, (1.0 - b2**t) ** 0.5
        # m / bc1 / (sqrt(v) / bc2_sqrt + eps) == (bc2_sqrt / bc1) * m / (sqrt(v) + eps * bc2_sqrt): the factor
        # rides along as the pending scale, merged with the learning rate into one multiplication. The quotient
        # is formed in the denominator's buffer (1 / (d / m), 0 where m is 0): one fresh buffer fewer per step,
        # which matters on CPU, where fresh memory can mean page faults (benchmarks/bench_optim.py).
        out = torch._foreach_sqrt(nu)
        _add_scalar_(out, eps * bc2_sqrt)
        torch._foreach_div_(out, mu)
        torch._foreach_reciprocal_(out)
        new_state = ScaleByAdamState(state.count + 1, spec.unflatten(mu), spec.unflatten(nu))
        return _Flat(list(out), True, bc2_sqrt / bc1), new_state

    init = lambda params: ScaleByAdamState(_count0(), _zeros(params), _zeros(params))
    return GradientTransformation(init, _LeafUpdate(leaves))


def clip_by_global_norm(max_norm: float, *, stacked: bool = False) -> GradientTransformation:
    """Scale the updates so their global L2 norm is at most ``max_norm``: ``torch.nn.utils.clip_grad_norm_``.

    The factor is ``min(1, max_norm / (total_norm + 1e-6))`` with ``total_norm`` the 2-norm of the per-tensor
    2-norms, exactly as torch (which, unlike optax, always multiplies and adds 1e-6).

    Args:
        max_norm: the largest allowed norm.
        stacked: the tree holds K adapters along every leaf's leading dim (``funcpeft.stack``): compute one
            norm and one factor per adapter, so each is clipped as if trained alone.
    """
    max_norm = _check_number("max_norm", max_norm)

    def leaves(u: _Flat, state: Any, p: Any, spec: Spec) -> tuple[_Flat, Any]:
        g = u.materialize()
        if not g.tensors:
            return g, state
        if stacked:
            factors = _per_adapter_factors(g.tensors, max_norm, spec)
        else:
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g.tensors, 2.0)), 2.0)
            factors = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if g.owned:
            torch._foreach_mul_(g.tensors, factors)
            return g, state
        return _Flat(list(torch._foreach_mul(g.tensors, factors)), True), state

    return _stateless(leaves)


def _per_adapter_factors(g: list[Tensor], max_norm: float, spec: Spec) -> list[Tensor]:
    """clip_grad_norm_'s factor for each adapter of a stacked tree, shaped to broadcast against each leaf."""
    k = g[0].shape[0] if g[0].dim() else None
    for i, t in enumerate(g):
        if t.dim() == 0 or t.shape[0] != k:
            raise ValueError(
                f"clip_by_global_norm(stacked=True) needs every leaf to have the same leading adapter dim ({k}), "
                f"but {_path(spec, i)!r} has shape {tuple(t.shape)}. Stack adapters with funcpeft.stack."
            )
    # (leaves, K); the explicit row size also reshapes an empty stack (K = 0), where -1 is ambiguous
    norms = torch.stack([torch.linalg.vector_norm(t.reshape(k, math.prod(t.shape[1:])), 2.0, dim=1) for t in g])
    coef = torch.clamp(max_norm / (torch.linalg.vector_norm(norms, 2.0, dim=0) + 1e-6), max=1.0)
    views: dict[int, Tensor] = {}
    return [views.setdefault(t.dim(), coef.view(k, *(1,) * (t.dim() - 1))) for t in g]


@torch.compiler.disable
def apply_updates(params: Tree, updates: Tree) -> Tree:
    """``params + updates`` as new leaf tensors with ``requires_grad=True`` (the ``funcpeft.adapt`` convention).

    The addition is not recorded by autograd; ``params`` is not modified. Updates are cast to each param's dtype
    (optax's convention), so a float32 optimizer state never promotes half-precision params.
    """
    p, spec = optree.tree_flatten(params)
    u = _leaves_like(updates, spec, "updates", _shapes(p), "the param")
    if not p:
        return spec.unflatten([])
    with torch.no_grad():
        u = [x if x.dtype == y.dtype else x.to(y.dtype) for x, y in zip(u, p, strict=True)]
        new = torch._foreach_add(p, u)
    for t in new:
        t.requires_grad_(True)
    return spec.unflatten(new)
