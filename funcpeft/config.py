"""Adapter configurations: frozen dataclasses, validated on construction.

Field names and defaults follow PEFT's configs wherever they overlap, so ``funcpeft.LoraConfig(**kw)`` accepts
the ``kw`` a user would pass to ``peft.LoraConfig``. A config is never rewritten after construction: what the
user wrote is what gets saved, and anything derived from it (the matched modules, per-module ranks) is computed
by :func:`funcpeft.adapt` and kept on ``fwd``. The one change of representation: numbers of other types (numpy
scalars such as ``np.float32(8)``) are stored as the plain Python ``int``/``float`` they equal, so that the config
saves to JSON and compares like one written with Python numbers (:mod:`funcpeft._validate`).

``task_type`` (PEFT's ``TaskType`` values) selects, as in PEFT, the task head a task model trains in full: for
``"SEQ_CLS"``/``"TOKEN_CLS"`` the modules named ``classifier`` or ``score``, for ``"QUESTION_ANS"`` ``qa_outputs``
(:data:`TASK_HEADS`, PEFT's ``PeftModelFor*`` classes). PEFT appends these names to the config's own
``modules_to_save``; funcpeft keeps the field as the user wrote it and resolves the effective list in
:func:`funcpeft.adapt` (:func:`funcpeft._targeting.saved_modules`), using only the head names the model has. The
saved ``adapter_config.json`` records the appended list, as PEFT's does (:meth:`AdapterConfig.to_peft_dict`).

The shared base :class:`AdapterConfig`, :data:`TASK_HEADS`, :func:`task_heads` and :func:`check_token_indices`
live in :mod:`funcpeft._config_base` and are re-exported here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from funcpeft._config_base import TASK_HEADS, AdapterConfig, TargetSpec, check_token_indices, task_heads
from funcpeft._validate import check_bool, check_finite, check_names, check_regex, is_int, is_number

__all__ = ["TASK_HEADS", "AdaLoraConfig", "AdapterConfig", "IA3Config", "LoraConfig", "task_heads"]

_UNSUPPORTED_INITS = ("corda", "loftq", "eva", "mica", "lora_ga")
# Inits that need the base weight (funcpeft.methods.lora_init); "pissa_niter_<N>" is matched separately.
RESIDUAL_INITS = ("pissa", "olora")


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al., 2021, arXiv:2106.09685) with rsLoRA and DoRA, configured as ``peft.LoraConfig``.

    Args:
        r: adapter rank.
        lora_alpha: the scaling numerator: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter branch's input only, active when the model is in train mode.
        target_modules: a list (exact module path or a ``.``-suffix of it), a regex (full match), the string
            ``"all-linear"`` (every Linear/Conv1D but the output head), or None for PEFT's per-architecture
            default of a transformers model.
        exclude_modules: modules never adapted, with the same matching rules.
        bias: ``"none"``, ``"all"`` (every bias becomes a trainable copy) or ``"lora_only"`` (biases of adapted
            modules only).
        fan_in_fan_out: kept for PEFT compatibility. funcpeft reads each layer's weight layout from its type
            (GPT-2's ``Conv1D`` stores (in, out)), so this flag never changes the math.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)`` (Kalajdzievski, 2023, arXiv:2312.03732).
        use_dora: weight-decomposed LoRA (Liu et al., 2024, arXiv:2402.09353) with PEFT's detached column norm.
        init_lora_weights: ``True`` (A kaiming-uniform with a=sqrt(5), B zero; embeddings A zero, B normal),
            ``"gaussian"`` (A normal with std 1/r), or ``False`` (both random: the adapter is not a no-op);
            ``"pissa"`` / ``"pissa_niter_<N>"`` / ``"olora"`` (Linear/Conv1D only; the initial factors ride along
            frozen, the base is never rewritten: :mod:`funcpeft.methods.lora_init`), ``"orthogonal"`` (even r).
        rank_pattern / alpha_pattern: ``{pattern: value}`` overriding ``r`` / ``lora_alpha`` for modules whose
            path ends with ``pattern`` (a regex), first match wins, as in PEFT. A key that matches no adapted
            module is reported by ``adapt`` with a :class:`~funcpeft.FuncpeftWarning` (PEFT warns too).
        layers_to_transform / layers_pattern: restrict list-style ``target_modules`` to these layer indices.
        modules_to_save: modules trained in full; their parameters appear as copies in ``params``.
        lora_bias: give ``lora_B`` a bias (``params[...]["lora_B.bias"]``).
        trainable_token_indices: token rows trained on their own (PEFT's trainable tokens, e.g. for new tokens): a
            list of indices into the input embedding (``get_input_embeddings()``, else a module named
            ``embed_tokens``), or ``{module_name: [indices]}`` (modules whose path ends with the name). The new rows
            are ``params[path]["trainable_tokens_delta"]``; a tied LM head uses them too
            (:mod:`funcpeft.methods.lora_tokens`).
        target_parameters: raw ``nn.Parameter``s to adapt (e.g. MoE experts' ``gate_up_proj`` of shape (experts, ., .)):
            names matched exactly or as a ``.``-suffix of a parameter's full name, as PEFT; combinable with
            ``target_modules`` (``[]`` for none). See :mod:`funcpeft.methods.lora_params`.
        task_type: None or one of PEFT's ``TaskType`` values (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), recorded as PEFT
            records it. As PEFT's task models, ``"SEQ_CLS"``/``"TOKEN_CLS"`` also train the modules named
            ``classifier``/``score`` in full and ``"QUESTION_ANS"`` ``qa_outputs`` (those the model has; see the
            module docstring); ``"SEQ_CLS"`` keeps ``"all-linear"`` off the classifier head.

    Every regex (a string ``target_modules``/``exclude_modules``, the pattern keys, ``layers_pattern``) is compiled
    here, in the form PEFT matches it with: an invalid one is a ``ValueError`` naming the field. Numbers may be
    numpy scalars; they are stored as the Python ``int``/``float`` they equal. ``lora_alpha`` and the
    ``alpha_pattern`` values must be finite.
    """

    peft_type: ClassVar[str] = "LORA"
    _numeric: ClassVar[tuple[str, ...]] = (
        "r", "lora_alpha", "lora_dropout", "rank_pattern", "alpha_pattern", "layers_to_transform",
    )  # fmt: skip
    _peft_extras: ClassVar[dict[str, Any]] = {
        "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": None, "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "inference_mode": True, "kasa_config": None, "layer_replication": None, "loftq_config": {},
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "monteclora_config": None, "qalora_group_size": 16, "revision": None,
        "use_bdlora": None, "use_qalora": False, "velora_config": None,
    }  # fmt: skip

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    bias: Literal["none", "all", "lora_only"] = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    lora_bias: bool = False
    task_type: str | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        self._validate_common()
        check_token_indices("trainable_token_indices", self.trainable_token_indices, allow_dict=True)
        if not is_int(self.r) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}.")
        if not is_number(self.lora_alpha):
            raise TypeError(f"`lora_alpha` must be a number, got {self.lora_alpha!r}.")
        check_finite("lora_alpha", self.lora_alpha)
        if not is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be a probability in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        for name in ("use_rslora", "use_dora", "lora_bias"):
            check_bool(name, getattr(self, name))
        self._validate_init()
        self._validate_patterns()
        self._validate_layers()
        if self.lora_bias and self.use_dora:
            raise ValueError("`lora_bias=True` is not supported with `use_dora=True` (as in PEFT); drop one of them.")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ValueError(
                f"`lora_bias=True` is only supported with `init_lora_weights` True or False (as in PEFT), got "
                f"`init_lora_weights={self.init_lora_weights!r}`; set `lora_bias=False` or use True/False."
            )
        from funcpeft.methods.lora_params import check_config  # (imports the targeting rules, which import this)

        check_config(self)

    def _validate_init(self) -> None:
        init = self.init_lora_weights
        if isinstance(init, bool) or init in ("gaussian", "orthogonal", *RESIDUAL_INITS):
            return
        if isinstance(init, str) and re.fullmatch(r"pissa_niter_[0-9]+", init):
            return
        if isinstance(init, str) and init.lower().startswith(_UNSUPPORTED_INITS):
            raise ValueError(
                f"`init_lora_weights={init!r}` is not supported by funcpeft yet; use True, False, 'gaussian', "
                "'pissa', 'pissa_niter_<N>', 'olora' or 'orthogonal'."
            )
        raise ValueError(
            "`init_lora_weights` must be True, False, 'gaussian', 'pissa', 'pissa_niter_<N>' (N an integer), 'olora' "
            f"or 'orthogonal', got {init!r}."
        )

    def _validate_patterns(self) -> None:
        for name, check, what in (
            ("rank_pattern", lambda v: is_int(v) and v > 0, "a positive integer rank"),
            ("alpha_pattern", lambda v: is_number(v) and math.isfinite(v), "a finite number"),
        ):
            pattern = getattr(self, name)
            if not isinstance(pattern, Mapping):
                raise TypeError(f"`{name}` must be a dict {{module_pattern: value}}, got {pattern!r}.")
            for key, value in pattern.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(f"`{name}` keys must be non-empty strings, got {key!r}.")
                if not check(value):
                    raise ValueError(f"`{name}[{key!r}]` must be {what}, got {value!r}.")
                check_regex(name, key, r"(.*\.)?({})$", kind="key ")  # PEFT's get_pattern_key

    def _validate_layers(self) -> None:
        layers, pattern = self.layers_to_transform, self.layers_pattern
        if layers is not None and not (
            is_int(layers) or (isinstance(layers, (list, tuple)) and all(is_int(i) for i in layers))
        ):
            raise TypeError(f"`layers_to_transform` must be an int or a list of ints, got {layers!r}.")
        if pattern is not None and not (
            isinstance(pattern, str)
            or (isinstance(pattern, (list, tuple)) and all(isinstance(p, str) for p in pattern))
        ):
            raise TypeError(f"`layers_pattern` must be a string or a list of strings, got {pattern!r}.")
        for entry in [pattern] if isinstance(pattern, str) else pattern or ():
            kind = "" if isinstance(pattern, str) else "entry "
            check_regex("layers_pattern", entry, r"(?:^|.*?\.){}\.(?P<idx>\d+)\.", kind=kind)  # PEFT's layer match
        if pattern and layers is None:
            raise ValueError(
                f"`layers_pattern={pattern!r}` is set but `layers_to_transform` is not; set both or neither."
            )
        is_regex = isinstance(self.target_modules, str) and self.target_modules.lower() != "all-linear"
        if is_regex and (layers is not None or pattern is not None):
            raise ValueError(
                "`layers_to_transform`/`layers_pattern` only apply to a list of `target_modules`, but "
                f"`target_modules` is the regex {self.target_modules!r}; put the layer indices in the regex instead."
            )


