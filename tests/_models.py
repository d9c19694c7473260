"""Tiny models used across the tests: custom modules for every layer kind, and transformers models built from
configs with random weights (nothing is downloaded)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch import nn

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def oracle(name: str):
    """Import an oracle package (peft, transformers): skip locally when missing, fail in CI."""
    if IN_CI:
        return importlib.import_module(name)
    return pytest.importorskip(name)


class MLP(nn.Module):
    def __init__(self, d_in: int = 10, d_hidden: int = 20, d_out: int = 4, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden, bias=bias)
        self.drop = nn.Dropout(0.0)
        self.lin1 = nn.Linear(d_hidden, d_hidden, bias=bias)
        self.head = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(self.drop(torch.relu(self.lin0(x))))))


class EmbNet(nn.Module):
    def __init__(self, vocab: int = 20, dim: int = 8, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.lin = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(self.emb(ids))))


class ConvNet(nn.Module):
    """A conv net with one conv of each dimensionality; ``conv_kwargs`` go to every conv."""

    def __init__(self, channels: int = 4, **conv_kwargs) -> None:
        super().__init__()
        kw = {"kernel_size": 3, "padding": 1, **conv_kwargs}
        self.c1 = nn.Conv1d(channels, channels * 2, **kw)
        self.c2 = nn.Conv2d(channels, channels * 2, **kw)
        self.c3 = nn.Conv3d(channels, channels * 2, **kw)
        self.head = nn.Linear(channels * 6, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        pooled = [self.c1(x1).mean(-1), self.c2(x2).mean((-1, -2)), self.c3(x3).mean((-1, -2, -3))]
        return self.head(torch.cat(pooled, dim=-1))


def conv_inputs(channels: int = 4, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, channels, 9, generator=g),
        torch.randn(batch, channels, 7, 6, generator=g),
        torch.randn(batch, channels, 5, 4, 6, generator=g),
    )


def tiny_gpt2(n_layer: int = 2, n_embd: int = 32, vocab: int = 100, seed: int = 0) -> nn.Module:
    transformers = oracle("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=2,
        vocab_size=vocab,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama(n_layer: int = 2, hidden: int = 32, vocab: int = 100, seed: int = 0) -> nn.Module:
    transformers = oracle("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        num_hidden_layers=n_layer,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=vocab,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert(n_layer: int = 2, hidden: int = 32, vocab: int = 100, seed: int = 0) -> nn.Module:
    transformers = oracle("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        num_hidden_layers=n_layer,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config).eval()


def tiny_t5() -> nn.Module:
    """A 2-layer T5 encoder-decoder (vocab 100, no dropout) for generation tests."""
    transformers = oracle("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).eval()


def token_ids(batch: int = 2, length: int = 8, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
