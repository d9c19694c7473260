"""OFT (Qiu et al., 2023, arXiv:2306.07280; PEFT 0.21.2's ``oft``) on Linear, Conv2d and Embedding layers.

Each adapted layer learns a block-diagonal orthogonal matrix ``BD = blockdiag(R_1, ..., R_r)`` of ``r`` blocks of
size ``b`` (``r * b`` = the rotated features), each ``R_i`` the Cayley transform (or its Neumann series) of a
skew-symmetric matrix stored as its strict upper triangle: ``params[path]["oft_R"]`` ``(r, b(b-1)/2)``
(``(1, ...)`` with ``block_share``), PEFT's ``oft_R.weight``; an embedding's is ``oft_embedding_R``.

- Linear: ``y = base(x @ BD)``, PEFT's forward (the input's features rotated, then the base layer); folded, the
  weight is ``W @ BD^T`` and the bias unchanged.
- Conv2d: the rotated features are the ``in * k * k`` entries of each flattened filter, and the adapted layer is
  the base convolution with ``W_flat @ BD^T``: PEFT's merged weight. For 1x1 kernels that is PEFT's forward too
  (each pixel's channels rotated). For ``k > 1`` PEFT's unmerged forward differs from its own merge: it rotates
  stride-1, unpadded ``k x k`` patches of the input and sums their overlaps back (``F.fold``), so even a fresh
  adapter is not the base layer and the base's padding and stride are ignored; funcpeft computes the merged
  (paper's) form instead. A ``k > 1`` checkpoint therefore gives funcpeft's outputs in PEFT after
  ``merge_and_unload()``, not in PEFT's unmerged model.
- Embedding: ``y = embed(x) @ BD`` (the looked-up vectors rotated); folded, the table is ``W @ BD``.

PEFT's Neumann series (``I + 2Q + 2Q^2 + ...``) is that of ``(I + Q)(I - Q)^-1``, the inverse of its exact
``(I - Q)(I + Q)^-1``: one ``oft_R`` rotates one way with ``use_cayley_neumann`` and the other way without it.
funcpeft computes both as PEFT does, so checkpoints keep their meaning; do not switch the option on a trained
adapter. Dtypes as PEFT: half-precision bases get float32 adapters, the input is rotated in the adapter's dtype and
cast back before the base layer, and the exact transform is solved in at least float32.

Options as PEFT: ``coft`` (each ``Q`` kept within a Frobenius ball, see :func:`funcpeft.methods.oft_math.rotations`
for the gradient), ``block_share`` (one block for all), ``use_cayley_neumann`` / ``num_cayley_neumann_terms``,
``bias`` ("none", "all", "oft_only"), ``module_dropout`` (accepted, but PEFT 0.21.2 builds its dropout layer and
never calls it, so it has no effect in either library; ``adapt`` says so with a :class:`~funcpeft.FuncpeftWarning`).
A block size (or ``r``) that does not divide a layer's features is changed for that layer as PEFT changes it
(the nearest divisor), with a warning naming the layer, so checkpoints keep PEFT's shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from funcpeft import _layers
from funcpeft._layers import Kind
from funcpeft._targeting import DEFAULT_LORA_TARGETS, user_warning
from funcpeft._validate import check_bool, check_finite, is_int, is_number
from funcpeft.config import AdapterConfig, LoraConfig, TargetSpec
from funcpeft.methods import oft_math
from funcpeft.methods.base import BaseForward, Method, Rows, gather, register, rows_for

__all__ = ["OFTConfig", "OFTLayer", "METHOD"]

_FLOATS = (torch.float32, torch.float64)


# The first PEFT release whose Cayley-Neumann series funcpeft computes (PEFT 0.18 changed it).
_NEUMANN_SINCE = (0, 18)


@dataclass(frozen=True)
class OFTConfig(AdapterConfig):
    """OFT, configured as ``peft.OFTConfig`` (PEFT 0.21.2's fields and defaults).

    Args:
        r / oft_block_size: blocks per layer / their size; exactly one is non-zero (PEFT's rule), the other follows
            from the layer's rotated features (``in_features``; a Conv2d's ``in_channels * k * k``; an embedding's
            ``embedding_dim``). One that does not divide them is adjusted per layer as PEFT does (with a warning).
        module_dropout: accepted for PEFT compatibility; no effect, as in PEFT 0.21.2 (see the module docstring).
        target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save: as
            :class:`~funcpeft.LoraConfig` (None targets: PEFT's per-architecture default, LoRA's).
        fan_in_fan_out: kept for PEFT compatibility; no effect (OFT adapts no (in, out)-layout layer).
        bias: ``"none"``, ``"all"`` or ``"oft_only"`` (the biases of adapted layers), trained as full copies.
        init_weights: ``True``: zeros, so every block is ``I`` and a fresh adapter is the base model; ``False``:
            normal with std 0.1.
        coft / eps: constrained OFT: each block's skew matrix is kept within Frobenius radius
            ``eps / sqrt(blocks)``.
        block_share: one block shared by all blocks of a layer (``oft_R`` is ``(1, ...)``).
        use_cayley_neumann / num_cayley_neumann_terms: the Neumann series of the Cayley transform (PEFT's since
            0.18) instead of the exact inverse; at least 2 terms (fewer give ``R = I`` whatever ``oft_R`` holds).
        task_type: None or one of PEFT's ``TaskType`` values (task heads as for :class:`~funcpeft.LoraConfig`).
    """

    peft_type: ClassVar[str] = "OFT"
    _numeric: ClassVar[tuple[str, ...]] = ("r", "oft_block_size", "module_dropout", "eps", "layers_to_transform")
    _peft_extras: ClassVar[dict[str, Any]] = {
        "auto_mapping": None, "base_model_name_or_path": None, "inference_mode": True, "revision": None,
        # PEFT warns on a Cayley-Neumann config without a version (its series changed in 0.18); funcpeft computes
        # 0.21.2's.
        "peft_version": "0.21.2",
    }  # fmt: skip

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: TargetSpec = None
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "oft_only"] = "none"
    exclude_modules: TargetSpec = None
    init_weights: bool = True
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._validate_common()
        for name in ("r", "oft_block_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"Set exactly one of `r` ({self.r}) and `oft_block_size` ({self.oft_block_size}) to a non-zero "
                "value (PEFT's rule: r x oft_block_size = the layer's features, so one determines the other); e.g. "
                "`r=0, oft_block_size=32`."
            )
        if not is_number(self.module_dropout) or not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"`module_dropout` must be a probability in [0, 1), got {self.module_dropout!r}.")
        if self.bias not in ("none", "all", "oft_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'oft_only', got {self.bias!r}.")
        for name in ("init_weights", "coft", "block_share", "use_cayley_neumann"):
            check_bool(name, getattr(self, name))
        if not is_number(self.eps) or self.eps < 0:
            raise ValueError(f"`eps` (COFT's radius) must be a number >= 0, got {self.eps!r}.")
        check_finite("eps", self.eps)
        terms = self.num_cayley_neumann_terms
        if not is_int(terms) or (terms < 2 and self.use_cayley_neumann):  # the exact transform never reads it
            raise ValueError(
                f"`num_cayley_neumann_terms` must be an integer >= 2 with `use_cayley_neumann=True`, got {terms!r}: "
                "with fewer terms the series is "
                "R = I whatever `oft_R` holds, so the adapter could never change the model (PEFT builds it anyway)."
            )
        LoraConfig._validate_layers(self)  # the same layers_to_transform / layers_pattern rules

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], *, source: str = "adapter_config.json") -> AdapterConfig:
        """As :meth:`AdapterConfig.from_peft_dict`, refusing OFT checkpoints whose math funcpeft does not compute.

        Raises:
            ValueError: the file predates PEFT 0.14's OFT (no ``oft_block_size``; PEFT refuses it too), or is a
                Cayley-Neumann adapter saved by PEFT < 0.18, whose series differs (PEFT only warns).
        """
        if data.get("peft_type") == cls.peft_type and "oft_block_size" not in data:
            raise ValueError(
                f"{source} is an OFT adapter from PEFT < 0.14 (it has no `oft_block_size`), whose weights PEFT "
                "0.14+ and funcpeft cannot use; retrain it, or load it with PEFT 0.13."
            )
        version = str(data.get("peft_version") or "").partition("@")[0]
        parts = version.split(".")[:2]
        known = len(parts) == 2 and all(p.isdigit() for p in parts)
        if data.get("use_cayley_neumann") and known and tuple(map(int, parts)) < _NEUMANN_SINCE:
            raise ValueError(
                f"{source} is a Cayley-Neumann OFT adapter saved by PEFT {version}; PEFT 0.18 changed that series, "
                "and funcpeft computes the new one, so its outputs would differ. Retrain it, or use PEFT 0.17."
            )
        return super().from_peft_dict(data, source=source)


@dataclass(frozen=True)
class OFTLayer:
    kind: Kind
    r: int  # blocks along the rotated features
    block_size: int
    block_share: bool
    neumann: bool
    terms: int
    coft_eps: float | None  # COFT's per-block radius, None without COFT
    init_weights: bool
    kernel: int = 1  # a Conv2d's (square) kernel size

    @property
    def name(self) -> str:
        return "oft_embedding_R" if self.kind is Kind.EMBEDDING else "oft_R"

    def init(self, module: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        weight = module.weight
        dtype = weight.dtype if weight.dtype in _FLOATS else torch.float32
        b = self.block_size
        vec = torch.zeros(1 if self.block_share else self.r, b * (b - 1) // 2, dtype=dtype)
        if not self.init_weights:  # PEFT: normal with std 0.1; otherwise zeros, i.e. R = I
            vec.normal_(0.0, 0.1, generator=generator)
        return {self.name: vec.to(weight.device)}

    def blocks(self, vec: Tensor) -> Tensor:
        """The orthogonal blocks ``(..., r | 1, b, b)`` of packed vectors ``vec``."""
        return oft_math.rotations(vec, self.block_size, self.neumann, self.terms, self.coft_eps)

    # ----- single adapter ------------------------------------------------------------------------------------
    def forward(
        self, module: nn.Module, tensors: Mapping[str, Tensor], base: BaseForward, x: Tensor, *args: Any, **kwargs: Any
    ) -> Tensor:
        vec = tensors[self.name]
        blocks = self.blocks(vec)
        if self.kind is Kind.EMBEDDING:
            result = base(module, x, *args, **kwargs)
            return oft_math.rotate(result.to(vec.dtype), blocks, self.r).to(result.dtype)
        if self.kind is Kind.CONV and self.kernel > 1:
            weight = _layers.canonical_weight(module, self.kind)
            rotated = oft_math.rotate_weight(weight.to(vec.dtype), blocks, self.r).to(weight.dtype)
            return _layers.conv(module, x, rotated, module.bias)
        h = x.to(vec.dtype)
        if self.kind is Kind.CONV:  # a 1x1 conv: rotate each pixel's channels (dim -3, batched or not)
            h = _like(x, oft_math.rotate(h.movedim(-3, -1), blocks, self.r).movedim(-1, -3))
        else:
            h = oft_math.rotate(h, blocks, self.r)
        return base(module, h.to(x.dtype), *args, **kwargs)

    def effective_weight(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        vec = tensors[self.name]
        blocks = self.blocks(vec)
        weight = _layers.canonical_weight(module, self.kind)
        if self.kind is Kind.EMBEDDING:  # canonical (dim, num): the table's rows rotated, W @ BD
            table = oft_math.rotate(weight.T.to(vec.dtype), blocks, self.r)
            return table.T.to(weight.dtype), None
        rotated = oft_math.rotate_weight(weight.to(vec.dtype), blocks, self.r)
        return rotated.to(weight.dtype), getattr(module, "bias", None)

    # ----- mixed batches ------------------------------------------------------------------------------------
    def forward_mixed(
        self,
        module: nn.Module,
        tensors: Mapping[str, Tensor],
        rows: Rows,
        path: str,
        base: BaseForward,
        x: Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        """Row ``i`` rotated by adapter ``rows.index[i]``'s blocks: its packed vectors are gathered (zeros for base
        rows, whose rotation is then exactly ``I``), turned into ``(B, r | 1, b, b)`` blocks, and applied in one
        batched einsum; a ``k x k`` conv runs as one grouped convolution with each row's rotated filters."""
        if self.kind is Kind.CONV and x.dim() != 4:
            raise ValueError(
                f"Mixed batch: the Conv2d {path!r} received an unbatched input of shape {tuple(x.shape)}; mixed "
                "batches need (batch, channels, height, width) inputs, one row per `adapter_ids` entry."
            )
        rows = rows_for(rows, x, path)
        if x.shape[0] == 0:  # an empty batch: nothing to select
            return base(module, x, *args, **kwargs)
        vec = tensors[self.name]
        blocks = self.blocks(gather(vec, rows, 0.0))  # (B, r | 1, b, b)
        if self.kind is Kind.EMBEDDING:
            result = base(module, x, *args, **kwargs)
            return oft_math.rotate_rows(result.to(vec.dtype), blocks, self.r).to(result.dtype)
        if self.kind is Kind.CONV and self.kernel > 1:
            return self._conv_rows(module, x, blocks, vec.dtype)
        h = x.to(vec.dtype)
        if self.kind is Kind.CONV:
            h = _like(x, oft_math.rotate_rows(h.movedim(1, -1), blocks, self.r).movedim(-1, 1))
        else:
            h = oft_math.rotate_rows(h, blocks, self.r)
        return base(module, h.to(x.dtype), *args, **kwargs)

    def _conv_rows(self, module: nn.Module, x: Tensor, blocks: Tensor, dtype: torch.dtype) -> Tensor:
        weight = _layers.canonical_weight(module, self.kind)
        n, channels = x.shape[0], x.shape[1]
        filters = oft_math.rotate_weight(weight.to(dtype), blocks, self.r).to(weight.dtype)  # (B, out, in, k, k)
        bias = module.bias
        out = _layers.conv(
            module,
            x.reshape(1, n * channels, *x.shape[2:]),
            filters.reshape(n * weight.shape[0], *weight.shape[1:]),
            None if bias is None else bias.repeat(n),
            groups=n,
        )
        return out.reshape(n, weight.shape[0], *out.shape[2:])


