"""``fwd.bind(params)``: the adapter as an ``nn.Module``, for the tools that train modules (flax's ``Module.bind``).

``transformers.Trainer``, Lightning, ``accelerate`` and ``DistributedDataParallel`` take a module: its
``parameters()`` are what they optimise, synchronise and checkpoint, ``train()``/``eval()`` set its mode, and its
``forward`` signature says which dataset columns to keep. :class:`Bound` is exactly that, and nothing more:

- its parameters are the adapter's leaves themselves (the same tensor objects: an optimizer step on ``bound``
  updates ``params``), named ``adapter.<module path>.<tensor name>``; its ``state_dict`` is the adapter alone,
  so framework checkpoints hold and resume it; the base model is not a submodule;
- ``bound(*args, **kwargs)`` is ``fwd(params, *args, **kwargs)`` (``adapter_ids=`` too), the one forward;
  ``inspect.signature(bound.forward)`` is the model's forward's;
- attributes and methods the model has fall through with the adapter applied: ``bound.config``,
  ``bound.generate(...)`` (``fwd.generate``), ``bound.get_text_features(...)`` (``fwd.method``);
- ``bound.save_pretrained(path)`` writes the PEFT folder (:func:`funcpeft.save`).

Decided here, as PEFT's ``PeftModel`` does it: ``bound.train()``/``bound.eval()`` set the *model's* mode too (that
is what turns dropout on for a Trainer; ``adapt`` and ``fwd`` themselves still never modify the model), and
``bound.to(...)``/``.cuda()``/``.half()`` apply to the base model as well as to the adapter, so the two stay on one
device (an accelerate ``prepare`` moves both).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from funcpeft.core import Adapted

__all__ = ["Bound", "bind"]


class Bound(nn.Module):
    """An ``nn.Module`` carrying one adapter tree for one ``fwd``; see the module docstring.

    Attributes:
        fwd: the ``fwd`` it runs.
        params: the adapter tree (its leaves are this module's parameters).
        adapter: a container module mirroring the adapted module paths, holding the leaves.
    """

    def __init__(self, fwd: Adapted, params: Mapping[str, Mapping[str, Tensor]]) -> None:
        super().__init__()
        object.__setattr__(self, "fwd", fwd)  # plain attributes: the base model is not a submodule
        object.__setattr__(self, "params", params)
        self.adapter = _container(params)
        self.training = fwd.model.training
        signature = _forward_signature(fwd.model)

        def forward(*args: Any, **kwargs: Any) -> Any:
            return fwd(params, *args, **kwargs)

        forward.__signature__ = signature  # type: ignore[attr-defined]  # Trainer keeps these dataset columns
        forward.__doc__ = f"{type(fwd.model).__name__}.forward with the bound adapter."
        object.__setattr__(self, "forward", forward)

    def train(self, mode: bool = True) -> Bound:
        """Set the mode of the adapted forward (dropout) by setting the model's own mode, as ``PeftModel.train``."""
        if not isinstance(mode, bool):
            raise TypeError(f"`mode` must be a bool, got {type(mode).__name__}.")
        self.fwd.model.train(mode)
        return super().train(mode)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Bound:
        # .to()/.cuda()/.half(): the base model follows the adapter (in place on its parameters, as nn.Module does)
        self.fwd.model._apply(fn)
        super()._apply(fn, recurse)
        return self

    def save_pretrained(self, path: str | os.PathLike, **_: Any) -> None:
        """Write the adapter as a PEFT folder (:func:`funcpeft.save`); extra keyword arguments (Trainer's
        ``state_dict=``, ``safe_serialization=``) are accepted and ignored: the folder is always safetensors."""
        from funcpeft.io import save

        configs = self.fwd.configs
        if len(configs) != 1:
            raise ValueError(
                f"This bound adapter holds {len(configs)} heterogeneous adapters; save them one at a time: "
                "funcpeft.save(path_k, fwd.unstack(bound.params)[k], fwd.configs[k])."
            )
        save(path, self.params, configs[0])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        fwd = self.__dict__.get("fwd")
        if fwd is None or name.startswith("__"):
            raise AttributeError(name)
        model = fwd.model
        try:
            value = getattr(model, name)
        except AttributeError:
            raise AttributeError(
                f"Neither the bound adapter nor {type(model).__name__} has an attribute {name!r}."
            ) from None
        if inspect.ismethod(value) and value.__self__ is model and not isinstance(value, nn.Module):
            params = self.params
            if name == "generate":
                return lambda *args, **kwargs: fwd.generate(params, *args, **kwargs)
            call = fwd.method(name)
            return lambda *args, **kwargs: call(params, *args, **kwargs)
        return value

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self.parameters())
        return f"Bound({self.fwd!r}, {n:,} adapter parameters)"


def bind(fwd: Adapted, params: Any) -> Bound:
    """See :meth:`funcpeft.Adapted.bind`.

    Raises:
        TypeError/ValueError: ``params`` is not an adapter tree of ``fwd`` (as ``fwd`` would say).
        ValueError: a leaf is not a leaf tensor with ``requires_grad`` (a framework could not train it).
    """
    if params is None or not isinstance(params, Mapping):
        raise TypeError(
            f"`params` must be the adapter dict funcpeft.adapt returned (bind the base model? call fwd.model), got "
            f"{type(params).__name__}."
        )
    for path, entry in params.items():
        for name, leaf in entry.items() if isinstance(entry, Mapping) else ():
            if isinstance(leaf, Tensor) and leaf.is_floating_point() and not (leaf.is_leaf and leaf.requires_grad):
                raise ValueError(
                    f"`params[{path!r}][{name!r}]` is not a trainable leaf tensor (is_leaf={leaf.is_leaf}, "
                    f"requires_grad={leaf.requires_grad}); bind the tree funcpeft.adapt/funcpeft.load returns, or "
                    "`t.detach().requires_grad_()` each leaf first."
                )
    return Bound(fwd, params)


def _container(params: Mapping[str, Mapping[str, Tensor]]) -> nn.Module:
    """Modules mirroring the paths (``a.b.c`` -> ``a`` / ``b`` / ``c``) whose ``_parameters`` are the leaves
    themselves (set directly: ``register_parameter`` would demand new ``nn.Parameter`` objects)."""
    root = nn.Module()
    for path, entry in params.items():
        for name, leaf in entry.items():
            parts = [p for p in path.split(".") if p] + name.split(".")
            node = root
            for part in parts[:-1]:
                child = node._modules.get(part)
                if child is None:
                    child = node._modules[part] = nn.Module()
                node = child
            node._parameters[parts[-1]] = leaf
    return root


def _forward_signature(model: nn.Module) -> inspect.Signature:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)])
