"""Adapter methods. Each method implements :mod:`funcpeft.methods.base`'s protocol and registers itself in its file
(LoRA's registration is in :mod:`funcpeft.methods.lora_method`, beside its layer construction)."""

from __future__ import annotations

from funcpeft.methods import adalora, ia3, loha, lokr, lora, lora_method, oft, trainable_tokens, vera
from funcpeft.methods.base import AdapterLayer, Method, method_for

__all__ = [
    "AdapterLayer", "Method", "adalora", "ia3", "loha", "lokr", "lora", "lora_method", "method_for", "oft",
    "trainable_tokens", "vera",
]  # fmt: skip
