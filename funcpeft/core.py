"""``adapt(model, config) -> (params, fwd)``: an adapter as a pytree beside an untouched model.

``adapt`` does all the work that does not depend on the adapter's values, once: it resolves the targets,
builds one :class:`~funcpeft.methods.base.AdapterLayer` per target, and builds a *view* of the model whose
adapted modules read their tensors from a per-thread binding (see :mod:`funcpeft._view` for why this never
modifies the model and is safe across threads). ``fwd(params, *args)`` then only binds ``params`` and calls the
view.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from funcpeft import _layers
from funcpeft._targeting import find_modules_to_save
from funcpeft._view import OUTSIDE, Binding, Override, build_view
from funcpeft.config import AdapterConfig
from funcpeft.methods.base import AdapterLayer, BaseForward, Rows, build_layers

__all__ = ["Adapted", "adapt", "Params"]

Params = dict[str, dict[str, Tensor]]

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class Adapted:
    """The ``fwd`` of :func:`adapt`: ``fwd(params, *args, **kwargs)`` runs the model with the adapter ``params``.

    Attributes:
        config: the adapter config.
        model: the user's model (never modified).
        targets: the adapted module paths, in module order.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, layers: dict[str, AdapterLayer]) -> None:
        self.model = model
        self.config = config
        self.targets: tuple[str, ...] = tuple(layers)
        self._layers = layers
        self._binding = Binding()
        # (params, rows) of the last call with gradients: checkpointed layers recomputed during backward() run
        # after fwd has returned, and must see the same adapter (shared across threads: autograd may recompute
        # in its own threads).
        self._recompute: list[Any] = [None, None]
        modules = dict(model.named_modules())
        self._copies = _trainable_copies(model, config, modules, layers)
        self._modules = modules
        self._checked: int | None = None  # id() of the last params dict that passed _check
        self._shapes: dict[str, dict[str, torch.Size]] = {}  # filled by the first init(), which adapt() calls
        forwards = {path: self._intercept(path, layer, type(modules[path]).forward) for path, layer in layers.items()}
        overrides = _overrides(self._copies, modules)
        # Two views of one model: a lean one for inference, and one whose base parameters read as detached for
        # when gradients are on, so backward never computes (or accumulates) gradients for the base weights.
        self._view = build_view(model, forwards, overrides, self._binding, self._recompute)
        self._grad_view = build_view(model, forwards, overrides, self._binding, self._recompute, freeze=True)

    def _intercept(self, path: str, layer: AdapterLayer, base: BaseForward) -> Callable[..., Any]:
        binding, recompute = self._binding, self._recompute

        def forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            params, rows = binding.params, binding.rows
            if params is OUTSIDE:  # autograd recomputing a checkpointed layer after fwd returned
                params, rows = recompute
            if params is not None:
                tensors = params.get(path)
                if tensors is not None:
                    if rows is not None:
                        return layer.forward_mixed(module, tensors, rows, path, base, *args, **kwargs)
                    return layer.forward(module, tensors, base, *args, **kwargs)
            return base(module, *args, **kwargs)

        return forward

    def __call__(
        self,
        params: Mapping[str, Mapping[str, Tensor]] | None,
        /,
        *args: Any,
        adapter_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model with ``params`` (``None``: the base model).

        With ``adapter_ids`` (a LongTensor with one entry per batch row), ``params`` is a stacked tree
        (:func:`funcpeft.stack`, K adapters) and row ``i`` runs with adapter ``adapter_ids[i]``, or the base model
        where it is ``-1``: a mixed batch, one pass for all rows, differentiable with respect to ``params``.
        """
        rows = None
        if adapter_ids is not None:
            rows = self._rows(params, adapter_ids)
        elif params is not None and not torch.compiler.is_compiling():
            self._check(params)
        binding = self._binding
        previous = binding.params, binding.rows
        binding.params, binding.rows = params, rows
        grad = torch.is_grad_enabled()
        try:
            return (self._grad_view if grad else self._view)(*args, **kwargs)
        except RuntimeError as err:
            if grad and _checkpointing_under_functorch(self.model, err):
                raise RuntimeError(
                    "fwd ran inside a torch.func transform (grad, vjp, vmap) while the model uses activation "
                    "checkpointing, which torch.func does not support (it needs saved-tensor hooks). Take gradients "
                    "with plain autograd instead: loss = loss_fn(params); loss.backward() (the params leaves have "
                    "requires_grad=True; the adapter stays applied when layers are recomputed), or disable "
                    "checkpointing to use torch.func.grad."
                ) from err
            raise
        finally:
            if grad and previous[0] is OUTSIDE and _eager_autograd():
                self._recompute[:] = (params, rows)  # the outermost call: what a backward() recomputation must see
            binding.params, binding.rows = previous

    def _rows(self, params: Any, adapter_ids: Any) -> Rows:
        """Validate a mixed batch's stacked ``params`` and ``adapter_ids``; the per-row selection."""
        if not isinstance(adapter_ids, Tensor) or adapter_ids.dtype not in _INDEX_DTYPES or adapter_ids.dim() != 1:
            what = (
                f"a {adapter_ids.dtype} tensor of shape {tuple(adapter_ids.shape)}"
                if isinstance(adapter_ids, Tensor)
                else type(adapter_ids).__name__
            )
            raise TypeError(
                f"`adapter_ids` must be a 1-D integer (Long) tensor with one adapter index per batch row, got {what}."
            )
        if params is None:
            raise ValueError("`adapter_ids` selects adapters from stacked params; pass them (funcpeft.stack) too.")
        if self._copies:
            raise ValueError(
                f"Mixed batches apply adapter tensors per row; this config also trains full copies of "
                f"{sorted(self._copies)[:3]} (bias or modules_to_save), which cannot differ per row."
            )
        if not torch.compiler.is_compiling():
            k = self._check(params, stacked=True)
            if adapter_ids.numel() and (int(adapter_ids.min()) < -1 or int(adapter_ids.max()) >= k):
                raise ValueError(
                    f"`adapter_ids` must lie in [-1, {k - 1}] for {k} stacked adapters (-1: the base model), got "
                    f"values from {int(adapter_ids.min())} to {int(adapter_ids.max())}."
                )
        active = adapter_ids >= 0
        return Rows(index=adapter_ids.clamp(min=0).long(), active=active.float())

    def _check(self, params: Any, stacked: bool = False) -> int:
        """Validate ``params`` against the model (structure and shapes; with ``stacked``, a common leading K), once
        per params dict. Returns K (1 when not stacked)."""
        if id(params) == self._checked and not stacked:
            return 1
        if not isinstance(params, Mapping):
            raise TypeError(
                f"`params` must be the adapter dict returned by funcpeft.adapt (or None for the base model), got "
                f"{type(params).__name__}."
            )
        unknown = params.keys() - self._shapes.keys()
        if unknown:
            paths = list(self._shapes)
            raise ValueError(
                f"`params` has entries for {sorted(unknown)[:5]}, which this adapter does not adapt; its module "
                f"paths are {paths[:5]}{'...' if len(paths) > 5 else ''}. Was it made for another config or model?"
            )
        k: int | None = None
        for path, expected in self._shapes.items():
            entry = params.get(path)
            if not isinstance(entry, Mapping) or entry.keys() != expected.keys():
                have = sorted(entry) if isinstance(entry, Mapping) else entry
                raise ValueError(
                    f"`params[{path!r}]` must hold {sorted(expected)}, got {have}. Build params with fwd.init() "
                    "or funcpeft.load() for this config."
                )
            for name, shape in expected.items():
                tensor = entry[name]
                if not isinstance(tensor, Tensor):
                    raise TypeError(f"`params[{path!r}][{name!r}]` must be a Tensor, got {type(tensor).__name__}.")
                have_shape = tensor.shape[1:] if stacked else tensor.shape
                if have_shape != shape or (stacked and tensor.dim() == len(shape)):
                    hint = " stacked (K, ...)" if stacked else ""
                    raise ValueError(
                        f"`params[{path!r}][{name!r}]` has shape {tuple(tensor.shape)}, but module {path!r} "
                        f"({type(self._modules[path]).__name__}) needs{hint} {tuple(shape)} under this config "
                        f"(r, kernel and features must match the model)."
                    )
                if stacked:
                    if k is None:
                        k = tensor.shape[0]
                    elif tensor.shape[0] != k:
                        raise ValueError(
                            f"`params[{path!r}][{name!r}]` stacks {tensor.shape[0]} adapters, others stack {k}."
                        )
        if not stacked:
            self._checked = id(params)
        return k if k is not None else 1

    def init(self, generator: torch.Generator | None = None) -> Params:
        """A fresh adapter: new leaf tensors with ``requires_grad=True`` (PEFT's initialisation)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")
        modules = self._modules
        paths = set(self._layers) | set(self._copies)
        params: Params = {}
        with torch.no_grad():
            for path in (p for p in modules if p in paths):
                entry: dict[str, Tensor] = {}
                if path in self._layers:
                    entry.update(self._layers[path].init(modules[path], generator))
                for name in self._copies.get(path, ()):
                    entry[name] = modules[path].get_parameter(name).detach().clone()
                params[path] = {k: v.requires_grad_(True) for k, v in entry.items()}
        if not self._shapes:
            self._shapes = {path: {name: t.shape for name, t in entry.items()} for path, entry in params.items()}
        return params

    def merge(self, params: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """The model's full ``state_dict()`` with the adapter folded in.

        ``model2.load_state_dict(fwd.merge(params))`` makes ``model2(x)`` equal ``fwd(params, x)`` (eval mode).
        Neither the model nor ``params`` is changed; entries the adapter does not touch are the model's own
        tensors (not copies). Half-precision weights are merged in float32 and cast back.

        Raises:
            ValueError: a layer's adapted weight cannot be stored in its own weight: it is tied to another
                module (e.g. an input embedding shared with the LM head), or a grouped conv's adapter mixes groups.
        """
        self._check(params)
        state = self.model.state_dict()
        modules = dict(self.model.named_modules())
        owners: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(name)
        with torch.no_grad():
            for path, entry in params.items():
                module, prefix = modules[path], path + "."
                for name in self._copies.get(path, ()):
                    state[prefix + name] = entry[name].detach()
                layer = self._layers.get(path)
                if layer is None:
                    continue
                tied = [n for n in owners.get(id(module.weight), []) if n != prefix + "weight"]
                if tied:
                    raise ValueError(
                        f"Cannot merge the adapter on {path!r}: its weight is tied to {tied}, so folding the adapter "
                        "into one tensor would change those modules too (PEFT silently does). Untie the weights "
                        "first, or keep the adapter unmerged."
                    )
                tensors = {k: _upcast(v.detach()) for k, v in entry.items()}
                weight, bias = layer.effective_weight(_MergeSource(module, tensors.get("bias")), tensors)
                weight_dtype = module.weight.dtype
                state[prefix + "weight"] = _layers.to_module_layout(module, layer.kind, weight).to(weight_dtype)
                if bias is not None:
                    if getattr(module, "bias", None) is None:
                        raise ValueError(
                            f"Cannot merge `lora_bias` of {path!r}: the base layer has no bias to fold it into."
                        )
                    state[prefix + "bias"] = bias.to(module.bias.dtype)
        return state

    def __repr__(self) -> str:
        return (
            f"<funcpeft.Adapted {type(self.config).__name__} on {type(self.model).__name__}: "
            f"{len(self.targets)} adapted modules>"
        )


def _eager_autograd() -> bool:
    """Whether backward() may later recompute checkpointed layers in Python: not inside torch.func transforms
    (which refuse checkpointing) nor under torch.compile (which traces checkpointed regions into its graph, and
    must not see the transform's wrapped tensors escape into a stash)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is None


def _checkpointing_under_functorch(model: nn.Module, err: RuntimeError) -> bool:
    """Whether ``err`` is torch.func refusing activation checkpointing (checked only once a call has failed)."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return False
    flagged = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    return flagged or "checkpoint" in str(err) or "saved tensor hooks" in str(err)


def _upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _MergeSource:
    """A layer as ``effective_weight`` should see it when merging: half-precision weight and bias read as float32
    (merge exactly, cast back once), and the adapter's trainable bias copy, if any, in place of the base bias."""

    def __init__(self, module: nn.Module, bias: Tensor | None) -> None:
        self._module = module
        self.weight = _upcast(module.weight.detach())
        base_bias = getattr(module, "bias", None)
        self.bias = bias if bias is not None else (None if base_bias is None else _upcast(base_bias.detach()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _trainable_copies(
    model: nn.Module, config: AdapterConfig, modules: Mapping[str, nn.Module], layers: Mapping[str, AdapterLayer]
) -> dict[str, tuple[str, ...]]:
    """``{module_path: parameter names}`` the adapter trains as full copies (biases, ``modules_to_save``)."""
    copies: dict[str, tuple[str, ...]] = {}
    saved = find_modules_to_save(model, getattr(config, "modules_to_save", None))
    for path in saved:
        copies[path] = tuple(name for name, _ in modules[path].named_parameters())
    bias = getattr(config, "bias", "none")
    if bias != "none":
        for path, module in modules.items():
            if bias == "lora_only" and path not in layers:
                continue
            if any(path == s or path.startswith(s + ".") for s in saved):
                continue
            if module._parameters.get("bias") is not None:
                copies[path] = ("bias",)
    return copies


def _overrides(copies: Mapping[str, tuple[str, ...]], modules: Mapping[str, nn.Module]) -> Override:
    """Which parameter attribute of which module reads which ``params[owner][key]``."""
    overrides: Override = {}
    for owner, names in copies.items():
        for name in names:
            sub, _, attr = name.rpartition(".")
            path = f"{owner}.{sub}" if sub else owner
            overrides.setdefault(path, {})[attr] = (owner, name)
    return overrides


def adapt(
    model: nn.Module, config: AdapterConfig, *, generator: torch.Generator | None = None
) -> tuple[Params, Adapted]:
    """Adapt ``model`` functionally: returns a fresh adapter ``params`` and ``fwd(params, *args, **kwargs)``.

    The model is never modified (see :mod:`funcpeft._view`). ``params`` is ``{module_path: {tensor_name:
    Tensor}}`` with PEFT's names and shapes; ``fwd(None, ...)`` is the base model. ``fwd`` composes with
    ``torch.func`` (``grad``, ``vmap`` over a leading adapter dim, ``jvp``) and ``torch.compile``.

    Args:
        model: any ``torch.nn.Module``.
        config: an adapter config such as :class:`funcpeft.LoraConfig`.
        generator: the random generator for the adapter's initialisation (default: torch's global one).

    Raises:
        TypeError: ``model`` is not a module or ``config`` not a funcpeft config.
        ValueError: a target matches nothing or a matched module cannot be adapted (the message names it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    fwd = Adapted(model, config, build_layers(model, config))
    return fwd.init(generator), fwd
