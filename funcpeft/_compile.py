"""``fwd.compile()``: one compiled ``fwd`` for every kind of call, without torch's recompile limit.

``torch.compile(fwd)`` works, but all of its variants are entries of one cache: dynamo keeps at most
``torch._dynamo.config.recompile_limit`` (8) compiled variants per code object, and every call of a compiled
callable object goes through the same code (dynamo's ``wrap_inline`` frame). A base call, an adapter, a mixed
batch, training and eval mode, gradients on and off, and a new batch size or sequence length each need their own
variant (their guards differ), so a server or a training loop that uses them all hits
``FailOnRecompileLimitHit`` (``fullgraph=True``) or silently falls back to eager at the 9th.

:class:`CompiledAdapted` decides the *kind* of call in Python first (the base or an adapter; single or mixed;
``model.training``; grad mode) and sends each kind to its own compiled function with
its own code object (a copy of :func:`_call`'s), so each kind has the whole limit for its shapes. Within a kind,
torch's own rules apply: the first call compiles; a batch size or sequence length that changes recompiles once
with that dimension dynamic (``dynamic=None``, torch's default; sizes 0 and 1 are specialised); an input that
crosses a LoRA layer's fold threshold (without gradients, from enough rows on, ``B A`` is folded into the weight
for the call) compiles that branch once; a new set of keyword arguments, a different dtype or a params tree of
another structure recompiles. ``fwd.compile(**kwargs)``
passes ``kwargs`` to ``torch.compile`` (``fullgraph``, ``dynamic``, ``mode``, ``backend``, ...).

Guards: dynamo guards every Python value a trace reads. The values funcpeft's own structure holds (the view's
intercepting forwards and flag properties, the closures' cells, the per-layer hyper-parameters they read, the
validator's table of expected shapes: built once in ``adapt``, immutable, reachable only through ``fwd``) cannot
change, so ``fwd.compile`` drops the guards on them (:func:`guard_filter`; about 70 per transformer block) and
keeps every guard on the model, the inputs, the flags read live from the model, and every tensor. A
``guard_filter_fn`` of the caller's still applies to the rest.

Checking a single adapter's tree: ``fwd`` checks the tree it is called with in full on every call (structure,
shapes, dtypes, devices; tens of microseconds for a large model, a few percent of a small compiled call).
Compiled, the check runs in full, eagerly, only when a graph is compiled for the tree (dynamo's cache for the
kind's code object grew during the call), or when dynamo runs the frame eagerly (skipped, or past the recompile
limit). Every graph is traced with :meth:`funcpeft._check.Validator.pin` reading the tree's keys and each leaf's
shape against the expected one, so its guards hold the keys of the tree and of each entry, and each leaf's dtype,
device and shape (a symbolic size is guarded equal to the expected one): a call that reuses a graph holds a tree
equal in all that validity depends on to one that passed the full check. A tree that does not fit raises the full
check's ``ValueError``/``TypeError`` (not dynamo's error from the trace), and the kind's compiled function traced
for it is dropped, so none of its graphs ever serves a call; ``pin`` refuses a missing or unknown entry, a shape or a
non-float dtype in the trace itself, so no graph exists for such a tree even until then (another thread could reuse
it). A mixed batch is checked in the trace, as eagerly; when its call fails, the eager checks run again and raise
their own error (under ``fullgraph`` dynamo reports one raised while tracing as its ``Unsupported``).

Calls with ``base=`` run eagerly: checking the given tensors against the model's (names, shapes, aliasing through
storage pointers) is not traceable by dynamo yet, and a compiled graph would have to guard on every one of them.
"""

from __future__ import annotations

import re
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from funcpeft._rows import SPARSE_UNDER_COMPILE, refuse_adapter_names

__all__ = ["CompiledAdapted"]


