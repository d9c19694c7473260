"""``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` with PEFT's keys, for injected models."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from funcpeft import _quant
from funcpeft._warnings import FuncpeftWarning
from funcpeft.compat._modules import _SAVED, _Adapted, _unwrap_compiled
from funcpeft.compat.inject import _compat_modules
from funcpeft.config import AdapterConfig

__all__ = ["get_peft_model_state_dict", "set_peft_model_state_dict"]

_EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES
_BASE_EMBEDDINGS = (nn.Linear, nn.Embedding)  # PEFT's has_valid_embedding_base_layer


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

    names = {key: peft_key(key) for key in _quant.state_dict(model, keep_vars=True)}
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


def _config_of(model: nn.Module, adapter_name: str) -> AdapterConfig:
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
    return config


def _embedding_targeted(model: nn.Module, config: AdapterConfig) -> bool:
    """PEFT's ``embedding_is_targeted``: ``target_modules`` names ``embed_tokens``/``lm_head`` (or a regex matches)."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str) and targets != "all-linear":
        names = [k for k, _ in model.named_modules() if any(re.match(rf"(.*\.)?{e}$", k) for e in _EMBEDDING_NAMES)]
        return any(re.fullmatch(targets, k) for k in names)
    return bool(targets) and any(e in targets for e in _EMBEDDING_NAMES)  # type: ignore[operator]


def _embedding_prefixes(model: nn.Module, targeted: bool) -> list[str]:
    """The PEFT-layout prefixes of the input/output embeddings' tensors ``save_embedding_layers=True`` writes.

    As PEFT: an embedding ``target_modules`` names contributes its base tensors (``<path>.base_layer.``) if it is
    adapted; otherwise each embedding module's whole entry (``<path>.``).
    """
    prefixes = []
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is None or (targeted and not (isinstance(layer, _Adapted) and isinstance(layer, _BASE_EMBEDDINGS))):
            continue
        path = next((p for p, m in model.named_modules() if m is layer), None)
        if path is not None:
            prefixes.append(f"{path}.base_layer." if targeted else f"{path}.")
    return prefixes


def _adapter_entries(
    model: nn.Module,
    adapter_name: str,
    state_dict: Mapping[str, Tensor] | None = None,
    embeddings: list[str] | None = None,
) -> dict[str, _Entry]:
    """PEFT's key -> the model's entry, selected by PEFT's ``get_peft_model_state_dict`` rules (in its order).

    ``embeddings``: PEFT-layout prefixes of the embedding tensors to add (``save_embedding_layers``).
    """
    config = _config_of(model, adapter_name)
    names, prefixes, saved = _peft_names(model)
    own = _quant.state_dict(model) if state_dict is None else state_dict
    # The other adapters' tensors, found where they are (PEFT matches their names anywhere in a key, so with adapters
    # "0" and "1" it drops adapter "0"'s tensors of every module under a path segment "1", e.g. `layers.1.`).
    entries = _adapter_children(model)
    foreign = [path for path, name in entries if name != adapter_name]
    mine = [path for path, name in entries if name == adapter_name]
    state = {names.get(k, k): _Entry(k, v) for k, v in own.items() if not _under(k, foreign)}
    out = {k: e for k, e in state.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}
    bias = getattr(config, "bias", "none")
    if bias == "all":
        out.update({k: e for k, e in state.items() if k == "bias" or k.endswith(".bias")})
    elif bias == "lora_only":
        adapted = {names.get(f"{p}.bias") for p, m in model.named_modules() if isinstance(m, _Adapted)}
        out.update({k: e for k, e in state.items() if k in adapted})
    dora_suffix = f"lora_magnitude_vector.{adapter_name}.weight"
    if getattr(config, "use_dora", False):  # LoraModel._get_adapter_state_dict keeps the pre-ModuleDict key
        out = {k.removesuffix(".weight") if k.endswith(dora_suffix) else k: e for k, e in out.items()}
    named = {k for k, e in out.items() if _under(e.key, mine)}  # the keys that hold the adapter's name
    for path, module in saved.items():  # ModulesToSaveWrapper.adapter_state_dict
        if adapter_name in module._modules[_SAVED]:
            inner = f"{path}.{_SAVED}.{adapter_name}."
            copies = {f"{path}.{k[len(inner) :]}": e for k, e in state.items() if k.startswith(inner)}
            out.update(copies)
            named.difference_update(copies)
    for prefix in embeddings or ():
        out.update({k: e for k, e in state.items() if k.startswith(prefix)})
    # Only from the keys that hold it: PEFT also strips a last path segment equal to the name from the others (adapter
    # "0": `layers.0.bias` -> `layers.bias`, `modules_to_save=["layers.0"]`: `layers.weight`), which then load nowhere.
    return {_remove_adapter_name(k, adapter_name) if k in named else k: e for k, e in out.items()}


def _under(key: str, paths: list[str]) -> bool:
    """Whether the own-layout ``key`` is one of ``paths`` or lies under one of them."""
    return any(key == p or key.startswith(f"{p}.") for p in paths)


