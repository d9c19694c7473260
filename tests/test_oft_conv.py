"""OFT on Conv2d: ``k x k`` kernels (k > 1) against PEFT's merged model, PEFT's unmerged quirk, layouts.

For ``k > 1`` funcpeft computes the paper's OFT, the base convolution with rotated filters, which is what PEFT's
``merge_and_unload()`` builds; PEFT's unmerged forward instead rotates stride-1 unpadded patches of the input and
sums their overlaps back (``F.fold``), so it is not even the base model for a fresh adapter. These tests pin
both facts, and compare outputs and gradients with PEFT's own merged math (its ``get_delta_weight``).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import ConvNet, conv_inputs, oracle
from torch import nn

import funcpeft as fp

peft = oracle("peft")

# (name, ConvNet kwargs, OFT kwargs); c2 is a Conv2d(4, 8) with these kwargs, 4 * k * k rotated features
CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("k3-padded", {}, {"oft_block_size": 4}),
    ("k3-strided", {"stride": 2}, {"r": 3, "oft_block_size": 0}),
    ("k3-reflect", {"padding_mode": "reflect"}, {"oft_block_size": 6, "block_share": True}),
    ("k3-same-coft", {"padding": "same"}, {"oft_block_size": 4, "coft": True, "eps": 0.3}),
    ("k2-unpadded-exact", {"kernel_size": 2, "padding": 0}, {"oft_block_size": 8, "use_cayley_neumann": False}),
    ("k3-no-bias", {"bias": False}, {"oft_block_size": 12}),
]


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _setup(conv_kw: dict[str, Any], kw: dict[str, Any], init_weights: bool = False):
    torch.manual_seed(0)
    model = ConvNet(**conv_kw).double().eval()
    x = tuple(t.double() for t in conv_inputs(batch=3))
    config = fp.OFTConfig(target_modules=["c2"], init_weights=init_weights, **kw)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(1))
    peft_config = peft.OFTConfig(target_modules=["c2"], init_weights=init_weights, **kw)
    peft_model = _quiet(peft.get_peft_model, copy.deepcopy(model), peft_config).eval()
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config))
    return model, x, config, params, fwd, peft_model


def _peft_merged_weight(peft_model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's merged c2 weight, differentiable w.r.t. its oft_R (the math of its ``merge``), and that oft_R.

    PEFT's ``get_weight`` computes a COFT rotation from a ``no_grad`` projection (no gradient path), so its steps
    are run here as its forward runs them: project the parameter in place, then rotate from the parameter."""
    layer = peft_model.base_model.model.c2
    w = layer.get_base_layer().weight
    rot = layer.oft_R["default"]
    if rot.coft:
        with torch.no_grad():
            rot.weight.copy_(rot._project_batch(rot.weight, eps=rot.eps))
    blocks = rot._cayley_batch(rot.weight, rot.block_size, rot.use_cayley_neumann, rot.num_cayley_neumann_terms)
    oft_mat = rot._block_diagonal(blocks, rot.in_features // rot.block_size)
    torch.testing.assert_close(oft_mat, layer.get_delta_weight("default"), rtol=1e-14, atol=1e-14)
    merged = (oft_mat @ w.reshape(w.shape[0], -1).T).T.reshape(w.shape)
    return merged, rot.weight


@pytest.mark.parametrize(("name", "conv_kw", "kw"), CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients_equal_peft_merged(name: str, conv_kw: dict[str, Any], kw: dict[str, Any]) -> None:
    model, x, config, params, fwd, peft_model = _setup(conv_kw, kw)
    out = fwd(params, *x)
    assert not torch.allclose(out, model(*x))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weights).sum().backward()
    merged, theirs = _peft_merged_weight(peft_model)
    reference = torch.func.functional_call(model, {"c2.weight": merged}, x)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    (reference * weights).sum().backward()
    torch.testing.assert_close(params["c2"]["oft_R"].grad, theirs.grad, rtol=1e-9, atol=1e-12)
    merged_model = peft_model.merge_and_unload()
    torch.testing.assert_close(merged_model(*x), out.detach(), rtol=1e-10, atol=1e-10)
    ours = fwd.merge(params)
    for key, value in merged_model.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize(("name", "conv_kw", "kw"), CASES, ids=[c[0] for c in CASES])
def test_peft_unmerged_forward_is_not_oft_for_k_above_1(name: str, conv_kw: dict[str, Any], kw: dict[str, Any]) -> None:
    # The PEFT quirk funcpeft does not copy: a fresh adapter (R = I) changes the model in PEFT's unmerged forward
    # (overlapping patches are summed: interior pixels are counted k * k times), and a trained one differs from
    # PEFT's own merge.
    model, x, _, params, fwd, peft_model = _setup(conv_kw, kw, init_weights=True)
    assert torch.equal(fwd(params, *x), model(*x))
    assert not torch.allclose(peft_model(*x), model(*x), atol=1e-3)
    torch.testing.assert_close(peft_model.merge_and_unload()(*x), model(*x), rtol=1e-12, atol=1e-12)
    model, x, _, params, fwd, peft_model = _setup(conv_kw, kw)
    unmerged = peft_model(*x)
    assert not torch.allclose(unmerged, peft_model.merge_and_unload()(*x), atol=1e-3)


@pytest.mark.parametrize("name", ["k3-strided", "k3-reflect"])
def test_checkpoints_both_ways_through_peft_merge(tmp_path: Path, name: str) -> None:
    _, conv_kw, kw = next(c for c in CASES if c[0] == name)
    model, x, config, params, fwd, peft_model = _setup(conv_kw, kw)
    fp.save(tmp_path / "fp", params, config)
    reloaded = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(model), tmp_path / "fp")
    torch.testing.assert_close(reloaded.merge_and_unload()(*x), fwd(params, *x), rtol=1e-10, atol=1e-10)
    _quiet(peft_model.save_pretrained, tmp_path / "peft")
    loaded, loaded_config = fp.load(tmp_path / "peft")
    assert torch.equal(loaded["c2"]["oft_R"], params["c2"]["oft_R"])
    _, fwd2 = fp.adapt(model, loaded_config)
    torch.testing.assert_close(fwd2(loaded, *x), peft_model.merge_and_unload()(*x), rtol=1e-10, atol=1e-10)