@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """(IA)^3 (Liu et al., 2022, arXiv:2205.05638), configured as ``peft.IA3Config``.

    A learned vector ``ia3_l`` rescales each adapted layer's output, or its input for ``feedforward_modules``.

    Args:
        target_modules / exclude_modules: as :class:`LoraConfig` (None: PEFT's per-architecture default).
        feedforward_modules: the targets whose *input* is scaled (same matching rules). As in PEFT, it only
            applies to adapted modules: one that is excluded or not targeted is left alone; a list must be a subset
            of a list ``target_modules`` (PEFT's rule), and an entry that matches no adapted module is reported by
            ``adapt`` with a :class:`~funcpeft.FuncpeftWarning`. None: PEFT's default for a known transformers
            architecture, else no feedforward module.
        fan_in_fan_out: kept for PEFT compatibility; funcpeft reads each layer's layout from its type.
        init_ia3_weights: ``True``: ones (the adapter starts as the base model); ``False``: standard normal.
        modules_to_save: modules trained in full, as copies in ``params``.
        task_type: None or one of PEFT's ``TaskType`` values; the task heads are trained as for
            :class:`LoraConfig`.
    """

    peft_type: ClassVar[str] = "IA3"
    _peft_extras: ClassVar[dict[str, Any]] = {
        "auto_mapping": None, "base_model_name_or_path": None, "inference_mode": True, "revision": None,
    }  # fmt: skip

    target_modules: TargetSpec = None
    feedforward_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._validate_common()
        check_names("feedforward_modules", self.feedforward_modules, allow_str=True)
        if isinstance(self.feedforward_modules, str):
            check_regex("feedforward_modules", self.feedforward_modules)  # PEFT full-matches it
        check_bool("init_ia3_weights", self.init_ia3_weights)
        ff, targets = self.feedforward_modules, self.target_modules
        if ff is not None and not isinstance(ff, str) and targets is not None and not isinstance(targets, str):
            extra = sorted(set(ff) - set(targets))
            if extra:
                raise ValueError(
                    f"`feedforward_modules` must be a subset of `target_modules`, but {extra} are not targets; add "
                    f"them to `target_modules` ({sorted(targets)}) or drop them from `feedforward_modules`."
                )


