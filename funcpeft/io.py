"""Checkpoints in PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A folder written by :func:`save` loads with ``peft.PeftModel.from_pretrained(model, path)``, and a folder
written by PEFT's ``save_pretrained`` loads with :func:`load`. Tensor keys are PEFT's:
``base_model.model.<module_path>.<suffix>`` with the method's suffixes (LoRA: ``lora_A.weight``,
``lora_B.weight``, ``lora_B.bias``, ``lora_embedding_A``, ``lora_embedding_B``, ``lora_magnitude_vector``),
trainable biases of adapted layers as ``<path>.base_layer.bias``, other trainable copies (biases,
``modules_to_save``) as ``<path>.<param_name>``. Base-model weights PEFT writes beside an adapter
(``save_embedding_layers``: ``<path>.base_layer.weight`` of a targeted embedding, ``<path>.weight`` of a resized
one) are not adapter tensors: :func:`load` leaves them out and :func:`read_base_weights` returns them. The
conversion between params and such state dicts (:func:`to_peft_state_dict`, :func:`from_peft_state_dict`) is
:mod:`funcpeft._io_state_dict`'s, re-exported here; this module reads and writes the files.

Safety: tensors are read with safetensors, or from an old ``adapter_model.bin`` only through
``torch.load(weights_only=True)``; nothing is unpickled; ``adapter_config.json`` is read up to
:data:`MAX_CONFIG_BYTES` and :data:`MAX_CONFIG_DEPTH` levels of nesting. Every check runs before anything is
written or returned.

No torn checkpoint (:mod:`funcpeft._atomic`): the weights record the sha256 of the config bytes saved with them;
a save holds a lock on the folder, writes and fsyncs both files as temporaries, then renames the weights and the
config. A save interrupted at any point (SIGKILL, power loss) or racing another save leaves a folder that
:func:`load` reads as exactly the old or exactly a new checkpoint: it takes the config whose hash the weights
record (rolling forward to the complete config temporary when a save died between its renames) and never the
previous config beside new weights. Folders written by PEFT record no hash and are read as before.

Hub ids: every reader takes a local folder or a Hugging Face Hub id (``"org/name"``, with ``revision=`` and
``subfolder=``), resolved as ``peft.PeftModel.from_pretrained`` resolves it, through ``huggingface_hub`` and its
cache (offline with ``HF_HUB_OFFLINE=1``); a path that exists always wins (:mod:`funcpeft._hub`). The cached
snapshot folder is then read exactly as a local one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

from funcpeft import _atomic, _hub
from funcpeft._fit import check_fit, check_params
from funcpeft._io_state_dict import PREFIX as PREFIX  # (re-exported: PEFT's key prefixes)
from funcpeft._io_state_dict import ROOT as ROOT
from funcpeft._io_state_dict import Params, _is_adapted, _split, from_peft_state_dict, to_peft_state_dict
from funcpeft.config import AdapterConfig
from funcpeft.methods.base import method_for, method_for_peft_type
from funcpeft.methods.lora_init import converted, is_residual
from funcpeft.methods.lora_params_io import checkpoint_owners

__all__ = ["save", "load", "to_peft_state_dict", "from_peft_state_dict", "read_base_weights"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 16 << 20  # PEFT's configs are kilobytes; AdaLoRA masks of a huge model a few megabytes
MAX_CONFIG_DEPTH = 32  # PEFT's configs nest 3 levels deep

_TOKENS = "trainable_tokens_delta"  # funcpeft.methods.lora_tokens


def _recorded_targets(params: Mapping[str, Mapping[str, Tensor]], config: AdapterConfig) -> list[str] | None:
    """The names to record when ``target_modules`` was None or ``"all-linear"``: the adapted module paths.

    PEFT records the resolved module paths for ``"all-linear"``; for None it records the architecture's default
    names, which ``save`` cannot know without the model. The paths select the same modules when loaded.
    """
    spec = config.target_modules
    if spec is None or (isinstance(spec, str) and spec.lower() == "all-linear"):
        method = method_for(config)
        tokens = getattr(config, "trainable_token_indices", None) is not None  # LoRA's token rows: no LoRA target
        owners = set(checkpoint_owners(config, params))  # target_parameters' modules: no target_modules entry
        return sorted(
            p
            for p, e in params.items()
            if p and _is_adapted(e, method) and not (tokens and _TOKENS in e) and p not in owners
        )
    return None


def _check_materialized(params: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Refuse tensors without data (``device="meta"``): there is nothing to write, and torch's own error does not
    say which tensor it was."""
    for path, entry in params.items():
        for name, value in entry.items():
            if value.is_meta:
                raise ValueError(
                    f"`params[{path!r}][{name!r}]` is on the meta device (shape {tuple(value.shape)}), so it holds no "
                    "values to save; materialize the adapter first (e.g. `fwd.init()` on a real model, or "
                    "`funcpeft.load` an existing checkpoint)."
                )


