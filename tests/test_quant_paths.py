"""Every method and every path on quantized bases (the formats of ``test_quant.py``).

``test_quant.py`` holds LoRA/DoRA against PEFT; this file adds IA3 (output and feedforward scaling) and AdaLoRA
against PEFT on the same quantized models, and for every method: ``torch.func.grad`` with an *unadapted* quantized
head in the model (its own bitsandbytes/NF4 forward is an ``autograd.Function`` torch.func cannot run), vmap over
stacked adapters, mixed batches, ``no_grad``, ``torch.compile`` and the merge round trip. Also: a trainable bias
under the torch.func detour, and training a bitsandbytes 4-bit model after bitsandbytes repacked it for inference.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import funcpeft
from tests._models import oracle
from tests.test_quant import FORMATS, REQUANTIZED, float_model, inputs, quantized_model

peft = oracle("peft")

TARGETS = ["lin0", "lin1"]
METHODS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "ia3": (funcpeft.IA3Config, peft.IA3Config, {"init_ia3_weights": False, "feedforward_modules": []}),
    "ia3-ff": (funcpeft.IA3Config, peft.IA3Config, {"init_ia3_weights": False, "feedforward_modules": ["lin1"]}),
    "adalora": (
        funcpeft.AdaLoraConfig,
        peft.AdaLoraConfig,
        {"init_r": 4, "target_r": 2, "total_step": 10, "init_lora_weights": False},
    ),
    "lora": (funcpeft.LoraConfig, peft.LoraConfig, {"r": 4, "lora_alpha": 8, "init_lora_weights": False}),
}


def adapted(fmt: str, method: str, targets: list[str] = TARGETS, **extra: Any):
    ours, _, kw = METHODS[method]
    model = quantized_model(fmt).requires_grad_(False).train()  # (no dropout) bnb 4-bit: no eval repacking
    config = ours(target_modules=targets, **kw, **extra)
    params, fwd = funcpeft.adapt(model, config, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # make the adapter large, so that a dropped adapter cannot hide in quantization noise
        for entry in params.values():
            for name, tensor in entry.items():
                if name in ("lora_B", "lora_E"):
                    tensor.normal_(generator=torch.Generator().manual_seed(3))
                elif name == "ia3_l":
                    tensor.mul_(3.0)
    return model, config, params, fwd


def detached(params):
    return {p: {k: v.detach() for k, v in e.items()} for p, e in params.items()}


def scaled(params, factor: float):
    return {p: {k: v.detach() * factor for k, v in e.items()} for p, e in params.items()}


@pytest.mark.parametrize("method", ["ia3", "ia3-ff", "adalora"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_and_gradients_equal_peft(fmt: str, method: str) -> None:
    model, config, params, fwd = adapted(fmt, method)
    _, theirs_cls, kw = METHODS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(quantized_model(fmt), theirs_cls(target_modules=TARGETS, **kw)).train()
        result = peft.set_peft_model_state_dict(reference, funcpeft.to_peft_state_dict(params, config))
    assert not result.unexpected_keys
    x = inputs()
    ours, theirs = fwd(params, x), reference(x)
    torch.testing.assert_close(ours, theirs)
    assert (ours - model(x)).norm() > 0.1 * ours.norm()  # the adapter is applied
    ours.square().mean().backward()
    theirs.square().mean().backward()
    peft_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for path, entry in params.items():
        for name, tensor in entry.items():
            grad = peft_grads[f"base_model.model.{path}.{name}.default"]
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0, (path, name)
            torch.testing.assert_close(tensor.grad, grad, msg=f"{fmt} {method} {path}.{name}")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_func_grad_and_vmap_with_an_unadapted_quantized_head(fmt: str, method: str) -> None:
    """The head stays quantized and unadapted: ``torch.func`` must still run the whole model."""
    _, _, params, fwd = adapted(fmt, method)
    x = inputs()

    def loss(p):
        return fwd(p, x).square().mean()

    loss(params).backward()
    grads = torch.func.grad(loss)(detached(params))
    for path, entry in params.items():
        for name, tensor in entry.items():
            torch.testing.assert_close(grads[path][name], tensor.grad, rtol=1e-4, atol=1e-5)
    others = [detached(params), scaled(params, -0.5), scaled(params, 2.0)]
    stacked = funcpeft.stack(others)
    mapped = torch.func.vmap(fwd, in_dims=(0, None))(stacked, x)
    for k, one in enumerate(others):
        expected = fwd(one, x)  # (vmap runs the quantized kernels on K times the rows: float rounding differs)
        assert (mapped[k] - expected).norm() < 1e-5 * expected.norm(), (k, (mapped[k] - expected).norm())
    # per-adapter gradients: vmap of grad
    per = torch.func.vmap(torch.func.grad(loss))(stacked)
    for path, entry in params.items():
        for name in entry:
            torch.testing.assert_close(per[path][name][0], grads[path][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["ia3", "ia3-ff", "adalora"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_no_grad_and_mixed_batch(fmt: str, method: str) -> None:
    _, _, params, fwd = adapted(fmt, method)
    x = inputs(3)
    expected = fwd(params, x).detach()
    other = scaled(params, -0.5)
    stacked = funcpeft.stack([detached(params), other])
    out = fwd(stacked, x, adapter_ids=torch.tensor([0, 1, -1]))
    rows = torch.cat([expected[:1], fwd(other, x)[1:2], fwd(None, x)[2:]])
    torch.testing.assert_close(out, rows, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fwd(params, x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["ia3", "ia3-ff", "adalora"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_round_trip(fmt: str, method: str) -> None:
    """``fwd.merge`` in the base's format where it can be stored back (else a clear error), and with
    ``dequantize=True`` a float state dict; both reloaded and compared with ``fwd``."""
    model, _, params, fwd = adapted(fmt, method)
    x = inputs()
    with torch.no_grad():
        expected, base = fwd(params, x), model(x)
    if fmt in REQUANTIZED:
        fresh = quantized_model(fmt)
        fresh.load_state_dict(fwd.merge(params))
        with torch.no_grad():
            got = fresh(x)
        assert (got - expected).norm() < 0.3 * (expected - base).norm()
        assert type(fresh.lin0.weight) is type(model.lin0.weight)
    else:
        with pytest.raises(ValueError, match=r"'lin0'.*Linear4bit.*dequantize=True"):
            fwd.merge(params)
    target = float_model()
    target.load_state_dict(fwd.merge(params, dequantize=True))
    with torch.no_grad():
        got = target(x)
    assert (got - expected).norm() < 0.05 * (expected - base).norm()


@pytest.mark.parametrize("fmt", FORMATS)
def test_compile_fullgraph_equals_eager(fmt: str) -> None:
    torch._dynamo.reset()
    _, _, params, fwd = adapted(fmt, "lora")
    x = inputs()
    compiled = torch.compile(fwd, fullgraph=True)
    out = compiled(params, x)
    torch.testing.assert_close(out, fwd(params, x))
    out.square().mean().backward()
    grads = {(p, n): t.grad.clone() for p, e in params.items() for n, t in e.items()}
    for entry in params.values():
        for tensor in entry.values():
            tensor.grad = None
    fwd(params, x).square().mean().backward()
    for (path, name), grad in grads.items():
        torch.testing.assert_close(grad, params[path][name].grad)


@pytest.mark.parametrize("fmt", ["bnb-int8", "bnb-nf4", "torchao-nf4"])
def test_trainable_bias_gets_its_gradient_under_torch_func(fmt: str) -> None:
    """The detour computes the frozen kernel without tracking: a trainable bias copy (``bias="all"``) must still get
    its gradient, equal to autograd's through bitsandbytes' own backward."""
    _, _, params, fwd = adapted(fmt, "lora", bias="all")
    x = inputs()

    def loss(p):
        return fwd(p, x).square().mean()

    loss(params).backward()
    grads = torch.func.grad(loss)(detached(params))
    assert grads["lin0"]["bias"].abs().sum() > 0
    for path, entry in params.items():
        for name, tensor in entry.items():
            torch.testing.assert_close(grads[path][name], tensor.grad, rtol=1e-4, atol=1e-5, msg=f"{path}.{name}")


def test_bnb_4bit_trains_after_bitsandbytes_repacked_it_for_inference() -> None:
    """bitsandbytes repacks a 4-bit weight for its CPU kernel at the first eval ``no_grad`` call, on CPUs with
    AVX512-BF16 (the kernel's instructions); that kernel then fails with gradients (the plain model and PEFT fail).
    funcpeft's detour trains on, with the same gradients. On a CPU without them bitsandbytes keeps the weight as it
    is (and has no kernel for the repacked layout): training after inference must then still give the same
    gradients."""
    from bitsandbytes.functional import has_avx512bf16

    model, _, params, fwd = adapted("bnb-nf4", "lora")
    x = inputs()
    fwd(params, x).square().mean().backward()
    before = {(p, n): t.grad.clone() for p, e in params.items() for n, t in e.items()}
    model.eval()
    with torch.no_grad():
        model(x)  # bitsandbytes repacks here where the CPU has the kernel's instructions
    assert bool(getattr(model.lin0.weight.quant_state, "packing_format_for_cpu", False)) == has_avx512bf16()
    for entry in params.values():
        for tensor in entry.values():
            tensor.grad = None
    fwd(params, x).square().mean().backward()
    for (path, name), grad in before.items():
        got = params[path][name].grad  # the repacked kernel computes in bfloat16
        assert (got - grad).norm() < 2e-2 * grad.norm(), (path, name, (got - grad).norm() / grad.norm())


def test_bnb_4bit_repacked_weight_merges_as_before_and_stays_repacked() -> None:
    """``fwd.merge(params, dequantize=True)`` reads a repacked 4-bit weight whole by undoing bitsandbytes' CPU
    repacking on a copy: the same merged state dict as before it, the module left repacked. The repacking is
    bitsandbytes' own conversion, applied here as its eval forward applies it (pure tensor ops: any CPU runs them,
    where bitsandbytes itself repacks only on CPUs with AVX512-BF16)."""
    import bitsandbytes.functional as bf

    model, _, params, fwd = adapted("bnb-nf4", "lora")
    want = fwd.merge(params, dequantize=True)
    layer = model.lin0
    layer.weight.data, layer.weight.quant_state = bf._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    state, packed, absmax = layer.weight.quant_state, layer.weight.data.clone(), layer.weight.quant_state.absmax
    got = fwd.merge(params, dequantize=True)
    assert got.keys() == want.keys()
    for name in want:  # the repacked state keeps its block scales in bfloat16: lin0 differs by their rounding,
        # 2^-9 of a block's largest weight (a wrongly unpacked weight is off by a whole quantization step or more)
        atol = 2**-9 * want[name].abs().max().item() if name == "lin0.weight" else 0
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol)
    assert layer.weight.quant_state is state and state.packing_format_for_cpu and state.absmax is absmax
    assert torch.equal(layer.weight.data, packed)


def test_bnb_4bit_repacked_layer_stays_repacked_through_the_compat_state_dicts() -> None:
    """PEFT's state-dict functions (``funcpeft.compat``) read the model's state dict too: a repacked 4-bit layer
    (bitsandbytes' own conversion, as in its eval forward) is left as it is by injecting, getting and setting."""
    import bitsandbytes.functional as bf

    from funcpeft import compat

    model = quantized_model("bnb-nf4").requires_grad_(False)
    head = model.head
    head.weight.data, head.weight.quant_state = bf._convert_weight_packed_for_cpu(
        head.weight.data, head.weight.quant_state
    )
    state, packed = head.weight.quant_state, head.weight.data.clone()
    compat.inject_adapter_in_model(funcpeft.LoraConfig(r=4, target_modules=TARGETS), model)
    saved = compat.get_peft_model_state_dict(model)
    assert saved and all("lora_" in key for key in saved)
    assert not compat.set_peft_model_state_dict(model, saved).unexpected_keys
    assert head.weight.quant_state is state and state.packing_format_for_cpu
    assert torch.equal(head.weight.data, packed)
