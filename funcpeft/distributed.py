"""Data-parallel adapter training on ``torch.distributed``: average gradients, broadcast the starting adapter.

When to use it: the batch no longer fits one process (or one machine). Launch N processes (``torchrun
--nproc_per_node=N train.py``, gloo on CPU, NCCL on GPUs); every rank holds the same frozen model and starts from
rank 0's adapter (:func:`broadcast_params`), computes the loss and gradients on its own shard of the batch (with
``torch.func.grad`` / ``grad_and_value`` or plain autograd), averages them (:func:`average_gradients`), and applies
the same optimizer update. Every rank then holds identical params after every step, equal to one process trained
on the whole batch when the loss is a mean over equal-size shards. ``examples/ddp_train.py`` is the full loop.

With modules instead: ``DistributedDataParallel(fwd.bind(params))`` (:mod:`funcpeft.bind`; also what ``accelerate``'s
``prepare`` and Lightning's DDP strategy build). The bound module's parameters are the adapter's leaves and the base
model is not a submodule, so DDP broadcasts rank 0's adapter, averages exactly its gradients, and leaves the frozen
base alone; the result is the same as with :func:`average_gradients`.

The trap: DDP (or FSDP1's ``FullyShardedDataParallel``) around the *model* does not synchronise the adapter.
``fwd(params, ...)`` runs outside the wrapper's gradient hooks, which cover the model's own parameters only, so
each rank trains on its own gradients and the ranks silently diverge. ``funcpeft.adapt`` warns when it is given
such a wrapper (a :class:`~funcpeft.FuncpeftWarning`): it adapts the module a DDP wrapper holds (``model.module``,
so paths are the plain model's) and keeps an FSDP1 wrapper (whose forward gathers the sharded weights). Either
way, synchronise the adapter with ``DistributedDataParallel(fwd.bind(params))`` or :func:`average_gradients`.
FSDP2's ``fully_shard`` wraps nothing: adapt the sharded model and synchronise the adapter in the same two ways.
"""

from __future__ import annotations

from typing import Any, TypeVar

import optree
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["average_gradients", "broadcast_params"]

Tree = TypeVar("Tree")


def average_gradients(grads: Tree, group: dist.ProcessGroup | None = None) -> Tree:
    """The mean of ``grads`` over the ranks of ``group``: all-reduce (sum), then divide by the world size.

    The leaves are coalesced into one flat buffer per (dtype, device), so a whole adapter costs one collective
    per buffer rather than one per tensor (DDP's bucketing). Any tree of tensors works, including stacked
    K-adapter trees (:func:`funcpeft.stack`); ``None`` entries (autograd's "no gradient") stay ``None``. Sparse COO
    gradients (``sparse_grad=True``) are all-reduced one by one and come back sparse (coalesced), for
    ``torch.optim.SparseAdam``; the backend must support sparse all-reduce (gloo does). Every rank must call it with
    the same tree structure, shapes and dtypes, as with any collective.

    Needed whenever the adapter's gradients are not averaged by a wrapper around ``fwd.bind(params)``: in
    particular when the *model* is wrapped in DDP/FSDP, which never sees ``params`` (see the module docstring).

    Args:
        grads: a pytree of gradient tensors, e.g. from ``torch.func.grad(loss_fn)(params, shard)``.
        group: the process group (default: the global one).

    Returns:
        A new tree of detached tensors (views into the reduced buffers); ``grads`` is not modified.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized, or this rank is not in ``group``.
        TypeError: a leaf is not a floating-point (or complex) tensor, or has a layout other than dense or sparse
            COO.
    """
    world = _world_size("average_gradients", group)
    leaves, spec = _leaves(grads, "grads", floating=True, sparse=True)
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        for i, leaf in enumerate(leaves):
            if leaf.layout is torch.sparse_coo:  # `sparse_grad=True`: reduced as sparse tensors, one by one
                reduced = leaf.detach().coalesce().clone()
                dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
                out[i] = (reduced / world).coalesce()
        for idx in _buckets(leaves, skip=set(out)):
            flat = torch.cat([leaves[i].detach().reshape(-1) for i in idx])  # a fresh buffer: grads stay untouched
            # SUM then divide: gloo has no ReduceOp.AVG.
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat.div_(world)
            _scatter(flat, idx, leaves, out)
    return spec.unflatten([out[i] for i in range(len(leaves))])


