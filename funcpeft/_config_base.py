"""The base every adapter config derives from, and the helpers its subclasses share.

:class:`AdapterConfig` holds the fields and the PEFT ``adapter_config.json`` round trip common to every method;
:data:`TASK_HEADS` / :func:`task_heads` are PEFT's task-model head names, and :func:`check_token_indices` checks
token-index fields. Re-exported by :mod:`funcpeft.config`, the module users import them from (see its docstring
for the task heads).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from funcpeft._validate import check_bool, check_names, check_regex, check_task_type, is_int, plain_numbers

__all__ = ["TASK_HEADS", "AdapterConfig", "TargetSpec", "check_token_indices", "task_heads"]

_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES

TargetSpec = str | list[str] | tuple[str, ...] | set[str] | frozenset[str] | None

# The module names PEFT's task models add to `modules_to_save` (peft_model.py: PeftModelForSequenceClassification,
# PeftModelForTokenClassification: ["classifier", "score"]; PeftModelForQuestionAnswering: ["qa_outputs"]).
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


@dataclass(frozen=True)
class AdapterConfig:
    """Fields every adapter method shares: which modules to adapt and which to train as full copies."""

    peft_type: ClassVar[str] = ""
    # Fields PEFT writes to adapter_config.json that funcpeft does not model, with the values meaning "unused".
    _peft_extras: ClassVar[dict[str, Any]] = {}
    # Numeric fields (or dicts/lists of numbers) stored as plain Python numbers.
    _numeric: ClassVar[tuple[str, ...]] = ()

    def _validate_common(self) -> None:
        for name in self._numeric:
            object.__setattr__(self, name, plain_numbers(name, getattr(self, name)))
        check_names("target_modules", self.target_modules, allow_str=True)
        check_names("exclude_modules", self.exclude_modules, allow_str=True)
        check_names("modules_to_save", self.modules_to_save, allow_str=False)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        # A string is a regex PEFT full-matches against each module path ("all-linear" aside); list entries are
        # compared as plain strings.
        if isinstance(self.target_modules, str) and self.target_modules.lower() != "all-linear":
            check_regex("target_modules", self.target_modules)
        if isinstance(self.exclude_modules, str):
            check_regex("exclude_modules", self.exclude_modules)
        check_task_type(getattr(self, "task_type", None))

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with ``changes`` applied (and validated), like ``dataclasses.replace``."""
        return dataclasses.replace(self, **changes)

    def to_peft_dict(self, target_modules: list[str] | str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT writes for this config: every field PEFT records.

        ``modules_to_save`` is recorded as PEFT's task models record it: the config's own entries followed by the
        task head names (:data:`TASK_HEADS`) they lack, so that tools which read the file without adding the heads
        themselves (``inject_adapter_in_model``, transformers' ``load_adapter``) still restore the head.

        Args:
            target_modules: what to record as ``target_modules`` instead of the config's own (PEFT records the
                resolved module names when the config had ``None`` or ``"all-linear"``).
        """
        out = {**self._peft_extras, **self.to_dict(), "peft_type": self.peft_type}
        if target_modules is not None:
            out["target_modules"] = target_modules
        heads = task_heads(self)
        if heads:
            own = list(out.get("modules_to_save") or [])
            out["modules_to_save"] = own + [name for name in heads if name not in own]
        return dict(sorted(out.items()))

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], *, source: str = "adapter_config.json") -> AdapterConfig:
        """Build a config from PEFT's ``adapter_config.json`` content.

        Raises:
            ValueError: ``peft_type`` is not this config's, or the file uses a PEFT feature funcpeft does not
                implement (a field outside funcpeft's config set to a non-default value).
        """
        if data.get("peft_type") != cls.peft_type:
            raise ValueError(f"{source} has `peft_type` {data.get('peft_type')!r}, expected {cls.peft_type!r}.")
        _check_weight_tying(data, source)
        own = {f.name for f in dataclasses.fields(cls)}
        ignored = {
            "peft_type",
            "peft_version",
            "auto_mapping",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "megatron_core",
            "qalora_group_size",
            "ensure_weight_tying",
            "runtime_config",
        }
        for key, value in data.items():
            if key in own or key in ignored:
                continue
            if not _unused(value, cls._peft_extras.get(key)):
                raise ValueError(
                    f"{source} sets `{key}`={value!r}, a PEFT feature funcpeft does not support; this adapter "
                    "cannot be loaded faithfully."
                )
        kwargs = {k: v for k, v in data.items() if k in own}
        for key in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(kwargs.get(key), tuple):
                kwargs[key] = list(kwargs[key])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-friendly values (sets become sorted lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _unused(value: Any, default: Any) -> bool:
    """Whether an ``adapter_config.json`` value of a field funcpeft does not model leaves the feature off: None,
    False, an empty dict/list, or the field's PEFT default of the same type (compared by type as well, since
    ``0 == False`` and ``1 == True`` in Python: a ``0`` is not "off" for a field whose default is None)."""
    if value is None or value is False or (type(value) in (dict, list) and not value):
        return True
    return type(value) is type(default) and value == default


def _names_embedding(spec: object) -> bool:
    """Whether PEFT counts ``spec`` (``target_modules`` / ``modules_to_save``) as naming an input embedding or
    output head (its ``EMBEDDING_LAYER_NAMES`` rule in ``BaseTuner._check_tied_modules``)."""
    if isinstance(spec, str):
        try:
            return any(re.fullmatch(spec, name) for name in _EMBEDDING_LAYER_NAMES)
        except re.error:
            return False  # the config's own validation names the bad regex
    return isinstance(spec, list) and any(
        isinstance(m, str) and m.split(".")[-1] in _EMBEDDING_LAYER_NAMES for m in spec
    )


def _check_weight_tying(data: dict[str, Any], source: str) -> None:
    """Refuse PEFT's ``ensure_weight_tying=True`` where it ties adapter layers: PEFT then shares one trained copy
    (``modules_to_save``) or one LoRA between a tied input embedding and output head, which funcpeft does not do,
    so the adapter would silently compute something else."""
    if data.get("ensure_weight_tying") is not True:
        return
    if data.get("modules_to_save") or _names_embedding(data.get("target_modules")):
        raise ValueError(
            f"{source} sets `ensure_weight_tying`=True with modules_to_save="
            f"{data.get('modules_to_save')!r} and target_modules={data.get('target_modules')!r}: where the model ties "
            "its input embedding to its output head, PEFT then shares their trained copy or LoRA, which funcpeft "
            "does not implement, so this adapter cannot be loaded faithfully. Load it with peft, or train it with "
            "`ensure_weight_tying=False`."
        )


def check_token_indices(name: str, value: Any, allow_dict: bool) -> None:
    """Token indices (PEFT's ``trainable_token_indices`` / ``token_indices``): a non-empty list of distinct
    non-negative ints, or with ``allow_dict`` a non-empty ``{module_name: list}``; None allowed. Bounds need the
    model: ``adapt`` checks them."""
    if value is None:
        return
    if allow_dict and isinstance(value, Mapping):
        if not value:
            raise ValueError(f"`{name}` is an empty dict; give {{module_name: [token indices]}} or None.")
        for key, indices in value.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"`{name}` keys must be non-empty module names, got {key!r}.")
            check_token_indices(f"{name}[{key!r}]", indices, allow_dict=False)
        return
    if not isinstance(value, (list, tuple)) or not all(is_int(i) for i in value):
        what = "a list of token indices or a dict {module_name: [indices]}" if allow_dict else "a list of token indices"
        raise TypeError(f"`{name}` must be {what}, got {value!r}.")
    if not value:
        raise ValueError(
            f"`{name}` is empty: list at least one token index{' (or leave the field None)' if allow_dict else ''}."
        )
    negative = [i for i in value if i < 0]
    if negative:
        raise ValueError(f"`{name}` holds negative indices {negative[:5]}; token indices are 0 to vocab_size - 1.")
    seen: set[int] = set()
    duplicates = sorted({i for i in value if i in seen or seen.add(i)})
    if duplicates:
        raise ValueError(
            f"`{name}` lists {duplicates[:5]} more than once; each token row is trained once, list it once."
        )


def task_heads(config: AdapterConfig) -> tuple[str, ...]:
    """The module names ``config``'s ``task_type`` trains in full besides its ``modules_to_save`` (PEFT's task
    models: :data:`TASK_HEADS`); empty for other task types and for configs without ``modules_to_save``."""
    if not hasattr(config, "modules_to_save"):
        return ()
    return TASK_HEADS.get(getattr(config, "task_type", None), ())
