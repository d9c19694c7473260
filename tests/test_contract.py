"""The method contract, over every layer kind and option (PEFT's ``test_custom_models.py`` matrix idea):

- a fresh default adapter gives exactly the base output;
- the adapted forward equals the base model with the adapter folded into its weights (``fwd.merge``);
- gradients reach adapter leaves only, and every adapter leaf gets one;
- vmap over three adapters equals a loop over them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _models import MLP, ConvNet, EmbNet, conv_inputs, oracle
from torch import nn

import funcpeft as fp


class GPT2Style(nn.Module):
    """Two transformers ``Conv1D`` layers (weight stored (in, out)) around a GELU, and a head."""

    def __init__(self) -> None:
        super().__init__()
        conv1d = oracle("transformers").pytorch_utils.Conv1D
        self.c_fc = conv1d(16, 8)
        self.c_proj = conv1d(8, 16)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c_proj(torch.nn.functional.gelu(self.c_fc(x))))


@dataclass
class Case:
    name: str
    model: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    config: dict[str, Any] = field(default_factory=dict)
    config_cls: type = fp.LoraConfig  # the method under test
    mergeable: bool = True  # LoRA on a grouped conv mixes groups: no grouped weight computes it
    exact_identity: bool = True  # PiSSA/OLoRA's fresh W + s (B0 A0 - B0 A0) is the base up to rounding (as PEFT's)

    def random_init(self) -> dict[str, Any]:
        """The config field that makes a fresh adapter random rather than the identity."""
        if self.config_cls is fp.IA3Config:
            return {"init_ia3_weights": False}
        if self.config_cls is fp.TrainableTokensConfig:
            return {"init_weights": False}
        if str(self.config.get("init_lora_weights")).startswith(("pissa", "olora")):
            return {}  # the initial factors ride along frozen; perturbing B and A (and them) moves the adapter
        return {"init_lora_weights": False}


def _mlp_in() -> tuple[torch.Tensor, ...]:
    return (torch.randn(3, 10, generator=torch.Generator().manual_seed(1)),)


def _ids() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1)),)


def _gpt2_in() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1)),)


LINEAR = ["lin0", "lin1"]
CONVS = ["c1", "c2", "c3"]
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("plain", {}),
    ("rslora", {"use_rslora": True, "lora_alpha": 16}),
    ("dora", {"use_dora": True}),
    ("lora_bias", {"lora_bias": True}),
    ("bias_all", {"bias": "all"}),
    ("bias_lora_only", {"bias": "lora_only"}),
    ("modules_to_save", {"modules_to_save": ["head"]}),
    ("patterns", {"rank_pattern": {"lin1|c_proj": 2}, "alpha_pattern": {"lin0|c_fc|c2": 3}}),  # keys match path ends
    ("dropout", {"lora_dropout": 0.3}),
]

CASES: list[Case] = []
for opt, kw in OPTIONS:
    CASES.append(Case(f"linear-{opt}", MLP, _mlp_in, {"target_modules": LINEAR, **kw}))
    CASES.append(Case(f"gpt2conv1d-{opt}", GPT2Style, _gpt2_in, {"target_modules": ["c_fc", "c_proj"], **kw}))
    conv_kw = {k: v for k, v in kw.items() if k != "rank_pattern"}
    CASES.append(Case(f"conv-{opt}", ConvNet, conv_inputs, {"target_modules": CONVS, **conv_kw}))
    if opt not in ("lora_bias",):
        emb_kw = {k: v for k, v in kw.items() if k not in ("rank_pattern", "alpha_pattern")}
        CASES.append(
            Case(f"embedding-{opt}", lambda: EmbNet(padding_idx=0), _ids, {"target_modules": ["emb"], **emb_kw})
        )
CASES += [
    Case(
        "conv-stride-dilation", lambda: ConvNet(stride=2, dilation=2, padding=2), conv_inputs, {"target_modules": CONVS}
    ),
    Case("conv-groups", lambda: ConvNet(groups=2), conv_inputs, {"target_modules": CONVS, "r": 4}, mergeable=False),
    Case(
        "conv-reflect-padding", lambda: ConvNet(padding_mode="reflect"), conv_inputs, {"target_modules": ["c1", "c2"]}
    ),
    Case("conv-same-padding", lambda: ConvNet(padding="same", dilation=2), conv_inputs, {"target_modules": CONVS}),
    Case("conv-dora-strided", lambda: ConvNet(stride=2), conv_inputs, {"target_modules": CONVS, "use_dora": True}),
]

# PiSSA/OLoRA: the base is never rewritten, the initial factors ride along frozen (W + s (B A - B0 A0))
CASES += [
    Case(
        f"{init}-{kind}",
        model,
        inputs,
        {"target_modules": targets, "init_lora_weights": init, "r": 2},
        exact_identity=False,
    )
    for init in ("pissa", "pissa_niter_2", "olora")
    for kind, model, inputs, targets in (
        ("linear", MLP, _mlp_in, LINEAR),
        ("gpt2conv1d", GPT2Style, _gpt2_in, ["c_fc"]),
    )
]

IA3 = fp.IA3Config
CASES += [
    Case("ia3-linear", MLP, _mlp_in, {"target_modules": LINEAR}, IA3),
    Case("ia3-linear-feedforward", MLP, _mlp_in, {"target_modules": LINEAR, "feedforward_modules": ["lin1"]}, IA3),
    Case(
        "ia3-gpt2conv1d",
        GPT2Style,
        _gpt2_in,
        {"target_modules": ["c_fc", "c_proj"], "feedforward_modules": ["c_proj"]},
        IA3,
    ),
    Case("ia3-conv", ConvNet, conv_inputs, {"target_modules": ["c2", "c3"], "feedforward_modules": ["c3"]}, IA3),
    Case(
        "ia3-conv-groups",
        lambda: ConvNet(groups=2),
        conv_inputs,
        {"target_modules": ["c2", "c3"], "feedforward_modules": ["c2"]},
        IA3,
    ),
    Case("ia3-modules_to_save", MLP, _mlp_in, {"target_modules": LINEAR, "modules_to_save": ["head"]}, IA3),
]

# Trainable tokens (LoRA's trainable_token_indices; PEFT's standalone TrainableTokensConfig): embedding rows, and a
# Linear's output rows; the padding row among them
TT = fp.TrainableTokensConfig
_TOKENS = {"emb": [0, 1, 5], "head": [2]}
_PADDED = lambda: EmbNet(padding_idx=0)  # noqa: E731
CASES += [
    Case("lora-trainable_tokens", _PADDED, _ids, {"target_modules": ["lin"], "trainable_token_indices": _TOKENS}),
    Case("trainable_tokens", _PADDED, _ids, {"token_indices": [0, 1, 5], "target_modules": ["emb"]}, TT),
]


class ExpertsNet(nn.Module):
    """A Linear, then an MoE-style module whose forward reads a 3-D expert stack and a 2-D weight directly (LoRA's
    ``target_parameters``); ``transposed``: the stack is stored (E, in, out), flagged as transformers does."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.experts = nn.Module()
        self.experts.w3 = nn.Parameter(torch.randn(3, 6, 8))
        self.experts.w2 = nn.Parameter(torch.randn(4, 8))
        self.experts.is_transposed = transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (3, n, 6): one slice per expert
        # (reads the experts' parameters without calling the module: the adapter applies to the read itself)
        return torch.bmm(self.fc(x), self.experts.w3) @ self.experts.w2.T


