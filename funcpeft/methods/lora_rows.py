"""LoRA on a mixed batch: row ``i`` of a layer's input runs with its own ``A_i``, ``B_i`` and scaling ``s_i``.

The one implementation of per-row LoRA math, shared by both stacked layouts: a same-config stack (every adapter
has the layer's rank, :meth:`funcpeft.methods.lora.LoraLayer.forward_mixed`) and a heterogeneous, rank-packed
stack (:mod:`funcpeft.methods.packed`). Each gathers every row's tensors its own way (zeros for base rows and for
rank columns a row's adapter does not have, so those contribute exactly nothing) and calls :func:`apply_rows` or
:func:`embedding_rows`, which compute, per row, PEFT's forward::

    y_i = base(x_i) + s_i * B_i A_i dropout_i(x_i) [+ s_i * bias_i]      (LoRA)
    y_i = base(x_i) + (d_i - 1) * W x_i + d_i * s_i * B_i A_i x_i         (DoRA: d_i = m_i / ||W + s_i B_i A_i||)

with BGMV-style batched matmuls (Punica/S-LoRA): one pass for all rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funcpeft import _layers
from funcpeft._layers import Kind

__all__ = ["apply_rows", "embedding_scale", "embedding_rows", "row_dropout"]

Scale = float | Tensor  # one scaling for every row, or one per row: (n,)


def embedding_scale(module: nn.Module, dtype: torch.dtype) -> Tensor:
    """The factor a scaled embedding multiplies its lookup by, in ``dtype``: a tensor (Gemma's buffer) or a Python
    number (BART's, Pegasus', ...), read as PEFT's ``_get_embed_scale`` does (a number first becomes a tensor of the
    weight's dtype)."""
    scale = module.embed_scale
    if not isinstance(scale, Tensor):
        scale = torch.tensor(scale, dtype=module.weight.dtype, device=module.weight.device)
    return scale.to(dtype)


def _per_row(value: Scale, n: int, dims: int) -> Scale:
    """A per-row ``(n,)`` scaling viewed to broadcast against an ``(n, ...)`` tensor of ``dims`` dims (a float
    passes through)."""
    if not isinstance(value, Tensor):
        return value
    return value.view(n, *(1,) * (dims - 1))


def row_dropout(x: Tensor, p: float | Tensor, training: bool) -> Tensor:
    """The adapter branch's dropout: ``F.dropout`` with one rate, or each row with its own rate ``p[i]`` (adapters
    of a heterogeneous stack may differ in ``lora_dropout``; a row with rate 0 is left exactly as it is)."""
    if not training:
        return x
    if not isinstance(p, Tensor):
        return F.dropout(x, p, True) if p > 0.0 else x
    p = p.to(x.dtype).view(-1, *(1,) * (x.dim() - 1))
    keep = torch.rand_like(x) >= p
    return torch.where(keep, x / (1 - p).clamp(min=torch.finfo(x.dtype).tiny), 0.0)


def apply_rows(
    module: nn.Module,
    kind: Kind,
    h: Tensor,
    result: Tensor,
    a: Tensor,
    b: Tensor,
    scaling: Scale,
    bias: Tensor | None = None,
    dora: Tensor | None = None,
    dropped: bool = False,
) -> Tensor:
    """The adapted output of a Linear / Conv1D / ConvNd layer for a mixed batch.

    Args:
        module: the base layer; ``result`` is its output on the (undropped) input.
        kind: the layer kind.
        h: the adapter branch's input (after dropout, in the adapter's dtype), rows first.
        a: every row's ``A``: ``(n, r, in)`` or ``(n, r, in, *kernel)`` (zeros where a row has no adapter).
        b: every row's dense ``B``: ``(n, out, r)`` (zeros likewise).
        scaling: the LoRA scaling, one for all rows or ``(n,)``.
        bias: every row's ``lora_B.bias`` ``(n, out)`` (zeros for rows without one), or None.
        dora: every row's DoRA scale ``m / ||W + s B A||`` ``(n, out)`` (1 for rows without DoRA), or None.
        dropped: dropout was applied to ``h`` (DoRA then recomputes the base term on ``h``, as PEFT).
    """
    n = h.shape[0]
    if kind is not Kind.CONV and bias is None and dora is None and result.dtype == a.dtype:
        # The common case, fused: scale the rank-r hidden state (not the full output) and add B's product into
        # the base output in one baddbmm, so no full-size temporary besides the result.
        hidden = torch.bmm(h.reshape(n, -1, h.shape[-1]), a.transpose(1, 2)) * _per_row(scaling, n, 3)
        out = torch.baddbmm(result.reshape(n, -1, result.shape[-1]), hidden, b.transpose(1, 2))
        return out.view(result.shape)
    conv = kind is Kind.CONV
    if conv:
        # one grouped conv runs every row with its own A: rows become groups
        flat = _layers.conv(module, h.reshape(1, -1, *h.shape[2:]), a.reshape(-1, *a.shape[2:]), None, groups=n)
        hidden = flat.reshape(n, a.shape[1], *flat.shape[2:])
        update = torch.einsum("br...,bor->bo...", hidden, b)
    else:
        hidden = torch.bmm(h.reshape(n, -1, h.shape[-1]), a.transpose(1, 2))
        update = torch.bmm(hidden, b.transpose(1, 2)).reshape(*h.shape[:-1], b.shape[1])
    if bias is not None:
        update = update + _channels(bias, n, update.dim(), conv)
    update = update * _per_row(scaling, n, update.dim())
    if dora is None:
        return result + update.to(result.dtype)
    scale = _channels(dora, n, result.dim(), conv)
    if dropped:
        weight = _layers.canonical_weight(module, kind).to(h.dtype)
        base_term = _layers.run(module, kind, h, weight, None)
    else:
        base_term = result
        if module.bias is not None:
            base_term = result - (module.bias.view(1, -1, *(1,) * (result.dim() - 2)) if conv else module.bias)
    return (result + ((scale - 1) * base_term + scale * update)).to(result.dtype)


def embedding_rows(
    module: nn.Module,
    x: Tensor,
    result: Tensor,
    hidden: Tensor,
    b: Tensor,
    scaling: Scale,
    dora: Tensor | None = None,
    embed_scale: bool = False,
) -> Tensor:
    """The adapted output of an embedding for a mixed batch.

    Args:
        x: the token ids ``(n, ...)``; ``result`` the base embedding of them.
        hidden: every token's rank-r code from its row's ``lora_embedding_A``: ``(n, ..., r)`` (zeros for rows
            without an adapter and rank columns a row's adapter does not have).
        b: every row's ``lora_embedding_B`` ``(n, dim, r)``.
        scaling: one for all rows or ``(n,)``.
        dora: every row's DoRA scale ``(n, dim)`` (1 for rows without DoRA), or None.
        embed_scale: the module scales its output (Gemma's embedding), so the update is scaled too.
    """
    if module.padding_idx is not None:  # as F.embedding: the padding entry gets no gradient
        hidden = torch.where((x == module.padding_idx).unsqueeze(-1), hidden.detach(), hidden)
    n = x.shape[0]
    update = torch.bmm(hidden.reshape(n, -1, hidden.shape[-1]), b.transpose(1, 2)).reshape(*x.shape, -1)
    update = update * _per_row(scaling, n, update.dim())
    if embed_scale:
        update = update * embedding_scale(module, update.dtype)
    if dora is None:
        return (result + update).to(result.dtype)
    scale = dora.view(n, *(1,) * (x.dim() - 1), -1)
    return (result + ((scale - 1) * result + scale * update)).to(result.dtype)


def _channels(value: Tensor, n: int, dims: int, conv: bool) -> Tensor:
    """A per-row, per-output-channel ``(n, out)`` tensor viewed against an output of ``dims`` dims (channels last
    for Linear/Conv1D, second for convs)."""
    if conv:
        return value.view(n, -1, *(1,) * (dims - 2))
    return value.view(n, *(1,) * (dims - 2), -1)
