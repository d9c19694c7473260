"""``adapt(model, config) -> (params, fwd)``: an adapter as a pytree beside an untouched model.

``adapt`` does all the work that does not depend on the adapter's values, once: it resolves the targets,
builds one :class:`~funcpeft.methods.base.AdapterLayer` per target, and builds a *view* of the model whose
adapted modules read their tensors from a per-thread binding (see :mod:`funcpeft._view` for why this never
modifies the model and is safe across threads). ``fwd(params, *args)`` then only binds ``params`` and calls the
view.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from funcpeft import _sharded
from funcpeft._base_calls import BaseCall, BaseViews
from funcpeft._check import Validator
from funcpeft._merge import merged_state_dict
from funcpeft._preflight import (
    ancestors,
    refuse_functorch_checkpointing,
    refuse_unreachable,
    report_unrun,
    unbatched,
    unwrap_compiled,
)
from funcpeft._quant import base_forward, detours
from funcpeft._rows import refuse_adapter_names, refuse_mixed, select
from funcpeft._targeting import copy_overrides, trainable_copies
from funcpeft._view import OUTSIDE, Binding, Computed, Recompute, build_view
from funcpeft.config import AdapterConfig
from funcpeft.methods.base import AdapterLayer, BaseForward, Rows, build_layers, method_for

__all__ = ["Adapted", "adapt", "Params"]

Params = dict[str, dict[str, Tensor]]


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
        # Which adapter layers recomputed by activation checkpointing during backward() see, per graph task.
        self._recompute = Recompute()
        modules = dict(model.named_modules())
        self._copies = trainable_copies(model, config, modules, layers)
        self._modules = modules
        # Tensors every layer reads, kept once under params[""] (VeRA's frozen projections); also the fallback for a
        # tree without that entry (a checkpoint saved without them, regenerated here as PEFT does).
        shared = method_for(config).shared
        self._shared: dict[str, Tensor] = {} if shared is None else shared(config, modules, layers)
        self._probe = True  # the first eager call with an adapter reports targets that never ran
        # (layers that find their batch dimension themselves, nn.MultiheadAttention's, are not sequence-first)
        own_batch_dim = {p for p, layer in layers.items() if getattr(layer, "own_batch_dim", False)}
        self._unbatched = unbatched(model, [p for p in layers if p not in own_batch_dim])
        forwards = {path: self._intercept(path, layer, base_forward(modules[path])) for path, layer in layers.items()}
        forwards.update(detours(modules, forwards))  # quantized layers torch.func cannot run, adapted or not
        overrides = copy_overrides(self._copies)
        for path, layer in layers.items():  # parameters read as computed from the adapter (LoRA's target_parameters)
            for name in getattr(layer, "reads", ()):
                overrides.setdefault(path, {})[name] = Computed(path, functools.partial(layer.read, name))
        self._reads = any(type(s) is Computed for o in overrides.values() for s in o.values())
        viewed = set(forwards) | set(overrides) | {p for p, m in modules.items() if m._parameters}
        refuse_unreachable(model, layers, viewed | {a for p in viewed for a in ancestors(p)})
        # Two views of one model: a lean one for inference, and one whose base parameters read as detached for
        # when gradients are on, so backward never computes (or accumulates) gradients for the base weights.
        self._view = build_view(model, forwards, overrides, self._binding, self._recompute)
        self._grad_view = build_view(model, forwards, overrides, self._binding, self._recompute, freeze=True)
        self._base_calls = BaseViews(model, forwards, overrides, self._binding, self._recompute)  # (base=)
        self._validator = Validator({}, modules)  # shapes come from the first init(), which adapt() calls

    def _intercept(self, path: str, layer: AdapterLayer, base: BaseForward) -> Callable[..., Any]:
        binding, recompute = self._binding, self._recompute
        shared = getattr(layer, "shared", False)
        entry = getattr(layer, "entry", path)  # a tied LM head reads the input embedding's trainable tokens

        def forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            params, rows = binding.params, binding.rows
            if params is OUTSIDE:  # autograd recomputing a checkpointed layer after fwd returned
                params, rows, _ = recompute.lookup()
            if params is not None:
                tensors = params.get(entry)
                if tensors is not None:
                    if shared:  # the root entry's tensors (VeRA's projections) beside the layer's own
                        tensors = {**params.get("", self._shared), **tensors}
                    ran = binding.ran
                    if ran is not None:
                        ran.add(path)
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
        sparse_grad: bool = False,
        base: Mapping[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model with ``params`` (``None``: the base model).

        With ``adapter_ids`` (a LongTensor with one entry per batch row), ``params`` is a stacked tree
        (:func:`funcpeft.stack`, K adapters) and row ``i`` runs with adapter ``adapter_ids[i]``, or the base model
        where it is ``-1``: a mixed batch, one pass for all rows, differentiable with respect to ``params``. Rows
        are the *first* dimension of every adapted layer's input (batch-first models); each row's output depends
        on its own adapter only. With ``sparse_grad=True`` (mixed batches, plain autograd), backward gives each
        stacked tensor a sparse COO gradient holding only the adapters the rows use, so a step over a few of many
        resident adapters costs memory and optimizer work for those few (optimizers that take sparse gradients:
        ``torch.optim.SparseAdam``, ``torch.optim.SGD``).

        ``params`` is validated on every call (structure, shapes, dtypes, devices; a cheap signature comparison
        once a tree of the same signature has passed), also under ``torch.compile``.

        With ``base`` (``{state_dict name: Tensor}``, some or all of the model's parameters and buffers), the call
        reads those tensors instead of the model's own, without writing to the model (unlike
        ``torch.func.functional_call``, so threads may each pass their own): ``torch.func.grad`` can differentiate
        with respect to them, ``vmap`` can map over several base checkpoints, and a model built on the ``meta``
        device runs when every tensor it uses is given. The adapter applies on top of ``base``; trainable copies
        (``modules_to_save``, biases) in ``params`` still replace their base tensors.
        """
        view = None if base is None else self._with_base(base, lean=False)
        return self._run(params, adapter_ids, _call, view, args, kwargs, sparse=sparse_grad)

    def _with_base(self, base: Any, lean: bool) -> BaseCall:
        """The ``view`` argument of :meth:`_run` for a call with ``base=`` (:mod:`funcpeft._base_calls`)."""
        return self._base_calls.call(base, lean)

    def _run(
        self,
        params: Any,
        adapter_ids: Tensor | None,
        call: Callable[..., Any],
        view: nn.Module | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        repeat: bool = False,
        sparse: bool = False,
        checked: bool = False,
    ) -> Any:
        """``call(view, *args, **kwargs)`` with ``params`` bound: the one place a call binds an adapter (``fwd``,
        ``fwd.method``, ``fwd.generate``). ``view`` defaults to the grad or lean view by the grad mode; with
        ``repeat``, a layer whose batch is a multiple of ``adapter_ids``' length gives each id that many consecutive
        rows (``generate`` expands prompts with ``repeat_interleave`` for beams and ``num_return_sequences``)."""
        if "adapter_names" in kwargs:  # PEFT's: a forward taking **kwargs would ignore it (before the tree's check)
            refuse_adapter_names(kwargs["adapter_names"], "fwd")
        base = None
        if type(view) is BaseCall:  # fwd(..., base=...): the base views, reading `binding.base`
            base, lean = view
            view = None
        rows = None
        if adapter_ids is not None:
            rows = self._rows(params, adapter_ids, repeat, sparse)
        elif sparse:
            raise ValueError(
                "`sparse_grad=True` applies to mixed batches: pass `adapter_ids` too (a single adapter's gradient "
                "is dense and exactly its size)."
            )
        elif params is not None:
            if base is None:
                if not checked:  # (fwd.compile checks eagerly: no guards on the validator's tables)
                    self._validator.check(params)
            else:
                self._base_calls.check(params, self._validator, self._modules)
        binding = self._binding
        previous = binding.params, binding.rows, binding.ran
        reads = self._reads  # (only views with computed parameter reads touch `binding.reads`)
        if reads:
            previous_reads = binding.reads
        outermost = previous[0] is OUTSIDE
        # (is_compiling first: Dynamo must not read, hence guard on, the probe flag, which the first eager call flips)
        probe = not torch.compiler.is_compiling() and self._probe and params is not None and outermost
        binding.params, binding.rows, binding.ran = params, rows, (set() if probe else None)
        if reads:  # computed parameter reads, once per eager call (compiled graphs read each once: no cache to trace)
            binding.reads = {} if params is not None and not torch.compiler.is_compiling() else None
        grad = torch.is_grad_enabled()
        if view is None:
            view = self._grad_view if grad else self._view
        if base is not None:
            _, lean_view, grad_view = self._base_calls.views()
            view = grad_view if grad and not lean else lean_view
            previous_base, binding.base = binding.base, base
        try:
            out = call(view, *args, **kwargs)
            if probe:
                self._probe = False
                report_unrun(self.targets, binding.ran)
        except RuntimeError as err:
            if grad:
                refuse_functorch_checkpointing(self.model, err)
            raise
        finally:
            binding.params, binding.rows, binding.ran = previous
            if reads:
                binding.reads = previous_reads
            if base is not None:
                binding.base = previous_base
        # What a backward() recomputation of this call's checkpointed layers must see; not inside torch.func
        # transforms (they refuse checkpointing) nor under torch.compile (it traces checkpointed regions into its
        # graph, and the transform's wrapped tensors must not escape into a stash).
        eager = not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is None
        if grad and outermost and eager:
            self._recompute.attach(out, params, rows, base)
        return out

    def method(self, name_or_function: str | Callable[..., Any]) -> Callable[..., Any]:
        """``call(params, *args, adapter_ids=None, **kwargs)`` running ``model.<name>(*args, **kwargs)`` (or
        ``function(model, *args, **kwargs)``) with the adapter bound, exactly as ``fwd`` runs ``forward`` (flax's
        ``apply(..., method=...)``). See :mod:`funcpeft.serving`.

        Raises:
            AttributeError: the model has no attribute ``name`` (naming the model class).
            TypeError: ``name_or_function`` is neither a string nor callable.
        """
        from funcpeft.serving import bound_method

        return bound_method(self, name_or_function)

    def bind(self, params: Any) -> nn.Module:
        """An ``nn.Module`` carrying ``params`` for Trainer / Lightning / accelerate / DDP (flax's ``bind``): its
        parameters are ``params``' leaves themselves, ``bound(*args) == fwd(params, *args)``, model attributes and
        methods fall through with the adapter applied. See :mod:`funcpeft.bind`."""
        from funcpeft.bind import bind

        return bind(self, params)

    def _checked_call(self, params: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``fwd(params, *args, **kwargs)`` for a single adapter already validated (:mod:`funcpeft._compile`)."""
        return self._run(params, None, _call, None, args, kwargs, checked=True)

    def compile(self, **options: Any) -> Callable[..., Any]:
        """``fwd`` compiled with ``torch.compile(**options)``, one compiled function per kind of call (base or
        adapter, single or mixed, train/eval, grad mode; calls with ``base=`` run eagerly), so that serving and
        training with all of them never meets torch's recompile limit, as ``torch.compile(fwd)`` does at its 9th
        variant. Called as ``fwd``. See :mod:`funcpeft._compile` for what recompiles."""
        from funcpeft._compile import CompiledAdapted

        return CompiledAdapted(self, options)

    def generate(
        self,
        params: Any,
        /,
        *args: Any,
        adapter_ids: Tensor | None = None,
        base: Mapping[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' ``model.generate(*args, **kwargs)`` with the adapter at every step; with a stacked tree and
        ``adapter_ids`` (one per prompt row, -1: the base), rows ``generate`` expands keep their prompt row's
        adapter; ``base`` as in ``fwd``. See :func:`funcpeft.serving.generate`."""
        from funcpeft.serving import generate

        return generate(self, params, args, kwargs, adapter_ids, base)

    def _rows(self, params: Any, adapter_ids: Any, repeat: bool = False, sparse: bool = False) -> Rows:
        """Validate a mixed batch's stacked ``params`` and ``adapter_ids``; the rows (:mod:`funcpeft._rows`)."""
        refuse_mixed(params, adapter_ids, self._copies, self._unbatched)
        return select(adapter_ids, self._stack_size(params), repeat, sparse)

    def _stack_size(self, params: Any) -> int:
        """Validate a stacked tree; the number of adapters K it stacks."""
        return self._validator.check(params, stacked=True)

    @property
    def configs(self) -> tuple[AdapterConfig, ...]:
        """The adapter configs of this ``fwd``: ``(config,)`` (a list of configs gives a heterogeneous ``fwd``)."""
        return (self.config,)

    def stack(self, list_of_params: Any) -> Params:
        """:func:`funcpeft.stack` of adapters of this ``fwd``'s config, each validated against it first."""
        from funcpeft.many import stack

        for k, params in enumerate(list_of_params if isinstance(list_of_params, (list, tuple)) else ()):
            try:
                self._validator.check(params)
            except (TypeError, ValueError) as err:
                raise type(err)(f"`list_of_params[{k}]` does not fit this fwd's config: {err}") from None
        return stack(list_of_params)

    def unstack(self, stacked: Any) -> list[Params]:
        """:func:`funcpeft.unstack` of a stacked tree of this ``fwd``'s adapters (validated first)."""
        from funcpeft.many import unstack

        self._validator.check(stacked, stacked=True)
        return unstack(stacked)

    def init(self, generator: torch.Generator | None = None) -> Params:
        """A fresh adapter: new leaf tensors with ``requires_grad=True`` (PEFT's initialisation)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")
        modules = self._modules
        paths = {p for p, layer in self._layers.items() if getattr(layer, "entry", p) == p} | set(self._copies)
        params: Params = {}
        with torch.no_grad():
            if self._shared:
                params[""] = {k: v.clone().requires_grad_(True) for k, v in self._shared.items()}
            for path in (p for p in modules if p in paths):
                entry: dict[str, Tensor] = {}
                if path in self._layers:
                    entry.update(self._layers[path].init(modules[path], generator))
                for name in self._copies.get(path, ()):
                    entry[name] = _sharded.full(modules[path].get_parameter(name)).clone()  # whole, if sharded
                params[path] = {k: v.requires_grad_(True) for k, v in entry.items()}
        if not self._validator.shapes:
            shapes = {path: {name: t.shape for name, t in entry.items()} for path, entry in params.items()}
            self._validator = Validator(shapes, modules, frozenset({""}) if self._shared else frozenset())
        return params

    def merge(self, params: Mapping[str, Mapping[str, Tensor]], dequantize: bool = False) -> dict[str, Tensor]:
        """The model's full ``state_dict()`` with the adapter folded in.

        ``model2.load_state_dict(fwd.merge(params))`` makes ``model2(x)`` equal ``fwd(params, x)`` (eval mode).
        Neither the model nor ``params`` is changed; entries the adapter does not touch are the model's own
        tensors (not copies). Half-precision weights are merged in float32 and cast back; a parametrized weight
        (weight norm, ...) is stored as its parametrization's originals (:mod:`funcpeft._merge`). A quantized
        target (torchao, bitsandbytes) is stored re-quantized in its format; ``dequantize=True`` returns the whole
        model's state dict with float weights instead (:mod:`funcpeft._quant`).

        Raises:
            ValueError: a layer's adapted weight cannot be stored in its own weight: it is tied to another
                module (e.g. an input embedding shared with the LM head), its parametrization cannot represent
                it, or a grouped conv's adapter mixes groups.
        """
        self._validator.check(params)
        if self._shared:  # each layer reads the root entry's tensors beside its own, as in its forward
            root = params.get("", self._shared)
            params = {
                path: {**root, **entry} if getattr(self._layers.get(path), "shared", False) else entry
                for path, entry in params.items()
                if path
            }
        return merged_state_dict(self.model, self._layers, self._copies, params, dequantize)

    def __repr__(self) -> str:
        name = f"{type(self.config).__name__} on {type(self.model).__name__}"
        return f"<funcpeft.Adapted {name}: {len(self.targets)} adapted modules>"


def _call(view: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return view(*args, **kwargs)


def adapt(
    model: nn.Module,
    config: AdapterConfig | Sequence[AdapterConfig],
    *,
    generator: torch.Generator | None = None,
) -> tuple[Params, Adapted]:
    """Adapt ``model`` functionally: returns a fresh adapter ``params`` and ``fwd(params, *args, **kwargs)``.

    The model is never modified (see :mod:`funcpeft._view`). ``params`` is ``{module_path: {tensor_name:
    Tensor}}`` with PEFT's names and shapes; ``fwd(None, ...)`` is the base model. ``fwd`` composes with
    ``torch.func`` (``grad``, ``vmap`` over a leading adapter dim, ``jvp``) and ``torch.compile``.

    Args:
        model: any ``torch.nn.Module``. A ``torch.compile``-d model is adapted through the module it wraps
            (``fwd.model`` is that module; compile ``fwd`` itself for speed: ``torch.compile(fwd)``).
        config: an adapter config such as :class:`funcpeft.LoraConfig`, or a list of K LoRA configs that may differ
            in everything per adapter (rank, alpha, targets, DoRA, ...): then ``params`` is a stacked tree of K fresh
            adapters for mixed batches and ``fwd`` a :class:`funcpeft.hetero.Heterogeneous` (``fwd.stack``,
            ``fwd.unstack``, ``fwd.configs``).
        generator: the random generator for the adapter's initialisation (default: torch's global one).

    Raises:
        TypeError: ``model`` is not a module or ``config`` not a funcpeft config.
        ValueError: a target matches nothing or a matched module cannot be adapted, or the view could not reach
            it (a module with its ``forward`` replaced on the instance; ``nn.MultiheadAttention.out_proj``): the
            message names it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(config, (list, tuple)):
        from funcpeft.hetero import adapt_many

        return adapt_many(model, config, generator)
    model = unwrap_compiled(model)
    fwd = Adapted(model, config, build_layers(model, config))
    return fwd.init(generator), fwd
