"""The PEFT-named children and one-off subclasses the drop-in API gives adapted and saved modules."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from funcpeft import _layers
from funcpeft.methods.base import AdapterLayer

# Children every adapted module gets, in PEFT's order (the seed prints the empty embedding dicts on a Linear).
_CONTAINERS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_dropout", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"),
    "adalora": ("lora_dropout", "lora_A", "lora_B", "lora_E"),
}
# PEFT_TYPE_TO_PREFIX_MAPPING: how PEFT finds module paths in a state dict's keys (``inject(..., state_dict=)``).
_KEY_PREFIX: dict[str, str] = {"LORA": "lora_", "ADALORA": "lora_", "IA3": "ia3_", "OFT": "oft_"}
# Leaves held as ``<container>[name].weight`` (PEFT's nn.Linear/conv children); all others are parameters in
# ParameterDicts (``<container>[name]``), per method.
_MODULE_LEAVES: dict[str, frozenset[str]] = {
    "lora": frozenset({"lora_A", "lora_B", "lora_magnitude_vector"}),
    "oft": frozenset({"oft_R", "oft_embedding_R"}),
}
_SAVED = "modules_to_save"


class DoraMagnitude(nn.Module):
    """Holds DoRA's magnitude as ``weight``, so its parameter is PEFT's ``lora_magnitude_vector.<name>.weight``."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class OFTRotation(DoraMagnitude):
    """Holds OFT's packed skew-symmetric blocks as ``weight``: PEFT's ``oft_R.<name>.weight`` (its
    ``OFTRotationModule``)."""


