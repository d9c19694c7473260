"""Gradient transformations: the building blocks of :mod:`funcpeft.optim` (optax's ``transform.py``).

A transformation is a pair of pure functions ``(init, update)``: ``state = init(params)`` and
``updates, state = update(updates, state, params)``. Neither mutates its arguments: every call returns new
tensors and a new state (a NamedTuple pytree), so an old state stays valid (for checkpoints, rollbacks or
comparing runs). Trees are any optree pytree of tensors; in funcpeft they are ``{module_path: {name: Tensor}}``,
possibly stacked with a leading adapter dim K. Every op is elementwise, except :func:`clip_by_global_norm`, whose
``stacked=True`` computes one norm per adapter, so the K adapters of a stacked tree are updated independently.

Speed: each step is a handful of ``torch._foreach_*`` calls over the leaves, under ``torch.no_grad()``. Inside a
:func:`chain` the trees are flattened once and the updates travel as :class:`_Flat` leaves: a link whose input is
a fresh intermediate of the previous link updates it in place instead of allocating, and constant factors
(learning rate, Adam's bias corrections) are carried as one pending scalar and applied in a single pass. The
caller's gradients, parameters and states are never written to.

Under ``torch.compile`` an ``update`` and :func:`apply_updates` run eagerly (``torch.compiler.disable``): a compiled
training step compiles the loss and its gradients, the expensive part, and the optimizer stays the few foreach
ops above. Tracing them would gain little and cost a recompile per step (the step count sets the bias
corrections and schedule), and ``apply_updates`` must return leaves that require grad, which a compiled graph
cannot output anyway.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from funcpeft.methods.lora_init import INITIAL
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


def _leaves_like(tree: Tree, spec: Spec, name: str) -> list[Tensor]:
    try:
        return spec.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`{name}` must have the structure of the updates (the same module paths and tensor names): {e}"
        ) from None


def _state_leaves(tree: Tree, spec: Spec, name: str) -> list[Tensor]:
    try:
        return spec.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"The optimizer state's `{name}` does not have the structure of the updates; was the state made by "
            f"`init` on these params? {e}"
        ) from None


def _run(t: GradientTransformation, u: _Flat, state: Any, params: list[Tensor] | None, spec: Spec) -> tuple[_Flat, Any]:
    """Run any transformation on leaves: directly for funcpeft's own, through trees for a user's."""
    if isinstance(t.update, _LeafUpdate):
        return t.update.leaves(u, state, params, spec)
    tree = spec.unflatten(u.materialize().tensors)
    tree, state = t.update(tree, state, None if params is None else spec.unflatten(params))
    return _Flat(_leaves_like(tree, spec, "updates returned by a transformation")), state


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
        old = _state_leaves(state.trace, spec, "trace")
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
        mu = list(torch._foreach_lerp(_state_leaves(state.mu, spec, "mu"), g, 1.0 - b1))
        nu = _mul(_state_leaves(state.nu, spec, "nu"), b2, False)
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
    norms = torch.stack([torch.linalg.vector_norm(t.reshape(k, -1), 2.0, dim=1) for t in g])  # (leaves, K)
    coef = torch.clamp(max_norm / (torch.linalg.vector_norm(norms, 2.0, dim=0) + 1e-6), max=1.0)
    views: dict[int, Tensor] = {}
    return [views.setdefault(t.dim(), coef.view(k, *(1,) * (t.dim() - 1))) for t in g]


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
        acc = _state_leaves(state.acc_grads, spec, "acc_grads")
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


@torch.compiler.disable
def apply_updates(params: Tree, updates: Tree) -> Tree:
    """``params + updates`` as new leaf tensors with ``requires_grad=True`` (the ``funcpeft.adapt`` convention).

    The addition is not recorded by autograd; ``params`` is not modified. Updates are cast to each param's dtype
    (optax's convention), so a float32 optimizer state never promotes half-precision params.
    """
    p, spec = optree.tree_flatten(params)
    u = _leaves_like(updates, spec, "updates")
    if not p:
        return spec.unflatten([])
    with torch.no_grad():
        u = [x if x.dtype == y.dtype else x.to(y.dtype) for x, y in zip(u, p, strict=True)]
        new = torch._foreach_add(p, u)
    for t in new:
        t.requires_grad_(True)
    return spec.unflatten(new)