def broadcast_params(params: Tree, src: int = 0, group: dist.ProcessGroup | None = None) -> Tree:
    """Rank ``src``'s ``params`` on every rank of ``group``, so all ranks start training from the same adapter.

    Coalesced into one broadcast per (dtype, device), as :func:`average_gradients`. Call it once after
    ``funcpeft.adapt`` (or ``funcpeft.load``); the optimizer keeps the ranks in step afterwards.

    Args:
        params: the adapter tree (same structure, shapes and dtypes on every rank; the values may differ).
        src: the global rank whose values are kept.
        group: the process group (default: the global one).

    Returns:
        A new tree of fresh leaf tensors (no shared storage), with ``requires_grad`` as in ``params``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized, or this rank is not in ``group``.
        TypeError: a leaf is not a dense tensor.
    """
    _world_size("broadcast_params", group)
    leaves, spec = _leaves(params, "params", floating=False)
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        for idx in _buckets(leaves):
            flat = torch.cat([leaves[i].detach().reshape(-1) for i in idx])
            dist.broadcast(flat, src=src, group=group)
            _scatter(flat, idx, leaves, out)
    fresh = [out[i].clone().requires_grad_(leaf.requires_grad) for i, leaf in enumerate(leaves)]
    return spec.unflatten(fresh)


def _world_size(name: str, group: dist.ProcessGroup | None) -> int:
    """The size of ``group``; an error saying how to set one up when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"funcpeft.distributed.{name} needs an initialized torch.distributed process group, and there is none. "
            "Launch one process per rank with `torchrun --nproc_per_node=N your_script.py` and call "
            "`torch.distributed.init_process_group('gloo')` ('nccl' on GPUs) at the start of the script, or call "
            "init_process_group(backend, rank=..., world_size=..., init_method=...) yourself."
        )
    world = dist.get_world_size(group)
    if world < 1:  # torch answers -1 for a group this rank does not belong to
        raise RuntimeError(
            f"funcpeft.distributed.{name}: rank {dist.get_rank()} is not a member of the given `group`; call it only "
            "on the group's ranks."
        )
    return world


def _leaves(tree: Any, what: str, floating: bool, sparse: bool = False) -> tuple[list[Tensor], optree.PyTreeSpec]:
    """The tree's tensor leaves and its spec; a clear error for anything that cannot be communicated.

    ``sparse``: sparse COO leaves (the gradients of ``sparse_grad=True``) are accepted; other layouts never are.
    """
    paths, leaves, spec = optree.tree_flatten_with_path(tree)
    for path, leaf in zip(paths, leaves, strict=True):
        where = "".join(f"[{key!r}]" for key in path)
        if not isinstance(leaf, Tensor):
            raise TypeError(f"`{what}{where}` must be a Tensor, got {type(leaf).__name__}.")
        if leaf.layout is not torch.strided and not (sparse and leaf.layout is torch.sparse_coo):
            raise TypeError(
                f"`{what}{where}` has layout {leaf.layout}; only dense tensors"
                f"{' and sparse COO gradients' if sparse else ''} can be communicated. Pass `t.to_dense()`."
            )
        if floating and not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(
                f"`{what}{where}` is a {leaf.dtype} tensor; gradients to average must be floating-point or complex."
            )
    return leaves, spec


def _buckets(leaves: list[Tensor], skip: set[int] | None = None) -> list[list[int]]:
    """Leaf indices grouped by (dtype, device), in first-seen order (the same on every rank for the same tree);
    indices in ``skip`` (already communicated) are left out."""
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, leaf in enumerate(leaves):
        if skip and i in skip:
            continue
        buckets.setdefault((leaf.dtype, leaf.device), []).append(i)
    return list(buckets.values())


def _scatter(flat: Tensor, idx: list[int], leaves: list[Tensor], out: dict[int, Tensor]) -> None:
    """Cut ``flat`` back into the shapes of ``leaves[idx]``, into ``out``."""
    pieces = flat.split([leaves[i].numel() for i in idx])
    for i, piece in zip(idx, pieces, strict=True):
        out[i] = piece.view(leaves[i].shape)
