"""Trainable tokens: LoRA's ``trainable_token_indices`` (PEFT's ``TrainableTokensWrapper``).

Only the listed rows of an embedding (or of a Linear's weight, e.g. an untied LM head named in the dict form) train.
As in PEFT 0.21.2 the entry ``params[path]["trainable_tokens_delta"]`` (n_tokens, dim) holds the rows' *new values*
(initialised to the current rows), not a difference, and is saved as ``<path>.token_adapter.trainable_tokens_delta``.
The layer is the base layer with those rows replaced, ``W' = W.index_copy(0, idx, delta)``; it is computed without
copying the table:

- an embedding looks ``x`` up in the base table and substitutes the rows of trained tokens (``B * T * dim`` work,
  where PEFT copies the whole ``vocab * dim`` table on every call: forward + backward on a 50k x 1024 table take
  0.1 ms instead of 206 ms for one row, 44 ms instead of 369 ms for 2048 rows, on CPU);
- a Linear computes the base output and replaces the columns of the trained rows by ``x @ delta.T (+ bias)``,
  computed as the base columns plus ``x @ (delta - W[idx]).T``, so that a fresh adapter is the base exactly (PEFT
  runs with a copied, substituted weight: its backward then computes the gradient of the whole copy, 2x the step
  time of replacing columns on a 50k x 1024 head at 2048 rows, 6x at one row; measured on CPU).

Tied weights: when the model's config says ``tie_word_embeddings`` and the input embedding is targeted, every module
sharing its weight (the LM head) reads the embedding's entry too, so the logits of the new tokens use the new rows,
as PEFT ties them; without the flag only the embedding changes, as in PEFT. ``fwd.merge`` writes the substituted
table under every tied name (consistent with the forward, unlike a LoRA on a tied weight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funcpeft._layers import Kind, kind_of
from funcpeft._targeting import saved_modules
from funcpeft.methods.base import AdapterLayer, BaseForward, Rows, rows_for, take
from funcpeft.methods.lora_rows import embedding_scale

__all__ = ["TOKENS", "PEFT_KEY", "TokenLayer", "token_layers", "check_entry"]

TOKENS = "trainable_tokens_delta"
PEFT_KEY = "token_adapter.trainable_tokens_delta"


@dataclass(frozen=True)
class TokenLayer:
    """Rows ``indices`` of a module's weight (its output rows for a Linear) replaced by ``params[entry][TOKENS]``.

    ``entry`` is the module's own path, or for a tied LM head the embedding's (it has no entry of its own); ``tied``
    lists the ``state_dict`` names of the tied heads reading this layer's entry, where ``fwd.merge`` writes too.
    """

    kind: Kind
    indices: tuple[int, ...]
    entry: str
    tied: tuple[str, ...] = ()
    init_weights: bool = True
    embed_scale: bool = False
    padding_idx: int | None = None
    index: Tensor = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    position: Tensor = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    shared = False  # reads no root entry (core's interception)

    # ----- init ----------------------------------------------------------------------------------------------
    def init(self, module: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        weight = module.weight
        # PEFT keeps the rows of a half-precision table in float32 (autocast_adapter_dtype), cast down per call
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        with torch.no_grad():
            rows = weight.detach().index_select(0, self.index.to(weight.device)).to(dtype)
            if not self.init_weights:  # PEFT's init_weights=False: standard normal rows
                rows = torch.randn(rows.shape, generator=generator, dtype=dtype).to(rows.device)
        return {TOKENS: rows}

    # ----- forward -------------------------------------------------------------------------------------------
    def forward(
        self, module: nn.Module, tensors: Mapping[str, Tensor], base: BaseForward, x: Tensor, *args: Any, **kwargs: Any
    ) -> Tensor:
        delta = tensors[TOKENS]
        if self.kind is Kind.EMBEDDING:
            out = base(module, x, *args, **kwargs)
            pos = self.position.to(x.device)[x]
            values = delta.to(out.dtype).index_select(0, pos.clamp(min=0).reshape(-1))
            return self._substitute(module, x, out, values, pos)
        index = self.index.to(x.device)
        out = base(module, x, *args, **kwargs)
        change = delta.to(x.dtype) - module.weight.index_select(0, index).to(x.dtype)
        return out.index_copy(-1, index, (out.index_select(-1, index) + F.linear(x, change)).to(out.dtype))

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
        """Row ``i`` of ``x`` with the token rows of adapter ``rows.index[i]``; base rows keep the base rows."""
        rows = rows_for(rows, x, path)
        out = base(module, x, *args, **kwargs)
        if x.shape[0] == 0:
            return out
        picked = take(tensors[TOKENS], rows.index, rows.sparse, None if rows.all_active else rows.active)
        active = rows.active.view(-1, *(1,) * (x.dim() - 1))
        if self.kind is Kind.EMBEDDING:
            n = picked.shape[1]
            pos = self.position.to(x.device)[x]
            flat = (torch.arange(x.shape[0], device=x.device).view_as(active) * n + pos.clamp(min=0)).reshape(-1)
            values = picked.to(out.dtype).reshape(-1, picked.shape[-1]).index_select(0, flat)
            return self._substitute(module, x, out, values, pos, None if rows.all_active else active)
        index = self.index.to(x.device)
        change = picked.to(x.dtype) - module.weight.index_select(0, index).to(x.dtype)
        columns = (out.index_select(-1, index) + torch.einsum("b...i,bni->b...n", x, change)).to(out.dtype)
        if not rows.all_active:
            columns = torch.where(active, columns, out.index_select(-1, index))
        return out.index_copy(-1, index, columns)

    def _substitute(
        self, module: nn.Module, x: Tensor, out: Tensor, values: Tensor, pos: Tensor, active: Tensor | None = None
    ) -> Tensor:
        """The base lookup ``out`` with the trained tokens' rows replaced by ``values`` (one per position of ``x``;
        ``pos`` is each position's token row, -1 for untrained tokens; ``active`` masks a mixed batch's base rows)."""
        values = values.view(*x.shape, out.shape[-1])
        if self.embed_scale:  # e.g. Gemma's scaled embedding multiplies its lookup (PEFT scales its rows too)
            values = values * embedding_scale(module, values.dtype)
        if self.padding_idx is not None and self.padding_idx in self.indices:
            # F.embedding gives the padding row no gradient: neither does PEFT's substituted table
            values = torch.where((x == self.padding_idx).unsqueeze(-1), values.detach(), values)
        hit = pos >= 0
        if active is not None:
            hit = hit & active
        return torch.where(hit.unsqueeze(-1), values, out)

    # ----- merge ---------------------------------------------------------------------------------------------
    def effective_weight(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        weight = module.weight
        merged = weight.index_copy(0, self.index.to(weight.device), tensors[TOKENS].to(weight.dtype))
        if self.kind is Kind.EMBEDDING:
            return merged.T, None
        return merged, module.bias


def _matches(paths: Sequence[str], key: str) -> list[str]:
    """PEFT's rule for ``trainable_token_indices`` keys (``_set_trainable``): a plain string suffix of the path."""
    return [p for p in paths if p.endswith(key)]


