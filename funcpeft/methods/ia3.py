"""(IA)^3 (Liu et al., 2022, arXiv:2205.05638) on Linear, GPT-2 Conv1D and Conv2d/3d layers, as PEFT's ``ia3``.

One learned vector per layer, ``ia3_l``, rescales the layer's output channels, or for ``feedforward_modules``
its input features:

- output scaling: ``y = base(x) * l`` with ``ia3_l`` (out, 1) for Linear/Conv1D and (1, out, 1, ...) for convs;
  folded into the weight it scales row ``o`` of ``W`` and the bias by ``l[o]``;
- input scaling: ``y = base(x * l)`` with ``ia3_l`` (1, in) / (1, in, 1, ...); folded, it scales column ``i``
  of ``W`` and leaves the bias alone.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from funcpeft import _layers
from funcpeft._layers import Kind
from funcpeft._targeting import find_targets, user_warning
from funcpeft.config import IA3Config
from funcpeft.methods.base import BaseForward, Method, Rows, gather, register, rows_for

__all__ = ["IA3Layer", "METHOD"]

_FLOATS = (torch.float32, torch.float64)

# PEFT's per-architecture defaults (peft.utils.constants), keyed by `model.config.model_type`.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"], "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"], "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}  # fmt: skip
DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "llama4": ["down_proj"], "mistral": ["down_proj"],
    "mixtral": ["w2"], "bert": ["output.dense"], "deberta-v2": ["output.dense"], "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"], "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"], "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}  # fmt: skip


@dataclass(frozen=True)
class IA3Layer:
    kind: Kind
    feedforward: bool
    init_weights: bool
    ndim: int = 2

    def _shape(self, module: nn.Module) -> tuple[int, ...]:
        n_in, n_out = _layers.in_out_features(module, self.kind)
        if self.kind is Kind.CONV:
            return (1, n_in if self.feedforward else n_out) + (1,) * (self.ndim - 2)
        return (1, n_in) if self.feedforward else (n_out, 1)

    def init(self, module: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        weight = module.weight
        dtype = weight.dtype if weight.dtype in _FLOATS else torch.float32
        vector = torch.empty(self._shape(module), dtype=dtype)
        vector.normal_(generator=generator) if not self.init_weights else vector.fill_(1.0)
        return {"ia3_l": vector.to(weight.device)}

    def forward(
        self, module: nn.Module, tensors: Mapping[str, Tensor], base: BaseForward, x: Tensor, *args: Any, **kwargs: Any
    ) -> Tensor:
        scale = tensors["ia3_l"]
        if self.kind is not Kind.CONV:
            scale = scale.flatten()  # broadcast over the feature (last) dim
        if self.feedforward:
            return base(module, (x * scale).to(x.dtype), *args, **kwargs)
        result = base(module, x, *args, **kwargs)
        return (result * scale).to(result.dtype)

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
        """Row ``i`` scaled by vector ``rows.index[i]`` of the stacked ``ia3_l`` (exactly 1 where the row is the
        base: :func:`gather`)."""
        rows = rows_for(rows, x, path)
        if x.shape[0] == 0:  # an empty batch: nothing to select (and no -1 reshape can be inferred)
            return base(module, x, *args, **kwargs)
        n = x.shape[0]
        vectors = gather(tensors["ia3_l"], rows, 1.0).reshape(n, -1)  # (B, features)
        target_dim = x.dim() if self.feedforward else None
        result = None
        if target_dim is None:
            result = base(module, x, *args, **kwargs)
            target_dim = result.dim()
        if self.kind is Kind.CONV:
            factor = vectors.view(n, -1, *(1,) * (target_dim - 2))
        else:
            factor = vectors.view(n, *(1,) * (target_dim - 2), -1)
        if result is None:
            return base(module, (x * factor).to(x.dtype), *args, **kwargs)
        return (result * factor).to(result.dtype)

    def effective_weight(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        weight = _layers.canonical_weight(module, self.kind)
        vector = tensors["ia3_l"].reshape(-1).to(weight.dtype)
        bias = getattr(module, "bias", None)
        if self.feedforward:  # scale the input features: the columns
            return weight * vector.reshape(1, -1, *(1,) * (weight.dim() - 2)), bias
        scaled = weight * vector.reshape(-1, *(1,) * (weight.dim() - 1))
        return scaled, None if bias is None else bias * vector


def _is_feedforward(config: IA3Config, path: str) -> bool:
    return _feedforward_match(config.feedforward_modules, path)


def _feedforward_match(spec: str | Iterable[str] | None, path: str) -> bool:
    """PEFT's rule (``IA3Model._check_target_module_feedforward``): a regex full-matches the path; a list entry
    matches a path that *ends with* it as a plain string (so ``"proj"`` also matches ``"q_proj"``, unlike
    ``target_modules``' ``.``-suffix rule), which a PEFT checkpoint's vector shapes depend on."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path.endswith(entry) for entry in spec)


def resolve(config: IA3Config, model: nn.Module) -> IA3Config:
    """Fill in PEFT's default ``feedforward_modules`` (known transformers architectures, when None).

    As in PEFT, ``feedforward_modules`` only applies to the adapted modules: a feedforward module that is
    excluded or not targeted is left alone. A ``feedforward_modules`` entry the user gave that matches no adapted
    module has no effect, and is reported with a :class:`~funcpeft.FuncpeftWarning` naming it.
    """
    given = config.feedforward_modules
    if given is None:
        # Set after construction, as PEFT does (`_prepare_adapter_config`): the defaults need not be a subset of
        # the user's `target_modules`, only the adapted ones among them count.
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        resolved = copy.copy(config)
        object.__setattr__(resolved, "feedforward_modules", list(DEFAULT_FEEDFORWARD.get(model_type, [])))
        return resolved
    if not given:
        return config
    targets = find_targets(model, config, DEFAULT_TARGETS, warn=False)
    regex = isinstance(given, str)
    for entry in [given] if regex else given:
        if not any(_feedforward_match(entry if regex else [entry], t) for t in targets):
            what = "regex" if regex else "entry"
            user_warning(
                f"`feedforward_modules` {what} {entry!r} matches no adapted module of {type(model).__name__}, so it "
                f"has no effect (PEFT ignores it too): only targets can be feedforward modules (adapted: "
                f"{', '.join(targets[:5])}{', ...' if len(targets) > 5 else ''})."
            )
    return config


def make_layer(config: IA3Config, path: str, module: nn.Module, kind: Kind | None) -> IA3Layer:
    if kind not in (Kind.LINEAR, Kind.CONV1D_GPT2) and not (kind is Kind.CONV and module.weight.dim() in (4, 5)):
        raise ValueError(
            f"Module {path!r} ({type(module).__name__}) matched `target_modules`, but IA3 can only adapt "
            "nn.Linear, transformers' Conv1D and nn.Conv2d/3d (as PEFT); narrow `target_modules` or add it to "
            "`exclude_modules`."
        )
    return IA3Layer(
        kind=kind,
        feedforward=_is_feedforward(config, path),
        init_weights=config.init_ia3_weights,
        ndim=module.weight.dim(),
    )


def required(config: IA3Config, names: frozenset[str]) -> frozenset[str]:
    return frozenset({"ia3_l"})


METHOD = register(
    Method(
        name="ia3",
        config_type=IA3Config,
        default_targets=DEFAULT_TARGETS,
        make_layer=make_layer,
        peft_keys={"ia3_l": "ia3_l"},
        required=required,
        resolve=resolve,
    )
)
