"""What ``python -m funcpeft inspect`` reports for a LoHa or LoKr adapter (:func:`funcpeft.__main__.describe`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from funcpeft._targeting import pattern_value

__all__ = ["facts"]

# the factors a module stores, by its tensor names, described in words
_FORMS = {
    frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}): "(w1_a w1_b) * (w2_a w2_b)",
    frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}): "CP (hada_t1, hada_t2)",
}


def _form(entry: Mapping[str, Tensor]) -> str:
    names = frozenset(entry)
    if names in _FORMS:
        return _FORMS[names]
    w1 = "w1" if "lokr_w1" in names else "w1_a w1_b"
    w2 = "w2" if "lokr_w2" in names else ("CP (lokr_t2)" if "lokr_t2" in names else "w2_a w2_b")
    return f"kron({w1}, {w2})"


def facts(params: Mapping[str, Mapping[str, Tensor]], config: Any, targets: list[str], warnings: list[str]) -> dict:
    """Per-module rank and scaling (``alpha / r`` after ``rank_pattern``/``alpha_pattern``, as PEFT computes it),
    the factors each module stores, and the options; a warning where a decomposed factor's rank is not the config's
    (neither PEFT nor funcpeft would load it)."""
    ranks: dict[str, int] = {}
    scaling: dict[str, float] = {}
    forms: dict[str, str] = {}
    for path in targets:
        entry = params[path]
        r = pattern_value(config.rank_pattern, path, config.r)
        ranks[path], forms[path] = r, _form(entry)
        scaling[path] = pattern_value(config.alpha_pattern, path, config.alpha) / r
        stored = {int(t.shape[0]) for n, t in entry.items() if n.endswith("_b") and t.dim() >= 1}  # (r, ...)
        if stored - {r}:
            warnings.append(f"{path}: the tensors have rank {sorted(stored)} but the config gives r={r}.")
    options = ["rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights"]
    options += [n for n in ("decompose_both", "decompose_factor", "rank_dropout_scale") if hasattr(config, n)]
    return {
        "r": config.r,
        "rank_pattern": dict(config.rank_pattern),
        "ranks": ranks,
        "alpha": config.alpha,
        "alpha_pattern": dict(config.alpha_pattern),
        "scaling": scaling,
        "forms": forms,
        "options": {name: getattr(config, name) for name in options},
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
    }
