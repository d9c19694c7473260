"""The protocol every adapter method implements, and the registry ``adapt`` dispatches on.

A method is one file that says, for each layer kind it supports, how to initialise its tensors, how to compute
the adapted output and how to fold itself into the base weight. It exposes a :class:`Method`; ``adapt`` asks it
for one :class:`AdapterLayer` per matched module (validating the module on the way) and does everything else
(targeting, trainable copies, interception) itself. Adding a method is one new file and one registry line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from funcpeft._layers import Kind
from funcpeft.config import AdapterConfig

__all__ = [
    "AdapterLayer",
    "Method",
    "Rows",
    "rows_for",
    "gather",
    "take",
    "register",
    "build_layers",
    "method_for",
    "method_for_peft_type",
]

BaseForward = Callable[..., Any]


class Rows(NamedTuple):
    """A mixed batch's adapter selection: row ``i`` of every adapted layer's input uses adapter ``index[i]`` of the
    stacked tensors, or the base layer where ``active[i]`` is False (``adapter_ids == -1``; ``index`` is 0 there).

    Methods gather each row's tensors with :func:`gather` and apply them in batched matmuls, one pass for all rows,
    as multi-adapter serving systems do (Punica/S-LoRA's BGMV); gradients flow back to the stacked tensors through
    the gather, so an adapter no row uses gets a zero gradient.
    """

    index: Tensor  # (B,) int64 in [0, K)
    active: Tensor  # (B,) bool: True where the row has an adapter, False for the base model
    repeat: bool = False  # a layer batch of m * B rows gives each id m consecutive rows (generate's expansion)
    # Without gradients, for one generate call: gathered tensors and expanded selections, reused by every decode
    # step (the rows and the adapter stay the same for the whole call). None: gather anew (training, fwd).
    cache: dict[Any, Any] | None = None
    # The gradient of each stacked tensor is a sparse COO tensor holding only the adapters the rows use
    # (``fwd(..., sparse_grad=True)``): memory and optimizer work proportional to them, not to the resident K.
    sparse: bool = False
    # Known (eagerly, once per call) that no row is a base row: gathers then skip masking in the neutral value.
    all_active: bool = False


class _SparseTake(torch.autograd.Function):
    """``stacked[index]`` (along dim 0) whose gradient is a sparse COO tensor of ``stacked``'s shape holding only
    the indexed slices (as ``nn.Embedding(sparse=True)``, for tensors of any rank)."""

    @staticmethod
    def forward(stacked: Tensor, index: Tensor, mask: Tensor | None) -> Tensor:
        return _select(stacked, index)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        stacked, index, mask = inputs
        ctx.save_for_backward(index, mask)
        ctx.shape = stacked.shape

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        index, mask = ctx.saved_tensors
        grad, index = grad.reshape(-1, *ctx.shape[1:]), index.reshape(-1)
        if mask is not None:  # unmasked picks were replaced by a fill value: they have no gradient
            grad, index = grad[mask.reshape(-1)], index[mask.reshape(-1)]
        used, inverse = torch.unique(index, return_inverse=True)
        values = grad.new_zeros(used.shape[0], *ctx.shape[1:])
        values.index_add_(0, inverse, grad.contiguous())  # (a strided gradient makes index_add_ 4x slower)
        sparse = torch.sparse_coo_tensor(
            used.unsqueeze(0), values, ctx.shape, is_coalesced=True, check_invariants=False
        )  # unique indices, sorted: coalesced by construction
        return sparse, None, None


def take(stacked: Tensor, index: Tensor, sparse: bool = False, mask: Tensor | None = None) -> Tensor:
    """``stacked[index]`` along the first dimension; with ``sparse``, backward gives ``stacked`` a sparse gradient
    holding only the slices ``index`` names where ``mask`` (index's shape; default all) is True: the caller replaces
    the other picks by a fill value, so they get no gradient. ``stacked`` must be the leaf itself, not a view."""
    if sparse and stacked.requires_grad and torch.is_grad_enabled():
        return _SparseTake.apply(stacked, index, mask)
    return _select(stacked, index)


def _select(stacked: Tensor, index: Tensor) -> Tensor:
    """``stacked[index]`` for an index tensor of any shape, as ``index_select`` (3x faster than advanced indexing
    on CPU for stacked adapter tensors)."""
    if index.dim() == 1:
        return stacked.index_select(0, index)
    return stacked.index_select(0, index.reshape(-1)).view(*index.shape, *stacked.shape[1:])


def gather(stacked: Tensor, rows: Rows, fill: float = 0.0) -> Tensor:
    """``stacked[rows.index]``: each row's own adapter tensor, and ``fill`` for rows of the base model.

    Base rows get the neutral value itself (0 for an additive update, 1 for a scale) rather than some adapter's
    tensor multiplied by 0: ``0 * nan`` is nan, so a non-finite adapter would leak into rows that do not use it.
    Every row's output then depends only on its own adapter, exactly (its gradient too: ``where`` passes exact
    zeros to the unselected side).
    """
    cache = rows.cache
    if cache is not None:
        hit = cache.get((id(stacked), fill))
        if hit is not None and hit[0] is stacked:
            return hit[1]
    picked = take(stacked, rows.index, rows.sparse, None if rows.all_active else rows.active)
    if not rows.all_active:
        picked = torch.where(rows.active.view(-1, *(1,) * (picked.dim() - 1)), picked, fill)
    if cache is not None:
        cache[(id(stacked), fill)] = (stacked, picked)  # holds `stacked`: its id cannot be reused meanwhile
    return picked


def rows_for(rows: Rows, x: Tensor, path: str) -> Rows:
    """The selection for ``x`` (a layer's input in a mixed batch), whose first dimension must be the batch.

    With ``rows.repeat`` (``fwd.generate``), an input of ``m * B`` rows is the prompt batch expanded by
    ``repeat_interleave`` (beams, ``num_return_sequences``): each id then covers ``m`` consecutive rows.

    Raises:
        ValueError: ``x``'s leading dimension does not fit the batch size of ``adapter_ids``.
    """
    n, b = x.shape[0], rows.index.shape[0]
    if n == b:
        return rows
    if rows.repeat and b and n % b == 0:
        m = n // b
        cache = rows.cache
        expanded = None if cache is None else cache.get(("rows", m))
        if expanded is None:
            sub = None if cache is None else {}
            index, active = rows.index.repeat_interleave(m), rows.active.repeat_interleave(m)
            expanded = Rows(index, active, True, sub, rows.sparse, rows.all_active)
            if cache is not None:
                cache[("rows", m)] = expanded
        return expanded
    raise ValueError(
        f"Mixed batch: module {path!r} received an input with leading dimension {n}, but `adapter_ids` has {b} "
        "rows. Mixed batches need adapted layers whose inputs keep the batch as their first dimension "
        "(batch-first models)."
    )


class AdapterLayer(Protocol):
    """One adapted module's hyper-parameters and math. Instances are immutable and built once in ``adapt``."""

    kind: Kind

    def init(self, module: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Fresh adapter tensors for ``module`` (PEFT's names, shapes and initialisation)."""
        ...

    def forward(
        self, module: nn.Module, tensors: Mapping[str, Tensor], base: BaseForward, *args: Any, **kwargs: Any
    ) -> Any:
        """The adapted output; ``base(module, *args, **kwargs)`` is the module's own forward."""
        ...

    def effective_weight(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(W', b')`` in the kind's canonical layout such that ``_layers.run(module, kind, x, W', b')`` equals
        ``forward`` in eval mode: the reference for tests and the basis of merging."""
        ...


@dataclass(frozen=True)
class Method:
    """An adapter method: its config type, default targets, per-module layer factory and checkpoint names.

    ``make_layer(config, path, module, kind)`` returns the module's :class:`AdapterLayer`, or raises
    ``ValueError`` naming ``path`` when the method cannot adapt that module. ``peft_keys`` maps each tensor name
    of ``params`` to the suffix PEFT's checkpoints use after the module path (``"lora_A"`` -> ``"lora_A.weight"``).
    ``required(config, names)`` says which tensor names a complete entry must have, given the names it has.
    ``resolve(config, model)`` fills in what a config leaves to the model (IA3's default ``feedforward_modules``
    for a transformers architecture); the result only feeds ``make_layer``, the user's config is kept as given.
    ``to_checkpoint(config, path, entry)`` gives the tensors a checkpoint stores for one params entry (AdaLoRA: cut
    to the ranks its ``rank_pattern`` keeps, as PEFT's ``save_pretrained`` does).
    ``shared(config, modules, layers)`` (VeRA) gives tensors all layers read, kept once under the root entry
    ``params[""]`` (PEFT's ``base_model.<name>`` keys); layers with ``shared = True`` see them beside their own
    entry. ``fwd`` keeps these defaults too and uses them when a tree has no root entry (a checkpoint saved
    without them).
    """

    name: str
    config_type: type[AdapterConfig]
    default_targets: Mapping[str, list[str]]
    make_layer: Callable[[Any, str, nn.Module, Kind | None], AdapterLayer]
    peft_keys: Mapping[str, str]
    required: Callable[[Any, frozenset[str]], frozenset[str]]
    resolve: Callable[[Any, nn.Module], Any] = lambda config, model: config
    to_checkpoint: Callable[[Any, str, Mapping[str, Tensor]], Mapping[str, Tensor]] = lambda config, path, entry: entry
    shared: Callable[[Any, Mapping[str, nn.Module], Mapping[str, AdapterLayer]], dict[str, Tensor]] | None = None
    # Layers a config adds beside its targets' (LoRA's trainable tokens): ``extra_layers(config, model, layers)``.
    # A layer with an ``entry`` attribute other than its path reads that entry (a tied LM head) and has none.
    extra_layers: Callable[[Any, nn.Module, Mapping[str, AdapterLayer]], Mapping[str, AdapterLayer]] | None = None
    # ``loaded(config, params) -> params``: a checkpoint's entries as ``fwd`` takes them (PEFT's duplicate of a tied
    # head's trainable tokens dropped after checking it).
    loaded: Callable[[Any, dict[str, dict[str, Tensor]]], dict[str, dict[str, Tensor]]] | None = None


_REGISTRY: dict[type[AdapterConfig], Method] = {}


def register(method: Method) -> Method:
    _REGISTRY[method.config_type] = method
    return method


def build_layers(model: nn.Module, config: AdapterConfig, targets: list[str] | None = None) -> dict[str, AdapterLayer]:
    """One :class:`AdapterLayer` per adapted module of ``model`` (``targets``, default: as ``config`` selects).

    Raises:
        TypeError: ``config`` is not a funcpeft config.
        ValueError: a target matches nothing or a matched module cannot be adapted (the message names it).
    """
    from funcpeft._layers import kind_of
    from funcpeft._targeting import find_targets

    method = method_for(config)
    resolved = method.resolve(config, model)
    if targets is None:
        targets = find_targets(model, resolved, method.default_targets)
    modules = dict(model.named_modules())
    layers = {path: method.make_layer(resolved, path, modules[path], kind_of(modules[path])) for path in targets}
    if method.extra_layers is not None:
        extra = method.extra_layers(resolved, model, layers)
        if extra:
            layers = {p: extra[p] if p in extra else layers[p] for p in modules if p in layers or p in extra}
    return layers


def method_for_peft_type(peft_type: str) -> Method:
    """The registered method whose config has ``peft_type`` (PEFT's ``adapter_config.json`` field).

    Raises:
        ValueError: no registered method has that ``peft_type``.
    """
    for method in _REGISTRY.values():
        if method.config_type.peft_type == peft_type:
            return method
    known = ", ".join(sorted(c.peft_type for c in _REGISTRY))
    raise ValueError(f"`peft_type` {peft_type!r} is not supported by funcpeft (supported: {known}).")


def method_for(config: Any) -> Method:
    """The registered method for ``config``'s type.

    Raises:
        TypeError: ``config`` is not an instance of a registered config class.
    """
    method = _REGISTRY.get(type(config))
    if method is None:
        names = ", ".join(sorted(c.__name__ for c in _REGISTRY))
        raise TypeError(
            f"`config` must be a funcpeft adapter config ({names}), got {type(config).__module__}."
            f"{type(config).__qualname__}; build it with e.g. funcpeft.LoraConfig(...)."
        )
    return method
