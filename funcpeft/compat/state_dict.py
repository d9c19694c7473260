"""``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` with PEFT's keys, for injected models."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from funcpeft.compat._modules import _SAVED, _Adapted
from funcpeft.compat.inject import _compat_modules
from funcpeft.config import AdapterConfig

__all__ = ["get_peft_model_state_dict", "set_peft_model_state_dict"]


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
