"""Calls with ``base=``: ``fwd(params, x, base={name: tensor})`` reads those tensors instead of the model's own.

Such calls run on two more views of the model (lean and grad, as ordinary calls), which view every module and so
cost a walk of the whole model: :class:`BaseViews` builds them on the first such call, once, under a lock. It also
keeps the validator for them: as ``fwd``'s own, except that a module on the ``meta`` device (whose tensors
``base`` supplies) does not decide where the adapter must live. :class:`BaseCall` is what :meth:`Adapted._run
<funcpeft.core.Adapted._run>` receives as its ``view`` for such a call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn

from funcpeft._check import Validator
from funcpeft._view import BaseTree, Binding, Override, Recompute, build_view

__all__ = ["BaseCall", "BaseViews"]


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
