"""The seed's mutating low-level API as a PEFT drop-in: ``inject_adapter_in_model`` and the adapter state dicts.

``inject_adapter_in_model(config, model)`` changes ``model`` in place the way PEFT 0.21's does, but built on
funcpeft's core: targets come from :func:`funcpeft._targeting.find_targets`, each adapted module's math is the
:class:`~funcpeft.methods.base.AdapterLayer` that ``funcpeft.adapt``'s ``fwd`` uses (one implementation, no
second copy). Unlike PEFT, no ``base_layer`` wrapper is inserted: an adapted module keeps its class name and its
own weight, as the seed page prints it. Its class becomes a one-off subclass (same ``__name__``) whose ``forward``
reads the adapter tensors from PEFT-named children (``lora_dropout``, ``lora_A``, ``lora_B``, ``lora_embedding_A``,
``lora_embedding_B`` and, for DoRA, ``lora_magnitude_vector``, all keyed by adapter name) and calls
``layer.forward(module, tensors, original_forward, x)``. Parameter names are therefore PEFT's for the adapter
(``linear.lora_A.default.weight``) and the module's own otherwise (``linear.weight`` where PEFT has
``linear.base_layer.weight``). ``modules_to_save`` gets the same treatment: the module keeps its weights (frozen)
and gains a ``modules_to_save`` ModuleDict of trainable copies, so trainable names are PEFT's
(``head.modules_to_save.default.weight``).

The state dicts use PEFT's keys exactly (``linear.lora_A.weight``, ``emb.lora_embedding_A``,
``lin.lora_magnitude_vector``, ``lin.base_layer.bias`` for ``bias="lora_only"``), computed by PEFT's own selection
rules on the model's parameter names translated to PEFT's layout, so a dict from ``peft.get_peft_model_state_dict``
on a PEFT-injected twin loads here and vice versa.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from funcpeft import _layers
from funcpeft._targeting import find_modules_to_save, find_targets
from funcpeft.config import AdapterConfig
from funcpeft.methods.base import AdapterLayer, build_layers, method_for

__all__ = ["get_peft_model_state_dict", "inject_adapter_in_model", "set_peft_model_state_dict"]

# Children every adapted module gets, in PEFT's order (the seed prints the empty embedding dicts on a Linear).
_CONTAINERS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_dropout", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"),
    "adalora": ("lora_dropout", "lora_A", "lora_B", "lora_E"),
}
# PEFT_TYPE_TO_PREFIX_MAPPING: how PEFT finds module paths in a state dict's keys (``inject(..., state_dict=)``).
_KEY_PREFIX: dict[str, str] = {"LORA": "lora_", "ADALORA": "lora_", "IA3": "ia3_"}
# Leaves held as ``<container>[name].weight`` (PEFT's nn.Linear/conv children); all others are parameters in
# ParameterDicts (``<container>[name]``), per method.
_MODULE_LEAVES: dict[str, frozenset[str]] = {"lora": frozenset({"lora_A", "lora_B", "lora_magnitude_vector"})}
_SAVED = "modules_to_save"


class DoraMagnitude(nn.Module):
    """Holds DoRA's magnitude as ``weight``, so its parameter is PEFT's ``lora_magnitude_vector.<name>.weight``."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


