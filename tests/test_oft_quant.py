"""OFT on quantized bases (the formats of ``test_quant.py``): bitsandbytes against PEFT's OFT on the same quantized
model; torchao (which PEFT's OFT refuses without ``get_apply_tensor_subclass``) against the float model holding
``fwd.merge(params, dequantize=True)``; mixed batches and ``torch.func.grad`` on every format."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import funcpeft as fp
from tests._models import oracle
from tests.test_quant import FORMATS, float_model, inputs, quantized_model

peft = oracle("peft")
KW = {"target_modules": ["lin0", "lin1"], "oft_block_size": 8, "init_weights": False}


def _adapted(fmt: str):
    model = quantized_model(fmt).requires_grad_(False)
    config = fp.OFTConfig(**KW)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(1))
    return model, config, params, fwd


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("fmt", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_equals_peft(fmt: str) -> None:
    model, config, params, fwd = _adapted(fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(**KW))
    peft.set_peft_model_state_dict(theirs, fp.to_peft_state_dict(params, config))
    x = inputs()
    out, ref = fwd(params, x), theirs(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.square().sum().backward()
    ref.square().sum().backward()
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            path = name.removeprefix("base_model.model.").split(".oft_R")[0]
            torch.testing.assert_close(params[path]["oft_R"].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_equals_its_dequantized_merge_and_batches(fmt: str) -> None:
    model, config, params, fwd = _adapted(fmt)
    x = inputs()
    out = fwd(params, x)
    # gradients first: bitsandbytes' 4-bit layer repacks its weight on its first no_grad call, and its kernel's
    # rounding changes with it (for every method, and for autograd and torch.func alike)
    grads = torch.func.grad(lambda p: fwd(p, x).square().sum())(params)
    out.square().sum().backward()
    for path, entry in grads.items():
        assert entry["oft_R"].abs().sum() > 0
        torch.testing.assert_close(entry["oft_R"], params[path]["oft_R"].grad, rtol=1e-5, atol=1e-6)
    float_twin = float_model()
    float_twin.load_state_dict(fwd.merge(params, dequantize=True))
    with torch.no_grad():
        got, base, out = float_twin(x), model(x), out.detach()
    if fmt == "bnb-int8":  # its int8 matmul also quantizes the activations: exact up to that rounding
        assert (got - out).norm() < 0.05 * (out - base).norm()
    else:
        torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)
    other = fwd.init(torch.Generator().manual_seed(7))
    ids = torch.tensor([0, 1, -1, 0, 1, -1])
    mixed = fwd(fp.stack([params, other]), x, adapter_ids=ids)
    for i, k in enumerate(ids.tolist()):
        row = fwd(None if k < 0 else [params, other][k], x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], row, rtol=1e-5, atol=1e-5)
