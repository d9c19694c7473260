"""AdaLoRA (Zhang et al., 2023, arXiv:2303.10512): LoRA in SVD form, ``delta = B diag(E) A``, on Linear, GPT-2
Conv1D and Conv2d layers.

Tensors, shapes, initialisation and math are PEFT's (``peft.tuners.adalora``, ``SVDLinear`` / ``SVDConv2d``):

- ``lora_A`` (r, in * kh * kw), ``lora_E`` (r, 1), ``lora_B`` (out, r); ``r`` is ``init_r``, or the number of
  kept triplets under ``rank_pattern`` (possibly 0: zero-size tensors, a no-op update);
- ``y = base(x) + dropout(x) @ (A * E).T @ B.T * scaling / (ranknum + 1e-5)`` with ``scaling = lora_alpha``
  (PEFT: the rank when ``lora_alpha <= 0``) and ``ranknum = init_r``. PEFT keeps ``ranknum`` as a frozen
  parameter that it never saves and resets to ``init_r`` when it prunes or loads; funcpeft derives it from the
  config, so it is not in ``params``;
- Conv2d: the delta reshaped to the kernel, run with the base layer's stride, padding and dilation. PEFT runs it
  with zero padding whatever the base's ``padding_mode``; funcpeft follows the base layer (as for LoRA), so the
  adapted layer is exactly the base layer run with ``W + delta``. Grouped convs are refused (PEFT's reshape fails
  on them), as are Conv1d/Conv3d and embeddings, which PEFT's AdaLoRA does not support either.

The rank allocation (budget schedule, importance scores, masks) lives in :mod:`funcpeft.adalora`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funcpeft import _layers
from funcpeft._layers import Kind
from funcpeft.config import AdaLoraConfig
from funcpeft.methods.base import BaseForward, Method, Rows, gather, register, rows_for

__all__ = ["SVDLayer", "METHOD", "DEFAULT_ADALORA_TARGETS", "prune_entry"]

_FLOATS = (torch.float32, torch.float64)
_EPS = 1e-5  # PEFT divides by ranknum + 1e-5

# PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING (peft.utils.constants, 0.21), by model_type.
DEFAULT_ADALORA_TARGETS: dict[str, Any] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",  # a regex, as in PEFT
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

NAMES = ("lora_A", "lora_B", "lora_E")


@dataclass(frozen=True)
class SVDLayer:
    kind: Kind
    r: int  # this module's rank: init_r, or the kept triplets under rank_pattern
    scaling: float  # lora_alpha (PEFT: the rank if lora_alpha <= 0)
    ranknum: float  # init_r: PEFT keeps the training-time divisor when it prunes
    dropout: float
    init_weights: bool

    def init(self, module: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        weight = module.weight
        dtype = weight.dtype if weight.dtype in _FLOATS else torch.float32
        n_in, n_out = _layers.in_out_features(module, self.kind)
        kernel = weight[0, 0].numel() if self.kind is Kind.CONV else 1
        a = torch.empty(self.r, n_in * kernel, dtype=dtype)
        e = torch.empty(self.r, 1, dtype=dtype)
        b = torch.empty(n_out, self.r, dtype=dtype)
        if self.init_weights:  # PEFT's reset_lora_parameters: E = 0, so a fresh adapter is the base model
            a.normal_(0.0, 0.02, generator=generator)
            e.zero_()
            b.normal_(0.0, 0.02, generator=generator)
        else:  # PEFT's torch.randn without the reset
            for t in (a, e, b):
                t.normal_(generator=generator)
        return {"lora_A": a.to(weight.device), "lora_B": b.to(weight.device), "lora_E": e.to(weight.device)}

    def delta(self, tensors: Mapping[str, Tensor], shape: torch.Size | tuple[int, ...]) -> Tensor:
        """``B (A * E) * scaling / (ranknum + 1e-5)`` in the canonical dense layout ``shape`` (PEFT's op order)."""
        a, b, e = tensors["lora_A"], tensors["lora_B"], tensors["lora_E"]
        return (b @ (a * e) * self.scaling / (self.ranknum + _EPS)).reshape(shape)

    def effective_weight(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        weight = _layers.canonical_weight(module, self.kind)
        return weight + self.delta(tensors, weight.shape).to(weight.dtype), getattr(module, "bias", None)

    def forward(
        self, module: nn.Module, tensors: Mapping[str, Tensor], base: BaseForward, x: Tensor, *args: Any, **kwargs: Any
    ) -> Tensor:
        result = base(module, x, *args, **kwargs)
        a = tensors["lora_A"]
        h = F.dropout(x, self.dropout, True) if self.dropout > 0.0 and module.training else x
        if h.dtype != a.dtype:
            h = h.to(a.dtype)
        if self.kind is Kind.CONV:
            update = _layers.conv(module, h, self.delta(tensors, module.weight.shape), None)
        else:
            update = h @ (a * tensors["lora_E"]).T @ tensors["lora_B"].T * self.scaling / (self.ranknum + _EPS)
        return (result + update).to(result.dtype)  # one rounding, as PEFT's in-place `result += update`

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
        """Row ``i`` of ``x`` with adapter ``rows.index[i]`` of the stacked ``tensors`` (gathered, batched matmuls)."""
        rows = rows_for(rows, x, path)
        if x.shape[0] == 0:  # an empty batch: nothing to select (and no -1 reshape can be inferred)
            return base(module, x, *args, **kwargs)
        result = base(module, x, *args, **kwargs)
        a, b, e = (gather(tensors[name], rows) for name in ("lora_A", "lora_B", "lora_E"))  # (B, r, in) ...
        h = F.dropout(x, self.dropout, True) if self.dropout > 0.0 and module.training else x
        if h.dtype != a.dtype:
            h = h.to(a.dtype)
        n, scale = x.shape[0], self.scaling / (self.ranknum + _EPS)
        if self.kind is Kind.CONV:  # one grouped conv runs every row with its own delta kernel: rows become groups
            deltas = torch.bmm(b, a * e).reshape(n * b.shape[1], *module.weight.shape[1:])
            flat = _layers.conv(module, h.reshape(1, -1, *h.shape[2:]), deltas, None, groups=n)
            update = flat.reshape(n, b.shape[1], *flat.shape[2:]) * scale
        else:
            hidden = torch.bmm(h.reshape(n, -1, h.shape[-1]), (a * e).transpose(1, 2))
            update = torch.bmm(hidden, b.transpose(1, 2)).reshape(*h.shape[:-1], b.shape[1]) * scale
        return (result + update).to(result.dtype)  # one rounding, as PEFT's in-place `result += update`


def _mask(config: AdaLoraConfig, path: str) -> list[bool] | None:
    return None if config.rank_pattern is None else config.rank_pattern.get(f"{path}.lora_E")


def make_layer(config: AdaLoraConfig, path: str, module: nn.Module, kind: Kind | None) -> SVDLayer:
    if kind not in (Kind.LINEAR, Kind.CONV1D_GPT2) and not isinstance(module, nn.Conv2d):
        raise ValueError(
            f"Module {path!r} ({type(module).__name__}) matched `target_modules`, but AdaLoRA can only adapt "
            "nn.Linear, nn.Conv2d and transformers' Conv1D (as in PEFT); narrow `target_modules` or add it to "
            "`exclude_modules`."
        )
    if kind is Kind.CONV and module.groups != 1:
        raise ValueError(
            f"AdaLoRA cannot adapt the grouped convolution {path!r} (groups={module.groups}): its dense SVD update "
            "does not fit a grouped kernel (PEFT fails on it too); exclude it via `exclude_modules`."
        )
    mask = _mask(config, path)
    if mask is not None and len(mask) != config.init_r:
        raise ValueError(
            f"`rank_pattern[{path + '.lora_E'!r}]` has {len(mask)} entries, but `init_r` is {config.init_r}: the mask "
            "must hold one flag per initial triplet; was the config saved with another `init_r`?"
        )
    r = config.init_r if mask is None else sum(mask)
    return SVDLayer(
        kind=kind,
        r=r,
        scaling=float(config.lora_alpha) if config.lora_alpha > 0 else float(r),
        ranknum=float(config.init_r),
        dropout=float(config.lora_dropout),
        init_weights=bool(config.init_lora_weights),
    )


def resolve(config: AdaLoraConfig, model: nn.Module) -> AdaLoraConfig:
    """Check that every ``rank_pattern`` key names an adapted module (PEFT fails on others while loading)."""
    if config.rank_pattern:
        from funcpeft._targeting import find_targets

        targets = set(find_targets(model, config, DEFAULT_ADALORA_TARGETS, warn=False))  # adapt warns once
        for key in config.rank_pattern:
            if key.removesuffix(".lora_E") not in targets:
                shown = sorted(targets)[:5]
                raise ValueError(
                    f"`rank_pattern` key {key!r} does not name an adapted module of {type(model).__name__} "
                    f"(keys are '<module_path>.lora_E'; adapted modules: {shown}{'...' if len(targets) > 5 else ''})."
                )
    return config


def required(config: AdaLoraConfig, names: frozenset[str]) -> frozenset[str]:
    return frozenset(NAMES)


def prune_entry(config: Any, path: str, entry: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``entry`` as PEFT's ``save_pretrained`` stores it: cut to the kept triplets of ``config.rank_pattern``.

    PEFT's ``resize_state_dict_by_rank_pattern``: a tensor whose rank dimension already has the kept size is stored
    as it is, a full-rank one is indexed with the mask.

    Raises:
        ValueError: the entry's rank fits neither the mask's length nor its number of kept triplets.
    """
    mask = _mask(config, path) if isinstance(config, AdaLoraConfig) else None
    if mask is None or "lora_E" not in entry:
        return entry
    kept = sum(mask)
    index = torch.tensor(mask, dtype=torch.bool)
    out = dict(entry)
    for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
        tensor = entry[name]
        size = tensor.shape[dim]
        if size == kept:
            continue
        if size != len(mask):
            raise ValueError(
                f"`params[{path!r}][{name!r}]` has rank {size}, but `rank_pattern[{path + '.lora_E'!r}]` has "
                f"{len(mask)} entries ({kept} kept): the tensors belong to another allocation."
            )
        out[name] = tensor[index.to(tensor.device)] if dim == 0 else tensor[:, index.to(tensor.device)]
    return out


PEFT_KEYS = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}

METHOD = register(
    Method(
        name="adalora",
        config_type=AdaLoraConfig,
        default_targets=DEFAULT_ADALORA_TARGETS,
        make_layer=make_layer,
        peft_keys=PEFT_KEYS,
        required=required,
        resolve=resolve,
        to_checkpoint=prune_entry,
    )
)
