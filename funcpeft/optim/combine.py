"""Combinators of gradient transformations (optax's ``combine.py`` and ``wrappers.py``).

:func:`chain` runs transformations in sequence; :func:`masked`, :func:`freeze` and :func:`multi_transform` apply
them to parts of the tree; :func:`multi_steps` accumulates gradients over micro-steps. Each runs its inner
transformations on the leaves its caller flattened (funcpeft's own directly, a user's through trees), so a
whole chain flattens its trees once. All names are re-exported by :mod:`funcpeft.optim.transform` and
:mod:`funcpeft.optim`.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping
from typing import Any

import optree
import torch
from torch import Tensor

from funcpeft.optim._flat import (
    GradientTransformation,
    MaskedState,
    MaskOrFn,
    MultiStepsState,
    MultiTransformState,
    Spec,
    Tree,
    _count0,
    _Flat,
    _LeafUpdate,
    _path,
    _run,
    _shapes,
    _state_leaves,
)

__all__ = ["chain", "freeze", "masked", "multi_steps", "multi_transform"]


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order (optax's ``chain``); the state is the tuple of their states.

    The trees are flattened once for the whole chain; transformations that are not funcpeft's run on trees.
    """
    for i, t in enumerate(transforms):
        if not (isinstance(t, tuple) and len(t) == 2 and callable(t[0]) and callable(t[1])):
            raise TypeError(f"chain: argument {i} must be a GradientTransformation (init, update), got {t!r}.")

    def leaves(u: _Flat, state: tuple[Any, ...], p: list[Tensor] | None, spec: Spec) -> tuple[_Flat, Any]:
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(f"This chain of {len(transforms)} transformations got the state {state!r}.")
        states = []
        for t, s in zip(transforms, state, strict=True):
            u, s = _run(t, u, s, p, spec)
            states.append(s)
        return u, tuple(states)

    return GradientTransformation(lambda params: tuple(t.init(params) for t in transforms), _LeafUpdate(leaves))


def _broadcast(labels: MaskOrFn, tree: Tree, what: str) -> list[Any]:
    """``labels`` (a tree or a prefix of ``tree``, or a function of ``tree``) as one entry per leaf of ``tree``."""
    if callable(labels):
        labels = labels(tree)
    try:
        return optree.broadcast_prefix(labels, tree)
    except ValueError as e:
        raise ValueError(f"The {what} must be a tree (or a prefix of the tree) of the params' structure: {e}") from None


def _part(u: _Flat, p: list[Tensor] | None, mask: list[bool], spec: Spec) -> tuple[list[int], _Flat, Any, Spec]:
    """The selected leaf indices, their updates and params, and the spec of the tree whose other leaves are None."""
    idx = [i for i, m in enumerate(mask) if m]
    sub = optree.tree_structure(spec.unflatten([0 if m else None for m in mask]))
    return idx, _Flat([u.tensors[i] for i in idx], u.owned), None if p is None else [p[i] for i in idx], sub


def _subtree(tree: Tree, mask: list[bool]) -> Tree:
    leaves, spec = optree.tree_flatten(tree)
    return spec.unflatten([t if m else None for t, m in zip(leaves, mask, strict=True)])


def masked(inner: GradientTransformation, mask: MaskOrFn) -> GradientTransformation:
    """Apply ``inner`` to the leaves where ``mask`` is True; the others pass through unchanged (optax's ``masked``).

    To leave part of a tree untrained, give those leaves zero updates: :func:`freeze`, or
    :func:`multi_transform` with :func:`set_to_zero`.

    Args:
        inner: the transformation for the selected leaves.
        mask: a tree of bools with the params' structure, or a prefix of it (``{module_path: bool}`` selects
            whole modules), or a function ``params -> mask``.
    """

    def flat_mask(tree: Tree, spec: Spec) -> list[bool]:
        flat = _broadcast(mask, tree, "mask")
        for i, m in enumerate(flat):
            if not isinstance(m, bool):
                raise TypeError(f"Mask entries must be bools, got {m!r} for {_path(spec, i)!r}.")
        return flat

    def init(params: Tree) -> MaskedState:
        return MaskedState(inner.init(_subtree(params, flat_mask(params, optree.tree_structure(params)))))

    def leaves(u: _Flat, state: MaskedState, p: list[Tensor] | None, spec: Spec) -> tuple[_Flat, Any]:
        u = u.materialize()
        idx, sub_u, sub_p, sub = _part(u, p, flat_mask(spec.unflatten(u.tensors if p is None else p), spec), spec)
        out, inner_state = _run(inner, sub_u, state.inner_state, sub_p, sub)
        out = out.materialize()
        tensors = list(u.tensors)
        for i, t in zip(idx, out.tensors, strict=True):
            tensors[i] = t
        return _Flat(tensors, out.owned and len(idx) == len(tensors)), MaskedState(inner_state)

    return GradientTransformation(init, _LeafUpdate(leaves))


def freeze(mask: MaskOrFn) -> GradientTransformation:
    """Zero the updates where ``mask`` is True (optax's ``freeze``): those leaves stay exactly as they are.

    Put it last in a chain (``chain(adamw(...), freeze(mask))``), or use :func:`multi_transform` to also skip the
    optimizer state of frozen leaves. ``mask`` as in :func:`masked`.
    """
    from funcpeft.optim.transform import set_to_zero  # at module level: circular (transform re-exports us)

    return masked(set_to_zero(), mask)


