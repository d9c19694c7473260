"""Property tests over random single layers: every LoRA variant on every layer kind funcpeft supports.

For a random layer (Linear, Embedding, Conv1d/2d/3d with stride/padding/dilation/groups/padding modes, GPT-2's
``Conv1D``) and a random config (rank, alpha, rsLoRA, DoRA, ``lora_bias``):

(a) a fresh default adapter leaves the output exactly as the base layer's;
(b) with random adapter tensors, ``fwd`` equals the base layer run with the effective weight
    ``W' = W + scaling * B @ A`` (DoRA: ``m / ||W'||_row * W'``), computed here independently of funcpeft;
(c) the adapter tensors have PEFT's names and shapes;
(d) ``fwd.merge(params)`` loaded into a copy of the model reproduces ``fwd``.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import funcpeft as fp
from tests._models import oracle

# lora_bias on a layer without a bias is drawn on purpose; adapt warns about it, as PEFT does
pytestmark = pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed:funcpeft.FuncpeftWarning")

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@dataclass
class Case:
    kind: str  # "linear", "gpt2", "embedding", "conv"
    seed: int
    n_in: int
    n_out: int
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    lora_bias: bool
    bias: bool
    conv: dict = field(default_factory=dict)  # nd, kernel, stride, padding, dilation, groups, padding_mode, size
    padding_idx: int | None = None

    @property
    def groups(self) -> int:
        return self.conv.get("groups", 1)

    def config(self, **kw) -> fp.LoraConfig:
        return fp.LoraConfig(**self.peft_kwargs(), **kw)

    def peft_kwargs(self) -> dict:
        return {
            "target_modules": ["layer"],
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "lora_bias": self.lora_bias,
        }

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def build(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        if self.kind == "linear":
            layer = nn.Linear(self.n_in, self.n_out, bias=self.bias)
        elif self.kind == "gpt2":
            layer = oracle("transformers.pytorch_utils").Conv1D(self.n_out, self.n_in)
        elif self.kind == "embedding":
            layer = nn.Embedding(self.n_in, self.n_out, padding_idx=self.padding_idx)
        else:
            c = self.conv
            layer = CONVS[c["nd"]](
                self.n_in,
                self.n_out,
                c["kernel"],
                stride=c["stride"],
                padding=c["padding"],
                dilation=c["dilation"],
                groups=c["groups"],
                bias=self.bias,
                padding_mode=c["padding_mode"],
            )
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():  # random weights and biases everywhere (GPT-2's Conv1D starts with a zero bias)
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        return Wrap(layer).to(dtype).eval()

    def inputs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        if self.kind == "embedding":
            return torch.randint(0, self.n_in, (2, 5), generator=g)
        if self.kind == "conv":
            return torch.randn(2, self.n_in, *self.conv["size"], generator=g, dtype=dtype)
        return torch.randn(2, 3, self.n_in, generator=g, dtype=dtype)


@st.composite
def cases(draw) -> Case:
    kind = draw(st.sampled_from(["linear", "gpt2", "embedding", "conv", "conv"]))
    conv: dict = {}
    padding_idx = None
    if kind == "conv":
        nd = draw(st.integers(1, 3))
        groups = draw(st.sampled_from([1, 1, 2, 3]))
        n_in, n_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
        kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
        stride, padding, dilation = draw(st.integers(1, 2)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
        padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
        # each input extent covers the dilated kernel and exceeds the padding (needed by reflect/circular)
        size = tuple(max(dilation * (k - 1) + 1, padding + 1) + draw(st.integers(0, 2)) for k in kernel)
        conv = dict(
            nd=nd,
            kernel=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
            size=size,
        )
        r = groups * draw(st.integers(1, 3))
    else:
        n_in, n_out = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        if kind == "embedding":
            n_in += 1
            padding_idx = draw(st.none() | st.integers(0, n_in - 1))
        r = draw(st.integers(1, 6))
    use_dora = draw(st.booleans()) if conv.get("groups", 1) == 1 else False
    lora_bias = draw(st.booleans()) if kind != "embedding" and not use_dora else False
    return Case(
        kind=kind,
        seed=draw(st.integers(0, 2**16)),
        n_in=n_in,
        n_out=n_out,
        r=r,
        lora_alpha=draw(st.sampled_from([1, 2, 8, 16, 0.5, 3.0])),
        use_rslora=draw(st.booleans()),
        use_dora=use_dora,
        lora_bias=lora_bias,
        bias=kind == "gpt2" or draw(st.booleans()),
        conv=conv,
        padding_idx=padding_idx,
    )


# --------------------------------------------------------------------------------------------------------------
# the independent reference: the base layer run with a hand-computed effective weight
# --------------------------------------------------------------------------------------------------------------


def _block_diag(blocks_of: torch.Tensor, groups: int, cols_per: int) -> torch.Tensor:
    """Rows of group i of ``blocks_of`` (out, cols_per, ...) placed in columns i*cols_per .. (i+1)*cols_per."""
    out = blocks_of.shape[0]
    dense = blocks_of.new_zeros(out, cols_per * groups, *blocks_of.shape[2:])
    per_out = out // groups
    for i in range(groups):
        rows = slice(i * per_out, (i + 1) * per_out)
        dense[rows, i * cols_per : (i + 1) * cols_per] = blocks_of[rows]
    return dense


def reference(case: Case, model: Wrap, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    layer = model.layer
    if case.kind == "linear":
        weight = layer.weight
    elif case.kind in ("gpt2", "embedding"):
        weight = layer.weight.T  # Conv1D stores (in, out), Embedding (num, dim): canonical is (out, in)
    else:
        weight = _block_diag(layer.weight, case.groups, layer.weight.shape[1])
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if case.kind == "embedding" else ("lora_A", "lora_B")
    a, b = tensors[a_name], tensors[b_name]
    b = b.reshape(b.shape[0], -1)
    if case.groups > 1:
        b = _block_diag(b, case.groups, case.r // case.groups)
    delta = (b @ a.reshape(case.r, -1)).reshape(weight.shape)
    weight = weight + case.scaling * delta
    if case.use_dora:
        magnitude = tensors["lora_magnitude_vector"].reshape(-1)
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1)
        weight = weight * (magnitude / norm).reshape(-1, *(1,) * (weight.dim() - 1))
    bias = None if case.kind == "embedding" else layer.bias
    if case.lora_bias:
        extra = case.scaling * tensors["lora_B.bias"]
        bias = extra if bias is None else bias + extra
    if case.kind in ("linear", "gpt2"):
        return F.linear(x, weight, bias)
    if case.kind == "embedding":
        return F.embedding(x, weight.T)
    c = case.conv
    padding = c["padding"]
    if c["padding_mode"] != "zeros":
        x = F.pad(x, [c["padding"]] * (2 * c["nd"]), mode=c["padding_mode"])
        padding = 0
    return CONV_FNS[c["nd"]](x, weight, bias, c["stride"], padding, c["dilation"], 1)


# --------------------------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(case=cases(), init=st.sampled_from([True, "gaussian"]), double=st.booleans())
def test_fresh_adapter_is_exactly_the_base(case, init, double):
    dtype = torch.float64 if double else torch.float32
    model = case.build(dtype)
    x = case.inputs(dtype)
    init = True if case.lora_bias else init  # PEFT (and funcpeft) refuse lora_bias with "gaussian"
    params, fwd = fp.adapt(model, case.config(init_lora_weights=init), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        got = fwd(params, x)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)
    # the leaves are trainable and independent of the model
    model_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for entry in params.values():
        for tensor in entry.values():
            assert tensor.is_leaf and tensor.requires_grad and tensor.dtype == dtype
            assert tensor.untyped_storage().data_ptr() not in model_storages


@SETTINGS
@given(case=cases())
def test_adapted_output_is_the_layer_with_the_effective_weight(case):
    model = case.build(torch.float64)
    x = case.inputs(torch.float64)
    params, fwd = fp.adapt(model, case.config(init_lora_weights=False), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = fwd(params, x)
        base = model(x)
        expected = reference(case, model, params["layer"], x)
    assert got.shape == base.shape
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(got, base), "init_lora_weights=False must give a non-trivial adapter"


def _peft_shapes(adapted: nn.Module) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, p in adapted.named_parameters():
        if name.startswith("layer.lora_"):
            key = name.removeprefix("layer.").replace(".default", "").removesuffix(".weight")
            out[key] = tuple(p.shape)
    return out


@SETTINGS
@given(case=cases())
def test_tensor_names_and_shapes_are_peft_s(case):
    peft = oracle("peft")
    model = case.build()
    params, _ = fp.adapt(model, case.config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.inject_adapter_in_model(peft.LoraConfig(**case.peft_kwargs()), copy.deepcopy(model))
    assert set(params) == {"layer"}
    assert {k: tuple(v.shape) for k, v in params["layer"].items()} == _peft_shapes(theirs)


@SETTINGS
@given(case=cases())
def test_merged_weights_reproduce_the_adapter(case):
    model = case.build(torch.float64)
    x = case.inputs(torch.float64)
    params, fwd = fp.adapt(model, case.config(init_lora_weights=False), generator=torch.Generator().manual_seed(2))
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = {k: v.detach().clone() for k, v in params["layer"].items()}
    foldable = case.groups == 1 and not (case.lora_bias and getattr(model.layer, "bias", None) is None)
    if not foldable:
        # a grouped conv's dense delta, or a lora_bias without a base bias, has no place in the state_dict
        try:
            fwd.merge(params)
        except ValueError:
            pass
        else:
            raise AssertionError("merge of an adapter that cannot be folded into the layer did not raise")
        return
    state = fwd.merge(params)
    assert state.keys() == model.state_dict().keys()
    merged = copy.deepcopy(model)
    merged.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), fwd(params, x), rtol=1e-9, atol=1e-10)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_before[k]), k
    for k, v in params["layer"].items():
        assert torch.equal(v, params_before[k]), k
