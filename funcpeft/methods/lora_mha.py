"""LoRA on ``nn.MultiheadAttention``, as PEFT 0.21.2's ``lora.MultiheadAttention`` defines it, without touching it.

``nn.MultiheadAttention`` has no Linear layer to hook for its query/key/value projections (one packed parameter,
``in_proj_weight`` (3E, E)) and reads ``out_proj.weight`` directly instead of calling ``out_proj``. PEFT therefore
adapts both at once: ``lora_A`` (r, E) / ``lora_B`` (3E, r) on the packed in-projection, and a LoRA Linear on
``out_proj`` (``base_layer.out_proj.lora_A/B`` in its checkpoints); its forward merges both deltas into the module's
weights for the call. funcpeft intercepts the attention module's forward instead and runs torch's own
``nn.MultiheadAttention.forward`` on the module with the effective weights ``W_in + s B A`` and ``W_out + s B_o A_o``
in place of its own, never written to it (``batch_first`` both ways, masks, ``need_weights``, ``is_causal``, self-
and cross-attention, torch's fused inference path).

One entry of ``params`` holds the four tensors: ``lora_A``, ``lora_B`` (in-projection) and ``out_proj.lora_A``,
``out_proj.lora_B``. Where funcpeft differs from PEFT 0.21.2, on purpose:

- PEFT adds ``out_proj``'s delta twice (its ``merge`` writes ``W + dW`` and then calls ``out_proj.merge``, which adds
  ``dW`` again; huggingface/peft#3774), in its forward and in ``merge_and_unload``. funcpeft applies it once, as the
  config's scaling says: an adapter trained in PEFT gives different outputs once ``out_proj.lora_B`` is non-zero
  (``adapt`` warns);
- as PEFT, no ``lora_dropout`` (PEFT's forward merges the weights, so its dropout never runs; ``adapt`` warns when
  it is set), no DoRA, no ``lora_bias`` (PEFT creates an in-projection bias it never applies), no PiSSA/OLoRA/
  orthogonal init (PEFT fails on them), and no separate q/k/v weights (``kdim``/``vdim`` != ``embed_dim``).

A mixed batch selects rows along the module's own batch dimension (dim 1 when ``batch_first=False``), with each
row's projections computed unmerged (base GEMM + per-row low-rank update) and torch's attention in between.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funcpeft._layers import Kind
from funcpeft._targeting import pattern_value, user_warning
from funcpeft.config import LoraConfig
from funcpeft.methods.base import BaseForward, Rows, gather, rows_for
from funcpeft.methods.lora_init import init_factors

__all__ = ["MhaLayer", "make_layer", "MHA_KEYS", "MHA_NAMES"]

_FLOATS = (torch.float32, torch.float64)

# params names of the out-projection's LoRA and their PEFT checkpoint suffixes (after the attention module's path)
MHA_KEYS = {
    "out_proj.lora_A": "base_layer.out_proj.lora_A.weight",
    "out_proj.lora_B": "base_layer.out_proj.lora_B.weight",
}
MHA_NAMES = frozenset({"lora_A", "lora_B", *MHA_KEYS})


def _arguments(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool, Tensor | None, bool, bool]:
    """``nn.MultiheadAttention.forward``'s signature, so that the adapted forward binds arguments as it does."""
    return query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal


