"""LoHa (PEFT's ``loha``): being written; the config is a placeholder until the method lands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from funcpeft.config import AdapterConfig

__all__ = ["LoHaConfig"]


@dataclass(frozen=True)
class LoHaConfig(AdapterConfig):
    peft_type: ClassVar[str] = "LOHA"