def _experts_in() -> tuple[torch.Tensor, ...]:
    return (torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(1)),)


_PARAMS = {"target_modules": ["fc"], "target_parameters": ["experts.w3", "w2"]}
CASES += [
    Case("lora-target_parameters", ExpertsNet, _experts_in, _PARAMS),
    Case("lora-target_parameters-transposed-rslora", lambda: ExpertsNet(True), _experts_in,
         {**_PARAMS, "target_modules": [], "use_rslora": True, "rank_pattern": {"w3": 3}}),
]  # fmt: skip

ADA = fp.AdaLoraConfig
_ADA = {"init_r": 4, "target_r": 2, "total_step": 10}  # a fresh AdaLoRA adapter is the base: E = 0
_ADA_MASKS = {"lin0.lora_E": [True, False, True, True], "lin1.lora_E": [False, True, False, False]}
CASES += [
    Case("adalora-linear", MLP, _mlp_in, {"target_modules": LINEAR, **_ADA}, ADA),
    Case("adalora-gpt2conv1d", GPT2Style, _gpt2_in, {"target_modules": ["c_fc", "c_proj"], **_ADA}, ADA),
    Case("adalora-conv2d-strided", lambda: ConvNet(stride=2), conv_inputs, {"target_modules": ["c2"], **_ADA}, ADA),
    Case(
        "adalora-conv2d-reflect-padding",
        lambda: ConvNet(padding_mode="reflect", dilation=2, padding=2),
        conv_inputs,
        {"target_modules": ["c2", "head"], **_ADA},
        ADA,
    ),
    Case("adalora-rank_pattern", MLP, _mlp_in, {"target_modules": LINEAR, "rank_pattern": _ADA_MASKS, **_ADA}, ADA),
    Case("adalora-bias_all", MLP, _mlp_in, {"target_modules": LINEAR, "bias": "all", **_ADA}, ADA),
    Case("adalora-modules_to_save", MLP, _mlp_in, {"target_modules": LINEAR, "modules_to_save": ["head"], **_ADA}, ADA),
    Case(
        "adalora-dropout", MLP, _mlp_in, {"target_modules": LINEAR, "lora_dropout": 0.3, "lora_alpha": 3, **_ADA}, ADA
    ),
]


