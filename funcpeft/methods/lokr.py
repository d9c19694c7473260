"""LoKr (PEFT's ``lokr``): being written; the config is a placeholder until the method lands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from funcpeft.config import AdapterConfig

__all__ = ["LoKrConfig"]


@dataclass(frozen=True)
class LoKrConfig(AdapterConfig):
    peft_type: ClassVar[str] = "LOKR"
