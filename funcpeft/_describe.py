"""Reading an adapter checkpoint into the facts ``funcpeft inspect`` reports (see :mod:`funcpeft.__main__`).

:func:`describe` resolves a folder or Hub id, reads it through :mod:`funcpeft.io`'s readers (so it sees exactly
what :func:`funcpeft.load` would load) and returns a JSON-friendly dict: method, targets, parameter counts, dtypes,
file sizes, and per method (``_METHOD_FACTS``) the ranks, scalings and options read from the tensors and the config.
Anything :func:`funcpeft.load` would refuse is an :class:`InspectError` with a one-line message.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from funcpeft import _hub
from funcpeft._targeting import pattern_value
from funcpeft.config import AdaLoraConfig, AdapterConfig, LoraConfig
from funcpeft.io import (
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    Params,
    from_peft_state_dict,
    read_checkpoint,
)
from funcpeft.methods import lycoris_inspect
from funcpeft.methods.base import method_for
from funcpeft.methods.loha import LoHaConfig
from funcpeft.methods.lokr import LoKrConfig
from funcpeft.methods.lora_params_io import checkpoint_owners
from funcpeft.methods.oft import OFTConfig

__all__ = ["InspectError", "describe"]


class InspectError(Exception):
    """An adapter folder that cannot be read; the message is shown to the user as one line."""


# ----- facts ---------------------------------------------------------------------------------------------------


def describe(
    path: str | Path,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
) -> dict[str, Any]:
    """The facts ``funcpeft inspect`` reports about the adapter ``path``, as a JSON-friendly dict.

    ``path`` is an adapter folder or a Hub id, resolved as :func:`funcpeft.load` resolves it (``revision``,
    ``subfolder``); ``facts["path"]`` is the folder read (for a Hub id, the cache's snapshot folder) and
    ``facts["hub"]`` says where on the Hub it came from (``None`` for a local folder).

    Raises:
        InspectError: the folder is missing, not an adapter, unreadable, or one :func:`funcpeft.load` refuses;
            the Hub id cannot be resolved (not in the cache offline, no such repo, huggingface_hub missing).
    """
    try:
        origin = _hub.resolve(path, revision=revision, subfolder=subfolder)
    except (OSError, ImportError, ValueError, TypeError) as err:
        raise InspectError(" ".join(str(err).split())) from err
    folder = origin.folder
    for name in (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        file = folder / name
        try:
            odd = file.exists() and not file.is_file()  # a directory or a pipe: reading it would fail or block
        except OSError as err:  # e.g. permission denied on the folder
            raise InspectError(f"{str(file)!r}: {err}") from err
        if odd:
            kind = "a directory" if file.is_dir() else "not a regular file"
            raise InspectError(f"{str(file)!r} is {kind}; an adapter folder holds {name} as a file.")
    try:
        config, state, source = read_checkpoint(folder)  # one consistent read, even while a save runs
        try:
            params = from_peft_state_dict(state, config)
        except ValueError as err:
            raise ValueError(f"{str(source)!r}: {err}") from err
    # RuntimeError: from_peft_state_dict makes every tensor require grad, which torch refuses for integer
    # tensors (e.g. a BatchNorm's `num_batches_tracked` in `modules_to_save`).
    except (OSError, ValueError, RuntimeError) as err:
        message = " ".join(str(err).split())
        if str(folder) not in message:
            message = f"{str(folder)!r}: {message}"
        raise InspectError(message) from err

    method = method_for(config)
    # Checkpoints list modules in key order (h.10 before h.2); report them in layer order.
    params = {p: params[p] for p in sorted(params, key=_natural)}
    # the root entry "" holds tensors the tuner shares and does not train (VeRA's frozen projections)
    shared = {n: list(t.shape) for n, t in params.pop("", {}).items()}
    targets = [p for p, entry in params.items() if any(name in method.peft_keys for name in entry)]
    adapter = sum(t.numel() for e in params.values() for n, t in e.items() if n in method.peft_keys)
    copies = {p: sorted(n for n in e if n not in method.peft_keys) for p, e in params.items()}
    copies = {p: names for p, names in copies.items() if names}
    copy_count = sum(params[p][n].numel() for p, names in copies.items() for n in names)
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for e in params.values() for t in e.values())
    facts: dict[str, Any] = {
        "path": str(folder),
        "hub": None
        if origin.repo_id is None
        else {
            "repo_id": origin.repo_id,
            "revision": origin.revision,
            "commit": origin.commit,
            "subfolder": origin.subfolder,
        },
        "peft_type": config.peft_type,
        "task_type": getattr(config, "task_type", None),
        "targets": targets,
        "target_modules": _jsonable(getattr(config, "target_modules", None)),
        "parameters": {"total": adapter + copy_count, "adapter": adapter, "full_copies": copy_count},
        "full_copies": copies,
        "shared": shared,
        "dtypes": dict(sorted(dtypes.items())),
        "files": {
            "weights": {"name": source.name, "bytes": source.stat().st_size},
            "config": {"name": CONFIG_NAME, "bytes": (folder / CONFIG_NAME).stat().st_size},
        },
        "warnings": [],
    }
    method_facts = _METHOD_FACTS.get(type(config))
    if method_facts is not None:
        try:
            facts.update(method_facts(params, config, targets, facts["warnings"]))
        except ValueError as err:
            raise InspectError(f"{str(source)!r}: {err}") from err
    return facts


def _lora_facts(params: Params, config: LoraConfig, targets: list[str], warnings: list[str]) -> dict[str, Any]:
    """Ranks from the tensors (A is (r, ...)), alphas from the config and the resulting scaling, per module.

    Raises:
        ValueError: a module's A/B tensors are not LoRA matrices of one rank >= 1 (named).
    """
    ranks: dict[str, int] = {}
    scaling: dict[str, float] = {}
    # trainable tokens (funcpeft.methods.lora_tokens): the number of new rows per embedding, no rank
    tokens = {
        p: int(params[p]["trainable_tokens_delta"].shape[0]) for p in targets if "trainable_tokens_delta" in params[p]
    }
    # target_parameters (funcpeft.methods.lora_params): A is (r * experts, in); the experts need the model
    owners = {p: {n: list(t.shape) for n, t in params[p].items()} for p in checkpoint_owners(config, params)}
    for path in targets:
        entry = params[path]
        if path in tokens or path in owners:
            continue
        r = _lora_rank(path, entry)
        expected = pattern_value(config.rank_pattern, path, config.r)
        if r != expected:
            warnings.append(
                f"{path}: the tensors have rank {r} but the config gives r={expected}; neither PEFT nor a fwd "
                "built from this config would accept them."
            )
        alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
        ranks[path] = r
        scaling[path] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return {
        "r": config.r,
        "rank_pattern": dict(config.rank_pattern),
        "ranks": ranks,
        "lora_alpha": config.lora_alpha,
        "alpha_pattern": dict(config.alpha_pattern),
        "scaling": scaling,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
        "bias": config.bias,
        "modules_to_save": _jsonable(config.modules_to_save),
        "trainable_tokens": tokens,
        "trainable_token_indices": _jsonable(config.trainable_token_indices),
        "target_parameters": _jsonable(config.target_parameters),
        "parameter_adapters": owners,
    }


def _lora_rank(path: str, entry: Mapping[str, Any]) -> int:
    """The rank of a LoRA entry: A is ``(r, in, ...)`` and B ``(out, r / groups, ...)``, with ``r >= 1``."""
    names = ("lora_embedding_A", "lora_embedding_B") if "lora_embedding_A" in entry else ("lora_A", "lora_B")
    a, b = entry.get(names[0]), entry.get(names[1])
    if a is None or b is None:
        raise ValueError(f"module {path!r} has {sorted(entry)} but a LoRA module needs both {names[0]} and {names[1]}.")
    for name, tensor in zip(names, (a, b), strict=True):
        if tensor.dim() < 2:
            raise ValueError(
                f"`{path}.{name}` has shape {tuple(tensor.shape)}, but LoRA's A and B are matrices (at least 2-D)."
            )
    r, b_rank = int(a.shape[0]), int(b.shape[1])
    if r == 0:
        raise ValueError(
            f"module {path!r} has rank-0 LoRA tensors ({names[0]} {tuple(a.shape)}); a LoRA module needs r >= 1, "
            "and neither PEFT nor funcpeft builds one with r = 0."
        )
    if b_rank == 0 or r % b_rank:
        raise ValueError(
            f"module {path!r}: {names[1]} {tuple(b.shape)} does not fit {names[0]} {tuple(a.shape)} (rank {r})."
        )
    return r


def _adalora_facts(params: Params, config: AdaLoraConfig, targets: list[str], warnings: list[str]) -> dict[str, Any]:
    """Per-module ranks: the triplets a module's ``rank_pattern`` mask keeps, else its tensors' rank.

    A pruned AdaLoRA adapter's ranks differ per module (some may be 0); PEFT records them as ``rank_pattern``
    masks and saves the tensors cut to them. A checkpoint saved before any pruning has no masks: every module
    then has the tensors' rank, ``init_r``. Disagreements between the masks, ``init_r`` and the tensors are warnings.

    Raises:
        ValueError: a module's A/E/B tensors are not AdaLoRA's ``(r, in)``, ``(r, 1)``, ``(out, r)`` (named).
    """
    masks = dict(config.rank_pattern or {})
    ranks: dict[str, int] = {}
    sources: dict[str, str] = {}
    for path in targets:
        tensor_rank = _adalora_rank(path, params[path])
        mask = masks.pop(f"{path}.lora_E", None)
        if mask is None:
            ranks[path], sources[path] = tensor_rank, "tensors"
            if tensor_rank != config.init_r:
                warnings.append(
                    f"{path}: the tensors have rank {tensor_rank}, but the config has no `rank_pattern` mask for it, "
                    f"so it gives init_r={config.init_r}."
                )
            continue
        ranks[path], sources[path] = sum(mask), "rank_pattern"
        if len(mask) != config.init_r:
            warnings.append(f"{path}: its `rank_pattern` mask has {len(mask)} flags, but init_r={config.init_r}.")
        if tensor_rank != sum(mask):
            warnings.append(
                f"{path}: `rank_pattern` keeps {sum(mask)} of {len(mask)} triplets, but the tensors have rank "
                f"{tensor_rank}."
            )
    for key in masks:
        warnings.append(f"`rank_pattern` key {key!r} names no adapted module of the checkpoint.")
    scaling = (float(config.lora_alpha) if config.lora_alpha > 0 else None, float(config.init_r) + 1e-5)
    return {
        "init_r": config.init_r,
        "target_r": config.target_r,
        "ranks": ranks,
        "rank_source": sources,
        "budget": {
            "kept": sum(ranks.values()),
            "initial": config.init_r * len(targets),
            "target": config.target_r * len(targets),
        },
        "lora_alpha": config.lora_alpha,
        # PEFT: lora_alpha / (ranknum + 1e-5) with ranknum = init_r; lora_alpha <= 0 scales by the module's rank
        "scaling": {p: (scaling[0] if scaling[0] is not None else r) / scaling[1] for p, r in ranks.items()},
        "total_step": config.total_step,
        "bias": config.bias,
        "modules_to_save": _jsonable(config.modules_to_save),
    }


def _adalora_rank(path: str, entry: Mapping[str, Any]) -> int:
    """The rank of an AdaLoRA entry: ``lora_A`` (r, in), ``lora_E`` (r, 1), ``lora_B`` (out, r); ``r`` may be 0."""
    missing = [n for n in ("lora_A", "lora_E", "lora_B") if n not in entry]
    if missing:
        raise ValueError(f"module {path!r} has {sorted(entry)} but an AdaLoRA module needs lora_A, lora_E and lora_B.")
    a, e, b = entry["lora_A"], entry["lora_E"], entry["lora_B"]
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"module {path!r}: AdaLoRA's lora_A and lora_B are matrices, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    r = int(a.shape[0])
    if tuple(e.shape) != (r, 1) or int(b.shape[1]) != r:
        raise ValueError(
            f"module {path!r}: lora_E {tuple(e.shape)} and lora_B {tuple(b.shape)} do not fit lora_A "
            f"{tuple(a.shape)} (rank {r}: lora_E ({r}, 1), lora_B (out, {r}))."
        )
    return r


def _oft_facts(params: Params, config: OFTConfig, targets: list[str], warnings: list[str]) -> dict[str, Any]:
    """Per-module block sizes and stored block counts from the tensors: ``oft_R`` is ``(r, b(b-1)/2)``, or
    ``(1, b(b-1)/2)`` with ``block_share`` (the block count then depends on the model's features).

    Raises:
        ValueError: a module's tensor is not an OFT block matrix (named, with its shape).
    """
    sizes: dict[str, int] = {}
    blocks: dict[str, int] = {}
    for path in targets:
        entry = params[path]
        name = "oft_embedding_R" if "oft_embedding_R" in entry else "oft_R"
        t = entry.get(name)
        n = int(t.shape[-1]) if t is not None and t.dim() == 2 else -1
        b = (1 + math.isqrt(1 + 8 * n)) // 2 if n >= 0 else 0
        if b * (b - 1) // 2 != n or n < 0:
            shape = None if t is None else tuple(t.shape)
            raise ValueError(
                f"module {path!r}: {name} has shape {shape}, but OFT stores (blocks, b(b-1)/2) for a block size b."
            )
        sizes[path], blocks[path] = b, int(t.shape[0])
        if config.block_share and blocks[path] != 1:
            warnings.append(f"{path}: block_share is set but {name} holds {blocks[path]} blocks; PEFT expects 1.")
    options = ("block_share", "coft", "eps", "use_cayley_neumann", "num_cayley_neumann_terms", "bias")
    return {
        "oft_block_size": config.oft_block_size,
        "r": config.r,
        "block_sizes": sizes,
        "blocks": blocks,
        **{name: getattr(config, name) for name in options},
        "modules_to_save": _jsonable(config.modules_to_save),
    }


_METHOD_FACTS: dict[type[AdapterConfig], Callable[[Params, Any, list[str], list[str]], dict[str, Any]]] = {
    LoraConfig: _lora_facts,
    AdaLoraConfig: _adalora_facts,
    OFTConfig: _oft_facts,
    LoHaConfig: lycoris_inspect.facts,
    LoKrConfig: lycoris_inspect.facts,
}


def _natural(path: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in path.split("."))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value
