"""``funcpeft.grad_and_value`` / ``funcpeft.grad``: ``torch.func``'s signatures, computed by plain autograd.

``torch.func.grad_and_value(loss_fn)(params, batch)`` is the JAX way to train, but in PyTorch it runs every op
through functorch's interpreter (measured 1.2-1.5x plain autograd on small models), and it cannot transform
activation checkpointing or ``torch.autograd.Function``s without ``setup_context`` (bitsandbytes' kernels).
These functions keep the functional signature and results and compute them with one ``torch.autograd.grad``
call on the leaves of the selected arguments (``torch.utils._pytree`` trees, as ``torch.func`` flattens them):

- ``grad_and_value(loss_fn, argnums=0, has_aux=False)(*args, **kwargs)`` returns ``(grads, value)``, or
  ``(grads, (value, aux))`` with ``has_aux``; ``grads`` has the structure of ``args[argnums]`` (a tuple of such
  for a tuple ``argnums``); a leaf the loss does not reach gets zeros (as ``torch.func``), never ``None``.
- Nothing of the caller's is changed: a leaf tensor that requires grad is differentiated in place of a copy
  (``torch.autograd.grad`` neither accumulates into ``.grad`` nor sets flags), any other leaf through a fresh
  detached leaf sharing its storage (also a tracked non-leaf, such as a view of another leaf: each gets its own
  gradient, as in ``torch.func``). Tensors made under ``torch.inference_mode()`` (leaves and the other arguments)
  are used through normal copies, which autograd can save. The gradients are fresh tensors (never one another,
  an input, or a stride-0 expansion), and the value and ``aux`` come back detached: no graph outlives the call.
- Grad mode is enabled inside, so it runs under ``torch.no_grad()`` and ``torch.inference_mode()`` as
  ``torch.func.grad`` does.
- Nested calls (``grad(grad(f))``, or ``grad_and_value`` inside a loss given to ``grad_and_value``) give
  ``torch.func``'s higher-order results: an inner call builds its gradients with ``create_graph=True`` and
  leaves its value and ``aux`` attached, so the outer call differentiates through them. Only an outer
  ``funcpeft`` call makes an inner one differentiable: unlike ``torch.func``'s, top-level gradients carry no
  graph back to inputs that require grad (a gradient penalty for ``loss.backward()`` needs ``torch.func.grad``).
- Inside a ``torch.func`` transform (``vmap`` of ``grad`` for per-example or per-adapter gradients, ``jvp`` of
  ``grad``) and while ``torch.compile`` traces (dynamo cannot trace ``torch.autograd.grad``, it traces
  ``torch.func``), the call is ``torch.func.grad_and_value`` itself, so ``torch.compile(step, fullgraph=True)``
  works. A compiled ``loss_fn`` in an eager call runs its compiled forward and backward graphs.

Errors are torch.func's, with the fix: each is also a ``RuntimeError`` where ``torch.func`` raises one.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import operator
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["grad", "grad_and_value"]

_tracked = operator.attrgetter("requires_grad")
_is_leaf = operator.attrgetter("is_leaf")
_sparse = operator.attrgetter("is_sparse")
_PREFIX = "funcpeft.grad_and_value(f)(*args): "
# torch's message for reentrant checkpointing under torch.autograd.grad, by version
_REENTRANT = ("Checkpointing is not compatible with .grad()", "torch.utils.checkpoint is incompatible with .grad()")
_REENTRANT_FIX = (
    "the loss runs reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True), which cannot "
    "run under torch.autograd.grad. Use use_reentrant=False (transformers: model.gradient_checkpointing_enable("
    "gradient_checkpointing_kwargs={'use_reentrant': False}), its default), or loss.backward()."
)


class _GradTypeError(TypeError, RuntimeError):
    """A ``TypeError`` that is also the ``RuntimeError`` ``torch.func`` raises for the same mistake."""


class _GradValueError(ValueError, RuntimeError):
    """A ``ValueError`` that is also the ``RuntimeError`` ``torch.func`` raises for the same mistake."""


class _Depth(threading.local):
    def __init__(self) -> None:
        self.value = 0  # how many funcpeft gradient calls enclose the running loss, in this thread


_depth = _Depth()


def grad_and_value(
    func: Callable[..., Any], argnums: int | tuple[int, ...] = 0, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """``torch.func.grad_and_value``'s signature and results, by ``torch.autograd.grad`` (see the module docstring).

    Args:
        func: the loss function; it returns a scalar (0-dim) tensor, or ``(loss, aux)`` with ``has_aux``.
        argnums: the positional argument (or a tuple of them) to differentiate with respect to.
        has_aux: whether ``func`` returns ``(loss, aux)``; ``aux`` is returned beside the value.

    Returns:
        A function of ``func``'s arguments returning ``(grads, value)`` or ``(grads, (value, aux))``.

    Raises:
        TypeError: ``argnums`` is not an int or a non-empty tuple of ints, ``has_aux`` is not a bool; when
            called: the loss is not a 0-dim tensor, with ``has_aux`` the output is not a ``(loss, aux)`` tuple, or
            a differentiated leaf is an integer tensor.
        ValueError: when called, ``argnums`` is out of range or names one argument twice, a differentiated leaf
            is not a tensor, or reentrant activation checkpointing meets ``torch.autograd.grad``.
    """
    _check_argnums(argnums)
    if not isinstance(has_aux, bool):
        raise TypeError(f"`has_aux` must be a bool, got {has_aux!r}.")

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        nums = _positions(argnums, len(args))
        if torch.compiler.is_compiling():
            return _compiled(func, argnums, has_aux, nums, args, kwargs)
        if torch._C._functorch.peek_interpreter_stack() is not None:  # inside vmap, jvp, torch.func.grad
            return torch.func.grad_and_value(func, argnums, has_aux)(*args, **kwargs)
        nested = _depth.value > 0
        # enable_grad alone does not lift inference mode: the loss would run untracked and the gradients be zeros
        inference = torch.is_inference_mode_enabled()
        mode = torch.inference_mode(False) if inference else contextlib.nullcontext()
        with mode, torch.enable_grad():
            args, flat, trees = list(args), [], []
            for n in nums:
                leaves, spec = _flatten(args[n])
                flat.extend(leaves)
                trees.append((n, spec, len(leaves)))
            if inference or _any_inference(flat):
                # tensors made under inference_mode cannot be saved for backward; normal copies can (torch.func
                # runs these calls too)
                args = [a if i in nums else pytree.tree_map(_uninfer, a) for i, a in enumerate(args)]
                kwargs = pytree.tree_map(_uninfer, kwargs)
            inputs = _inputs(flat, args, trees, nested)
            start = 0
            for n, spec, count in trees if inputs is not flat else ():
                mine = inputs[start : start + count]
                if any(m is not t for m, t in zip(mine, flat[start : start + count], strict=True)):
                    args[n] = spec(mine)
                start += count
            _depth.value += 1
            try:
                value, aux = _split(func(*args, **kwargs), has_aux)
            finally:
                _depth.value -= 1
            grads = _gradients(value, inputs, nested)
        out, start = [], 0
        for _, spec, count in trees:
            out.append(spec(grads[start : start + count]))
            start += count
        result = out[0] if isinstance(argnums, int) else tuple(out)
        if not nested:
            value, aux = value.detach(), pytree.tree_map(_detach, aux) if has_aux else None
        return (result, (value, aux)) if has_aux else (result, value)

    return wrapper


def grad(func: Callable[..., Any], argnums: int | tuple[int, ...] = 0, has_aux: bool = False) -> Callable[..., Any]:
    """``torch.func.grad``'s signature and results by autograd: the gradients (and ``aux`` with ``has_aux``)."""
    inner = grad_and_value(func, argnums, has_aux)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        grads, value = inner(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapper


def _gradients(value: Tensor, inputs: list[Tensor], nested: bool) -> list[Tensor]:
    """``d value / d inputs``, zeros where the value does not depend on an input; fresh tensors."""
    if not value.requires_grad or not inputs:  # a constant loss: torch.func's gradients are zeros
        return [torch.zeros_like(t) for t in inputs]
    try:
        grads = torch.autograd.grad(value, inputs, allow_unused=True, create_graph=nested)
    except RuntimeError as err:
        if not any(m in str(err) for m in _REENTRANT):
            raise
        raise _GradValueError(f"{_PREFIX}{_REENTRANT_FIX}") from err
    reached = all(map(isinstance, grads, itertools.repeat(Tensor)))
    if any(map(_sparse, grads)) if reached else any(g is not None and g.is_sparse for g in grads):
        # sparse_grad=True's gradients: fresh tensors with no storage to compare
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]
    # The common case, checked by C loops (map) since it runs every step: every input reached, every gradient laid
    # out as its input and in a buffer of its own.
    ptrs = set(map(Tensor.data_ptr, grads)) if reached else ()
    if not ptrs and _reentrant_in(value):
        # torch.autograd.grad skips reentrant checkpointing's node when the inputs are reached only through its
        # recomputation (adapter params read inside a checkpointed layer): their gradients would be zeros.
        raise _GradValueError(f"{_PREFIX}{_REENTRANT_FIX}")
    if (
        len(ptrs) == len(grads)
        and list(map(Tensor.stride, grads)) == list(map(Tensor.stride, inputs))
        and ptrs.isdisjoint(map(Tensor.data_ptr, inputs))
    ):
        return list(grads)
    # Else zeros for inputs the loss does not reach (torch.func's), and a copy where autograd hands one buffer to
    # several inputs (the gradient of a sum), an expanded (stride-0) tensor, or one it also holds elsewhere, so
    # in-place optimizer updates stay per leaf.
    fresh, taken = [], {t.data_ptr() for t in inputs if t.numel()}
    for g, t in zip(grads, inputs, strict=True):
        if g is None:
            g = torch.zeros_like(t)
        elif g.numel():
            ptr = g.data_ptr()
            if ptr in taken or g.stride() != t.stride():
                g = torch.empty_like(t).copy_(g)
            taken.add(g.data_ptr())
        fresh.append(g)
    return fresh


