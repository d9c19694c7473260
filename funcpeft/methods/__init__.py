"""Adapter methods. Each file implements :mod:`funcpeft.methods.base`'s protocol and registers itself."""

from __future__ import annotations

from funcpeft.methods import lora
from funcpeft.methods.base import AdapterLayer, Method, method_for

__all__ = ["AdapterLayer", "Method", "lora", "method_for"]
