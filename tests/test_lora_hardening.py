"""Hostile cases for LoRA itself: scaled embeddings whose scale is a Python number (BART, Pegasus, BioGPT, ...),
embeddings with ``max_norm``, and bases and adapters of different float dtypes, each against PEFT as the oracle
(the same weights copied in) and against ``fwd.merge``."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import funcpeft
from tests._models import oracle

peft = oracle("peft")
transformers = oracle("transformers")

_PEFT_NAMES = {
    "lora_A": "{}.lora_A.default.weight",
    "lora_B": "{}.lora_B.default.weight",
    "lora_B.bias": "{}.lora_B.default.bias",
    "lora_magnitude_vector": "{}.lora_magnitude_vector.default.weight",
    "lora_embedding_A": "{}.lora_embedding_A.default",
    "lora_embedding_B": "{}.lora_embedding_B.default",
}


class _EmbNet(nn.Module):
    def __init__(self, emb: nn.Module) -> None:
        super().__init__()
        self.emb = emb
        self.lin = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(self.emb(x))


class _Net(nn.Module):
    """One layer of each kind LoRA adapts (the forward runs the one the test targets)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.emb = nn.Embedding(30, 16, padding_idx=2)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.long:
            return self.emb(x)
        return self.lin(x) if x.dim() == 2 else self.conv(x)


def _ids() -> Tensor:
    ids = torch.randint(0, 30, (4, 5), generator=torch.Generator().manual_seed(1))
    ids[0, :2] = 1  # BART's padding index
    return ids


def _trained(params: funcpeft.Params, dtype: torch.dtype | None = None) -> funcpeft.Params:
    """Every leaf moved off its init (so no term is trivially zero), optionally cast to ``dtype``."""
    g = torch.Generator().manual_seed(3)
    out: funcpeft.Params = {}
    for path, entry in params.items():
        out[path] = {}
        for name, t in entry.items():
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
            moved = t.detach() * (1 + 0.2 * noise) if name == "lora_magnitude_vector" else t.detach() + 0.3 * noise
            out[path][name] = moved.to(dtype or t.dtype).requires_grad_(True)
    return out


def _into_peft(params: funcpeft.Params, model: nn.Module, kw: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    peft_model = peft.inject_adapter_in_model(peft.LoraConfig(**kw), copy.deepcopy(model))
    named = dict(peft_model.named_parameters())
    mapping = {(p, n): _PEFT_NAMES[n].format(p) for p, entry in params.items() for n in entry}
    for (path, name), peft_name in mapping.items():
        named[peft_name].data = params[path][name].detach().clone()
    return peft_model, {key: named[name] for key, name in mapping.items()}


# ----- scaled embeddings with a Python-number scale ------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_python_number_embed_scale_is_applied_as_peft(use_dora: bool) -> None:
    """BART's ``BartScaledWordEmbedding.embed_scale`` is a float (Gemma's a buffer): the adapted lookup is scaled by
    it too, as in PEFT and as the merged table is (funcpeft raised AttributeError: 'float' has no 'to')."""
    from transformers.models.bart.modeling_bart import BartScaledWordEmbedding

    torch.manual_seed(0)
    model = _EmbNet(BartScaledWordEmbedding(30, 16, padding_idx=1, embed_scale=4.0)).double()
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["emb"], "init_lora_weights": False, "use_dora": use_dora}
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(**kw), generator=torch.Generator().manual_seed(0))
    params = _trained(params)
    peft_model, leaves = _into_peft(params, model, kw)
    x = _ids()

    out, expected = fwd(params, x), peft_model(x)
    torch.testing.assert_close(out, expected)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    ours = torch.autograd.grad((out * weights).sum(), [params[p][n] for p, n in leaves])
    theirs = torch.autograd.grad((expected * weights).sum(), list(leaves.values()))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)

    merged = copy.deepcopy(model)
    merged.load_state_dict(fwd.merge(params))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), out.detach())
        # a mixed batch (the per-row embedding math) gives each row its own adapter's scaled update
        stacked = funcpeft.stack([params, _trained(params)])
        ids = torch.tensor([0, -1, 1, 0])
        mixed = fwd(stacked, x, adapter_ids=ids)
        torch.testing.assert_close(mixed[0], out[0].detach())
        torch.testing.assert_close(mixed[1], fwd(None, x[1:2])[0])