def _check_folder(folder: Path) -> None:
    """Refuse a ``path`` that is (or lies under) a file, as PEFT's ``save_pretrained`` does, before writing."""
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                where = "is" if part == folder else f"lies under {str(part)!r}, which is"
                raise ValueError(
                    f"`path` {str(folder)!r} {where} a file, not a folder; pass the folder to write "
                    f"{CONFIG_NAME} and {WEIGHTS_NAME} into."
                )
            return


def save(
    path: str | os.PathLike, params: Mapping[str, Mapping[str, Tensor]], config: AdapterConfig, *, convert: bool = True
) -> None:
    """Write ``params`` and ``config`` to the folder ``path`` in PEFT's format (created if needed).

    A PiSSA/OLoRA adapter (``init_lora_weights`` ``"pissa"``, ``"pissa_niter_<N>"``, ``"olora"``) is written, by
    default, as the rank-2r LoRA PEFT loads onto the *original* base (PEFT's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)``, :func:`funcpeft.methods.lora_init.converted`).
    ``convert=False`` writes what PEFT's plain ``save_pretrained`` writes: A and B with the PiSSA/OLoRA config,
    meant for PEFT's residual base (PEFT rebuilds it from the original base on load for ``"pissa"`` and ``"olora"``;
    ``"pissa_niter_<N>"`` is random, so only the residual base saved with it fits).

    The tree is checked against the config first (:func:`funcpeft._fit.check_fit`: method, required tensors,
    ranks, shapes), so a tree that does not fit never replaces a good checkpoint. Then, holding a lock on the
    folder, both files are written and fsynced as temporaries (created with the mode of the files they replace,
    or ``0o666`` less the umask) and renamed into place, weights first; the weights' metadata records the
    sha256 of the config bytes. Whenever this is interrupted, or races another save, :func:`load` reads exactly
    the old or exactly a new checkpoint (see the module docstring); the next save deletes the temporaries an
    interrupted one left. Other files in the folder are left alone.

    Raises:
        TypeError: ``params`` is not a tree of floating-point tensors or ``config`` not a funcpeft config.
        ValueError: ``params`` does not fit ``config`` (the message names the module path, tensor and shapes), a
            tensor is on the meta device, or ``path`` is (or lies under) a file.
    """
    method = method_for(config)
    check_params(params)
    check_fit(params, config, method)
    _check_materialized(params)
    if convert and is_residual(getattr(config, "init_lora_weights", True)):
        params, config = converted(params, config)  # type: ignore[arg-type]
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in to_peft_state_dict(params, config).items()}
    text = (
        json.dumps(config.to_peft_dict(_recorded_targets(params, config)), indent=2, sort_keys=True) + "\n"
    ).encode()
    folder = Path(path)
    _check_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _atomic.locked(folder):
        metadata = {
            "format": "pt",
            _atomic.CONFIG_HASH: _atomic.sha256(text),
            _atomic.PREVIOUS_HASH: _atomic.file_sha256(folder / CONFIG_NAME),
        }
        _atomic.commit(folder, [(WEIGHTS_NAME, save_bytes(tensors, metadata=metadata)), (CONFIG_NAME, text)])


