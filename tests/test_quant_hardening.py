"""Hostile cases for quantized bases with ``base=`` calls (the formats of ``test_quant.py``).

A bitsandbytes layer computes with state kept outside its weight tensor (8-bit: ``SCB`` and ``layer.state``; 4-bit:
the ``quant_state``), which a ``base=`` dict cannot carry: its forward silently ignored a given 8-bit weight, and
one that had not run yet had its scales moved into the *model's* layer state (changing the user's model for good).
Such entries are refused by name. Under ``torch.func.grad`` the detoured frozen layers (NF4, bitsandbytes) compute
their input gradient after the call returned, and must use the call's ``base=`` weight then.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import funcpeft
from tests._models import oracle
from tests.test_quant import adapted, inputs, quantized_model

oracle("peft")
oracle("torchao")
oracle("bitsandbytes")


def detached(params):
    return {p: {k: v.detach() for k, v in e.items()} for p, e in params.items()}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
        yield


def test_bnb_int8_weight_in_base_is_refused_and_changes_nothing() -> None:
    model, _, params, fwd = adapted("bnb-int8")
    x = inputs()
    with torch.no_grad():
        before, own = model(x).clone(), fwd(params, x).clone()
    other = quantized_model("bnb-int8")  # never run: its weights still carry their scales (CB/SCB)
    given = other.head.weight
    with pytest.raises(ValueError, match=r"`base\['lin0.weight'\]`.*bitsandbytes Linear8bitLt"):
        fwd(params, x, base={"lin0.weight": given})
    assert given.CB is not None  # the given weight keeps its scales
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the model's lin0 still computes with its own scales
        assert torch.equal(fwd(params, x), own)
    # a plain int8 tensor (was: AttributeError 'Tensor' object has no attribute 'CB')
    with pytest.raises(ValueError, match=r"`base\['lin1.weight'\]`.*bitsandbytes"):
        fwd(params, x, base={"lin1.weight": torch.zeros(64, 64, dtype=torch.int8)})


@pytest.mark.parametrize("fmt", ["bnb-int8", "bnb-nf4"])
def test_bnb_state_dict_as_base_names_the_quantization_state(fmt: str) -> None:
    model, _, params, fwd = adapted(fmt)
    with pytest.raises(ValueError, match=r"base.*bitsandbytes") as info:
        fwd(params, inputs(), base=dict(model.state_dict()))
    assert "state_dict() names (model.state_dict().keys())" not in str(info.value)
    # the float tensors of such a model can be given
    bias = {"lin0.bias": model.lin0.bias.detach() * 2}
    with torch.no_grad():
        out = fwd(params, inputs(), base=bias)
    assert not torch.equal(out, fwd(params, inputs()))


@pytest.mark.parametrize("fmt", ["torchao-nf4", "bnb-nf4", "bnb-int8"])
def test_torch_func_grad_with_base_on_detoured_layers(fmt: str) -> None:
    """The frozen branch's gradient is computed after the call returned: it must read the call's base."""
    model, _, params, fwd = adapted(fmt)
    model.train()  # (no dropout) bitsandbytes 4-bit keeps one kernel: no eval-time repacking
    x = inputs()
    if fmt == "torchao-nf4":  # another weight for lin0: the head's
        base = {"lin0.weight": dict(model.named_parameters())["head.weight"]}
    else:
        base = {"lin0.bias": model.lin0.bias.detach() * 2}

    def loss(p):
        return fwd(p, x, base=base).square().mean()

    loss(params).backward()
    grads = torch.func.grad(loss)(detached(params))
    for path, entry in params.items():
        for name, tensor in entry.items():
            torch.testing.assert_close(grads[path][name], tensor.grad, rtol=1e-4, atol=1e-5)
    if fmt == "torchao-nf4":  # and the base was used: a model holding the head's weight in lin0 gives the same
        twin = quantized_model(fmt).requires_grad_(False).train()
        twin.lin0.weight = twin.head.weight
        _, twin_fwd = funcpeft.adapt(twin, fwd.config)
        twin_grads = torch.func.grad(lambda p: twin_fwd(p, x).square().mean())(detached(params))
        torch.testing.assert_close(twin_grads, grads)
