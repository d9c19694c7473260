"""Checks ``adapt`` runs before building a view: models and targets the view cannot adapt are refused, loudly.

The view (:mod:`funcpeft._view`) intercepts a module's *class-level* ``forward`` as its parent calls it. Three
kinds of model would make that silently ineffective, so each is handled here, once, at ``adapt``:

- a ``torch.compile``-d model (an ``OptimizedModule``): its forward calls the compiled original, around any view.
  ``adapt`` adapts the module it wraps (``_orig_mod``), so paths, state dicts and checkpoints are the plain
  model's; compile ``fwd`` instead (``torch.compile(fwd)``);
- a data-parallel wrapper (``DistributedDataParallel``, FSDP's ``FullyShardedDataParallel``): it synchronises the
  gradients of the parameters it wraps, which the adapter's are not, so ranks training through ``fwd`` would
  silently diverge. ``adapt`` warns (:func:`unwrap_compiled`) and names the fix: ``DDP(fwd.bind(params))`` or
  :func:`funcpeft.distributed.average_gradients`;
- a module whose ``forward`` was replaced on the instance (accelerate's offloading hooks, monkeypatching, a
  compiled submodule): the replacement is bound to the original module and would bypass the view. Refused;
- a target its parent never calls: ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly, so an adapter on
  ``out_proj`` alone would do nothing (PEFT silently adapts it to no effect). Refused here, pointing at LoRA on the
  attention module itself (:mod:`funcpeft.methods.lora_mha`); targets that do not run for other reasons are
  reported after the first call (``Adapted``'s probe).

:func:`unbatched` finds targets whose inputs' first dimension is not the batch, for which a mixed batch's per-row
selection would pick the wrong rows: inside sequence-first modules (``batch_first=False``, :func:`sequence_first`)
or the experts of a mixture-of-experts block (which receive only the tokens routed to them).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from funcpeft._targeting import user_warning
from funcpeft._warnings import FuncpeftWarning

__all__ = [
    "ancestors",
    "refuse_functorch_checkpointing",
    "refuse_unreachable",
    "report_unrun",
    "sequence_first",
    "unbatched",
    "unwrap_compiled",
]


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``adapt`` adapts for ``model``: through ``torch.compile``'s and ``DistributedDataParallel``'s
    wrappers (repeatedly, in any nesting), not through FSDP's; a :class:`~funcpeft.FuncpeftWarning` for either
    data-parallel wrapper.

    DDP is unwrapped (``model.module``) because its forward adds nothing the adapted forward needs: it broadcasts
    buffers and arms the gradient synchronisation of the wrapper's own parameters (the frozen base). Paths, state
    dicts and checkpoints are then the plain model's, as for ``torch.compile``. FSDP's ``FullyShardedDataParallel``
    is kept: its forward all-gathers the sharded weights, without which the wrapped module runs on shards, so the
    paths keep its ``_fsdp_wrapped_module.`` prefix. ``fully_shard`` (FSDP2) wraps nothing and is not affected.
    """
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            _warn_unsynchronised(
                "DistributedDataParallel",
                "adapts the module it wraps (`model.module`)",
                "pass `model.module` to adapt and put DDP around the adapter instead, "
                "`DistributedDataParallel(fwd.bind(params))`",
            )
            model = model.module
        else:
            break
    if _is_fsdp_wrapper(model):
        _warn_unsynchronised(
            "FullyShardedDataParallel",
            "adapts the wrapper itself, whose forward gathers the sharded weights (build it with "
            "`use_orig_params=True`; the paths in `params` start with '_fsdp_wrapped_module.')",
            "put DDP around the adapter, `DistributedDataParallel(fwd.bind(params))`; or shard with FSDP2's "
            "torch.distributed.fsdp.fully_shard, which wraps nothing (this warning is about the wrapper)",
        )
    return model


def _is_fsdp_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is FSDP1's ``FullyShardedDataParallel`` (checked only once the user has imported it)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    wrapper = getattr(fsdp, "FullyShardedDataParallel", None)
    return isinstance(wrapper, type) and isinstance(model, wrapper)


def _warn_unsynchronised(wrapper: str, adapted: str, fix: str) -> None:
    user_warning(
        f"`model` is wrapped in {wrapper}; funcpeft {adapted}. {wrapper} does not synchronise the gradients of "
        "`params` (it averages those of the model's own parameters only): fwd(params, ...) runs outside "
        "it, so each rank would train its own adapter and the ranks would silently diverge. "
        f"Fix: {fix}, or average the gradients yourself with funcpeft.distributed.average_gradients(grads) before "
        "each update."
    )


