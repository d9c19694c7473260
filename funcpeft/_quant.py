"""Quantized base weights: recognising them, reading them as float, and storing a merged weight back.

Two families hold a quantized weight on an ordinary-looking layer:

- torchao tensor subclasses on an ``nn.Linear`` (``quantize_(model, Int8WeightOnlyConfig())`` gives an
  ``Int8Tensor``, ``IntxWeightOnlyConfig`` an ``IntxUnpackedToInt8Tensor``, ``to_nf4`` an ``NF4Tensor``): their
  ``dtype`` reads as float, so a dtype check does not see them;
- bitsandbytes ``Linear8bitLt`` (an int8 ``Int8Params`` weight, row scales ``SCB``) and ``Linear4bit`` (a packed
  ``Params4bit`` weight with a ``quant_state``), whose state dicts carry extra keys.

Adapters never fold into such a weight for a call (the fold and in-place paths of :mod:`funcpeft.methods.lora`
ask :func:`is_quantized`). ``fwd.merge`` reads the base as :func:`dequantized`, adds the adapter in float32 and
stores the result with :func:`requantized` in the base's own format (as PEFT's ``TorchaoLoraLinear.merge`` and
its bnb layers re-quantize), or, with ``dequantize=True``, as a plain float weight (:func:`float_entries`).
A format whose recipe cannot be recovered from the tensor is refused, naming the module and the format: never a
merged weight silently cast to int8.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from funcpeft import _sharded

__all__ = [
    "BNB_EXTRA",
    "describe",
    "dequantized",
    "base_forward",
    "detours",
    "float_entries",
    "is_quantized",
    "needs_detour",
    "requantized",
    "state_dict",
]

# State-dict keys a bitsandbytes layer stores beside its weight (8-bit: row scales and a format tag; 4-bit: the
# quant state's tensors, all under "weight.").
BNB_EXTRA = ("SCB", "weight_format")


def _bnb_kind(module: nn.Module, weight: Tensor | None = None) -> str | None:
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in ("Linear8bitLt", "Linear4bit"):
            weight = getattr(module, "weight", None) if weight is None else weight
            if cls.__name__ == "Linear8bitLt" and (weight is None or weight.dtype != torch.int8):
                return None  # has_fp16_weights=True: a float weight, quantized on the fly
            return cls.__name__
    return None


def describe(module: nn.Module) -> str | None:
    """The quantized format of ``module``'s weight in words (``None``: a plain dense weight)."""
    bnb = _bnb_kind(module)
    if bnb is not None:
        return f"bitsandbytes {bnb}"
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        weight = _sharded.local(weight)  # an FSDP2 shard of a float weight is a float weight
    if isinstance(weight, Tensor) and type(weight) not in _PLAIN:
        return f"{type(weight).__module__.split('.')[0]} {type(weight).__name__}"
    if isinstance(weight, Tensor) and not (weight.is_floating_point() or weight.is_complex()):
        return f"a {weight.dtype} weight"
    return None


def is_quantized(weight: Tensor) -> bool:
    """Whether ``weight`` is anything but a plain float tensor (a tensor subclass, or an integer tensor)."""
    if type(weight) in _PLAIN:  # (first: no lookup of the sharded check, hence no guards on it, when compiled)
        return not weight.is_floating_point()
    weight = _sharded.local(weight)
    return type(weight) not in _PLAIN or not weight.is_floating_point()


_PLAIN = (Tensor, nn.Parameter)


