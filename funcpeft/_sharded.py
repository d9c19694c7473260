"""Sharded base tensors (FSDP2's ``fully_shard``, or any ``DTensor`` parameter) outside the forward pass.

Inside the model's forward, FSDP2 hands every layer its unsharded (plain) weight, so the methods never see a
``DTensor`` there. Outside it (``adapt``'s initialisation from the base weights, ``modules_to_save`` copies,
``fwd.merge``) the model holds its shards, and funcpeft reads the *whole* tensor: the adapter is replicated on
every rank, so everything it is computed from must be the same on every rank. Reading a whole tensor gathers it
(``DTensor.full_tensor()``), a collective: ``adapt`` and ``fwd.merge`` on a sharded model run on every rank, as
the sharded model's own ``state_dict()`` and ``full_tensor()`` do.

``fwd.merge`` stores each merged tensor back in its parameter's own layout (:func:`like`: the same mesh and
placements, each rank keeping its own shard, without communication), so the merged state dict loads into the
sharded model with ``load_state_dict`` and into an unsharded one after ``{k: v.full_tensor()}``, as the model's
own ``state_dict()`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["full", "is_sharded", "like", "local"]

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # a build without torch.distributed has no distributed tensors

    class DTensor:  # type: ignore[no-redef]
        pass


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded or replicated distributed tensor)."""
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor a rank holds for ``t`` (its shard), ``t`` itself if it is not distributed: what a format check
    looks at (a sharded float weight is a float weight)."""
    return t.to_local() if is_sharded(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor ``t`` stands for (detached): gathered from every rank if it is distributed (a collective)."""
    t = t.detach()
    return t.full_tensor() if is_sharded(t) else t


def like(value: Tensor, ref: Tensor) -> Tensor:
    """``value`` (a whole tensor, the same on every rank) laid out as ``ref``: distributed over ``ref``'s mesh and
    placements when ``ref`` is a ``DTensor`` (each rank keeps its own part, no communication), else ``value``."""
    if not is_sharded(ref):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, ref.device_mesh, ref.placements, src_data_rank=None)
