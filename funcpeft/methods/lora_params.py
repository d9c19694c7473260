"""LoRA on raw ``nn.Parameter``s: ``LoraConfig(target_parameters=[...])``, as PEFT 0.21.2's ``lora.ParamWrapper``.

Mixture-of-Experts blocks keep their experts as parameters of shape ``(E, d1, d2)`` that the module's forward reads
directly (transformers' ``Llama4TextExperts``, ``GptOssExperts``, ``Qwen3MoeExperts``: ``gate_up_proj``,
``down_proj``); there is no Linear to hook. funcpeft makes the owning module's *view* read the parameter as
``W + delta`` (a computed parameter read, :class:`funcpeft._view.Computed`), so the module's own forward runs on the
adapted weight, and the model is never touched (PEFT registers a parametrization on the module for each call).
Each read is computed once per call and grad mode (an eager MoE loop indexes the stack once per expert), in one
``baddbmm`` with autocast off, as PEFT's. Unlike PEFT, a parent that reads a child's parameter without calling the
child gets the adapted value too (PEFT raises ``AttributeError``: the child became its wrapper), and a read inside
the model's own ``no_grad`` block does not freeze the adapter for the rest of the call (PEFT's parametrization cache
serves that no-grad value to the whole forward, so backward fails).

Shapes, init, scaling and the delta are PEFT's (``ParamWrapper``):

- a 2-D parameter ``(out, in)`` is a Linear weight: ``lora_A`` (r, in), ``lora_B`` (out, r), ``delta = s B A``;
- a 3-D parameter ``(E, d1, d2)``: ``lora_A`` (r*E, in) read expert-major (row ``e*r + k``), ``lora_B`` (out, r*E)
  read rank-major (column ``k*E + e``); ``delta[e] = s B_e A_e`` with ``(out, in) = (d1, d2)``, or, where the module
  says ``is_transposed`` (transformers' flag for ``(E, in, out)`` storage), ``(in, out) = (d1, d2)`` and
  ``delta[e] = s (B_e A_e)^T``. PEFT assumes ``(E, out, in)`` when the flag is absent (also for Llama4, which stores
  ``(E, in, out)``): the shapes follow that rule so that checkpoints agree;
- a single transposed expert ``(1, in, out)`` gets the per-expert delta too, where PEFT 0.21.2 adds ``B A``
  untransposed (a shape error, or silently the transpose of the update when ``in == out``: warned);
- ``A`` kaiming-uniform (a=sqrt(5), fan-in = A's columns), ``B`` zero; ``"gaussian"``: A normal(std 1/r);
  ``False``: both kaiming-uniform; ``r``/``lora_alpha`` from ``rank_pattern``/``alpha_pattern`` matched against the
  *parameter* path, as PEFT.

Targeting is PEFT's ``_inject_parameters``: every parameter registered directly on a module (``recurse=False``)
whose path ``<module>.<name>`` equals an entry or ends with ``.<entry>``. As in PEFT, ``exclude_modules`` and
``layers_to_transform`` do not apply to ``target_parameters``; a module targeted by ``target_modules`` too, or the
top-level module, is refused.

``params`` holds one entry per owning module with PEFT's relative checkpoint names, so that files map both ways
without the model: PEFT nests one wrapper per parameter, the first-registered innermost, so the module's *last*
targeted parameter is ``lora_A``/``lora_B`` and each earlier one gains a ``base_layer.`` prefix (Llama4's experts:
``base_layer.lora_A`` is ``gate_up_proj``'s, ``lora_A`` ``down_proj``'s). ``fwd`` layers know which is which
(:attr:`ParamLayer.targets`).

Not supported, as in PEFT: ``lora_dropout`` (``x`` cannot be factored out of the weight), DoRA, ``lora_bias``,
``fan_in_fan_out``, PiSSA/OLoRA/orthogonal init, mixed batches (``adapter_ids``: one weight per call; use ``vmap``
over stacked adapters), ``combine``; also heterogeneous stacks and the drop-in ``inject_adapter_in_model``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from funcpeft._layers import Kind
from funcpeft._targeting import pattern_value, saved_modules, user_warning
from funcpeft.methods.base import AdapterLayer, BaseForward, Rows
from funcpeft.methods.lora_init import init_factors

__all__ = ["ParamLayer", "ParamTarget", "param_layers", "check_config", "required", "PARAM_KEYS", "nested_names"]

_FLOATS = (torch.float32, torch.float64)
_MAX_PER_MODULE = 8  # base_layer. nesting depths with checkpoint names (PEFT nests one wrapper per parameter)


def nested_names(depth: int) -> tuple[str, str]:
    """The ``params`` names of the parameter ``depth`` wrappers deep in PEFT's nesting (0: the outermost)."""
    prefix = "base_layer." * depth
    return prefix + "lora_A", prefix + "lora_B"