def _parse_config(text: bytes, config_file: Path) -> AdapterConfig:
    data = _atomic.load_json(text, config_file, MAX_CONFIG_DEPTH)
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ValueError(f"{str(config_file)!r} has no `peft_type`: not a PEFT adapter config.")
    try:
        method = method_for_peft_type(data["peft_type"])
        return method.config_type.from_peft_dict(data, source=str(config_file))
    except (TypeError, ValueError) as err:
        if str(config_file) in str(err):
            raise ValueError(str(err)) from err
        raise ValueError(f"{str(config_file)!r}: {err}") from err


def _tensors(data: bytes, source: Path) -> dict[str, Tensor]:
    try:
        return load_bytes(data)
    except (SafetensorError, ValueError) as err:
        raise ValueError(f"Cannot read {str(source)!r}: {err}. The file is truncated or not safetensors.") from err


def _legacy_tensors(legacy: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(str(legacy), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler raises many types; all mean "refused"
        raise ValueError(
            f"Cannot read {str(legacy)!r} safely (only tensors are accepted, nothing is unpickled): {err}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{str(legacy)!r} does not hold a dict of tensors by name (a state dict).")
    return state


def _no_weights(folder: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{str(folder)!r} has no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}).")


def _folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        if folder.exists():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a folder; pass the adapter folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}."
            )
        raise FileNotFoundError(f"Adapter folder {str(folder)!r} does not exist.")
    return folder