# ----- the one-off subclasses ----------------------------------------------------------------------------------
class _Adapted:
    """Mixed in before an adapted module's own class: ``forward`` runs the active adapter's method layer."""

    _funcpeft_layers: dict[str, AdapterLayer]  # adapter name -> the method's layer (carries r, scaling, ...)
    _funcpeft_leaves: dict[str, tuple[str, ...]]  # adapter name -> its tensor names (the layer's init keys)
    _funcpeft_containers: tuple[str, ...]
    _funcpeft_active: str

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's ``LoraLayer.active_adapters``: the adapter names this module runs (possibly absent from it)."""
        return [self._funcpeft_active]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        base = _ORIGINAL[type(self)].forward
        name = self._funcpeft_active
        layer = self._funcpeft_layers.get(name)
        if layer is None:
            return base(self, *args, **kwargs)
        return layer.forward(self, _adapter_tensors(self, name), base, *args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _rebuild, (_ORIGINAL[type(self)], _Adapted), self.__dict__


class _Saved:
    """Mixed in before a ``modules_to_save`` module's class: the active adapter's trainable copy runs, if any."""

    _funcpeft_active: str

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's ``ModulesToSaveWrapper.active_adapters``: the active adapter if this module has a copy for it."""
        return [self._funcpeft_active] if self._funcpeft_active in self._modules[_SAVED] else []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        saved = self._modules[_SAVED]
        if self._funcpeft_active in saved:
            return saved[self._funcpeft_active](*args, **kwargs)
        return _ORIGINAL[type(self)].forward(self, *args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _rebuild, (_ORIGINAL[type(self)], _Saved), self.__dict__


_ORIGINAL: dict[type, type] = {}  # one-off subclass -> the module's own class
_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(cls: type, mixin: type) -> type:
    """``cls`` with ``mixin`` in front, under the same name, so ``repr(model)`` reads as before (one per class)."""
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        sub = type(cls.__name__, (mixin, cls), {"__qualname__": cls.__qualname__, "__module__": cls.__module__})
        _ORIGINAL[sub] = cls
        _SUBCLASSES[key] = sub
    return _SUBCLASSES[key]


def _rebuild(cls: type, mixin: type) -> nn.Module:
    """Unpickle/deepcopy an adapted module: pickle finds ``cls`` by name, not the one-off subclass."""
    sub = _subclass(cls, mixin)
    return sub.__new__(sub)


def _adapter_tensors(module: nn.Module, name: str) -> dict[str, Tensor]:
    """The method's ``{tensor_name: Tensor}`` for adapter ``name``, read from the PEFT-named children."""
    out = {}
    for leaf in module._funcpeft_leaves[name]:
        container, _, attr = leaf.partition(".")
        held = module._modules[container][name]
        out[leaf] = getattr(held, attr or "weight") if isinstance(held, nn.Module) else held
    return out


# ----- building the children -------------------------------------------------------------------------------------
def _module_for(leaf: str, tensors: Mapping[str, Tensor], module: nn.Module, kind: _layers.Kind) -> nn.Module:
    """The PEFT-shaped module holding ``tensors[leaf]`` (and ``lora_B.bias``), built on meta and filled in."""
    t = tensors[leaf]
    if leaf == "lora_magnitude_vector":
        return DoraMagnitude(t)
    bias = leaf == "lora_B" and "lora_B.bias" in tensors
    if kind is _layers.Kind.CONV:
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[t.dim()]
        if leaf == "lora_A":  # the base's kernel, stride, padding and dilation, as the math (_layers.conv) uses
            child = conv(t.shape[1], t.shape[0], tuple(t.shape[2:]), module.stride, module.padding,
                         module.dilation, bias=False, padding_mode=module.padding_mode, device="meta")  # fmt: skip
        else:  # a 1x1 conv with the base's groups
            groups = module.groups
            child = conv(t.shape[1] * groups, t.shape[0], 1, groups=groups, bias=bias, device="meta")
    else:
        child = nn.Linear(t.shape[1], t.shape[0], bias=bias, device="meta")
    child.weight = nn.Parameter(t)
    if bias:
        child.bias = nn.Parameter(tensors["lora_B.bias"])
    return child


def _initial_tensors(module: nn.Module, layer: AdapterLayer) -> dict[str, Tensor]:
    """The method's fresh tensors (global RNG, as PEFT), in the base weight's dtype as PEFT's low-level API has them."""
    tensors = layer.init(module, None)
    for leaf in tensors:
        if "." in leaf and leaf != "lora_B.bias":
            raise NotImplementedError(f"funcpeft.compat cannot hold the tensor {leaf!r} of {type(layer).__name__} yet.")
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        tensors = {k: v.to(weight.dtype) for k, v in tensors.items()}
    return tensors


def _add_adapter(module: nn.Module, layer: AdapterLayer, tensors: dict[str, Tensor], method: str, name: str) -> None:
    """Turn ``module`` into an adapted module (once) and add adapter ``name`` holding ``tensors``."""
    if not isinstance(module, _Adapted):
        module._funcpeft_layers, module._funcpeft_leaves = {}, {}
        module._funcpeft_containers = _CONTAINERS.get(method, ())
        for container in module._funcpeft_containers:
            held_as_modules = container == "lora_dropout" or container in _MODULE_LEAVES.get(method, ())
            dict_type = nn.ModuleDict if held_as_modules else nn.ParameterDict
            module.add_module(container, dict_type())
        module.__class__ = _subclass(type(module), _Adapted)
    containers = module._modules
    module_leaves = _MODULE_LEAVES.get(method, frozenset())
    if "lora_dropout" in containers:
        p = float(getattr(layer, "dropout", 0.0))
        containers["lora_dropout"][name] = nn.Dropout(p) if p > 0.0 else nn.Identity()
    for leaf in tensors:
        container = leaf.partition(".")[0]
        if container == leaf and container not in containers:
            holder = nn.ModuleDict() if leaf in module_leaves else nn.ParameterDict()
            module.add_module(container, holder)
            module._funcpeft_containers += (container,)
        if leaf in module_leaves:
            containers[container][name] = _module_for(leaf, tensors, module, layer.kind)
        elif container == leaf:
            containers[container][name] = nn.Parameter(tensors[leaf])
    for container in module._funcpeft_containers:  # PEFT leaves its new modules in train mode; follow the module
        containers[container].train(module.training)
    module._funcpeft_layers[name] = layer
    module._funcpeft_leaves[name] = tuple(tensors)


def _add_saved(module: nn.Module, name: str) -> None:
    """PEFT's ``ModulesToSaveWrapper`` without the wrapper: a trainable copy of ``module`` under ``modules_to_save``."""
    clone = copy.deepcopy(module)
    if isinstance(clone, _Saved):  # a copy of the original only, not of the other adapters' copies
        del clone._modules[_SAVED]
        del clone._funcpeft_active
        clone.__class__ = _ORIGINAL[type(clone)]
    if not isinstance(module, _Saved):
        module.add_module(_SAVED, nn.ModuleDict().train(module.training))
        module.__class__ = _subclass(type(module), _Saved)
    module._modules[_SAVED][name] = clone.train(module.training)


# ----- inject ------------------------------------------------------------------------------------------------------
def _compat_modules(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    adapted, saved = {}, {}
    for path, module in model.named_modules():
        if isinstance(module, _Adapted):
            adapted[path] = module
        elif isinstance(module, _Saved):
            saved[path] = module
    return adapted, saved


def _internal(path: str, adapted: Mapping[str, nn.Module], saved: Mapping[str, nn.Module]) -> bool:
    """Whether ``path`` lies inside an adapter's own children (PEFT skips those when adding an adapter)."""
    for owner, module in adapted.items():
        if any(path == f"{owner}.{c}" or path.startswith(f"{owner}.{c}.") for c in module._funcpeft_containers):
            return True
    return any(path == f"{owner}.{_SAVED}" or path.startswith(f"{owner}.{_SAVED}.") for owner in saved)


def _targets_from_state_dict(
    model: nn.Module, config: AdapterConfig, method_targets: Any, state_dict: Mapping[str, Any], paths: list[str]
) -> list[str]:
    """PEFT's ``inject_adapter(state_dict=...)``: the module paths named by the keys, in module order."""
    prefix = _KEY_PREFIX.get(config.peft_type)
    if prefix is None:
        raise NotImplementedError(
            f"`state_dict`-based injection is not implemented for {type(config).__name__}; pass `state_dict=None` "
            "and let the config's `target_modules` choose the modules."
        )
    named = {k.rsplit("." + prefix, 1)[0].removeprefix("_orig_mod.") for k in state_dict}
    targets = [p for p in paths if p in named]
    if not targets:
        raise ValueError(
            f"No key of `state_dict` names a module of {type(model).__name__} (keys look like "
            f"{sorted(state_dict)[:3]}; they must read '<module path>.{prefix}...', as get_peft_model_state_dict "
            "writes)."
        )
    try:
        from_config = set(find_targets(model, config, method_targets))
    except ValueError:
        from_config = set()
    extra_config, extra_dict = sorted(from_config - set(targets)), sorted(set(targets) - from_config)
    if extra_config or extra_dict:  # PEFT's warning, same category
        warnings.warn(
            "While injecting the adapter, the config and `state_dict` disagree on the targets; `state_dict` wins. "
            f"Only in the config: {extra_config}. Only in `state_dict`: {extra_dict}.",
            RuntimeWarning,
            stacklevel=3,
        )
    return targets


def inject_adapter_in_model(
    peft_config: AdapterConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """Inject an adapter into ``model`` in place, as ``peft.inject_adapter_in_model`` does, and return ``model``.

    Each target keeps its class name and weight and gains PEFT's adapter children (see the module docstring); its
    ``forward`` is the method's (the same object ``funcpeft.adapt``'s ``fwd`` uses). Trainability is PEFT's: on the
    first injection every base parameter is frozen, except biases with ``bias="all"`` (every ``*.bias``) or
    ``bias="lora_only"`` (the adapted modules' biases), and ``modules_to_save`` get trainable copies. A later call
    with another ``adapter_name`` adds a second adapter; as in PEFT it becomes the active one in *every* adapted
    module (modules only the earlier adapter adapts then run their base forward) and no existing parameter changes
    its ``requires_grad``. ``model.peft_config`` maps adapter names to their configs, as PEFT sets it.

    Args:
        peft_config: a funcpeft adapter config, e.g. :class:`funcpeft.LoraConfig` (``peft.LoraConfig`` is refused:
            funcpeft's accepts the same arguments).
        model: any ``torch.nn.Module``; modified in place.
        adapter_name: the key of the new adapter in every adapter ModuleDict.
        low_cpu_mem_usage: accepted for PEFT compatibility and ignored (funcpeft builds the adapter children on the
            meta device and fills them with the initial tensors directly).
        state_dict: if given, only its keys choose the adapted modules (``<path>.lora_...``), as in PEFT; a
            ``RuntimeWarning`` names the modules where it and the config disagree. Its values are not used.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``peft_config`` is not a funcpeft config, or ``model`` not a module.
        ValueError: the targets or ``modules_to_save`` are invalid (as in ``funcpeft.adapt``), ``adapter_name``
            already exists, or a target overlaps another adapter's ``modules_to_save``. Nothing is changed then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if type(peft_config).__module__.split(".")[0] == "peft":
        raise TypeError(
            f"`peft_config` is a {type(peft_config).__module__}.{type(peft_config).__qualname__}; funcpeft's "
            f"inject_adapter_in_model takes funcpeft's configs: build it as funcpeft.{type(peft_config).__name__}"
            "(...) with the same arguments."
        )
    method = method_for(peft_config)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"`adapter_name` must be a non-empty string without '.', got {adapter_name!r}.")
    configs = getattr(model, "peft_config", None)
    if configs is not None and not (
        isinstance(configs, dict) and all(isinstance(c, AdapterConfig) for c in configs.values())
    ):
        raise ValueError(
            f"`model` already carries adapters injected by another library (its `peft_config` is {configs!r}); "
            "inject into a fresh model."
        )
    if configs and adapter_name in configs:
        raise ValueError(
            f"`model` already has an adapter named {adapter_name!r} (adapters: {list(configs)}); pass another "
            "`adapter_name`. (PEFT silently re-initialises it in the modules the new config targets.)"
        )
    del low_cpu_mem_usage  # see the docstring

    adapted, saved = _compat_modules(model)
    modules = dict(model.named_modules())
    paths = [p for p in modules if p and not _internal(p, adapted, saved)]
    if state_dict is not None:
        targets = _targets_from_state_dict(model, peft_config, method.default_targets, state_dict, paths)
    else:
        base_paths = set(paths)
        targets = [p for p in find_targets(model, peft_config, method.default_targets) if p in base_paths]
        if not targets:
            raise ValueError(
                f"`target_modules` only matched modules inside existing adapters of {type(model).__name__}; "
                "name the base modules to adapt."
            )
    to_save = find_modules_to_save(model, getattr(peft_config, "modules_to_save", None))
    for path in targets:
        owner = next((s for s in saved if path == s or path.startswith(s + ".")), None)
        if owner is not None or path in to_save:
            raise ValueError(
                f"Module {path!r} is a target of adapter {adapter_name!r} but also kept in full by "
                f"`modules_to_save` ({owner or path!r}); funcpeft does not adapt a module it saves in full. "
                "Remove it from `target_modules` or add it to `exclude_modules`."
            )
    for path in to_save:
        inner = [p for p in adapted if p == path or p.startswith(path + ".")]
        if inner:
            raise ValueError(
                f"`modules_to_save` entry {path!r} is (or contains) the adapted module(s) {inner[:3]}; funcpeft "
                "does not keep full copies of adapted modules. Save another module or inject into a fresh model."
            )
    new_children = {p: _CONTAINERS.get(method.name, ()) for p in targets if not isinstance(modules[p], _Adapted)}
    new_children.update({p: (_SAVED,) for p in to_save if not isinstance(modules[p], _Saved)})
    for path, children in new_children.items():
        taken = [c for c in children if hasattr(modules[path], c)]
        if taken:
            raise ValueError(
                f"Module {path!r} ({type(modules[path]).__name__}) already has attribute(s) {taken}, which the "
                "adapter needs for its PEFT-named children; rename them or leave the module out."
            )
    # Every check, make_layer and init runs before the first change to the model.
    layers = build_layers(model, peft_config, targets)
    tensors = {p: _initial_tensors(modules[p], layer) for p, layer in layers.items()}

    first = not adapted  # PEFT: the first injection freezes the base; later ones keep every existing flag
    before = [(p, p.requires_grad) for p in model.parameters()]
    for path, layer in layers.items():
        _add_adapter(modules[path], layer, tensors[path], method.name, adapter_name)
    for path in to_save:
        _add_saved(modules[path], adapter_name)
    if configs is None:
        configs = model.peft_config = {}
    configs[adapter_name] = peft_config
    adapted, saved = _compat_modules(model)
    for module in (*adapted.values(), *saved.values()):
        module._funcpeft_active = adapter_name
    _mark_trainable(model, peft_config, adapter_name, adapted, saved)
    if not first:
        for p, flag in before:
            p.requires_grad_(flag)
    return model


def _mark_trainable(
    model: nn.Module,
    config: AdapterConfig,
    name: str,
    adapted: Mapping[str, nn.Module],
    saved: Mapping[str, nn.Module],
) -> None:
    """PEFT's ``_mark_only_adapters_as_trainable`` + ``set_adapter`` + ``ModulesToSaveWrapper`` flags."""
    managed: set[int] = set()
    for module in adapted.values():
        for container in module._funcpeft_containers:
            for key, p in module._modules[container].named_parameters():
                p.requires_grad_(key.partition(".")[0] == name)
                managed.add(id(p))
    for module in saved.values():
        managed.update(id(p) for p in module.parameters())
    for p in model.parameters():
        if id(p) not in managed:
            p.requires_grad_(False)
    bias = getattr(config, "bias", "none")
    if bias == "all":
        for key, p in model.named_parameters():
            if key == "bias" or key.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for module in adapted.values():
            if module._parameters.get("bias") is not None:
                module._parameters["bias"].requires_grad_(True)
    for module in saved.values():
        copies = module._modules[_SAVED]
        copied = {id(p) for p in copies.parameters()}
        for p in module.parameters():
            if id(p) not in copied:
                p.requires_grad_(False)
        for key, copy_ in copies.items():
            copy_.requires_grad_(key == name)


# ----- state dicts ---------------------------------------------------------------------------------------------------
class _Entry(NamedTuple):
    key: str  # the model's own state-dict key
    tensor: Tensor


def _peft_names(model: nn.Module) -> tuple[dict[str, str], list[str], dict[str, nn.Module]]:
    """``(own key -> PEFT's key, PEFT-layout prefixes of the adapter children, modules_to_save by PEFT path)``."""
    adapted, saved = _compat_modules(model)
    inserted = {p: ("base_layer", m._funcpeft_containers) for p, m in adapted.items()}
    inserted.update({p: ("original_module", (_SAVED,)) for p in saved})

    def peft_key(key: str) -> str:
        parts, out = key.split("."), []
        for i, part in enumerate(parts):
            info = inserted.get(".".join(parts[:i])) if i else None
            if info is not None and part not in info[1]:
                out.append(info[0])
            out.append(part)
        return ".".join(out)

    names = {key: peft_key(key) for key in model.state_dict(keep_vars=True)}
    prefixes = [peft_key(f"{p}.{c}") for p, m in adapted.items() for c in m._funcpeft_containers]
    return names, prefixes, {peft_key(p): m for p, m in saved.items()}


def _remove_adapter_name(key: str, name: str) -> str:
    """PEFT's ``_remove_adapter_name_from_state_dict_key``: ``x.lora_A.default.weight`` -> ``x.lora_A.weight``."""
    if "." not in key:
        return key
    if key.endswith(f".{name}"):
        return key.removesuffix(f".{name}")
    head, _, suffix = key.rpartition(".")
    return f"{re.sub(re.escape('.' + name) + '$', '', head)}.{suffix}"


def _adapter_entries(
    model: nn.Module, adapter_name: str, state_dict: Mapping[str, Tensor] | None = None
) -> dict[str, _Entry]:
    """PEFT's key -> the model's entry, selected by PEFT's ``get_peft_model_state_dict`` rules (in its order)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        have = list(configs) if isinstance(configs, dict) else []
        raise ValueError(
            f"`model` has no adapter named {adapter_name!r} injected by funcpeft.inject_adapter_in_model "
            f"(its adapters: {have}); inject one first or pass one of those names as `adapter_name`."
        )
    config = configs[adapter_name]
    if not isinstance(config, AdapterConfig):
        raise TypeError(
            f"The adapter {adapter_name!r} of `model` was injected by {type(config).__module__.split('.')[0]}, not "
            "funcpeft; use that library's get/set_peft_model_state_dict."
        )
    names, prefixes, saved = _peft_names(model)
    own = model.state_dict() if state_dict is None else state_dict
    others = [n for n in configs if n != adapter_name]
    # PEFT's filter for the other adapters' names, applied to the PEFT-layout keys.
    state = {
        names.get(k, k): _Entry(k, v)
        for k, v in own.items()
        if not any(f".{n}." in names.get(k, k) or names.get(k, k).endswith(f".{n}") for n in others)
    }
    out = {k: e for k, e in state.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}
    bias = getattr(config, "bias", "none")
    if bias == "all":
        out.update({k: e for k, e in state.items() if k == "bias" or k.endswith(".bias")})
    elif bias == "lora_only":
        adapted = {names.get(f"{p}.bias") for p, m in model.named_modules() if isinstance(m, _Adapted)}
        out.update({k: e for k, e in state.items() if k in adapted})
    for path, module in saved.items():  # ModulesToSaveWrapper.adapter_state_dict
        if adapter_name in module._modules[_SAVED]:
            inner = f"{path}.{_SAVED}.{adapter_name}."
            out.update({f"{path}.{k[len(inner) :]}": e for k, e in state.items() if k.startswith(inner)})
    dora_suffix = f"lora_magnitude_vector.{adapter_name}.weight"
    if getattr(config, "use_dora", False):  # LoraModel._get_adapter_state_dict keeps the pre-ModuleDict key
        out = {k.removesuffix(".weight") if k.endswith(dora_suffix) else k: e for k, e in out.items()}
    return {_remove_adapter_name(k, adapter_name): e for k, e in out.items()}


def get_peft_model_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor] | None = None, adapter_name: str = "default"
) -> dict[str, Tensor]:
    """The adapter's tensors with PEFT's keys, as ``peft.get_peft_model_state_dict`` returns them.

    Keys are PEFT's checkpoint keys without the adapter name: ``linear.lora_A.weight``, ``emb.lora_embedding_A``,
    ``lin.lora_magnitude_vector`` (DoRA), ``lin.lora_B.bias`` (``lora_bias``), ``head.weight`` for a
    ``modules_to_save`` copy, and biases per ``bias``: with ``"all"`` every ``*.bias`` of the model (an adapted
    module's as ``<path>.base_layer.bias``, a saved module's original and copy as PEFT names them), with
    ``"lora_only"`` the adapted modules' ``<path>.base_layer.bias``. Values share storage with the model, as
    ``model.state_dict()``'s do. Unlike PEFT's ``save_embedding_layers="auto"``, the base embedding weights are
    never added when ``target_modules`` names ``embed_tokens``/``lm_head``: the adapter does not change them.

    Args:
        model: a model adapted by :func:`inject_adapter_in_model`.
        state_dict: the model's state dict to read (default ``model.state_dict()``), in the model's own keys.
        adapter_name: which adapter.

    Returns:
        ``{peft_key: Tensor}``.

    Raises:
        ValueError: ``model`` has no funcpeft adapter named ``adapter_name``.
    """
    return {k: e.tensor for k, e in _adapter_entries(model, adapter_name, state_dict).items()}


def set_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: Mapping[str, Tensor], adapter_name: str = "default"
) -> _IncompatibleKeys:
    """Load a PEFT-keyed adapter state dict (from either library) into adapter ``adapter_name`` in place.

    The inverse of :func:`get_peft_model_state_dict`; keys may carry PEFT's ``base_model.model.`` prefix. Unlike
    PEFT (which loads with ``strict=False`` and ignores what does not fit), every key must be one the adapter has,
    and all of them must be present with the model's shapes; otherwise nothing is loaded.

    Args:
        model: a model adapted by :func:`inject_adapter_in_model`.
        peft_model_state_dict: ``{peft_key: Tensor}``; values are copied (cast to the parameters' dtypes).
        adapter_name: the adapter to load into (need not be the name it was saved under).

    Returns:
        torch's ``_IncompatibleKeys`` with empty lists, as PEFT returns the ``load_state_dict`` result.

    Raises:
        ValueError: unexpected or missing keys, or a tensor whose shape differs from the model's (the message
            names the key, the module path and both shapes). The model is unchanged then.
        TypeError: a value is not a Tensor.
    """
    expected = _adapter_entries(model, adapter_name)
    given: dict[str, Any] = {}
    for key, value in peft_model_state_dict.items():
        stripped = key.removeprefix("base_model.model.")
        given[stripped if stripped in expected else key] = value
    unexpected = sorted(given.keys() - expected.keys())
    missing = sorted(expected.keys() - given.keys())
    if unexpected or missing:
        raise ValueError(
            f"`peft_model_state_dict` does not fit adapter {adapter_name!r} of {type(model).__name__}: unexpected "
            f"keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, missing keys {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}. Was it saved from a model with the same config?"
        )
    for key, value in given.items():
        target = expected[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"`peft_model_state_dict[{key!r}]` must be a Tensor, got {type(value).__name__}.")
        if value.shape != target.tensor.shape:
            module = target.key.rsplit(".", 1)[0]
            raise ValueError(
                f"`peft_model_state_dict[{key!r}]` has shape {tuple(value.shape)}, but module {module!r} holds "
                f"{tuple(target.tensor.shape)} there ({target.key}); r, kernel and features must match the model."
            )
    live = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key in expected:  # PEFT's order: a modules_to_save copy's own key wins over a bias="all" alias
            live[expected[key].key].copy_(given[key])
    return _IncompatibleKeys([], [])
