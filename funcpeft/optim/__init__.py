"""Functional optimizers for adapter pytrees, optax-shaped and numerically ``torch.optim``'s.

A JAX-style training loop::

    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    opt = funcpeft.optim.chain(
        funcpeft.optim.clip_by_global_norm(1.0),
        funcpeft.optim.adamw(funcpeft.optim.warmup_cosine_decay(1e-3, 100, 1000)),
    )
    state = opt.init(params)
    for batch in data:
        grads, loss = torch.func.grad_and_value(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        params = funcpeft.optim.apply_updates(params, updates)

Everything is pure: ``update`` returns new tensors and a new state (NamedTuple pytrees) and changes none of its
arguments. Stacked trees (``funcpeft.stack``, K adapters on a leading dim) train every adapter independently;
pass ``clip_by_global_norm(..., stacked=True)`` so each adapter gets its own norm.

Part of a tree: ``multi_transform({"lora": adamw(1e-3), "head": adamw(1e-4), "frozen": set_to_zero()}, labels)``
gives each labelled part its own optimizer (``labels`` a tree, a prefix such as ``{module_path: label}``, or a
function of the params); ``masked(inner, mask)`` applies ``inner`` where the mask is True and passes the rest
through unchanged (optax's semantics); ``freeze(mask)`` zeroes the updates of the masked leaves.

Gradient accumulation: ``multi_steps(opt, every_k)`` (optax's ``MultiSteps``) returns zero updates for
``every_k - 1`` calls and then ``opt``'s update for the mean of the ``every_k`` gradients; ``state.mini_step == 0``
after a call says that it stepped ``opt``.

Under ``torch.compile`` the loss and gradients of a step compile and ``update``/``apply_updates`` run eagerly
(see :mod:`~funcpeft.optim.transform`).

Modules: :mod:`~funcpeft.optim.transform` (building blocks), :mod:`~funcpeft.optim.alias` (``sgd``, ``adam``,
``adamw`` as chains of them), :mod:`~funcpeft.optim.schedule` (``step -> lr`` functions).
"""

from __future__ import annotations

from funcpeft.optim.alias import adam, adamw, sgd
from funcpeft.optim.schedule import (
    Schedule,
    constant,
    cosine_decay,
    linear,
    linear_warmup,
    warmup_cosine_decay,
)
from funcpeft.optim.transform import (
    EmptyState,
    GradientTransformation,
    MaskedState,
    MultiStepsState,
    MultiTransformState,
    ScaleByAdamState,
    ScaleByScheduleState,
    TraceState,
    add_decayed_weights,
    apply_updates,
    chain,
    clip_by_global_norm,
    freeze,
    identity,
    masked,
    multi_steps,
    multi_transform,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    set_to_zero,
    trace,
)

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "MaskedState",
    "MultiStepsState",
    "MultiTransformState",
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "Schedule",
    "TraceState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "constant",
    "cosine_decay",
    "freeze",
    "identity",
    "linear",
    "linear_warmup",
    "masked",
    "multi_steps",
    "multi_transform",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "set_to_zero",
    "sgd",
    "trace",
    "warmup_cosine_decay",
]
