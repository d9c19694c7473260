"""``inject_adapter_in_model``: PEFT's mutating injection, on funcpeft's method layers."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from funcpeft._layers import Kind
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
    _saved_copy,
    _Undo,
    _unwrap_compiled,
)
from funcpeft.config import AdapterConfig
from funcpeft.methods.base import build_layers, method_for
from funcpeft.methods.lora_init import is_residual

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
        from_config = set(find_targets(model, config, method_targets, task_heads=False))
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


def _check_new_adapter(config: AdapterConfig, name: str, configs: Mapping[str, AdapterConfig]) -> None:
    """PEFT's ``_check_new_adapter_config`` for a second adapter, in funcpeft's words.

    ``BaseTuner``: at most one adapter with ``bias != "none"``. ``AdaLoraModel``: at most one trainable adapter,
    counting every adapter the model has (a LoRA one too); funcpeft's configs have no ``inference_mode``, so every
    adapter counts.
    """
    bias = getattr(config, "bias", "none")
    with_bias = [(n, c.bias) for n, c in configs.items() if getattr(c, "bias", "none") != "none"]
    if bias != "none" and with_bias:
        other, other_bias = with_bias[0]
        raise ValueError(
            f"Adapter {name!r} has `bias={bias!r}`, but adapter {other!r} has `bias={other_bias!r}`: as PEFT's "
            "LoraModel, funcpeft supports only 1 adapter with bias (both would train the same base biases). Set "
            f"`bias='none'` for adapter {name!r}."
        )
    if config.peft_type == "ADALORA" and configs:
        raise ValueError(
            f"AdaLoRA supports only one trainable adapter (as PEFT's AdaLoraModel: its rank budget is allocated over "
            f"one adapter), but the model already has adapter(s) {list(configs)}, so AdaLoRA adapter {name!r} cannot "
            "be added. funcpeft's configs are always trainable (PEFT's `inference_mode=True` has no counterpart); "
            "inject the AdaLoRA adapter into a fresh model, or use funcpeft.adapt for several adapters."
        )


def _check_one_method(
    modules: Mapping[str, nn.Module], targets: list[str], configs: Mapping[str, AdapterConfig], method: str, name: str
) -> None:
    """One method per module: PEFT turns a LoRA config on an AdaLoRA module into an AdaLoRA adapter, silently."""
    for path in targets:
        for other in getattr(modules[path], "_funcpeft_layers", {}):
            other_method = method_for(configs[other]).name if other in configs else method
            if other_method != method:
                raise ValueError(
                    f"Module {path!r} already holds the {other_method} adapter {other!r}; funcpeft cannot add the "
                    f"{method} adapter {name!r} to it (one method per module; PEFT would silently run it as "
                    f"{other_method} or nest the layers). Leave it out, e.g. `exclude_modules=[{path!r}]`, or inject "
                    "into a fresh model."
                )


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
    module (modules only the earlier adapter adapts then run their base forward), a module that already keeps
    ``modules_to_save`` copies gets the new copy inactive and frozen and runs its own forward (PEFT's
    ``_set_adapter`` + ``ModulesToSaveWrapper.update``), and no existing parameter changes its ``requires_grad``.
    A second adapter is refused where PEFT refuses it: two adapters with a ``bias``, or an AdaLoRA adapter next to
    another one. ``model.peft_config`` maps adapter names to their configs, as PEFT sets it.

    All or nothing: every check, the initial tensors and the ``modules_to_save`` copies are made before the model
    changes, and if anything still fails (or is interrupted) while applying, the model is restored exactly: same
    classes, children, parameter objects and values, ``requires_grad`` flags and ``peft_config`` (PEFT leaves it
    half-injected).

    A ``torch.compile``-d model (an ``OptimizedModule``) is adapted through the module it wraps, as PEFT does: targets
    are matched on that module's paths (so a regex ``target_modules`` matches as on the plain model, where PEFT's
    matches nothing), the compiled model recompiles on its next call, and its state dict keys keep ``_orig_mod.``.

    Args:
        peft_config: a funcpeft adapter config, e.g. :class:`funcpeft.LoraConfig` (``peft.LoraConfig`` is refused:
            funcpeft's accepts the same arguments).
        model: any ``torch.nn.Module`` (also a compiled one); modified in place.
        adapter_name: the key of the new adapter in every adapter ModuleDict.
        low_cpu_mem_usage: accepted for PEFT compatibility and ignored. PEFT then creates the adapter weights on the
            meta device, to be filled by ``set_peft_model_state_dict(..., low_cpu_mem_usage=True)``; funcpeft
            builds them with their initial values directly (small: rank-r tensors), and
            :func:`set_peft_model_state_dict` loads into them either way.
        state_dict: if given, only its keys choose the adapted modules (``<path>.lora_...``, with or without a
            compiled model's ``_orig_mod.``), as in PEFT; a ``RuntimeWarning`` names the modules where it and the
            config disagree. Its values are not used.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``peft_config`` is not a funcpeft config, ``model`` not a module, or a ``modules_to_save``
            module cannot be deep-copied.
        ValueError: the targets or ``modules_to_save`` are invalid (as in ``funcpeft.adapt``), ``adapter_name``
            already exists, a target overlaps another adapter's ``modules_to_save`` or holds another method's
            adapter, or PEFT's rules refuse a second adapter. Nothing is changed then.
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
    if method.shared is not None:
        raise ValueError(
            f"funcpeft's inject_adapter_in_model does not support {method.name} yet: its adapters read tensors the "
            "whole model shares (VeRA's frozen projections, PEFT's base_model.vera_A/vera_B), which this "
            "per-module API does not hold. Use funcpeft.adapt(model, config), or PEFT's get_peft_model."
        )
    if getattr(peft_config, "target_parameters", None):
        raise ValueError(
            "funcpeft's inject_adapter_in_model does not support `target_parameters` "
            f"({list(peft_config.target_parameters)[:3]}): PEFT wraps each parameter's module in nested ParamWrappers. "
            "Use funcpeft.adapt(model, config), or PEFT's get_peft_model."
        )
    init = getattr(peft_config, "init_lora_weights", True)
    if isinstance(init, str) and is_residual(init):
        raise ValueError(
            f"funcpeft's inject_adapter_in_model does not support `init_lora_weights={init!r}`: PEFT implements it "
            "by rewriting the base weights to a residual, and funcpeft never does. Use funcpeft.adapt(model, config) "
            "(the initial factors ride along with the adapter), or PEFT's get_peft_model."
        )
    if getattr(peft_config, "trainable_token_indices", None) is not None:
        raise ValueError(
            "funcpeft's inject_adapter_in_model does not support `trainable_token_indices` yet (PEFT adds them in "
            "get_peft_model, not in inject_adapter_in_model). Use funcpeft.adapt(model, config), or PEFT's "
            "get_peft_model."
        )
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"`adapter_name` must be a non-empty string without '.', got {adapter_name!r}.")
    outer, model = model, _unwrap_compiled(model)
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
    _check_new_adapter(peft_config, adapter_name, configs or {})
    del low_cpu_mem_usage  # see the docstring

    adapted, saved = _compat_modules(model)
    modules = dict(model.named_modules())
    paths = [p for p in modules if p and not _internal(p, adapted, saved)]
    if state_dict is not None:
        targets = _targets_from_state_dict(model, peft_config, method.default_targets, state_dict, paths)
    else:
        base_paths = set(paths)
        targets = [
            p for p in find_targets(model, peft_config, method.default_targets, task_heads=False) if p in base_paths
        ]
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
    _check_one_method(modules, targets, configs or {}, method.name, adapter_name)
    new_children = {p: _CONTAINERS.get(method.name, ()) for p in targets if not isinstance(modules[p], _Adapted)}
    new_children.update({p: (_SAVED,) for p in to_save if not isinstance(modules[p], _Saved)})
    for path, children in new_children.items():
        taken = [c for c in children if hasattr(modules[path], c)]
        if taken:
            raise ValueError(
                f"Module {path!r} ({type(modules[path]).__name__}) already has attribute(s) {taken}, which the "
                "adapter needs for its PEFT-named children; rename them or leave the module out."
            )
    # Every check, make_layer, init and copy runs before the first change to the model; the undo log covers the rest.
    layers = build_layers(model, peft_config, targets)
    attention = [p for p, layer in layers.items() if layer.kind is Kind.MHA]
    if attention:
        raise ValueError(
            f"funcpeft's inject_adapter_in_model does not support LoRA on nn.MultiheadAttention yet ({attention[:3]}): "
            "PEFT wraps the attention and its out_proj in place. Use funcpeft.adapt(model, config), or PEFT's "
            "get_peft_model, or exclude them (`exclude_modules`)."
        )
    tensors = {p: _initial_tensors(modules[p], layer) for p, layer in layers.items()}
    clones = {p: _saved_copy(modules[p], p, adapter_name) for p in to_save}
    undo = _Undo(model)
    try:
        first = not adapted  # PEFT: the first injection freezes the base; later ones keep every existing flag
        before = [(p, p.requires_grad) for p in model.parameters()]
        for path, layer in layers.items():
            _add_adapter(modules[path], layer, tensors[path], method.name, adapter_name)
        for path, clone in clones.items():
            _add_saved(modules[path], adapter_name, clone)
        if configs is None:
            configs = model.peft_config = {}
        configs[adapter_name] = peft_config
        for module in saved.values():  # PEFT's _set_adapter: a wrapper without the new adapter runs its original
            module._funcpeft_active = None
        adapted, saved = _compat_modules(model)
        for module in adapted.values():
            module._funcpeft_active = adapter_name
        _mark_trainable(model, peft_config, adapter_name, adapted, saved)
        if not first:
            for p, flag in before:
                p.requires_grad_(flag)
    except BaseException:
        undo.restore()
        raise
    return outer


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
            if key != name or module._funcpeft_active == name:
                copy_.requires_grad_(key == name)
            else:  # PEFT's ModulesToSaveWrapper.update: a copy of the original as it stands (after `bias`), inactive
                for k, p in copy_.named_parameters():
                    p.requires_grad_(bias == "all" and (k == "bias" or k.endswith(".bias")))