def _build(case: Case, dtype: torch.dtype = torch.float64, random: bool = False):
    torch.manual_seed(0)
    model = case.model().to(dtype).eval()
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in case.inputs())
    config = case.config_cls(**{**case.config, **(case.random_init() if random else {})})
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(0))
    return model, inputs, params, fwd


def _perturb(params: fp.Params, seed: int) -> fp.Params:
    """A trained-looking adapter: every leaf moved, so no term of the forward is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return {
            path: {
                name: (t + 0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype)).requires_grad_(True)
                for name, t in entry.items()
            }
            for path, entry in params.items()
        }


def _output(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


# Without gradients, layers may fold the adapter into the weight for the call: both paths must hold the contract.
GRAD_MODES = pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])


@GRAD_MODES
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fresh_adapter_is_the_base_model(case: Case, grad: bool) -> None:
    model, inputs, params, fwd = _build(case, dtype=torch.float32)
    with torch.set_grad_enabled(grad):
        out = _output(fwd(params, *inputs))
        if case.exact_identity:
            assert torch.equal(out, _output(model(*inputs)))
        else:
            torch.testing.assert_close(out, _output(model(*inputs)), rtol=1e-5, atol=1e-6)
        assert torch.equal(_output(fwd(None, *inputs)), _output(model(*inputs)))


@GRAD_MODES
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_adapted_equals_merged(case: Case, grad: bool) -> None:
    model, inputs, params, fwd = _build(case, random=True)
    params = _perturb(params, seed=1)
    with torch.set_grad_enabled(grad):
        out = _output(fwd(params, *inputs))
    assert not torch.allclose(out, _output(model(*inputs))), "the adapter must change the output"
    if not case.mergeable:
        with pytest.raises(ValueError, match="groups"):
            fwd.merge(params)
        return
    merged = copy.deepcopy(model)
    merged.load_state_dict(fwd.merge(params))
    torch.testing.assert_close(out, _output(merged(*inputs)), rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # and the folded (no-grad) path equals the unmerged one
        torch.testing.assert_close(_output(fwd(params, *inputs)), out.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradients_reach_adapter_leaves_only(case: Case) -> None:
    model, inputs, params, fwd = _build(case, dtype=torch.float32, random=True)
    params = _perturb(params, seed=2)
    _output(fwd(params, *inputs)).square().sum().backward()
    for path, entry in params.items():
        for name, leaf in entry.items():
            if name in ("lora_A0", "lora_B0"):  # PiSSA/OLoRA's initial factors: frozen, read detached
                assert leaf.grad is None, f"{path}.{name} is frozen but got a gradient"
                continue
            assert leaf.grad is not None, f"{path}.{name} got no gradient"
            assert leaf.grad.abs().sum() > 0, f"{path}.{name} got a zero gradient"
    assert all(p.grad is None for p in model.parameters()), "the base model must not receive gradients"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@GRAD_MODES
def test_vmap_over_adapters_equals_loop(case: Case, grad: bool) -> None:
    model, inputs, params, fwd = _build(case, random=True)
    adapters = [_perturb(params, seed=s) for s in range(3)]
    stacked = {p: {n: torch.stack([a[p][n] for a in adapters]) for n in params[p]} for p in params}
    with torch.set_grad_enabled(grad):
        out = torch.func.vmap(lambda ps: _output(fwd(ps, *inputs)), randomness="different")(stacked)
    for k, adapter in enumerate(adapters):
        torch.testing.assert_close(out[k], _output(fwd(adapter, *inputs)), rtol=1e-10, atol=1e-10)