def dequantized(module: nn.Module, weight: Tensor | None = None) -> Tensor:
    """``module``'s weight (or ``weight``, a tensor ``module`` computes with: a ``base=`` call's) as a plain float
    tensor in its module layout (detached; a sharded weight is gathered whole: :mod:`funcpeft._sharded`)."""
    weight = module.weight if weight is None else weight
    bnb = _bnb_kind(module, weight)
    if _sharded.is_sharded(weight):
        if type(_sharded.local(weight)) not in _PLAIN:
            raise ValueError(
                f"The weight of this {type(module).__name__} is both sharded (a DTensor) and quantized "
                f"({describe(module)}): funcpeft cannot read it whole. Gather the model's full state dict first "
                "(torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True) and load "
                "it into an unsharded model."
            )
        return _sharded.full(weight).float()
    if bnb == "Linear8bitLt":
        import bitsandbytes.functional as bf

        scb = _scb(module, weight)
        return bf.int8_vectorwise_dequant(weight.data, scb).float()
    if bnb == "Linear4bit":
        import bitsandbytes.functional as bf

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks the weight for its CPU kernel at the first eval no_grad call; undo it on a copy
            # of the quant state (the inverse rewrites the state it is given), leaving the module as it is.
            data, state = bf._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        return bf.dequantize_4bit(data, state).float()
    # (The type is read before detaching: NF4Tensor's detach is a no-op that keeps the Parameter class.)
    with torch.no_grad():
        if type(weight).__name__ == "NF4Tensor":
            return weight.get_original_weight().float()
        if type(weight) not in _PLAIN:
            dequantize = getattr(weight, "dequantize", None)
            if dequantize is None:
                raise ValueError(f"The {describe(module)} weight has no `dequantize()`, so it cannot be read as float.")
            return dequantize().float()
        return weight.detach().float()


def _scb(module: nn.Module, weight: Tensor) -> Tensor:
    scb = getattr(weight, "SCB", None)
    return module.state.SCB if scb is None else scb


def requantized(module: nn.Module, path: str, value: Tensor) -> dict[str, Tensor]:
    """``value`` (a float weight in module layout) in ``module``'s quantized format, as the state-dict entries
    (names relative to the module) that ``load_state_dict`` into a module quantized the same way restores.

    Raises:
        ValueError: the format's recipe cannot be recovered from the stored tensor (naming module and format).
    """
    fmt = describe(module)
    bnb = _bnb_kind(module)
    if bnb == "Linear8bitLt":
        import bitsandbytes.functional as bf

        cb, scb, _ = bf.int8_vectorwise_quant(value.to(torch.float16 if value.is_cuda else torch.float32))
        return {"weight": cb, "SCB": scb.float(), "weight_format": torch.tensor(0, dtype=torch.uint8)}
    if bnb == "Linear4bit":
        raise ValueError(
            f"Cannot merge the adapter on {path!r} in its format (bitsandbytes Linear4bit): `load_state_dict` cannot "
            "restore a 4-bit weight (bitsandbytes keeps its quant state under extra `weight.*` keys that only "
            "`Params4bit.from_prequantized` / transformers' `from_pretrained` read), so no merged state dict of this "
            "model would load back. Pass `fwd.merge(params, dequantize=True)` for a float state dict of the whole "
            "model (load it into the unquantized architecture, then quantize it to 4 bit again), or keep the "
            "adapter unmerged."
        )
    data = module.weight.detach()
    name = type(data).__name__
    rebuilt = None
    if name == "NF4Tensor":
        from torchao.quantization import to_nf4

        rebuilt = lambda w: to_nf4(w.to(data.dtype), data.block_size, data.scaler_block_size)  # noqa: E731
    elif name == "Int8Tensor" and getattr(data, "act_quant_kwargs", None) is None:
        rebuilt = _int8_recipe(data)
    elif name == "IntxUnpackedToInt8Tensor" and getattr(data, "activation_quantization", None) is None:
        rebuilt = lambda w: type(data).from_hp(w.to(data.dtype), tuple(data.block_size), data.target_dtype)  # noqa: E731
    # The recipe is inferred from the tensor's attributes: accept it only if it reproduces the stored weight.
    if rebuilt is not None and _reproduces(rebuilt, module):
        return {"weight": rebuilt(value)}
    raise ValueError(
        f"Cannot merge the adapter on {path!r}: its weight is a {fmt}, whose quantization recipe funcpeft cannot "
        "recover from the tensor to re-quantize the merged weight. Pass `fwd.merge(params, dequantize=True)` for "
        "a float state dict of the whole model (load it into the unquantized architecture, then quantize it "
        "again), or keep the adapter unmerged."
    )


