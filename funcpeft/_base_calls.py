"""Calls with ``base=``: ``fwd(params, x, base={name: tensor})`` reads those tensors instead of the model's own.

Such calls run on two more views of the model (lean and grad, as ordinary calls), which view every module and so
cost a walk of the whole model: :class:`BaseViews` builds them on the first such call, once, under a lock. It also
keeps the validator for them: as ``fwd``'s own, except that a module on the ``meta`` device (whose tensors
``base`` supplies) does not decide where the adapter must live. :class:`BaseCall` is what :meth:`Adapted._run
<funcpeft.core.Adapted._run>` receives as its ``view`` for such a call, and :class:`BaseTree` checks each call's
``base`` dict against the model's names (tied tensors kept tied).
"""

from __future__ import annotations

import difflib
import operator
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from funcpeft._check import Validator
from funcpeft._view import Binding, Override, Recompute, build_view

__all__ = ["BaseCall", "BaseTree", "BaseViews"]

_FACTS = operator.attrgetter("shape", "dtype", "device")  # all a base tensor's validity depends on


class BaseCall(NamedTuple):
    """A call's checked ``base=`` tensors (passed to ``Adapted._run`` as its ``view``, so that subclasses
    overriding ``_run`` forward it unchanged), and whether the lean view must serve it (``generate``)."""

    base: dict[str, Tensor]
    lean: bool


class BaseViews:
    """The views and the validator of calls with ``base=``, built on first use (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        forwards: Mapping[str, Callable[..., Any]],
        overrides: Override,
        binding: Binding,
        recompute: Recompute,
    ) -> None:
        self._model = model
        self._parts = (forwards, overrides, binding, recompute)
        self._views: tuple[BaseTree, nn.Module, nn.Module] | None = None
        self._lock = threading.Lock()
        self._validator: tuple[Validator, Validator] | None = None

    def views(self) -> tuple[BaseTree, nn.Module, nn.Module]:
        """``(names, lean view, grad view)``, built once, on the first call with ``base=``."""
        views = self._views
        if views is None:
            with self._lock:
                views = self._views
                if views is None:
                    forwards, overrides, binding, recompute = self._parts
                    model, tree = self._model, BaseTree(self._model)
                    lean = build_view(model, forwards, overrides, binding, recompute, base=tree)
                    grad = build_view(model, forwards, overrides, binding, recompute, freeze=True, base=tree)
                    views = self._views = (tree, lean, grad)
        return views

    def call(self, base: Any, lean: bool) -> BaseCall:
        """The ``view`` argument of ``Adapted._run`` for a call with ``base``: the checked tensors, and whether the
        lean view must serve it whatever the grad mode (``generate``).

        Raises:
            TypeError, ValueError: ``base`` names no tensor of the model, or a tensor does not fit (:class:`BaseTree`).
        """
        return BaseCall(self.views()[0].resolve(base), lean)

    def check(self, params: Any, validator: Validator, modules: Mapping[str, nn.Module]) -> None:
        """Validate ``params`` with ``validator``'s shapes, ignoring the device of modules on ``meta``."""
        pair = self._validator
        if pair is None or pair[0] is not validator:
            own = {path: nn.Module() if any(p.is_meta for p in m.parameters()) else m for path, m in modules.items()}
            pair = self._validator = (validator, Validator(validator.shapes, own, validator.optional))
        pair[1].check(params)


