"""LoRA (Hu et al., 2021), rsLoRA and DoRA on Linear, GPT-2 Conv1D, Embedding and Conv1d/2d/3d layers.

Tensors, shapes and initialisation are PEFT's (``peft.tuners.lora``); the forward is PEFT's math:

- Linear / Conv1D: ``y = base(x) + B(A(dropout(x))) * scaling`` with ``A`` (r, in), ``B`` (out, r);
- Embedding: ``y = base(x) + embed(x, A.T) @ B.T * scaling`` with ``A`` (r, num), ``B`` (dim, r), no dropout;
- ConvNd: ``A`` a conv with the base's kernel, stride, padding, padding mode and dilation, ``B`` a 1x1 conv
  with the base's groups. PEFT builds ``A`` without the dilation (so it fails on dilated convs) and with zero
  padding whatever the base's ``padding_mode``; funcpeft follows the base layer, so that the adapted layer is
  exactly the base layer run with ``W + delta``;
- DoRA (Liu et al., 2024): ``y = m / ||W + s BA||_c * (W + s BA) x + b`` with the norm detached (the paper's
  section 4.3, as PEFT); with active dropout PEFT's split form applies. On a grouped conv the norm is that of the
  true adapted weight (dense: ``A`` reads every input channel), where PEFT 0.21.2 uses
  ``mm(B.view(-1, r), A.view(r, -1))``, not the grouped delta; the two agree wherever ``B = 0``.

Every delta is computed in the canonical ``(out, in, *kernel)`` layout (:mod:`funcpeft._layers`), so
``effective_weight`` is one formula for all kinds.

This file is the layer's math (:class:`LoraLayer`); its construction (``make_layer``: per-layer checks, patterns,
fold thresholds), PEFT's key names and the method's registration are in :mod:`funcpeft.methods.lora_method`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funcpeft import _layers
from funcpeft._layers import Kind
from funcpeft._quant import is_quantized
from funcpeft.methods import lora_init
from funcpeft.methods.base import BaseForward, Rows, gather, rows_for, take
from funcpeft.methods.lora_rows import apply_rows, embedding_rows, embedding_scale, row_dropout

__all__ = ["LoraLayer"]

_FLOATS = (torch.float32, torch.float64)


@dataclass(frozen=True)
class LoraLayer:
    kind: Kind
    r: int
    scaling: float
    dropout: float
    use_dora: bool
    lora_bias: bool
    init_weights: bool | str
    groups: int = 1
    ndim: int = 2  # the base weight's dimensions (conv magnitudes are (1, out, 1, ...))
    embed_scale: bool = False  # the embedding scales its output (e.g. Gemma's), so the update is scaled too
    # Inference on inputs of at least this many elements folds the adapter into the weight for the call (one
    # matmul instead of three); None where the layer's forward is not the library's own Linear/Conv1D forward.
    fold_min_numel: int | None = None
    # The same under torch.compile, where the unmerged form's extra kernels cost no Python dispatch and its add
    # fuses into the next kernel: folding pays only once it saves multiply-adds.
    fold_min_numel_compiled: int | None = None

    # ----- names -------------------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, str]:
        if self.kind is Kind.EMBEDDING:
            return "lora_embedding_A", "lora_embedding_B"
        return "lora_A", "lora_B"

    def __post_init__(self) -> None:
        if self._residual:  # PiSSA/OLoRA: the rank-2r plain LoRA layer run on lora_init.expanded tensors
            object.__setattr__(self, "_full", dataclasses.replace(self, r=2 * self.r, init_weights=True))

    @property
    def _residual(self) -> bool:
        return lora_init.is_residual(self.init_weights)

    # ----- init ----------------------------------------------------------------------------------------------
    def init(self, module: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        if self._residual or self.init_weights == "orthogonal":
            return self._init_from_weight(module, generator)
        weight = module.weight
        dtype = weight.dtype if weight.dtype in _FLOATS else torch.float32
        n_in, n_out = _layers.in_out_features(module, self.kind)
        kernel = tuple(weight.shape[2:]) if self.kind is Kind.CONV else ()
        a_shape = (self.r, n_in, *kernel)
        b_shape = (n_out, self.r // self.groups, *(1,) * len(kernel))
        a, b = torch.empty(a_shape, dtype=dtype), torch.empty(b_shape, dtype=dtype)
        init = self.init_weights
        if self.kind is Kind.EMBEDDING:
            # PEFT: A zero and B normal, so the adapter starts as a no-op; with init False both normal.
            a.normal_(generator=generator) if init is False else a.zero_()
            b.normal_(generator=generator)
        else:
            lora_init.init_factors(a, b, init, self.r, generator)
        a_name, b_name = self.names
        tensors = {a_name: a, b_name: b}
        if self.lora_bias:
            bias = torch.zeros(n_out, dtype=dtype)
            if init is False:  # nn.Linear/ConvNd's default bias init for lora_B
                bound = 1 / math.sqrt(b[0].numel())
                bias.uniform_(-bound, bound, generator=generator)
            tensors["lora_B.bias"] = bias
        tensors = {k: v.to(weight.device) for k, v in tensors.items()}
        if self.use_dora:
            canonical = _layers.canonical_weight(module, self.kind).to(dtype)
            norm = _row_norm(canonical + self.delta(tensors, canonical.shape))
            tensors["lora_magnitude_vector"] = norm.reshape(self._magnitude_shape(n_out)).detach()
        return tensors

    def _init_from_weight(self, module: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        """PiSSA / OLoRA (initial factors kept frozen beside the trainable copies) and PEFT's orthogonal init."""
        weight = _layers.canonical_weight(module, self.kind)
        dtype = weight.dtype if weight.dtype in _FLOATS else torch.float32
        if self._residual:
            a0, b0 = lora_init.initial_factors(weight, self.r, self.scaling, str(self.init_weights), generator)
            a0, b0 = a0.to(weight.device, dtype), b0.to(weight.device, dtype)
            tensors = {"lora_A": a0.clone(), "lora_B": b0.clone(), "lora_A0": a0, "lora_B0": b0}
        else:
            a, b = lora_init.orthogonal(self.r, weight.shape[1], weight.shape[0], generator)
            tensors = {"lora_A": a.to(weight.device, dtype), "lora_B": b.to(weight.device, dtype)}
        if self.use_dora:
            canonical = weight.to(dtype)
            norm = _row_norm(canonical + self.delta(tensors, canonical.shape))
            tensors["lora_magnitude_vector"] = norm.detach()
        return tensors

    def _magnitude_shape(self, n_out: int) -> tuple[int, ...]:
        if self.kind is Kind.CONV:  # PEFT stores the conv magnitude as (1, out, 1, ...)
            return (1, n_out) + (1,) * (self.ndim - 2)
        return (n_out,)

    # ----- math ----------------------------------------------------------------------------------------------
    def delta(self, tensors: Mapping[str, Tensor], shape: torch.Size | tuple[int, ...]) -> Tensor:
        """``scaling * B @ A`` in the canonical dense layout ``shape``."""
        if self._residual:
            return self._full.delta(lora_init.expanded(tensors), shape)
        a_name, b_name = self.names
        a, b = tensors[a_name], tensors[b_name]
        b = self._dense_b(b.reshape(b.shape[0], -1))
        return (b @ a.reshape(self.r, -1)).reshape(shape) * self.scaling

    def effective_weight(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        if self._residual:
            return self._full.effective_weight(module, lora_init.expanded(tensors))
        weight = _layers.canonical_weight(module, self.kind)
        merged = weight + self.delta(tensors, weight.shape).to(weight.dtype)
        bias = getattr(module, "bias", None) if self.kind is not Kind.EMBEDDING else None
        if self.use_dora:
            magnitude = tensors["lora_magnitude_vector"].reshape(-1, *(1,) * (weight.dim() - 1))
            merged = merged * (magnitude / _row_norm(merged).reshape(magnitude.shape))
        if self.lora_bias:
            extra = tensors["lora_B.bias"] * self.scaling
            bias = extra if bias is None else bias + extra
        return merged, bias

    def forward(
        self, module: nn.Module, tensors: Mapping[str, Tensor], base: BaseForward, x: Tensor, *args: Any, **kwargs: Any
    ) -> Tensor:
        if self._residual:
            return self._full.forward(module, lora_init.expanded(tensors), base, x, *args, **kwargs)
        if self.fold_min_numel is not None and not torch.is_grad_enabled():  # (training never folds)
            fold_min = self.fold_min_numel_compiled if torch.compiler.is_compiling() else self.fold_min_numel
            if x.numel() >= fold_min and not (self.dropout > 0.0 and module.training) and not args and not kwargs:
                folded = self._folded(module, tensors, x)
                if folded is not None:
                    return folded
        result = base(module, x, *args, **kwargs)
        if self.kind is Kind.EMBEDDING:
            return self._embedding(module, tensors, x, result)
        a, b = tensors["lora_A"], tensors["lora_B"]
        bias_b = tensors["lora_B.bias"] if self.lora_bias else None
        dropped = self.dropout > 0.0 and module.training
        h = F.dropout(x, self.dropout, True) if dropped else x
        if h.dtype != a.dtype:
            h = h.to(a.dtype)
        # Eagerly the scaling is applied to the rank-r hidden state (r channels, not the layer's full output): one
        # small multiply, and B's product lands scaled; compiled, it multiplies B's product (see _add_update). (Not
        # `result.add(update, alpha=s)`: torch 2.13's inductor drops `alpha` when gradients are on.)
        if self.kind is not Kind.CONV and bias_b is None and not self.use_dora and result.dtype == a.dtype:
            return self._add_update(result, h, a, b)
        if bias_b is not None:
            bias_b = bias_b * self.scaling
        if self.kind is Kind.CONV:
            hidden = _layers.conv(module, h, a, None) * self.scaling
            update = _CONV_FNS[a.dim() - 2](hidden, b, bias_b, 1, 0, 1, self.groups)
        else:
            update = F.linear(F.linear(h, a) * self.scaling, b, bias_b)
        if not self.use_dora:
            return result + (update if update.dtype == result.dtype else update.to(result.dtype))
        return self._dora(module, tensors, h, result, update, dropped)

    def _add_update(self, result: Tensor, h: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``result + s * (h A^T) B^T`` with B's product accumulated into the base output inside the GEMM
        (addmm/baddbmm): two kernels and no full-size temporary. Without gradients, eagerly, on the library's own
        layer forward (whose output is this call's fresh tensor), it accumulates in place. The result is never a
        view, as ``nn.Linear``'s is not (FSDP2 and in-place residuals downstream rely on that)."""
        in_place = (
            self.fold_min_numel is not None
            and not torch.is_grad_enabled()
            and result.is_contiguous()
            and not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is None
        )
        if in_place:
            hidden = torch.mm(h.reshape(-1, h.shape[-1]), a.t())
            result.view(-1, result.shape[-1]).addmm_(hidden, b.t(), alpha=self.scaling)
            return result
        scaling = self.scaling
        hidden = torch.mm(h.reshape(-1, h.shape[-1]), a.t())
        if torch.compiler.is_compiling():
            # inductor copies addmm's input into a fresh buffer (one more kernel per layer); a plain add of B's
            # product fuses into the pointwise kernel that follows instead, and so does the scaling after it (on
            # the rank-r hidden state, between the two GEMMs, it would be a kernel of its own)
            update = torch.mm(hidden, b.t()).view(result.shape)
            return result + (update if scaling == 1.0 else update * scaling)
        if scaling != 1.0:  # (x * 1.0 is x exactly: PEFT's default r = lora_alpha = 8 skips a kernel)
            hidden = hidden * scaling
        out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden, b.t())
        # back to the input's leading dims as matmul does it: a new tensor for autograd, not a view of `out`
        return torch.ops.aten._unsafe_view(out, result.shape)

    def _folded(self, module: nn.Module, tensors: Mapping[str, Tensor], x: Tensor) -> Tensor | None:
        """Inference with the adapter folded into the weight for this call: ``base(x; W + s B A)``.

        Without gradients, one GEMM with the adapted weight costs less than the three of the unmerged form once
        the input has enough rows (``fold_min_numel``), and it is the only form whose Python overhead is that of
        the base layer. Half-precision layers with float32 adapters keep the unmerged form (folding would round
        the update into the half-precision weight), and so do quantized weights (a torchao tensor subclass reads as
        float but cannot take ``addmm``; :mod:`funcpeft._quant`).
        """
        weight, a, b = module.weight, tensors["lora_A"], tensors["lora_B"]
        if weight.dtype != a.dtype or x.dtype != a.dtype or is_quantized(weight):
            return None
        bias = module.bias
        if self.lora_bias:
            extra = tensors["lora_B.bias"] * self.scaling
            bias = extra if bias is None else bias + extra
        if self.use_dora:
            merged, bias = self.effective_weight(module, tensors)
            return F.linear(x, merged, bias)
        if self.kind is Kind.LINEAR:
            return F.linear(x, torch.addmm(weight, b, a, alpha=self.scaling), bias)
        # GPT-2's Conv1D: its own forward, with the (in, out) weight W + s (B A)^T
        merged = torch.addmm(weight, a.t(), b.t(), alpha=self.scaling)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.mm(flat, merged) if bias is None else torch.addmm(bias, flat, merged)
        return out.view(*x.shape[:-1], merged.shape[-1])

    def _dora(
        self, module: nn.Module, tensors: Mapping[str, Tensor], h: Tensor, result: Tensor, update: Tensor, dropped: bool
    ) -> Tensor:
        weight = _layers.canonical_weight(module, self.kind).to(h.dtype)
        norm = _row_norm(weight + self.delta(tensors, weight.shape).detach()).detach()
        magnitude = tensors["lora_magnitude_vector"]
        scale = magnitude / norm.reshape(magnitude.shape)  # conv magnitudes are (1, out, 1, ...)
        if dropped:  # PEFT recomputes the base term on the dropped-out input
            base_term = _layers.run(module, self.kind, h, weight, None)
        else:
            base_term = result
            bias = module.bias
            if bias is not None:
                base_term = result - (bias.view(1, -1, *(1,) * (result.dim() - 2)) if self.kind is Kind.CONV else bias)
        out = result + (scale - 1) * base_term + scale * update  # update is already scaled
        return out.to(result.dtype)

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
        """Row ``i`` of ``x`` with adapter ``rows.index[i]`` of the stacked ``tensors`` (BGMV-style: gather each
        row's A and B, then two batched matmuls for all rows). Base rows gather zeros (:func:`gather`), so their
        update is exactly zero whatever the other adapters hold."""
        if self._residual:
            full = lora_init.expanded(tensors)
            return self._full.forward_mixed(module, full, rows, path, base, x, *args, **kwargs)
        rows = rows_for(rows, x, path)
        if x.shape[0] == 0:  # an empty batch: nothing to select (and no -1 reshape can be inferred)
            return base(module, x, *args, **kwargs)
        result = base(module, x, *args, **kwargs)
        dora = self._dora_scale_mixed(module, tensors, rows, tensors[self.names[0]].dtype) if self.use_dora else None
        if self.kind is Kind.EMBEDDING:
            hidden = _codes(tensors["lora_embedding_A"], rows, x)  # (B, ..., r): each row's own table
            hidden = torch.where(rows.active.view(-1, *(1,) * (hidden.dim() - 1)), hidden, 0.0)
            b = gather(tensors["lora_embedding_B"], rows)
            return embedding_rows(module, x, result, hidden, b, self.scaling, dora, self.embed_scale)
        a, b = gather(tensors["lora_A"], rows), gather(tensors["lora_B"], rows)  # (B, r, in[, k]), (B, out, r/g[, 1])
        dropped = self.dropout > 0.0 and module.training
        h = row_dropout(x, self.dropout, dropped)
        if h.dtype != a.dtype:
            h = h.to(a.dtype)
        if self.kind is Kind.CONV:
            b = self._dense_b(b.reshape(b.shape[0], b.shape[1], -1))
        bias = gather(tensors["lora_B.bias"], rows) if self.lora_bias else None
        return apply_rows(module, self.kind, h, result, a, b, self.scaling, bias, dora, dropped)

    def _dense_b(self, b: Tensor) -> Tensor:
        """lora_B ``(..., out, r / groups)`` of a grouped 1x1 conv as the dense ``(..., out, r)`` map: B's rows of
        group i only read A's rows of group i, so the dense map is block-diagonal."""
        if self.groups == 1:
            return b
        out, per = b.shape[-2:]
        out_per = out // self.groups
        dense = b.new_zeros(*b.shape[:-1], self.r)
        for i in range(self.groups):
            rows = slice(i * out_per, (i + 1) * out_per)
            dense[..., rows, i * per : (i + 1) * per] = b[..., rows, :]
        return dense

    def _dora_scale_mixed(self, module: nn.Module, tensors: Mapping[str, Tensor], rows: Rows, dtype) -> Tensor:
        """DoRA's ``m / ||W + s B A||`` for every row's adapter (detached norm), 1 for base rows: (B, out).

        Under ``generate`` (``rows.cache``, no grad) it is computed once per call and reused by every decode step, as
        :func:`gather` reuses the gathered tensors: recomputing it made every step pay the K-adapter norm and keep
        its result alive until the call ended."""
        cache, magnitude = rows.cache, tensors["lora_magnitude_vector"]
        key = ("dora", id(magnitude))
        if cache is not None:
            hit = cache.get(key)
            if hit is not None and hit[0] is magnitude:
                return hit[1]
        weight = _layers.canonical_weight(module, self.kind).to(dtype)
        a_name, b_name = self.names
        a, b = tensors[a_name].detach(), tensors[b_name].detach()
        k = a.shape[0]
        b = self._dense_b(b.reshape(k, b.shape[1], -1)) if self.kind is Kind.CONV else b.reshape(k, b.shape[1], -1)
        delta = torch.bmm(b, a.reshape(k, self.r, -1)) * self.scaling
        norm = (weight.reshape(1, weight.shape[0], -1) + delta).norm(p=2, dim=2)  # (K, out)
        picked = gather(magnitude, rows, 1.0)  # the leaf's own rows (sparse-able)
        scale = picked.reshape(picked.shape[0], -1) / gather(norm, rows, 1.0)
        if cache is not None:
            cache[key] = (magnitude, scale)  # holds the leaf: its id cannot be reused meanwhile
        return scale

    def _embedding(self, module: nn.Module, tensors: Mapping[str, Tensor], x: Tensor, result: Tensor) -> Tensor:
        a, b = tensors["lora_embedding_A"], tensors["lora_embedding_B"]
        update = _layers.embed(module, x, a.T) @ b.T * self.scaling
        if self.embed_scale:
            update = update * embedding_scale(module, update.dtype)
        if not self.use_dora:
            return (result + update).to(result.dtype)
        weight = module.weight.T.to(a.dtype)
        norm = _row_norm(weight + self.delta(tensors, weight.shape).detach()).detach()
        scale = tensors["lora_magnitude_vector"] / norm
        return (scale * result + scale * update).to(result.dtype)


_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _used(used: Tensor, inverse: Tensor, mask: Tensor) -> Tensor:
    """Which of the unique indices ``used`` some unmasked position refers to (``inverse``: positions -> used)."""
    return torch.zeros(used.shape, dtype=torch.bool, device=used.device).index_fill_(0, inverse[mask], True)


def _codes(a: Tensor, rows: Rows, x: Tensor) -> Tensor:
    """Each token's rank-r code from its row's ``lora_embedding_A`` (``a``: (K, r, num)): (B, ..., r), zeros for
    base rows. Only the adapters the rows use are taken from ``a`` (so a sparse gradient stays that small)."""
    index = rows.index
    if rows.sparse:  # (data-dependent sizes: not while compiling, where sparse gradients are refused anyway)
        used, index = torch.unique(index, return_inverse=True)
        a = take(a, used, True, _used(used, index, rows.active))  # (U, r, num)
    hidden = a.transpose(1, 2)[index.view(-1, *(1,) * (x.dim() - 1)), x]
    return torch.where(rows.active.view(-1, *(1,) * (hidden.dim() - 1)), hidden, 0.0)


def _row_norm(weight: Tensor) -> Tensor:
    """The L2 norm of each output row of a canonical weight (DoRA's column norm ``||W||_c``)."""
    return weight.reshape(weight.shape[0], -1).norm(p=2, dim=1)
