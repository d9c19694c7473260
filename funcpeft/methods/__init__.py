"""Adapter methods. Each file implements :mod:`funcpeft.methods.base`'s protocol and registers itself."""

from __future__ import annotations

from funcpeft.methods import adalora, ia3, loha, lokr, lora, oft, trainable_tokens, vera
from funcpeft.methods.base import AdapterLayer, Method, method_for

__all__ = [
    "AdapterLayer", "Method", "adalora", "ia3", "loha", "lokr", "lora", "method_for", "oft", "trainable_tokens", "vera",
]  # fmt: skip
