"""The machinery shared by :mod:`funcpeft.optim.transform` and :mod:`funcpeft.optim.combine` (private).

It holds the state NamedTuples of both modules (re-exported by :mod:`funcpeft.optim.transform` and
:mod:`funcpeft.optim`), the leaf representation of updates inside a chain, and the checks and ``torch._foreach_*``
helpers the transformations share.

Speed: each step is a handful of ``torch._foreach_*`` calls over the leaves, under ``torch.no_grad()``. Inside a
:func:`~funcpeft.optim.combine.chain` the trees are flattened once and the updates travel as :class:`_Flat`
leaves: a link whose input is a fresh intermediate of the previous link updates it in place instead of
allocating, and constant factors (learning rate, Adam's bias corrections) are carried as one pending scalar and
applied in a single pass. The caller's gradients, parameters and states are never written to.

:class:`_LeafUpdate` is every funcpeft transformation's ``update``: it runs eagerly under ``torch.compile``
(``torch.compiler.disable``; see :mod:`funcpeft.optim.transform` for why).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

Tree = Any
Spec = optree.PyTreeSpec
MaskOrFn = Any  # a tree (or prefix) of bools/labels, or a function params -> such a tree


class GradientTransformation(NamedTuple):
    """``(init, update)``: ``state = init(params)``; ``updates, state = update(updates, state, params=None)``."""

    init: Callable[[Tree], Any]
    update: Callable[..., tuple[Tree, Any]]


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


class ScaleByScheduleState(NamedTuple):
    """``count``: updates done so far (0-dim int64 tensor); the next one uses ``schedule(count)``."""

    count: Tensor


class ScaleByAdamState(NamedTuple):
    """``count``: updates done; ``mu``/``nu``: first and second moment trees (torch's ``exp_avg``/``exp_avg_sq``)."""

    count: Tensor
    mu: Tree
    nu: Tree


class TraceState(NamedTuple):
    """``trace``: the momentum tree (torch SGD's ``momentum_buffer``)."""

    trace: Tree


class MaskedState(NamedTuple):
    """The inner state, on the params tree with the masked-out leaves replaced by ``None``."""

    inner_state: Any


class MultiTransformState(NamedTuple):
    """``{label: inner state}``, each on the params tree with the other labels' leaves replaced by ``None``."""

    inner_states: dict[Hashable, Any]


class MultiStepsState(NamedTuple):
    """The state of :func:`multi_steps` (optax's ``MultiStepsState``, without ``skip_state``).

    ``mini_step``: micro-steps accumulated since the last inner update (0-dim int64; 0 right after one, so
    ``mini_step == 0`` after an ``update`` says that it applied the inner optimizer); ``gradient_step``: inner
    updates done; ``inner_opt_state``: the inner optimizer's state; ``acc_grads``: the sum of the accumulated
    gradients (float32 for half-precision leaves).
    """

    mini_step: Tensor
    gradient_step: Tensor
    inner_opt_state: Any
    acc_grads: Tree


class _Flat(NamedTuple):
    """Update leaves inside a chain; the updates they stand for are ``scale * tensors``.

    ``owned``: the tensors are fresh intermediates that nothing else holds (not the caller's gradients, not a
    state), so the next link may overwrite them. A link returns ``owned=True`` only for tensors it allocated and
    does not keep in its state.
    """

    tensors: list[Tensor]
    owned: bool = False
    scale: float = 1.0

    def materialize(self) -> _Flat:
        if self.scale == 1.0:
            return self
        return _Flat(_mul(self.tensors, self.scale, self.owned), True)


# (updates, state, params, spec) -> (updates, state); ``spec`` is the trees' structure, to read and build states.
LeafFn = Callable[[_Flat, Any, "list[Tensor] | None", Spec], tuple[_Flat, Any]]


class _LeafUpdate:
    """A transformation's ``update`` that can also run on already-flattened leaves (``self.leaves``).

    :func:`chain`, :func:`masked` and :func:`multi_transform` call ``leaves`` directly, so a chain flattens its
    trees once; called as a plain ``update`` it flattens the trees itself.
    """

    __slots__ = ("leaves",)

    def __init__(self, leaves: LeafFn) -> None:
        self.leaves = leaves

    @torch.compiler.disable
    def __call__(self, updates: Tree, state: Any, params: Tree | None = None) -> tuple[Tree, Any]:
        leaves, spec = optree.tree_flatten(updates)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor) and leaf.layout is not torch.strided:
                raise TypeError(
                    f"The update at {_path(spec, i)} is a {leaf.layout} tensor; funcpeft.optim transforms dense "
                    "gradients. Sparse gradients (fwd(..., sparse_grad=True)) go to an optimizer that takes them "
                    "(torch.optim.SparseAdam, torch.optim.SGD), or densify them first (g.to_dense())."
                )
        param_leaves = None if params is None else _leaves_like(params, spec, "params")
        with torch.no_grad():
            new, state = self.leaves(_Flat(leaves), state, param_leaves, spec)
            return spec.unflatten(new.materialize().tensors), state


def _leaves_like(
    tree: Tree, spec: Spec, name: str, shapes: list[torch.Size] | None = None, other: str = "the update"
) -> list[Tensor]:
    """The leaves of ``tree`` in ``spec``'s order; with ``shapes`` (those of the ``other`` leaves), each must have its
    counterpart's shape: the foreach ops would broadcast a mismatch silently."""
    try:
        leaves = spec.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`{name}` must have the structure of the updates (the same module paths and tensor names): {e}"
        ) from None
    i = None if shapes is None else _mismatch(leaves, shapes)
    if i is not None:
        t = leaves[i]
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(
            f"`{name}` at {_path(spec, i)!r} has shape {got}, but {other} there has shape {tuple(shapes[i])}; "
            "both must have the same shapes (was the optimizer state made by `init` on these params?)."
        )
    return leaves


