"""``inject_adapter_in_model``: PEFT's mutating injection, on funcpeft's method layers."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from funcpeft._targeting import find_modules_to_save, find_targets
from funcpeft.compat._modules import (
    _CONTAINERS,
    _KEY_PREFIX,
    _SAVED,
    _Adapted,
    _add_adapter,
    _add_saved,
    _initial_tensors,
    _Saved,
)
from funcpeft.config import AdapterConfig
from funcpeft.methods.base import build_layers, method_for

__all__ = ["inject_adapter_in_model"]


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
