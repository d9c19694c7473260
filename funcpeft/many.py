"""Many adapters over one base model: stacked adapter trees, and PEFT's adapter arithmetic.

**The stacked-tree convention.** K adapters of one config are stored as *one* tree with the same structure as a
single adapter, ``{module_path: {tensor_name: Tensor}}``, where every leaf has an extra leading dimension of size
K: ``stacked[path][name][k]`` is adapter ``k``'s tensor. This is the layout that

- ``torch.func.vmap(fwd, in_dims=(0, None))(stacked, *args)`` maps over (K outputs, one per adapter),
- ``fwd(stacked, *args, adapter_ids=ids)`` gathers from (a mixed batch: row ``i`` uses adapter ``ids[i]``), and
- ``funcpeft.optim`` updates leaf by leaf (each adapter independently, since every update is elementwise).

:func:`stack` builds it from a list of adapters and :func:`unstack` takes it apart. Both return fresh leaf
tensors with ``requires_grad=True`` that share no storage with their inputs (the convention of every params tree
funcpeft hands out, so both ``torch.func.grad`` and ``torch.optim`` work on them).

The trees are exactly two levels deep, so this module walks them as plain dicts rather than flattening them into
leaf lists (optree sorts dict keys while torch's pytree keeps insertion order; zipping leaf lists across the two
silently pairs the wrong tensors). Outputs keep the first adapter's module and tensor order.

:func:`combine` (PEFT's ``add_weighted_adapter`` as a pure function on params trees) lives in
:mod:`funcpeft._combine` and is exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from funcpeft._combine import combine
from funcpeft._trees import Params, as_leaf, check_alike, check_list, check_tree, check_untransformed

__all__ = ["combine", "stack", "unstack"]


def stack(list_of_params: Sequence[Mapping[str, Mapping[str, Tensor]]]) -> Params:
    """Stack K adapters of one config into one tree whose leaves have a leading adapter dimension K.

    ``stack([p0, p1])[path][name]`` is ``torch.stack([p0[path][name], p1[path][name]])``. The result feeds
    ``torch.func.vmap(fwd, in_dims=(0, None))`` and mixed batches (``fwd(stacked, x, adapter_ids=ids)``).

    Args:
        list_of_params: a non-empty list (or tuple) of adapter trees from :func:`funcpeft.adapt` /
            ``fwd.init`` / :func:`funcpeft.load`, all with the same modules, tensor names, shapes, dtypes and
            devices.

    Returns:
        A tree ``{module_path: {tensor_name: Tensor (K, ...)}}`` in the first adapter's order; its leaves are
        fresh leaf tensors with ``requires_grad=True`` sharing no storage with the inputs.

    Raises:
        TypeError: ``list_of_params`` is not a list of adapter dicts (e.g. a single dict), or a leaf is not a
            tensor.
        ValueError: the list is empty, or two adapters differ in structure, shape, dtype or device (the message
            names the first offending module path, the tensor, both values and the list index), or it is called
            inside ``torch.func.grad`` / ``vmap`` (its leaves are detached: stack outside the transform).
    """
    check_untransformed("funcpeft.stack")
    trees = check_list(list_of_params, "list_of_params")
    check_alike(trees, "list_of_params")
    with torch.no_grad():
        return {
            path: {name: as_leaf(torch.stack([t[path][name].detach() for t in trees])) for name in entry}
            for path, entry in trees[0].items()
        }


def unstack(stacked: Mapping[str, Mapping[str, Tensor]]) -> list[Params]:
    """The inverse of :func:`stack`: a list of K adapter trees, one per slice of the leading dimension.

    Args:
        stacked: a tree whose leaves all share the leading dimension K.

    Returns:
        ``[params_0, ..., params_{K-1}]``; every leaf is a fresh leaf tensor with ``requires_grad=True`` (a copy:
        no storage is shared with ``stacked`` or between adapters).

    Raises:
        TypeError: ``stacked`` is not a ``{module_path: {tensor_name: Tensor}}`` dict.
        ValueError: it holds no tensor, a 0-d tensor, or leaves whose leading dimensions disagree (named), or it
            is called inside ``torch.func.grad`` / ``vmap`` (its leaves are detached: unstack outside the transform).
    """
    check_untransformed("funcpeft.unstack")
    check_tree(stacked, "stacked")
    first: tuple[str, str, int] | None = None
    for path, entry in stacked.items():
        for name, leaf in entry.items():
            if leaf.dim() == 0:
                raise ValueError(
                    f"`stacked[{path!r}][{name!r}]` is a 0-d tensor, so it has no leading adapter dimension; is this "
                    "a single adapter rather than the result of funcpeft.stack?"
                )
            if first is None:
                first = (path, name, leaf.shape[0])
            elif leaf.shape[0] != first[2]:
                raise ValueError(
                    f"`stacked[{path!r}][{name!r}]` has leading dimension {leaf.shape[0]}, but "
                    f"`stacked[{first[0]!r}][{first[1]!r}]` has {first[2]}; every leaf of a stacked tree has the "
                    "number of adapters K as its leading dimension (the stacked tree of a heterogeneous fwd, "
                    "`funcpeft.adapt(model, [configs])`, is packed by rank: take it apart with fwd.unstack)."
                )
    if first is None:
        raise ValueError("`stacked` holds no tensors, so the number of adapters is unknown.")
    with torch.no_grad():
        return [
            {
                path: {name: as_leaf(leaf[k].detach().clone()) for name, leaf in entry.items()}
                for path, entry in stacked.items()
            }
            for k in range(first[2])
        ]
