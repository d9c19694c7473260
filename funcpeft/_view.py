"""How ``fwd`` intercepts module forwards without touching the user's model.

``adapt`` builds a *view* of the model once: for every module that behaves differently under the adapter
(adapted layers, modules whose parameters the adapter replaces, and all their ancestors) it creates an object
of a one-off subclass of the module's own class whose instance ``__dict__`` **is** the original module's
``__dict__``. The view therefore shares all live state with the model: parameters and buffers, hooks, the
``training`` flag (so ``model.eval()`` also switches the adapter's dropout), ``.to()`` moves, attributes set
later such as transformers' gradient-checkpointing flags. What differs lives only on the subclass, as data
descriptors, which Python consults before the instance dict:

- ``forward`` of an adapted layer: the method's adapted forward;
- parameters the adapter replaces (trainable bias copies, ``modules_to_save``): properties returning the
  adapter's tensor;
- ``_modules`` and the child attributes of ancestors: the viewed children instead of the originals.

The adapter's tensors reach these overrides through a ``threading.local`` binding that ``fwd`` sets for the
duration of one call and restores in ``finally``. Hence:

- the model is never modified: no attribute, parameter, hook or flag of it is written, not even temporarily,
  so other threads calling ``model(x)`` meanwhile see the base model, and a call that raises leaves nothing
  behind;
- threads calling ``fwd`` concurrently each see their own adapter (the binding is per thread);
- ``torch.func`` transforms and ``torch.compile`` see plain tensor arithmetic on ``fwd``'s arguments: no
  ``setattr`` on modules, no per-call tree building. The per-call cost is one thread-local read per intercepted
  module, and nothing is done per call that could be done once in ``adapt``.

Limitations: children replaced on the model after ``adapt`` are not seen (call ``adapt`` again), and a module
whose ``forward`` was replaced on the instance (accelerate's offloading hooks) bypasses the view.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["Binding", "Override", "build_view"]


class Binding(threading.local):
    """The adapter tree bound to the current ``fwd`` call, per thread (``None``: the base model)."""

    def __init__(self) -> None:
        # Set in __init__ (run once per thread) so torch.compile's guards always find the attribute.
        self.params: Mapping[str, Mapping[str, Tensor]] | None = None


# An override: module path -> attribute name -> (owner path in params, key under it).
Override = dict[str, dict[str, tuple[str, str]]]


def _param_property(binding: Binding, owner: str, key: str, name: str, view_dict: dict) -> property:
    def get(self: nn.Module) -> Any:
        if self.__dict__ is view_dict:
            params = binding.params
            if params is not None:
                entry = params.get(owner)
                if entry is not None:
                    value = entry.get(key)
                    if value is not None:
                        return value
        return nn.Module.__getattr__(self, name)

    return property(get)


def _child_property(child: nn.Module, name: str, view_dict: dict) -> property:
    def get(self: nn.Module) -> Any:
        if self.__dict__ is view_dict:
            return child
        return nn.Module.__getattr__(self, name)

    return property(get)


def _modules_property(children: dict[str, nn.Module | None], view_dict: dict) -> property:
    def get(self: nn.Module) -> dict:
        if self.__dict__ is view_dict:
            return children
        return self.__dict__["_modules"]

    def set_(self: nn.Module, value: dict) -> None:
        self.__dict__["_modules"] = value

    return property(get, set_)


def _compiled_property(view_dict: dict) -> property:
    # A model compiled with `model.compile()` would otherwise run its compiled original, skipping the view.
    def get(self: nn.Module) -> Any:
        return None if self.__dict__ is view_dict else self.__dict__.get("_compiled_call_impl")

    def set_(self: nn.Module, value: Any) -> None:
        self.__dict__["_compiled_call_impl"] = value

    return property(get, set_)


def _make_view(
    module: nn.Module,
    children: dict[str, nn.Module],
    overrides: dict[str, tuple[str, str]],
    forward: Callable[..., Any] | None,
    binding: Binding,
) -> nn.Module:
    cls = type(module)
    view_dict = module.__dict__
    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "_compiled_call_impl": _compiled_property(view_dict),
    }
    if children:
        merged = dict(module._modules)
        merged.update(children)
        namespace["_modules"] = _modules_property(merged, view_dict)
        for name, child in children.items():
            namespace[name] = _child_property(child, name, view_dict)
    for name, (owner, key) in overrides.items():
        namespace[name] = _param_property(binding, owner, key, name, view_dict)
    if forward is not None:
        original = cls.forward

        def adapted(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if self.__dict__ is view_dict:
                return forward(self, *args, **kwargs)
            return original(self, *args, **kwargs)

        namespace["forward"] = adapted
    view_cls = type(cls)(cls.__name__, (cls,), namespace)
    view = object.__new__(view_cls)
    object.__setattr__(view, "__dict__", view_dict)
    return view


def build_view(
    model: nn.Module,
    forwards: Mapping[str, Callable[..., Any]],
    overrides: Override,
    binding: Binding,
) -> nn.Module:
    """A view of ``model`` whose modules at ``forwards`` run those forwards (called as ``forward(view_module,
    *args, **kwargs)``) and whose parameters at ``overrides`` read from ``binding`` (module docstring)."""
    changed = set(forwards) | set(overrides)
    needed = set(changed)
    for path in changed:
        parts = path.split(".")
        needed.update(".".join(parts[:i]) for i in range(len(parts)))
    modules = dict(model.named_modules(remove_duplicate=False))

    views: dict[str, nn.Module] = {}
    # Deepest first, so every child's view exists before its parent's.
    for path in sorted(needed, key=lambda p: (p.count(".") if p else -1), reverse=True):
        module = modules[path]
        prefix = path + "." if path else ""
        children = {
            name: views[prefix + name]
            for name in module._modules
            if prefix + name in views
        }
        views[path] = _make_view(module, children, overrides.get(path, {}), forwards.get(path), binding)
    return views[""]
