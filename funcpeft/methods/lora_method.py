"""LoRA's construction and registration: the :class:`~funcpeft.methods.base.Method` record for ``LoraConfig``.

:func:`make_layer` builds a module's :class:`~funcpeft.methods.lora.LoraLayer` (or, for an
``nn.MultiheadAttention``, :mod:`funcpeft.methods.lora_mha`'s layer): the per-layer checks PEFT makes (adaptable
kinds, grouped convs, ``lora_bias``), ``rank_pattern`` / ``alpha_pattern``, the (rs)LoRA scaling and the sizes
from which inference folds the adapter into the weight. :func:`required` and :data:`PEFT_KEYS` say which tensors a
complete entry has and what PEFT calls them; the layers a config adds beside its targets (trainable tokens,
``target_parameters``) come from :mod:`funcpeft.methods.lora_tokens` and :mod:`funcpeft.methods.lora_params`.
The layer's math is in :mod:`funcpeft.methods.lora`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from funcpeft import _layers
from funcpeft._layers import Kind
from funcpeft._targeting import DEFAULT_LORA_TARGETS, pattern_value, user_warning
from funcpeft.config import LoraConfig
from funcpeft.methods import lora_init, lora_mha, lora_params
from funcpeft.methods.base import Method, register
from funcpeft.methods.lora import LoraLayer
from funcpeft.methods.lora_mha import MhaLayer
from funcpeft.methods.lora_tokens import PEFT_KEY, TOKENS, token_layers

__all__ = ["METHOD", "PEFT_KEYS", "make_layer", "required"]


def make_layer(config: LoraConfig, path: str, module: nn.Module, kind: Kind | None) -> LoraLayer | MhaLayer:
    if isinstance(module, nn.MultiheadAttention):
        return lora_mha.make_layer(config, path, module)
    if kind is None:
        raise ValueError(
            f"Module {path!r} ({type(module).__name__}) matched `target_modules`, but LoRA can only adapt "
            "nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention and transformers' Conv1D; narrow "
            "`target_modules` (e.g. to the Linear layers inside it) or add it to `exclude_modules`."
        )
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
    lora_init.check_init(config.init_lora_weights, path, module, kind, r)
    scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    groups = getattr(module, "groups", 1) if kind is Kind.CONV else 1
    if kind is Kind.CONV and r % groups:
        raise ValueError(
            f"Module {path!r} is a {type(module).__name__} with groups={groups}, but the LoRA rank {r} is not "
            "divisible by it (PEFT's rule: lora_B is a grouped 1x1 conv); choose r as a multiple of "
            f"{groups} for this layer, e.g. via `rank_pattern`."
        )
    if kind is Kind.CONV and groups > 1 and config.use_dora:
        user_warning(
            f"DoRA on the grouped convolution {path!r} (groups={groups}) normalises the true adapted weight; PEFT "
            "0.21.2 computes that norm from a product that is not the grouped delta, so an adapter trained in PEFT "
            "gives different outputs here once its lora_B is non-zero (a fresh one agrees)."
        )
    if kind is Kind.EMBEDDING and getattr(module, "max_norm", None) is not None:
        # nn.Embedding renormalises the looked-up rows of its weight in place; PEFT's LoRA renormalises lora_A's
        # columns in place too. Neither is W + delta, and a functional adapter cannot rewrite its own tensors.
        raise ValueError(
            f"The embedding {path!r} has max_norm={module.max_norm}, which rescales its rows in place on every "
            "lookup, so a LoRA on it has no fixed adapted weight (PEFT renormalises lora_embedding_A in place, and "
            "a merged table would be renormalised differently). Build the embedding without `max_norm` or exclude "
            "it via `exclude_modules`."
        )
    if kind is Kind.EMBEDDING and config.lora_bias:
        raise ValueError(
            f"`lora_bias=True` is not supported for the embedding {path!r} (as in PEFT); exclude it or set "
            "`lora_bias=False`."
        )
    if config.lora_bias and getattr(module, "bias", None) is None:
        user_warning(  # PEFT's PeftWarning, with the module's path
            f"`lora_bias=True` was passed but the targeted layer {path!r} ({type(module).__name__}) has no bias, so "
            "this adapter cannot be merged into it (as in PEFT); it runs unmerged. Exclude the layer or set "
            "`lora_bias=False` if you need to merge."
        )
    return LoraLayer(
        fold_min_numel=_fold_threshold(module, kind, r),
        fold_min_numel_compiled=_fold_threshold(module, kind, r, launch_flops=0),
        kind=kind,
        r=r,
        scaling=scaling,
        dropout=float(config.lora_dropout),
        use_dora=config.use_dora,
        lora_bias=config.lora_bias,
        init_weights=config.init_lora_weights,
        groups=groups,
        ndim=module.weight.dim(),
        embed_scale=kind is Kind.EMBEDDING and getattr(module, "embed_scale", None) is not None,
    )


# One extra kernel launch is worth about this many multiply-adds on CPU (a few microseconds).


def _fold_threshold(module: nn.Module, kind: Kind, r: int, launch_flops: int = 1 << 17) -> int | None:
    """The input size from which folding ``B A`` into the weight costs no more than the unmerged form.

    Folding costs ``r * in * out`` multiply-adds per call; the unmerged form ``r * (in + out)`` per input row plus
    two more kernel launches, each worth ``launch_flops``. Only for layers whose forward is the library's own (we
    re-implement it).
    """
    own = kind is Kind.LINEAR and type(module).forward is nn.Linear.forward
    own = own or (kind is Kind.CONV1D_GPT2 and type(module).forward.__qualname__ == "Conv1D.forward")
    if not own:
        return None
    n_in, n_out = _layers.in_out_features(module, kind)
    rows = max(0, r * n_in * n_out - 2 * launch_flops) // (r * (n_in + n_out))
    return rows * n_in


def required(config: LoraConfig, names: frozenset[str]) -> frozenset[str]:
    """The tensor names a complete LoRA entry has, given the names it has (embedding or not)."""
    if TOKENS in names:  # trainable tokens (funcpeft.methods.lora_tokens): the new rows alone
        return frozenset({TOKENS})
    if names & lora_mha.MHA_KEYS.keys():  # an nn.MultiheadAttention: in- and out-projection pairs
        return lora_mha.MHA_NAMES
    embedding = bool(names & {"lora_embedding_A", "lora_embedding_B"})
    need = {"lora_embedding_A", "lora_embedding_B"} if embedding else {"lora_A", "lora_B"}
    if config.use_dora:
        need.add("lora_magnitude_vector")
    if config.lora_bias and not embedding:
        need.add("lora_B.bias")
    if lora_init.is_residual(config.init_lora_weights) and not embedding:
        need.update(lora_init.INITIAL)
    if names & lora_params.PARAM_KEYS.keys():  # target_parameters nested on one module: every level up to the deepest
        need.update(lora_params.required(names))
    return frozenset(need)


PEFT_KEYS = {
    "lora_A": "lora_A.weight",
    "lora_B": "lora_B.weight",
    "lora_B.bias": "lora_B.bias",
    "lora_embedding_A": "lora_embedding_A",
    "lora_embedding_B": "lora_embedding_B",
    "lora_magnitude_vector": "lora_magnitude_vector",
    # PiSSA/OLoRA's frozen initial factors (funcpeft.methods.lora_init): never written (PEFT's files have no such
    # keys; to_checkpoint drops them, funcpeft.save converts them into lora_A/lora_B by default)
    "lora_A0": "lora_A0",
    "lora_B0": "lora_B0",
    TOKENS: PEFT_KEY,  # trainable_token_indices' rows (funcpeft.methods.lora_tokens)
    **lora_mha.MHA_KEYS,  # an nn.MultiheadAttention's out_proj (PEFT wraps it inside the attention's base_layer)
    **lora_params.PARAM_KEYS,  # target_parameters nested on one module (funcpeft.methods.lora_params)
}


def _extra_layers(config: LoraConfig, model: nn.Module, layers: Mapping[str, Any]) -> dict[str, Any]:
    """The layers a LoRA config adds beside its targets: trainable tokens and ``target_parameters``' owners."""
    tokens = token_layers(config, model, layers)
    owners = lora_params.param_layers(config, model, layers)
    both = sorted(set(tokens or {}) & set(owners))
    if both:
        raise ValueError(
            f"Module {both[0]!r} has trainable tokens (`trainable_token_indices`) and a parameter in "
            "`target_parameters`; adapt its weight one way only."
        )
    return {**(tokens or {}), **owners}


METHOD = register(
    Method(
        name="lora",
        config_type=LoraConfig,
        default_targets=DEFAULT_LORA_TARGETS,
        make_layer=make_layer,
        peft_keys=PEFT_KEYS,
        required=required,
        to_checkpoint=lora_init.to_checkpoint,
        extra_layers=_extra_layers,
    )
)
