"""Checks shared by the adapter configs (:mod:`funcpeft.config`): types, numbers, regexes and task types.

Every check raises a ``TypeError``/``ValueError`` that names the field, shows the bad value and says how to fix
it. Two checks exist because PEFT only fails late, or not at all:

- a regex is compiled in the form PEFT matches it with, at construction, so an invalid one is a ``ValueError``
  naming the field and the pattern instead of a bare ``re.error`` from deep inside ``adapt`` (or, for
  ``funcpeft inspect``, never);
- a number is stored as a plain Python ``int``/``float``. ``np.float32(8)`` is accepted as the number it is and
  kept as ``8.0``: the same value in another representation, so the config saves to JSON and compares and
  prints like one built from Python numbers. A value a float cannot hold exactly (``Fraction(1, 3)``) is
  refused rather than rounded.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "TASK_TYPES",
    "check_bool",
    "check_finite",
    "check_names",
    "check_regex",
    "check_task_type",
    "is_int",
    "is_number",
    "plain_number",
    "plain_numbers",
]

# peft.TaskType's values (peft.utils.peft_types), which PeftConfig.__post_init__ requires of `task_type`.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__}).")


def check_finite(name: str, value: float) -> None:
    """Refuse NaN and infinities, which would turn every adapted output into NaN/inf without an error."""
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")


def plain_number(name: str, value: Any) -> Any:
    """``value`` as a plain ``int``/``float`` if it is a number of another type (numpy's scalars), else as is.

    Non-numbers and bools are returned unchanged, for the field's own check to refuse.

    Raises:
        TypeError: a float cannot hold ``value`` exactly (e.g. a ``Fraction`` or an ``np.longdouble``).
    """
    if type(value) in (int, float) or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    plain = float(value)
    if plain == value or (math.isnan(plain) and value != value):
        return plain
    raise TypeError(
        f"`{name}` is {value!r} ({type(value).__name__}), which a Python float cannot hold exactly; pass it as a "
        "float or int."
    )


def plain_numbers(name: str, values: Any) -> Any:
    """:func:`plain_number` on each value of a dict or list field; the same object if nothing changes."""
    if isinstance(values, Mapping):
        converted = {k: plain_number(f"{name}[{k!r}]", v) for k, v in values.items()}
        changed = any(type(converted[k]) is not type(v) for k, v in values.items())
        return converted if changed else values
    if isinstance(values, (list, tuple)):
        items = [plain_number(f"{name}[{i}]", v) for i, v in enumerate(values)]
        changed = any(type(a) is not type(b) for a, b in zip(items, values, strict=True))
        return type(values)(items) if changed else values
    return plain_number(name, values)


def check_names(name: str, value: Any, *, allow_str: bool) -> None:
    """Validate a module-name spec: None, a regex string (if allowed) or a collection of strings."""
    if value is None or (allow_str and isinstance(value, str)):
        return
    if isinstance(value, str):
        raise TypeError(f"`{name}` must be a list of module names, got the string {value!r}; use [{value!r}].")
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(
            f"`{name}` must be {'a regex string, ' if allow_str else ''}a list of module names or None, "
            f"got {value!r} ({type(value).__name__})."
        )
    for entry in value:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"`{name}` entries must be non-empty strings, got {entry!r} in {value!r}.")


def check_regex(name: str, pattern: str, used_as: str | None = None, *, kind: str = "") -> None:
    """Compile ``pattern`` as PEFT uses it (``used_as``, a format string with ``{}`` for it; default: as is).

    ``kind`` says which part of the field the pattern is (``"key "``, ``"entry "``) in the message.

    Raises:
        ValueError: it does not compile; the message names the field, the pattern and the regex error.
    """
    error = _regex_error(pattern if used_as is None else used_as.format(pattern))
    if error is None:
        return
    error = _regex_error(pattern) or error  # the position in the user's own pattern, where it has one
    raise ValueError(
        f"`{name}` {kind}{pattern!r} is not a valid regular expression ({error}); PEFT matches it as a regex, so fix "
        "the pattern or escape its special characters (re.escape)."
    )


def _regex_error(pattern: str) -> re.error | None:
    try:
        re.compile(pattern)
    except re.error as err:
        return err
    return None


def check_task_type(value: Any) -> None:
    """PEFT's rule: None or one of ``peft.TaskType``'s values, spelled exactly."""
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"`task_type` must be a string such as 'CAUSAL_LM' or None, got {value!r}.")
    if value not in TASK_TYPES:
        close = difflib.get_close_matches(str(value).upper(), TASK_TYPES, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(
            f"`task_type` must be one of PEFT's task types ({', '.join(TASK_TYPES)}) or None, got {value!r}"
            f"{hint} (PEFT refuses any other value too.)"
        )
