"""Which modules an adapter config adapts, and with which per-module rank and alpha (PEFT's matching rules).

- a list entry matches a module path exactly or as a ``.``-separated suffix (``"q_proj"`` matches
  ``"model.layers.0.self_attn.q_proj"``); a string is a regex that must match the whole path;
  ``"all-linear"`` is every ``nn.Linear``/GPT-2 ``Conv1D`` except the output head.
- ``exclude_modules`` uses the same rules; modules inside ``modules_to_save`` are never adapted.
- ``modules_to_save`` entries and the head names a ``task_type`` adds (:data:`funcpeft.config.TASK_HEADS`) match
  with PEFT's rule for them (``_set_trainable``): a plain string suffix of the path, so ``"classifier"`` also trains
  DistilBERT's ``pre_classifier`` and ``"head"`` a ``lm_head``, as PEFT does (a PEFT checkpoint holds their copies).
  Only the head names the model has count: one that matches nothing is not an error, also when it is a
  ``modules_to_save`` entry (PEFT's SEQ_CLS folders list both ``classifier`` and ``score``).
- ``layers_to_transform`` keeps list matches whose first ``<layers_pattern>.<index>.`` segment has a listed index,
  as in PEFT, except a module whose whole path is a list entry (adapted whatever its layer); an empty list keeps
  every match (PEFT's rule).
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched against the end of the path.

Unlike PEFT, a list entry that matches no module at all is an error (it is almost always a typo), and the
message lists the closest module names. Entries that only restrict or tune the selection and match nothing
(``exclude_modules`` entries, ``rank_pattern``/``alpha_pattern`` keys, ``layers_to_transform`` indices) are
reported with a :class:`~funcpeft.FuncpeftWarning` naming the entry, as PEFT warns for most of them.

The building blocks (default targets, ``"all-linear"``, path matching, layer indices, pattern keys) live in
:mod:`funcpeft._target_rules`; this module combines them.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Collection, Iterable, Mapping

from torch import nn

from funcpeft._target_rules import DEFAULT_LORA_TARGETS as DEFAULT_LORA_TARGETS
from funcpeft._target_rules import (
    _all_linear,
    _layer_index,
    _matches,
    _pattern_match,
    _similar,
    _suffix_match,
    pattern_value,
)
from funcpeft._warnings import FuncpeftWarning
from funcpeft.config import AdaLoraConfig, AdapterConfig, LoraConfig
from funcpeft.config import task_heads as _task_heads

__all__ = [
    "copy_overrides",
    "find_modules_to_save",
    "find_targets",
    "pattern_value",
    "saved_modules",
    "saves_module",
    "trainable_copies",
    "user_warning",
]


def find_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    """Paths of the outermost modules whose path ends with an entry of ``names`` (a plain string suffix, as PEFT).

    Raises:
        ValueError: an entry matches no module (naming it and the closest module names).
    """
    return _outermost(model, names or (), ())


def saved_modules(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The module paths ``config`` trains in full on ``model``: its ``modules_to_save`` and its task's head.

    The effective list of PEFT's task models (``PeftModelForSequenceClassification`` appends ``classifier`` and
    ``score`` to ``modules_to_save``), resolved here instead of written into the config; see the module docstring.

    Raises:
        ValueError: a ``modules_to_save`` entry that is not a task head name matches no module.
    """
    heads = _task_heads(config)
    own = [name for name in getattr(config, "modules_to_save", None) or () if name not in heads]
    return _outermost(model, own, heads)


def saves_module(config: AdapterConfig, path: str) -> bool:
    """Whether ``config`` trains the module at ``path`` in full, by its path alone (the rules of
    :func:`saved_modules`, for checkpoints read without the model)."""
    heads = _task_heads(config)
    own = [name for name in getattr(config, "modules_to_save", None) or () if name not in heads]
    return any(path.endswith(name) for name in (*own, *heads))


def _outermost(model: nn.Module, names: Iterable[str], heads: Iterable[str]) -> list[str]:
    """The outermost modules whose path ends with a name (each must match one) or a head (optional): PEFT's
    ``_set_trainable`` compares plain string suffixes."""
    names, heads = list(names), list(heads)
    if not names and not heads:
        return []
    paths = [p for p, _ in model.named_modules() if p]
    for name in names:
        if not any(p.endswith(name) for p in paths):
            raise ValueError(
                f"`modules_to_save` entry {name!r} matched no module of {type(model).__name__}; "
                f"similar names: {_similar(name, paths)}."
            )
    found: list[str] = []
    for path in paths:
        if any(path.endswith(name) for name in (*names, *heads)) and not any(path.startswith(f + ".") for f in found):
            found.append(path)
    return found


