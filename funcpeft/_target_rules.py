"""The building blocks of PEFT's targeting rules, which :mod:`funcpeft._targeting` combines.

PEFT's per-architecture default targets (:data:`DEFAULT_LORA_TARGETS`), what ``"all-linear"`` expands to, how a
module path matches a list entry (exactly or as a ``.``-suffix) or a regex (full match), which layer index a path
has (``layers_pattern``), and the ``rank_pattern``/``alpha_pattern`` lookup (:func:`pattern_value`). Re-exported
by :mod:`funcpeft._targeting`, whose docstring states the rules.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping

from torch import nn

from funcpeft._layers import is_gpt2_conv1d
from funcpeft.config import AdapterConfig

__all__ = ["DEFAULT_LORA_TARGETS", "pattern_value"]

# PEFT's per-architecture default LoRA targets (peft.utils.constants), keyed by `model.config.model_type`.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "vit": ["query", "value"],
}

_SEQ_CLS_HEADS = ("classifier", "score")


def _suffix_match(path: str, names: Iterable[str]) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def _matches(spec: str | Iterable[str], path: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return _suffix_match(path, spec)


def _similar(name: str, paths: list[str]) -> str:
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths} | set(paths))
    close = difflib.get_close_matches(name, leaves, n=5, cutoff=0.5)
    return ", ".join(close) if close else "none (module names look like: " + ", ".join(paths[:5]) + ")"


def _layer_index(path: str, layers_pattern: str | list[str] | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        head = getter()
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


def _all_linear(model: nn.Module, config: AdapterConfig) -> list[str]:
    head = _output_head(model)
    excluded = {id(head)} if head is not None else set()
    if head is None and getattr(config, "task_type", None) == "SEQ_CLS":
        for name in _SEQ_CLS_HEADS:
            if isinstance(getattr(model, name, None), nn.Module):
                excluded.add(id(getattr(model, name)))
                break
    return [
        path
        for path, module in model.named_modules()
        if (isinstance(module, nn.Linear) or is_gpt2_conv1d(module)) and id(module) not in excluded
    ]


def _pattern_match(key: str, path: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", path) is not None


def pattern_value(pattern: Mapping[str, float], path: str, default: float) -> float:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the end of ``path``."""
    for key, value in pattern.items():
        if _pattern_match(key, path):
            return value
    return default