def test_trainable_tokens_on_a_python_number_embed_scale_match_peft() -> None:
    from transformers.models.bart.modeling_bart import BartScaledWordEmbedding

    torch.manual_seed(0)
    model = _EmbNet(BartScaledWordEmbedding(30, 16, padding_idx=1, embed_scale=4.0)).double()
    kw = {"target_modules": ["lin"], "trainable_token_indices": {"emb": [3, 7]}}
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(**kw), generator=torch.Generator().manual_seed(0))
    (path,) = [p for p, entry in params.items() if "trainable_tokens_delta" in entry]
    with torch.no_grad():
        params[path]["trainable_tokens_delta"].add_(1.0)
    peft_model = peft.inject_adapter_in_model(peft.LoraConfig(**kw), copy.deepcopy(model))
    named = dict(peft_model.named_parameters())
    named[f"{path}.token_adapter.trainable_tokens_delta.default"].data = params[path]["trainable_tokens_delta"].detach()
    for name in ("lora_A", "lora_B"):
        named[_PEFT_NAMES[name].format("lin")].data = params["lin"][name].detach()
    x = torch.tensor([[3, 7, 5, 1]])
    torch.testing.assert_close(fwd(params, x), peft_model(x))


# ----- embeddings with max_norm -----------------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_on_an_embedding_with_max_norm_is_refused(use_dora: bool) -> None:
    """``max_norm`` rewrites the looked-up rows in place: the adapter silently differed from PEFT (which renormalises
    lora_embedding_A in place) and from its own merge."""
    model = _EmbNet(nn.Embedding(30, 16, max_norm=1.0))
    before = copy.deepcopy(model.state_dict())
    config = funcpeft.LoraConfig(target_modules=["emb", "lin"], use_dora=use_dora)
    with pytest.raises(ValueError, match=r"'emb' has max_norm=1\.0.*exclude_modules"):
        funcpeft.adapt(model, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the rest of the model still adapts once the embedding is left out
    params, _ = funcpeft.adapt(model, funcpeft.LoraConfig(target_modules=["emb", "lin"], exclude_modules=["emb"]))
    assert list(params) == ["lin"]


# ----- bases and adapters of different dtypes ---------------------------------------------------------------------
_KINDS = {
    "linear": (["lin"], lambda: torch.randn(3, 16, generator=torch.Generator().manual_seed(4))),
    "embedding": (["emb"], lambda: torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(4))),
    "conv": (["conv"], lambda: torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(4))),
}


@pytest.mark.parametrize(
    ("base", "adapter"),
    [
        (torch.bfloat16, None),  # funcpeft's (and PEFT's) default: float32 adapters on a half-precision base
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
    ],
    ids=["bf16-default", "fp16-bf16", "fp32-fp64", "fp64-fp32"],
)
@pytest.mark.parametrize("kind", list(_KINDS))
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_an_adapter_of_another_dtype_than_the_base_matches_peft(
    base: torch.dtype, adapter: torch.dtype | None, kind: str, use_dora: bool
) -> None:
    targets, inputs = _KINDS[kind]
    torch.manual_seed(0)
    model = _Net().to(base)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": False, "use_dora": use_dora}
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(**kw), generator=torch.Generator().manual_seed(0))
    params = _trained(params, adapter)
    peft_model, leaves = _into_peft(params, model, kw)
    x = inputs()
    x = x.to(base) if x.is_floating_point() else x
    half = torch.finfo(base).bits == 16 or (adapter is not None and torch.finfo(adapter).bits == 16)
    tol = {"atol": 3e-2, "rtol": 3e-2} if half else {"atol": 1e-5, "rtol": 1e-4}
    for grad in (False, True):  # without gradients a layer may fold the adapter into the weight for the call
        with torch.set_grad_enabled(grad):
            out, expected = fwd(params, x), peft_model(x)
        assert out.dtype == expected.dtype == base
        torch.testing.assert_close(out, expected, **tol)
    ours = torch.autograd.grad(out.float().sum(), [params[p][n] for p, n in leaves])
    theirs = torch.autograd.grad(expected.float().sum(), list(leaves.values()))
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    merged = fwd.merge(params)
    assert all(merged[k].dtype == v.dtype for k, v in model.state_dict().items())
