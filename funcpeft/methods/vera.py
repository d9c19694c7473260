"""Vera (PEFT's ``vera``): being written; the config is a placeholder until the method lands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from funcpeft.config import AdapterConfig

__all__ = ["VeraConfig"]


@dataclass(frozen=True)
class VeraConfig(AdapterConfig):
    peft_type: ClassVar[str] = "VERA"