def user_warning(message: str) -> None:
    """Warn with a :class:`FuncpeftWarning` attributed to the first caller outside funcpeft (the user's line)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "funcpeft":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, FuncpeftWarning, stacklevel=level - 1 if frame is None else level)


def find_targets(
    model: nn.Module,
    config: AdapterConfig,
    default_targets: Mapping[str, list[str]],
    *,
    warn: bool = True,
    task_heads: bool = True,
) -> list[str]:
    """The module paths ``config`` adapts, in ``model.named_modules()`` order.

    Args:
        warn: report entries that match nothing (see the module docstring); callers that only need the targets
            for a check pass False, so that ``adapt`` warns once.
        task_heads: leave the task's head out of the targets, as PEFT's task models (``get_peft_model``) do: it
            is trained in full (:func:`saved_modules`). False: only ``modules_to_save`` itself is left out, as in
            PEFT's ``inject_adapter_in_model``, which has no task model.

    Raises:
        ValueError: ``target_modules`` is empty, or None for a model without a known default, a list entry or the
            regex matches no module, or nothing is left after exclusions.
    """
    spec = config.target_modules
    paths = [p for p, _ in model.named_modules() if p]
    if getattr(config, "target_parameters", None) and _parameters_only(model, spec, default_targets):
        return []  # LoRA's target_parameters alone (funcpeft.methods.lora_params), as PEFT allows
    if spec is not None and not isinstance(spec, str) and not spec:
        raise ValueError(
            f"`target_modules` is empty ({spec!r}), so there is nothing to adapt; list module names such as "
            "['q_proj', 'v_proj'], pass a regex or 'all-linear', or pass None for the architecture's default targets."
        )
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in default_targets:
            what = f"model_type {model_type!r}" if model_type else f"a {type(model).__name__}"
            raise ValueError(
                f"`target_modules` is None and funcpeft has no default targets for {what}; pass "
                "`target_modules`, e.g. a list of module names such as ['q_proj', 'v_proj'] or 'all-linear'."
            )
        spec = default_targets[model_type]
    elif isinstance(spec, str) and spec.lower() == "all-linear":
        spec = _all_linear(model, config)
        if not spec:
            raise ValueError(
                f"`target_modules='all-linear'` found no nn.Linear or Conv1D layer in {type(model).__name__} "
                "(other than its output head)."
            )

    if isinstance(spec, str):
        if not any(re.fullmatch(spec, p) for p in paths):
            raise ValueError(
                f"`target_modules` regex {spec!r} matched no module path of {type(model).__name__} (it must match "
                f"the whole path); module paths look like: {', '.join(paths[:6])}."
            )
    else:
        for name in spec:
            if not any(_suffix_match(p, [name]) for p in paths):
                raise ValueError(
                    f"`target_modules` entry {name!r} matched no module of {type(model).__name__}; "
                    f"similar names: {_similar(name, paths)}."
                )

    saved = saved_modules(model, config) if task_heads else find_modules_to_save(model, config.modules_to_save)
    exclude = config.exclude_modules
    wanted = _wanted_layers(config)
    # PEFT's rule: a list entry equal to the whole path adapts that module whatever its layer index.
    listed = set(config.target_modules) if _is_list(config.target_modules) else set()
    targets = []
    for path in paths:
        if exclude and _matches(exclude, path):
            continue
        if any(path == s or path.startswith(s + ".") for s in saved):
            continue
        if not _matches(spec, path):
            continue
        in_layers = _layer_index(path, getattr(config, "layers_pattern", None)) in (wanted or ())
        if wanted is not None and not isinstance(spec, str) and not in_layers and path not in listed:
            continue
        targets.append(path)
    if not targets:
        raise ValueError(
            f"No module of {type(model).__name__} is left to adapt: `target_modules` matched, but "
            "`exclude_modules`, `modules_to_save` or `layers_to_transform` removed every match."
        )
    if warn:
        _warn_unmatched(model, config, spec, paths, targets)
        if task_heads:
            _warn_headless(model, config, saved)
    return targets


def _is_list(spec: object) -> bool:
    return spec is not None and not isinstance(spec, str)


def _wanted_layers(config: AdapterConfig) -> set[int] | None:
    """The layer indices ``layers_to_transform`` keeps, or None for all: as in PEFT, an empty list restricts
    nothing (``check_target_module_exists`` only filters by layer for a non-empty list)."""
    layers = getattr(config, "layers_to_transform", None)
    if isinstance(layers, int):
        return {layers}
    return set(layers) if layers else None


def _parameters_only(model: nn.Module, spec: object, default_targets: Mapping[str, list[str]]) -> bool:
    """Whether a config with ``target_parameters`` adapts no module: ``target_modules=[]``, or None for a model
    without PEFT's default targets (for a known architecture PEFT adds the defaults, and so does funcpeft)."""
    if spec is None:
        return getattr(getattr(model, "config", None), "model_type", None) not in default_targets
    return not isinstance(spec, str) and not spec


