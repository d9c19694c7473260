"""AdaLoRA's training-time pieces as pure functions: the rank allocator, the orthogonality regulariser, finalizing.

PEFT keeps AdaLoRA's rank allocation inside the model (``AdaLoraModel.update_and_allocate`` mutates the adapter
and the config in place). Here it is an optax-style transformation over the params pytree::

    alloc = funcpeft.adalora.allocator(config)
    state = alloc.init(params)
    for step in range(config.total_step):
        grads, loss = torch.func.grad_and_value(loss_fn)(params, batch)   # loss_fn adds orth_regularization
        params = sgd(params, grads)                                       # any optimizer update
        params, state = alloc.update(params, grads, state, step)          # PEFT's update_and_allocate(step)
    config = funcpeft.adalora.finalize(config, state)                     # fills rank_pattern
    funcpeft.save(path, params, config)                                   # writes the pruned tensors, as PEFT

The numerics are PEFT's ``RankAllocator`` (Zhang et al., 2023, arXiv:2303.10512, section 3), op for op, so the same
parameters and gradients give bit-identical masks:

- sensitivity ``I = |p * g|`` per entry of every ``lora_A``/``lora_E``/``lora_B``, smoothed
  ``I' = beta1 I' + (1 - beta1) I`` and its uncertainty ``U' = beta2 U' + (1 - beta2) |I - I'|``;
- a triplet's score is ``I'U'`` of its ``E`` entry plus the means of ``I'U'`` over its row of ``A`` and its
  column of ``B``;
- the budget (total kept rank) is ``init_r * n`` up to step ``tinit``, then decays cubically to ``target_r * n``
  at step ``total_step - tfinal``; every ``deltaT`` steps of that phase the triplets scoring at or below the
  ``(init - budget)``-th smallest score get ``E = 0``; at step ``total_step - tfinal`` a final mask is computed
  and the scores reset, and after it that mask is re-applied every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from funcpeft.config import AdaLoraConfig
from funcpeft.methods.adalora import prune_entry

__all__ = ["Allocator", "AllocatorState", "allocator", "budget_schedule", "finalize", "orth_regularization", "prune"]

Params = dict[str, dict[str, Tensor]]
_NAMES = ("lora_A", "lora_B", "lora_E")


class AllocatorState(NamedTuple):
    """The allocator's state, a pytree.

    Attributes:
        exp_avg_ipt: ``{path: {"lora_A"|"lora_B"|"lora_E": Tensor}}``, the smoothed sensitivity of every entry.
        exp_avg_unc: the same structure, the smoothed uncertainty of the sensitivity.
        masks: ``{path: bool Tensor (r,)}``, the latest allocation (True: the triplet is kept); empty before the
            first pruning step.
        budget: the total rank budget of the last step (PEFT's ``budget_schedule``).
    """

    exp_avg_ipt: Params
    exp_avg_unc: Params
    masks: dict[str, Tensor]
    budget: int


class Allocator(NamedTuple):
    """``init(params) -> state`` and ``update(params, grads, state, step) -> (params, state)``."""

    init: Callable[[Mapping[str, Mapping[str, Tensor]]], AllocatorState]
    update: Callable[..., tuple[Params, AllocatorState]]


def _svd_entries(params: Any, what: str = "params") -> dict[str, Mapping[str, Tensor]]:
    """The AdaLoRA entries of ``params`` (those holding ``lora_E``), checked to hold A, B and E."""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"`{what}` must be an adapter dict {{module_path: {{name: Tensor}}}}, got {type(params).__name__}."
        )
    entries = {}
    for path, entry in params.items():
        if isinstance(entry, Mapping) and "lora_E" in entry:
            missing = [n for n in _NAMES if not isinstance(entry.get(n), Tensor)]
            if missing:
                raise ValueError(f"`{what}[{path!r}]` has lora_E but no tensor for {missing}.")
            a, b, e = (entry[n] for n in _NAMES)
            r = e.shape[0] if e.dim() == 2 else None
            if r is None or e.shape[1] != 1 or a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
                shapes = ", ".join(f"{n} {tuple(entry[n].shape)}" for n in _NAMES)
                raise ValueError(
                    f"`{what}[{path!r}]` holds {shapes}, not one AdaLoRA adapter's lora_A (r, in), lora_B (out, r) "
                    "and lora_E (r, 1). The allocator and orth_regularization take one adapter: for a stacked tree, "
                    "run one allocator per adapter on funcpeft.unstack(stacked) (orth_regularization also under "
                    "torch.func.vmap)."
                )
            entries[path] = entry
    if not entries:
        raise ValueError(
            f"`{what}` holds no AdaLoRA module (no entry has a `lora_E`); build it with funcpeft.adapt(model, "
            "funcpeft.AdaLoraConfig(...))."
        )
    return entries


def budget_schedule(config: AdaLoraConfig, init_budget: int, target_budget: int, step: int) -> tuple[int, bool]:
    """PEFT's ``RankAllocator.budget_schedule``: ``(total kept rank at step, whether to prune at step)``."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    budget = int((init_budget - target_budget) * (mul_coeff**3) + target_budget)
    return budget, step % config.deltaT == 0


def _scores(entries: Mapping[str, Mapping[str, Tensor]], ipt: Params, unc: Params) -> dict[str, Tensor]:
    """Each module's triplet scores (r, 1), as PEFT's ``mask_to_budget`` computes them."""
    out = {}
    for path in entries:
        score = {name: ipt[path][name] * unc[path][name] for name in _NAMES}
        a = torch.mean(score["lora_A"], dim=1, keepdim=True)
        b = torch.mean(score["lora_B"], dim=0, keepdim=False).view(-1, 1)
        ab = torch.cat([a, b], dim=1).sum(dim=1, keepdim=False)
        out[path] = (score["lora_E"].view(-1) + ab.view(-1)).view(-1, 1)
    return out


def _mask_to_budget(
    entries: Mapping[str, Mapping[str, Tensor]], ipt: Params, unc: Params, n_pruned: int
) -> dict[str, Tensor]:
    """Keep every triplet scoring above the ``n_pruned``-th smallest score (ties at it are pruned, as in PEFT)."""
    scores = _scores(entries, ipt, unc)
    if n_pruned <= 0:  # PEFT's kthvalue fails here (target_r == init_r): nothing to prune
        return {path: torch.ones(s.shape[0], dtype=torch.bool, device=s.device) for path, s in scores.items()}
    threshold = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=n_pruned)[0]
    return {path: ~(s <= threshold).view(-1) for path, s in scores.items()}


