"""``adapt(model, config) -> (params, fwd)``: an adapter as a pytree beside an untouched model.

``adapt`` does all the work that does not depend on the adapter's values, once: it resolves the targets,
builds one :class:`~funcpeft.methods.base.AdapterLayer` per target, and builds a *view* of the model whose
adapted modules read their tensors from a per-thread binding (see :mod:`funcpeft._view` for why this never
modifies the model and is safe across threads). ``fwd(params, *args)`` then only binds ``params`` and calls the
view.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from funcpeft import _sharded
from funcpeft._check import Validator
from funcpeft._merge import merged_state_dict
from funcpeft._preflight import ancestors, refuse_unreachable, sequence_first, unwrap_compiled
from funcpeft._quant import base_forward, detours
from funcpeft._targeting import saved_modules
from funcpeft._view import OUTSIDE, BaseTree, Binding, Computed, Override, Recompute, build_view
from funcpeft._warnings import FuncpeftWarning
from funcpeft.config import AdapterConfig
from funcpeft.methods.base import AdapterLayer, BaseForward, Rows, build_layers, method_for

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
        # Which adapter layers recomputed by activation checkpointing during backward() see, per graph task.
        self._recompute = Recompute()
        modules = dict(model.named_modules())
        self._copies = _trainable_copies(model, config, modules, layers)
        self._modules = modules
        # Tensors every layer reads, kept once under params[""] (VeRA's frozen projections); also the fallback for
        # a tree without that entry (a checkpoint saved without them, regenerated here as PEFT does).
        shared = method_for(config).shared
        self._shared: dict[str, Tensor] = {} if shared is None else shared(config, modules, layers)
        self._probe = True  # the first eager call with an adapter reports targets that never ran
        # (layers that find their batch dimension themselves, nn.MultiheadAttention's, are not sequence-first)
        self._sequence_first = sequence_first(model, [p for p, lay in layers.items() if not _own_batch_dim(lay)])
        forwards = {path: self._intercept(path, layer, base_forward(modules[path])) for path, layer in layers.items()}
        forwards.update(detours(modules, forwards))  # quantized layers torch.func cannot run, adapted or not
        overrides = _overrides(self._copies, modules)
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
        # Calls with `base=` run on two more views, built on the first such call (they view every module).
        self._view_parts = (forwards, overrides)
        self._bases: tuple[BaseTree, nn.Module, nn.Module] | None = None
        self._bases_lock = threading.Lock()
        self._base_validator: tuple[Validator, Validator] | None = None
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

    def _with_base(self, base: Any, lean: bool) -> _BaseCall:
        """The ``view`` argument of :meth:`_run` for a call with ``base=``: the checked tensors, and whether the
        lean view must serve it whatever the grad mode (``generate``)."""
        return _BaseCall(self._base_views()[0].resolve(base), lean)

    def _base_views(self) -> tuple[BaseTree, nn.Module, nn.Module]:
        """``(names, lean view, grad view)`` for calls with ``base=`` (built once, on the first such call)."""
        bases = self._bases
        if bases is None:
            with self._bases_lock:
                bases = self._bases
                if bases is None:
                    forwards, overrides = self._view_parts
                    tree = BaseTree(self.model)
                    binding, recompute = self._binding, self._recompute
                    lean = build_view(self.model, forwards, overrides, binding, recompute, base=tree)
                    grad = build_view(self.model, forwards, overrides, binding, recompute, freeze=True, base=tree)
                    bases = self._bases = (tree, lean, grad)
        return bases

    def _check_on_base(self, params: Any) -> None:
        """Validate ``params`` for a call with ``base=``: as always, except that a module on the ``meta`` device
        (whose tensors ``base`` supplies) does not decide the adapter's device."""
        pair = self._base_validator
        if pair is None or pair[0] is not self._validator:
            modules = {
                path: nn.Module() if any(p.is_meta for p in module.parameters()) else module
                for path, module in self._modules.items()
            }
            validator = Validator(self._validator.shapes, modules, self._validator.optional)
            pair = self._base_validator = (self._validator, validator)
        pair[1].check(params)

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
        base = None
        if type(view) is _BaseCall:  # fwd(..., base=...): the base views, reading `binding.base`
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
                self._check_on_base(params)
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
            _, lean_view, grad_view = self._base_views()
            view = grad_view if grad and not lean else lean_view
            previous_base, binding.base = binding.base, base
        try:
            out = call(view, *args, **kwargs)
            if probe:
                self._report_unrun(binding.ran)
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
            binding.params, binding.rows, binding.ran = previous
            if reads:
                binding.reads = previous_reads
            if base is not None:
                binding.base = previous_base
        if grad and outermost and _eager_autograd():
            self._recompute.attach(out, params, rows, base)  # what a backward() recomputation of this call must see
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

    def _report_unrun(self, ran: set[str]) -> None:
        self._probe = False
        unrun = [p for p in self.targets if p not in ran]
        if unrun:
            warnings.warn(
                f"Adapted modules {unrun[:5]}{'...' if len(unrun) > 5 else ''} did not run in the first call of fwd "
                "with an adapter, so their adapter had no effect on it (and fwd.merge would fold in what fwd does "
                "not apply). Their parent may use their weight without calling them, or this call does not reach "
                "them (an unused branch, an expert no token was routed to); if they never run, exclude them "
                "(`exclude_modules`).",
                FuncpeftWarning,
                stacklevel=3,
            )

    def _rows(self, params: Any, adapter_ids: Any, repeat: bool = False, sparse: bool = False) -> Rows:
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
        if self._sequence_first:
            target, owner = next(iter(self._sequence_first.items()))
            raise ValueError(
                f"Mixed batches select adapters by the first dimension of each adapted layer's input, but target "
                f"{target!r} lies inside {owner or 'the model'!r}, which is sequence-first (batch_first=False): its "
                "inputs are (seq, batch, ...), so rows would be picked along the sequence. Build the model with "
                "batch_first=True, or run one adapter per call (vmap over stacked params)."
            )
        k = self._stack_size(params)
        message = f"`adapter_ids` must lie in [-1, {k - 1}] for {k} stacked adapters (-1: the base model)"
        all_active = False  # under torch.compile the graph keeps the masks (no guard on data)
        if torch.compiler.is_compiling() or adapter_ids.device.type != "cpu":
            # Data-dependent: checked inside the graph (an eager check would break it), and on an accelerator by
            # the device (reading the range would stall the host on the device at every call, every decode step;
            # a bad id fails at the next synchronization). Rows always mask base rows there.
            torch._assert_async(((adapter_ids >= -1) & (adapter_ids < k)).all(), message + ".")
        elif adapter_ids.numel():
            low, high = int(adapter_ids.min()), int(adapter_ids.max())  # one host read each, per call
            if low < -1 or high >= k:
                raise ValueError(f"{message}, got values from {low} to {high}.")
            all_active = low >= 0  # no base rows: gathers skip masking in the neutral value
        # only generate repeats rows, and transformers' generate always runs under no_grad: its decode steps may
        # reuse what each layer gathered (nothing to differentiate through)
        cache = {} if repeat else None
        if sparse is not False:
            _check_sparse(sparse)
        index, active = adapter_ids.clamp(min=0).long(), adapter_ids >= 0
        return Rows(index, active, repeat, cache, sparse, all_active)

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
        return (
            f"<funcpeft.Adapted {type(self.config).__name__} on {type(self.model).__name__}: "
            f"{len(self.targets)} adapted modules>"
        )


