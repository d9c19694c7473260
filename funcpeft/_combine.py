"""PEFT's adapter arithmetic: :func:`combine` is ``add_weighted_adapter`` (``peft.tuners.lora.model.LoraModel`` and
``peft.tuners.ia3.model.IA3Model``) as a pure function on params trees (exported as :func:`funcpeft.combine`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from funcpeft._targeting import pattern_value
from funcpeft._trees import Params, as_leaf, check_alike, check_list
from funcpeft.config import AdaLoraConfig, AdapterConfig, IA3Config, LoraConfig, task_heads

__all__ = ["combine"]


_METHODS = ("cat", "linear", "svd")
# PEFT's other combination types prune by `density` (TIES, DARE, magnitude pruning): not in funcpeft's contract.
_DENSITY_METHODS = (
    "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
    "magnitude_prune_svd",
)  # fmt: skip
_LORA_PAIRS = (
    ("lora_A", "lora_B"),
    ("lora_embedding_A", "lora_embedding_B"),
    ("out_proj.lora_A", "out_proj.lora_B"),  # an nn.MultiheadAttention's (funcpeft.methods.lora_mha)
)


def combine(
    list_of_params: Sequence[Mapping[str, Mapping[str, Tensor]]],
    weights: Sequence[float],
    config: AdapterConfig,
    method: str = "svd",
    rank: int | None = None,
) -> tuple[Params, AdapterConfig]:
    """A weighted combination of adapters of one config: PEFT's ``add_weighted_adapter`` as a pure function.

    **LoRA** (``peft.tuners.lora.model.LoraModel.add_weighted_adapter``, its ``density``-free combinations), with
    ``s_i`` each module's scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA, after ``rank_pattern`` /
    ``alpha_pattern``):

    - ``"cat"``: ``A = cat_i(w_i s_i A_i)`` (rows), ``B = cat_i(B_i)`` (columns); rank ``K r``; exactly
      ``sum_i w_i s_i B_i A_i``.
    - ``"linear"``: ``A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i``, ``B = sum_i sqrt(|w_i s_i|) B_i``; rank ``r``.
      Cheap but only an approximation of the weighted sum of deltas (PEFT says so too).
    - ``"svd"`` (PEFT's default): the rank-``rank`` truncated SVD of ``sum_i w_i s_i B_i A_i``: ``B = U S``,
      ``A = V^T``; ``rank`` defaults to the config's largest rank. Computed with the reduced SVD (PEFT computes
      the full one and discards its extra columns; the kept factors agree up to the sign of each singular pair).
      PEFT's ``svd_clamp`` and ``svd_driver`` are at their defaults (no clamping, torch's driver).

    As in PEFT, a single adapter is always combined with ``"linear"``; every module's rank is taken to the
    largest one of the config (``max(r, *rank_pattern.values())``, times K for ``"cat"``), and the returned config
    is the input's with ``r = lora_alpha =`` that rank (so the new scaling is 1: each ``s_i`` is folded into the
    tensors), ``rank_pattern = alpha_pattern = {}``, and a regex ``target_modules`` joined PEFT's way
    (``"(re)|(re)|..."``, one group per adapter). Lists, ``None`` and ``"all-linear"`` stay as they are (PEFT
    stores the resolved names there, which select the same modules).

    Where funcpeft deliberately differs from PEFT 0.21:

    - ``use_rslora``: the returned config sets ``use_rslora=False``. PEFT keeps ``True``, which makes the new
      adapter's scaling ``sqrt(new_rank)`` instead of 1 (a silently overscaled adapter, fixed upstream in
      huggingface/peft#3449). The tensors are PEFT's.
    - Modules whose tensors come out with a smaller rank than the config's (``"linear"`` under ``rank_pattern``;
      ``"svd"`` with a rank above ``min(out, in)``) are zero-padded to it, so ``params`` fit the returned config:
      ``B @ A`` is unchanged. PEFT leaves such tensors at the smaller size (they do not reload against its own
      config, and for ``"svd"`` the forward fails with a shape error).
    - ``"svd"`` on Conv1d/Conv3d flattens the kernel as PEFT does for Conv2d (PEFT runs a batched SVD over the
      kernel dimensions there, which is not the delta's SVD).
    - Refused with a ``ValueError`` where PEFT silently builds a wrong adapter (huggingface/peft#3761): DoRA (PEFT
      keeps the new adapter's initial magnitude, ``||W||``, which needs the base weight) and ``lora_bias`` (PEFT
      keeps the new ``lora_B`` bias at its initial zeros). ``"cat"``/``"svd"`` on grouped convolutions are refused
      too (their block structure does not survive concatenation or a dense SVD).

    **IA3** (``peft.tuners.ia3.model.IA3Model.add_weighted_adapter``): ``ia3_l = sum_i w_i ia3_l_i``; ``method``
    is ignored; the config keeps every field, a regex ``target_modules`` / ``feedforward_modules`` joined as above.

    Both: ``modules_to_save`` cannot be combined. PEFT raises for two or more adapters with them, and gives a
    single adapter a fresh copy of the *base* module (which needs the model), so funcpeft raises in both cases.
    Trainable biases (``bias="all"``/``"lora_only"``) are refused as well: PEFT allows only one adapter with
    biases in a model (they are the base model's own, shared), so its ``add_weighted_adapter`` raises for them.

    Args:
        list_of_params: the adapters, all made with ``config`` (same modules and shapes).
        weights: one real number per adapter; negative weights subtract.
        config: the adapters' :class:`~funcpeft.LoraConfig` or :class:`~funcpeft.IA3Config`.
        method: ``"svd"`` (default, as PEFT), ``"cat"`` or ``"linear"``; LoRA only.
        rank: the new rank for ``"svd"`` (default: the config's largest rank).

    Returns:
        ``(params, config)``: the new adapter (fresh leaf tensors with ``requires_grad=True``) and its config.

    Raises:
        TypeError: ``config`` is not a LoRA or IA3 config (AdaLoRA: PEFT raises too), or an argument has the
            wrong type.
        ValueError: mismatched adapters (named), ``weights`` of the wrong length or not finite, an unknown
            ``method``, ``rank`` where it has no effect, or a combination PEFT does not define (see above).
    """
    trees = check_list(list_of_params, "list_of_params")
    check_alike(trees, "list_of_params")
    floats = _check_weights(weights, len(trees))
    if isinstance(config, AdaLoraConfig):
        raise TypeError(
            "AdaLoRA adapters cannot be combined: PEFT's AdaLoraModel does not support add_weighted_adapter either."
        )
    if not isinstance(config, (LoraConfig, IA3Config)):
        raise TypeError(
            f"`config` must be a funcpeft.LoraConfig or IA3Config, got {type(config).__name__}: PEFT's "
            "add_weighted_adapter combines only LoRA and IA3 adapters (VeRA, OFT, LoHa and LoKr models have none), so "
            "there is no combination to match."
        )
    if getattr(config, "target_parameters", None):
        raise ValueError(
            f"Adapters with `target_parameters` ({list(config.target_parameters)[:3]}) cannot be combined: PEFT's "
            "add_weighted_adapter refuses them too (their factors interleave experts). Combine the merged weights "
            "instead (fwd.merge), or adapters without target_parameters."
        )
    if config.modules_to_save or task_heads(config):
        saved = list(config.modules_to_save or []) + [
            h for h in task_heads(config) if h not in (config.modules_to_save or [])
        ]
        raise ValueError(
            f"Cannot combine adapters with `modules_to_save={saved!r}` (with the task_type's head): "
            + (
                "PEFT refuses to add weighted adapters that target the same module with modules_to_save."
                if len(trees) > 1
                else "for a single adapter PEFT gives the new adapter a fresh copy of the base model's module, "
                "which funcpeft.combine cannot see."
            )
            + " Combine the adapted modules only (a config and params without the modules_to_save entries)."
        )
    if getattr(config, "trainable_token_indices", None) is not None:
        raise ValueError(
            "Cannot combine adapters with `trainable_token_indices`: PEFT's add_weighted_adapter gives the new adapter "
            "fresh token rows (the base model's), silently dropping the trained ones. Combine the LoRA entries only "
            "(a config without trainable_token_indices and params without the token entries), then set the rows."
        )
    if getattr(config, "bias", "none") != "none":
        raise ValueError(
            f"Cannot combine adapters with `bias={config.bias!r}`: PEFT trains one set of biases shared by all "
            'adapters and refuses a second adapter with bias ("LoraModel supports only 1 adapter with bias"), so its '
            "add_weighted_adapter cannot create one either. Use adapters with bias='none'."
        )
    if isinstance(config, IA3Config):
        if rank is not None:
            raise ValueError(f"`rank` does not apply to IA3 (its adapters are vectors); got rank={rank!r}.")
        return _combine_ia3(trees, floats, config)
    method = _check_method(method, rank, len(trees))
    if config.use_dora:
        raise ValueError(
            "Cannot combine DoRA adapters (`use_dora=True`): PEFT's add_weighted_adapter combines only lora_A/lora_B "
            "and leaves the new adapter's magnitude at its initial value ||W|| (huggingface/peft#3761), which "
            "needs the base weight and is not a combination of the adapters."
        )
    if config.lora_bias:
        raise ValueError(
            "Cannot combine adapters with `lora_bias=True`: PEFT's add_weighted_adapter leaves the new lora_B bias "
            "at its initial zeros instead of combining the biases (huggingface/peft#3761)."
        )
    return _combine_lora(trees, floats, config, method, rank)


def _check_weights(weights: Any, n: int) -> list[float]:
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence):
        raise TypeError(f"`weights` must be a list of numbers, one per adapter, got {type(weights).__name__}.")
    if len(weights) != n:
        raise ValueError(f"`weights` has {len(weights)} entries but `list_of_params` has {n} adapters; give one each.")
    out = []
    for i, w in enumerate(weights):
        if not isinstance(w, numbers.Real) or isinstance(w, bool):
            hint = " (use .item() for a tensor)" if isinstance(w, Tensor) else ""
            raise TypeError(f"`weights[{i}]` must be a real number, got {w!r} ({type(w).__name__}){hint}.")
        if not math.isfinite(w):
            raise ValueError(f"`weights[{i}]` must be finite, got {w!r}.")
        out.append(float(w))
    return out


def _check_method(method: Any, rank: Any, n: int) -> str:
    if not isinstance(method, str):
        raise TypeError(f"`method` must be one of {list(_METHODS)}, got {method!r}.")
    if method in _DENSITY_METHODS:
        raise ValueError(
            f"`method={method!r}` prunes by PEFT's `density`, which funcpeft.combine does not implement; use one of "
            f"{list(_METHODS)}."
        )
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {list(_METHODS)} (PEFT's default is 'svd'), got {method!r}.")
    if rank is not None:
        if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"`rank` must be a positive integer or None, got {rank!r}.")
        if method != "svd":
            raise ValueError(f"`rank` only applies to method='svd' (got method={method!r}, rank={rank}); drop it.")
        if n == 1:
            raise ValueError(
                f"`rank={rank}` has no effect on a single adapter: PEFT combines one adapter with 'linear' whatever "
                "the method, keeping its rank. Drop `rank`, or combine two or more adapters."
            )
    return "linear" if n == 1 else method  # PEFT: one adapter is always combined linearly


def _join(spec: Any, n: int) -> Any:
    """PEFT's combined ``target_modules``/``feedforward_modules``: regexes joined as alternatives, one per adapter."""
    if isinstance(spec, str) and spec.lower() != "all-linear":
        return "|".join(f"({spec})" for _ in range(n))
    return spec


def _check_names(path: str, names: list[str], expected: frozenset[str], config: AdapterConfig) -> None:
    if set(names) != expected:
        raise ValueError(
            f"`list_of_params[0][{path!r}]` holds {names}, but a {config.peft_type} adapter of `config` holds "
            f"{sorted(expected)} there (trainable biases and modules_to_save cannot be combined); pass the config "
            "these adapters were made with."
        )


def _combine_ia3(
    trees: list[Mapping[str, Mapping[str, Tensor]]], weights: list[float], config: IA3Config
) -> tuple[Params, IA3Config]:
    out: Params = {}
    with torch.no_grad():
        for path, entry in trees[0].items():
            _check_names(path, list(entry), frozenset({"ia3_l"}), config)
            total = torch.zeros_like(entry["ia3_l"])
            for tree, w in zip(trees, weights, strict=True):
                total += tree[path]["ia3_l"].detach() * w  # PEFT's order of operations
            out[path] = {"ia3_l": as_leaf(total)}
    n = len(trees)
    new_config = config.replace(
        target_modules=_join(config.target_modules, n), feedforward_modules=_join(config.feedforward_modules, n)
    )
    return out, new_config


def _combine_lora(
    trees: list[Mapping[str, Mapping[str, Tensor]]],
    weights: list[float],
    config: LoraConfig,
    method: str,
    rank: int | None,
) -> tuple[Params, LoraConfig]:
    n = len(trees)
    max_rank = max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r
    new_rank = {"cat": n * max_rank, "linear": max_rank, "svd": rank or max_rank}[method]
    out: Params = {}
    with torch.no_grad():
        for path, entry in trees[0].items():
            names = list(entry)
            # an nn.MultiheadAttention holds two pairs (in_proj, out_proj): each combined as PEFT combines its layers
            pairs = [p for p in _LORA_PAIRS if p[0] in entry] or [_LORA_PAIRS[0]]
            _check_names(path, names, frozenset(n for p in pairs for n in p), config)
            out[path] = {}
            for a_name, b_name in pairs:
                out[path].update(_combine_pair(trees, weights, config, method, new_rank, path, a_name, b_name))
    new_config = config.replace(
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=_join(config.target_modules, n),
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
    )
    return out, new_config


def _combine_pair(
    trees: list[Mapping[str, Mapping[str, Tensor]]],
    weights: list[float],
    config: LoraConfig,
    method: str,
    new_rank: int,
    path: str,
    a_name: str,
    b_name: str,
) -> dict[str, Tensor]:
    """One ``(A, B)`` pair of module ``path`` combined over the adapters (PEFT's per-layer rules)."""
    a_list = [t[path][a_name].detach() for t in trees]
    b_list = [t[path][b_name].detach() for t in trees]
    r = pattern_value(config.rank_pattern, path, config.r)
    if a_list[0].shape[0] != r:
        raise ValueError(
            f"`list_of_params[0][{path!r}][{a_name!r}]` has rank {a_list[0].shape[0]}, but `config` gives "
            f"module {path!r} rank {r}; pass the config these adapters were made with."
        )
    alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
    scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    groups = r // b_list[0].shape[1] if b_list[0].dim() > 2 else 1
    if groups > 1 and method != "linear":
        raise ValueError(
            f"Module {path!r} is a grouped convolution (groups={groups}); method={method!r} would break the "
            "block structure of its lora_B (PEFT builds a wrong adapter there). Use method='linear', or "
            "exclude the module."
        )
    if method == "cat":
        a = torch.cat([ai * w * scaling for ai, w in zip(a_list, weights, strict=True)], dim=0)
        b = torch.cat(b_list, dim=1)
    elif method == "linear":
        a, b = _linear(a_list, b_list, [w * scaling for w in weights])
    else:
        a, b = _svd(a_list, b_list, scaling, weights, new_rank)
    a, b = _pad(a, b, new_rank)
    return {a_name: as_leaf(a), b_name: as_leaf(b)}


def _weighted_sum(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """PEFT's ``task_arithmetic``: ``sum_i w_i t_i`` over a stacked tensor (weights in at least float32)."""
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=torch.promote_types(stacked.dtype, torch.float32), device=stacked.device)
    return (stacked * w.view(-1, *(1,) * (stacked.dim() - 1))).sum(dim=0)


def _linear(a_list: list[Tensor], b_list: list[Tensor], scaled: list[float]) -> tuple[Tensor, Tensor]:
    # PEFT: split each weight as sqrt(|w s|) on both factors, the sign on A only (else negative weights cancel).
    weights_a = [math.sqrt(abs(ws)) * (1 if ws >= 0 else -1) for ws in scaled]
    weights_b = [math.sqrt(abs(ws)) for ws in scaled]
    dtype = a_list[0].dtype
    return _weighted_sum(a_list, weights_a).to(dtype), _weighted_sum(b_list, weights_b).to(dtype)


def _svd(
    a_list: list[Tensor], b_list: list[Tensor], scaling: float, weights: list[float], new_rank: int
) -> tuple[Tensor, Tensor]:
    a0, b0 = a_list[0], b_list[0]
    r = a0.shape[0]
    compute = torch.promote_types(a0.dtype, torch.float32)  # linalg.svd has no half-precision kernels
    # PEFT: each adapter's delta weight (scaling included), then the weighted sum, then a truncated SVD of it
    pairs = zip(a_list, b_list, strict=True)
    deltas = [(b.reshape(b.shape[0], -1).to(compute) @ a.reshape(r, -1).to(compute)) * scaling for a, b in pairs]
    delta = _weighted_sum(deltas, weights)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    a = vh.reshape(vh.shape[0], *a0.shape[1:]).to(a0.dtype)
    b = u.reshape(b0.shape[0], u.shape[1], *b0.shape[2:]).to(b0.dtype)
    return a, b


def _pad(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero rows of A and columns of B up to ``rank``: ``B @ A`` is unchanged and the tensors fit the config."""
    missing = rank - a.shape[0]
    if missing <= 0:
        return a, b
    a = torch.cat([a, a.new_zeros(missing, *a.shape[1:])], dim=0)
    b = torch.cat([b, b.new_zeros(b.shape[0], missing, *b.shape[2:])], dim=1)
    return a, b