def read_checkpoint(
    path: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None
) -> tuple[AdapterConfig, dict[str, Tensor], Path]:
    """The config, the raw tensors and the weights file of the adapter ``path``, as one consistent pair.

    ``path`` is a folder or a Hub id (``revision``/``subfolder`` as in :func:`load`).

    Raises:
        FileNotFoundError: the folder, its config or its weights do not exist (locally or on the Hub / in its cache).
        ImportError: ``path`` is a Hub id and huggingface_hub is not installed (``pip install 'funcpeft[hub]'``).
        ValueError: a file is unreadable, truncated, too large or too deeply nested, the config is not a
            supported PEFT adapter config, or the folder is a torn checkpoint (each names the file or folder).
    """
    folder = _folder(_hub.resolve(path, revision=revision, subfolder=subfolder).folder)
    config_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    no_config = FileNotFoundError(f"{str(folder)!r} is not an adapter folder: it has no {CONFIG_NAME}.")
    try:
        data, text = _atomic.read_pair(folder, WEIGHTS_NAME, CONFIG_NAME, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        text = _atomic.read_capped(config_file, MAX_CONFIG_BYTES)
        legacy = folder / LEGACY_WEIGHTS_NAME
        if text is None:
            raise no_config from None
        if not legacy.is_file():
            raise _no_weights(folder) from None
        return _parse_config(text, config_file), _legacy_tensors(legacy), legacy
    if text is None:
        raise no_config
    return _parse_config(text, config_file), _tensors(data, weights), weights


def read_config(path: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None) -> AdapterConfig:
    """The config of the adapter ``path`` (the one its weights were saved with, as :func:`load` reads it).

    ``path`` is a folder or a Hub id (``revision``/``subfolder`` as in :func:`load`); for a Hub id only
    ``adapter_config.json`` is fetched.

    Raises:
        FileNotFoundError: the folder or its ``adapter_config.json`` does not exist.
        ImportError: ``path`` is a Hub id and huggingface_hub is not installed.
        ValueError: the file is not valid JSON or not a supported PEFT adapter config.
    """
    folder = _hub.resolve(path, revision=revision, subfolder=subfolder, weights=False).folder
    if folder.is_dir() and not (folder / WEIGHTS_NAME).is_file():
        text = _atomic.read_capped(folder / CONFIG_NAME, MAX_CONFIG_BYTES)
        if text is not None:
            return _parse_config(text, folder / CONFIG_NAME)
    return read_checkpoint(folder)[0]


def read_tensors(
    path: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None
) -> tuple[dict[str, Tensor], Path]:
    """The raw tensors of the adapter ``path`` (a folder or a Hub id, as in :func:`load`) and their file.

    Raises:
        FileNotFoundError: neither ``adapter_model.safetensors`` nor ``adapter_model.bin`` exists.
        ImportError: ``path`` is a Hub id and huggingface_hub is not installed.
        ValueError: the file is truncated, corrupt, or (``.bin``) holds anything but tensors.
    """
    folder = _hub.resolve(path, revision=revision, subfolder=subfolder).folder
    weights = folder / WEIGHTS_NAME
    try:
        data = weights.read_bytes()
    except FileNotFoundError:
        legacy = folder / LEGACY_WEIGHTS_NAME
        if legacy.is_file():
            return _legacy_tensors(legacy), legacy
        raise _no_weights(folder) from None
    return _tensors(data, weights), weights


def load(
    path_or_hub_id: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None
) -> tuple[Params, AdapterConfig]:
    """Read a PEFT-format adapter (written by PEFT or funcpeft), from a folder or the Hub: ``params, config``.

    ``path_or_hub_id`` is resolved as ``peft.PeftModel.from_pretrained`` resolves it: a path that exists is the
    adapter folder (joined with ``subfolder``; ``revision`` is ignored, as in PEFT); otherwise a repo id
    (``"org/name"``) is fetched through ``huggingface_hub`` and its cache at ``revision`` (a branch, tag or commit;
    default the repo's default branch), from ``subfolder`` of the repo: ``adapter_config.json`` and
    ``adapter_model.safetensors``, else the legacy ``adapter_model.bin``. With ``HF_HUB_OFFLINE=1`` only the cache
    is read. huggingface_hub is an optional dependency: ``pip install 'funcpeft[hub]'``.

    The config is the one the weights were saved with, also while another process saves to the folder or after
    a save was interrupted (see the module docstring). Base-model weights PEFT writes beside the adapter are
    left out (:func:`read_base_weights`). Shapes are checked against the model on the first ``fwd`` call.

    Raises:
        FileNotFoundError: the folder, its config or its weights are missing; ``path_or_hub_id`` is neither an
            existing path nor a repo id; the Hub repo, revision or files do not exist; or the Hub is offline (or
            unreachable) and the cache lacks them (the message names the id, revision and subfolder).
        ImportError: ``path_or_hub_id`` is a Hub id and huggingface_hub is not installed (the message names the
            ``hub`` extra).
        ValueError: an unreadable, truncated, oversized or too deeply nested file (named), an unsupported
            ``peft_type`` or PEFT feature (``ensure_weight_tying`` tying adapter layers), unexpected keys (another
            method's, or keys still holding an adapter name) or tensors missing for an adapted module (named), a
            weights file without adapter tensors, or a torn checkpoint (a folder that no funcpeft save leaves; the
            message says to save it again).
    """
    config, state, source = read_checkpoint(path_or_hub_id, revision=revision, subfolder=subfolder)
    try:
        params = from_peft_state_dict(state, config)
    except ValueError as err:
        raise ValueError(f"{str(source)!r}: {err}") from err
    if not params:
        raise ValueError(
            f"{str(source)!r} holds no adapter tensors"
            f"{f' (only the base-model weights {sorted(state)[:3]})' if state else ''}; the file was written empty or "
            "by another tool. Save the adapter again."
        )
    return params, config


def read_base_weights(
    path: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None
) -> dict[str, Tensor]:
    """The base-model weights PEFT saved beside the adapter in ``path``, by the model's state-dict keys.

    PEFT's ``save_embedding_layers`` (default ``"auto"``) writes the embedding's own weight when an embedding is
    targeted (``<path>.base_layer.weight``) or the vocabulary was resized (``<path>.weight``, input and output
    embeddings). :func:`load` leaves them out of ``params``; ``model.load_state_dict(read_base_weights(path),
    strict=False)`` gives a model (resized to the same vocabulary) the weights PEFT would load into it.

    ``path`` is a folder or a Hub id (``revision``/``subfolder`` as in :func:`load`).

    Raises:
        FileNotFoundError, ImportError, ValueError: as :func:`load`.
    """
    config, state, _ = read_checkpoint(path, revision=revision, subfolder=subfolder)
    return {key: value.detach().clone() for key, value in _split(state, config)[1].items()}
