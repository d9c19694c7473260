"""funcpeft's warning class (its own module, so every funcpeft module can import it without a cycle)."""

from __future__ import annotations

__all__ = ["FuncpeftWarning"]


class FuncpeftWarning(UserWarning):
    """Base class of the warnings funcpeft emits."""
