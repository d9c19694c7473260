"""The layer kinds adapters know, each with one *canonical* dense weight layout ``(out, in, *kernel)``.

Methods compute their deltas in the canonical layout, so one formula serves every kind; the kind converts to
and from the module's own layout (GPT-2's ``Conv1D`` stores ``(in, out)``, ``nn.Embedding`` ``(num, dim)``,
a grouped convolution ``(out, in / groups, *kernel)``) and can run the layer functionally with any canonical
weight. ``run(module, x, weight, bias)`` with the adapted weight is the reference every test compares with
(lorax's ``materialize``).
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funcpeft import _quant, _sharded

__all__ = ["Kind", "kind_of", "is_gpt2_conv1d", "canonical_weight", "to_module_layout", "run", "in_out_features"]


class Kind(enum.Enum):
    LINEAR = "Linear"
    CONV1D_GPT2 = "Conv1D"
    EMBEDDING = "Embedding"
    CONV = "Conv"
    MHA = "MultiheadAttention"  # LoRA only (funcpeft.methods.lora_mha): no single canonical weight
    PARAMETER = "Parameter"  # LoRA's target_parameters (funcpeft.methods.lora_params): raw parameters


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (a Linear storing its weight as (in, out)), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def kind_of(module: nn.Module) -> Kind | None:
    if isinstance(module, nn.Linear):
        return Kind.LINEAR
    if isinstance(module, nn.Embedding):
        return Kind.EMBEDDING
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Kind.CONV
    if is_gpt2_conv1d(module):
        return Kind.CONV1D_GPT2
    return None


def in_out_features(module: nn.Module, kind: Kind) -> tuple[int, int]:
    if kind is Kind.LINEAR:
        return module.in_features, module.out_features
    if kind is Kind.CONV1D_GPT2:
        return module.weight.shape[0], module.weight.shape[1]
    if kind is Kind.EMBEDDING:
        return module.num_embeddings, module.embedding_dim
    return module.in_channels, module.out_channels


def canonical_weight(module: nn.Module, kind: Kind, weight: Tensor | None = None) -> Tensor:
    """``weight`` (default: the module's own, read as float if it is quantized: :mod:`funcpeft._quant`) in the
    dense ``(out, in, *kernel)`` layout."""
    w = module.weight if weight is None else weight
    if weight is None and (_quant.describe(module) is not None or _sharded.is_sharded(w)):
        w = _quant.dequantized(module)
    if kind is Kind.LINEAR:
        return w
    if kind in (Kind.CONV1D_GPT2, Kind.EMBEDDING):
        return w.T
    if module.groups == 1:
        return w
    # A grouped convolution is a dense one whose weight is block-diagonal over the groups.
    g, out, per_in = module.groups, w.shape[0], w.shape[1]
    dense = w.new_zeros((out, per_in * g, *w.shape[2:]))
    out_per = out // g
    for i in range(g):
        dense[i * out_per : (i + 1) * out_per, i * per_in : (i + 1) * per_in] = w[i * out_per : (i + 1) * out_per]
    return dense


def to_module_layout(module: nn.Module, kind: Kind, weight: Tensor) -> Tensor:
    """The inverse of :func:`canonical_weight`.

    Raises:
        ValueError: ``weight`` of a grouped convolution is not block-diagonal, so no weight of the module's
            shape computes it.
    """
    if kind is Kind.LINEAR:
        return weight
    if kind in (Kind.CONV1D_GPT2, Kind.EMBEDDING):
        return weight.T
    if module.groups == 1:
        return weight
    g, out = module.groups, weight.shape[0]
    per_in, out_per = weight.shape[1] // g, out // g
    blocks = [weight[i * out_per : (i + 1) * out_per, i * per_in : (i + 1) * per_in] for i in range(g)]
    grouped = torch.cat(blocks, dim=0)
    if not torch.equal(canonical_weight(module, kind, grouped), weight):
        raise ValueError(
            f"The adapted weight of this {type(module).__name__} with groups={g} mixes channels across groups, "
            "so it cannot be folded into a grouped weight; keep the adapter unmerged for this layer."
        )
    return grouped


_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int = 1) -> Tensor:
    """``module``'s convolution (stride, padding, padding_mode, dilation) with another weight and groups."""
    fn = _CONV_FNS[weight.dim() - 2]
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return fn(x, weight, bias, module.stride, 0, module.dilation, groups)
    return fn(x, weight, bias, module.stride, module.padding, module.dilation, groups)


def embed(module: nn.Module, x: Tensor, table: Tensor) -> Tensor:
    """Look ``x`` up in ``table`` (num, dim) with the module's padding index, as its own forward would."""
    return F.embedding(x, table, module.padding_idx, None, 2.0, module.scale_grad_by_freq, module.sparse)


def run(module: nn.Module, kind: Kind, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Run ``module`` functionally with a canonical dense ``weight`` and ``bias`` in place of its own."""
    if kind in (Kind.LINEAR, Kind.CONV1D_GPT2):
        return F.linear(x, weight, bias)
    if kind is Kind.EMBEDDING:
        return embed(module, x, weight.T)
    return conv(module, x, weight, bias)