def _int8_recipe(data: Tensor):
    from torchao.quantization.granularity import PerGroup, PerRow

    block = list(data.block_size)
    zero = getattr(data, "zero_point", None)
    if (zero is not None and bool(zero.any())) or len(block) != 2 or block[0] != 1:
        return None  # only symmetric (zero-point-free) row or group scales are rebuilt
    granularity = PerRow() if block[1] == data.shape[-1] else PerGroup(block[1])
    return lambda w: type(data).from_hp(w.to(data.dtype), granularity)


def _reproduces(rebuilt, module: nn.Module) -> bool:
    """Whether ``rebuilt`` applied to the base's own dequantized weight gives a tensor of the same type and block
    layout that approximates it (within 10% in norm: re-quantizing a quantized weight is not idempotent, e.g. int4's
    asymmetric range [-8, 7] moves the symmetric scale; a wrong recipe fails the type or block check)."""
    data = module.weight.detach()
    try:
        weight = dequantized(module)
        again = rebuilt(weight)
        same = type(again) is type(data) and getattr(again, "block_size", None) == getattr(data, "block_size", None)
        return same and bool((_float(again) - weight).norm() <= 0.1 * weight.norm())
    except Exception:  # a recipe guessed wrong: refuse (below) rather than fail obscurely
        return False


def _float(t: Tensor) -> Tensor:
    if type(t).__name__ == "NF4Tensor":
        return t.get_original_weight().float()
    return t.dequantize().float()


def float_entries(module: nn.Module, value: Tensor | None = None) -> dict[str, Tensor | None]:
    """State-dict entries (relative names) storing ``module`` with a float weight (``value``, default: its own
    dequantized): ``None`` marks a bitsandbytes key that the unquantized architecture has not."""
    entries: dict[str, Tensor | None] = {"weight": dequantized(module) if value is None else value}
    if _bnb_kind(module) is not None:
        for key in BNB_EXTRA:
            entries[key] = None
        entries["weight."] = None  # every "weight.<quant state>" key of a 4-bit layer
    return entries


def _detoured(module: nn.Module) -> bool:
    """Whether ``module``'s forward is an ``autograd.Function`` torch.func cannot transform (bitsandbytes' matmuls,
    torchao's NF4 ``linear``: no ``setup_context``)."""
    return _bnb_kind(module) is not None or type(getattr(module, "weight", None)).__name__ == "NF4Tensor"


def needs_detour(module: nn.Module) -> bool:
    """Whether ``module``'s own forward cannot run here: a :func:`_detoured` layer inside a torch.func transform."""
    return torch._C._functorch.peek_interpreter_stack() is not None and _detoured(module)


