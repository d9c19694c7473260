"""Validation of the ``params`` tree ``fwd`` is called with: structure, shapes, dtypes and devices, on every call.

A tree that does not fit the model must never run: a missing entry silently drops that module's adapter, and a
tensor of the wrong shape fails deep inside a matmul with a message that names nothing. Checking every leaf in
Python on every call costs tens of microseconds on a large model, so :class:`Validator` remembers the *signature*
of the trees that passed (every key, in order, and each leaf's shape, dtype and device: about 0.3-0.5 us per
leaf, C-level attribute reads) and accepts a call whose signature it has seen. The signature holds everything
validity depends on, so a dict mutated after a good call (an entry deleted, a tensor
replaced by one of another shape) or a new dict at a reused address is checked in full again. Identity (``id``)
is never trusted.

Under ``torch.compile`` the full check runs in Python while Dynamo traces it: its outcome is decided at trace
time and kept by the graph's guards (a tree with another structure or shape recompiles, and fails the check).
``fwd.compile`` instead checks a tree eagerly only when a graph is compiled for it, and pins the structure in the
graph's guards (:meth:`Validator.pin`; :mod:`funcpeft._compile`).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Validator"]

_REMEMBERED = 8
_FACTS = operator.attrgetter("shape", "dtype", "device")  # all a leaf's validity depends on

Shapes = dict[str, dict[str, torch.Size]]


class Validator:
    """Checks adapter trees against the model; see the module docstring.

    Args:
        shapes: ``{module_path: {tensor_name: shape}}`` of a fresh adapter.
        modules: ``{module_path: module}``; a module's parameters say on which device its entry must live.
        optional: entries a tree may leave out (VeRA's shared projections, which ``fwd`` can regenerate).
    """

    def __init__(
        self, shapes: Shapes, modules: Mapping[str, nn.Module], optional: frozenset[str] = frozenset()
    ) -> None:
        self.shapes = shapes
        self.optional = optional
        self._modules = modules
        # signatures of recent trees that passed -> K (a few: eager and vmapped calls alternate)
        self._passed: dict[tuple[Any, ...], int] = {}

    def check(self, params: Any, stacked: bool = False) -> int:
        """Validate ``params`` (with ``stacked``: every leaf has a common leading dim K). Returns K (1 unstacked).

        Raises:
            TypeError: ``params`` is not a dict of dicts of tensors, or a leaf is not floating point.
            ValueError: an entry is missing or unknown, a tensor has the wrong shape, or lives on another device
                than its module (each message names the module path and the tensor).
        """
        if torch.compiler.is_compiling():
            return self._full(params, stacked)
        try:
            entries = params.values()
            leaves = [t for entry in entries for t in entry.values()]
            key = (stacked, tuple(params), tuple(map(tuple, entries)), tuple(map(_FACTS, leaves)))
        except (AttributeError, TypeError):  # not a dict of dicts of tensors: the full check names the culprit
            return self._full(params, stacked)
        k = self._passed.get(key)
        if k is None:
            k = self._full(params, stacked)
            if len(self._passed) >= _REMEMBERED:
                self._passed.clear()
            self._passed[key] = k
        return k

    def pin(self, params: Any) -> None:
        """Read, inside a ``fwd.compile`` trace, ``params``' keys and each leaf's shape against the expected one,
        so the guards of the graph being traced hold the tree's structure (dict keys), every leaf (dtype, device,
        shape) and, where a size is symbolic, its equality to the expected size. A call that reuses the graph then
        holds a tree equal in everything validity depends on to the one it was traced for, which
        :class:`funcpeft._compile.CompiledAdapted` checks in full whenever a graph is compiled. A tree that does
        not fit fails here, at trace time, so no graph is ever compiled for it (another thread could reuse one
        before the caller's check refuses it): an entry or tensor name missing or unknown, a shape, a dtype that is
        not floating point. The caller then runs :meth:`check` for the message. (A leaf on another device than its
        module is left to that check: it cannot run silently, it fails in the graph's first op.)"""
        shapes = self.shapes
        for path, entry in params.items():
            expected = shapes[path]  # (an unknown path raises KeyError)
            if len(entry) != len(expected):  # every name is known (below): a name is missing
                raise ValueError(f"`params[{path!r}]` holds {len(entry)} tensors, not {len(expected)}")
            for name, tensor in entry.items():
                if tensor.shape != expected[name] or not tensor.is_floating_point():
                    raise ValueError(f"`params[{path!r}][{name!r}]` has shape {tuple(tensor.shape)}")
        if len(params) != len(shapes):  # every path is known (above): one is missing, unless it is optional
            for path in shapes:
                if path not in params and path not in self.optional:
                    raise ValueError(f"`params[{path!r}]` is missing")

    def _full(self, params: Any, stacked: bool) -> int:
        if not isinstance(params, Mapping):
            raise TypeError(
                f"`params` must be the adapter dict returned by funcpeft.adapt (or None for the base model), got "
                f"{type(params).__name__}."
            )
        shapes = self.shapes
        unknown = [p for p in params if p not in shapes]
        if unknown:
            paths = list(shapes)
            raise ValueError(
                f"`params` has entries for {sorted(map(str, unknown))[:5]}, which this adapter does not adapt; its "
                f"module paths are {paths[:5]}{'...' if len(paths) > 5 else ''}. Was it made for another config or "
                "model?"
            )
        k: int | None = None
        for path, expected in shapes.items():
            entry = params.get(path)
            if entry is None and path in self.optional:
                continue
            if not isinstance(entry, Mapping) or entry.keys() != expected.keys():
                have = sorted(entry) if isinstance(entry, Mapping) else entry
                what = "is missing" if entry is None else f"must hold {sorted(expected)}, got {have}"
                raise ValueError(
                    f"`params[{path!r}]` {what}{f' (it must hold {sorted(expected)})' if entry is None else ''}. "
                    "Build params with fwd.init() or funcpeft.load() for this config, and do not drop entries."
                )
            device = _device_of(self._modules[path])
            for name, shape in expected.items():
                tensor = entry[name]
                where = f"`params[{path!r}][{name!r}]`"
                if not isinstance(tensor, Tensor):
                    raise TypeError(f"{where} must be a Tensor, got {type(tensor).__name__}.")
                if not tensor.is_floating_point():
                    raise TypeError(
                        f"{where} is a {tensor.dtype} tensor; adapter tensors must be floating point (e.g. "
                        f"float32 or bfloat16). Convert it with .float()."
                    )
                if device is not None and tensor.device != device:
                    raise ValueError(
                        f"{where} is on device {tensor.device}, but module {path!r} is on {device}. Move the "
                        f"adapter with `{{p: {{n: t.to({str(device)!r}) ...}}}}` (or build it after moving the model)."
                    )
                have_shape = tensor.shape[1:] if stacked else tensor.shape
                if have_shape != shape or (stacked and tensor.dim() == len(shape)):
                    need = f"stacked (K, {', '.join(map(str, shape))})" if stacked else str(tuple(shape))
                    if stacked and tensor.shape == shape:
                        fix = " This is one adapter's tensor: a mixed batch needs funcpeft.stack([params, ...])."
                    elif not stacked and tensor.shape[1:] == shape:
                        fix = (
                            " This looks like a stacked tree of K adapters: pass adapter_ids=..., use "
                            "torch.func.vmap(fwd, in_dims=(0, None)), or funcpeft.unstack it."
                        )
                    else:
                        fix = ""
                    raise ValueError(
                        f"{where} has shape {tuple(tensor.shape)}, but module {path!r} "
                        f"({type(self._modules[path]).__name__}) needs {need} under this config "
                        f"(r, kernel and features must match the model).{fix}"
                    )
                if stacked:
                    if k is None:
                        k = tensor.shape[0]
                    elif tensor.shape[0] != k:
                        raise ValueError(f"{where} stacks {tensor.shape[0]} adapters, others stack {k}.")
        return k if k is not None else 1


def _device_of(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s own parameters (None: it has none, or they are spread over several)."""
    devices = {p.device for p in module.parameters()}
    return devices.pop() if len(devices) == 1 else None
