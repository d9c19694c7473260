"""``fwd.bind(params)``: the adapter as an ``nn.Module``, for the tools that train modules (flax's ``Module.bind``).

``transformers.Trainer``, Lightning, ``accelerate`` and ``DistributedDataParallel`` take a module: its
``parameters()`` are what they optimise, synchronise and checkpoint, ``train()``/``eval()`` set its mode, and its
``forward`` signature says which dataset columns to keep. :class:`Bound` is exactly that, and nothing more:

- its parameters are the adapter's leaves themselves (the same tensor objects: an optimizer step on ``bound``
  updates ``params``), named ``adapter.<module path>.<tensor name>``; its ``state_dict`` is the adapter alone,
  so framework checkpoints hold and resume it; the base model is not a submodule. VeRA's shared projections
  (``params[""]``, frozen: the forward detaches them) are buffers instead, as PEFT's ``BufferDict``: in the state
  dict, but no optimizer steps them and ``DistributedDataParallel`` waits for no gradient of theirs;
- ``bound(*args, **kwargs)`` is ``fwd(params, *args, **kwargs)`` (``adapter_ids=`` too), the one forward;
  ``inspect.signature(bound.forward)`` is the model's forward's, and so is the signature of the class's
  ``forward``: each bind makes a subclass ``Bound<ModelClass>`` because Trainer reads the labels' names
  (``find_labels``, hence ``eval_loss``) and ``can_return_loss`` from ``type(model).forward`` and its name;
- attributes and methods the model has fall through with the adapter applied: ``bound.config``,
  ``bound.generate(...)`` (``fwd.generate``), ``bound.get_text_features(...)`` (``fwd.method``);
- ``bound.save_pretrained(path)`` writes the PEFT folder (:func:`funcpeft.save`).

Decided here, as PEFT's ``PeftModel`` does it: ``bound.train()``/``bound.eval()`` set the *model's* mode too (that
is what turns dropout on for a Trainer; ``adapt`` and ``fwd`` themselves still never modify the model), and
``bound.to(...)``/``.cuda()``/``.half()`` apply to the base model as well as to the adapter, so the two stay on one
device (an accelerate ``prepare`` moves both); the adapter's leaves are converted in place, so they stay ``params``'
leaves also for ``.to("meta")``/``.to_empty(...)``. ``copy.deepcopy(bound)`` (EMA/SWA averaging) copies the adapter
and shares the model, which is not part of the bound module's state. A bound module does not pickle (its ``fwd``
does not): save its ``state_dict()`` or ``save_pretrained`` instead, which the ``TypeError`` says.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from funcpeft.core import Adapted

__all__ = ["Bound", "bind"]


class Bound(nn.Module):
    """An ``nn.Module`` carrying one adapter tree for one ``fwd``; see the module docstring.

    Attributes:
        fwd: the ``fwd`` it runs.
        params: the adapter tree (its leaves are this module's parameters; VeRA's frozen projections its buffers).
        adapter: a container module mirroring the adapted module paths, holding the leaves.
    """

    def __init__(self, fwd: Adapted, params: Mapping[str, Mapping[str, Tensor]]) -> None:
        super().__init__()
        object.__setattr__(self, "fwd", fwd)  # plain attributes: the base model is not a submodule
        object.__setattr__(self, "params", params)
        # VeRA's shared projections (the root entry) are frozen (the forward detaches them): buffers, as PEFT's
        # BufferDict, so no optimizer steps them and DDP does not wait for a gradient that never comes.
        self.adapter = _container(params, frozen=("",) if getattr(fwd, "_shared", None) else ())
        super().train(fwd.model.training)  # start in the model's mode (the container modules too), touching nothing

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``fwd(params, *args, **kwargs)``; :func:`bind`'s subclass gives it the model's forward signature."""
        return self.fwd(self.params, *args, **kwargs)

    def train(self, mode: bool = True) -> Bound:
        """Set the mode of the adapted forward (dropout) by setting the model's own mode, as ``PeftModel.train``."""
        if not isinstance(mode, bool):
            raise TypeError(f"`mode` must be a bool, got {type(mode).__name__}.")
        self.fwd.model.train(mode)
        return super().train(mode)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Bound:
        """``.to()``/``.cuda()``/``.half()``/...: the adapter's leaves change in place, so they stay ``params``' leaves
        (``nn.Module._apply`` would replace a leaf by a new ``Parameter`` where the storage kind changes, e.g. to
        ``"meta"``), then the base model follows, in place on its parameters as ``nn.Module`` does. The adapter is
        converted first and restored if converting it or the model fails, so it never ends on another device or
        dtype than it started while the call raised."""
        if not recurse:  # the bound module holds nothing itself: its leaves live in `adapter`
            return self
        leaves = {**dict(self.named_parameters()), **dict(self.named_buffers())}  # each tensor once
        with torch.no_grad():
            converted = [(fn(leaf), None if leaf.grad is None else fn(leaf.grad)) for leaf in leaves.values()]
        undo: list[Callable[[], None]] = []
        try:
            for (name, leaf), (value, grad) in zip(leaves.items(), converted, strict=True):
                undo.append(_convert_in_place(name, leaf, value, grad))
            self.fwd.model._apply(fn)
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        return self

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, copying into the adapter's leaves (so ``params`` sees the values).

        All or nothing: where torch raises (a missing or unexpected key with ``strict=True``, a shape mismatch, a
        value that cannot be copied), it has already copied the keys before the culprit; they are restored, so the
        adapter is exactly as before the call. ``strict=False`` loads the keys present, as torch does.
        """
        if assign:
            raise ValueError(
                "`assign=True` would replace the bound adapter's tensors by the state dict's, so `bound.params` "
                "(and the optimizer's parameters) would no longer be this module's parameters; load with "
                "assign=False (values copied in place), or bind the loaded tree: fwd.bind(new_params)."
            )
        leaves = [*self.parameters(), *self.buffers()]
        before = [leaf.detach().clone() for leaf in leaves]
        try:
            return super().load_state_dict(state_dict, strict=strict)
        except BaseException:  # nn.Module copies key by key and raises at the end: put back what it had copied
            with torch.no_grad():
                for leaf, value in zip(leaves, before, strict=True):
                    leaf.copy_(value)
            raise

    def save_pretrained(self, path: str | os.PathLike, *, is_main_process: bool = True, **_: Any) -> None:
        """Write the adapter as a PEFT folder (:func:`funcpeft.save`), on the main process only (PEFT's
        ``is_main_process``); other keyword arguments (``state_dict=``, ``safe_serialization=``) are accepted and
        ignored: the folder always holds ``bound.params``, in safetensors.

        Raises:
            ValueError: a heterogeneous ``fwd`` (several configs), which no single PEFT folder describes.
        """
        from funcpeft.io import save

        configs = self.fwd.configs
        if len(configs) != 1:
            raise ValueError(
                f"This bound adapter holds {len(configs)} heterogeneous adapters; save them one at a time: "
                "funcpeft.save(path_k, fwd.unstack(bound.params)[k], fwd.configs[k])."
            )
        if is_main_process:
            save(path, self.params, configs[0])

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            f"A bound adapter ({type(self).__name__}) cannot be pickled: it runs a `fwd` that holds the model's "
            "interception state, which does not pickle. Save the adapter instead, with bound.save_pretrained(path) "
            "(funcpeft.save) or torch.save(bound.state_dict(), file), and rebuild it where it is loaded with "
            "funcpeft.adapt(model, config) and fwd.bind(params) (funcpeft.load(path) gives params and config)."
        )

    def __copy__(self) -> Bound:
        # ``copy.copy`` would go through ``__reduce_ex__``: a shallow copy shares everything, as for any module
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> Bound:
        # The adapter (and grads, hooks, mode) is copied; the model is shared, like the fwd it belongs to. One memo
        # for ``params`` and the container keeps the copy's parameters the leaves of its ``params``.
        memo[id(self.fwd)] = self.fwd
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            object.__setattr__(new, key, copy.deepcopy(value, memo))
        return new

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
        TypeError/ValueError: ``params`` is not an adapter tree of ``fwd``, plain or stacked (as ``fwd`` would
            say), checked here rather than at a framework's first training step.
        ValueError: a leaf is not a leaf tensor with ``requires_grad`` (a framework could not train it).
    """
    if params is None or not isinstance(params, Mapping):
        raise TypeError(
            f"`params` must be the adapter dict funcpeft.adapt returned (bind the base model? call fwd.model), got "
            f"{type(params).__name__}."
        )
    try:
        fwd._validator.check(params)
    except (TypeError, ValueError) as err:
        try:  # a stacked tree (funcpeft.stack), run with adapter_ids
            fwd._stack_size(params)
        except (TypeError, ValueError):
            raise err from None
    for path, entry in params.items():
        for name, leaf in entry.items():
            if not (leaf.is_leaf and leaf.requires_grad):
                raise ValueError(
                    f"`params[{path!r}][{name!r}]` is not a trainable leaf tensor (is_leaf={leaf.is_leaf}, "
                    f"requires_grad={leaf.requires_grad}); bind the tree funcpeft.adapt/funcpeft.load returns, or "
                    "`t.detach().requires_grad_()` each leaf first."
                )
    return _bound_class(fwd.model)(fwd, params)


