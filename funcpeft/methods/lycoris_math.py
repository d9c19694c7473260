"""What LoHa and LoKr (PEFT's LyCORIS tuners, ``peft.tuners.lycoris_utils``) share: a full delta weight built from
small factors, added to the base layer's output as PEFT does, with PEFT's train-time dropouts.

Both methods compute a delta ``dW`` in the module's own weight layout (a grouped conv's ``(out, in / groups, *k)``)
and add ``F.linear(x, dW)`` / the base convolution run with ``dW`` and no bias to the base output: PEFT's
``_get_delta_activations``, so outputs match PEFT's to rounding and the adapted layer is the base layer run with
``W + dW`` (``effective_weight``). The convolution follows the base layer's ``padding_mode``; PEFT's unmerged forward
zero-pads whatever it is, so for ``padding_mode != "zeros"`` PEFT's unmerged output differs from its own merged model,
and funcpeft computes the merged one.

Train-mode randomness, as PEFT's (global RNG, CPU draws, in PEFT's order: base forward, then the module draw, then
the rank draw):

- ``module_dropout``: with probability ``p`` the whole delta is skipped for the call (``torch.rand(1) > p`` keeps it).
  PEFT draws that number in every train-mode call even when ``module_dropout = 0``; funcpeft only draws when some
  dropout is configured, so that a train-mode call without dropout has no randomness (``torch.func.vmap`` accepts
  it). With dropout on, the draws are PEFT's, except that funcpeft also draws the rank mask when the module is
  dropped (PEFT skips it), so the global RNG stream diverges from PEFT's after a dropped module.
- ``rank_dropout``: each *output row* of ``dW`` is zeroed with probability ``p`` (``torch.rand(out) > p``). LoHa
  always rescales the kept rows by ``1 / mean(mask)``; LoKr only with ``rank_dropout_scale``. PEFT divides by the
  mean even when every row was dropped (``0 / 0``: NaN outputs); funcpeft gives a zero delta then.

In a mixed batch every row draws its own module and rank masks.
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
from funcpeft.methods.base import BaseForward, Rows, gather, rows_for

__all__ = ["LycorisLayer", "hada", "hada_cp", "cp_weight", "kron", "factorization", "shape_error", "weight_shape"]

_FLOATS = (torch.float32, torch.float64)


def hada(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: float) -> Tensor:
    """LoHa's ``((w1a @ w1b) * (w2a @ w2b)) * scale`` (FedPara's Hadamard product of two rank-r matrices), with
    PEFT's float32 0-dim ``scale`` tensor (its rounding); any leading batch dims."""
    return ((w1a @ w1b) * (w2a @ w2b)) * torch.tensor(scale)


def hada_cp(t1: Tensor, w1a: Tensor, w1b: Tensor, t2: Tensor, w2a: Tensor, w2b: Tensor, scale: float) -> Tensor:
    """LoHa's CP form for ``k x k`` kernels (FedPara's Proposition 3): each factor is the core ``t (r, r, k1, k2)``
    contracted with ``wb (r, in)`` and ``wa (r, out)``, giving ``(out, in, k1, k2)``; then their Hadamard product.

    Differentiated by autograd: PEFT's hand-written backward (``HadaWeightCP``) returns wrong gradients for
    ``hada_w1_a`` and ``hada_w2_a`` (it contracts each with the *other* factor's core), although its forward is this.
    """
    one = torch.einsum("...ijkl,...jr,...ip->...prkl", t1, w1b, w1a)
    two = torch.einsum("...ijkl,...jr,...ip->...prkl", t2, w2b, w2a)
    return one * two * torch.tensor(scale)


