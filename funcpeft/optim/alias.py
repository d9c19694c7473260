"""Optimizers as chains of the building blocks in :mod:`funcpeft.optim.transform` (optax's ``alias.py``).

Each is numerically ``torch.optim``'s optimizer of the same name with the same defaults (up to float rounding:
the same formulas, evaluated in a slightly different order), so a torch recipe carries over unchanged.
"""

from __future__ import annotations

from funcpeft.optim.schedule import Schedule
from funcpeft.optim.transform import (
    GradientTransformation,
    add_decayed_weights,
    chain,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)

__all__ = ["adam", "adamw", "sgd"]


def sgd(
    lr: float | Schedule, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0
) -> GradientTransformation:
    """``torch.optim.SGD`` (``dampening=0``): ``chain(add_decayed_weights, trace, scale_by_learning_rate)``.

    Args:
        lr: learning rate, or a schedule ``step -> lr`` (step 0 first).
        momentum: momentum factor; torch's buffer convention (``buf = momentum * buf + g``, first ``buf = g``).
        nesterov: Nesterov momentum as torch (``g + momentum * buf``); needs ``momentum > 0``.
        weight_decay: L2 penalty added to the gradient (``g + weight_decay * p``).

    Returns:
        The transformation; its ``update`` needs ``params`` when ``weight_decay > 0``.

    Raises:
        ValueError: ``nesterov=True`` without momentum (as torch), or a negative hyper-parameter.
    """
    if nesterov and not momentum:
        raise ValueError(f"`nesterov=True` needs `momentum > 0` (as torch.optim.SGD), got momentum={momentum!r}.")
    steps = [add_decayed_weights(weight_decay)] if weight_decay else []
    if momentum:
        steps.append(trace(momentum, nesterov=nesterov))
    return chain(*steps, scale_by_learning_rate(lr))


def adam(
    lr: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
) -> GradientTransformation:
    """``torch.optim.Adam``: ``chain(add_decayed_weights, scale_by_adam, scale_by_learning_rate)``.

    Args:
        lr: learning rate, or a schedule ``step -> lr`` (step 0 first).
        b1, b2: torch's ``betas``.
        eps: added to the bias-corrected ``sqrt(v)``.
        weight_decay: L2 penalty added to the gradient before the moments, as torch's ``Adam`` (not decoupled:
            use :func:`adamw` for that).

    Returns:
        The transformation; its ``update`` needs ``params`` when ``weight_decay > 0``.
    """
    steps = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(*steps, scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr))


def adamw(
    lr: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01
) -> GradientTransformation:
    """``torch.optim.AdamW`` (Loshchilov & Hutter 2019): ``chain(scale_by_adam, add_decayed_weights,
    scale_by_learning_rate)``.

    The decay is decoupled and scaled by the learning rate, ``p -= lr * weight_decay * p``, as torch and optax.

    Args:
        lr: learning rate, or a schedule ``step -> lr`` (step 0 first); the decay follows the schedule too.
        b1, b2: torch's ``betas``.
        eps: added to the bias-corrected ``sqrt(v)``.
        weight_decay: decoupled decay factor (torch's default 0.01).

    Returns:
        The transformation; its ``update`` needs ``params`` when ``weight_decay > 0``.
    """
    steps = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(scale_by_adam(b1, b2, eps), *steps, scale_by_learning_rate(lr))
