"""OFT (PEFT's ``oft``): being written; the config is a placeholder until the method lands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from funcpeft.config import AdapterConfig

__all__ = ["OFTConfig"]


@dataclass(frozen=True)
class OFTConfig(AdapterConfig):
    peft_type: ClassVar[str] = "OFT"