def cp_weight(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """LoKr's CP factor: core ``t (r, r, k1, k2)`` with ``wa (r, b)`` and ``wb (r, d)`` -> ``(b, d, k1, k2)``."""
    return torch.einsum("...ijkl,...ip,...jr->...prkl", t, wa, wb)


def kron(w1: Tensor, w2: Tensor, w2_dims: int) -> Tensor:
    """``torch.kron(w1, w2)`` as PEFT's ``make_kron`` computes it, for ``w1 (..., a, c)`` and a ``w2`` whose last
    ``w2_dims`` dims are its own (2: ``(b, d)``; 4: ``(b, d, k1, k2)``, where PEFT unsqueezes ``w1`` to
    ``(a, c, 1, 1)``; 3: a Conv1d's ``(b, d, k)``), with any common leading batch dims.

    For ``w2_dims`` 2 and 4 this is the Kronecker product ``(a b, c d, ...)``. For 3 PEFT does not unsqueeze ``w1``,
    and ``torch.kron`` pads it to ``(1, a, c)``: the result is ``(b, a d, c k)``, which PEFT then reshapes to the
    Conv1d's ``(out, in, k)``. That is not the Kronecker structure of the paper (each output row mixes factors), but
    it is what PEFT's checkpoints mean, so funcpeft computes the same.
    """
    if w2_dims == 3:
        b, d, k = w2.shape[-3:]
        a, c = w1.shape[-2:]
        out = w1[..., None, :, None, :, None] * w2[..., :, None, :, None, :]  # (..., b, a, d, c, k)
        return out.reshape(*out.shape[:-5], b, a * d, c * k)
    a, c = w1.shape[-2:]
    if w2_dims == 2:
        b, d = w2.shape[-2:]
        out = w1[..., :, None, :, None] * w2[..., None, :, None, :]  # (..., a, b, c, d)
        return out.reshape(*out.shape[:-4], a * b, c * d)
    b, d, k1, k2 = w2.shape[-4:]
    out = w1[..., :, None, :, None, None, None] * w2[..., None, :, None, :, :, :]  # (..., a, b, c, d, k1, k2)
    return out.reshape(*out.shape[:-6], a * b, c * d, k1, k2)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of ``dimension`` into ``m <= n`` with ``m * n = dimension`` (PEFT's ``factorization``):
    ``factor`` itself if it divides; otherwise the divisor pair closest to the square root whose smaller member is
    at most ``factor`` (any with ``-1``)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def weight_shape(module: nn.Module, kind: Kind) -> tuple[int, ...]:
    """The module's logical weight shape: a Linear's ``(out, in)`` also when its weight is stored packed (a
    bitsandbytes 4-bit layer's ``(n, 1)`` bytes), a conv's ``(out, in / groups, *kernel)``."""
    if kind is Kind.LINEAR:
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


def shape_error(method: str, path: str, module: nn.Module, kind: Kind | None) -> ValueError:
    """The refusal for a module LoHa/LoKr cannot adapt (PEFT: nn.Linear, nn.Conv1d and nn.Conv2d only)."""
    what = type(module).__name__
    if kind is not None and kind.value != what:  # the layer kind where the class does not say it
        what = f"{what} ({kind.value})"
    extra = ", which refuses transformers' Conv1D too" if kind is Kind.CONV1D_GPT2 else ""
    return ValueError(
        f"Module {path!r} ({what}) matched `target_modules`, but {method} can only adapt nn.Linear, nn.Conv1d and "
        f"nn.Conv2d, as PEFT{extra}; narrow `target_modules` or add it to `exclude_modules`."
    )


@dataclass(frozen=True)
class LycorisLayer:
    """The forward, merge and mixed-batch math both methods share; subclasses define ``delta`` and ``init``.

    ``scaling`` is ``alpha / r``; ``weight_shape`` the module's own weight shape, which ``delta`` returns (after any
    leading batch dims of the tensors: ``lead``).
    """

    kind: Kind
    r: int
    scaling: float
    rank_dropout: float
    module_dropout: float
    weight_shape: tuple[int, ...]
    init_weights: bool | str

    # subclasses: the delta in the module's weight layout, with the tensors' leading batch dims
    def delta(self, tensors: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def rank_scaled(self) -> bool:
        """Whether rank dropout rescales the kept rows by ``1 / mean(mask)`` (LoHa always; LoKr if configured)."""
        raise NotImplementedError

    def mask_dtype(self, delta: Tensor) -> torch.dtype:
        """The dtype PEFT builds the rank mask in (LoHa: the delta's; LoKr: float32)."""
        raise NotImplementedError

    def _empty(self, shape: tuple[int, ...], module: nn.Module) -> Tensor:
        dtype = module.weight.dtype if module.weight.dtype in _FLOATS else torch.float32
        return torch.empty(shape, dtype=dtype)

    # ----- the delta's train-time randomness -----------------------------------------------------------------
    def _draws(self, module: nn.Module, rows: int | None, delta: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(keep, delta)``: the module-dropout keep flags (None outside training) and the rank-dropped delta.

        ``rows`` None: one draw for the call (``keep`` (1,)); else one per mixed-batch row (``keep`` (rows,)).
        """
        if not module.training or (self.module_dropout == 0 and self.rank_dropout == 0):
            return None, delta
        lead = () if rows is None else (rows,)
        keep = torch.rand(lead or (1,)) > self.module_dropout
        if self.rank_dropout > 0:
            out = self.weight_shape[0]
            mask = (torch.rand(*lead, out) > self.rank_dropout).to(self.mask_dtype(delta))
            if self.rank_scaled():  # all rows dropped: a zero delta, where PEFT's 0 / 0 gives NaN
                mask = mask / mask.mean(-1, keepdim=True).clamp_min(torch.finfo(mask.dtype).tiny)
            mask = mask.to(delta.device).view(*lead, out, *(1,) * (len(self.weight_shape) - 1))
            delta = (delta * mask).to(delta.dtype)
        return keep.to(delta.device), delta

    # ----- single adapter ------------------------------------------------------------------------------------
    def forward(
        self, module: nn.Module, tensors: Mapping[str, Tensor], base: BaseForward, x: Tensor, *args: Any, **kwargs: Any
    ) -> Tensor:
        result = base(module, x, *args, **kwargs)
        keep, delta = self._draws(module, None, self.delta(tensors))
        h = x if x.dtype == delta.dtype else x.to(delta.dtype)
        if self.kind is Kind.CONV:
            update = _layers.conv(module, h, delta, None, groups=module.groups)
        else:
            update = F.linear(h, delta)
        out = result + update
        if keep is not None:
            out = torch.where(keep, out, result)
        return out.to(x.dtype)

    def effective_weight(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        weight = _layers.canonical_weight(module, self.kind)
        delta = _layers.canonical_weight(module, self.kind, self.delta(tensors))
        return (weight + delta).to(weight.dtype), getattr(module, "bias", None)

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
        """Row ``i`` with the delta of adapter ``rows.index[i]``, applied in one batched matmul (a conv: one grouped
        convolution over the rows). The ``K`` stacked deltas are built once and gathered per row (zeros for base
        rows); with fewer rows than adapters, or sparse gradients (which the gather must take from the leaves
        themselves), each row's factors are gathered and its delta built instead."""
        if self.kind is Kind.CONV and x.dim() != len(self.weight_shape):
            raise ValueError(
                f"Mixed batch: the {type(module).__name__} {path!r} received an unbatched input of shape "
                f"{tuple(x.shape)}; mixed batches need batched (batch, channels, ...) inputs, one row per "
                "`adapter_ids` entry."
            )
        rows = rows_for(rows, x, path)
        result = base(module, x, *args, **kwargs)
        n = x.shape[0]
        if n == 0:
            return result
        k = next(iter(tensors.values())).shape[0]
        if rows.sparse or k > n:
            delta = self.delta({name: gather(t, rows, 0.0) for name, t in tensors.items()})
        else:
            delta = gather(self.delta(tensors), rows, 0.0)
        keep, delta = self._draws(module, n, delta)  # delta (B, *weight_shape)
        h = x if x.dtype == delta.dtype else x.to(delta.dtype)
        if self.kind is Kind.CONV:
            rows_in = h.reshape(1, n * h.shape[1], *h.shape[2:])  # the rows side by side: groups of groups
            merged = _layers.conv(module, rows_in, delta.reshape(-1, *delta.shape[2:]), None, n * module.groups)
            update = merged.reshape(n, -1, *merged.shape[2:])
        else:
            flat = h.reshape(n, -1, h.shape[-1])
            update = torch.bmm(flat, delta.transpose(1, 2)).reshape(*h.shape[:-1], delta.shape[1])
        out = result + update
        if keep is not None:
            out = torch.where(keep.view(n, *(1,) * (out.dim() - 1)), out, result)
        return out.to(x.dtype)