def _adapter_children(model: nn.Module) -> list[tuple[str, str]]:
    """``(own-layout path, adapter name)`` of every adapter's entry in every module: ``<module>.<container>.<name>``
    and ``<module>.modules_to_save.<name>``."""
    adapted, saved = _compat_modules(model)
    entries = [(p, c, n) for p, m in adapted.items() for c in m._funcpeft_containers for n in m._modules[c]]
    entries += [(p, _SAVED, n) for p, m in saved.items() for n in m._modules[_SAVED]]
    return [(f"{p}.{c}.{n}" if p else f"{c}.{n}", n) for p, c, n in entries]


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> dict[str, Tensor]:
    """The adapter's tensors with PEFT's keys, as ``peft.get_peft_model_state_dict`` returns them (same signature).

    Keys are PEFT's checkpoint keys without the adapter name: ``linear.lora_A.weight``, ``emb.lora_embedding_A``,
    ``lin.lora_magnitude_vector`` (DoRA), ``lin.lora_B.bias`` (``lora_bias``), ``head.weight`` for a
    ``modules_to_save`` copy, and biases per ``bias``: with ``"all"`` every ``*.bias`` of the model (an adapted
    module's as ``<path>.base_layer.bias``, a saved module's original and copy as PEFT names them), with
    ``"lora_only"`` the adapted modules' ``<path>.base_layer.bias``. Values share storage with the model, as
    ``model.state_dict()``'s do. A compiled model's keys start with ``_orig_mod.`` unless ``unwrap_compiled``.
    The other adapters' tensors are left out by where they are, not by their names (PEFT drops every key containing
    another adapter's name as a path segment: with adapters ``"0"`` and ``"1"``, adapter ``"0"``'s ``layers.1.*``),
    so the keys are PEFT's except where PEFT's are incomplete.

    Args:
        model: a model adapted by :func:`inject_adapter_in_model` (also a ``torch.compile``-d one).
        state_dict: the model's state dict to read (default ``model.state_dict()``), in the model's own keys.
        adapter_name: which adapter.
        unwrap_compiled: read a compiled model's ``_orig_mod`` (keys without ``_orig_mod.``), as PEFT.
        save_embedding_layers: also return the input and output embeddings' base tensors (PEFT's rule:
            ``"auto"`` means ``True``, with PEFT's warning, when ``target_modules`` names ``embed_tokens`` or
            ``lm_head``; PEFT's second ``"auto"`` case, a vocabulary resized since ``base_model_name_or_path``,
            cannot arise: funcpeft's configs carry no base model path). ``True`` on a model without
            ``get_input_embeddings`` warns as PEFT does and adds nothing.

    Returns:
        ``{peft_key: Tensor}``.

    Raises:
        ValueError: ``model`` has no funcpeft adapter named ``adapter_name``.
        TypeError: ``save_embedding_layers`` is not a bool or ``"auto"``.
    """
    if save_embedding_layers != "auto" and not isinstance(save_embedding_layers, bool):
        raise TypeError(f"`save_embedding_layers` must be True, False or 'auto', got {save_embedding_layers!r}.")
    if unwrap_compiled:
        model = _unwrap_compiled(model)
    config = _config_of(model, adapter_name)
    targeted = _embedding_targeted(model, config)
    if save_embedding_layers == "auto":
        save_embedding_layers = targeted
        if targeted:
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                FuncpeftWarning,
                stacklevel=2,
            )
    embeddings: list[str] = []
    if save_embedding_layers and hasattr(model, "get_input_embeddings"):
        embeddings = _embedding_prefixes(model, targeted)
    elif save_embedding_layers:
        warnings.warn(
            "Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
            FuncpeftWarning,
            stacklevel=2,
        )
    return {k: e.tensor for k, e in _adapter_entries(model, adapter_name, state_dict, embeddings).items()}