class BaseTree:
    """The names a ``base=`` dict may hold, and its per-call check (``fwd(params, *args, base=...)``).

    Names are the model's ``state_dict()`` names, plus non-persistent buffers (``named_buffers()``), so a model
    built on the ``meta`` device can be given every tensor it uses. Tied tensors (one tensor under several names,
    e.g. an LM head sharing the input embedding) stay tied, as in ``torch.func.functional_call(tie_weights=True)``:
    a tensor given under one of the names is read under all of them; given under several, it must be the same
    tensor (or views of the same memory, as ``state_dict()`` gives), else the call is refused.

    Args:
        model: the user's model (read once here; its tensors' shapes, dtypes and devices are read live per call).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model_name = type(model).__name__
        # module path -> attribute -> ("_parameters" | "_buffers", canonical name)
        self.slots: dict[str, dict[str, tuple[str, str]]] = {}
        # name -> (the owning container, attribute, canonical name): what each given name must look like
        self.names: dict[str, tuple[dict[str, Any], str, str]] = {}
        # signatures of recent dicts that passed -> (canonical name per entry, pairs of entries naming one tensor)
        self._passed: dict[tuple[Any, ...], tuple[tuple[str, ...], tuple[tuple[int, int], ...]]] = {}
        # module path -> its class name, for bitsandbytes layers (their weights cannot be given: see _full)
        self.bnb: dict[str, str] = {}
        canonical: dict[int, str] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            prefix = path + "." if path else ""
            if any(c.__module__.startswith("bitsandbytes") for c in type(module).__mro__[:-1]):
                self.bnb[path] = type(module).__name__
            for store in ("_parameters", "_buffers"):
                container = module.__dict__[store]
                for attr, tensor in container.items():
                    if tensor is None:
                        continue
                    name = canonical.setdefault(id(tensor), prefix + attr)
                    self.slots.setdefault(path, {})[attr] = (store, name)
                    self.names[prefix + attr] = (container, attr, name)

    def resolve(self, base: Any) -> dict[str, Tensor]:
        """``base`` checked and keyed by canonical names (what base views read).

        A dict with the names, shapes, dtypes and devices of one that passed before costs a signature comparison
        (as :class:`funcpeft._check.Validator`), plus an identity check where it gives tied names.

        Raises:
            TypeError: ``base`` is not a dict of tensors.
            ValueError: a name is not a parameter or buffer of the model (naming close matches), a tensor's shape,
                dtype or device differs from the model's own (a model on ``meta`` accepts any device), or tied
                names are given different tensors.
        """
        if not torch.compiler.is_compiling() and isinstance(base, dict):
            values = tuple(base.values())
            try:
                key = (tuple(base), tuple(map(_FACTS, values)))
            except AttributeError:  # not all tensors: the full check names the culprit
                key = None
            hit = None if key is None else self._passed.get(key)
            if hit is not None:
                canonical, ties = hit
                if all(values[i] is values[j] or _aliases(values[i], values[j]) for i, j in ties):
                    return dict(zip(canonical, values, strict=True))
            resolved = self._full(base)
            if key is not None:
                canonical = tuple(self.names[n][2] for n in base)
                first: dict[str, int] = {}
                pairs = []
                for i, name in enumerate(canonical):
                    j = first.setdefault(name, i)
                    if j != i:
                        pairs.append((j, i))
                ties = tuple(pairs)
                if len(self._passed) >= 8:
                    self._passed.clear()
                self._passed[key] = (canonical, ties)
            return resolved
        return self._full(base)

    def _full(self, base: Any) -> dict[str, Tensor]:
        if not isinstance(base, Mapping):
            raise TypeError(
                f"`base` must be a dict {{state_dict name: Tensor}} (e.g. dict(model.state_dict())), got "
                f"{type(base).__name__}."
            )
        names = self.names
        resolved: dict[str, Tensor] = {}
        unknown = []
        for name, value in base.items():
            slot = names.get(name)
            if slot is None:
                unknown.append(name)
                continue
            container, attr, key = slot
            owner = name.rpartition(".")[0]
            if attr == "weight" and owner in self.bnb:
                raise ValueError(
                    f"`base[{name!r}]` is the weight of a bitsandbytes {self.bnb[owner]}, which computes with scales "
                    "and state kept outside this tensor (`SCB` and the layer's 8-bit state, or the 4-bit "
                    "`quant_state`) that `base` cannot pass: its forward would ignore the given weight or rewrite "
                    "the model's state with it. Leave this weight out of `base` (the model's own is used), or give "
                    "the weights of an unquantized (or torchao-quantized) model of this architecture."
                )
            if not isinstance(value, Tensor):
                raise TypeError(f"`base[{name!r}]` must be a Tensor, got {type(value).__name__}.")
            own = container[attr]
            if value.shape != own.shape or value.dtype != own.dtype:
                raise ValueError(
                    f"`base[{name!r}]` is a {value.dtype} tensor of shape {tuple(value.shape)}, but the model's "
                    f"{name!r} is {own.dtype} of shape {tuple(own.shape)}: `base` must hold tensors of the same "
                    "architecture and dtype (cast with .to(dtype) or load the matching checkpoint)."
                )
            if value.device != own.device and own.device.type != "meta":
                raise ValueError(
                    f"`base[{name!r}]` is on device {value.device}, but the model's {name!r} is on {own.device}. "
                    f"Move it with .to({str(own.device)!r}) (a model built on the meta device accepts any device)."
                )
            known = resolved.setdefault(key, value)
            if known is not value and not _aliases(known, value):
                tied = sorted(n for n in base if n in names and names[n][2] == key)
                raise ValueError(
                    f"`base` gives different tensors for {tied}, which are one tied tensor of the model; give one "
                    "tensor under all of these names (or only one of them)."
                )
        if unknown:
            extra = sorted(n for n in map(str, unknown) if any(n.startswith(p + ".") for p in self.bnb))
            if extra:
                raise ValueError(
                    f"`base` has bitsandbytes quantization state {extra[:5]}{'...' if len(extra) > 5 else ''}: "
                    "these state_dict() entries are not tensors the model computes with, and `base` cannot replace "
                    "a bitsandbytes layer's weight or scales. Leave them (and those layers' weights) out of `base`."
                )
            shown = sorted(map(str, unknown))[:5]
            close = sorted({m for n in shown for m in difflib.get_close_matches(n, list(names), n=3)})
            raise ValueError(
                f"`base` has names that are no parameter or buffer of {self.model_name}: {shown}"
                f"{'...' if len(unknown) > 5 else ''}; similar names: {', '.join(close[:6]) or 'none'}. `base` keys "
                "are the model's state_dict() names (model.state_dict().keys())."
            )
        return resolved


def _aliases(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are views of the same memory (``state_dict()`` detaches each tied name separately);
    never for meta tensors, nor for tensors torch.func wraps (they have no storage to compare)."""
    try:
        return (
            a.device.type != "meta"
            and a.device == b.device
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset()
            and a.stride() == b.stride()
        )
    except (RuntimeError, NotImplementedError):
        return False
