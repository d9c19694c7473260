"""``fwd.merge``: the model's ``state_dict()`` with an adapter folded into its weights.

Each method says what the adapted weight is (``effective_weight``, the same math as its forward); this module
only decides where that weight goes so that ``model2.load_state_dict(merged)`` accepts it and computes it:

- a plain parameter is replaced under its own key;
- a parametrized parameter (``torch.nn.utils.parametrize``: ``parametrizations.weight_norm``, ``orthogonal``,
  user parametrizations) stores its *originals* (``parametrizations.weight.original[0..]``): they are computed
  with the parametrizations' ``right_inverse`` and accepted only if the parametrization maps them back to the
  merged weight (an orthogonal parametrization cannot represent ``W + delta``: refused, naming the module);
- the legacy hook-based ``torch.nn.utils.weight_norm`` stores ``weight_g``/``weight_v``;
- a weight tied to another module (an input embedding shared with the LM head) cannot hold the adapter alone:
  refused, where PEFT silently changes the head too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from funcpeft import _layers, _quant, _sharded
from funcpeft.methods.base import AdapterLayer

__all__ = ["merged_state_dict"]


def merged_state_dict(
    model: nn.Module,
    layers: Mapping[str, AdapterLayer],
    copies: Mapping[str, tuple[str, ...]],
    params: Mapping[str, Mapping[str, Tensor]],
    dequantize: bool = False,
) -> dict[str, Tensor]:
    """See :meth:`funcpeft.Adapted.merge`; ``params`` has been validated against the model.

    A quantized target (:mod:`funcpeft._quant`) is merged from its dequantized weight and stored re-quantized in
    its own format, or as a float weight with ``dequantize`` (which also stores every other quantized weight of
    the model as float, so the result loads into the unquantized architecture).

    Raises:
        ValueError: a layer's adapted weight cannot be stored where ``load_state_dict`` would put it back (tied,
            not representable by its parametrization, a grouped conv's adapter mixing groups, a ``lora_bias``
            on a layer without a bias, a quantized format funcpeft cannot re-quantize without ``dequantize``).
    """
    state = _quant.state_dict(model)  # (not bitsandbytes' in-place rewrite of repacked 4-bit layers)
    modules = dict(model.named_modules())
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    done: set[str] = set()
    with torch.no_grad():
        for path, entry in params.items():
            module, prefix = modules[path], path + "."
            for name in copies.get(path, ()):
                state[prefix + name] = _sharded.like(entry[name].detach(), state[prefix + name])
            layer = layers.get(path)
            if layer is None:
                continue
            if hasattr(layer, "merged_entries"):  # a layer with several weights (nn.MultiheadAttention's LoRA)
                _store_entries(state, module, path, layer, entry, owners)
                continue
            shares = getattr(layer, "tied", ())  # modules computing with this entry too (trainable tokens' LM head)
            tied = [n for n in owners.get(id(module.weight), []) if n != prefix + "weight" and n not in shares]
            if tied:
                raise ValueError(
                    f"Cannot merge the adapter on {path!r}: its weight is tied to {tied}, so folding the adapter "
                    "into one tensor would change those modules too (PEFT silently does). Untie the weights "
                    "first, or keep the adapter unmerged."
                )
            tensors = {k: _upcast(v.detach()) for k, v in entry.items()}
            weight, bias = layer.effective_weight(_MergeSource(module, tensors.get("bias")), tensors)
            weight = _layers.to_module_layout(module, layer.kind, weight)
            if _quant.describe(module) is not None:
                value = weight.detach()
                entries = _quant.float_entries(module, value) if dequantize else _quant.requantized(module, path, value)
                _put(state, prefix, entries)
                done.add(path)
            else:
                _store(state, module, path, "weight", weight)
                for name in shares:  # one tied tensor: every name loads the merged value
                    state[name] = state[prefix + "weight"]
            if bias is not None:
                if getattr(module, "bias", None) is None:
                    raise ValueError(
                        f"Cannot merge `lora_bias` of {path!r}: the base layer has no bias to fold it into."
                    )
                _store(state, module, path, "bias", bias)
        if dequantize:
            for path, module in modules.items():
                if path not in done and _quant.describe(module) is not None:
                    _put(state, path + "." if path else "", _quant.float_entries(module))
    return state


def _store_entries(
    state: dict[str, Tensor],
    module: nn.Module,
    path: str,
    layer: Any,
    entry: Mapping[str, Tensor],
    owners: Mapping[int, list[str]],
) -> None:
    """Merge a layer that adapts several weights: ``layer.merged_entries(module, tensors)`` gives each merged
    tensor by its name relative to ``module`` (``in_proj_weight``, ``out_proj.weight``), computed in float32 from
    half-precision weights (as :class:`_MergeSource`) and stored in each weight's dtype."""
    tensors = {k: _upcast(v.detach()) for k, v in entry.items()}
    for name, value in layer.merged_entries(_Upcast(module), tensors).items():
        sub, _, attr = name.rpartition(".")
        owner = module.get_submodule(sub) if sub else module
        key = f"{path}.{name}" if path else name
        tied = [n for n in owners.get(id(getattr(owner, attr)), []) if n != key]
        if tied:
            raise ValueError(
                f"Cannot merge the adapter on {path!r}: its {name!r} is tied to {tied}, so folding the adapter into "
                "one tensor would change those too. Untie the weights first, or keep the adapter unmerged."
            )
        _store(state, owner, f"{path}.{sub}" if sub and path else sub or path, attr, value)