def _apply_masks(params: Mapping[str, Mapping[str, Tensor]], masks: Mapping[str, Tensor]) -> Params:
    """``params`` with the pruned ``lora_E`` entries zeroed: new E tensors, everything else shared (not copied)."""
    out: Params = {path: dict(entry) for path, entry in params.items()}
    for path, mask in masks.items():
        e = params[path]["lora_E"]
        zeroed = e.detach().masked_fill(~mask.view(-1, 1).to(e.device), 0.0)
        out[path]["lora_E"] = zeroed.requires_grad_(e.requires_grad)
    return out


def _zeros(entries: Mapping[str, Mapping[str, Tensor]]) -> Params:
    return {path: {name: torch.zeros_like(entry[name].detach()) for name in _NAMES} for path, entry in entries.items()}


def allocator(config: AdaLoraConfig) -> Allocator:
    """PEFT's AdaLoRA ``RankAllocator`` as a pure ``(init, update)`` pair.

    ``update(params, grads, state, step)`` is ``AdaLoraModel.update_and_allocate(step)``: call it after the
    optimizer update of ``step`` (0-based), with the updated ``params`` and that step's ``grads`` (a tree with at
    least ``params``' AdaLoRA tensors, e.g. ``torch.func.grad``'s output; steps after ``total_step - tfinal`` do
    not read it and accept ``None``). It returns ``params`` with the pruned ``lora_E`` entries zeroed (new E
    tensors; nothing passed in is modified) and the new state.

    Raises:
        TypeError: ``config`` is not a :class:`funcpeft.AdaLoraConfig`.
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"`config` must be a funcpeft.AdaLoraConfig, got {type(config).__name__}.")
    end = config.total_step - config.tfinal
    beta1, beta2 = config.beta1, config.beta2

    def init(params: Mapping[str, Mapping[str, Tensor]]) -> AllocatorState:
        entries = _svd_entries(params)
        with torch.no_grad():
            return AllocatorState(
                exp_avg_ipt=_zeros(entries),
                exp_avg_unc=_zeros(entries),
                masks={},
                budget=sum(entry["lora_E"].shape[0] for entry in entries.values()),
            )

    def update(
        params: Mapping[str, Mapping[str, Tensor]],
        grads: Mapping[str, Mapping[str, Tensor]] | None,
        state: AllocatorState,
        step: int,
    ) -> tuple[Params, AllocatorState]:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise TypeError(f"`step` must be the 0-based training step (an int >= 0), got {step!r}.")
        if not isinstance(state, AllocatorState):
            raise TypeError(f"`state` must be the AllocatorState of alloc.init(params), got {type(state).__name__}.")
        entries = _svd_entries(params)
        if entries.keys() != state.exp_avg_ipt.keys():
            raise ValueError(
                f"`params` has AdaLoRA modules {sorted(entries)[:3]}..., but `state` was made for "
                f"{sorted(state.exp_avg_ipt)[:3]}...; call alloc.init(params) for these params."
            )
        init_budget = sum(entry["lora_E"].shape[0] for entry in entries.values())
        budget, prune_now = budget_schedule(config, init_budget, config.target_r * len(entries), step)
        ipt, unc, masks = state.exp_avg_ipt, state.exp_avg_unc, state.masks
        with torch.no_grad():
            if step < end:
                ipt, unc = _update_importance(entries, grads, ipt, unc, beta1, beta2)
                if prune_now:
                    masks = _mask_to_budget(entries, ipt, unc, init_budget - budget)
            elif step == end:  # the final allocation; the scores start afresh (PEFT's reset_ipt)
                masks = _mask_to_budget(entries, ipt, unc, init_budget - budget)
                ipt, unc = _zeros(entries), _zeros(entries)
                prune_now = True
            elif not masks:
                raise ValueError(
                    f"Step {step} is after `total_step - tfinal` = {end}, but no allocation was made yet: call "
                    f"update at every step, including step {end} where the final mask is computed."
                )
            out = _apply_masks(params, masks) if prune_now else dict(params)
        return out, AllocatorState(ipt, unc, masks, budget)

    return Allocator(init, update)


def _update_importance(
    entries: Mapping[str, Mapping[str, Tensor]],
    grads: Any,
    ipt: Params,
    unc: Params,
    beta1: float,
    beta2: float,
) -> tuple[Params, Params]:
    """PEFT's ``update_ipt``: the smoothed sensitivity ``|p * g|`` and its uncertainty, per entry."""
    if not isinstance(grads, Mapping):
        raise TypeError(
            f"`grads` must be the gradient tree of this step (like params), got {type(grads).__name__}; the "
            "sensitivity |p * grad| needs it until step total_step - tfinal."
        )
    new_ipt: Params = {}
    new_unc: Params = {}
    for path, entry in entries.items():
        new_ipt[path], new_unc[path] = {}, {}
        for name in _NAMES:
            p = entry[name]
            g = grads.get(path, {}).get(name) if isinstance(grads.get(path), Mapping) else None
            if not isinstance(g, Tensor) or g.shape != p.shape:
                raise ValueError(
                    f"`grads[{path!r}][{name!r}]` must be a tensor of shape {tuple(p.shape)} (the gradient of this "
                    f"step), got {g if not isinstance(g, Tensor) else tuple(g.shape)}."
                )
            sensitivity = (p.detach() * g.detach()).abs()
            avg = beta1 * ipt[path][name] + (1 - beta1) * sensitivity
            new_ipt[path][name] = avg
            new_unc[path][name] = beta2 * unc[path][name] + (1 - beta2) * (sensitivity - avg).abs()
    return new_ipt, new_unc