def _like(x: Tensor, h: Tensor) -> Tensor:
    """``h`` (rotated channels-last, moved back) in ``x``'s memory format: the base convolution then runs the
    same kernel on it as on ``x``, so a fresh adapter (``R = I``) gives exactly the base output."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return h.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _features(config: OFTConfig, path: str, module: nn.Module, kind: Kind | None) -> tuple[int, int]:
    """The rotated feature count of ``module`` and its conv kernel size (1 for other layers).

    Raises:
        ValueError: OFT (PEFT's) cannot adapt this module; the message names it and the fix.
    """
    fix = "narrow `target_modules` or add it to `exclude_modules`"
    if kind is Kind.LINEAR:
        return module.in_features, 1
    if kind is Kind.EMBEDDING:
        return module.embedding_dim, 1
    if kind is Kind.CONV and isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        if kh != kw:
            raise ValueError(
                f"OFT cannot adapt the Conv2d {path!r}: its kernel {module.kernel_size} is not square (PEFT sizes the "
                f"rotation as in_channels * k * k with k = kernel_size[0]); {fix}."
            )
        if tuple(module.dilation) != (1, 1):
            raise ValueError(
                f"OFT cannot adapt the Conv2d {path!r} with dilation={tuple(module.dilation)} (PEFT refuses dilation "
                f"> 1); {fix}."
            )
        if module.groups != 1:
            raise ValueError(
                f"OFT cannot adapt the grouped Conv2d {path!r} (groups={module.groups}): a rotation of all input "
                f"channels mixes the groups, so no grouped weight computes it (PEFT fails on it too); {fix}."
            )
        return module.in_channels * kh * kw, kh
    what = type(module).__name__
    if kind is not None and kind.value != what:  # the layer kind where the class does not say it
        what = f"{what} ({kind.value})"
    raise ValueError(
        f"Module {path!r} ({what}) matched `target_modules`, but OFT can only adapt nn.Linear, nn.Conv2d and "
        f"nn.Embedding (as PEFT, which also refuses transformers' Conv1D and Conv1d/Conv3d); {fix}."
    )


def _blocks(config: OFTConfig, path: str, features: int) -> tuple[int, int]:
    """``(r, block_size)`` for a layer with ``features`` rotated features, adjusted as PEFT adjusts them."""
    if config.r == 0:
        size = config.oft_block_size
        if features % size or size > features:
            size = oft_math.adjust(features, size)
            user_warning(
                f"`oft_block_size={config.oft_block_size}` does not divide the {features} rotated features of "
                f"{path!r}; this layer uses oft_block_size={size} (r={features // size}), as PEFT adjusts it."
            )
        return features // size, size
    r = config.r
    if features % r or r > features:
        r = oft_math.adjust(features, r)
        user_warning(
            f"`r={config.r}` does not divide the {features} rotated features of {path!r}; this layer uses r={r} "
            f"(oft_block_size={features // r}), as PEFT adjusts it."
        )
    return r, features // r


def make_layer(config: OFTConfig, path: str, module: nn.Module, kind: Kind | None) -> OFTLayer:
    features, kernel = _features(config, path, module, kind)
    r, size = _blocks(config, path, features)
    coft_eps = oft_math.block_eps(config.eps, 1 if config.block_share else r) if config.coft else None
    return OFTLayer(
        kind=kind,
        r=r,
        block_size=size,
        block_share=config.block_share,
        neumann=config.use_cayley_neumann,
        terms=config.num_cayley_neumann_terms,
        coft_eps=coft_eps,
        init_weights=config.init_weights,
        kernel=kernel,
    )


def resolve(config: OFTConfig, model: nn.Module) -> OFTConfig:
    """Report a ``module_dropout`` that has no effect (PEFT 0.21.2 never applies its dropout layer)."""
    if config.module_dropout > 0:
        user_warning(
            f"`module_dropout={config.module_dropout}` has no effect: PEFT 0.21.2's OFT creates the multiplicative "
            "dropout layer but its forward never calls it, and funcpeft matches PEFT. Set `module_dropout=0.0` to "
            "silence this warning."
        )
    return config


def required(config: OFTConfig, names: frozenset[str]) -> frozenset[str]:
    return frozenset({"oft_embedding_R"} if "oft_embedding_R" in names else {"oft_R"})


METHOD = register(
    Method(
        name="oft",
        config_type=OFTConfig,
        default_targets=DEFAULT_LORA_TARGETS,  # PEFT's OFT mapping is a copy of LoRA's
        make_layer=make_layer,
        peft_keys={"oft_R": "oft_R.weight", "oft_embedding_R": "oft_embedding_R.weight"},
        required=required,
        resolve=resolve,
    )
)
