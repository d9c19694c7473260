"""LoRA initialisations that read the base weight: PiSSA, OLoRA, and PEFT's orthogonal init, without touching the base.

PEFT's ``pissa_init`` / ``olora_init`` (``peft.tuners.lora.layer``) start the adapter from the principal part of
the weight, ``B0 A0`` (PiSSA: the rank-r SVD ``V_r S_r U_r^T`` split as ``B0 = V_r sqrt(S_r / s)``,
``A0 = sqrt(S_r / s) U_r^T``; OLoRA: the first r columns/rows of the QR factors, ``B0 = Q_r``, ``A0 = R_r``), and
rewrite the base weight to the residual ``W - s B0 A0``. funcpeft never modifies the model: each entry carries
the initial factors frozen beside the trainable ones (``lora_A0``, ``lora_B0``, read detached), and the layer runs
the rank-2r LoRA ``A' = [A; A0]``, ``B' = [B, -B0]`` on the untouched ``W``:

    W + s (B A - B0 A0)  ==  (W - s B0 A0) + s B A   (PEFT's residual model, exactly in exact arithmetic)

so a fresh adapter is the base model. That rank-2r LoRA is what PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes (``r`` and ``lora_alpha`` doubled, or
``lora_alpha * sqrt(2)`` with rsLoRA): :func:`converted`, which :func:`funcpeft.save` applies by default.

``"orthogonal"`` (PEFT 0.21) needs no base weight: A and B are built from the odd and even rows of a random
orthogonal ``r x r`` matrix, so ``B A = 0`` by orthogonality and the base is untouched in PEFT too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from funcpeft import _layers
from funcpeft._layers import Kind
from funcpeft._quant import is_quantized
from funcpeft.config import RESIDUAL_INITS, LoraConfig

__all__ = [
    "INITIAL",
    "is_residual",
    "initial_factors",
    "orthogonal",
    "expanded",
    "to_checkpoint",
    "converted",
    "residual_checkpoint_error",
    "frozen_mask",
    "init_factors",
    "check_init",
]

INITIAL = ("lora_A0", "lora_B0")  # the frozen initial factors in a params entry


def is_residual(init: bool | str) -> bool:
    """Whether ``init_lora_weights`` starts from the base weight's principal part (PiSSA, OLoRA)."""
    # (configs validate "pissa_niter_<N>"; no regex here: layers ask this on every call)
    return isinstance(init, str) and (init in RESIDUAL_INITS or init.startswith("pissa_niter_"))