def multi_transform(transforms: Mapping[Hashable, GradientTransformation], labels: MaskOrFn) -> GradientTransformation:
    """Apply a different transformation to each labelled part of the tree (optax's ``multi_transform``).

    Example: ``multi_transform({"lora": adamw(1e-3), "head": adamw(1e-4), "frozen": set_to_zero()}, labels)``.

    Args:
        transforms: ``{label: transformation}``.
        labels: a tree of labels with the params' structure, a prefix of it (``{module_path: label}``), or a
            function ``params -> labels``. Every label must be a key of ``transforms``.
    """
    transforms = dict(transforms)

    def flat_labels(tree: Tree, spec: Spec) -> list[Any]:
        flat = _broadcast(labels, tree, "labels")
        for i, label in enumerate(flat):
            if label not in transforms:
                raise ValueError(
                    f"Leaf {_path(spec, i)!r} has the label {label!r}, which is not one of the transformations' "
                    f"labels {list(transforms)}."
                )
        return flat

    def init(params: Tree) -> MultiTransformState:
        flat = flat_labels(params, optree.tree_structure(params))
        return MultiTransformState({k: t.init(_subtree(params, [x == k for x in flat])) for k, t in transforms.items()})

    def leaves(u: _Flat, state: MultiTransformState, p: list[Tensor] | None, spec: Spec) -> tuple[_Flat, Any]:
        flat = flat_labels(spec.unflatten(u.tensors if p is None else p), spec)
        u = u.materialize()
        tensors, states, owned = list(u.tensors), {}, True
        for k, t in transforms.items():
            idx, sub_u, sub_p, sub = _part(u, p, [x == k for x in flat], spec)
            out, states[k] = _run(t, sub_u, state.inner_states[k], sub_p, sub)
            out = out.materialize()
            owned &= out.owned
            for i, x in zip(idx, out.tensors, strict=True):
                tensors[i] = x
        return _Flat(tensors, owned), MultiTransformState(states)

    return GradientTransformation(init, _LeafUpdate(leaves))


def multi_steps(opt: GradientTransformation, every_k: int) -> GradientTransformation:
    """Gradient accumulation as a transformation (optax's ``MultiSteps``).

    Each ``update`` adds the gradients to an accumulator. Every ``every_k``-th call runs ``opt`` on their mean
    and returns its updates; the calls in between return zero updates and leave ``opt``'s state alone. So
    ``every_k`` micro-batches are one step of ``opt`` on the mean gradient, the step a ``every_k`` times larger
    batch would take (with ``torch.optim``: ``(loss / every_k).backward()`` on each micro-batch, then ``step()``).
    ``opt``'s step count, and so its schedule and bias corrections, advance once per inner step.

    The sum is kept in the gradients' dtype (float32 for float16/bfloat16 leaves, which a sum of many micro-batches
    could overflow or round away) and divided by ``every_k`` once, so ``every_k`` micro-steps equal ``opt`` on
    ``sum(grads) / every_k`` exactly. Elementwise: stacked trees accumulate every adapter independently.

    Args:
        opt: the inner optimizer, any transformation (e.g. ``chain(clip_by_global_norm(1.0), adamw(1e-3))``:
            clipping then applies to the mean gradient, as ``clip_grad_norm_`` before ``step()`` would).
        every_k: micro-steps per inner step (1: ``opt`` itself).

    Returns:
        The transformation; its state is a :class:`MultiStepsState` and its ``update`` needs ``params`` when
        ``opt``'s does (they are only read on the inner step).

    Raises:
        TypeError: ``opt`` is not a transformation, or ``every_k`` not an integer.
        ValueError: ``every_k < 1``.
    """
    if not (isinstance(opt, tuple) and len(opt) == 2 and callable(opt[0]) and callable(opt[1])):
        raise TypeError(f"multi_steps: `opt` must be a GradientTransformation (init, update), got {opt!r}.")
    if isinstance(every_k, bool) or not isinstance(every_k, numbers.Integral):
        what = f"{every_k!r} ({type(every_k).__name__})"
        raise TypeError(f"`every_k` must be an integer number of micro-steps per optimizer step, got {what}.")
    if every_k < 1:
        raise ValueError(f"`every_k` must be >= 1 (gradients accumulated per optimizer step), got {every_k!r}.")
    every_k = int(every_k)

    def init(params: Tree) -> MultiStepsState:
        acc = optree.tree_map(lambda t: torch.zeros_like(t, dtype=_acc_dtype(t.dtype), requires_grad=False), params)
        return MultiStepsState(_count0(), _count0(), opt.init(params), acc)

    def leaves(u: _Flat, state: MultiStepsState, p: list[Tensor] | None, spec: Spec) -> tuple[_Flat, Any]:
        if not isinstance(state, MultiStepsState):
            raise ValueError(f"multi_steps got the state {type(state).__name__}; pass the state its `init` made.")
        g = u.materialize().tensors
        acc = _state_leaves(state.acc_grads, spec, "acc_grads", _shapes(g))
        same = all(a.dtype == x.dtype for a, x in zip(acc, g, strict=True))
        if same and g:  # new tensors, never in place: the old state stays valid
            total = list(torch._foreach_add(acc, g))
        else:
            total = [a + x.to(a.dtype) for a, x in zip(acc, g, strict=True)]
        if int(state.mini_step) + 1 < every_k:
            zeros = _Flat([torch.zeros_like(x) for x in g], True)
            return zeros, state._replace(mini_step=state.mini_step + 1, acc_grads=spec.unflatten(total))
        if same and g:
            torch._foreach_div_(total, float(every_k))  # `total` is this call's own: no state holds it
            mean = total
        else:
            mean = [(a / every_k).to(x.dtype) for a, x in zip(total, g, strict=True)]
        out, inner = _run(opt, _Flat(mean, True), state.inner_opt_state, p, spec)
        fresh = spec.unflatten([torch.zeros_like(a) for a in acc])
        return out, MultiStepsState(_count0(), state.gradient_step + 1, inner, fresh)

    return GradientTransformation(init, _LeafUpdate(leaves))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