def _warn_headless(model: nn.Module, config: AdapterConfig, saved: list[str]) -> None:
    """Warn when a task type's head trains nothing: the model has none of its names and no ``modules_to_save``.

    PEFT then trains no head, silently: a classifier left at its random initialisation.
    """
    heads = _task_heads(config)
    if heads and not saved:
        user_warning(
            f"`task_type={config.task_type!r}` trains the task head in full, as PEFT's task models do, by the module "
            f"names {list(heads)}, but {type(model).__name__} has no module named so: no head is trained (PEFT trains "
            "none either). If the model has a freshly initialised head, add its name to `modules_to_save`."
        )


def _warn_unmatched(
    model: nn.Module, config: AdapterConfig, spec: str | list[str], paths: list[str], targets: list[str]
) -> None:
    """A :func:`user_warning` for each entry that selects or tunes nothing (the module docstring's list)."""
    name = type(model).__name__
    exclude = config.exclude_modules
    if isinstance(exclude, str) and not any(re.fullmatch(exclude, p) for p in paths):
        user_warning(
            f"`exclude_modules` regex {exclude!r} matched no module path of {name} (it must match the whole "
            "path), so it excludes nothing."
        )
    elif exclude and not isinstance(exclude, str):
        for entry in exclude:
            if not any(_suffix_match(p, [entry]) for p in paths):
                user_warning(
                    f"`exclude_modules` entry {entry!r} matched no module of {name}, so it excludes nothing; "
                    f"similar names: {_similar(entry, paths)}."
                )
    wanted = _wanted_layers(config)
    if wanted is not None and not isinstance(spec, str):
        pattern = getattr(config, "layers_pattern", None)
        found = {_layer_index(p, pattern) for p in paths if _suffix_match(p, spec)} - {None}
        for index in sorted(wanted):
            if index not in found:
                user_warning(
                    f"`layers_to_transform` index {index} matched no layer: the modules `target_modules` matches "
                    f"have layer indices {sorted(found)} (layers_pattern={pattern!r}), so it adapts nothing."
                )
    if isinstance(config, LoraConfig) and not isinstance(config, AdaLoraConfig):
        entries = config.target_parameters or ()  # their patterns match parameter paths, as in PEFT
        adapted = targets + [n for n, _ in model.named_parameters() if _suffix_match(n, entries)]
        for field in ("rank_pattern", "alpha_pattern"):
            _warn_unused_keys(field, getattr(config, field), adapted)


def _warn_unused_keys(field: str, pattern: Mapping[str, float], targets: list[str]) -> None:
    """PEFT's warning for keys that match no adapted module, and keys every match of which an earlier key takes
    (the first matching key wins), which PEFT ignores silently."""
    keys = list(pattern)
    first = {t: next((k for k in keys if _pattern_match(k, t)), None) for t in targets}
    for key in keys:
        if key in first.values():
            continue
        shadowed = [t for t in targets if _pattern_match(key, t)]
        if shadowed:
            reason = (
                f"every adapted module it matches ({', '.join(shadowed[:3])}{', ...' if len(shadowed) > 3 else ''}) "
                f"takes its value from an earlier key ({first[shadowed[0]]!r}; the first matching key wins)"
            )
        else:
            reason = (
                "it matched no adapted module (keys are regexes matched against the end of a module path; adapted "
                f"modules look like: {', '.join(targets[:3])})"
            )
        user_warning(f"`{field}` key {key!r} has no effect: {reason}.")


def trainable_copies(
    model: nn.Module, config: AdapterConfig, modules: Mapping[str, nn.Module], layers: Collection[str]
) -> dict[str, tuple[str, ...]]:
    """``{module_path: parameter names}`` the adapter trains as full copies (biases, ``modules_to_save`` and the
    ``task_type``'s head, as PEFT's task models); ``layers``: the adapted module paths."""
    copies: dict[str, tuple[str, ...]] = {}
    saved = saved_modules(model, config)
    for path in saved:
        copies[path] = tuple(name for name, _ in modules[path].named_parameters())
    bias = getattr(config, "bias", "none")
    if bias != "none":
        for path, module in modules.items():
            if bias.endswith("_only") and path not in layers:  # "lora_only", "oft_only": PEFT's rule
                continue
            if any(path == s or path.startswith(s + ".") for s in saved):
                continue
            if module._parameters.get("bias") is not None:
                copies[path] = ("bias",)
    return copies


def copy_overrides(copies: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, tuple[str, str]]]:
    """The view's overrides (:data:`funcpeft._view.Override`) of :func:`trainable_copies`: which parameter
    attribute of which module reads which ``params[owner][name]`` (a name may be dotted: a submodule's)."""
    overrides: dict[str, dict[str, tuple[str, str]]] = {}
    for owner, names in copies.items():
        for name in names:
            sub, _, attr = name.rpartition(".")
            path = f"{owner}.{sub}" if sub else owner
            overrides.setdefault(path, {})[attr] = (owner, name)
    return overrides