def orth_regularization(params: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
    """AdaLoRA's orthogonality penalty, the term PEFT adds to the loss before weighting it by ``orth_reg_weight``.

    The mean over every AdaLoRA ``lora_A`` and ``lora_B`` (E is not included) of ``||A A^T - I||_F`` and
    ``||B^T B - I||_F`` (PEFT's ``AdaLoraModel.forward``; PEFT adds ``orth_reg_weight`` times it to
    ``outputs.loss`` when the model returns a loss). Add ``config.orth_reg_weight * orth_regularization(params)`` to
    your own loss; it is differentiable and composes with ``torch.func``.

    Raises:
        ValueError: ``params`` holds no AdaLoRA module.
    """
    total: Tensor | None = None
    count = 0
    for entry in _svd_entries(params).values():
        for name in ("lora_A", "lora_B"):
            p = entry[name]
            cov = p @ p.T if name == "lora_A" else p.T @ p
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            term = torch.norm(cov - eye, p="fro")
            total = term if total is None else total + term
            count += 1
    return total / count


def finalize(config: AdaLoraConfig, state: AllocatorState) -> AdaLoraConfig:
    """``config`` with ``rank_pattern`` set to the allocator's latest masks, in PEFT's form.

    Keys are ``"<module_path>.lora_E"`` and values lists of booleans (True: kept), as PEFT's ``save_pretrained``
    writes them. :func:`funcpeft.save` with this config stores the pruned tensors, and ``funcpeft.adapt`` with it
    builds the pruned shapes (use :func:`prune` to cut full-rank params to them).

    Raises:
        ValueError: the allocator has not pruned yet, or its masks are not over ``init_r`` triplets.
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"`config` must be a funcpeft.AdaLoraConfig, got {type(config).__name__}.")
    if not isinstance(state, AllocatorState):
        raise TypeError(
            f"`state` must be an AllocatorState from funcpeft.adalora.allocator, got {type(state).__name__}."
        )
    if not state.masks:
        raise ValueError(
            "The allocator has not pruned yet (its state has no mask): call alloc.update every step, at least "
            f"through a pruning step after `tinit` = {config.tinit}; the final mask comes at step "
            f"total_step - tfinal = {config.total_step - config.tfinal}."
        )
    pattern = {}
    for path, mask in state.masks.items():
        if mask.numel() != config.init_r:
            raise ValueError(
                f"The allocation of {path!r} covers {mask.numel()} triplets, but `init_r` is {config.init_r}: "
                "finalize needs an allocation over full-rank adapters (made with this config)."
            )
        pattern[f"{path}.lora_E"] = [bool(m) for m in mask.tolist()]
    return config.replace(rank_pattern=pattern)


def prune(params: Mapping[str, Mapping[str, Tensor]], config: AdaLoraConfig) -> Params:
    """``params`` cut to the ranks ``config.rank_pattern`` keeps (the tensors PEFT saves): fresh leaves, so
    ``funcpeft.adapt(model, config)``'s ``fwd`` runs them. Entries already at the kept rank are kept as they are.

    Raises:
        ValueError: an entry's rank fits neither its mask's length nor the number of kept triplets.
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"`config` must be a funcpeft.AdaLoraConfig, got {type(config).__name__}.")
    out: Params = {}
    for path, entry in params.items():
        pruned = prune_entry(config, path, entry)
        out[path] = {
            name: t if t is entry.get(name) else t.detach().clone().requires_grad_(entry[name].requires_grad)
            for name, t in pruned.items()
        }
    return out