def base_forward(module: nn.Module) -> Any:
    """``type(module).forward``, or for a layer whose forward torch.func cannot transform (:func:`_detoured`) a
    forward that, inside a transform, computes the frozen layer through :class:`_FrozenLinear` instead.

    ``adapt`` runs every such module of the model through it, adapted or not (an unadapted 4-bit head would
    otherwise stop ``torch.func.grad`` of the whole model), and hands it to the methods as their ``base``, so
    every method's forward, mixed batches and vmap get the detour from this one place. The detour is also taken
    with gradients on a bitsandbytes 4-bit layer that bitsandbytes repacked for inference (:func:`_repacked`)."""
    own = type(module).forward
    if not _detoured(module):
        return own

    def forward(layer: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return own(layer, x, *args, **kwargs)
        if torch._C._functorch.peek_interpreter_stack() is None and not (torch.is_grad_enabled() and _repacked(layer)):
            return own(layer, x)
        out = _FrozenLinear.apply(x, layer, own)
        bias = getattr(layer, "bias", None)
        if isinstance(bias, Tensor) and bias.requires_grad:  # a trainable bias (an adapter's copy): its gradient,
            out = out + (bias - bias.detach())  # through an exact zero that keeps the output as the kernel gave it
        return out

    return forward


def _repacked(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer repacked for its CPU inference kernel (done by bitsandbytes at the first eval-mode
    ``no_grad`` call): that kernel adds the bias in place, so it fails whenever gradients flow through it (the
    plain model and PEFT fail too). The detour computes the same output and the gradient as before the repacking."""
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def detours(modules: dict[str, nn.Module], skip: Any) -> dict[str, Any]:
    """:func:`base_forward` for every :func:`_detoured` module whose path is not in ``skip`` (the adapted ones)."""
    return {path: base_forward(m) for path, m in modules.items() if path not in skip and _detoured(m)}


class _FrozenLinear(torch.autograd.Function):
    """``base(module, x)`` as torch.func can transform it: the frozen layer's output computed by its own kernel
    without tracking, and the gradient with respect to ``x`` through the dequantized weight, which is what
    bitsandbytes' and NF4's own backward compute (``grad @ dequant(W)``), so ``torch.func.grad`` equals autograd.
    Under ``vmap`` the mapped dimension is one more leading batch dimension of the linear layer."""

    @staticmethod
    def forward(x: Tensor, module: nn.Module, base: Any) -> Tensor:
        with torch.no_grad():
            return base(module, x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        # The weight is read now, inside the call: a view's weight (a ``base=`` call's tensor) is bound to the call
        # only while it runs, and backward runs after it has returned.
        ctx.module, ctx.weight = inputs[1], inputs[1].weight

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        weight = dequantized(ctx.module, ctx.weight).to(grad.dtype)
        return grad @ weight, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, module: nn.Module, base: Any) -> tuple[Tensor, int]:
        if in_dims[0] is None:
            return _FrozenLinear.apply(x, module, base), None
        x = x.movedim(in_dims[0], 0)
        n = x.shape[0]
        out = _FrozenLinear.apply(x.reshape(n * x.shape[1], *x.shape[2:]) if x.dim() > 2 else x, module, base)
        return out.reshape(n, *x.shape[1:-1], out.shape[-1]), 0


def state_dict(model: nn.Module, keep_vars: bool = False) -> dict[str, Tensor]:
    """``model.state_dict(keep_vars=keep_vars)``, leaving the model as it is. bitsandbytes'
    ``Linear4bit._save_to_state_dict`` undoes its CPU repacking (:func:`_repacked`) *in place*, on the module's
    weight and quant state, and lossily (the repacked block scales are bfloat16): a model that ran eval inference
    would have its weights rewritten by a read. Such a layer is saved from a copy (its own weight object and quant
    state over the same data), reached through copies of its ancestors; every other module saves itself, with the
    same tensors and hooks (with ``keep_vars``, the same parameter objects, but a repacked layer's weight, which is
    a copy's)."""
    repacked = [path for path, m in model.named_modules() if _bnb_kind(m) == "Linear4bit" and _repacked(m)]
    if not repacked:
        return model.state_dict(keep_vars=keep_vars)
    return _saved_from_copies(model, "", repacked).state_dict(keep_vars=keep_vars)


def _saved_from_copies(module: nn.Module, path: str, repacked: list[str]) -> nn.Module:
    """``module``, or a shallow copy of it whose repacked layers (at ``repacked``) are copies (:func:`state_dict`)."""
    if path in repacked:
        weight = module.weight
        own = torch.Tensor._make_subclass(type(weight), weight.data, weight.requires_grad)
        own.__dict__.update(weight.__dict__)
        own.quant_state = copy.copy(weight.quant_state)  # (the inverse of the repacking rewrites the state it gets)
        clone = copy.copy(module)
        clone.__dict__["_parameters"] = {**module._parameters, "weight": own}
        return clone
    prefix = path + "." if path else ""
    if not any(r.startswith(prefix) for r in repacked):
        return module
    clone = copy.copy(module)
    clone.__dict__["_modules"] = {
        name: child if child is None else _saved_from_copies(child, prefix + name, repacked)
        for name, child in module._modules.items()
    }
    return clone
