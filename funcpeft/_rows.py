"""A mixed batch's per-row adapter selection: ``fwd(stacked, x, adapter_ids=ids)``.

:func:`refuse_mixed` says why a call cannot be a mixed batch at all (``adapter_ids`` of the wrong kind, no stacked
params, a config that also trains full copies, a sequence-first model); :func:`select` checks the ids against the
stack size and builds the :class:`~funcpeft.methods.base.Rows` every adapted layer reads. The range check reads
the ids on the host only for CPU tensors: on an accelerator, and under ``torch.compile``, it runs as an
asynchronous device assertion, so serving never stalls the host on the device at each decode step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from funcpeft.methods.base import Rows

__all__ = ["check_sparse", "refuse_adapter_names", "refuse_mixed", "select"]

# (also raised by fwd.compile, whose eager re-check of a failed mixed call runs outside the trace)
SPARSE_UNDER_COMPILE = (
    "`sparse_grad=True` does not compose with torch.compile (its backward builds a sparse tensor of data-dependent "
    "size); call fwd eagerly for sparse-gradient steps, or use dense gradients."
)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def refuse_adapter_names(value: Any, where: str) -> None:
    """Refuse PEFT's ``adapter_names=`` keyword: a model whose forward takes ``**kwargs`` (Llama's) would ignore it
    and run every row with the one tree given, silently."""
    raise TypeError(
        f"{where} got PEFT's `adapter_names={value!r}`; funcpeft selects each row's adapter with `adapter_ids`: a "
        "LongTensor of indices into the stacked params (funcpeft.stack), -1 for the base model, e.g. "
        "adapter_ids=torch.tensor([0, -1, 1])."
    )


def refuse_mixed(
    params: Any, adapter_ids: Any, copies: Mapping[str, tuple[str, ...]], unbatched: Mapping[str, str]
) -> None:
    """Raise if ``adapter_ids`` cannot select per-row adapters from ``params`` in this ``fwd``.

    Raises:
        TypeError: ``adapter_ids`` is not a 1-D integer tensor.
        ValueError: ``params`` is None, ``adapter_ids`` is on another device than the stacked params, the config
            trains full copies (which cannot differ per row), or a target's inputs are not batch-first
            (``unbatched``: a sequence-first module, a mixture-of-experts expert).
    """
    if not isinstance(adapter_ids, Tensor) or adapter_ids.dtype not in _INDEX_DTYPES or adapter_ids.dim() != 1:
        what = (
            f"a {adapter_ids.dtype} tensor of shape {tuple(adapter_ids.shape)}"
            if isinstance(adapter_ids, Tensor)
            else type(adapter_ids).__name__
        )
        raise TypeError(
            f"`adapter_ids` must be a 1-D integer (Long) tensor with one adapter index per batch row, got {what}."
        )
    if params is None:
        raise ValueError("`adapter_ids` selects adapters from stacked params; pass them (funcpeft.stack) too.")
    device = _leaf_device(params)
    if device is not None and adapter_ids.device != device and adapter_ids.device.type != "meta":
        # every adapted layer indexes its stacked tensors with the ids: torch would fail deep inside a layer
        # (ids on "meta" hold no data and pass: shape-only runs stand in for accelerator ids with them)
        raise ValueError(
            f"`adapter_ids` is on device {adapter_ids.device}, but the stacked params are on {device}; put the ids "
            f"where the adapters are: adapter_ids.to({str(device)!r})."
        )
    if copies:
        raise ValueError(
            f"Mixed batches apply adapter tensors per row; this config also trains full copies of "
            f"{sorted(copies)[:3]} (bias or modules_to_save), which cannot differ per row."
        )
    if unbatched:
        target, why = next(iter(unbatched.items()))
        raise ValueError(
            f"Mixed batches select adapters by the first dimension of each adapted layer's input, but target "
            f"{target!r} {why} run one adapter per call (vmap over stacked params)."
        )


def _leaf_device(params: Any) -> torch.device | None:
    """The device of the first tensor of ``params`` (None where there is none: the validator then says why)."""
    if not isinstance(params, Mapping):
        return None
    for entry in params.values():
        if isinstance(entry, Mapping):
            for leaf in entry.values():
                if isinstance(leaf, Tensor):
                    return leaf.device
    return None


def select(adapter_ids: Tensor, k: int, repeat: bool, sparse: Any) -> Rows:
    """The rows of a mixed batch over ``k`` stacked adapters (``-1``: the base model).

    With ``repeat`` (``generate``), a layer whose batch is a multiple of ``adapter_ids``' length gives each id that
    many consecutive rows, and decode steps may reuse what each layer gathered.

    Raises:
        ValueError: an id lies outside ``[-1, k - 1]`` (CPU ids; elsewhere the device asserts it), or
            ``sparse`` is set where a sparse gradient cannot be built (:func:`check_sparse`).
    """
    message = f"`adapter_ids` must lie in [-1, {k - 1}] for {k} stacked adapters (-1: the base model)"
    all_active = False  # under torch.compile the graph keeps the masks (no guard on data)
    if torch.compiler.is_compiling() or adapter_ids.device.type != "cpu":
        # Data-dependent: checked inside the graph (an eager check would break it), and on an accelerator by
        # the device (reading the range would stall the host on the device at every call, every decode step;
        # a bad id fails at the next synchronization). Rows always mask base rows there.
        torch._assert_async(((adapter_ids >= -1) & (adapter_ids < k)).all(), message + ".")
    elif adapter_ids.numel():
        low, high = int(adapter_ids.min()), int(adapter_ids.max())  # one host read each, per call
        if low < -1 or high >= k:
            raise ValueError(f"{message}, got values from {low} to {high}.")
        all_active = low >= 0  # no base rows: gathers skip masking in the neutral value
    # only generate repeats rows, and transformers' generate always runs under no_grad: its decode steps may
    # reuse what each layer gathered (nothing to differentiate through)
    cache = {} if repeat else None
    if sparse is not False:
        check_sparse(sparse)
    index, active = adapter_ids.clamp(min=0).long(), adapter_ids >= 0
    return Rows(index, active, repeat, cache, sparse, all_active)


def check_sparse(sparse: Any) -> None:
    """``sparse_grad=True`` needs plain autograd: a sparse gradient cannot pass through torch.func or Dynamo."""
    if sparse is not True:
        raise TypeError(f"`sparse_grad` must be True or False, got {sparse!r}.")
    if torch.compiler.is_compiling():
        raise ValueError(SPARSE_UNDER_COMPILE)
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise ValueError(
            "`sparse_grad=True` needs plain autograd (loss.backward() or torch.autograd.grad): torch.func transforms "
            "(grad, vjp, vmap) only produce dense gradients. Drop sparse_grad under torch.func."
        )