@dataclass(frozen=True)
class AdaLoraConfig(LoraConfig):
    """AdaLoRA (Zhang et al., 2023, arXiv:2303.10512): SVD-form LoRA whose ranks are pruned during training.

    Configured as ``peft.AdaLoraConfig``: the LoRA fields plus the budget schedule. As in PEFT, ``r`` is unused
    (``init_r`` is every module's starting rank) and the scaling is ``lora_alpha / init_r``. Options PEFT's AdaLoRA
    accepts but silently ignores are refused here, so a config never claims what it does not do: ``use_dora``
    (PEFT refuses it too), ``use_rslora``, ``lora_bias``, ``alpha_pattern`` and ``init_lora_weights="gaussian"``.
    ``rank_pattern`` is PEFT's ``{"<module_path>.lora_E": [bool, ...]}`` mask (one flag per initial triplet) that
    :func:`funcpeft.adalora.finalize` fills in; a config with one adapts to the pruned ranks.

    Args:
        target_r: the average rank per module the budget decays to (at most ``init_r``).
        init_r: every module's rank at the start.
        tinit / tfinal: steps without pruning at the start / with a fixed mask at the end of training.
        deltaT: pruning interval (steps) during the budget phase.
        beta1 / beta2: EMA factors of the sensitivity and its uncertainty, in (0, 1) (PEFT asserts it).
        orth_reg_weight: weight of the orthogonality regulariser (see ``funcpeft.adalora.orth_regularization``).
        total_step: total training steps (required, as in PEFT); ``tinit < total_step - tfinal``.
    """

    peft_type: ClassVar[str] = "ADALORA"
    _numeric: ClassVar[tuple[str, ...]] = (
        "r", "lora_alpha", "lora_dropout", "alpha_pattern", "layers_to_transform", "target_r", "init_r", "tinit",
        "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
    )  # fmt: skip

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - PEFT's field name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: Mapping[str, list[bool]] | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ValueError("AdaLoRA does not support DoRA (as in PEFT); set `use_dora=False`.")
        if self.trainable_token_indices is not None:
            raise ValueError(
                "funcpeft's AdaLoRA does not support `trainable_token_indices` yet; use LoraConfig for trainable "
                "tokens, or leave the field None."
            )
        if self.target_parameters:
            raise ValueError(
                "AdaLoRA does not support `target_parameters` (its SVD layers need a Linear-like module); use "
                "LoraConfig for them, or leave the field None."
            )
        for name in ("use_rslora", "lora_bias"):
            if getattr(self, name):
                raise ValueError(
                    f"AdaLoRA does not support `{name}=True` (PEFT's AdaLoRA ignores it: its scaling is lora_alpha / "
                    f"init_r and it has no lora_B bias); set `{name}=False`."
                )
        if self.init_lora_weights not in (True, False):
            raise ValueError(
                f"AdaLoRA's `init_lora_weights` must be True (E = 0, A and B normal with std 0.02) or False (all "
                f"standard normal), got {self.init_lora_weights!r}."
            )
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.target_r > self.init_r:
            raise ValueError(
                f"`target_r={self.target_r}` exceeds `init_r={self.init_r}`: AdaLoRA's budget only shrinks from init_r "
                "to target_r (PEFT fails at the first pruning step); lower `target_r` or raise `init_r`."
            )
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not is_number(value) or not 0.0 < value < 1.0:
                raise ValueError(f"`{name}` must lie strictly between 0 and 1 (an EMA factor), got {value!r}.")
        if not is_number(self.orth_reg_weight) or not 0 <= self.orth_reg_weight < math.inf:
            raise ValueError(f"`orth_reg_weight` must be a finite number >= 0, got {self.orth_reg_weight!r}.")
        if self.total_step is None or not is_int(self.total_step) or self.total_step <= 0:
            raise ValueError(
                f"AdaLoRA needs `total_step`, the number of training steps (an integer > 0), got {self.total_step!r}: "
                "the rank budget schedule is defined over it."
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"`tinit={self.tinit}` >= `total_step - tfinal` = {self.total_step} - {self.tfinal}: the schedule "
                "leaves no budgeting phase; decrease `tinit`/`tfinal` or increase `total_step`."
            )

    def _validate_patterns(self) -> None:
        if not isinstance(self.alpha_pattern, Mapping):
            raise TypeError(f"`alpha_pattern` must be a dict, got {self.alpha_pattern!r}.")
        if self.alpha_pattern:
            raise ValueError(
                f"AdaLoRA does not support `alpha_pattern` (PEFT's AdaLoRA ignores it and scales every module by "
                f"lora_alpha / init_r), got {dict(self.alpha_pattern)!r}; leave it empty."
            )
        if self.rank_pattern is None:
            return
        if not isinstance(self.rank_pattern, Mapping):
            raise TypeError(
                f"`rank_pattern` must be PEFT's {{'<module_path>.lora_E': [bool, ...]}} dict or None, got "
                f"{self.rank_pattern!r}."
            )
        for key, mask in self.rank_pattern.items():
            if not isinstance(key, str) or not key.endswith(".lora_E"):
                raise ValueError(
                    f"`rank_pattern` keys must be '<module_path>.lora_E' (as PEFT saves them), got {key!r}."
                )
            if not isinstance(mask, (list, tuple)) or any(not isinstance(m, bool) for m in mask):
                raise TypeError(f"`rank_pattern[{key!r}]` must be a list of True/False flags, got {mask!r}.")
