"""PEFT's standalone trainable tokens (``peft.TrainableTokensConfig``, ``peft_type`` ``"TRAINABLE_TOKENS"``).

The cheap way to add tokens: only the listed rows of the targeted embeddings train, nothing else (no LoRA). The
math and layers are :mod:`funcpeft.methods.lora_tokens`' (rows substituted in the lookup, a tied LM head reading the
embedding's rows); the differences from LoRA's ``trainable_token_indices`` are PEFT's:

- targets are chosen as PEFT's tuners choose them (``target_modules`` a list of names or a regex); None means the
  input embedding (``get_input_embeddings()``), else a module named ``embed_tokens``;
- checkpoint keys have no ``token_adapter``: ``base_model.model.<path>.trainable_tokens_delta``;
- a tied LM head appears in PEFT's files too (``lm_head.trainable_tokens_delta``, the same tensor as the
  embedding's): :func:`funcpeft.load` checks that it equals the embedding's rows and keeps one entry;
  :func:`funcpeft.save` writes the embedding's only (PEFT restores the head from it: one shared tensor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from funcpeft._layers import Kind
from funcpeft._targeting import _matches
from funcpeft._validate import check_bool, check_names, check_regex, check_task_type
from funcpeft.config import TASK_HEADS, AdapterConfig, check_token_indices
from funcpeft.methods import lora_tokens
from funcpeft.methods.base import AdapterLayer, Method, register
from funcpeft.methods.lora_tokens import TOKENS, TokenLayer

__all__ = ["TrainableTokensConfig", "METHOD"]


@dataclass(frozen=True)
class TrainableTokensConfig(AdapterConfig):
    """Train only some rows of an embedding, as ``peft.TrainableTokensConfig``.

    Args:
        token_indices: the rows to train (distinct, each below the embedding's number of rows).
        target_modules: module names (exact path or ``.``-suffix) or a regex (full match); None: the input embedding
            (``get_input_embeddings()``), else the module named ``embed_tokens``.
        init_weights: True (PEFT's default): the rows start as the current rows, so a fresh adapter is the base;
            False: standard normal rows.
        task_type: None or one of PEFT's ``TaskType`` values without a task head (recorded only).
    """

    peft_type: ClassVar[str] = "TRAINABLE_TOKENS"
    # What LoRA-style targeting reads and this method does not have.
    exclude_modules: ClassVar[None] = None
    modules_to_save: ClassVar[None] = None
    fan_in_fan_out: ClassVar[bool] = False

    token_indices: list[int] = field(default_factory=list)
    target_modules: str | list[str] | None = None
    init_weights: bool = True
    task_type: str | None = None

    def __post_init__(self) -> None:
        check_token_indices("token_indices", self.token_indices, allow_dict=False)
        check_names("target_modules", self.target_modules, allow_str=True)
        if isinstance(self.target_modules, str):
            check_regex("target_modules", self.target_modules)
        check_bool("init_weights", self.init_weights)
        check_task_type(self.task_type)
        if self.task_type in TASK_HEADS:
            raise ValueError(
                f"`task_type={self.task_type!r}` trains a task head in full in PEFT's LoRA, which trainable tokens "
                "cannot (PEFT's TrainableTokensConfig has no modules_to_save); use LoraConfig with "
                "`trainable_token_indices` and the head, or task_type=None."
            )


def _resolve(config: TrainableTokensConfig, model: nn.Module) -> TrainableTokensConfig:
    """PEFT's ``_prepare_adapter_config``: no ``target_modules`` means the input embedding (or ``embed_tokens``)."""
    if config.target_modules is not None:
        return config
    modules = dict(model.named_modules())
    name = lora_tokens._input_embedding(model, modules) or "embed_tokens"
    return dataclasses.replace(config, target_modules=[name])


def _make_layer(config: TrainableTokensConfig, path: str, module: nn.Module, kind: Kind | None) -> TokenLayer:
    indices = tuple(config.token_indices)
    lora_tokens._check_target(path, module, indices, {}, (), "token_indices")
    return lora_tokens._layer(path, module, indices, path, (), config.init_weights)


def _tied(config: TrainableTokensConfig, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> dict[str, Any]:
    """Modules sharing the targeted input embedding's weight read its rows when the model ties them (PEFT's
    ``TrainableTokensModel.inject_adapter``).

    Raises:
        ValueError: ``target_modules`` names such a head too: PEFT 0.21.2 then nests a second layer with its own,
            independently trained rows around the tied one (the head's logits leave the embedding's rows).
    """
    modules = dict(model.named_modules())
    embedding = lora_tokens._input_embedding(model, modules)
    flag = getattr(getattr(model, "config", None), "tie_word_embeddings", False) is True
    if embedding is None or embedding not in layers or not flag:
        return {}
    weight = modules[embedding].weight
    heads = [p for p, m in modules.items() if p != embedding and getattr(m, "weight", None) is weight]
    if not heads:
        return {}
    named = [h for h in heads if h in layers]
    if named:
        raise ValueError(
            f"`target_modules` selects {named}, which share their weight with the input embedding {embedding!r} "
            "(tie_word_embeddings): they already use its trained rows. PEFT 0.21.2 gives such a head a second, "
            f"independently trained copy of the rows (untied). Drop {named} from `target_modules`."
        )
    indices = tuple(config.token_indices)
    own = lora_tokens._layer(embedding, modules[embedding], indices, embedding, tuple(f"{h}.weight" for h in heads),
                             config.init_weights)  # fmt: skip
    extra: dict[str, Any] = {embedding: own}
    for head in heads:
        lora_tokens._check_target(head, modules[head], indices, {}, (), "token_indices")
        extra[head] = lora_tokens._layer(head, modules[head], indices, embedding, (), True)
    return extra


def _loaded(config: TrainableTokensConfig, params: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """Drop PEFT's copy of a tied head's rows (the embedding's tensor saved under the head's name too): entries the
    recorded ``target_modules`` does not select, each equal to a selected entry.

    Raises:
        ValueError: such an entry differs from every selected one (it is not a tied copy).
    """
    spec = config.target_modules
    if spec is None:
        return params
    kept = {p: e for p, e in params.items() if _matches(spec, p)}
    for path, entry in params.items():
        if path in kept:
            continue
        rows = entry.get(TOKENS)
        if rows is None or not any(torch.equal(rows, e[TOKENS]) for e in kept.values() if TOKENS in e):
            raise ValueError(
                f"The checkpoint holds trainable tokens for {path!r}, which `target_modules`={spec!r} does not select, "
                "and they equal no targeted embedding's rows (PEFT writes a tied LM head's rows as a copy of the "
                "embedding's). Fix `target_modules` in adapter_config.json."
            )
    return kept


METHOD = register(
    Method(
        name="trainable_tokens",
        config_type=TrainableTokensConfig,
        default_targets={},
        make_layer=_make_layer,
        peft_keys={TOKENS: TOKENS},
        required=lambda config, names: frozenset({TOKENS}),
        resolve=_resolve,
        extra_layers=_tied,
        loaded=_loaded,
    )
)
