"""Which adapter the layers that activation checkpointing recomputes during ``backward()`` must see.

Outside any ``fwd`` call the view's binding holds the ``OUTSIDE`` marker (:mod:`funcpeft._view`), and the only
code that runs the view then is autograd recomputing checkpointed layers. :class:`Recompute` keeps, per autograd
graph task, the adapter of the ``fwd`` call whose outputs that ``backward()`` started from, so threads and
successive ``backward()`` calls each see their own call's adapter.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["Recompute"]

_AMBIGUOUS: Any = object()


class Recompute:
    """The adapter that layers recomputed by activation checkpointing must see, per autograd graph task.

    :meth:`attach` puts a gradient hook on the outputs of an eager ``fwd`` call with gradients; the hook runs
    inside ``backward()`` before any layer of that call is recomputed (the outputs come first in backward order)
    and records the call's ``(params, rows, base)`` under ``torch._C._current_graph_task_id()``, the id autograd gives
    one ``backward()``/``autograd.grad`` run in every thread that works on it. The record is dropped when the run
    ends. Two calls with different adapters feeding one ``backward()`` cannot be told apart by a recomputed
    layer: that combination is refused when a recomputation needs it (never a guess).
    """

    def __init__(self) -> None:
        self._tasks: dict[int, Any] = {}
        self._lock = threading.Lock()

    def attach(self, output: Any, params: Any, rows: Any, base: Any = None) -> None:
        tensors = [t for t in pytree.tree_leaves(output) if isinstance(t, Tensor) and t.requires_grad]
        if not tensors:
            return
        entry = (params, rows, base)

        def record(grad: Tensor) -> None:
            task = torch._C._current_graph_task_id()
            with self._lock:
                known = self._tasks.get(task)
                if known is None:
                    self._tasks[task] = entry
                    torch.autograd.Variable._execution_engine.queue_callback(lambda: self._forget(task))
                elif known is not _AMBIGUOUS and not _same(known, entry):
                    self._tasks[task] = _AMBIGUOUS

        for tensor in tensors:
            tensor.register_hook(record)

    def _forget(self, task: int) -> None:
        with self._lock:
            self._tasks.pop(task, None)

    def lookup(self) -> tuple[Any, Any, Any]:
        """``(params, rows, base)`` for a layer recomputed now (outside any ``fwd`` call).

        Raises:
            RuntimeError: the running backward combines ``fwd`` calls with different adapters, or no ``fwd`` call's
                output led to this recomputation.
        """
        task = torch._C._current_graph_task_id()
        with self._lock:
            entry = self._tasks.get(task)
            if entry is None and len(self._tasks) == 1:  # a reentrant checkpoint's nested backward() runs as its
                entry = next(iter(self._tasks.values()))  # own graph task, inside the one that recorded it
        if entry is None and task == -1:
            raise RuntimeError(
                "A module of fwd's view was called outside any fwd call (e.g. a submodule returned by "
                "fwd.method(...)): it cannot know which adapter to apply. Call it inside the bound call instead: "
                "fwd.method(lambda model, *args: model.get_encoder()(*args))(params, ...)."
            )
        if entry is None or entry is _AMBIGUOUS:
            raise RuntimeError(
                "A layer adapted by funcpeft is being recomputed by activation checkpointing, but funcpeft cannot "
                "tell which adapter it belongs to: "
                + (
                    "this backward() combines the outputs of fwd calls with different adapters. Call backward() "
                    "once per fwd call (gradients accumulate), or disable checkpointing."
                    if entry is _AMBIGUOUS
                    else "the backward() did not start from the outputs of a fwd call (or several threads run "
                    "nested reentrant checkpoints). Start backward() from fwd's outputs, or use "
                    "use_reentrant=False."
                )
            )
        return entry


def _same(a: tuple[Any, Any, Any], b: tuple[Any, Any, Any]) -> bool:
    if a[0] is not b[0]:
        return False
    base_a, base_b = a[2], b[2]
    if base_a is not base_b:
        if base_a is None or base_b is None or base_a.keys() != base_b.keys():
            return False
        if any(base_a[k] is not base_b[k] for k in base_a):
            return False
    rows_a, rows_b = a[1], b[1]
    if rows_a is None or rows_b is None:
        return rows_a is rows_b
    return bool(torch.equal(rows_a.index, rows_b.index) and torch.equal(rows_a.active, rows_b.active))
