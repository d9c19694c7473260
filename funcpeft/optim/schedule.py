"""Learning-rate schedules: plain functions ``step -> float`` (optax's ``schedule.py``).

Step ``n`` counts updates from 0: the first update uses ``schedule(0)``, as optax and
``torch.optim.lr_scheduler.LambdaLR`` (``scheduler.step()`` after each ``optimizer.step()``). A schedule is
accepted wherever an optimizer takes ``lr``; any callable ``int -> float`` works, not only these.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["Schedule", "constant", "cosine_decay", "linear", "linear_warmup", "warmup_cosine_decay"]

Schedule = Callable[[int], float]


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} ({value!r}).")
    return float(value)


def _steps(name: str, value: object, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    return value


def constant(value: float) -> Schedule:
    """``value`` at every step."""
    value = _number("value", value)
    return lambda step: value


def linear(init: float, end: float, transition_steps: int) -> Schedule:
    """From ``init`` at step 0 linearly to ``end`` at ``transition_steps``, then ``end`` (optax's ``linear_schedule``).

    ``transition_steps=0`` is ``end`` from the start.
    """
    init, end = _number("init", init), _number("end", end)
    n = _steps("transition_steps", transition_steps)

    def schedule(step: int) -> float:
        if step >= n:
            return end
        return init + (end - init) * step / n

    return schedule


def linear_warmup(peak: float, warmup_steps: int, init: float = 0.0) -> Schedule:
    """Linear warm-up from ``init`` to ``peak`` over ``warmup_steps``, then constant ``peak``.

    With ``init=0`` this is ``peak`` times transformers' ``get_constant_schedule_with_warmup`` (step 0 has lr 0).
    """
    return linear(init, peak, warmup_steps)


def cosine_decay(init: float, decay_steps: int, end: float = 0.0) -> Schedule:
    """Half a cosine from ``init`` at step 0 to ``end`` at ``decay_steps``, then ``end`` (optax's
    ``cosine_decay_schedule``, with ``end`` in place of ``alpha * init``; SGDR without restarts, Loshchilov &
    Hutter 2017)."""
    init, end = _number("init", init), _number("end", end)
    n = _steps("decay_steps", decay_steps, low=1)

    def schedule(step: int) -> float:
        return end + (init - end) * 0.5 * (1.0 + math.cos(math.pi * min(step, n) / n))

    return schedule


def warmup_cosine_decay(
    peak: float, warmup_steps: int, decay_steps: int, end: float = 0.0, *, init: float = 0.0
) -> Schedule:
    """Linear warm-up from ``init`` to ``peak``, then cosine decay to ``end`` (optax's
    ``warmup_cosine_decay_schedule``).

    Args:
        peak: the learning rate reached at the end of the warm-up.
        warmup_steps: length of the warm-up.
        decay_steps: the total length of the schedule, warm-up included (optax's convention); from then on
            the value is ``end``.
        end: the final learning rate.
        init: the learning rate at step 0.

    With ``init=end=0`` this is ``peak`` times transformers' ``get_cosine_schedule_with_warmup(opt,
    warmup_steps, decay_steps)``.
    """
    warmup_steps = _steps("warmup_steps", warmup_steps)
    if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps <= warmup_steps:
        raise ValueError(
            f"`decay_steps` is the total length of the schedule, warm-up included, so it must be an int > "
            f"warmup_steps={warmup_steps}; got {decay_steps!r}."
        )
    warmup = linear(init, peak, warmup_steps)
    decay = cosine_decay(peak, decay_steps - warmup_steps, end)
    return lambda step: warmup(step) if step < warmup_steps else decay(step - warmup_steps)