class _Upcast:
    """A module (and its submodules) whose half-precision parameters read as float32, for exact merging."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._module, name)
        if isinstance(value, nn.Module):
            return _Upcast(value)
        return _upcast(value.detach()) if isinstance(value, Tensor) and value.is_floating_point() else value


def _put(state: dict[str, Tensor], prefix: str, entries: Mapping[str, Tensor | None]) -> None:
    """Write a module's entries (relative names) into ``state``; ``None`` removes a key, and the name
    ``"weight."`` every key under it (a bitsandbytes 4-bit quant state)."""
    for name, value in entries.items():
        if name.endswith("."):
            for key in [k for k in state if k.startswith(prefix + name)]:
                del state[key]
        elif value is None:
            state.pop(prefix + name, None)
        else:
            state[prefix + name] = value


def _store(state: dict[str, Tensor], module: nn.Module, path: str, name: str, value: Tensor) -> None:
    """Put the merged tensor ``value`` for ``module.<name>`` into ``state`` under the keys that load it back."""
    prefix = f"{path}.{name}" if path else name
    dtype = getattr(module, name).dtype
    if parametrize.is_parametrized(module, name):
        originals = _originals(module, path, name, value)
        plist = module.parametrizations[name]
        keys = ["original"] if hasattr(plist, "original") else [f"original{i}" for i in range(len(originals))]
        base = f"{path}.parametrizations.{name}." if path else f"parametrizations.{name}."
        for key, tensor in zip(keys, originals, strict=True):
            state[base + key] = tensor.to(getattr(plist, key).dtype)
        return
    legacy = _legacy_weight_norm(module, name)
    if legacy is not None:
        g = torch.norm_except_dim(value, 2, legacy.dim)
        base = f"{path}." if path else ""
        state[f"{base}{name}_g"] = g.to(getattr(module, f"{name}_g").dtype)
        state[f"{base}{name}_v"] = value.to(getattr(module, f"{name}_v").dtype)
        return
    if prefix not in state:
        raise ValueError(
            f"Cannot merge the adapter on {path!r}: its `{name}` is not in the model's state_dict under {prefix!r}, "
            "so load_state_dict could not restore the merged tensor. Keep the adapter unmerged for this module."
        )
    state[prefix] = _sharded.like(value.to(dtype), state[prefix])


def _originals(module: nn.Module, path: str, name: str, value: Tensor) -> tuple[Tensor, ...]:
    """The parametrization's originals whose parametrized value is ``value`` (checked, not assumed)."""
    plist = module.parametrizations[name]
    current: Any = value
    for p in reversed(plist):
        inverse = getattr(p, "right_inverse", None)
        if inverse is None:
            raise ValueError(
                f"Cannot merge the adapter on {path!r}: its `{name}` is parametrized by {type(p).__name__}, which "
                "has no `right_inverse`, so no stored original is known to produce the merged weight. Keep the "
                "adapter unmerged, or give the parametrization a right_inverse."
            )
        current = inverse(current)
    originals = tuple(current) if isinstance(current, (tuple, list)) else (current,)
    back = plist[0](*originals)
    for p in list(plist)[1:]:
        back = p(back)
    eps = torch.finfo(value.dtype).eps if value.is_floating_point() else 0.0
    scale = float(value.abs().max()) if value.numel() else 0.0
    if back.shape != value.shape or not torch.allclose(back, value, rtol=256 * eps, atol=256 * eps * scale):
        kinds = ", ".join(type(p).__name__ for p in plist)
        raise ValueError(
            f"Cannot merge the adapter on {path!r}: its `{name}` is parametrized ({kinds}), and the merged weight "
            "is not a value that parametrization can produce (e.g. an orthogonal parametrization cannot hold "
            "W + delta). Keep the adapter unmerged for this module, or remove the parametrization first."
        )
    return originals


def _legacy_weight_norm(module: nn.Module, name: str) -> Any:
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return hook
    return None


def _upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _MergeSource:
    """A layer as ``effective_weight`` should see it when merging: half-precision weight and bias read as float32
    (merge exactly, cast back once), and the adapter's trainable bias copy, if any, in place of the base bias."""

    def __init__(self, module: nn.Module, bias: Tensor | None) -> None:
        self._module = module
        quantized = _quant.describe(module) is not None
        self.weight = _quant.dequantized(module) if quantized else _upcast(_sharded.full(module.weight))
        base_bias = getattr(module, "bias", None)
        self.bias = bias if bias is not None else (None if base_bias is None else _upcast(_sharded.full(base_bias)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)