def _bound_class(model: nn.Module) -> type[Bound]:
    """``Bound<ModelClass>``, whose ``forward`` has the model's forward signature (with ``self``), as Trainer reads
    it from the class: the name keeps ``QuestionAnswering`` for Trainer's ``start_positions`` labels."""
    signature = _forward_signature(model)
    self_ = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    if "self" in signature.parameters:  # a forward taking a keyword named `self`: keep it, rename ours
        self_ = self_.replace(name="_bound_self")

    def forward(self: Bound, *args: Any, **kwargs: Any) -> Any:
        return self.fwd(self.params, *args, **kwargs)

    forward.__signature__ = signature.replace(parameters=[self_, *signature.parameters.values()])  # type: ignore[attr-defined]
    forward.__doc__ = f"{type(model).__name__}.forward with the bound adapter: fwd(params, *args, **kwargs)."
    name = f"Bound{type(model).__name__}"
    return type(name, (Bound,), {"forward": forward, "__module__": __name__, "__qualname__": name})


def _container(params: Mapping[str, Mapping[str, Tensor]], frozen: tuple[str, ...] = ()) -> nn.Module:
    """Modules mirroring the paths (``a.b.c`` -> ``a`` / ``b`` / ``c``) whose ``_parameters`` are the leaves
    themselves (set directly: ``register_parameter`` would demand new ``nn.Parameter`` objects); the entries at the
    paths in ``frozen`` go to ``_buffers`` instead."""
    root = nn.Module()
    for path, entry in params.items():
        slots = "_buffers" if path in frozen else "_parameters"
        for name, leaf in entry.items():
            parts = [p for p in path.split(".") if p] + name.split(".")
            node = root
            for part in parts[:-1]:
                child = node._modules.get(part)
                if child is None:
                    child = node._modules[part] = nn.Module()
                node = child
            getattr(node, slots)[parts[-1]] = leaf
    return root