def initial_factors(
    weight: Tensor, r: int, scaling: float, init: str, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``(A0 (r, in), B0 (out, r))`` in float32 for the canonical ``weight`` ``(out, in)``, as PEFT's inits.

    ``"pissa_niter_<N>"`` uses ``torch.svd_lowrank`` (randomized, as PEFT); with ``generator`` its random draws
    come from a global generator seeded from ``generator`` (restored afterwards), without it from torch's global
    generator as in PEFT.
    """
    w = weight.detach().to(torch.float32)
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        v, s, uh = v[:, :r], s[:r], uh[:r]
    else:
        niter = int(init.split("_niter_")[-1])
        if generator is None:
            v, s, u = torch.svd_lowrank(w, q=r, niter=niter)
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                v, s, u = torch.svd_lowrank(w, q=r, niter=niter)
        uh = u.t()
    root = torch.sqrt(s / scaling)
    return (root[:, None] * uh).contiguous(), (v * root[None, :]).contiguous()


def orthogonal(r: int, n_in: int, n_out: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """PEFT's ``orthogonal_init``: ``A = (X_in Q_odd)^T / 10``, ``B = X_out Q_even / 10`` (float32), ``B A = 0``."""
    q, _ = torch.linalg.qr(torch.randn(r, r, generator=generator))
    a = torch.randn(n_in, r // 2, generator=generator).mm(q[0::2]).t() / 10.0
    b = torch.randn(r // 2, n_out, generator=generator).t().mm(q[1::2]) / 10.0
    return a.contiguous(), b.contiguous()


def expanded(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entry as the rank-2r LoRA ``A' = [A; A0]``, ``B' = [B, -B0]`` (initial factors detached: frozen).

    Works on one adapter's tensors and on stacked ones (leading K dim): A's rank is dim -2, B's dim -1.
    """
    out = {k: v for k, v in tensors.items() if k not in INITIAL}
    out["lora_A"] = torch.cat([tensors["lora_A"], tensors["lora_A0"].detach()], dim=-2)
    out["lora_B"] = torch.cat([tensors["lora_B"], -tensors["lora_B0"].detach()], dim=-1)
    return out


def to_checkpoint(config: LoraConfig | None, path: str, entry: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """What PEFT's own state dict holds for an entry: without the initial factors (the residual form)."""
    return {k: v for k, v in entry.items() if k not in INITIAL}


def converted(params: Mapping[str, Mapping[str, Tensor]], config: LoraConfig) -> tuple[dict, LoraConfig]:
    """A PiSSA/OLoRA adapter as the plain rank-2r LoRA on the *original* base, as PEFT's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes it: ``A' = [A; A0]``, ``B' = [B, -B0]``,
    ``init_lora_weights=True``, ``r``, ``rank_pattern`` and ``lora_alpha``, ``alpha_pattern`` doubled (rsLoRA:
    ``lora_alpha * sqrt(2)``), so the scaling is unchanged. Other entries (DoRA magnitudes, ``modules_to_save``) are
    kept (PEFT's conversion drops them, which breaks a converted DoRA adapter).

    Raises:
        ValueError: rsLoRA with ``rank_pattern``/``alpha_pattern`` (PEFT refuses this conversion too: the doubled
            alpha cannot keep every scaling).
    """
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            f"Cannot convert the `init_lora_weights={config.init_lora_weights!r}` adapter to a LoRA on the original "
            "base with `use_rslora=True` and `rank_pattern`/`alpha_pattern` (PEFT refuses it too); save it with "
            "`funcpeft.save(..., convert=False)` (residual form) or drop rsLoRA or the patterns."
        )
    out: dict[str, dict[str, Tensor]] = {}
    for path, entry in params.items():
        if "lora_A0" in entry:
            full = expanded(entry)
            full["lora_A"], full["lora_B"] = full["lora_A"].detach(), full["lora_B"].detach()
            out[path] = full
        else:
            out[path] = dict(entry)
    alpha = config.lora_alpha * 2**0.5 if config.use_rslora else config.lora_alpha * 2
    new = dataclasses.replace(
        config,
        init_lora_weights=True,
        r=config.r * 2,
        lora_alpha=alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
    )
    return out, new


def residual_checkpoint_error(config: LoraConfig) -> str:
    """Why a PiSSA/OLoRA checkpoint saved without conversion cannot be read as a funcpeft adapter, and the fixes."""
    return (
        f"This checkpoint has `init_lora_weights={config.init_lora_weights!r}` and was saved without conversion "
        "(PEFT's plain save_pretrained, or funcpeft.save(..., convert=False)): its lora_A/lora_B apply to PEFT's "
        "residual base W - s*B0*A0, not to the original model, and it lacks the initial factors B0, A0 "
        "funcpeft needs to run it on the original base. Convert it where it was trained (PEFT: save_pretrained(..., "
        "path_initial_model_for_weight_conversion=...); funcpeft: funcpeft.save with the default convert=True) to "
        "get a rank-2r LoRA for the original base; or, holding the residual base model itself, read the tensors as "
        "a plain LoRA: funcpeft.from_peft_state_dict(state_dict, dataclasses.replace(config, "
        "init_lora_weights=True)) and adapt that residual model."
    )


def init_factors(a: Tensor, b: Tensor, init: bool | str, r: int, generator: torch.Generator | None) -> None:
    """PEFT's initialisation of a LoRA pair in place, for every kind but embeddings: ``A`` kaiming-uniform
    (a = sqrt(5); normal with std 1/r for ``"gaussian"``), ``B`` zero (kaiming-uniform too for ``init=False``, so
    the adapter is not a no-op). ``A`` draws first, as in PEFT, so the same generator gives PEFT's tensors."""
    if init == "gaussian":
        a.normal_(std=1 / r, generator=generator)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    if init is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=generator)
    else:
        b.zero_()


def frozen_mask(params: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict[str, bool]]:
    """A tree of ``params``' structure, True at the frozen initial factors (for :func:`funcpeft.optim.freeze`).

    torch optimizers skip them (their ``.grad`` stays None), and so does :mod:`funcpeft.optim`'s weight decay (the
    one step that acts without a gradient); this mask is for a user's own transformations.
    """
    return {path: {name: name in INITIAL for name in entry} for path, entry in params.items()}


def check_init(init: bool | str, path: str, module: nn.Module, kind: Kind, r: int) -> None:
    """PiSSA / OLoRA / orthogonal init: Linear and GPT-2 Conv1D only (as PEFT), ranks they can fill."""
    if not (is_residual(init) or init == "orthogonal"):
        return
    if kind not in (Kind.LINEAR, Kind.CONV1D_GPT2):
        raise ValueError(
            f"`init_lora_weights={init!r}` works on Linear (and GPT-2 Conv1D) layers only (PEFT raises 'Unknown "
            f"initialization' elsewhere), but {path!r} is a {type(module).__name__}; exclude it via "
            "`exclude_modules` or use another init."
        )
    if init == "orthogonal" and r % 2:
        raise ValueError(
            f"`init_lora_weights='orthogonal'` needs an even rank (as PEFT), but {path!r} has r={r}; choose an even "
            "`r` (or `rank_pattern` entry)."
        )
    n_in, n_out = _layers.in_out_features(module, kind)
    if is_residual(init) and r > min(n_in, n_out):
        raise ValueError(
            f"`init_lora_weights={init!r}` takes the top r={r} singular/QR directions of {path!r}'s weight, which "
            f"has only {min(n_in, n_out)} ({n_out} x {n_in}); choose r <= {min(n_in, n_out)} for it."
        )
    if is_residual(init) and is_quantized(module.weight):
        raise ValueError(
            f"`init_lora_weights={init!r}` on the quantized layer {path!r} is not supported by funcpeft; initialise "
            "on the float model (PEFT's advice too) and quantize afterwards."
        )