@dataclass(frozen=True)
class MhaLayer:
    """The LoRA of one ``nn.MultiheadAttention``: packed in-projection and out-projection, one rank and scaling."""

    r: int
    scaling: float
    init_weights: bool | str
    kind: Kind = Kind.MHA
    # The layer finds the batch dimension itself (dim 1 for batch_first=False): mixed batches need no batch-first
    # input from it (see funcpeft._preflight.sequence_first).
    own_batch_dim: bool = True

    # ----- init ----------------------------------------------------------------------------------------------
    def init(self, module: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        """PEFT's ``reset_lora_parameters`` for both pairs: ``A`` kaiming-uniform (``"gaussian"``: normal, std 1/r),
        ``B`` zero; ``init_lora_weights=False`` leaves both at nn.Linear's init (kaiming-uniform)."""
        weight = module.in_proj_weight
        dtype = weight.dtype if weight.dtype in _FLOATS else torch.float32
        e = module.embed_dim
        tensors: dict[str, Tensor] = {}
        for prefix, n_out in (("", 3 * e), ("out_proj.", e)):
            a, b = torch.empty(self.r, e, dtype=dtype), torch.empty(n_out, self.r, dtype=dtype)
            init_factors(a, b, self.init_weights, self.r, generator)
            tensors[prefix + "lora_A"], tensors[prefix + "lora_B"] = a, b
        return {k: v.to(weight.device) for k, v in tensors.items()}

    # ----- math ----------------------------------------------------------------------------------------------
    def _weights(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The effective ``(in_proj_weight, out_proj.weight)``: each base weight plus ``s * B @ A`` (PEFT's delta,
        cast to the weight's dtype as PEFT's merge does)."""
        w_in, w_out = module.in_proj_weight, module.out_proj.weight
        d_in = (tensors["lora_B"] @ tensors["lora_A"]) * self.scaling
        d_out = (tensors["out_proj.lora_B"] @ tensors["out_proj.lora_A"]) * self.scaling
        return w_in + d_in.to(w_in.dtype), w_out + d_out.to(w_out.dtype)

    def merged_entries(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The merged state-dict entries (names relative to the module) for ``fwd.merge``."""
        w_in, w_out = self._weights(module, tensors)
        return {"in_proj_weight": w_in, "out_proj.weight": w_out}

    def effective_weight(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The effective packed in-projection ``(W_in + s B A, in_proj_bias)``; the out-projection's weight is
        :meth:`merged_entries`' (an attention has no single canonical weight)."""
        return self._weights(module, tensors)[0], module.in_proj_bias

    def forward(
        self, module: nn.Module, tensors: Mapping[str, Tensor], base: BaseForward, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor | None]:
        """torch's own ``nn.MultiheadAttention.forward`` run on the module with the effective weights in place of
        its own (as PEFT's forward runs it on temporarily merged weights): every argument, the fused inference
        path included, behaves as the base module's, and a fresh adapter gives exactly the base output."""
        dtype = (args[0] if args else kwargs["query"]).dtype
        w_in, w_out = self._weights(module, tensors)
        effective = _Effective(module, w_in, _Projection(w_out, module.out_proj.bias))
        out, weights = nn.MultiheadAttention.forward(effective, *args, **kwargs)  # type: ignore[arg-type]
        return out.to(dtype), None if weights is None else weights.to(dtype)

    # ----- mixed batches ------------------------------------------------------------------------------------
    def forward_mixed(
        self,
        module: nn.Module,
        tensors: Mapping[str, Tensor],
        rows: Rows,
        path: str,
        base: BaseForward,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """Each batch element with its own adapter: the projections unmerged (the base GEMM plus each row's
        ``s B_i A_i x``, BGMV-style), torch's attention in between (run with identity projections, so that masks,
        ``bias_k``/``bias_v``, ``add_zero_attn``, dropout and ``need_weights`` are exactly torch's)."""
        query, key, value, padding, need, mask, average, causal = _arguments(*args, **kwargs)
        dtype = query.dtype
        if query.dim() != 3:
            raise ValueError(
                f"Mixed batch: the nn.MultiheadAttention {path!r} received an unbatched query of shape "
                f"{tuple(query.shape)}; `adapter_ids` selects adapters per batch element, so pass batched inputs."
            )
        padding, mask = _masks(padding, mask, query)
        seq_first, (query, key, value) = _seq_first(module, query, key, value)
        rows = rows_for(rows, query.transpose(0, 1), path)  # checks the batch size (dim 1 of seq-first inputs)
        e = module.embed_dim
        a, b = gather(tensors["lora_A"], rows), gather(tensors["lora_B"], rows)  # (N, r, E), (N, 3E, r)
        w_in, b_in = module.in_proj_weight, module.in_proj_bias
        if query is key and key is value:  # self-attention: one packed projection, as torch's own
            q, k, v = _project(query, w_in, b_in, a, b, self.scaling).chunk(3, dim=-1)
        else:
            w_q, w_k, w_v = w_in.chunk(3)
            b_q, b_k, b_v = (None,) * 3 if b_in is None else b_in.chunk(3)
            q = _project(query, w_q, b_q, a, b[:, :e], self.scaling)
            k = _project(key, w_k, b_k, a, b[:, e : 2 * e], self.scaling)
            v = _project(value, w_v, b_v, a, b[:, 2 * e :], self.scaling)
        eye = torch.eye(e, dtype=q.dtype, device=q.device)
        heads, weights = F.multi_head_attention_forward(
            q,
            k,
            v,
            e,
            module.num_heads,
            None,
            None,
            module.bias_k,
            module.bias_v,
            module.add_zero_attn,
            module.dropout,
            eye,
            None,
            training=module.training,
            key_padding_mask=padding,
            need_weights=need,
            attn_mask=mask,
            use_separate_proj_weight=True,
            q_proj_weight=eye,
            k_proj_weight=eye,
            v_proj_weight=eye,
            average_attn_weights=average,
            is_causal=causal,
        )
        a_o, b_o = gather(tensors["out_proj.lora_A"], rows), gather(tensors["out_proj.lora_B"], rows)
        out = _project(heads, module.out_proj.weight, module.out_proj.bias, a_o, b_o, self.scaling)
        return _finish(out, weights, seq_first, dtype)


class _Projection:
    """``out_proj`` as the attention's forward reads it: a weight and a bias."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight, self.bias = weight, bias


class _Effective:
    """An attention module as its forward reads it, with the adapted ``in_proj_weight`` and ``out_proj``; every
    other attribute (flags such as ``training`` included) is the module's own, read live."""

    def __init__(self, module: nn.Module, in_proj_weight: Tensor, out_proj: _Projection) -> None:
        self.__dict__.update(_module=module, in_proj_weight=in_proj_weight, out_proj=out_proj)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_module"], name)


def _project(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``x W^T + bias + s (x A_i^T) B_i^T`` for a sequence-first ``x`` (L, N, E) with per-batch-element ``A_i``
    (N, r, E) and ``B_i`` (N, out, r)."""
    result = F.linear(x, weight, bias)
    h = x if x.dtype == a.dtype else x.to(a.dtype)
    hidden = torch.einsum("lne,nre->lnr", h, a) * scaling
    update = torch.einsum("lnr,nor->lno", hidden, b)
    return result + (update if update.dtype == result.dtype else update.to(result.dtype))


def _masks(padding: Tensor | None, mask: Tensor | None, query: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The masks as ``nn.MultiheadAttention.forward`` canonicalises them (boolean masks to float ``-inf``)."""
    padding = F._canonical_mask(
        mask=padding,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    mask = F._canonical_mask(
        mask=mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype, check_other=False
    )
    return padding, mask


def _seq_first(module: nn.Module, query: Tensor, key: Tensor, value: Tensor) -> tuple[bool, tuple[Tensor, ...]]:
    """The inputs as ``(seq, batch, E)``: transposed for a batched ``batch_first`` module, keeping which of them
    are the same tensor (torch projects self-attention's shared input in one GEMM)."""
    if not (module.batch_first and query.dim() == 3):
        return False, (query, key, value)
    if key is value:
        if query is key:
            query = key = value = query.transpose(1, 0)
        else:
            query, key = (x.transpose(1, 0) for x in (query, key))
            value = key
    else:
        query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    return True, (query, key, value)


def _finish(out: Tensor, weights: Tensor | None, transposed: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Back to the module's layout, in the query's dtype (as PEFT's forward casts both outputs)."""
    if transposed:
        out = out.transpose(1, 0)
    return out.to(dtype), None if weights is None else weights.to(dtype)


def make_layer(config: LoraConfig, path: str, module: nn.Module) -> MhaLayer:
    """The LoRA layer of the ``nn.MultiheadAttention`` at ``path``; refuses what PEFT 0.21.2 refuses or gets wrong.

    Raises:
        ValueError: separate q/k/v weights, DoRA, ``lora_bias``, an init other than True/False/"gaussian", a
            subclass with its own forward, or an out-projection that is not an ``nn.Linear``.
    """
    name = f"The nn.MultiheadAttention {path!r}"
    if not module._qkv_same_embed_dim:
        raise ValueError(
            f"{name} has kdim={module.kdim}, vdim={module.vdim} != embed_dim={module.embed_dim} (separate q/k/v "
            "weights); LoRA supports only the packed `in_proj_weight` (as PEFT). Exclude it (`exclude_modules`)."
        )
    if type(module).forward is not nn.MultiheadAttention.forward:
        raise ValueError(
            f"{name} is a {type(module).__qualname__} with its own forward; funcpeft runs torch's attention with the "
            "adapted weights and would bypass it. Target its Linear layers instead, or exclude it."
        )
    if not isinstance(module.out_proj, nn.Linear):
        raise ValueError(f"{name} has an out_proj of type {type(module.out_proj).__name__}; LoRA needs an nn.Linear.")
    if config.use_dora:
        raise ValueError(f"{name}: DoRA is not supported on nn.MultiheadAttention (as in PEFT); set `use_dora=False`.")
    if config.lora_bias:
        raise ValueError(
            f"{name}: `lora_bias=True` is not supported on nn.MultiheadAttention (PEFT 0.21.2 creates an in-projection "
            "bias it never applies); set `lora_bias=False` or exclude it."
        )
    init = config.init_lora_weights
    if init not in (True, False, "gaussian"):
        raise ValueError(
            f"{name}: `init_lora_weights={init!r}` is not supported on nn.MultiheadAttention (PEFT 0.21.2 fails on it: "
            "the attention has no single `weight`); use True, False or 'gaussian', or exclude it."
        )
    if config.lora_dropout:
        user_warning(
            f"`lora_dropout={config.lora_dropout}` does not apply to the nn.MultiheadAttention {path!r}: LoRA there "
            "runs with merged weights (as in PEFT, whose forward merges them, so its dropout never runs)."
        )
    user_warning(  # (one message for all attention modules: shown once)
        "LoRA on nn.MultiheadAttention applies out_proj's delta once (W + s B A); PEFT 0.21.2 applies it twice "
        "(huggingface/peft#3774), so an adapter trained in PEFT gives different outputs there once its "
        "out_proj.lora_B is non-zero, and one trained here differs when run in PEFT (the in-projection agrees)."
    )
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
    scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return MhaLayer(r=int(r), scaling=scaling, init_weights=init)