def ancestors(path: str) -> list[str]:
    """``"a.b.c"`` -> ``["", "a", "a.b"]``: the paths of the modules that contain ``path``."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts))]


def refuse_unreachable(model: nn.Module, targets: Iterable[str], viewed: Iterable[str]) -> None:
    """Refuse targets the view cannot reach.

    Args:
        model: the (unwrapped) model.
        targets: the adapted module paths.
        viewed: every module path the view replaces (targets, modules whose parameters it overrides or freezes,
            and their ancestors).

    Raises:
        ValueError: a viewed module has an instance-level ``forward``, or a target is the ``out_proj`` of an
            ``nn.MultiheadAttention`` (named, with the fix).
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    for path in sorted(viewed, key=lambda p: (p.count("."), p)):
        module = modules[path]
        if "forward" in module.__dict__:
            name = path or "the model itself"
            compiled = type(module).__name__ == "OptimizedModule"
            fix = (
                "it is a torch.compile-d submodule: compile the adapted call instead (torch.compile(fwd)) and keep "
                "the model's submodules uncompiled"
                if compiled
                else "remove the replacement first (for accelerate's hooks: accelerate.hooks.remove_hook_from_module"
                "(model, recurse=True)), or adapt a model without it"
            )
            raise ValueError(
                f"Module {name!r} ({type(module).__name__}) has its `forward` replaced on the instance "
                f"({module.__dict__['forward']!r}), so funcpeft cannot apply the adapter through it: the "
                f"replacement calls the original module and would bypass the adapter silently. Fix: {fix}."
            )
    for path in targets:
        parent_path, _, name = path.rpartition(".")
        parent = modules.get(parent_path) if path else None
        if isinstance(parent, nn.MultiheadAttention) and name == "out_proj":
            also = parent_path in targets
            raise ValueError(
                f"Target {path!r} is the output projection of the nn.MultiheadAttention {parent_path!r}, which reads "
                "`out_proj.weight` directly instead of calling the module, so an adapter on it alone would have no "
                "effect (PEFT adapts it anyway, silently to no effect). "
                + (
                    f"{parent_path!r} is targeted too, and LoRA on it already adapts its out_proj (as PEFT): "
                    f"exclude this one, `exclude_modules=[{path!r}]`."
                    if also
                    else f"With LoRA, target the attention module itself, e.g. `target_modules=[{parent_path!r}]` "
                    "(it adapts the packed in_proj and out_proj, as PEFT), and exclude this one, "
                    f"`exclude_modules=[{path!r}]`; other methods: exclude it."
                )
            )


def sequence_first(model: nn.Module, targets: Iterable[str]) -> dict[str, str]:
    """``{target: enclosing module path}`` for targets inside (or being) a sequence-first module: one with
    ``batch_first=False`` (``nn.MultiheadAttention``, ``nn.Transformer``, RNNs), or holding such an attention as a
    direct child (``nn.TransformerEncoderLayer``/``DecoderLayer``, which keep no flag of their own): their
    inputs are ``(seq, batch, ...)``."""
    modules: Mapping[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))
    found: dict[str, str] = {}
    for path in targets:
        for owner in [*ancestors(path), path]:
            if _sequence_first(modules[owner]):
                found[path] = owner
                break
    return found


def _sequence_first(module: nn.Module) -> bool:
    if getattr(module, "batch_first", None) is False:
        return True
    return any(isinstance(c, nn.MultiheadAttention) and not c.batch_first for c in module.children())


def unbatched(model: nn.Module, targets: Iterable[str]) -> dict[str, str]:
    """``{target: why}`` for the targets a mixed batch cannot select rows for, because the first dimension of their
    input is not the batch: inside a sequence-first module (:func:`sequence_first`), or an expert of a
    mixture-of-experts block (under a module named ``experts`` or of a class named ``*Experts``, transformers'
    convention), which receives the tokens the router sends it, flattened across the batch, so a count that happens
    to equal (or be a multiple of) the batch size would silently give rows other requests' adapters. PEFT checks
    only that count, per call."""
    modules: Mapping[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))
    found = {
        target: f"lies inside {owner or 'the model'!r}, which is sequence-first (batch_first=False): its inputs are "
        "(seq, batch, ...), so rows would be picked along the sequence. Build the model with batch_first=True, or"
        for target, owner in sequence_first(model, targets).items()
    }
    for path in targets:
        owner = next((a for a in ancestors(path) if _holds_experts(a, modules[a])), None)
        if path not in found and owner is not None:
            found[path] = (
                f"is an expert of the mixture-of-experts block {owner!r}: it receives only the tokens routed to it, "
                "not the batch's rows. Exclude the experts from the config (`exclude_modules`), or"
            )
    return found


def _holds_experts(path: str, module: nn.Module) -> bool:
    return path.rpartition(".")[2] == "experts" or type(module).__name__.endswith("Experts")


def report_unrun(targets: Iterable[str], ran: set[str]) -> None:
    """Warn about adapted modules that did not run in the first call with an adapter (``Adapted``'s probe)."""
    unrun = [p for p in targets if p not in ran]
    if unrun:
        warnings.warn(
            f"Adapted modules {unrun[:5]}{'...' if len(unrun) > 5 else ''} did not run in the first call of fwd "
            "with an adapter, so their adapter had no effect on it (and fwd.merge would fold in what fwd does "
            "not apply). Their parent may use their weight without calling them, or this call does not reach "
            "them (an unused branch, an expert no token was routed to); if they never run, exclude them "
            "(`exclude_modules`).",
            FuncpeftWarning,
            stacklevel=4,
        )


def refuse_functorch_checkpointing(model: nn.Module, err: RuntimeError) -> None:
    """Raise a clear error if ``err`` (a failed call with gradients) is torch.func refusing activation
    checkpointing; return otherwise, for the caller to re-raise ``err`` as it is."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return
    flagged = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if flagged or "checkpoint" in str(err) or "saved tensor hooks" in str(err):
        raise RuntimeError(
            "fwd ran inside a torch.func transform (grad, vjp, vmap) while the model uses activation "
            "checkpointing, which torch.func does not support (it needs saved-tensor hooks). Take gradients "
            "with plain autograd instead: loss = loss_fn(params); loss.backward() (the params leaves have "
            "requires_grad=True; the adapter stays applied when layers are recomputed), or disable "
            "checkpointing to use torch.func.grad."
        ) from err
