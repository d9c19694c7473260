"""Adapters on quantized bases (torchao int8 / int4 / NF4 weights, bitsandbytes Linear8bitLt / Linear4bit).

Every format runs an MLP of ``nn.Linear(64, 64)`` layers with its two hidden layers adapted and the head
quantized but not adapted. PEFT on a second copy of the same quantized model, holding the same adapter, is the
oracle for outputs and gradients. ``fwd.merge`` must carry the adapter: the merged state dict is loaded into a
fresh model (quantized the same way, or the float architecture with ``dequantize=True``) and compared with
``fwd``; where a format cannot be stored back, the error must name it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import funcpeft
from tests._models import MLP, oracle

peft = oracle("peft")
torchao = oracle("torchao")
bnb = oracle("bitsandbytes")

TARGETS = ["lin0", "lin1"]
FORMATS = ["torchao-int8", "torchao-int4", "torchao-nf4", "bnb-int8", "bnb-nf4"]
REQUANTIZED = ["torchao-int8", "torchao-int4", "torchao-nf4", "bnb-int8"]  # fwd.merge stores these re-quantized


def float_model() -> MLP:
    torch.manual_seed(0)
    return MLP(64, 64, 64).eval()


def _bnb(model: MLP, make) -> MLP:
    quantized = copy.deepcopy(model)
    for name in ("lin0", "lin1", "head"):
        layer = make()
        layer.load_state_dict(getattr(model, name).state_dict())
        setattr(quantized, name, layer.to("cpu"))  # bitsandbytes quantizes on .to(device)
    return quantized.eval()


def quantized_model(fmt: str) -> MLP:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_, to_nf4

    model = float_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchao-int8":
            quantize_(model, Int8WeightOnlyConfig())
        elif fmt == "torchao-int4":
            quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4))
        elif fmt == "torchao-nf4":
            for layer in (model.lin0, model.lin1, model.head):
                layer.weight = nn.Parameter(to_nf4(layer.weight.detach(), 64, 64), requires_grad=False)
        elif fmt == "bnb-int8":
            model = _bnb(model, lambda: bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=0.0))
        else:
            model = _bnb(model, lambda: bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4"))
    return model


def adapted(fmt: str, targets: list[str] = TARGETS, **kwargs):
    # A frozen base, as for QLoRA (bitsandbytes' repacked CPU 4-bit kernel adds a bias needing grad in place)
    model = quantized_model(fmt).requires_grad_(False)
    config = funcpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)
    params, fwd = funcpeft.adapt(model, config, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a large adapter, so that a dropped adapter cannot hide in quantization noise
        for entry in params.values():
            entry["lora_B"].mul_(2.0)
    return model, config, params, fwd


def inputs(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(2))


def test_formats_are_quantized() -> None:
    """Guards the matrix: each format really puts a quantized weight on the targets."""
    from funcpeft import _quant

    for fmt in FORMATS:
        model = quantized_model(fmt)
        assert _quant.describe(model.lin0) is not None, fmt


# PEFT's DoRA cannot read an NF4 weight (it calls NF4Tensor.dequantize() without arguments): that case is checked
# against the float model holding fwd.merge(params, dequantize=True) instead (below).
PEFT_CASES = [(f, d) for f in FORMATS for d in (False, True) if not (f == "torchao-nf4" and d)]


@pytest.mark.parametrize(("fmt", "use_dora"), PEFT_CASES)
def test_forward_and_gradients_equal_peft(fmt: str, use_dora: bool) -> None:
    model, config, params, fwd = adapted(fmt, use_dora=use_dora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(
            quantized_model(fmt),  # the same quantized model (torchao's NF4 deepcopy loses its block sizes)
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora),
        )
        result = peft.set_peft_model_state_dict(reference, funcpeft.to_peft_state_dict(params, config))
    assert not result.unexpected_keys
    model.train(), reference.train()  # (no dropout) bitsandbytes 4-bit: no eval-time repacking
    x = inputs()
    ours, theirs = fwd(params, x), reference(x)
    torch.testing.assert_close(ours, theirs)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    peft_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for path, entry in params.items():
        for name, tensor in entry.items():
            key = f"base_model.model.{path}.{name}.default.weight"
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0, (path, name)
            torch.testing.assert_close(tensor.grad, peft_grads[key], msg=f"{fmt} {path}.{name}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_grad_inference(fmt: str) -> None:
    """Large inputs take the fold path on float weights; on quantized ones they must run unmerged, equal to the
    gradient-mode forward."""
    _, _, params, fwd = adapted(fmt)
    x = inputs(512)
    # first with gradients: bitsandbytes 4-bit repacks its weight at the first eval no_grad call, for a CPU kernel
    # that computes in bfloat16 and takes no gradients
    expected = fwd(params, x).detach()
    with torch.no_grad():
        out = fwd(params, x)
        base = fwd(None, x)
    if fmt == "bnb-nf4":
        assert (out - expected).norm() < 1e-2 * expected.norm()
    else:
        torch.testing.assert_close(out, expected)
    assert (out - base).norm() > 0.5 * expected.norm()  # the adapter is applied


@pytest.mark.parametrize("fmt", FORMATS)
def test_mixed_batch(fmt: str) -> None:
    model, _, params, fwd = adapted(fmt)
    model.train()  # (no dropout in the model) bitsandbytes 4-bit keeps one kernel: no eval-time repacking
    other = {p: {k: v.detach() * -0.5 for k, v in e.items()} for p, e in params.items()}
    stacked = funcpeft.stack([params, other])
    x = inputs(3)
    out = fwd(stacked, x, adapter_ids=torch.tensor([0, 1, -1]))
    # each row against the same batch run with its adapter (bitsandbytes' kernels depend on the batch size)
    expected = torch.cat([fwd(params, x)[:1], fwd(other, x)[1:2], fwd(None, x)[2:]])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("fmt", REQUANTIZED)
def test_merge_requantizes_in_the_base_format(fmt: str, use_dora: bool) -> None:
    model, _, params, fwd = adapted(fmt, use_dora=use_dora)
    merged = fwd.merge(params)
    fresh = quantized_model(fmt)
    fresh.load_state_dict(merged)
    x = inputs()
    with torch.no_grad():
        expected, base, got = fwd(params, x), model(x), fresh(x)
    # Re-quantizing W + sBA costs one more quantization error (4-bit: several percent of the weight); a dropped
    # adapter would give a ratio of about 1.
    assert (got - expected).norm() < 0.3 * (expected - base).norm()
    assert type(fresh.lin0.weight) is type(model.lin0.weight)  # still the base's format


def test_merge_bnb_4bit_refuses_without_dequantize() -> None:
    _, _, params, fwd = adapted("bnb-nf4")
    with pytest.raises(ValueError, match=r"'lin0'.*Linear4bit.*dequantize=True"):
        fwd.merge(params)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_dequantize_gives_a_float_state_dict(fmt: str, use_dora: bool) -> None:
    model, _, params, fwd = adapted(fmt, use_dora=use_dora)
    with torch.no_grad():
        model(inputs(4))  # bitsandbytes 4-bit repacks its weight for the CPU kernel here: still read correctly
    merged = fwd.merge(params, dequantize=True)
    assert all(type(t) is torch.Tensor and t.is_floating_point() for t in merged.values())
    target = float_model()
    target.load_state_dict(merged)  # strict: no bitsandbytes key is left over
    x = inputs()
    with torch.no_grad():
        expected, base, got = fwd(params, x), model(x), target(x)
    # exact up to the base kernel's own rounding (bitsandbytes' int8 matmul also quantizes the activations)
    assert (got - expected).norm() < 0.05 * (expected - base).norm()
    if fmt.startswith("torchao"):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_func_grad_equals_autograd(fmt: str) -> None:
    """bitsandbytes' and NF4's autograd.Functions lack setup_context: the frozen base branch of an adapted layer is
    routed around them. (Every quantized layer is adapted here: an unadapted one still runs its own forward.)"""
    model, _, params, fwd = adapted(fmt, targets=["lin0", "lin1", "head"])
    model.train()  # (no dropout in the model) bitsandbytes 4-bit keeps one kernel: no eval-time repacking
    x = inputs()

    def loss(p):
        return fwd(p, x).square().mean()

    loss(params).backward()
    grads = torch.func.grad(loss)({p: {k: v.detach() for k, v in e.items()} for p, e in params.items()})
    for path, entry in params.items():
        for name, tensor in entry.items():
            torch.testing.assert_close(grads[path][name], tensor.grad, rtol=1e-4, atol=1e-5)
    # a mixed batch under torch.func too
    stacked = funcpeft.stack([params, params])
    ids = torch.tensor([0, 1, -1, 0, 1, 0])
    mixed = torch.func.grad(lambda p: fwd(p, x, adapter_ids=ids).square().mean())(stacked)
    assert all(g.abs().sum() > 0 for e in mixed.values() for g in e.values())