class _BaseCall(NamedTuple):
    """A call's checked ``base=`` tensors (passed to :meth:`Adapted._run` as its ``view``, so that subclasses
    overriding ``_run`` forward it unchanged), and whether the lean view must serve it (``generate``)."""

    base: dict[str, Tensor]
    lean: bool


def _check_sparse(sparse: Any) -> None:
    """``sparse_grad=True`` needs plain autograd: a sparse gradient cannot pass through torch.func or Dynamo."""
    if sparse is not True:
        raise TypeError(f"`sparse_grad` must be True or False, got {sparse!r}.")
    if torch.compiler.is_compiling():
        raise ValueError(
            "`sparse_grad=True` does not compose with torch.compile (its backward builds a sparse tensor of "
            "data-dependent size); call fwd eagerly for sparse-gradient steps, or use dense gradients."
        )
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise ValueError(
            "`sparse_grad=True` needs plain autograd (loss.backward() or torch.autograd.grad): torch.func transforms "
            "(grad, vjp, vmap) only produce dense gradients. Drop sparse_grad under torch.func."
        )


def _own_batch_dim(layer: AdapterLayer) -> bool:
    return getattr(layer, "own_batch_dim", False)


def _call(view: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return view(*args, **kwargs)


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


def _trainable_copies(
    model: nn.Module, config: AdapterConfig, modules: Mapping[str, nn.Module], layers: Mapping[str, AdapterLayer]
) -> dict[str, tuple[str, ...]]:
    """``{module_path: parameter names}`` the adapter trains as full copies (biases, ``modules_to_save`` and the
    ``task_type``'s head, as PEFT's task models)."""
    copies: dict[str, tuple[str, ...]] = {}
    saved = saved_modules(model, config)
    for path in saved:
        copies[path] = tuple(name for name, _ in modules[path].named_parameters())
    bias = getattr(config, "bias", "none")
    if bias != "none":
        for path, module in modules.items():
            if bias.endswith("_only") and path not in layers:  # "lora_only", "oft_only": PEFT's rule
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
