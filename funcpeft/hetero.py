"""Heterogeneous adapters: one ``fwd`` over K LoRA configs that differ per adapter, for mixed batches.

``params, fwd = funcpeft.adapt(model, [config_1, ..., config_K])`` serves (and trains) K adapters trained
separately, with different ranks, alphas, rsLoRA, targets, rank/alpha patterns, DoRA, ``lora_bias`` or dropout,
in one batch: ``fwd(stacked, x, adapter_ids=ids)`` and ``fwd.generate(stacked, ..., adapter_ids=ids)`` run row
``i`` with adapter ``ids[i]`` exactly as that adapter runs alone under its own config (a module it does not target
is the base for its rows; ``-1`` is the base model).

The stacked tree is packed by rank, not padded (:mod:`funcpeft.methods.packed`): it holds exactly the sum of the
adapters' own tensors. Its layout is an implementation detail; build it with ``fwd.stack([params_1, ...])`` from
each adapter's own params (as ``adapt`` on its own config or ``funcpeft.load`` return them) and take it apart with
``fwd.unstack`` (an exact round trip); gradients with respect to it unstack the same way.

Decided here (see the README): a heterogeneous tree has no common adapter dimension, so ``torch.func.vmap`` cannot
map over it; ``fwd`` then says so and names the mixed-batch equivalent. Options that are not per-row (``bias``
other than ``"none"``, ``modules_to_save``: full trained copies) and methods other than LoRA are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from funcpeft._check import Validator
from funcpeft._preflight import unwrap_compiled
from funcpeft._targeting import saved_modules
from funcpeft._trees import check_untransformed
from funcpeft.config import AdapterConfig, LoraConfig
from funcpeft.core import Adapted, Params
from funcpeft.methods.base import build_layers
from funcpeft.methods.lora import LoraLayer
from funcpeft.methods.lora_init import is_residual
from funcpeft.methods.packed import PackedLora

__all__ = ["Heterogeneous", "adapt_many"]

# Options that must keep their default: they train full copies of base tensors, which a row cannot choose.
_NOT_PER_ROW = {"bias": "none", "modules_to_save": None}


class Heterogeneous(Adapted):
    """The ``fwd`` of ``funcpeft.adapt(model, [configs])``: K adapters with their own configs, in mixed batches.

    Attributes:
        configs: the K configs, in adapter order (adapter ``k`` is ``adapter_ids == k``).
        targets: the modules any adapter adapts, in module order.
    """

    def __init__(self, model: nn.Module, configs: Sequence[LoraConfig], own: list[dict[str, LoraLayer]]) -> None:
        self._configs: tuple[LoraConfig, ...] = tuple(configs)
        self._own = own
        modules = dict(model.named_modules())
        packed = {
            path: PackedLora(
                path,
                {k: layers[path] for k, layers in enumerate(own) if path in layers},
                len(own),
                modules[path].weight.device,
            )
            for path in modules
            if any(path in layers for layers in own)
        }
        self._own_validators: list[Validator] = []
        super().__init__(model, configs[0], packed)

    @property
    def configs(self) -> tuple[LoraConfig, ...]:  # type: ignore[override]
        """The K configs, in adapter order."""
        return self._configs

    @property
    def config(self) -> AdapterConfig:  # type: ignore[override]
        raise AttributeError(
            f"A heterogeneous fwd holds {len(self.configs)} configs; read them from `fwd.configs` (adapter k's is "
            "fwd.configs[k])."
        )

    @config.setter
    def config(self, value: AdapterConfig) -> None:  # Adapted.__init__ assigns it; the configs are kept instead
        pass

    # ----- params ---------------------------------------------------------------------------------------------
    def init(self, generator: torch.Generator | None = None) -> Params:
        """K fresh adapters, packed: adapter k as ``funcpeft.adapt(model, configs[k])`` would initialise it (drawn in
        adapter order from ``generator``)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")
        trees = []
        with torch.no_grad():
            for layers in self._own:
                tree = {p: layers[p].init(self._modules[p], generator) for p in self._modules if p in layers}
                trees.append(tree)
        if not self._own_validators:
            shapes = [{p: {n: t.shape for n, t in e.items()} for p, e in tree.items()} for tree in trees]
            self._own_validators = [Validator(s, self._modules) for s in shapes]
            packed_shapes = {
                path: layer.shapes({m.k: shapes[m.k][path] for m in layer.members})
                for path, layer in self._layers.items()
            }
            self._validator = Validator(packed_shapes, self._modules)
        return self._pack(trees)

    def stack(self, list_of_params: Sequence[Mapping[str, Mapping[str, Tensor]]]) -> Params:
        """The stacked (rank-packed) tree of K adapters from each one's own params, ``list_of_params[k]`` for
        ``configs[k]``: fresh leaf tensors with ``requires_grad=True``, sharing no storage with the inputs.

        Raises:
            TypeError: not a list of adapter dicts.
            ValueError: not K of them, or adapter k's params do not fit ``configs[k]`` (named), or adapters that
                share a module differ in dtype or device there, or it is called inside ``torch.func.grad`` / ``vmap``.
        """
        check_untransformed("fwd.stack")
        if isinstance(list_of_params, Mapping) or not isinstance(list_of_params, Sequence):
            raise TypeError(
                f"`list_of_params` must be a list of {len(self.configs)} adapter dicts (one per config), got "
                f"{type(list_of_params).__name__}."
            )
        if len(list_of_params) != len(self.configs):
            raise ValueError(
                f"`list_of_params` has {len(list_of_params)} adapters, but this fwd was built for "
                f"{len(self.configs)} configs; pass one params tree per config, in the order of fwd.configs."
            )
        for k, (params, validator) in enumerate(zip(list_of_params, self._own_validators, strict=True)):
            try:
                validator.check(params)
            except (TypeError, ValueError) as err:
                raise type(err)(f"`list_of_params[{k}]` does not fit `fwd.configs[{k}]`: {err}") from None
        for path, layer in self._layers.items():
            facts = {(list_of_params[m.k][path][n].dtype, list_of_params[m.k][path][n].device) for m in layer.members
                     for n in list_of_params[m.k][path]}  # fmt: skip
            if len(facts) > 1:
                raise ValueError(
                    f"The adapters that adapt {path!r} hold its tensors in different dtypes or devices "
                    f"({sorted(map(str, facts))}); a packed stack needs one. Convert them first, e.g. "
                    "`{p: {n: t.float() ...}}`."
                )
        return self._pack(list_of_params)

    def unstack(self, stacked: Mapping[str, Mapping[str, Tensor]]) -> list[Params]:
        """Each adapter's own params from the stacked tree (or from a gradient of it): ``[params_1, ..., params_K]``
        in their own shapes, fresh leaf tensors with ``requires_grad=True`` (exactly ``stack``'s inputs). Sparse
        gradients (``sparse_grad=True``) come back dense, in each adapter's own shapes."""
        check_untransformed("fwd.unstack")
        self._validator.check(stacked)
        with torch.no_grad():
            trees: list[Params] = [{} for _ in self.configs]
            for path, layer in self._layers.items():
                entry = {n: t.to_dense() if t.layout != torch.strided else t for n, t in stacked[path].items()}
                for member in layer.members:
                    own = layer.unpack(entry, member)
                    trees[member.k][path] = {n: t.detach().clone().requires_grad_(True) for n, t in own.items()}
        order = list(self._modules)
        return [dict(sorted(tree.items(), key=lambda item: order.index(item[0]))) for tree in trees]

    def _pack(self, trees: Sequence[Mapping[str, Mapping[str, Tensor]]]) -> Params:
        with torch.no_grad():
            return {
                path: {
                    name: t.requires_grad_(True)
                    for name, t in layer.pack([_detached(trees[m.k][path]) for m in layer.members]).items()
                }
                for path, layer in self._layers.items()
            }

    # ----- calls -----------------------------------------------------------------------------------------------
    def _refuse_call(self, params: Any, adapter_ids: Tensor | None) -> None:
        """The calls a heterogeneous ``fwd`` refuses, eagerly (``fwd.compile`` runs this too when a traced call
        fails, so its error is this one rather than dynamo's)."""
        if params is not None:
            if _vmapped(params):
                raise ValueError(
                    "torch.func.vmap cannot map over a heterogeneous stacked tree: its adapters are packed by rank "
                    "(no padding), so its tensors have no common adapter dimension. Run every adapter on the same "
                    "input as one mixed batch instead: fwd(stacked, x.repeat(K, 1), adapter_ids="
                    "torch.arange(K).repeat_interleave(x.shape[0])), or vmap a same-config stack (funcpeft.stack)."
                )
            if adapter_ids is None:
                raise ValueError(
                    f"A heterogeneous fwd runs its stacked tree of {len(self.configs)} adapters in mixed batches: "
                    "pass `adapter_ids` (one adapter index per batch row, -1 for the base model). To run one "
                    "adapter alone, use fwd.unstack(stacked)[k] with funcpeft.adapt(model, fwd.configs[k])."
                )

    def _run(
        self,
        params: Any,
        adapter_ids: Tensor | None,
        call: Callable[..., Any],
        view: nn.Module | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        repeat: bool = False,
        sparse: bool = False,
        checked: bool = False,
    ) -> Any:
        self._refuse_call(params, adapter_ids)
        return super()._run(params, adapter_ids, call, view, args, kwargs, repeat, sparse, checked)

    def _stack_size(self, params: Any) -> int:
        self._validator.check(params)
        return len(self.configs)

    def merge(self, params: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
        raise ValueError(
            f"A heterogeneous fwd holds {len(self.configs)} adapters, and a merged state dict holds one: merge "
            "adapter k alone with funcpeft.adapt(model, fwd.configs[k])[1].merge(fwd.unstack(stacked)[k])."
        )

    def __repr__(self) -> str:
        return (
            f"<funcpeft.Heterogeneous {len(self.configs)} LoraConfigs on {type(self.model).__name__}: "
            f"{len(self.targets)} adapted modules>"
        )


def _detached(entry: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach() for name, t in entry.items()}


def _vmapped(params: Any) -> bool:
    """Whether ``params``' leaves are being mapped over by ``torch.func.vmap``."""
    try:
        leaf = next(t for entry in params.values() for t in entry.values())
    except (AttributeError, StopIteration, TypeError):
        return False
    return isinstance(leaf, Tensor) and torch._C._functorch.is_batchedtensor(leaf)


def check_configs(configs: Any) -> list[LoraConfig]:
    """``configs`` as a list of LoRA configs that can share a mixed batch.

    Raises:
        TypeError: not a non-empty list of funcpeft configs.
        ValueError: configs of different methods, a method other than LoRA, or an option that cannot differ per
            row (``bias``, ``modules_to_save``), naming the config's index and the option.
    """
    if isinstance(configs, (str, bytes)) or not isinstance(configs, Sequence):
        raise TypeError(f"`config` must be a funcpeft config or a list of them, got {type(configs).__name__}.")
    if not configs:
        raise ValueError("`config` is an empty list; pass at least one adapter config.")
    for k, config in enumerate(configs):
        if not isinstance(config, AdapterConfig):
            raise TypeError(
                f"`config[{k}]` must be a funcpeft adapter config (e.g. funcpeft.LoraConfig), got "
                f"{type(config).__name__}."
            )
    kinds = {type(c) for c in configs}
    if len(kinds) > 1:
        raise ValueError(
            f"The configs mix methods ({sorted(c.__name__ for c in kinds)}); one fwd runs adapters of one method. "
            "Build one fwd per method."
        )
    if kinds != {LoraConfig}:
        raise ValueError(
            f"Heterogeneous adapters (a list of configs) are supported for LoraConfig; got {kinds.pop().__name__}. "
            "For adapters of one such config, stack them with funcpeft.stack and adapt with that config."
        )
    for k, config in enumerate(configs):
        for name, default in _NOT_PER_ROW.items():
            if getattr(config, name) != default:
                raise ValueError(
                    f"`config[{k}].{name}` is {getattr(config, name)!r}: it trains full copies of base tensors, which "
                    f"cannot differ per row of a mixed batch. Heterogeneous adapters need {name}={default!r}."
                )
        if getattr(config, "trainable_token_indices", None) is not None:
            raise ValueError(
                f"`config[{k}].trainable_token_indices` is set; heterogeneous stacks do not carry trainable tokens "
                "yet. Stack adapters of one config (funcpeft.stack: mixed batches support them), or drop the field."
            )
    return list(configs)


def adapt_many(
    model: nn.Module, configs: Sequence[LoraConfig], generator: torch.Generator | None = None
) -> tuple[Params, Heterogeneous]:
    """``funcpeft.adapt(model, [configs])``: see the module docstring."""
    configs = check_configs(configs)
    model = unwrap_compiled(model)
    for k, config in enumerate(configs):
        heads = saved_modules(model, config)
        if heads:
            raise ValueError(
                f"`config[{k}].task_type` is {config.task_type!r}, so it trains the task head {heads[:3]} in full (as "
                "PEFT's task models do), which cannot differ per row of a mixed batch. Use task_type=None for "
                "heterogeneous adapters (train the heads apart)."
            )
    built: list[tuple[LoraConfig, dict[str, LoraLayer]]] = []  # equal configs share their layers
    own = []
    for k, config in enumerate(configs):
        layers = next((layers for seen, layers in built if seen == config), None)
        if layers is None:
            try:
                layers = build_layers(model, config)
            except ValueError as err:
                raise ValueError(f"`config[{k}]`: {err}") from None
            if config.target_parameters:
                raise ValueError(
                    f"`config[{k}]` sets `target_parameters` ({list(config.target_parameters)[:3]}); heterogeneous "
                    "stacks serve mixed batches, which parameter adapters cannot vary per row. Use "
                    "funcpeft.adapt(model, config) per adapter, or vmap over a funcpeft.stack of adapters with one "
                    "config."
                )
            if is_residual(config.init_lora_weights):
                raise ValueError(
                    f"`config[{k}]` has `init_lora_weights={config.init_lora_weights!r}`; heterogeneous stacks do not "
                    "carry PiSSA/OLoRA's initial factors yet. Use funcpeft.adapt(model, config) per adapter, or "
                    "funcpeft.stack of adapters with one config."
                )
            for path, layer in layers.items():
                if not isinstance(layer, LoraLayer):
                    raise ValueError(
                        f"`config[{k}]` adapts the nn.MultiheadAttention {path!r}; heterogeneous stacks do not support "
                        "it yet. Exclude it, or stack adapters of one config (funcpeft.stack)."
                    )
                if layer.groups > 1:
                    raise ValueError(
                        f"`config[{k}]` adapts the grouped convolution {path!r} (groups={layer.groups}); heterogeneous "
                        "stacks do not support grouped convolutions yet. Exclude it (`exclude_modules`)."
                    )
            built.append((config, layers))
        own.append(layers)
    fwd = Heterogeneous(model, configs, own)
    return fwd.init(generator), fwd