def _resolve(key: str, known: Mapping[str, Any]) -> str:
    """``key`` as the model names it: without PEFT's ``base_model.model.``, with or without ``_orig_mod.``."""
    for candidate in (key, key.removeprefix("base_model.model.")):
        for variant in (candidate, candidate.removeprefix("_orig_mod."), f"_orig_mod.{candidate}"):
            if variant in known:
                return variant
    return key


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: Mapping[str, Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Load a PEFT-keyed adapter state dict (from either library) into adapter ``adapter_name`` in place.

    The inverse of :func:`get_peft_model_state_dict`, with ``peft.set_peft_model_state_dict``'s signature. Keys may
    carry PEFT's ``base_model.model.`` prefix, and a compiled model's ``_orig_mod.`` or not (PEFT silently loads
    nothing from keys without it); the embedding tensors ``save_embedding_layers`` adds are loaded when present.
    Unlike PEFT (which loads with ``strict=False`` and ignores what does not fit), every other key must be one the
    adapter has, and all of the adapter's must be present with the model's shapes; otherwise nothing is loaded.

    Args:
        model: a model adapted by :func:`inject_adapter_in_model` (also a ``torch.compile``-d one).
        peft_model_state_dict: ``{peft_key: Tensor}``; values are copied (cast to the parameters' dtypes).
        adapter_name: the adapter to load into (need not be the name it was saved under).
        ignore_mismatched_sizes: as PEFT: a tensor whose shape differs from the model's is left out (the model keeps
            its own) and reported in one warning with PEFT's text; the rest loads.
        low_cpu_mem_usage: accepted with PEFT's meaning, a memory strategy: PEFT then assigns the given tensors as the
            parameters (needed for its meta-device adapters, see :func:`inject_adapter_in_model`). funcpeft's
            adapters are never on the meta device, so it copies into the existing parameters either way: the values
            and dtypes are PEFT's, and the parameter objects stay the same (an optimizer built on them stays valid).

    Returns:
        torch's ``_IncompatibleKeys``: ``missing_keys`` are the model's keys left out by ``ignore_mismatched_sizes``
        (PEFT's also lists every base-model key), ``unexpected_keys`` is empty (an unexpected key is an error).

    Raises:
        ValueError: unexpected or missing keys, a key given twice, a tensor whose shape differs from the model's
            (the message names the key, the module path and both shapes), a value or a model tensor on the meta
            device. The model is unchanged then.
        TypeError: a value is not a Tensor, or is complex where the model's tensor is real (the model is unchanged).
    """
    del low_cpu_mem_usage  # see the docstring
    expected = _adapter_entries(model, adapter_name)
    optional = {}
    if hasattr(model, "get_input_embeddings"):  # what save_embedding_layers may have added, in either of its forms
        optional = _adapter_entries(model, adapter_name, embeddings=_embedding_prefixes(model, True))
        optional.update(_adapter_entries(model, adapter_name, embeddings=_embedding_prefixes(model, False)))
        optional = {k: e for k, e in optional.items() if k not in expected}
    known = {**expected, **optional}
    given: dict[str, Any] = {}
    for key, value in peft_model_state_dict.items():
        resolved = _resolve(key, known)
        if resolved in given:
            raise ValueError(
                f"`peft_model_state_dict` holds {resolved!r} twice (as {key!r} and under another prefix); keep one."
            )
        given[resolved] = value
    unexpected = sorted(given.keys() - known.keys())
    missing = sorted(expected.keys() - given.keys())
    if unexpected or missing:
        raise ValueError(
            f"`peft_model_state_dict` does not fit adapter {adapter_name!r} of {type(model).__name__}: unexpected "
            f"keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, missing keys {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}. Was it saved from a model with the same config?"
        )
    mismatched = []
    for key, value in given.items():
        target = known[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"`peft_model_state_dict[{key!r}]` must be a Tensor, got {type(value).__name__}.")
        if value.is_meta:
            raise ValueError(
                f"`peft_model_state_dict[{key!r}]` is on the meta device: it holds no values to load. Load the "
                "state dict with its data (e.g. safetensors.torch.load_file, or torch.load(..., map_location='cpu'))."
            )
        if value.is_complex() and not target.tensor.is_complex():
            raise TypeError(
                f"`peft_model_state_dict[{key!r}]` is a {value.dtype} tensor, but {target.key!r} is "
                f"{target.tensor.dtype}; copying it would drop the imaginary part. Pass the real tensor it stands for."
            )
        if target.tensor.is_meta:
            raise ValueError(
                f"`model`'s tensor {target.key!r} is on the meta device, so loading `peft_model_state_dict[{key!r}]` "
                "into it would do nothing; materialise the model first (e.g. `model.to_empty(device=...)` and load "
                "its base weights)."
            )
        if value.shape != target.tensor.shape:
            if ignore_mismatched_sizes:
                mismatched.append((key, value.shape, target.tensor.shape))
                continue
            module = target.key.rsplit(".", 1)[0]
            raise ValueError(
                f"`peft_model_state_dict[{key!r}]` has shape {tuple(value.shape)}, but module {module!r} holds "
                f"{tuple(target.tensor.shape)} there ({target.key}); r, kernel and features must match the model. "
                "Pass `ignore_mismatched_sizes=True` to load the rest."
            )
    live = _quant.state_dict(model, keep_vars=True)
    skipped = {key for key, _, _ in mismatched}
    # Every value is on its parameter's device before the first copy, so one that cannot get there fails with the
    # model unchanged; copy_ then casts to the parameter's dtype, as PEFT's load_state_dict does. PEFT's order: a
    # modules_to_save copy's own key wins over a bias alias.
    order = [key for key in [*expected, *optional] if key in given and key not in skipped]
    with torch.no_grad():
        values = {key: given[key].to(device=live[known[key].key].device) for key in order}
        for key in order:
            live[known[key].key].copy_(values[key])
    if mismatched:  # PEFT's reporting (transformers' wording), with the model's own keys
        lines = "\n".join(
            f"- {known[key].key}: found shape {found} in the checkpoint and {shape} in the model instantiated"
            for key, found, shape in mismatched
        )
        warnings.warn(
            f"Some weights of {model.__class__.__name__} were not initialized from the model checkpoint and are being "
            f"ignored because you passed `ignore_mismatched_sizes=True`: {lines}.",
            FuncpeftWarning,
            stacklevel=2,
        )
    return _IncompatibleKeys([known[key].key for key, _, _ in mismatched], [])
