"""Checkpoints in PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A folder written by :func:`save` loads with ``peft.PeftModel.from_pretrained(model, path)``, and a folder
written by PEFT's ``save_pretrained`` loads with :func:`load`. Tensor keys are PEFT's:
``base_model.model.<module_path>.<suffix>`` with the method's suffixes (LoRA: ``lora_A.weight``,
``lora_B.weight``, ``lora_B.bias``, ``lora_embedding_A``, ``lora_embedding_B``, ``lora_magnitude_vector``),
trainable biases of adapted layers as ``<path>.base_layer.bias``, other trainable copies (biases,
``modules_to_save``) as ``<path>.<param_name>``.

Safety: tensors are read with safetensors, or from an old ``adapter_model.bin`` only through
``torch.load(weights_only=True)``; nothing is unpickled. Writes go to temporary files renamed into place, so an
interrupted save leaves either the old checkpoint or the new one, never a torn file. Every check runs before
anything is written or returned.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from funcpeft.config import AdapterConfig
from funcpeft.methods.base import Method, method_for, method_for_peft_type

__all__ = ["save", "load", "to_peft_state_dict", "from_peft_state_dict"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

Params = dict[str, dict[str, Tensor]]


def _check_params(params: Any) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"`params` must be a dict {{module_path: {{name: Tensor}}}}, got {type(params).__name__}.")
    for path, entry in params.items():
        if not isinstance(path, str) or not isinstance(entry, Mapping):
            raise TypeError(f"`params` entry {path!r} must map a module path to a dict of tensors.")
        for name, value in entry.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"`params[{path!r}][{name!r}]` must be a Tensor, got {type(value).__name__}.")


def _is_adapted(entry: Mapping[str, Any], method: Method) -> bool:
    return any(name in method.peft_keys for name in entry)


def to_peft_state_dict(params: Mapping[str, Mapping[str, Tensor]], config: AdapterConfig | None = None) -> dict:
    """``params`` with PEFT's checkpoint keys (``base_model.model.<path>.lora_A.weight`` ...), detached.

    Args:
        params: an adapter tree from :func:`funcpeft.adapt` or :func:`load`.
        config: its config; selects the method's key names (default: LoRA's).
    """
    _check_params(params)
    method = _method(config)
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
            out[f"{PREFIX}{path}.{suffix}"] = value.detach()
    return out


def _method(config: AdapterConfig | None) -> Method:
    if config is None:
        from funcpeft.config import LoraConfig

        return method_for(LoraConfig())
    return method_for(config)


def from_peft_state_dict(state_dict: Mapping[str, Tensor], config: AdapterConfig) -> Params:
    """The inverse of :func:`to_peft_state_dict`: PEFT's keys (with or without ``base_model.model.``) -> params.

    Returns fresh leaf tensors with ``requires_grad=True``.

    Raises:
        ValueError: a key is neither an adapter tensor, a trainable bias nor a ``modules_to_save`` parameter
            (named), or an adapted module lacks a tensor its config requires (named).
    """
    method = method_for(config)
    suffixes = sorted(((s, n) for n, s in method.peft_keys.items()), key=lambda sn: -len(sn[0]))
    saved = list(getattr(config, "modules_to_save", None) or [])
    bias = getattr(config, "bias", "none")
    params: Params = {}
    unexpected = []

    def put(path: str, name: str, value: Tensor) -> None:
        entry = params.setdefault(path, {})
        if name in entry and not torch.equal(entry[name], value):
            raise ValueError(f"The checkpoint holds two different values for {path!r} {name!r}.")
        entry[name] = value

    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"Checkpoint entry {key!r} is a {type(value).__name__}, not a tensor.")
        if not value.is_floating_point():
            raise ValueError(
                f"Checkpoint entry {key!r} is a {value.dtype} tensor (a buffer such as BatchNorm's "
                "num_batches_tracked?); funcpeft adapters hold trainable floating-point tensors only, so modules "
                "with buffers cannot be `modules_to_save` yet."
            )
        rest = key[len(PREFIX) :] if key.startswith(PREFIX) else key
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
            owner = _modules_to_save_owner(rest, saved)
            if owner is not None:
                put(owner, rest[len(owner) + 1 :], value)
            elif bias != "none" and rest.endswith(".bias"):
                put(rest[: -len(".bias")], "bias", value)
            else:
                unexpected.append(key)
    if unexpected:
        raise ValueError(
            f"Unexpected checkpoint keys for a {config.peft_type} adapter with bias={bias!r} and "
            f"modules_to_save={saved!r}: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )
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


def _modules_to_save_owner(key: str, saved: list[str]) -> str | None:
    """The ``modules_to_save`` module path that ``key`` (``<path>.<param>``) belongs to, if any."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:end])
        if any(path == s or path.endswith("." + s) for s in saved):
            return path
    return None