# params names of nested parameters -> their PEFT checkpoint suffixes (depth 0 is LoRA's own lora_A / lora_B)
PARAM_KEYS = {name: name + ".weight" for depth in range(1, _MAX_PER_MODULE) for name in nested_names(depth)}


@dataclass(frozen=True)
class ParamTarget:
    """One adapted parameter: its name on the module, rank, scaling and layout."""

    name: str
    r: int
    scaling: float
    shape: tuple[int, ...]
    transposed: bool  # a 3-D parameter stored (E, in, out) (the module's `is_transposed`)
    a_name: str
    b_name: str

    @property
    def experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    def in_out(self) -> tuple[int, int]:
        if len(self.shape) == 2 or not self.transposed:
            return self.shape[-1], self.shape[-2]
        return self.shape[1], self.shape[2]

    def delta(self, a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
        """``s * B A`` in the parameter's own shape, as PEFT computes it: a 2-D delta in the adapter's dtype, then
        cast to ``dtype``; a 3-D one from the factors cast to ``dtype``."""
        if len(self.shape) == 2:
            return ((b @ a) * self.scaling).to(dtype)
        lhs, rhs = self._factors(a.to(dtype), b.to(dtype))
        return torch.bmm(lhs, rhs) * self.scaling

    def _factors(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``(lhs, rhs)`` with ``delta = s * lhs @ rhs`` per expert (PEFT's ``get_delta_factors``)."""
        e = self.experts
        a = a.reshape(e, -1, a.shape[-1])  # (E, r, in): A's rows are expert-major
        b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (E, out, r): B's columns are rank-major
        return (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)

    def read(self, tensors: Mapping[str, Tensor], weight: Tensor) -> Tensor:
        """The adapted parameter ``W + delta`` (a fresh tensor: the module may index or view it freely); a 3-D one
        in one ``baddbmm``, as PEFT's forward (no delta the size of the expert stack)."""
        a, b = tensors[self.a_name], tensors[self.b_name]
        if len(self.shape) == 2:
            return weight + self.delta(a, b, weight.dtype)
        lhs, rhs = self._factors(a.to(weight.dtype), b.to(weight.dtype))
        with torch.autocast(weight.device.type, enabled=False):  # (PEFT's too: the read keeps the parameter's dtype)
            return torch.baddbmm(weight, lhs, rhs, alpha=self.scaling)


@dataclass(frozen=True)
class ParamLayer:
    """The LoRA of a module's targeted parameters (outermost in PEFT's nesting first). Its forward is the module's
    own: the view reads each targeted parameter as ``W + delta`` (``core`` installs :meth:`read` for them)."""

    path: str
    targets: tuple[ParamTarget, ...]
    init_weights: bool | str
    kind: Kind = Kind.PARAMETER

    @property
    def reads(self) -> tuple[str, ...]:
        """The module's parameter names whose reads this layer computes."""
        return tuple(t.name for t in self.targets)

    def init(self, module: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for target in reversed(self.targets):  # innermost (first registered) first, as PEFT creates them
            weight = module._parameters[target.name]
            dtype = weight.dtype if weight.dtype in _FLOATS else torch.float32
            n_in, n_out = target.in_out()
            rows = target.r * target.experts
            a, b = torch.empty(rows, n_in, dtype=dtype), torch.empty(n_out, rows, dtype=dtype)
            init_factors(a, b, self.init_weights, target.r, generator)
            tensors[target.a_name], tensors[target.b_name] = a.to(weight.device), b.to(weight.device)
        return tensors

    def forward(
        self, module: nn.Module, tensors: Mapping[str, Tensor], base: BaseForward, *args: Any, **kwargs: Any
    ) -> Any:
        return base(module, *args, **kwargs)

    def forward_mixed(
        self,
        module: nn.Module,
        tensors: Mapping[str, Tensor],
        rows: Rows,
        path: str,
        base: BaseForward,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        raise self.mixed_error()

    def mixed_error(self) -> ValueError:
        names = [f"{self.path}.{t.name}" for t in self.targets]
        return ValueError(
            f"Mixed batches (`adapter_ids`) cannot apply `target_parameters` adapters: the module {self.path!r} reads "
            f"its parameters {names} as whole weights, one value per call, so rows cannot use different adapters "
            "(PEFT refuses mixed batches here too). Run one adapter per call, or torch.func.vmap(fwd, in_dims=(0, "
            "None)) over the stacked adapters."
        )

    def read(self, name: str, tensors: Mapping[str, Tensor], weight: Tensor, rows: Any) -> Tensor:
        """The value the view reads for parameter ``name`` with this entry bound."""
        if rows is not None:
            raise self.mixed_error()
        return next(t for t in self.targets if t.name == name).read(tensors, weight)

    def merged_entries(self, module: Any, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each targeted parameter merged (``fwd.merge``), by its name on the module."""
        return {t.name: t.read(tensors, getattr(module, t.name)) for t in self.targets}

    def effective_weight(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The merged parameter of a module with one targeted parameter (several: :meth:`merged_entries`)."""
        if len(self.targets) != 1:
            raise ValueError(
                f"Module {self.path!r} has {len(self.targets)} adapted parameters {list(self.reads)}; use "
                "merged_entries for each of them."
            )
        return self.targets[0].read(tensors, module._parameters[self.targets[0].name]), None


def _matches(key: str, entries: list[str]) -> bool:
    return any(key == e or key.endswith("." + e) for e in entries)


def param_layers(config: Any, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> dict[str, ParamLayer]:
    """One :class:`ParamLayer` per module owning a parameter ``config.target_parameters`` selects (PEFT's rules).

    Raises:
        ValueError: an entry matches no parameter, a match lies on the top-level module, on a module that
            ``target_modules`` adapts or inside ``modules_to_save``, is parametrized, not 2-D/3-D, or not float.
    """
    entries = list(getattr(config, "target_parameters", None) or ())
    if not entries:
        return {}
    saved = saved_modules(model, config)
    found: dict[str, list[tuple[str, nn.Parameter]]] = {}
    used: set[str] = set()
    for path, module in model.named_modules():
        for name in module.parametrizations if parametrize.is_parametrized(module) else ():
            if _matches(f"{path}.{name}", entries):
                raise ValueError(
                    f"`target_parameters` selects {path}.{name}, which is parametrized (torch.nn.utils.parametrize: "
                    f"{type(module.parametrizations[name][0]).__name__}); funcpeft does not adapt parametrized "
                    "parameters (PEFT would adapt the parametrized value). Remove the parametrization or the entry."
                )
        for name, param in module.named_parameters(recurse=False):
            key = f"{path}.{name}" if path else name
            if not _matches(key, entries):
                continue
            used.update(e for e in entries if key == e or key.endswith("." + e))
            where = f"parameter {key!r} (matched by `target_parameters`)"
            if not path:
                raise ValueError(
                    f"The {where} is registered on the top-level module {type(model).__name__}, which PEFT cannot "
                    "wrap (it refuses it too); adapt a parameter of a submodule, or wrap the model in a module."
                )
            if path in layers:
                raise ValueError(
                    f"The {where} belongs to {path!r}, which `target_modules` adapts too; PEFT refuses targeting a "
                    f"module both ways. Remove {path!r} from `target_modules` (e.g. `target_modules=[]`) or the "
                    "entry from `target_parameters`."
                )
            if any(path == s or path.startswith(s + ".") for s in saved):
                raise ValueError(
                    f"The {where} lies inside a module of `modules_to_save` ({saved}), which trains it in full; "
                    "drop one of the two."
                )
            if param.dim() not in (2, 3):
                raise ValueError(
                    f"The {where} has shape {tuple(param.shape)}; LoRA adapts 2-D (out, in) and 3-D (experts, ., .) "
                    "parameters only (as PEFT). Remove it from `target_parameters`."
                )
            if not param.is_floating_point():
                raise ValueError(f"The {where} is a {param.dtype} tensor; only float parameters can be adapted.")
            found.setdefault(path, []).append((name, param))
    unused = [e for e in entries if e not in used]
    if unused:
        names = [n for n, _ in model.named_parameters()]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"`target_parameters` entries {unused} matched no parameter of {type(model).__name__} (an entry matches "
            "a parameter's full name, e.g. 'model.layers.0.mlp.experts.gate_up_proj', or its end after a '.'); "
            f"parameter names end with: {', '.join(leaves[:12])}."
        )
    _warn_not_excluded(config, list(found))
    out: dict[str, ParamLayer] = {}
    for path, params in found.items():
        if len(params) > _MAX_PER_MODULE:
            raise ValueError(
                f"`target_parameters` selects {len(params)} parameters of {path!r}; funcpeft supports at most "
                f"{_MAX_PER_MODULE} per module. Select fewer."
            )
        module = model.get_submodule(path)
        transposed = bool(getattr(module, "is_transposed", False))
        targets = []
        for depth, (name, param) in enumerate(reversed(params)):  # the last registered is PEFT's outermost
            key = f"{path}.{name}"
            r = pattern_value(config.rank_pattern, key, config.r)
            alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
            scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
            a_name, b_name = nested_names(depth)
            if transposed and param.dim() == 3 and param.shape[0] == 1 and param.shape[1] == param.shape[2]:
                user_warning(
                    f"`target_parameters` {key!r} is a single transposed expert {tuple(param.shape)}: funcpeft adds "
                    "the per-expert delta (B A)^T as for any expert stack, where PEFT 0.21.2 adds B A untransposed "
                    "(it fails when the two sizes differ), so an adapter trained in PEFT gives different outputs here."
                )
            targets.append(ParamTarget(name, r, scaling, tuple(param.shape), transposed, a_name, b_name))
        out[path] = ParamLayer(path, tuple(targets), config.init_lora_weights)
    return out


def _warn_not_excluded(config: Any, owners: list[str]) -> None:
    """PEFT applies ``exclude_modules`` and ``layers_to_transform`` to ``target_modules`` only; so does funcpeft (the
    same adapter, the same checkpoint), but say so where a user may expect otherwise."""
    exclude = config.exclude_modules
    if isinstance(exclude, str):
        hit = [p for p in owners if re.fullmatch(exclude, p)]
    else:
        hit = [p for p in owners if any(p == e or p.endswith("." + e) for e in exclude or ())]
    if hit:
        user_warning(
            f"`exclude_modules` matches {hit[:3]}, whose parameters `target_parameters` selects: as in PEFT, "
            "`exclude_modules` does not apply to `target_parameters`, so they are adapted. Narrow `target_parameters` "
            "(full parameter names) to leave them out."
        )
    if config.layers_to_transform is not None:
        user_warning(
            "`layers_to_transform` restricts `target_modules` only (as in PEFT): every parameter `target_parameters` "
            f"selects is adapted ({owners[:3]}...). Give full parameter names to select layers."
        )


def check_config(config: Any) -> None:
    """``target_parameters``' own checks and PEFT's refusals of options it cannot combine with (at construction).

    Raises:
        TypeError: ``target_parameters`` is not a list of non-empty strings or None (a string is refused, as PEFT).
        ValueError: it is set with ``lora_dropout``, ``use_dora``, ``lora_bias``, ``fan_in_fan_out`` or an init
            that needs a base weight (PiSSA, OLoRA, orthogonal).
    """
    value = config.target_parameters
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(
            f"`target_parameters` must be a list of parameter names or None, got {value!r} (a string is not accepted, "
            "as in PEFT: wrap it in a list)."
        )
    for entry in value:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"`target_parameters` entries must be non-empty strings, got {entry!r}.")
    if not value:
        return
    for field, bad, fix in (
        ("lora_dropout", config.lora_dropout != 0, "0.0 (x cannot be factored out of an adapted weight)"),
        ("use_dora", config.use_dora, "False"),
        ("lora_bias", config.lora_bias, "False"),
        ("fan_in_fan_out", config.fan_in_fan_out, "False"),
    ):
        if bad:
            raise ValueError(
                f"`{field}={getattr(config, field)!r}` cannot be combined with `target_parameters` (PEFT's "
                f"ParamWrapper refuses it too); set `{field}={fix}`, or adapt those weights another way."
            )
    init = config.init_lora_weights
    if not (isinstance(init, bool) or init == "gaussian"):
        raise ValueError(
            f"`init_lora_weights={init!r}` cannot initialise `target_parameters` (PEFT's ParamWrapper has no base "
            "weight to decompose); use True, False or 'gaussian'."
        )


def required(names: frozenset[str]) -> set[str]:
    """The names an entry with nested ``target_parameters`` names must have: both factors of every level up to its
    deepest (PEFT nests one wrapper per parameter, so levels cannot be skipped)."""
    deepest = max(name.count("base_layer.") for name in names if name in PARAM_KEYS)
    return {name for depth in range(deepest + 1) for name in nested_names(depth)}
