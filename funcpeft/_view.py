"""How ``fwd`` intercepts module forwards without touching the user's model.

``adapt`` builds a *view* of the model once: for every module that behaves differently under the adapter
(adapted layers, modules whose parameters the adapter replaces, and all their ancestors) it creates an object
of a one-off subclass of the module's own class. The view object's ``__dict__`` holds the original module's
internal containers themselves (the parameter, buffer and hook dicts: shared objects, hence live), a snapshot of
its plain attributes (hyper-parameters such as ``in_features``: read at C speed, since the forward of a small
model is dominated by Python attribute lookups) and its own ``_modules`` dict, where viewed children replace the
originals. Flags, i.e. boolean attributes such as ``training`` and transformers' ``gradient_checkpointing`` (with
the ``_gradient_checkpointing_func`` set beside it), are read live from the original, so ``model.eval()``,
``.to()`` or ``gradient_checkpointing_enable()`` after ``adapt`` apply to ``fwd`` too. Attribute lookups are
``nn.Module``'s own (no ``__getattr__`` of the view's), which ``torch.compile`` resolves without guarding on each
lookup's dictionary membership. What differs lives only on the subclass:

- ``forward`` of an adapted layer: the method's adapted forward;
- parameters the adapter replaces (trainable bias copies, ``modules_to_save``): properties returning the
  adapter's tensor (properties are data descriptors, found before ``_parameters``).

The adapter's tensors reach these overrides through a ``threading.local`` binding that ``fwd`` sets for the
duration of one call and restores in ``finally``. Hence:

- the model is never modified: no attribute, parameter, hook or flag of it is written, not even temporarily,
  so other threads calling ``model(x)`` meanwhile see the base model, and a call that raises leaves nothing
  behind;
- threads calling ``fwd`` concurrently each see their own adapter (the binding is per thread);
- ``torch.func`` transforms and ``torch.compile`` see plain tensor arithmetic on ``fwd``'s arguments: no
  ``setattr`` on modules, no per-call tree building. The per-call cost is one thread-local read per intercepted
  module, and nothing is done per call that could be done once in ``adapt``;
- activation checkpointing works: outside any ``fwd`` call the binding holds the ``OUTSIDE`` marker, and the
  only code that runs the view then is autograd recomputing checkpointed layers during ``backward()``. Which
  adapter that recomputation must see is kept per autograd graph task (:class:`Recompute`): the outputs of each
  ``fwd`` call with gradients carry a gradient hook that, when ``backward()`` reaches them, records the call's
  adapter under the running graph task's id, and recomputation (in whichever thread autograd runs it) reads it
  from there. Threads, and successive ``backward()`` calls, each see their own call's adapter.

Limitations: children replaced, and non-boolean attributes reassigned or added (other than the checkpointing
function), on the model after ``adapt`` are not seen (call ``adapt`` again). A module whose ``forward`` was replaced
on the instance (accelerate's offloading hooks, a compiled submodule) would bypass the view, so ``adapt`` refuses it
(:mod:`funcpeft._preflight`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from funcpeft._recompute import Recompute

if TYPE_CHECKING:
    from funcpeft._base_calls import BaseTree

__all__ = ["Binding", "Computed", "OUTSIDE", "Override", "Recompute", "build_view"]


class Binding(threading.local):
    """The adapter tree bound to the current ``fwd`` call, per thread (``None``: the base model), for a mixed
    batch the per-row adapter selection (``rows``, see :class:`funcpeft.methods.base.Rows`), and for a call with
    ``base=`` the base tensors read instead of the model's own (``base``, see
    :class:`funcpeft._base_calls.BaseTree`)."""

    def __init__(self) -> None:
        # Set in __init__ (run once per thread) so torch.compile's guards always find the attributes.
        self.params: Any = OUTSIDE
        self.rows: Any = None
        self.base: Any = None  # a base call's resolved ``{canonical name: Tensor}`` (read only by base views)
        self.ran: set[str] | None = None  # while probing a first call: the adapted modules that ran
        # In an eager call with an adapter: computed parameter reads (Computed) already made, so a module that reads a
        # parameter many times (an expert stack indexed once per expert) computes W + delta once, as PEFT's cache.
        self.reads: dict[Any, Any] | None = None


# `Binding.params` outside any `fwd` call. The view only runs outside a call when autograd recomputes
# checkpointed layers during backward(): then the adapter of the last call with gradients applies.
OUTSIDE: Any = type("Outside", (), {"__repr__": lambda self: "<outside fwd>"})()


class Computed(NamedTuple):
    """A parameter read computed from the bound adapter: ``compute(params[owner], base, rows)``, where ``base`` is
    the parameter the view would read otherwise (detached under ``freeze``, or the call's ``base=`` tensor) and
    ``rows`` the mixed batch's selection or None (LoRA's ``target_parameters``: ``W + delta``). Without an entry
    ``owner``, the read is ``base``."""

    owner: str
    compute: Callable[[Mapping[str, Tensor], Tensor, Any], Tensor]


# An override: module path -> attribute name -> (owner path in params, key under it), or a Computed read.
Override = dict[str, dict[str, tuple[str, str] | Computed]]


def _computed(binding: Binding, recompute: Recompute, read: Computed, base: Any) -> Any:
    """``read`` applied to ``base`` with the adapter bound now (``base`` unchanged without its entry), computed once
    per call (``binding.reads``; a call reads one view, so one base tensor per parameter)."""
    params, rows, reads = binding.params, binding.rows, binding.reads
    if params is OUTSIDE:  # a checkpointed layer recomputed in backward: no call's cache applies
        params, rows, _ = recompute.lookup()
        reads = None
    entry = None if params is None else params.get(read.owner)
    if entry is None:
        return base
    ran = binding.ran
    if ran is not None:  # a read counts as its owner running (a parent may read a child's weight without calling it)
        ran.add(read.owner)
    if reads is None:
        return read.compute(entry, base, rows)
    key = (id(read), torch.is_grad_enabled())  # a read under a model's own no_grad block must not serve the rest
    value = reads.get(key)
    if value is None:
        value = reads[key] = read.compute(entry, base, rows)
    return value


def _param_property(
    binding: Binding, recompute: Recompute, spec: tuple[str, str] | Computed, name: str, freeze: bool
) -> property:
    if type(spec) is Computed:
        read = spec

        def computed(self: nn.Module) -> Any:
            base = self.__dict__["_parameters"][name]
            return _computed(binding, recompute, read, base.detach() if freeze and base.requires_grad else base)

        return property(computed)
    owner, key = spec

    def get(self: nn.Module) -> Any:
        params = binding.params
        if params is OUTSIDE:
            params = recompute.lookup()[0]
        if params is not None:
            entry = params.get(owner)
            if entry is not None:
                value = entry.get(key)
                if value is not None:
                    return value
        base = self.__dict__["_parameters"][name]
        return base.detach() if freeze and base is not None and base.requires_grad else base

    return property(get)


def _frozen_property(name: str) -> property:
    def get(self: nn.Module) -> Any:
        base = self.__dict__["_parameters"][name]
        return base.detach() if base is not None and base.requires_grad else base

    return property(get)


def _base_property(
    binding: Binding,
    recompute: Recompute,
    key: str,
    store: str,
    name: str,
    copy: tuple[str, str] | Computed | None,
    freeze: bool,
) -> property:
    """A parameter or buffer of a *base view*: the adapter's trainable copy if it has one, else ``base[key]`` if
    the call passed it, else the module's own tensor (detached under ``freeze``); a :class:`Computed` read applies
    to that tensor."""
    if type(copy) is Computed:
        read = copy
        plain = _base_property(binding, recompute, key, store, name, None, freeze)

        def computed(self: nn.Module) -> Any:
            return _computed(binding, recompute, read, plain.fget(self))

        return property(computed)

    def get(self: nn.Module) -> Any:
        params, base = binding.params, binding.base
        if params is OUTSIDE:
            params, _, base = recompute.lookup()
        if copy is not None and params is not None:
            entry = params.get(copy[0])
            if entry is not None:
                value = entry.get(copy[1])
                if value is not None:
                    return value
        if base is not None:
            value = base.get(key)
            if value is not None:
                return value
        own = self.__dict__[store][name]
        if own is not None and own.is_meta:
            raise ValueError(
                f"The model's {key!r} is on the meta device (it has no values) and this call's `base` does not give "
                "it: a model built on meta runs with every tensor it uses passed in `base` (state_dict() names, "
                "plus non-persistent buffers such as rotary `inv_freq`)."
            )
        return own.detach() if freeze and own is not None and own.requires_grad else own

    return property(get)


_NO_DEFAULT = object()


def _live_property(original: nn.Module, name: str, default: Any = _NO_DEFAULT) -> property:
    def get(self: nn.Module) -> Any:
        own = self.__dict__
        if "_funcpeft_original" in own:
            return getattr(original, name)
        if name in own or default is _NO_DEFAULT:  # another instance of this class (ModuleList slicing)
            return own[name]
        return default

    def set_(self: nn.Module, value: Any) -> None:
        self.__dict__[name] = value

    return property(get, set_)


def _make_view(
    module: nn.Module,
    children: dict[str, nn.Module],
    overrides: dict[str, tuple[str, str] | Computed],
    forward: Callable[..., Any] | None,
    binding: Binding,
    recompute: Recompute,
    freeze: bool,
    base_keys: Mapping[str, tuple[str, str]] | None = None,
) -> nn.Module:
    cls = type(module)

    namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    # The view's own dict: the original's internal containers themselves (parameter, buffer and hook dicts are
    # shared objects, hence live), a snapshot of its plain attributes (fast lookups), and its own `_modules`.
    state = dict(module.__dict__)
    for name, value in module.__dict__.items():
        if isinstance(value, bool):  # flags (`training`, `gradient_checkpointing`, ...) are toggled later: live
            del state[name]
            namespace[name] = _live_property(module, name)
    for klass in cls.__mro__[: cls.__mro__.index(nn.Module)]:  # flags with a class-level default (transformers'
        for name, value in vars(klass).items():  # `gradient_checkpointing`) that an instance attribute shadows later
            if isinstance(value, bool) and not name.startswith("__"):
                namespace.setdefault(name, _live_property(module, name, value))
    if "gradient_checkpointing" in namespace:  # transformers sets the function beside the flag, maybe after `adapt`
        namespace["_gradient_checkpointing_func"] = _live_property(module, "_gradient_checkpointing_func")
    for name, spec in overrides.items():
        namespace[name] = _param_property(binding, recompute, spec, name, freeze)
    for name, (store, key) in (base_keys or {}).items():
        namespace[name] = _base_property(binding, recompute, key, store, name, overrides.get(name), freeze)
    if freeze:
        for name in module._parameters:
            namespace.setdefault(name, _frozen_property(name))
    if forward is not None:
        namespace["forward"] = forward
    view_cls = type(cls)(cls.__name__, (cls,), namespace)
    # What the class's `__init_subclass__` put on the view class (transformers' GradientCheckpointingLayer wraps
    # `forward` again for each subclass) goes: the view behaves as the module's own class, with one wrapper.
    for name in [n for n in vars(view_cls) if n not in namespace and not n.startswith("__") and hasattr(cls, n)]:
        delattr(view_cls, name)
    view = object.__new__(view_cls)
    state["_modules"] = {**module._modules, **children}
    state["_funcpeft_original"] = module
    state["_compiled_call_impl"] = None  # `model.compile()` on the original must not bypass the view
    if isinstance(module, nn.TransformerEncoderLayer):
        # Its inference fast path (torch._transformer_encoder_layer_fwd) reads linear1/linear2's weights instead
        # of calling them, which would skip their adapters silently; this flag only gates that path (and
        # nn.TransformerEncoder's), so the view runs the reference path, which calls every submodule.
        state["activation_relu_or_gelu"] = 0
    object.__setattr__(view, "__dict__", state)
    return view


def build_view(
    model: nn.Module,
    forwards: Mapping[str, Callable[..., Any]],
    overrides: Override,
    binding: Binding,
    recompute: Recompute,
    *,
    freeze: bool = False,
    base: BaseTree | None = None,
) -> nn.Module:
    """A view of ``model`` whose modules at ``forwards`` run those forwards (called as ``forward(view_module,
    *args, **kwargs)``) and whose parameters at ``overrides`` read from ``binding`` (module docstring), or,
    outside any call (checkpointed layers recomputed by ``backward()``), from ``recompute``.

    With ``freeze``, every base parameter reads as ``detach()``-ed, so that plain ``loss.backward()`` through the
    view reaches the adapter's leaves only: the base model's ``requires_grad`` flags stay as the user set them,
    yet no gradient is computed for (or accumulated into) its weights.
    """
    changed = set(forwards) | set(overrides)
    if base is not None:
        changed |= set(base.slots)
    if freeze:
        changed |= {path for path, module in model.named_modules() if module._parameters}
    needed = set(changed)
    for path in changed:
        parts = path.split(".")
        needed.update(".".join(parts[:i]) for i in range(len(parts)))
    modules = dict(model.named_modules(remove_duplicate=False))

    views: dict[str, nn.Module] = {}
    # Deepest first, so every child's view exists before its parent's.
    for path in sorted(needed, key=lambda p: p.count(".") if p else -1, reverse=True):
        module = modules[path]
        prefix = path + "." if path else ""
        children = {name: views[prefix + name] for name in module._modules if prefix + name in views}
        views[path] = _make_view(
            module,
            children,
            overrides.get(path, {}),
            forwards.get(path),
            binding,
            recompute,
            freeze,
            None if base is None else base.slots.get(path),
        )
    return views[""]