def _convert_in_place(name: str, leaf: Tensor, value: Tensor, grad: Tensor | None) -> Callable[[], None]:
    """Make ``leaf`` hold ``value`` (and its ``.grad`` hold ``grad``) while staying the same Python object; return
    the undo step.

    As ``nn.Module._apply``: ``leaf.data = value`` where torch allows it (the same kind of storage: CPU <-> CUDA, any
    dtype), the gradient likewise; otherwise (to or from ``"meta"``) ``torch.utils.swap_tensors``, as torch does
    under ``torch.__future__.set_swap_module_params_on_conversion(True)``.
    """
    old_grad = leaf.grad
    if torch._has_compatible_shallow_copy_type(leaf, value) and (
        old_grad is None or torch._has_compatible_shallow_copy_type(old_grad, grad)
    ):
        old, old_grad_data = leaf.data, None if old_grad is None else old_grad.data
        leaf.data = value
        if old_grad is not None:
            old_grad.data = grad

        def undo() -> None:
            leaf.data = old
            if old_grad is not None:
                old_grad.data = old_grad_data

        return undo
    leaf.grad = None  # a held gradient counts as a use of the tensor and blocks the swap
    new = value.requires_grad_(leaf.requires_grad)
    try:
        torch.utils.swap_tensors(leaf, new)
    except RuntimeError as err:
        leaf.grad = old_grad
        raise RuntimeError(
            f"Cannot move the bound adapter's tensor {name!r} from {leaf.device} to {value.device} in place: it is "
            f"still referenced elsewhere ({err}). Moving to or from 'meta' swaps the tensor's contents, which torch "
            "allows only while no autograd graph holds it: drop the outputs and losses of earlier forwards first. "
            "Nothing was moved."
        ) from err
    leaf.grad = grad

    def undo_swap() -> None:
        leaf.grad = None
        torch.utils.swap_tensors(leaf, new)
        leaf.grad = old_grad

    return undo_swap


def _forward_signature(model: nn.Module) -> inspect.Signature:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)])
