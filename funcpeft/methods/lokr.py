"""LoKr (Yeh et al., 2023, arXiv:2309.14859; PEFT 0.21.2's ``lokr``) on Linear, Conv1d and Conv2d layers.

The delta is a Kronecker product scaled by ``alpha / r``: ``dW = kron(w1, w2) * alpha / r``, reshaped to the
module's weight. The layer's ``out = a * b`` and ``in = c * d`` (a conv's ``in_channels / groups``) are split by
LyCORIS's :func:`~funcpeft.methods.lycoris_math.factorization` (near the square root, or ``decompose_factor``):

- ``w1`` ``(a, c)``: ``lokr_w1``, or ``lokr_w1_a (a, r) @ lokr_w1_b (r, c)`` with ``decompose_both`` when
  ``r < max(a, c) / 2``;
- ``w2`` ``(b, d[, *kernel])``: ``lokr_w2`` when ``r >= max(b, d) / 2``; else ``lokr_w2_a (b, r) @ lokr_w2_b (r, d *
  prod(kernel))``, or with ``use_effective_conv2d`` (kernels larger than 1) the CP form ``lokr_t2 (r, r, k1, k2)``
  (a Conv1d's ``(r, r, k, 1)``) with ``lokr_w2_a (r, b)`` and ``lokr_w2_b (r, d)``.

PEFT's init (``init_weights=True``): ``w1`` (or ``w1_a``) zero, the rest Kaiming-uniform (a = sqrt(5)), so a fresh
adapter is the base model; ``"lycoris"``: ``w2`` (or ``w2_b``) zero instead; ``False``: all Kaiming-uniform. The
forward, merge and train-time dropouts are :mod:`funcpeft.methods.lycoris_math`'s (``rank_dropout`` rescales only
with ``rank_dropout_scale``, PEFT's rule).

PEFT quirks, both followed so that PEFT's checkpoints mean the same here:

- A Conv1d with a full ``lokr_w2 (b, d, k)``: PEFT's ``torch.kron`` pads the 2-D ``w1`` to ``(1, a, c)`` rather than
  ``(a, c, 1)``, so the delta is ``kron(w1[None], w2)`` ``(b, a d, c k)`` reshaped to ``(out, in, k)``: not the
  Kronecker structure of the paper, but the same number of free parameters.
- A Conv1d with ``use_effective_conv2d`` and ``r = 1``: PEFT's forward crashes. Its CP factor ``(b, d, k, 1)`` comes
  out of ``einsum`` with an odd stride on the size-1 dim (``.contiguous()`` keeps it), and ``torch.kron`` then
  raises "view size is not compatible". funcpeft computes the Kronecker product PEFT computes for ``r >= 2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from funcpeft._layers import Kind
from funcpeft._targeting import DEFAULT_LORA_TARGETS, pattern_value
from funcpeft._validate import check_bool, is_int
from funcpeft.config import AdapterConfig, TargetSpec
from funcpeft.methods.base import Method, register
from funcpeft.methods.loha import validate_lycoris
from funcpeft.methods.lycoris_math import LycorisLayer, cp_weight, factorization, kron, shape_error, weight_shape

__all__ = ["LoKrConfig", "LoKrLayer", "METHOD"]


@dataclass(frozen=True)
class LoKrConfig(AdapterConfig):
    """LoKr, configured as ``peft.LoKrConfig`` (PEFT 0.21.2's fields and defaults).

    Args:
        r / alpha: the rank of the decomposed factors and the scaling numerator (``alpha / r``).
        rank_dropout / rank_dropout_scale: train mode: each output row of the delta dropped with this probability;
            with ``rank_dropout_scale`` the kept rows are scaled by ``1 / mean(mask)``.
        module_dropout: train mode: the whole delta skipped for a call with this probability.
        use_effective_conv2d: the CP form of ``w2`` for convs with a kernel larger than 1 (where ``w2`` is
            decomposed at all).
        decompose_both: decompose ``w1`` too (when ``r < max(a, c) / 2``).
        decompose_factor: the factor the split of ``in``/``out`` aims at; -1: near the square root.
        target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save / rank_pattern /
            alpha_pattern: as :class:`~funcpeft.LoraConfig` (None targets: PEFT's per-architecture default, LoRA's).
        init_weights: ``True`` (``w1`` zero), ``"lycoris"`` (``w2`` zero) or ``False`` (all random).
        task_type: None or one of PEFT's ``TaskType`` values.
    """

    peft_type: ClassVar[str] = "LOKR"
    fan_in_fan_out: ClassVar[bool] = False  # PEFT's LoKr has no such field; LoKr adapts no (in, out)-layout layer
    _numeric: ClassVar[tuple[str, ...]] = (
        "r", "alpha", "rank_dropout", "module_dropout", "decompose_factor", "rank_pattern", "alpha_pattern",
        "layers_to_transform",
    )  # fmt: skip
    _peft_extras: ClassVar[dict[str, Any]] = {
        "auto_mapping": None, "base_model_name_or_path": None, "inference_mode": True, "revision": None,
    }  # fmt: skip

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    init_weights: bool | Literal["lycoris"] = True
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    task_type: str | None = None

    def __post_init__(self) -> None:
        validate_lycoris(self)
        for name in ("decompose_both", "rank_dropout_scale"):
            check_bool(name, getattr(self, name))
        factor = self.decompose_factor
        if not is_int(factor) or not (factor == -1 or factor >= 1):
            raise ValueError(
                f"`decompose_factor` must be -1 (split near the square root) or a positive integer, got {factor!r}."
            )
        if self.init_weights not in (True, False, "lycoris") or not isinstance(self.init_weights, (bool, str)):
            raise ValueError(f"`init_weights` must be True, False or 'lycoris', got {self.init_weights!r}.")


@dataclass(frozen=True)
class LoKrLayer(LycorisLayer):
    split: tuple[int, int, int, int] = (1, 1, 1, 1)  # (a, b, c, d): out = a * b, in = c * d
    w1_full: bool = True
    w2_form: Literal["full", "flat", "cp"] = "full"
    scale_rank_dropout: bool = False

    def rank_scaled(self) -> bool:
        return self.scale_rank_dropout

    def mask_dtype(self, delta: Tensor) -> torch.dtype:
        return torch.float32

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.weight_shape[2:]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """PEFT's tensor shapes, in its initialisation order (w1, w2, then the core)."""
        (a, b, c, d), r = self.split, self.r
        shapes: dict[str, tuple[int, ...]] = (
            {"lokr_w1": (a, c)} if self.w1_full else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
        )
        if self.w2_form == "full":
            shapes["lokr_w2"] = (b, d, *self.kernel)
        elif self.w2_form == "flat":
            shapes |= {"lokr_w2_a": (b, r), "lokr_w2_b": (r, d * math.prod(self.kernel))}
        else:
            core = self.kernel if len(self.kernel) == 2 else (self.kernel[0], 1)
            shapes |= {"lokr_w2_a": (r, b), "lokr_w2_b": (r, d), "lokr_t2": (r, r, *core)}
        return shapes

    def init(self, module: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        tensors = {name: self._empty(shape, module) for name, shape in self.shapes().items()}
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[self.init_weights]
        order = list(tensors)
        if self.init_weights == "lycoris" and "lokr_w2_b" in tensors:  # PEFT zeroes w2_b before drawing w2_a
            i = order.index("lokr_w2_a")
            order[i], order[i + 1] = order[i + 1], order[i]
        for name in order:
            if name in zero:
                tensors[name].zero_()
            else:
                nn.init.kaiming_uniform_(tensors[name], a=math.sqrt(5), generator=generator)
        return {name: t.to(module.weight.device) for name, t in tensors.items()}

    def delta(self, tensors: Mapping[str, Tensor]) -> Tensor:
        w1 = tensors["lokr_w1"] if self.w1_full else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
        lead = w1.shape[:-2]
        if self.w2_form == "full":
            w2, dims = tensors["lokr_w2"], len(self.weight_shape)
        elif self.w2_form == "flat":
            w2, dims = tensors["lokr_w2_a"] @ tensors["lokr_w2_b"], 2
        else:
            w2, dims = cp_weight(tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"]), 4
        return (kron(w1, w2, dims) * self.scaling).reshape(*lead, *self.weight_shape)


def make_layer(config: LoKrConfig, path: str, module: nn.Module, kind: Kind | None) -> LoKrLayer:
    if kind not in (Kind.LINEAR, Kind.CONV) or (kind is Kind.CONV and module.weight.dim() not in (3, 4)):
        raise shape_error("LoKr", path, module, kind)
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.alpha)
    shape = weight_shape(module, kind)
    c, d = factorization(shape[1], config.decompose_factor)  # a conv's weight holds in_channels / groups
    a, b = factorization(shape[0], config.decompose_factor)
    w1_full = not (config.decompose_both and r < max(a, c) / 2)
    if r >= max(b, d) / 2:
        w2_form = "full"
    elif kind is Kind.CONV and config.use_effective_conv2d and math.prod(shape[2:]) != 1:
        w2_form = "cp"
    else:
        w2_form = "flat"
    return LoKrLayer(
        kind=kind,
        r=r,
        scaling=alpha / r,
        rank_dropout=float(config.rank_dropout),
        module_dropout=float(config.module_dropout),
        weight_shape=shape,
        init_weights=config.init_weights,
        split=(a, b, c, d),
        w1_full=w1_full,
        w2_form=w2_form,
        scale_rank_dropout=config.rank_dropout_scale,
    )


def required(config: LoKrConfig, names: frozenset[str]) -> frozenset[str]:
    need = {"lokr_w1"} if "lokr_w1" in names else {"lokr_w1_a", "lokr_w1_b"}
    if "lokr_w2" in names:
        need.add("lokr_w2")
    else:
        need |= {"lokr_w2_a", "lokr_w2_b"} | ({"lokr_t2"} if "lokr_t2" in names else set())
    return frozenset(need)


NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

METHOD = register(
    Method(
        name="lokr",
        config_type=LoKrConfig,
        default_targets=DEFAULT_LORA_TARGETS,  # PEFT's LoKr mapping is a copy of LoRA's
        make_layer=make_layer,
        peft_keys={name: name for name in NAMES},
        required=required,
    )
)
