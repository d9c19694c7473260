"""Numerical parity with Hugging Face PEFT: the same LoRA weights give the same outputs and gradients.

Each case builds one model twice, adapts one copy with ``funcpeft.adapt`` and injects PEFT's LoRA into the
other with the same config kwargs, copies every funcpeft tensor into the matching PEFT parameter (a PEFT
trainable parameter left uncovered, or a funcpeft tensor without a PEFT counterpart, fails the test), then
compares the outputs and the gradients of one scalar loss with respect to every adapter tensor.

The matrix runs every model (Linear MLP, Embedding with ``padding_idx``, Conv1d/2d/3d with stride and padding,
grouped convs, GPT-2 ``Conv1D``, Llama, BERT) with every option (rsLoRA, DoRA, ``lora_bias``, trainable biases,
``modules_to_save``, rank/alpha patterns, ``"all-linear"``, dropout in eval and train mode). Models are float64
so the comparison is tight. Train-mode dropout is compared with the global RNG seeded right before each
forward: both libraries draw one dropout mask per adapted (non-embedding) layer, on the layer's input, in
module order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import funcpeft
from tests._models import MLP, ConvNet, EmbNet, conv_inputs, oracle, tiny_bert, tiny_gpt2, tiny_llama, token_ids

peft = oracle("peft")

pytestmark = pytest.mark.filterwarnings(
    "ignore:LoRA adapter added to ConvNd layer with groups",  # PEFT: merging grouped convs is unsupported
    "ignore:`lora_bias=True` was passed but the targeted layer",  # PEFT: Llama's Linears have no bias
)

R = 4  # even, so grouped convs (groups=2) accept it; rank_pattern values are even too
ALPHA = 6
DROPOUT = 0.3


@dataclass(frozen=True)
class Case:
    """A model family: how to build it and its inputs, and the config kwargs that fit it."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    targets: list[str]
    save: str  # a module for `modules_to_save`
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    embeddings: tuple[str, ...] = ()  # targets that are embeddings (no `lora_bias` on them)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra forward kwargs
    config: dict[str, Any] = field(default_factory=dict)  # extra config kwargs (fan_in_fan_out)
    dora: bool = True


def _ids(vocab: int = 100) -> tuple[Tensor]:
    ids = token_ids(batch=2, length=6, vocab=vocab)
    ids[0, :2] = 0  # the padding index of EmbNet
    return (ids,)


def _double(t: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(x.double() for x in t)


CASES: dict[str, Case] = {
    "mlp": Case(
        build=lambda: MLP(),
        inputs=lambda: (torch.randn(3, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64),),
        targets=["lin0", "lin1"],
        save="head",
        rank_pattern={"lin1": 2},
        alpha_pattern={"lin0": 3.0},
    ),
    "embedding": Case(
        build=lambda: EmbNet(padding_idx=0),
        inputs=lambda: _ids(vocab=20),
        targets=["emb", "lin"],
        embeddings=("emb",),
        save="head",
        rank_pattern={"emb": 2},
        alpha_pattern={"lin": 2.0},
    ),
    "conv": Case(
        build=lambda: ConvNet(stride=2),
        inputs=lambda: _double(conv_inputs()),
        targets=["c1", "c2", "c3"],
        save="head",
        rank_pattern={"c2": 2},
        alpha_pattern={"c3": 1.5},
    ),
    "conv_groups": Case(
        build=lambda: ConvNet(stride=2, groups=2),
        inputs=lambda: _double(conv_inputs()),
        targets=["c1", "c2", "c3"],
        save="head",
        rank_pattern={"c2": 2, "c3": 6},
        alpha_pattern={"c1": 1.5},
        dora=False,  # DoRA on grouped convs: tests/test_dora_grouped.py (PEFT's norm is not the grouped delta)
    ),
    "gpt2": Case(
        build=lambda: tiny_gpt2(n_embd=16, vocab=50),
        inputs=lambda: _ids(vocab=50),
        targets=["c_attn", "c_proj", "c_fc", "wpe"],
        embeddings=("wpe",),
        save="ln_f",
        rank_pattern={r"h\.0\.attn\.c_attn": 2},
        alpha_pattern={"c_fc": 3.0},
        kwargs={"use_cache": False},
        config={"fan_in_fan_out": True},
    ),
    "llama": Case(
        build=lambda: tiny_llama(hidden=16, vocab=50),
        inputs=lambda: _ids(vocab=50),
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
        embeddings=("embed_tokens",),
        save="lm_head",
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 2.0},
        kwargs={"use_cache": False},
    ),
    "bert": Case(
        build=lambda: tiny_bert(hidden=16, vocab=50),
        inputs=lambda: _ids(vocab=50),
        targets=["query", "key", "value", "dense", "word_embeddings"],
        embeddings=("word_embeddings",),
        save="pooler",
        rank_pattern={"query": 2},
        alpha_pattern={r"layer\.0\.output\.dense": 3.0},
    ),
}