def _input_embedding(model: nn.Module, modules: Mapping[str, nn.Module]) -> str | None:
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        return None
    try:
        embedding = getter()
    except (NotImplementedError, AttributeError):
        return None
    return next((p for p, m in modules.items() if m is embedding), None)


def token_layers(config: Any, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> dict[str, AdapterLayer]:
    """The :class:`TokenLayer` of every module ``config.trainable_token_indices`` selects on ``model``, and of the
    modules tied to a selected input embedding (PEFT 0.21.2's rules, ``peft.utils.other``).

    Raises:
        ValueError: a key matches no module, a matched module is not an Embedding/Linear, is also a LoRA target or a
            ``modules_to_save`` module, has fewer rows than an index, or uses an option the substitution cannot keep
            (``max_norm``, ``scale_grad_by_freq``); or a tied head is a LoRA target.
    """
    spec = getattr(config, "trainable_token_indices", None)
    if spec is None:
        return {}
    modules = dict(model.named_modules())
    paths = [p for p in modules if p]
    embedding = _input_embedding(model, modules)
    if isinstance(spec, Mapping):
        wanted = {key: tuple(value) for key, value in spec.items()}
    else:  # a list targets the input embedding, or a module named `embed_tokens` (PEFT's fallback)
        wanted = {embedding if embedding is not None else "embed_tokens": tuple(spec)}
    targets: dict[str, tuple[int, ...]] = {}
    for key, indices in wanted.items():
        found = _matches(paths, key)
        if not found:
            raise ValueError(
                f"`trainable_token_indices` key {key!r} matches no module of {type(model).__name__} (PEFT matches "
                "module paths ending with it"
                + (
                    "; a list selects the input embedding, which this model does not name (no get_input_embeddings): "
                    "pass a dict {embedding_module_name: [indices]}."
                    if not isinstance(spec, Mapping)
                    else "); name the embedding module, e.g. 'embed_tokens' or 'wte'."
                )
            )
        targets.update(dict.fromkeys(found, indices))
    saved = saved_modules(model, config)
    tied = _tied_heads(model, modules, embedding, targets)
    out: dict[str, AdapterLayer] = {}
    for path, indices in targets.items():
        _check_target(path, modules[path], indices, layers, saved)
        names = tuple(f"{head}.weight" for head in tied) if path == embedding else ()
        out[path] = _layer(path, modules[path], indices, path, names, getattr(config, "init_weights", True))
    for head in tied:
        module = modules[head]
        if head in layers:
            raise ValueError(
                f"Module {head!r} shares its weight with the input embedding {embedding!r} (tie_word_embeddings), "
                "whose token rows `trainable_token_indices` trains, and LoRA targets it too: PEFT 0.21.2 then leaves "
                f"the head on the original rows, untied. Drop {head!r} from `target_modules`."
            )
        _check_target(head, module, targets[embedding], {}, saved)
        out[head] = _layer(head, module, targets[embedding], embedding, (), True)
    return out


def _tied_heads(
    model: nn.Module, modules: Mapping[str, nn.Module], embedding: str | None, targets: dict[str, tuple[int, ...]]
) -> list[str]:
    """The modules tied to the targeted input embedding that read its entry (removed from ``targets``), or none.

    PEFT ties them when the model's config sets ``tie_word_embeddings`` and the input embedding is targeted; a dict
    naming a tied head too keeps it tied if it gives the same indices, and otherwise trains each on its own rows.
    """
    config = getattr(model, "config", None)
    if embedding is None or embedding not in targets or getattr(config, "tie_word_embeddings", False) is not True:
        return []
    weight = modules[embedding].weight
    heads = [p for p, m in modules.items() if p != embedding and getattr(m, "weight", None) is weight]
    if any(targets.get(h, targets[embedding]) != targets[embedding] for h in heads):
        return []
    for head in heads:
        targets.pop(head, None)
    return heads


def _check_target(
    path: str,
    module: nn.Module,
    indices: tuple[int, ...],
    layers: Mapping[str, Any],
    saved: Sequence[str],
    field: str = "trainable_token_indices",
) -> None:
    kind = kind_of(module)
    if kind not in (Kind.EMBEDDING, Kind.LINEAR):
        raise ValueError(
            f"`{field}` selects {path!r}, a {type(module).__name__}; trainable tokens replace rows "
            "of an nn.Embedding (or an nn.Linear's output rows). Name the embedding module instead."
        )
    if path in layers:
        raise ValueError(
            f"Module {path!r} is both a LoRA target and selected by `trainable_token_indices` (PEFT refuses this "
            f"too). Remove it from `target_modules` (or exclude it), or train its rows without LoRA."
        )
    if any(path == s or path.startswith(s + ".") for s in saved):
        raise ValueError(
            f"The embedding {path!r} is already trained in full (`modules_to_save`); specify it either there or in "
            "`trainable_token_indices`, not both (as PEFT)."
        )
    rows = module.num_embeddings if kind is Kind.EMBEDDING else module.out_features
    bad = [i for i in indices if i >= rows]
    if bad:
        raise ValueError(
            f"`{field}` {bad[:5]} for {path!r} are out of range: it has {rows} rows (indices "
            f"0 to {rows - 1}). Resize the vocabulary first (model.resize_token_embeddings) or fix the indices."
        )
    if kind is Kind.EMBEDDING and (module.max_norm is not None or module.scale_grad_by_freq):
        raise ValueError(
            f"The embedding {path!r} uses max_norm={module.max_norm} / scale_grad_by_freq="
            f"{module.scale_grad_by_freq}, which rescale its table or gradients per lookup; trainable tokens do not "
            "support them. Build the embedding without these options."
        )


def _layer(
    path: str, module: nn.Module, indices: tuple[int, ...], entry: str, tied: tuple[str, ...], init: bool
) -> TokenLayer:
    kind = Kind.EMBEDDING if kind_of(module) is Kind.EMBEDDING else Kind.LINEAR  # (checked by _check_target)
    device = module.weight.device
    index = torch.tensor(indices, dtype=torch.long, device=device)
    rows = module.weight.shape[0]
    position = torch.full((rows,), -1, dtype=torch.long, device=device)
    position[index] = torch.arange(len(indices), device=device)
    return TokenLayer(
        kind=kind,
        indices=indices,
        entry=entry,
        tied=tied,
        init_weights=init,
        embed_scale=kind is Kind.EMBEDDING and getattr(module, "embed_scale", None) is not None,
        padding_idx=getattr(module, "padding_idx", None) if kind is Kind.EMBEDDING else None,
        index=index,
        position=position,
    )


def check_entry(config: Any, path: str, entry: Mapping[str, Tensor]) -> str | None:
    """What is wrong with a token entry ``params[path]`` for ``config`` (None: it fits), as far as the config alone
    says: one row per index of the key matching ``path``."""
    delta = entry[TOKENS]
    spec = getattr(config, "trainable_token_indices", getattr(config, "token_indices", None))  # (or standalone)
    if spec is None:
        return f"it holds {TOKENS!r}, but the config has no `trainable_token_indices`"
    if delta.dim() != 2:
        return f"{TOKENS!r} has shape {tuple(delta.shape)}; it must be (n_tokens, dim)"
    counts = {len(v) for k, v in spec.items() if path.endswith(k)} if isinstance(spec, Mapping) else {len(spec)}
    if counts and delta.shape[0] not in counts:
        return f"{TOKENS!r} has {delta.shape[0]} rows, but the config lists {sorted(counts)} tokens"
    return None