def _call(fwd: Any, params: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fwd(params, *args, **kwargs)


def _call_checked(fwd: Any, params: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if torch.compiler.is_compiling():
        fwd._validator.pin(params)  # the graph's guards hold the tree's structure and shapes
    else:  # dynamo runs this frame eagerly (it skipped it, or is past its recompile limit): nothing guards the tree
        fwd._validator.check(params)
    return fwd._checked_call(params, args, kwargs)


try:  # how many graphs dynamo holds for a code object (falls back to checking every call where torch lacks it)
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as _cache_entries
except ImportError:  # pragma: no cover (torch 2.13 has it)
    _cache_entries = None


class CompiledAdapted:
    """``fwd`` compiled per kind of call (see the module docstring); called exactly as ``fwd``."""

    def __init__(self, fwd: Any, options: dict[str, Any]) -> None:
        if "fullgraph" in options and not isinstance(options["fullgraph"], bool):
            raise TypeError(f"`fullgraph` must be a bool, got {options['fullgraph']!r}.")
        self.fwd = fwd
        self._options = _with_guard_filter(options)
        self._compiled: dict[tuple[Any, ...], tuple[Callable[..., Any], types.CodeType]] = {}
        self._lock = threading.Lock()

    def kind(self, params: Any, kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """What decides which compiled function serves a call: ``(adapter, mixed, training, grad)``."""
        return (
            params is not None,
            kwargs.get("adapter_ids") is not None,
            self.fwd.model.training,
            torch.is_grad_enabled(),
        )

    def __call__(self, params: Any, /, *args: Any, **kwargs: Any) -> Any:
        if "adapter_names" in kwargs:  # before the tree's check, as fwd
            refuse_adapter_names(kwargs["adapter_names"], "fwd")
        if "base" in kwargs:
            if kwargs["base"] is not None:
                return self.fwd(params, *args, **kwargs)  # not traceable yet (see the module docstring)
            del kwargs["base"]  # `base=None` is fwd's default: never the model's keyword
        if torch.compiler.is_compiling():  # inside the user's own compiled function: its trace takes in fwd itself
            return self.fwd(params, *args, **kwargs)
        # A single adapter (no other reserved keyword) is checked in full, eagerly, only when a graph is compiled
        # for it (see the module docstring); mixed batches are checked in the trace, as eagerly.
        single = params is not None and not ({"adapter_ids", "sparse_grad"} & kwargs.keys())
        key = (*self.kind(params, kwargs), single)
        entry = self._compiled.get(key)
        if entry is None:
            with self._lock:
                entry = self._compiled.get(key)
                if entry is None:
                    copy = _own_copy(_call_checked if single else _call, key)
                    # a fresh `options` dict per call: torch.compile pops `guard_filter_fn` out of the one it is
                    # given, so a shared dict would leave every later kind without funcpeft's and the caller's
                    options = {**self._options, "options": dict(self._options["options"])}
                    entry = self._compiled[key] = (torch.compile(copy, **options), copy.__code__)
        compiled, code = entry
        if not single:
            try:
                return compiled(self.fwd, params, args, kwargs)
            except Exception:
                self._refuse_mixed(params, kwargs)
                raise
        if _cache_entries is None:  # pragma: no cover
            self.fwd._validator.check(params)
            return compiled(self.fwd, params, args, kwargs)
        graphs = len(_cache_entries(code))
        try:
            out = compiled(self.fwd, params, args, kwargs)
        except Exception:
            self._refuse_unfit(key, entry, params, drop=len(_cache_entries(code)) != graphs)
            raise
        if len(_cache_entries(code)) != graphs:  # a graph was compiled for this tree: check it now, in full
            self._refuse_unfit(key, entry, params, drop=True)
        return out

    def _refuse_unfit(self, key: tuple[Any, ...], entry: tuple[Any, ...], params: Any, drop: bool) -> None:
        """Check ``params`` in full; if it does not fit, forget the kind's compiled function when ``drop`` (a graph
        was traced for this tree: none of its graphs may ever serve a call) and raise the check's error."""
        refuse_call = getattr(self.fwd, "_refuse_call", None)  # a heterogeneous fwd's own refusals
        try:
            if refuse_call is not None:
                refuse_call(params, None)
            self.fwd._validator.check(params)
        except (TypeError, ValueError) as err:
            if drop:
                with self._lock:
                    if self._compiled.get(key) is entry:
                        del self._compiled[key]
            raise err from None

    def _refuse_mixed(self, params: Any, kwargs: dict[str, Any]) -> None:
        """After a failed mixed-batch call, run ``fwd``'s own checks of the stacked tree and ``adapter_ids`` eagerly
        and raise their error: under ``fullgraph=True`` dynamo reports an error raised while tracing as its own
        ``Unsupported`` ("Observed exception"), and the ids' range is asserted inside the graph."""
        ids = kwargs.get("adapter_ids")
        if params is None:
            return
        try:
            if ids is not None:
                self.fwd._rows(params, ids, False, kwargs.get("sparse_grad", False))
            else:
                self.fwd._validator.check(params)
        except (TypeError, ValueError) as err:
            raise err from None
        if kwargs.get("sparse_grad") is True:  # refused only while tracing (check_sparse): the eager checks pass
            raise ValueError(SPARSE_UNDER_COMPILE) from None

    def __repr__(self) -> str:
        return f"CompiledAdapted({self.fwd!r}, {len(self._compiled)} kinds of call compiled)"


_CELL = re.compile(r"(.*\.__closure__)\[\d+\]\.cell_contents")


def _ours(value: Any) -> bool:
    """A function ``adapt`` made (a view's forward or property getter), the view's binding, an adapter layer, or
    the tree validator (its tables of expected shapes are fixed once ``adapt`` returns)."""
    if isinstance(value, types.FunctionType):
        return value.__module__.startswith("funcpeft.") and "<locals>" in value.__qualname__
    return type(value).__module__.startswith(("funcpeft.methods.", "funcpeft._view", "funcpeft._check"))


def guard_filter(entries: Sequence[Any]) -> list[bool]:
    """Which of a trace's guards to keep (``torch.compile``'s ``guard_filter_fn``): all but those on the closures
    of functions funcpeft made in ``adapt`` and on what their cells hold (module docstring). A closure is
    funcpeft's when the function itself or one of its cells' contents is (a user's closure never holds funcpeft's
    binding or layers). Tensor guards are always kept."""
    roots = {e.name for e in entries if e.has_value and _ours(e.value)}
    for e in entries:
        cell = _CELL.fullmatch(e.name)
        if cell is not None and e.has_value and _ours(e.value):
            roots.add(cell.group(1))
    if not roots:
        return [True] * len(entries)
    keep = []
    for e in entries:
        name = e.name
        inside = any(name == r or name.startswith((r + ".", r + "[")) for r in roots)
        keep.append(not inside or e.guard_type == "TENSOR_MATCH")
    return keep


def _with_guard_filter(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for ``torch.compile`` with :func:`guard_filter` (and a ``guard_filter_fn`` the caller gave)."""
    inner = dict(options.get("options") or {})
    theirs = inner.get("guard_filter_fn")
    if theirs is None:
        inner["guard_filter_fn"] = guard_filter
    else:

        def both(entries: Sequence[Any]) -> list[bool]:
            return [a and b for a, b in zip(guard_filter(entries), theirs(entries), strict=True)]

        inner["guard_filter_fn"] = both
    return {**options, "options": inner}


def _own_copy(fn: Callable[..., Any], key: tuple[Any, ...]) -> Callable[..., Any]:
    """``fn`` with a code object of its own (dynamo keeps its compiled variants on the code object)."""
    name = "fwd_" + "_".join(str(int(bool(k))) for k in key)
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__doc__ = fn.__doc__
    return copy
