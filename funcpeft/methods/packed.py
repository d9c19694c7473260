"""One module's LoRA adapters from K heterogeneous configs, packed by rank (S-LoRA's unified memory, per module).

Adapters that differ in rank cannot share a ``(K, r, in)`` stack without zero-padding every adapter to the
largest rank (3x the memory for ranks 4/8/16). Here the adapters that target a module are concatenated along the
rank dimension instead, in adapter order: ``lora_A`` is ``(R, in)`` with ``R = r_0 + r_1 + ...`` and ``lora_B`` is
``(R, out)`` (rank-major: each adapter's ``B`` transposed, so a row's rank slices are rows of both), and the
per-adapter vectors (DoRA's ``lora_magnitude_vector``, ``lora_B.bias``) are stacked over the adapters that have
them only. The stacked tree holds exactly the sum of the
adapters' own tensors.

A mixed batch gathers each row's rank rows through a static table (offset and rank per adapter), padded to the
module's largest rank with exact zeros (a row's missing rank columns, and every column of a row whose adapter does
not target the module, contribute nothing), then runs the shared per-row math of
:mod:`funcpeft.methods.lora_rows` with each row's own scaling, dropout rate, bias and DoRA scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from funcpeft import _layers
from funcpeft._layers import Kind
from funcpeft.methods.base import BaseForward, Rows, rows_for, take
from funcpeft.methods.lora import LoraLayer, _row_norm, _used
from funcpeft.methods.lora_rows import apply_rows, embedding_rows, row_dropout

__all__ = ["Member", "PackedLora"]

_MAGNITUDE, _BIAS = "lora_magnitude_vector", "lora_B.bias"


@dataclass(frozen=True)
class Member:
    """Adapter ``k``'s part of a packed module: its own layer, its rank rows ``offset:offset + layer.r`` of the
    packed ``A`` / columns of ``B``, and its slot in the packed magnitude / bias stacks (-1: it has none)."""

    k: int
    layer: LoraLayer
    offset: int
    dora_slot: int
    bias_slot: int


class PackedLora:
    """The adapter layer of one module for K heterogeneous LoRA adapters (those not targeting it are the base).

    Args:
        path: the module path (for messages).
        layers: ``{k: adapter k's own LoraLayer}`` for the adapters that target the module.
        count: K, the number of adapters of the ``fwd``.
        device: the module's device (its rank tables live there; another device gets its own on first use).
    """

    def __init__(self, path: str, layers: Mapping[int, LoraLayer], count: int, device: torch.device) -> None:
        members, offset, dora, bias = [], 0, 0, 0
        for k in sorted(layers):
            layer = layers[k]
            members.append(Member(k, layer, offset, dora if layer.use_dora else -1, bias if layer.lora_bias else -1))
            offset, dora, bias = offset + layer.r, dora + layer.use_dora, bias + layer.lora_bias
        first = members[0].layer
        self.path = path
        self.kind: Kind = first.kind
        self.names = first.names
        self.members: tuple[Member, ...] = tuple(members)
        self.count = count
        self.rank = offset  # R: the packed rank
        self.r_max = max(m.layer.r for m in members)
        self._ranks = tuple(sorted({m.layer.r for m in members}))
        self.n_dora, self.n_bias = dora, bias
        rates = {m.layer.dropout for m in members}
        self._rate: float | None = rates.pop() if len(rates) == 1 else None  # None: rates differ per adapter
        self._tables: dict[torch.device, dict[str, Tensor]] = {}
        self._table(device)  # built now, not while torch.compile traces a first call (a side effect: a recompile)

    # ----- packing ------------------------------------------------------------------------------------------
    def pack(self, entries: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """The packed tensors from each member's own entry (``entries[i]`` for ``self.members[i]``), new tensors."""
        a_name, b_name = self.names
        packed = {
            a_name: torch.cat([e[a_name] for e in entries], dim=0),
            b_name: torch.cat([e[b_name].movedim(1, 0) for e in entries], dim=0),
        }
        if self.n_dora:
            packed[_MAGNITUDE] = torch.stack(
                [e[_MAGNITUDE] for m, e in zip(self.members, entries, strict=True) if m.dora_slot >= 0]
            )
        if self.n_bias:
            packed[_BIAS] = torch.stack(
                [e[_BIAS] for m, e in zip(self.members, entries, strict=True) if m.bias_slot >= 0]
            )
        return packed

    def unpack(self, packed: Mapping[str, Tensor], member: Member, with_vectors: bool = True) -> dict[str, Tensor]:
        """``member``'s own tensors (views of ``packed``), with its own names and shapes."""
        a_name, b_name = self.names
        rank = slice(member.offset, member.offset + member.layer.r)
        own = {a_name: packed[a_name][rank], b_name: packed[b_name][rank].movedim(0, 1)}
        if not with_vectors:
            return own
        if member.layer.lora_bias:
            own[_BIAS] = packed[_BIAS][member.bias_slot]
        if member.layer.use_dora:
            own[_MAGNITUDE] = packed[_MAGNITUDE][member.dora_slot]
        return own

    def shapes(self, own: Mapping[int, Mapping[str, torch.Size]]) -> dict[str, torch.Size]:
        """The packed shapes, from each member's own shapes ``own[k]``."""
        a_name, b_name = self.names
        first = own[self.members[0].k]
        a, b = first[a_name], first[b_name]
        shapes = {a_name: torch.Size((self.rank, *a[1:])), b_name: torch.Size((self.rank, b[0], *b[2:]))}
        if self.n_dora:
            shapes[_MAGNITUDE] = torch.Size((self.n_dora, *_first_with(own, self.members, _MAGNITUDE)))
        if self.n_bias:
            shapes[_BIAS] = torch.Size((self.n_bias, *_first_with(own, self.members, _BIAS)))
        return shapes

    # ----- the forward ----------------------------------------------------------------------------------------
    def forward(self, module: nn.Module, tensors: Mapping[str, Tensor], base: BaseForward, *args: Any, **kw: Any):
        raise RuntimeError(  # Heterogeneous._run refuses a call without adapter_ids before any layer runs
            f"The packed adapters of {self.path!r} only run in a mixed batch (with `adapter_ids`)."
        )

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
        """Row ``i`` of ``x`` with its own adapter's rank rows, scaling, dropout, bias and DoRA scale."""
        rows = rows_for(rows, x, path)
        result = base(module, x, *args, **kwargs)
        if x.shape[0] == 0:  # an empty batch: nothing to select
            return result
        if (
            len(self._ranks) > 1
            and self.kind in (Kind.LINEAR, Kind.CONV1D_GPT2)
            and rows.cache is None  # generate reuses one padded gather for all its decode steps instead
            and not torch.compiler.is_compiling()  # data-dependent bucket sizes: compiled graphs stay padded
            and torch._C._functorch.peek_interpreter_stack() is None
        ):
            return self._bucketed(module, tensors, rows, x, result)
        g = self._gathered(module, tensors, rows)
        if self.kind is Kind.EMBEDDING:
            n, r_max = g.index.shape
            table, index = tensors[self.names[0]], g.index  # (R, num): every packed rank's code of each token
            if rows.sparse:  # only the rank rows used (data-dependent sizes; sparse gradients are eager-only)
                used, index = torch.unique(index, return_inverse=True)
                table = take(table, used, True, _used(used, index, g.valid))
            hidden = table.t()[x.unsqueeze(-1), index.view(n, *(1,) * (x.dim() - 1), r_max)]  # (n, ..., r_max)
            hidden = torch.where(g.valid.view(n, *(1,) * (x.dim() - 1), r_max), hidden, 0.0)
            embed_scale = self.members[0].layer.embed_scale
            return embedding_rows(module, x, result, hidden, g.b, g.scaling, g.dora, embed_scale)
        dropped = module.training and (self._rate is None or self._rate > 0.0)
        h = row_dropout(x, self._rate if self._rate is not None else g.rates, dropped)
        if h.dtype != g.a.dtype:
            h = h.to(g.a.dtype)
        return apply_rows(module, self.kind, h, result, g.a, g.b, g.scaling, g.bias, g.dora, dropped)

    def _bucketed(
        self, module: nn.Module, tensors: Mapping[str, Tensor], rows: Rows, x: Tensor, result: Tensor
    ) -> Tensor:
        """Eager mixed batches over adapters of different ranks: the rows of each rank run at that rank (not padded
        to the largest), each bucket through the same per-row math, written back into the base output."""
        a = tensors[self.names[0]]
        t = self._table(a.device)
        sel = torch.where(rows.active, rows.index, self.count)
        dropped = module.training and (self._rate is None or self._rate > 0.0)
        h = row_dropout(x, self._rate if self._rate is not None else t["rate"][sel], dropped)
        if h.dtype != a.dtype:
            h = h.to(a.dtype)
        # Rows sorted by rank bucket, and the size of each: one host read per layer (not one per rank), and none
        # of them a boolean mask. Base rows form a last bucket, left as the base output.
        bucket = t["bucket"][sel]
        counts = torch.bincount(bucket, minlength=len(self._ranks) + 1).tolist()
        out = result
        for r, where in zip(self._ranks, torch.split(torch.argsort(bucket, stable=True), counts), strict=False):
            if where.numel() == 0:
                continue
            g = self._gather_rows(module, tensors, sel[where], r, False, rows.sparse)
            part = apply_rows(module, self.kind, h[where], result[where], g.a, g.b, g.scaling, g.bias, g.dora, dropped)
            out = out.index_copy(0, where, part)
        return out

    def _gathered(self, module: nn.Module, tensors: Mapping[str, Tensor], rows: Rows) -> Gathered:
        """Every row's tensors; reused across a generate call's decode steps (``rows.cache``)."""
        a = tensors[self.names[0]]
        cache = rows.cache
        if cache is not None:
            hit = cache.get(("packed", id(a)))
            if hit is not None and hit[0] is a:
                return hit[1]
        g = self._gather(module, tensors, rows)
        if cache is not None:
            cache[("packed", id(a))] = (a, g)  # holds `a`: its id cannot be reused meanwhile
        return g

    def _gather(self, module: nn.Module, tensors: Mapping[str, Tensor], rows: Rows) -> Gathered:
        sel = torch.where(rows.active, rows.index, self.count)  # base rows read the all-invalid last table row
        return self._gather_rows(module, tensors, sel, self.r_max, True, rows.sparse)

    def _gather_rows(
        self, module: nn.Module, tensors: Mapping[str, Tensor], sel: Tensor, width: int, masked: bool, sparse: bool
    ) -> Gathered:
        """The tensors of the rows whose table rows are ``sel``, ``width`` rank columns each; with ``masked``, the
        columns a row's adapter does not have are exact zeros (without, every row has exactly ``width`` ranks)."""
        a_name, b_name = self.names
        a, b = tensors[a_name], tensors[b_name]
        t = self._table(a.device)
        index, valid = t["index"][sel][:, :width], t["valid"][sel][:, :width]  # (n, width)
        n, r_max = index.shape
        mask = valid if masked else None
        a_rows = None
        if self.kind is not Kind.EMBEDDING:
            a_rows = take(a, index, sparse, mask)  # (n, width, in, ...)
            if masked:
                a_rows = torch.where(valid.view(n, r_max, *(1,) * (a.dim() - 1)), a_rows, 0.0)
        b_rows = take(b, index, sparse, mask).reshape(n, r_max, -1)  # (n, width, out)
        if masked:
            b_rows = torch.where(valid.unsqueeze(-1), b_rows, 0.0)
        b_rows = b_rows.transpose(1, 2)  # (n, out, width)
        scaling = t["scaling"][sel].to(a.dtype)
        rates = t["rate"][sel] if self._rate is None else None
        bias = dora = None
        if self.n_bias:
            slot = t["bias"][sel]
            bias = take(tensors[_BIAS], slot.clamp(min=0), sparse, slot >= 0)
            bias = torch.where((slot >= 0).unsqueeze(-1), bias, 0.0)
        if self.n_dora:
            slot = t["dora"][sel]
            own = slot >= 0
            slot = slot.clamp(min=0)
            magnitude = take(tensors[_MAGNITUDE], slot, sparse, own).reshape(n, -1)
            dora = torch.where(own.unsqueeze(-1), magnitude / self._dora_norms(module, tensors)[slot], 1.0)
        return Gathered(a_rows, b_rows, scaling, rates, bias, dora, index, valid)

    def _dora_norms(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> Tensor:
        """``||W + s_k B_k A_k||`` (detached: DoRA's magnitude is divided by a constant, as PEFT) for each DoRA
        member, by its own layer's math: (K_dora, out)."""
        a_name, b_name = self.names
        weight = _layers.canonical_weight(module, self.kind).to(tensors[a_name].dtype)
        detached = {a_name: tensors[a_name].detach(), b_name: tensors[b_name].detach()}
        norms = [
            _row_norm(weight + m.layer.delta(self.unpack(detached, m, with_vectors=False), weight.shape))
            for m in self.members
            if m.dora_slot >= 0
        ]
        return torch.stack(norms)

    def _table(self, device: torch.device) -> dict[str, Tensor]:
        """Per adapter (and a last, all-invalid row for the base): its packed rank rows padded to ``r_max``, which
        of them are its own, its scaling and dropout rate, its magnitude / bias slots (-1: none)."""
        table = self._tables.get(device)
        if table is None:
            k = self.count + 1
            index = torch.zeros(k, self.r_max, dtype=torch.long)
            valid = torch.zeros(k, self.r_max, dtype=torch.bool)
            scaling, rate = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
            dora, bias = torch.full((k,), -1, dtype=torch.long), torch.full((k,), -1, dtype=torch.long)
            bucket = torch.full((k,), len(self._ranks), dtype=torch.long)  # index into self._ranks; base: the last
            for m in self.members:
                r = m.layer.r
                index[m.k, :r] = torch.arange(m.offset, m.offset + r)
                valid[m.k, :r] = True
                scaling[m.k], rate[m.k] = m.layer.scaling, m.layer.dropout
                dora[m.k], bias[m.k], bucket[m.k] = m.dora_slot, m.bias_slot, self._ranks.index(r)
            table = {
                "index": index, "valid": valid, "scaling": scaling, "rate": rate, "dora": dora, "bias": bias,
                "bucket": bucket,
            }  # fmt: skip
            table = {name: value.to(device) for name, value in table.items()}
            self._tables[device] = table
        return table

    def effective_weight(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        raise ValueError(
            f"Module {self.path!r} holds {len(self.members)} packed adapters; merge one adapter at a time: "
            "fwd.unstack(stacked)[k] with funcpeft.adapt(model, fwd.configs[k])."
        )


class Gathered(NamedTuple):
    """A mixed batch's per-row tensors for one packed module (see :mod:`funcpeft.methods.lora_rows`)."""

    a: Tensor | None  # (n, r_max, in, ...); None for embeddings (their codes depend on the tokens)
    b: Tensor  # (n, out, r_max)
    scaling: Tensor  # (n,)
    rates: Tensor | None  # (n,) dropout rates where the adapters' rates differ
    bias: Tensor | None  # (n, out)
    dora: Tensor | None  # (n, out)
    index: Tensor  # (n, r_max) packed rank rows
    valid: Tensor  # (n, r_max) which of them are the row's own


def _first_with(own: Mapping[int, Mapping[str, torch.Size]], members: Sequence[Member], name: str) -> torch.Size:
    return next(own[m.k][name] for m in members if name in own[m.k])
