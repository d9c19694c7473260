"""LoRA's ``trainable_token_indices``: every refusal names the module, the bad value and the fix (PEFT 0.21.2 refuses
these too, or silently does something else, as each message says)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _models import EmbNet, oracle, tiny_gpt2, tiny_llama
from test_lora_tokens import IDS, TOKENS, _ids, _setup
from torch import nn

import funcpeft as fp

peft = oracle("peft")


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ([1, 1], ValueError, r"lists \[1\] more than once"),
        ([-2], ValueError, "negative"),
        ([], ValueError, "empty"),
        ({}, ValueError, "empty dict"),
        ("1,2", TypeError, "must be a list"),
        ([1.5], TypeError, "must be a list"),
        ({"embed_tokens": [3, 3]}, ValueError, r"\['embed_tokens'\]"),
    ],
)
def test_config_refuses_bad_indices(value: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        fp.LoraConfig(target_modules=["q_proj"], trainable_token_indices=value)


def _refused(model: nn.Module, match: str, **kw: Any) -> None:
    kw.setdefault("target_modules", ["q_proj"])
    with pytest.raises(ValueError, match=match):
        fp.adapt(model, fp.LoraConfig(**kw))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_adapt_refuses_what_it_cannot_do() -> None:
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    out_of_range = r"\[100, 250\] for 'model.embed_tokens' are out of range: it has 100 rows"
    _refused(llama, out_of_range, trainable_token_indices=[1, 100, 250])
    _refused(llama, "'wte' matches no module", trainable_token_indices={"wte": [1]})
    _refused(llama, "a LlamaRMSNorm", trainable_token_indices={"norm": [1]})
    _refused(llama, "both a LoRA target and selected", target_modules=["q_proj", "embed_tokens"],
             trainable_token_indices=[1])  # fmt: skip
    _refused(llama, "already trained in full", modules_to_save=["embed_tokens"], trainable_token_indices=[1])
    _refused(gpt2, "'lm_head' shares its weight with the input embedding 'transformer.wte'",
             target_modules=["c_attn", "lm_head"], trainable_token_indices=[1])  # fmt: skip
    renormed = EmbNet()
    renormed.emb.max_norm = 1.0
    _refused(renormed, "max_norm=1.0", target_modules=["lin"], trainable_token_indices={"emb": [1]})
    with pytest.raises(ValueError, match="heterogeneous stacks do not carry trainable tokens"):
        fp.adapt(llama, [fp.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1])] * 2)
    with pytest.raises(ValueError, match="inject_adapter_in_model does not support `trainable_token_indices`"):
        fp.inject_adapter_in_model(fp.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1]), llama)
    with pytest.raises(ValueError, match="AdaLoRA does not support `trainable_token_indices`"):
        fp.AdaLoraConfig(target_modules=["q_proj"], total_step=10, trainable_token_indices=[1])
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in llama.modules())


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_wrong_rows_are_refused_by_fwd_and_save(tmp_path: Path) -> None:
    _, config, params, fwd, _ = _setup(tiny_llama, ["q_proj"])
    bad = {**params, "model.embed_tokens": {TOKENS: torch.zeros(len(IDS) + 1, 32, dtype=torch.double)}}
    with pytest.raises(ValueError, match=r"'model.embed_tokens'.*shape \(5, 32\)"):
        fwd(bad, _ids())
    with pytest.raises(ValueError, match="has 5 rows, but the config lists"):
        fp.save(tmp_path, bad, config)


def test_list_form_on_a_model_without_input_embeddings_asks_for_the_dict() -> None:
    with pytest.raises(ValueError, match=r"pass a dict \{embedding_module_name: \[indices\]\}"):
        fp.adapt(EmbNet(), fp.LoraConfig(target_modules=["lin"], trainable_token_indices=[1]))
