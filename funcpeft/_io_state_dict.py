"""PEFT's state-dict layout: :func:`to_peft_state_dict` and :func:`from_peft_state_dict`, without any file.

Keys are ``base_model.model.<module_path>.<suffix>`` with the method's suffixes (its ``peft_keys``), trainable
biases of adapted layers as ``<path>.base_layer.bias``, other trainable copies (biases, ``modules_to_save``) as
``<path>.<param_name>``, and the tuner's own tensors (VeRA's shared projections) as ``base_model.<suffix>``.
:func:`_split` also sorts out the base-model weights PEFT writes beside an adapter (``save_embedding_layers``),
which :func:`funcpeft.io.read_base_weights` returns. Reading and writing the files is :mod:`funcpeft.io`, which
re-exports the two functions, :data:`PREFIX`, :data:`ROOT` and ``Params``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from funcpeft._fit import check_names, check_params, infer_method
from funcpeft._targeting import saves_module
from funcpeft._warnings import FuncpeftWarning
from funcpeft.config import AdapterConfig
from funcpeft.methods.base import _REGISTRY, Method, method_for
from funcpeft.methods.lora_init import is_residual, residual_checkpoint_error

__all__ = ["to_peft_state_dict", "from_peft_state_dict"]

PREFIX = "base_model.model."
ROOT = "base_model."  # the tuner's own tensors (VeRA's shared projections): params[""] entries

Params = dict[str, dict[str, Tensor]]


def _is_adapted(entry: Mapping[str, Any], method: Method) -> bool:
    return any(name in method.peft_keys for name in entry)


def to_peft_state_dict(params: Mapping[str, Mapping[str, Tensor]], config: AdapterConfig | None = None) -> dict:
    """``params`` with PEFT's checkpoint keys (``base_model.model.<path>.lora_A.weight`` ...), detached.

    Args:
        params: an adapter tree from :func:`funcpeft.adapt` or :func:`funcpeft.io.load`.
        config: its config; selects the method's key names. Without it, the method is read from the tensor
            names (``ia3_l``: IA3, ``lora_E``: AdaLoRA, otherwise LoRA), and AdaLoRA trees are written unpruned.

    Raises:
        ValueError: the tree mixes the tensors of several methods, or holds another method's than ``config``'s.
    """
    check_params(params)
    method = infer_method(params) if config is None else method_for(config)
    if config is not None:
        check_names(params, config, method)
    out: dict[str, Tensor] = {}
    for path, entry in params.items():
        adapted = _is_adapted(entry, method)
        for name, value in method.to_checkpoint(config, path, entry).items():
            if name in method.peft_keys:
                suffix = method.peft_keys[name]
            elif adapted and name == "bias":
                suffix = "base_layer.bias"  # PEFT wraps adapted layers, so their own bias sits under base_layer
            else:
                suffix = name
            out[f"{PREFIX}{path}.{suffix}" if path else f"{ROOT}{suffix}"] = value.detach()
    return out


def _split(state_dict: Mapping[str, Tensor], config: AdapterConfig) -> tuple[Params, dict[str, Tensor], list[str]]:
    """``state_dict`` as ``(adapter entries, base-model weights by model key, unexpected keys)``."""
    method = method_for(config)
    suffixes = sorted(((s, n) for n, s in method.peft_keys.items()), key=lambda sn: -len(sn[0]))
    root_names = {s: n for n, s in method.peft_keys.items() if "." not in s} if method.shared else {}
    bias = getattr(config, "bias", "none")
    params: Params = {}
    rest_keys: dict[str, tuple[str, Tensor]] = {}

    def put(path: str, name: str, value: Tensor) -> None:
        entry = params.setdefault(path, {})
        if name in entry and not torch.equal(entry[name], value):
            raise ValueError(f"The checkpoint holds two different values for {path!r} {name!r}.")
        entry[name] = value

    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise ValueError(f"Checkpoint keys must be str (PEFT's names), got {key!r} ({type(key).__name__}).")
        if not isinstance(value, Tensor):
            raise ValueError(f"Checkpoint entry {key!r} is a {type(value).__name__}, not a tensor.")
        if not value.is_floating_point():
            raise ValueError(
                f"Checkpoint entry {key!r} is a {value.dtype} tensor (a buffer such as BatchNorm's "
                "num_batches_tracked?); funcpeft adapters hold trainable floating-point tensors only, so modules "
                "with buffers cannot be `modules_to_save` yet."
            )
        rest = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if rest is key and key.startswith(ROOT) and key[len(ROOT) :] in root_names:
            put("", root_names[key[len(ROOT) :]], value)  # e.g. VeRA's base_model.vera_A
            continue
        if ".original_module." in f".{rest}":
            continue  # PEFT also saves the frozen original of a modules_to_save module: not part of the adapter
        rest = rest.replace(".modules_to_save.", ".")
        for suffix, name in suffixes:
            if rest.endswith("." + suffix):
                put(rest[: -len(suffix) - 1], name, value)
                break
        else:
            if rest.endswith(".base_layer.bias"):
                put(rest[: -len(".base_layer.bias")], "bias", value)
                continue
            owner = _modules_to_save_owner(rest, config)
            if owner is not None:
                put(owner, rest[len(owner) + 1 :], value)
            elif bias != "none" and rest.endswith(".bias"):
                put(rest[: -len(".bias")], "bias", value)
            else:
                rest_keys[rest] = (key, value)
    base: dict[str, Tensor] = {}
    unexpected = []
    for rest, (key, value) in rest_keys.items():
        path, _, name = rest.rpartition(".")
        owner = rest.removesuffix(".base_layer.weight")
        if owner != rest and _is_adapted(params.get(owner, {}), method):
            base[owner + ".weight"] = value  # a targeted embedding's own weight
        elif (
            name == "weight"
            and value.dim() == 2
            and path not in params
            and _alone(rest_keys, path)
            and not _adapter_words().keys() & set(path.split("."))
        ):
            base[rest] = value  # an untargeted embedding of a resized vocabulary (PEFT's save_embedding_layers)
        else:
            unexpected.append(key)
    return params, base, unexpected


def _alone(keys: Mapping[str, Any], path: str) -> bool:
    return sum(k.startswith(path + ".") for k in keys) == 1


def _adapter_words() -> dict[str, list[str]]:
    """The name of every adapter tensor any method saves (``lora_A``, ``ia3_l``, ``oft_R`` ...) -> its methods.

    A key with one of them in its path is an adapter tensor (of another method, or with an adapter name left in the
    key, ``lin.lora_A.default.weight``), never a base-model weight PEFT saved beside the adapter.
    """
    words: dict[str, list[str]] = {"modules_to_save": [], "original_module": [], "token_adapter": ["LORA"]}
    for config_type, method in _REGISTRY.items():
        for suffix in method.peft_keys.values():
            word = suffix.removesuffix(".weight").removesuffix(".bias").rpartition(".")[2]
            owners = words.setdefault(word, [])
            if config_type.peft_type not in owners:
                owners.append(config_type.peft_type)
    return words


def _hint(keys: list[str], config: AdapterConfig, method: Method) -> str:
    """Why ``keys`` (unexpected for ``config``) are there, when the keys say it: another method's tensors, or
    PEFT's in-memory keys that still hold the adapter name."""
    words = _adapter_words()
    suffixes = tuple("." + s for s in method.peft_keys.values())
    for key in keys:
        parts = (key[len(PREFIX) :] if key.startswith(PREFIX) else key).split(".")
        for i in range(1, len(parts)):
            named = parts[i] not in ("weight", "bias") and parts[i - 1] in words  # lin.lora_A.<name>.weight
            if named and ".".join(parts[:i] + parts[i + 1 :]).endswith(suffixes):
                return (
                    f" {key!r} still holds an adapter name ({parts[i]!r}): these are the keys of the model's own "
                    "state_dict(); pass PEFT's saved keys (peft.get_peft_model_state_dict(model), or the file "
                    "save_pretrained writes), which have no adapter name."
                )
        others = [t for p in parts for t in words.get(p, []) if t != config.peft_type]
        if others:
            return (
                f" {key!r} is a {'/'.join(dict.fromkeys(others))} tensor, but the config is a {config.peft_type} "
                "adapter: the weights and adapter_config.json belong to different adapters."
            )
    return ""


