"""Helpers for the LoHa and LoKr tests: one adapter built in both libraries on the same weights.

PEFT's model is built with ``peft.get_peft_model`` on a copy of the model, and funcpeft's random (non-zero) tensors
are copied into it, so every comparison is between the two libraries' math on equal inputs.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from _models import oracle

import funcpeft as fp

peft = oracle("peft")


def out(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return x.logits if hasattr(x, "logits") else x.last_hidden_state


def quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def setup(
    name: str,
    factory: Any,
    inputs: Any,
    kw: dict[str, Any],
    dtype: torch.dtype = torch.float64,
    seed: int = 1,
    adapter_dtype: torch.dtype | None = None,
    init: Any = False,
) -> tuple[Any, ...]:
    """``(model, inputs, config, params, fwd, peft_model)`` for method ``name`` ("LoHa"/"LoKr") with ``kw``."""
    torch.manual_seed(0)
    model = factory().to(dtype).eval()
    x = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs())
    config = getattr(fp, f"{name}Config")(init_weights=init, **kw)
    params, fwd = quiet(fp.adapt, model, config, generator=torch.Generator().manual_seed(seed))
    if adapter_dtype is not None:
        params = {
            p: {n: t.detach().to(adapter_dtype).requires_grad_() for n, t in e.items()} for p, e in params.items()
        }
    peft_config = getattr(peft, f"{name}Config")(init_weights=init, **kw)
    peft_model = quiet(
        peft.get_peft_model, copy.deepcopy(model), peft_config, autocast_adapter_dtype=adapter_dtype is None
    )
    result = peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if ".hada_" in k or ".lokr_" in k]
    return model, x, config, params, fwd, peft_model.eval()


def our_key(peft_name: str) -> str:
    """PEFT's trainable parameter name as ``<path>.<leaf>`` of funcpeft's params."""
    key = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return key.replace("base_layer.", "").replace("modules_to_save.", "")


def flat(params: fp.Params) -> dict[str, torch.Tensor]:
    return {f"{path}.{leaf}": t for path, entry in params.items() for leaf, t in entry.items()}


def peft_trainable(peft_model: Any) -> dict[str, torch.Tensor]:
    return {our_key(n): p for n, p in peft_model.named_parameters() if p.requires_grad}


def check_bfloat16_base(method: str, case: tuple[Any, ...]) -> None:
    """PEFT upcasts a half-precision base's adapters to float32; so does funcpeft; the delta is applied in float32."""
    _, factory, inputs, kw = case
    model, x, config, params, fwd, peft_model = setup(method, factory, inputs, kw, dtype=torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in flat(params).values())
    result = out(fwd(params, *x))
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(result, out(peft_model(*x)), rtol=0, atol=0)


def check_bfloat16_adapters(method: str, case: tuple[Any, ...]) -> None:
    _, factory, inputs, kw = case
    model, x, config, params, fwd, peft_model = setup(method, factory, inputs, kw, torch.bfloat16, 1, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in peft_model.parameters())
    torch.testing.assert_close(out(fwd(params, *x)), out(peft_model(*x)), rtol=0, atol=0)


def check_merge(method: str, factory: Any, inputs: Any, kw: dict[str, Any]) -> None:
    """``fwd.merge`` equals the forward and PEFT's ``merge_and_unload``."""
    model, x, config, params, fwd, peft_model = setup(method, factory, inputs, kw)
    merged = fwd.merge(params)
    twin = copy.deepcopy(model)
    twin.load_state_dict(merged)
    result = out(fwd(params, *x))
    torch.testing.assert_close(out(twin(*x)), result, rtol=1e-10, atol=1e-10)
    theirs = peft_model.merge_and_unload().state_dict()
    assert theirs.keys() == merged.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-12, atol=1e-14, msg=key)


def check_effective_weight(method: str, name: str, case: tuple[Any, ...]) -> None:
    """``effective_weight`` run through the base layer equals the layer's forward."""
    from funcpeft import _layers
    from funcpeft.methods.base import build_layers

    _, factory, inputs, kw = case
    model, x, config, params, fwd, _ = setup(method, factory, inputs, kw)
    modules = dict(model.named_modules())
    probes = {"lin0": x[0]} if name == "linear" else {"c1": x[0], "c2": x[1]}
    for path, layer in build_layers(model, config, list(fwd.targets)).items():
        if path not in probes:
            continue
        module, entry = modules[path], params[path]
        weight, bias = layer.effective_weight(module, entry)
        expected = layer.forward(module, entry, lambda m, *a, **k: m(*a, **k), probes[path])
        torch.testing.assert_close(_layers.run(module, layer.kind, probes[path], weight, bias), expected)


def check_dropouts_draw_as_peft(method: str, case: tuple[Any, ...], drop: dict[str, float]) -> None:
    """Train-mode rank/module dropout: the same draws as PEFT's give the same outputs; eval mode is exact."""
    _, factory, inputs, kw = case
    model, x, config, params, fwd, peft_model = setup(method, factory, inputs, {**kw, **drop})
    model.train(), peft_model.train()
    outputs, matched = [], 0
    base = out(model(*x))
    for seed in range(8):
        torch.manual_seed(seed)
        ours = out(fwd(params, *x))
        torch.manual_seed(seed)
        theirs = out(peft_model(*x))
        if "module_dropout" not in drop:
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        # with module dropout, PEFT skips the rank draw of a dropped module (funcpeft does not): later draws differ
        matched += torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12) and not torch.allclose(ours, base)
        outputs.append(ours)
    assert matched >= 2, "the same draws as PEFT's give the same outputs"
    assert len({tuple(o.flatten().tolist()) for o in outputs}) > 1, "train mode must draw new masks"
    model.eval(), peft_model.eval()
    torch.testing.assert_close(out(fwd(params, *x)), out(peft_model(*x)), rtol=1e-12, atol=1e-12)