def _reentrant_in(value: Tensor) -> bool:
    """Whether ``value``'s graph holds a reentrant checkpoint (``torch.utils.checkpoint.CheckpointFunction``)."""
    seen, todo = set(), [value.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


def _inputs(flat: list[Any], args: list[Any], trees: list[tuple[int, Any, int]], nested: bool) -> list[Tensor]:
    """What the loss gets for each leaf: the leaf itself when autograd already tracks it, else a fresh leaf
    sharing its storage; a tensor met twice gets an alias per occurrence (its own gradient each, as torch.func)."""
    if (
        all(map(isinstance, flat, itertools.repeat(Tensor)))
        and all(map(_tracked, flat))
        and all(map(Tensor.is_floating_point, flat))
        and all(map(_is_leaf, flat))
        and len(set(map(id, flat))) == len(flat)
    ):
        return flat  # the common case (adapt's params), in C loops: every leaf is used as it is
    inputs: list[Tensor] = []
    first: dict[int, int] = {}
    for i, t in enumerate(flat):
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
            _refuse(t, i, args, trees)
        if t.is_inference():  # made under inference_mode: it cannot join a graph, only a copy can
            inputs.append(t.clone().requires_grad_(True))
        elif not t.requires_grad or (not nested and not t.is_leaf):
            # a fresh leaf: a tracked non-leaf (a view of, or computed from, another input) differentiated in
            # place would pass the gradients of its uses on to the input it comes from; torch.func keeps each
            # input's gradient its own (a nested call keeps the graph, which the outer call differentiates)
            inputs.append(t.detach().requires_grad_(True))
        elif id(t) in first:
            j = first[id(t)]
            if inputs[j] is t:
                inputs[j] = t.view_as(t)
            inputs.append(t.view_as(t))
        else:
            first[id(t)] = i
            inputs.append(t)
    return inputs


def _refuse(t: Any, i: int, args: list[Any], trees: list[tuple[int, Any, int]]) -> None:
    ends = list(itertools.accumulate(count for _, _, count in trees))
    n = trees[bisect.bisect_right(ends, i)][0]
    where = _where(args[n], t)
    if not isinstance(t, Tensor):
        raise _GradValueError(
            f"{_PREFIX}argument {n} holds a {type(t).__name__} at {where}; every leaf of a differentiated argument "
            "must be a tensor (torch.func: 'Thing passed to transform API must be Tensor'). Pass it as another "
            "argument, outside `argnums`, or close over it."
        )
    raise _GradTypeError(
        f"{_PREFIX}argument {n} holds a {t.dtype} tensor at {where}; only floating-point or complex tensors can be "
        "differentiated (torch.func: 'only Tensors of floating point dtype can require gradients'). Pass it as "
        "another argument, outside `argnums`."
    )


def _flatten(tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """``tree``'s leaves and how to rebuild it, ``torch.utils._pytree``'s order; adapter params (a dict of dicts
    of tensors) by a fast path with the same result."""
    if type(tree) is dict and all(type(e) is dict for e in tree.values()):
        leaves = [t for e in tree.values() for t in e.values()]

        def rebuild(new: list[Any]) -> Any:
            it = iter(new)
            return {k: {name: next(it) for name in e} for k, e in tree.items()}

        return leaves, rebuild
    leaves, spec = pytree.tree_flatten(tree)
    return leaves, functools.partial(pytree.tree_unflatten, treespec=spec)


def _where(tree: Any, leaf: Any) -> str:
    for path, t in pytree.tree_flatten_with_path(tree)[0]:
        if t is leaf:
            return f"path {pytree.keystr(path) or '(the argument itself)'}"
    return "one of its leaves"


def _split(out: Any, has_aux: bool) -> tuple[Tensor, Any]:
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            what = f"a tuple of {len(out)}" if isinstance(out, tuple) else f"a {type(out).__name__}"
            raise _GradTypeError(
                f"{_PREFIX}output of function f should be a tuple: (output, aux) if has_aux is True, got {what}."
            )
        value, aux = out
    else:
        value, aux = out, None
    if not isinstance(value, Tensor):
        raise _GradTypeError(f"{_PREFIX}Expected f(*args) to return a Tensor, got {type(value).__name__}.")
    if value.dim() != 0:
        raise _GradTypeError(
            f"{_PREFIX}Expected f(*args) to return a scalar Tensor, got tensor with {value.dim()} dims (shape "
            f"{tuple(value.shape)}). Reduce it (e.g. .mean() or .sum()), or use torch.func.vjp / jacrev for a "
            "non-scalar output."
        )
    return value, aux


def _any_inference(flat: list[Any]) -> bool:
    if all(map(isinstance, flat, itertools.repeat(Tensor))):
        return any(map(Tensor.is_inference, flat))  # the common case, in C loops
    return any(isinstance(t, Tensor) and t.is_inference() for t in flat)


def _uninfer(t: Any) -> Any:
    return t.clone() if isinstance(t, Tensor) and t.is_inference() else t


def _detach(t: Any) -> Any:
    return t.detach() if isinstance(t, Tensor) else t


def _compiled(
    func: Callable[..., Any], argnums: Any, has_aux: bool, nums: tuple[int, ...], args: tuple[Any, ...], kwargs: Any
) -> tuple[Any, Any]:
    """Under ``torch.compile``: ``torch.func.grad_and_value``, which dynamo traces into the graph. At the top level
    torch.func would also differentiate back into inputs that require grad; funcpeft's results carry no graph."""
    if _depth.value == 0:
        args = tuple(pytree.tree_map(_detach, a) if i in nums else a for i, a in enumerate(args))
    _depth.value += 1  # a nested call keeps its inputs: the outer torch.func level differentiates through it
    try:
        return torch.func.grad_and_value(func, argnums, has_aux)(*args, **kwargs)
    finally:
        _depth.value -= 1


def _check_argnums(argnums: Any) -> None:
    ok = isinstance(argnums, int) and not isinstance(argnums, bool)
    ok = ok or (
        isinstance(argnums, tuple)
        and len(argnums) > 0
        and all(isinstance(n, int) and not isinstance(n, bool) for n in argnums)
    )
    if not ok:
        raise TypeError(f"`argnums` must be an int or a non-empty tuple of ints, got {argnums!r}.")


def _positions(argnums: int | tuple[int, ...], count: int) -> tuple[int, ...]:
    """``argnums`` as non-negative positions of the call's ``count`` positional arguments."""
    nums = (argnums,) if isinstance(argnums, int) else argnums
    for n in nums:
        if not -count <= n < count:
            raise _GradValueError(
                f"{_PREFIX}`argnums` {n} is out of range for {count} positional arguments (torch.func: "
                f"'Got argnum={n}, but only {count} positional inputs')."
            )
    positions = tuple(n % count for n in nums)
    if len(set(positions)) != len(positions):
        raise _GradValueError(
            f"{_PREFIX}`argnums` {argnums!r} names one argument twice (positions {positions}); list each once."
        )
    return positions
