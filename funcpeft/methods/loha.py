"""LoHa (FedPara, Hyeon-Woo et al., 2021, arXiv:2108.06098; PEFT 0.21.2's ``loha``) on Linear, Conv1d and Conv2d.

The delta is the Hadamard product of two rank-``r`` products, scaled by ``alpha / r``:
``dW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / r``, with ``hada_w*_a`` ``(out, r)`` and
``hada_w*_b`` ``(r, in)``; a conv's ``in`` is ``in_channels / groups * prod(kernel)`` (the flattened filter).
With ``use_effective_conv2d`` a conv with a kernel larger than 1 uses FedPara's CP form instead: cores
``hada_t1``/``hada_t2`` ``(r, r, k1, k2)`` (a Conv1d's ``(r, r, k, 1)``), ``hada_w*_a`` ``(r, out)``,
``hada_w*_b`` ``(r, in_channels / groups)`` (:func:`funcpeft.methods.lycoris_math.hada_cp`).

PEFT's init (``init_weights=True``): Kaiming-uniform (a = sqrt(5)) ``w1_a``, ``w1_b``, ``w2_a`` and the cores, zero
``w2_b``, so a fresh adapter is the base model; ``False``: all Kaiming-uniform. The forward adds the base layer run
with ``dW`` (no bias) to the base output, PEFT's form (see :mod:`funcpeft.methods.lycoris_math`, also for
``rank_dropout``/``module_dropout`` in train mode).

PEFT quirk: with ``use_effective_conv2d`` on a ``k x k`` conv, PEFT's hand-written backward returns wrong gradients
for ``hada_w1_a``/``hada_w2_a`` (its forward is right); funcpeft differentiates its forward with autograd.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from funcpeft._layers import Kind
from funcpeft._targeting import DEFAULT_LORA_TARGETS, pattern_value
from funcpeft._validate import check_bool, check_finite, is_int, is_number
from funcpeft.config import AdapterConfig, LoraConfig, TargetSpec
from funcpeft.methods.base import Method, register
from funcpeft.methods.lycoris_math import LycorisLayer, hada, hada_cp, shape_error, weight_shape

__all__ = ["LoHaConfig", "LoHaLayer", "METHOD"]


def validate_lycoris(config: AdapterConfig) -> None:
    """The checks LoHa and LoKr configs share (PEFT's ``LycorisConfig`` fields), each naming the field."""
    config._validate_common()
    if not is_int(config.r) or config.r <= 0:
        raise ValueError(f"`r` must be a positive integer, got {config.r!r}.")
    if not is_number(config.alpha):
        raise TypeError(f"`alpha` must be a number, got {config.alpha!r}.")
    check_finite("alpha", config.alpha)
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(config, name)
        if not is_number(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"`{name}` must be a probability in [0, 1), got {value!r}.")
    check_bool("use_effective_conv2d", config.use_effective_conv2d)
    LoraConfig._validate_patterns(config)  # the same rank_pattern / alpha_pattern rules (PEFT's get_pattern_key)
    LoraConfig._validate_layers(config)


@dataclass(frozen=True)
class LoHaConfig(AdapterConfig):
    """LoHa, configured as ``peft.LoHaConfig`` (PEFT 0.21.2's fields and defaults).

    Args:
        r / alpha: the rank of both factors and the scaling numerator (``alpha / r``).
        rank_dropout: train mode: each output row of the delta dropped with this probability, the kept rows scaled by
            ``1 / mean(mask)`` (PEFT's LoHa always rescales).
        module_dropout: train mode: the whole delta skipped for a call with this probability.
        use_effective_conv2d: FedPara's CP form for convs with a kernel larger than 1 (ignored for 1 / 1x1 kernels,
            as PEFT).
        target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save / rank_pattern /
            alpha_pattern: as :class:`~funcpeft.LoraConfig` (None targets: PEFT's per-architecture default, LoRA's).
        init_weights: ``True``: ``hada_w2_b`` zero (a fresh adapter is the base); ``False``: all random.
        task_type: None or one of PEFT's ``TaskType`` values.
    """

    peft_type: ClassVar[str] = "LOHA"
    fan_in_fan_out: ClassVar[bool] = False  # PEFT's LoHa has no such field; LoHa adapts no (in, out)-layout layer
    _numeric: ClassVar[tuple[str, ...]] = (
        "r", "alpha", "rank_dropout", "module_dropout", "rank_pattern", "alpha_pattern", "layers_to_transform",
    )  # fmt: skip
    _peft_extras: ClassVar[dict[str, Any]] = {
        "auto_mapping": None, "base_model_name_or_path": None, "inference_mode": True, "revision": None,
    }  # fmt: skip

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    init_weights: bool = True
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    task_type: str | None = None

    def __post_init__(self) -> None:
        validate_lycoris(self)
        check_bool("init_weights", self.init_weights)


@dataclass(frozen=True)
class LoHaLayer(LycorisLayer):
    effective: bool = False  # the CP form (hada_t1 / hada_t2)

    def rank_scaled(self) -> bool:
        return True

    def mask_dtype(self, delta: Tensor) -> torch.dtype:
        return delta.dtype

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """PEFT's tensor shapes, in its initialisation order."""
        out, r = self.weight_shape[0], self.r
        if self.effective:
            kernel = self.weight_shape[2:] if len(self.weight_shape) == 4 else (self.weight_shape[2], 1)
            return {
                "hada_w1_a": (r, out), "hada_w1_b": (r, self.weight_shape[1]), "hada_w2_a": (r, out),
                "hada_w2_b": (r, self.weight_shape[1]), "hada_t1": (r, r, *kernel), "hada_t2": (r, r, *kernel),
            }  # fmt: skip
        flat = math.prod(self.weight_shape[1:])
        return {"hada_w1_a": (out, r), "hada_w1_b": (r, flat), "hada_w2_a": (out, r), "hada_w2_b": (r, flat)}

    def init(self, module: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        tensors = {name: self._empty(shape, module) for name, shape in self.shapes().items()}
        for name, t in tensors.items():
            if name == "hada_w2_b" and self.init_weights:
                t.zero_()
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
        return {name: t.to(module.weight.device) for name, t in tensors.items()}

    def delta(self, tensors: Mapping[str, Tensor]) -> Tensor:
        w1a, w1b, w2a, w2b = (tensors[n] for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        lead = w1a.shape[:-2]
        if self.effective:
            weight = hada_cp(tensors["hada_t1"], w1a, w1b, tensors["hada_t2"], w2a, w2b, self.scaling)
        else:
            weight = hada(w1a, w1b, w2a, w2b, self.scaling)
        return weight.reshape(*lead, *self.weight_shape)


def make_layer(config: LoHaConfig, path: str, module: nn.Module, kind: Kind | None) -> LoHaLayer:
    if kind not in (Kind.LINEAR, Kind.CONV) or (kind is Kind.CONV and module.weight.dim() not in (3, 4)):
        raise shape_error("LoHa", path, module, kind)
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.alpha)
    shape = weight_shape(module, kind)
    effective = kind is Kind.CONV and config.use_effective_conv2d and math.prod(shape[2:]) != 1
    return LoHaLayer(
        kind=kind,
        r=r,
        scaling=alpha / r,
        rank_dropout=float(config.rank_dropout),
        module_dropout=float(config.module_dropout),
        weight_shape=shape,
        init_weights=config.init_weights,
        effective=effective,
    )


def required(config: LoHaConfig, names: frozenset[str]) -> frozenset[str]:
    need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    if names & {"hada_t1", "hada_t2"}:
        need |= {"hada_t1", "hada_t2"}
    return frozenset(need)


NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

METHOD = register(
    Method(
        name="loha",
        config_type=LoHaConfig,
        default_targets=DEFAULT_LORA_TARGETS,  # PEFT's LoHa mapping is a copy of LoRA's
        make_layer=make_layer,
        peft_keys={name: name for name in NAMES},
        required=required,
    )
)
