"""Checks of lists of params trees shared by :func:`funcpeft.stack` and :func:`funcpeft.combine`.

A params tree is exactly two levels deep, ``{module_path: {tensor_name: Tensor}}``; every check raises a
``TypeError``/``ValueError`` naming the list element, module path and tensor at fault.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Params", "as_leaf", "check_alike", "check_list", "check_tree", "check_untransformed"]

Params = dict[str, dict[str, Tensor]]


def check_list(list_of_params: Any, arg: str) -> list[Mapping[str, Mapping[str, Tensor]]]:
    """``list_of_params`` as a list of validated two-level trees (TypeError/ValueError naming the bad element)."""
    if isinstance(list_of_params, Mapping):
        raise TypeError(
            f"`{arg}` must be a list of adapter dicts, got a single dict; wrap it in a list: `[params]` (to take "
            "a stacked tree apart, use funcpeft.unstack)."
        )
    if not isinstance(list_of_params, Sequence) or isinstance(list_of_params, (str, bytes)):
        raise TypeError(f"`{arg}` must be a list of adapter dicts, got {type(list_of_params).__name__}.")
    if len(list_of_params) == 0:
        raise ValueError(f"`{arg}` is empty; it needs at least one adapter dict.")
    for i, params in enumerate(list_of_params):
        check_tree(params, f"{arg}[{i}]")
    return list(list_of_params)


def check_untransformed(what: str) -> None:
    """Refuse to build a params tree inside ``torch.func.grad`` / ``vmap`` / ``jvp``.

    ``what`` (e.g. ``"funcpeft.stack"``) returns fresh leaf tensors, detached from its inputs: inside a transform
    that would cut the gradient (or the mapped dimension) off, and torch refuses ``requires_grad_`` there anyway
    with a message that names no funcpeft call.

    Raises:
        ValueError: called inside a torch.func transform.
    """
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise ValueError(
            f"{what} cannot run inside torch.func.grad, vmap or jvp: it returns fresh leaf tensors detached from "
            "its inputs, so no gradient (or mapped dimension) would flow through it. Call it outside the transform "
            "and differentiate or vmap with respect to its result (then take a gradient tree apart with the "
            "matching unstack), or build the tree with plain torch ops inside, e.g. `{path: {name: "
            "torch.stack([p[path][name] for p in trees]) for name in e} for path, e in trees[0].items()}`."
        )


def check_tree(params: Any, where: str) -> None:
    if not isinstance(params, Mapping):
        hint = ""
        if isinstance(params, tuple) and len(params) == 2 and isinstance(params[0], Mapping):
            hint = " (funcpeft.load and funcpeft.adapt return a pair: pass its params, `params, _ = ...`)"
        raise TypeError(
            f"`{where}` must be an adapter dict {{module_path: {{tensor_name: Tensor}}}} as funcpeft.adapt returns, "
            f"got {type(params).__name__}{hint}."
        )
    for path, entry in params.items():
        if not isinstance(path, str) or not isinstance(entry, Mapping):
            raise TypeError(
                f"`{where}[{path!r}]` must map a module path (str) to a dict of tensors, got {type(entry).__name__}."
            )
        for name, leaf in entry.items():
            if not isinstance(leaf, Tensor):
                raise TypeError(f"`{where}[{path!r}][{name!r}]` must be a Tensor, got {type(leaf).__name__}.")


def check_alike(trees: list[Mapping[str, Mapping[str, Tensor]]], arg: str) -> None:
    """Every tree has the first one's modules, tensor names, shapes, dtypes and devices.

    Raises:
        ValueError: naming the first offending module path (in the first tree's order), the tensor, both values
            and the list index.
    """
    ref = trees[0]
    for i, other in enumerate(trees[1:], start=1):
        for path, entry in ref.items():
            if path not in other:
                raise ValueError(
                    f"`{arg}[{i}]` has no module {path!r}, which `{arg}[0]` has; all adapters must come from the "
                    f"same config and model. Modules only in [0]: {_some(ref.keys() - other.keys())}, only in "
                    f"[{i}]: {_some(other.keys() - ref.keys())}."
                )
            theirs = other[path]
            if theirs.keys() != entry.keys():
                raise ValueError(
                    f"Module {path!r} holds {sorted(entry)} in `{arg}[0]` but {sorted(theirs)} in `{arg}[{i}]`; all "
                    "adapters must come from the same config and model."
                )
            for name, leaf in entry.items():
                their = theirs[name]
                for what, mine, yours in (
                    ("shape", tuple(leaf.shape), tuple(their.shape)),
                    ("dtype", leaf.dtype, their.dtype),
                    ("device", leaf.device, their.device),
                ):
                    if mine != yours:
                        raise ValueError(
                            f"`{arg}[{i}][{path!r}][{name!r}]` has {what} {yours}, but `{arg}[0][{path!r}][{name!r}]` "
                            f"has {mine}; adapters must match tensor by tensor (same config, rank and model)."
                        )
        extra = [p for p in other if p not in ref]
        if extra:
            raise ValueError(
                f"`{arg}[{i}]` has module {extra[0]!r}, which `{arg}[0]` lacks; all adapters must come from the same "
                f"config and model (modules only in [{i}]: {_some(extra)})."
            )


def _some(paths: Any) -> str:
    paths = sorted(paths)
    return f"{paths[:5]}{'...' if len(paths) > 5 else ''}"


def as_leaf(t: Tensor) -> Tensor:
    """``t`` as a leaf of a params tree funcpeft hands out: floating (and complex) tensors require grad."""
    return t.requires_grad_(True) if t.is_floating_point() or t.is_complex() else t
