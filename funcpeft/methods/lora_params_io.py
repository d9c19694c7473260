"""``target_parameters`` entries in checkpoints read without their model (:mod:`funcpeft.methods.lora_params`).

Which entries of a folder adapt parameters rather than modules decides what ``funcpeft inspect`` reports, which
module paths ``save`` records as ``target_modules`` for a config with ``None`` (PEFT must not wrap a parameter's
module as a LoRA module too) and how ``load`` checks the tensors (``lora_A`` has ``r * experts`` rows, and the number
of experts needs the model).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from funcpeft._targeting import pattern_value
from funcpeft.methods.lora_params import PARAM_KEYS, nested_names

__all__ = ["checkpoint_owners", "check_entry"]


def checkpoint_owners(config: Any, entries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The entries of a checkpoint read without its model that adapt ``target_parameters`` (``funcpeft inspect``,
    ``save``'s recorded targets, the fit check): those with nested names; those whose module an entry's module part
    names (``experts`` of ``"experts.gate_up_proj"``) or that only a bare entry (``"w2"``) can name, when
    ``target_modules`` (a list or regex) does not name them; with ``target_modules`` None or ``"all-linear"`` (resolved
    with the model), a bare entry's owner is told from a module LoRA by its ``lora_A`` rows (``r * experts``)."""
    wanted = list(getattr(config, "target_parameters", None) or ())
    if not wanted:
        return []
    modules = config.target_modules
    known = isinstance(modules, (list, tuple, set)) or (isinstance(modules, str) and modules != "all-linear")
    parts = {e.rpartition(".")[0] for e in wanted}
    owners = []
    for path, entry in entries.items():
        if any(name in PARAM_KEYS for name in entry):
            owners.append(path)
            continue
        explicit = any(m and (path == m or path.endswith("." + m)) for m in parts)
        bare = "" in parts
        if known:
            named = (
                any(path == m or path.endswith("." + m) for m in modules)
                if not isinstance(modules, str)
                else re.fullmatch(modules, path) is not None
            )
            if (explicit or bare) and not named:
                owners.append(path)
        elif explicit or (bare and _rows(entry) != pattern_value(config.rank_pattern, path, config.r)):
            owners.append(path)
    return owners


def _rows(entry: Mapping[str, Any]) -> int | None:
    a = entry.get("lora_A")
    return int(a.shape[0]) if a is not None and a.dim() == 2 else None


def check_entry(config: Any, path: str, entry: Mapping[str, Tensor]) -> str | None:
    """What is wrong with a checkpoint entry adapting ``target_parameters`` (read without its model), or None;
    None as well for an entry that adapts a module instead (the caller checks it as usual)."""
    if not checkpoint_owners(config, {path: entry}):
        return ""  # not a parameter adapter
    for name in entry:
        if name not in PARAM_KEYS and name not in ("lora_A", "lora_B"):
            continue
        a_name, b_name = nested_names(name.count("base_layer."))
        a, b = entry.get(a_name), entry.get(b_name)
        if a is None or b is None:
            return f"it holds {name!r} without its pair ({a_name!r}, {b_name!r})"
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            return (
                f"{a_name!r} {tuple(a.shape)} and {b_name!r} {tuple(b.shape)} are not the factors of a parameter "
                "adapter ((r * experts, in) and (out, r * experts))"
            )
    return None