# option -> (config kwargs, train mode)
OPTIONS: dict[str, tuple[dict[str, Any], bool]] = {
    "plain": ({}, False),
    "rslora": ({"use_rslora": True}, False),
    "dora": ({"use_dora": True}, False),
    "lora_bias": ({"lora_bias": True}, False),
    "bias_all": ({"bias": "all"}, False),
    "bias_lora_only": ({"bias": "lora_only"}, False),
    "modules_to_save": ({}, False),
    "patterns": ({}, False),
    "all_linear": ({"target_modules": "all-linear"}, False),
    "dropout_eval": ({"lora_dropout": DROPOUT}, False),
    "dropout_train": ({"lora_dropout": DROPOUT}, True),
    "dora_dropout_train": ({"use_dora": True, "lora_dropout": DROPOUT}, True),
}


def _config_kwargs(case: Case, option: str) -> dict[str, Any]:
    extra, _ = OPTIONS[option]
    kw: dict[str, Any] = {"r": R, "lora_alpha": ALPHA, "init_lora_weights": False, "target_modules": case.targets}
    kw.update(case.config)
    kw.update(extra)
    if option == "lora_bias":
        kw["target_modules"] = [t for t in case.targets if t not in case.embeddings]
    if option == "modules_to_save":
        kw["modules_to_save"] = [case.save]
    if option == "patterns":
        kw["rank_pattern"] = case.rank_pattern
        kw["alpha_pattern"] = case.alpha_pattern
    return kw


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Every op here is tiny: handing each to two intra-op threads costs more than it saves (10x on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params_list() -> list[Any]:
    out = []
    for name, case in CASES.items():
        for option, (extra, _) in OPTIONS.items():
            if extra.get("use_dora") and not case.dora:
                continue
            out.append(pytest.param(name, option, id=f"{name}-{option}"))
    return out


# ----- the funcpeft -> PEFT mapping ---------------------------------------------------------------------------
_ADAPTER_NAMES = {
    "lora_A": "{}.lora_A.default.weight",
    "lora_B": "{}.lora_B.default.weight",
    "lora_B.bias": "{}.lora_B.default.bias",
    "lora_magnitude_vector": "{}.lora_magnitude_vector.default.weight",
    "lora_embedding_A": "{}.lora_embedding_A.default",
    "lora_embedding_B": "{}.lora_embedding_B.default",
}


def _peft_names(params: funcpeft.Params, peft_model: nn.Module) -> dict[tuple[str, str], str]:
    """``{(module_path, tensor_name): PEFT parameter name}``, covering exactly PEFT's trainable parameters."""
    named = dict(peft_model.named_parameters())
    mapping: dict[tuple[str, str], str] = {}
    for path, entry in params.items():
        for name in entry:
            if name in _ADAPTER_NAMES:
                candidates = [_ADAPTER_NAMES[name].format(path)]
            else:  # a trainable copy: of a modules_to_save module, of an adapted layer's bias, or of another bias
                candidates = [f"{path}.modules_to_save.default.{name}", f"{path}.base_layer.{name}", f"{path}.{name}"]
            found = [c for c in candidates if c in named]
            assert len(found) == 1, f"funcpeft's {path!r}/{name!r} has no single PEFT counterpart among {candidates}"
            mapping[(path, name)] = found[0]
    trainable = {n for n, p in named.items() if p.requires_grad}
    covered = set(mapping.values())
    assert not trainable - covered, f"PEFT trains parameters funcpeft has no tensor for: {sorted(trainable - covered)}"
    assert not covered - trainable, f"funcpeft trains tensors PEFT freezes: {sorted(covered - trainable)}"
    return mapping


def _perturb(params: funcpeft.Params, generator: torch.Generator) -> funcpeft.Params:
    """Move copies and DoRA magnitudes off their initial values (which equal the base), so they matter."""
    out: funcpeft.Params = {}
    with torch.no_grad():
        for path, entry in params.items():
            out[path] = {}
            for name, t in entry.items():
                noise = torch.randn(t.shape, generator=generator, dtype=t.dtype)
                if name == "lora_magnitude_vector":
                    t = t * (1 + 0.2 * noise)
                elif name not in _ADAPTER_NAMES:
                    t = t + 0.1 * noise
                out[path][name] = t.detach().clone().requires_grad_(True)
    return out


def _flat(out: Any) -> Tensor:
    """A model's output as one tensor (every tensor of a transformers ModelOutput, e.g. BERT's pooler output)."""
    if isinstance(out, Tensor):
        return out
    return torch.cat([t.flatten() for t in out.to_tuple() if isinstance(t, Tensor)])


def _run(call: Callable[[], Any], seed: int) -> Tensor:
    torch.manual_seed(seed)  # the same dropout masks on both sides (only drawn in train mode)
    return _flat(call())


# ----- the test --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_name", "option"), _params_list())
def test_outputs_and_gradients_match_peft(model_name: str, option: str) -> None:
    case = CASES[model_name]
    kw = _config_kwargs(case, option)
    train = OPTIONS[option][1]

    model = case.build().double().train(train)
    peft_model = copy.deepcopy(model)
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(**kw), generator=torch.Generator().manual_seed(0))
    params = _perturb(params, torch.Generator().manual_seed(1))
    peft_model = peft.inject_adapter_in_model(peft.LoraConfig(**kw), peft_model).double().train(train)

    mapping = _peft_names(params, peft_model)
    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for (path, name), peft_name in mapping.items():
            ours, theirs = params[path][name], named[peft_name]
            assert ours.shape == theirs.shape, f"{path}/{name}: funcpeft {ours.shape}, PEFT {theirs.shape}"
            assert ours.dtype == theirs.dtype, f"{path}/{name}: funcpeft {ours.dtype}, PEFT {theirs.dtype}"
            theirs.copy_(ours)

    args = case.inputs()
    out = _run(lambda: fwd(params, *args, **case.kwargs), seed=7)
    expected = _run(lambda: peft_model(*args, **case.kwargs), seed=7)
    torch.testing.assert_close(out, expected)
    base = _run(lambda: fwd(None, *args, **case.kwargs), seed=7)
    assert not torch.allclose(out, base), "the adapter is a no-op: the comparison would prove nothing"
    if train:  # dropout really drew masks: the train-mode output differs from the dropout-free one
        with torch.no_grad():
            model.eval()
            assert not torch.allclose(out, _flat(fwd(params, *args, **case.kwargs)))
            model.train()

    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    leaves = {key: params[key[0]][key[1]] for key in mapping}
    grads = torch.autograd.grad((out * weights).sum(), list(leaves.values()), allow_unused=True)
    (expected * weights).sum().backward()
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the adapter"
    for (key, leaf), grad in zip(leaves.items(), grads, strict=True):
        peft_grad = named[mapping[key]].grad  # None (like funcpeft's) where the tensor does not reach the loss
        torch.testing.assert_close(
            torch.zeros_like(leaf) if grad is None else grad,
            torch.zeros_like(leaf) if peft_grad is None else peft_grad,
            msg=lambda m, key=key: f"gradient of {key}: {m}",
        )