def _state_leaves(tree: Tree, spec: Spec, name: str, shapes: list[torch.Size] | None = None) -> list[Tensor]:
    """The leaves of the state tree ``tree`` in ``spec``'s order; with ``shapes`` (the updates' leaf shapes), each
    must have its update's shape. The foreach ops broadcast, so a state made for another tree of the same structure
    (a stacked tree's state for an unstacked one) would otherwise silently give updates, and params, of its shape.
    """
    try:
        leaves = spec.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"The optimizer state's `{name}` does not have the structure of the updates; was the state made by "
            f"`init` on these params? {e}"
        ) from None
    i = None if shapes is None else _mismatch(leaves, shapes)
    if i is not None:
        got = tuple(leaves[i].shape) if isinstance(leaves[i], Tensor) else type(leaves[i]).__name__
        raise ValueError(
            f"The optimizer state's `{name}` at {_path(spec, i)!r} has shape {got}, but the update there has shape "
            f"{tuple(shapes[i])}: {_OTHER_TREE}"
        )
    return leaves


_OTHER_TREE = (
    "the state was made by `init` on another tree (a stacked tree's state for an unstacked one, another adapter's, "
    "or params since cast or reshaped). Make a state with `opt.init(params)` for each tree you train."
)


def _shapes(tensors: list[Tensor]) -> list[torch.Size]:
    return [t.shape for t in tensors]


def _mismatch(leaves: list[Any], shapes: list[torch.Size]) -> int | None:
    """The first index where ``leaves`` does not have ``shapes`` (one list comparison on the happy path)."""
    try:
        if _shapes(leaves) == shapes:
            return None
    except AttributeError:  # a leaf that is not a tensor
        pass
    return next(i for i, (t, s) in enumerate(zip(leaves, shapes, strict=True)) if getattr(t, "shape", None) != s)


def _check_dtypes(state: list[Tensor], updates: list[Tensor], spec: Spec, name: str) -> None:
    """Raise the clear error for a state leaf whose dtype is not its update's (called when a foreach op failed)."""
    for i, (s, u) in enumerate(zip(state, updates, strict=True)):
        if s.dtype != u.dtype:
            raise ValueError(
                f"The optimizer state's `{name}` at {_path(spec, i)!r} is {s.dtype}, but the update there is "
                f"{u.dtype}: {_OTHER_TREE}"
            ) from None


def _run(t: GradientTransformation, u: _Flat, state: Any, params: list[Tensor] | None, spec: Spec) -> tuple[_Flat, Any]:
    """Run any transformation on leaves: directly for funcpeft's own, through trees for a user's."""
    if isinstance(t.update, _LeafUpdate):
        return t.update.leaves(u, state, params, spec)
    tree = spec.unflatten(u.materialize().tensors)
    tree, state = t.update(tree, state, None if params is None else spec.unflatten(params))
    shapes = _shapes(u.tensors)
    return _Flat(_leaves_like(tree, spec, "updates returned by a transformation", shapes, "its input")), state


def _path(spec: Spec, i: int) -> str:
    return ".".join(map(str, spec.paths()[i]))


def _check_number(name: str, value: Any, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} ({value!r}).")
    if not value >= low or (high is not None and not value < high):
        bounds = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be {bounds}, got {value!r}.")
    return float(value)


def _count0() -> Tensor:
    return torch.zeros((), dtype=torch.int64)


def _zeros(params: Tree) -> Tree:
    return optree.tree_map(lambda t: torch.zeros_like(t, requires_grad=False), params)


def _scalar(value: float, tensors: list[Tensor]) -> float | Tensor:
    """``value`` as the fastest scalar argument for foreach ops on ``tensors``.

    On CPU, torch's foreach ops loop over the leaves and wrap a Python scalar into a new tensor for each one; a
    0-dim tensor of the leaves' dtype skips that (2.5x faster ``mul_`` on 200 leaves of 5000; a float64 scalar on
    float32 leaves is slower again). Half-precision leaves get a float32 scalar, which their kernels read in
    float32 as they would a Python scalar. CUDA's fused kernels take the Python scalar directly.
    """
    if not tensors or tensors[0].device.type != "cpu":
        return value
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        return value  # one 0-dim dtype would round the scalar for some leaves
    return torch.tensor(value, dtype=dtype if dtype in (torch.float32, torch.float64) else torch.float32)


def _mul(tensors: list[Tensor], factor: float, owned: bool) -> list[Tensor]:
    """``tensors * factor``, in place when ``owned``."""
    if not tensors:  # foreach ops refuse empty lists
        return tensors
    scalar = _scalar(factor, tensors)
    if owned:
        torch._foreach_mul_(tensors, scalar)
        return tensors
    return list(torch._foreach_mul(tensors, scalar))


def _add_scalar_(tensors: list[Tensor], value: float) -> None:
    """``tensors += value`` in place. On CPU a list of 0-dim tensors takes torch's cheapest path (the Scalar and
    Tensor overloads wrap or re-dispatch per leaf: 2.5x slower on 200 leaves)."""
    scalar = _scalar(value, tensors)
    torch._foreach_add_(tensors, [scalar] * len(tensors) if isinstance(scalar, Tensor) else scalar)


def _stateless(leaves: LeafFn) -> GradientTransformation:
    return GradientTransformation(lambda params: EmptyState(), _LeafUpdate(leaves))