def _recorded_targets(params: Mapping[str, Mapping[str, Tensor]], config: AdapterConfig) -> list[str] | None:
    """The names to record when ``target_modules`` was None or ``"all-linear"``: the adapted module paths.

    PEFT records the resolved module paths for ``"all-linear"``; for None it records the architecture's default
    names, which ``save`` cannot know without the model. The paths select the same modules when loaded.
    """
    spec = config.target_modules
    if spec is None or (isinstance(spec, str) and spec.lower() == "all-linear"):
        method = method_for(config)
        return sorted(p for p, e in params.items() if _is_adapted(e, method))
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_temporary(path: Path, write: Any) -> Path:
    """Write ``path``'s new content next to it under a temporary name, flushed to disk; return that name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; checkpoints are ordinary files
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def save(path: str | os.PathLike, params: Mapping[str, Mapping[str, Tensor]], config: AdapterConfig) -> None:
    """Write ``params`` and ``config`` to the folder ``path`` in PEFT's format (created if needed).

    Both files are written completely to temporary files first, then renamed into place (each rename is atomic),
    so no file of the checkpoint is ever torn. Overwriting an existing checkpoint, a crash in the instant between
    the two renames can leave the new weights beside the old config; a failure anywhere else leaves the old
    checkpoint as it was.

    Raises:
        TypeError: ``params`` is not an adapter tree or ``config`` not a funcpeft config.
    """
    method_for(config)
    _check_params(params)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in to_peft_state_dict(params, config).items()}
    payload = json.dumps(config.to_peft_dict(_recorded_targets(params, config)), indent=2, sort_keys=True)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights_tmp = _write_temporary(folder / WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    try:
        config_tmp = _write_temporary(folder / CONFIG_NAME, lambda f: Path(f).write_text(payload + "\n"))
    except BaseException:
        os.unlink(weights_tmp)
        raise
    os.replace(weights_tmp, folder / WEIGHTS_NAME)
    os.replace(config_tmp, folder / CONFIG_NAME)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the renames themselves durable
    finally:
        os.close(directory)


def read_config(path: str | os.PathLike) -> AdapterConfig:
    """The config of the adapter folder ``path``.

    Raises:
        FileNotFoundError: the folder or its ``adapter_config.json`` does not exist.
        ValueError: the file is not valid JSON or not a supported PEFT adapter config.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Adapter folder {str(folder)!r} does not exist.")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not an adapter folder: it has no {CONFIG_NAME}.")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(config_file)!r} is not valid JSON: {err}.") from err
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ValueError(f"{str(config_file)!r} has no `peft_type`: not a PEFT adapter config.")
    try:
        method = method_for_peft_type(data["peft_type"])
        return method.config_type.from_peft_dict(data, source=str(config_file))
    except (TypeError, ValueError) as err:
        if str(config_file) in str(err):
            raise ValueError(str(err)) from err
        raise ValueError(f"{str(config_file)!r}: {err}") from err


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], Path]:
    """The raw tensors of the adapter folder ``path`` and the file they came from.

    Raises:
        FileNotFoundError: neither ``adapter_model.safetensors`` nor ``adapter_model.bin`` exists.
        ValueError: the file is truncated, corrupt, or (``.bin``) holds anything but tensors.
    """
    folder = Path(path)
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        try:
            return load_file(str(weights)), weights
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"Cannot read {str(weights)!r}: {err}. The file is truncated or not safetensors.") from err
    legacy = folder / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            state = torch.load(str(legacy), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - the unpickler raises many types; all mean "refused"
            raise ValueError(
                f"Cannot read {str(legacy)!r} safely (only tensors are accepted, nothing is unpickled): {err}"
            ) from err
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{str(legacy)!r} does not hold a dict of tensors.")
        return state, legacy
    raise FileNotFoundError(f"{str(folder)!r} has no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}).")


def load(path: str | os.PathLike) -> tuple[Params, AdapterConfig]:
    """Read a PEFT-format adapter folder (written by PEFT or funcpeft): ``params, config``.

    Shapes are checked against the model on the first ``fwd`` call with these params.

    Raises:
        FileNotFoundError: the folder, its config or its weights are missing.
        ValueError: an unreadable or truncated file (named), an unsupported ``peft_type`` or PEFT feature,
            unexpected keys or tensors missing for an adapted module (named).
    """
    config = read_config(path)
    state, source = read_tensors(path)
    try:
        params = from_peft_state_dict(state, config)
    except ValueError as err:
        raise ValueError(f"{str(source)!r}: {err}") from err
    return params, config