def from_peft_state_dict(state_dict: Mapping[str, Tensor], config: AdapterConfig) -> Params:
    """The inverse of :func:`to_peft_state_dict`: PEFT's keys (with or without ``base_model.model.``) -> params.

    Returns fresh leaf tensors with ``requires_grad=True``. Base-model weights PEFT saves beside the adapter
    (``save_embedding_layers``) are left out (see :func:`funcpeft.io.read_base_weights`); those of a resized
    vocabulary, which the model must be given, with a :class:`FuncpeftWarning`.

    Raises:
        ValueError: a key is neither an adapter tensor, a trainable bias, a ``modules_to_save`` parameter nor a
            base weight PEFT writes (named), or an adapted module lacks a tensor its config requires (named).
    """
    method = method_for(config)
    params, base, unexpected = _split(state_dict, config)
    if unexpected:
        raise ValueError(
            f"Unexpected checkpoint keys for a {config.peft_type} adapter with "
            f"bias={getattr(config, 'bias', 'none')!r} and modules_to_save={getattr(config, 'modules_to_save', None)!r}"
            f": {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.{_hint(unexpected, config, method)}"
        )
    if method.loaded is not None:
        params = method.loaded(config, params)
    resized = sorted(k for k in base if k.removesuffix(".weight") not in params)
    if resized:
        warnings.warn(
            f"The checkpoint also holds the base model's weights {resized} (PEFT saves them when the vocabulary was "
            "resized); funcpeft's params hold only the adapter, so give them to the model: "
            "`model.load_state_dict(funcpeft.io.read_base_weights(path), strict=False)`.",
            FuncpeftWarning,
            stacklevel=3,
        )
    if is_residual(getattr(config, "init_lora_weights", True)):
        raise ValueError(residual_checkpoint_error(config))
    for path, entry in params.items():
        if not _is_adapted(entry, method):
            continue
        have = frozenset(entry)
        missing = sorted(method.required(config, have) - have)
        if missing:
            raise ValueError(
                f"The checkpoint is missing {[f'{PREFIX}{path}.{method.peft_keys[n]}' for n in missing]} for the "
                f"adapted module {path!r} (its config needs {sorted(method.required(config, have))})."
            )
    order = {name: i for i, name in enumerate(method.peft_keys)}
    return {
        path: {
            name: params[path][name].detach().clone().requires_grad_(True)
            for name in sorted(params[path], key=lambda n: (order.get(n, len(order)), n))
        }
        for path in sorted(params, key=_natural_key)
    }


def _natural_key(path: str) -> list[tuple[int, int | str]]:
    """Sort ``h.2`` before ``h.10``, so a loaded tree lists modules in the model's order, as ``fwd.init`` does."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in path.split(".")]


def _modules_to_save_owner(key: str, config: AdapterConfig) -> str | None:
    """The ``modules_to_save`` (or task head) module path that ``key`` (``<path>.<param>``) belongs to, if any."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:end])
        if saves_module(config, path):
            return path
    return None