# ----- the one-off subclasses ----------------------------------------------------------------------------------
class _Adapted:
    """Mixed in before an adapted module's own class: ``forward`` runs the active adapter's method layer."""

    _funcpeft_layers: dict[str, AdapterLayer]  # adapter name -> the method's layer (carries r, scaling, ...)
    _funcpeft_leaves: dict[str, tuple[str, ...]]  # adapter name -> its tensor names (the layer's init keys)
    _funcpeft_containers: tuple[str, ...]
    _funcpeft_active: str

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's ``LoraLayer.active_adapters``: the adapter names this module runs (possibly absent from it)."""
        return [self._funcpeft_active]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        base = _ORIGINAL[type(self)].forward
        name = self._funcpeft_active
        layer = self._funcpeft_layers.get(name)
        if layer is None:
            return base(self, *args, **kwargs)
        return layer.forward(self, _adapter_tensors(self, name), base, *args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _rebuild, (_ORIGINAL[type(self)], _Adapted), self.__dict__


class _Saved:
    """Mixed in before a ``modules_to_save`` module's class: the active adapter's trainable copy runs, if any."""

    _funcpeft_active: str | None  # None: PEFT's wrapper with no active adapter (its original runs)

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's ``ModulesToSaveWrapper.active_adapters``: the active adapter if this module has a copy for it."""
        return [self._funcpeft_active] if self._funcpeft_active in self._modules[_SAVED] else []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        saved = self._modules[_SAVED]
        if self._funcpeft_active in saved:
            return saved[self._funcpeft_active](*args, **kwargs)
        return _ORIGINAL[type(self)].forward(self, *args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _rebuild, (_ORIGINAL[type(self)], _Saved), self.__dict__


_ORIGINAL: dict[type, type] = {}  # one-off subclass -> the module's own class
_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(cls: type, mixin: type) -> type:
    """``cls`` with ``mixin`` in front, under the same name, so ``repr(model)`` reads as before (one per class)."""
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        sub = type(cls.__name__, (mixin, cls), {"__qualname__": cls.__qualname__, "__module__": cls.__module__})
        _ORIGINAL[sub] = cls
        _SUBCLASSES[key] = sub
    return _SUBCLASSES[key]


def _rebuild(cls: type, mixin: type) -> nn.Module:
    """Unpickle/deepcopy an adapted module: pickle finds ``cls`` by name, not the one-off subclass."""
    sub = _subclass(cls, mixin)
    return sub.__new__(sub)


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``-d model (``OptimizedModule``) wraps, repeatedly; otherwise ``model`` itself."""
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def _adapter_tensors(module: nn.Module, name: str) -> dict[str, Tensor]:
    """The method's ``{tensor_name: Tensor}`` for adapter ``name``, read from the PEFT-named children."""
    out = {}
    for leaf in module._funcpeft_leaves[name]:
        container, _, attr = leaf.partition(".")
        held = module._modules[container][name]
        out[leaf] = getattr(held, attr or "weight") if isinstance(held, nn.Module) else held
    return out


# ----- building the children -------------------------------------------------------------------------------------
def _module_for(leaf: str, tensors: Mapping[str, Tensor], module: nn.Module, kind: _layers.Kind) -> nn.Module:
    """The PEFT-shaped module holding ``tensors[leaf]`` (and ``lora_B.bias``), built on meta and filled in."""
    t = tensors[leaf]
    if leaf == "lora_magnitude_vector":
        return DoraMagnitude(t)
    if leaf in ("oft_R", "oft_embedding_R"):
        return OFTRotation(t)
    bias = leaf == "lora_B" and "lora_B.bias" in tensors
    if kind is _layers.Kind.CONV:
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[t.dim()]
        if leaf == "lora_A":  # the base's kernel, stride, padding and dilation, as the math (_layers.conv) uses
            child = conv(t.shape[1], t.shape[0], tuple(t.shape[2:]), module.stride, module.padding,
                         module.dilation, bias=False, padding_mode=module.padding_mode, device="meta")  # fmt: skip
        else:  # a 1x1 conv with the base's groups
            groups = module.groups
            child = conv(t.shape[1] * groups, t.shape[0], 1, groups=groups, bias=bias, device="meta")
    else:
        child = nn.Linear(t.shape[1], t.shape[0], bias=bias, device="meta")
    child.weight = nn.Parameter(t)
    if bias:
        child.bias = nn.Parameter(tensors["lora_B.bias"])
    return child


def _initial_tensors(module: nn.Module, layer: AdapterLayer) -> dict[str, Tensor]:
    """The method's fresh tensors (global RNG, as PEFT), in the base weight's dtype as PEFT's low-level API has them."""
    tensors = layer.init(module, None)
    for leaf in tensors:
        if "." in leaf and leaf != "lora_B.bias":
            raise NotImplementedError(f"funcpeft.compat cannot hold the tensor {leaf!r} of {type(layer).__name__} yet.")
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        tensors = {k: v.to(weight.dtype) for k, v in tensors.items()}
    return tensors


def _add_adapter(module: nn.Module, layer: AdapterLayer, tensors: dict[str, Tensor], method: str, name: str) -> None:
    """Turn ``module`` into an adapted module (once) and add adapter ``name`` holding ``tensors``."""
    if not isinstance(module, _Adapted):
        module._funcpeft_layers, module._funcpeft_leaves = {}, {}
        module._funcpeft_containers = _CONTAINERS.get(method, ())
        for container in module._funcpeft_containers:
            held_as_modules = container == "lora_dropout" or container in _MODULE_LEAVES.get(method, ())
            dict_type = nn.ModuleDict if held_as_modules else nn.ParameterDict
            module.add_module(container, dict_type())
        module.__class__ = _subclass(type(module), _Adapted)
    containers = module._modules
    module_leaves = _MODULE_LEAVES.get(method, frozenset())
    if "lora_dropout" in containers:
        p = float(getattr(layer, "dropout", 0.0))
        containers["lora_dropout"][name] = nn.Dropout(p) if p > 0.0 else nn.Identity()
    for leaf in tensors:
        container = leaf.partition(".")[0]
        if container == leaf and container not in containers:
            holder = nn.ModuleDict() if leaf in module_leaves else nn.ParameterDict()
            module.add_module(container, holder)
            module._funcpeft_containers += (container,)
        if leaf in module_leaves:
            containers[container][name] = _module_for(leaf, tensors, module, layer.kind)
        elif container == leaf:
            containers[container][name] = nn.Parameter(tensors[leaf])
    for container in module._funcpeft_containers:  # PEFT leaves its new modules in train mode; follow the module
        containers[container].train(module.training)
    module._funcpeft_layers[name] = layer
    module._funcpeft_leaves[name] = tuple(tensors)


def _saved_copy(module: nn.Module, path: str, name: str) -> nn.Module:
    """The trainable copy ``modules_to_save`` keeps of ``module`` (of its original only, not of other adapters' copies).

    Made before the model is changed, so a module that cannot be copied (PEFT's ``ModulesToSaveWrapper`` deep-copies
    it the same way) is refused with nothing applied.

    Raises:
        TypeError: ``copy.deepcopy`` fails on the module (it holds a lock, a generator, an open file, ...).
    """
    try:
        clone = copy.deepcopy(module)
    except Exception as e:
        raise TypeError(
            f"`modules_to_save` entry {path!r} ({type(module).__name__}) cannot be deep-copied for adapter {name!r}'s "
            f"trainable copy ({type(e).__name__}: {e}); PEFT copies it the same way. Remove it from "
            "`modules_to_save`, or make the module deep-copyable (drop the attribute that holds the lock, generator "
            "or file, or give the class a `__deepcopy__`)."
        ) from e
    if isinstance(clone, _Saved):
        del clone._modules[_SAVED]
        del clone._funcpeft_active
        clone.__class__ = _ORIGINAL[type(clone)]
    return clone


def _add_saved(module: nn.Module, name: str, clone: nn.Module) -> None:
    """PEFT's ``ModulesToSaveWrapper`` without the wrapper: ``clone`` (see :func:`_saved_copy`) as ``name``'s copy.

    As in PEFT, a module that already keeps copies for other adapters gets the new one inactive (PEFT's
    ``_set_adapter`` left the wrapper with no active adapter and ``update`` does not activate it); a module saved for
    the first time runs the new copy.
    """
    if not isinstance(module, _Saved):
        module.add_module(_SAVED, nn.ModuleDict().train(module.training))
        module.__class__ = _subclass(type(module), _Saved)
        module._funcpeft_active = name
    module._modules[_SAVED][name] = clone.train(module.training)


# ----- undo -------------------------------------------------------------------------------------------------------
class _Undo:
    """Everything ``inject_adapter_in_model`` can change, recorded so a failure restores the model exactly.

    Per module: its class and its ``__dict__`` (attributes, and the contents of the dicts in it: ``_modules``,
    ``_parameters``, ``_buffers``, hooks, the adapter bookkeeping, ``peft_config``), plus every parameter's
    ``requires_grad``. Restoring puts the same objects back into the same dict objects, so references users hold
    (parameters, an optimizer, ``model.peft_config``) stay valid.
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = [
            (m, type(m), {k: (v, dict(v) if isinstance(v, dict) else None) for k, v in m.__dict__.items()})
            for m in model.modules()
        ]
        self._flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for module, cls, attributes in self._modules:
            for key in [k for k in module.__dict__ if k not in attributes]:
                del module.__dict__[key]
            for key, (value, contents) in attributes.items():
                if contents is not None:
                    value.clear()
                    value.update(contents)
                module.__dict__[key] = value
            module.__class__ = cls
        for p, flag in self._flags:
            p.requires_grad_(flag)
