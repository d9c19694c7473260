"""DoRA on grouped convolutions (issue 14, item 5).

LoRA's ``A`` on a grouped conv reads every input channel and ``B`` is a grouped 1x1 conv (PEFT's shapes), so the
adapted weight ``W + s B A`` is a *dense* conv weight. funcpeft's DoRA normalises that true effective weight, row
by row (the paper's ``m / ||W + s BA||_c``, norm detached). PEFT 0.21.2 runs DoRA's forward on grouped convs but
computes the norm from ``mm(B.view(-1, r), A.view(r, -1))``, which is not the grouped delta, and refuses to merge.
The two agree exactly wherever ``B = 0`` (a fresh adapter: outputs and gradients, tested below); with a trained
``B`` funcpeft's forward is checked against the dense effective weight computed by hand. Merging is refused, as
for plain LoRA on grouped convs: a dense weight cannot be stored in the grouped layer.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import funcpeft
from tests._models import oracle

peft = oracle("peft")
pytestmark = pytest.mark.filterwarnings("ignore:DoRA on the grouped convolution")  # asserted once, below

GROUPS, CHANNELS, R = 4, 8, 4


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, groups=GROUPS)).double().eval()


def inputs() -> torch.Tensor:
    return torch.randn(3, CHANNELS, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


CONFIG = dict(r=R, lora_alpha=8, target_modules=["0"], use_dora=True)


def trained(params: funcpeft.Params, seed: int = 2) -> funcpeft.Params:
    gen = torch.Generator().manual_seed(seed)
    return {
        path: {
            name: (t.detach() + 0.3 * torch.randn(t.shape, generator=gen, dtype=t.dtype)).requires_grad_()
            for name, t in entry.items()
        }
        for path, entry in params.items()
    }


def dense_reference(conv: nn.Conv2d, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """DoRA's output with the effective weight written out densely (block-diagonal base + full delta)."""
    out, per_in = conv.out_channels, conv.in_channels // GROUPS
    out_per, r_per = out // GROUPS, R // GROUPS
    dense = conv.weight.new_zeros(out, conv.in_channels, *conv.kernel_size)
    b_dense = conv.weight.new_zeros(out, R)
    for g in range(GROUPS):
        rows = slice(g * out_per, (g + 1) * out_per)
        dense[rows, g * per_in : (g + 1) * per_in] = conv.weight[rows]
        b_dense[rows, g * r_per : (g + 1) * r_per] = tensors["lora_B"][rows, :, 0, 0]
    delta = (b_dense @ tensors["lora_A"].reshape(R, -1)).reshape(dense.shape) * (8 / R)
    merged = dense + delta
    norm = merged.reshape(out, -1).norm(dim=1).detach()
    scale = tensors["lora_magnitude_vector"].reshape(-1, 1, 1, 1) / norm.reshape(-1, 1, 1, 1)
    return F.conv2d(x, merged * scale, conv.bias, padding=1)


def test_fresh_adapter_equals_the_base_and_peft_outputs_and_gradients() -> None:
    m = model()
    params, fwd = funcpeft.adapt(m, funcpeft.LoraConfig(**CONFIG))
    x = inputs()
    assert_close(fwd(params, x), m(x), rtol=0, atol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(m), peft.LoraConfig(**CONFIG))
    layer = pm.base_model.model[0]
    theirs = [layer.lora_A.default.weight, layer.lora_B.default.weight, layer.lora_magnitude_vector.default.weight]
    ours = [params["0"][k] for k in ("lora_A", "lora_B", "lora_magnitude_vector")]
    with torch.no_grad():
        for t, o in zip(theirs, ours, strict=True):
            t.copy_(o)
    assert_close(fwd(params, x), pm(x))
    got = torch.autograd.grad(fwd(params, x).square().sum(), ours)
    assert_close(got, torch.autograd.grad(pm(x).square().sum(), theirs))


def test_trained_adapter_normalises_the_true_effective_weight() -> None:
    m = model()
    params, fwd = funcpeft.adapt(m, funcpeft.LoraConfig(**CONFIG))
    p = trained(params)
    x = inputs()
    assert_close(fwd(p, x), dense_reference(m[0], p["0"], x))
    leaves = list(p["0"].values())
    got = torch.autograd.grad(fwd(p, x).sum(), leaves)
    want = torch.autograd.grad(dense_reference(m[0], p["0"], x).sum(), leaves)
    assert_close(got, want)


def test_mixed_batch_and_vmap_equal_each_adapter_alone() -> None:
    m = model()
    params, fwd = funcpeft.adapt(m, funcpeft.LoraConfig(**CONFIG))
    adapters = [trained(params, 2), trained(params, 3)]
    stacked = funcpeft.stack(adapters)
    x = inputs()
    ids = torch.tensor([1, -1, 0])
    mixed = fwd(stacked, x, adapter_ids=ids)
    assert_close(mixed[0], fwd(adapters[1], x)[0])
    assert_close(mixed[1], m(x)[1])
    assert_close(mixed[2], fwd(adapters[0], x)[2])
    outs = torch.func.vmap(fwd, in_dims=(0, None))(stacked, x)
    for k, adapter in enumerate(adapters):
        assert_close(outs[k], fwd(adapter, x))


def test_dropout_in_training_follows_peft_split_form() -> None:
    """With active dropout, PEFT's split form: ``base(x) + (scale - 1) W h + scale * s B A h`` (``h`` dropped)."""
    m = model().train()
    params, fwd = funcpeft.adapt(m, funcpeft.LoraConfig(**CONFIG, lora_dropout=0.5))
    p = trained(params)
    x = inputs()
    torch.manual_seed(5)
    got = fwd(p, x)
    torch.manual_seed(5)
    h = F.dropout(x, 0.5, True)
    conv = m[0]
    scaled = dense_reference(conv, p["0"], h) - conv.bias.view(1, -1, 1, 1)  # scale * (W + s BA) h
    base_h = F.conv2d(h, conv.weight, None, padding=1, groups=GROUPS)  # W h
    assert_close(got, m(x) - base_h + scaled)  # base(x) + (scale - 1) W h + scale * s BA h


def test_adapt_warns_that_peft_trained_adapters_differ() -> None:
    with pytest.warns(funcpeft.FuncpeftWarning, match="grouped convolution '0'"):
        funcpeft.adapt(model(), funcpeft.LoraConfig(**CONFIG))


def test_merge_is_refused_naming_the_layer() -> None:
    m = model()
    params, fwd = funcpeft.adapt(m, funcpeft.LoraConfig(**CONFIG))
    with pytest.raises(ValueError, match="groups=4"):
        fwd.merge(trained(params))