def _single(kernel: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 6, kernel, padding=kernel // 2)).double().eval()


@pytest.mark.parametrize("kernel", [1, 3])
def test_unbatched_and_channels_last_inputs(kernel: int) -> None:
    model = _single(kernel)
    config = fp.OFTConfig(target_modules=["0"], oft_block_size=2)
    params, fwd = fp.adapt(model, config)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    last = x.contiguous(memory_format=torch.channels_last)
    for inp in (x, last, x[0]):  # a fresh adapter is exactly the base, whatever the layout
        assert torch.equal(fwd(params, inp), model(inp))
    trained = fp.adapt(model, fp.OFTConfig(target_modules=["0"], oft_block_size=2, init_weights=False))[1].init()
    expected = fwd(trained, x)
    torch.testing.assert_close(fwd(trained, last), expected, rtol=1e-12, atol=1e-12)
    # an unbatched (C, H, W) input rotates its channels too (PEFT rotates its last dimension, the width, there)
    torch.testing.assert_close(fwd(trained, x[0]), expected[0], rtol=1e-12, atol=1e-12)
    merged = copy.deepcopy(model)
    merged.load_state_dict(fwd.merge(trained))
    torch.testing.assert_close(merged(x[0]), expected[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"'0'.*unbatched input of shape \(4, 5, 6\)"):
        fwd(fp.stack([trained, trained]), x[0], adapter_ids=torch.tensor([0, 1, 0, 1]))
