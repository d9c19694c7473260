"""VeRA (Kopiczko et al., 2024, arXiv:2310.11454; PEFT 0.21.2's ``vera``) on Linear and GPT-2 Conv1D layers.

All adapted layers share one pair of frozen random projections, ``vera_A`` ``(r, max_in)`` and ``vera_B``
``(max_out, r)``, sized to the largest input / output features among the targets; each layer trains two vectors,
``vera_lambda_d`` ``(r,)`` and ``vera_lambda_b`` ``(out,)``:

    ``y = base(x) + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))``

folded into the weight as ``W + (lambda_b B[:out]) (lambda_d A[:, :in])`` (the bias is unchanged).

Params layout: the projections live once, under the root entry ``params[""] = {"vera_A", "vera_B"}`` (PEFT's
checkpoint keys ``base_model.vera_A`` / ``base_model.vera_B``: the tuner model owns them), and each adapted
module's entry holds its two vectors. The projections are *frozen*: the forward and the merge read them detached,
so they never receive a gradient (``loss.backward()`` leaves their ``.grad`` None, so torch optimizers skip them;
``torch.func.grad`` returns exact zeros for them). A decoupled weight decay would still shrink them, so with
:mod:`funcpeft.optim` freeze them: ``optim.chain(optim.adamw(lr), optim.freeze(frozen_mask(params)))``.

They are PEFT's, bit for bit: a CPU ``torch.Generator`` seeded with ``projection_prng_key`` draws ``vera_A`` then
``vera_B`` with Kaiming-uniform bounds (``sqrt(6 / fan_in)``, fan_in = the tensor's second dimension), in float32.
With ``save_projection=False`` checkpoints omit them and ``fwd`` regenerates them from the key (as PEFT does), so
a tree without the root entry runs with the key's projections.

Several adapters (``funcpeft.stack``, mixed batches) must share the projections, as PEFT requires one
``projection_prng_key`` for all adapters of a model: a mixed batch computes ``x @ A^T`` and ``@ B^T`` once for all
rows and refuses stacked projections that differ. ``vmap`` over a stacked tree applies each adapter's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funcpeft import _layers
from funcpeft._layers import Kind
from funcpeft._targeting import DEFAULT_LORA_TARGETS
from funcpeft._validate import check_bool, check_finite, is_int, is_number
from funcpeft.config import AdapterConfig, LoraConfig, TargetSpec
from funcpeft.methods.base import AdapterLayer, BaseForward, Method, Rows, gather, register, rows_for

__all__ = ["VeraConfig", "VeraLayer", "METHOD", "projections", "frozen_mask"]

_FLOATS = (torch.float32, torch.float64)

# PEFT's VeRA mapping is LoRA's, with phi narrowed to the attention projections.
DEFAULT_TARGETS: dict[str, list[str]] = {**DEFAULT_LORA_TARGETS, "phi": ["q_proj", "v_proj"]}


@dataclass(frozen=True)
class VeraConfig(AdapterConfig):
    """VeRA, configured as ``peft.VeraConfig`` (PEFT 0.21.2's fields and defaults).

    Args:
        r: the rank of the shared projections (PEFT's default 256).
        target_modules / layers_to_transform / layers_pattern / modules_to_save: as :class:`~funcpeft.LoraConfig`
            (None targets: PEFT's per-architecture default). PEFT's VeraConfig has no ``exclude_modules``.
        projection_prng_key: the seed of the shared projections (see the module docstring).
        save_projection: whether checkpoints hold ``vera_A`` / ``vera_B`` (else they are regenerated from the key).
        vera_dropout: dropout on the adapter branch's input, in training mode.
        d_initial: the initial value of every ``vera_lambda_d`` entry (``lambda_b`` starts at zero).
        fan_in_fan_out: kept for PEFT compatibility; the layout follows the layer kind (PEFT forces it to match).
        bias: ``"none"``, ``"all"`` or ``"vera_only"`` (the biases of adapted layers), trained as full copies.
        init_weights: ``True``: ``lambda_b = 0``, ``lambda_d = d_initial`` (a fresh adapter is the base model);
            ``False``: PEFT's ``lambda_b = 1``, ``lambda_d`` standard normal.
        task_type: None or one of PEFT's ``TaskType`` values (task heads as for :class:`~funcpeft.LoraConfig`).
    """

    peft_type: ClassVar[str] = "VERA"
    _numeric: ClassVar[tuple[str, ...]] = ("r", "vera_dropout", "d_initial", "layers_to_transform")
    _peft_extras: ClassVar[dict[str, Any]] = {
        "auto_mapping": None, "base_model_name_or_path": None, "inference_mode": True, "revision": None,
        "peft_version": "0.21.2",
    }  # fmt: skip
    exclude_modules: ClassVar[TargetSpec] = None  # not a PEFT VeraConfig field; targeting reads it

    r: int = 256
    target_modules: TargetSpec = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "vera_only"] = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._validate_common()
        if not is_int(self.r) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer (the projections' rank), got {self.r!r}.")
        key = self.projection_prng_key
        if not is_int(key) or not -(2**63) <= key < 2**64:
            raise ValueError(
                f"`projection_prng_key` must be an integer seed (torch.Generator.manual_seed), got {key!r}."
            )
        if not is_number(self.vera_dropout) or not 0.0 <= self.vera_dropout < 1.0:
            raise ValueError(f"`vera_dropout` must be a probability in [0, 1), got {self.vera_dropout!r}.")
        if not is_number(self.d_initial):
            raise ValueError(f"`d_initial` must be a number, got {self.d_initial!r}.")
        check_finite("d_initial", self.d_initial)
        if self.bias not in ("none", "all", "vera_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'vera_only', got {self.bias!r}.")
        for name in ("save_projection", "init_weights"):
            check_bool(name, getattr(self, name))
        LoraConfig._validate_layers(self)  # the same layers_to_transform / layers_pattern rules


@dataclass(frozen=True)
class VeraLayer:
    kind: Kind
    in_features: int
    out_features: int
    r: int
    dropout: float
    d_initial: float
    init_weights: bool
    shared: ClassVar[bool] = True  # reads params[""] (the projections) beside its own entry

    def init(self, module: nn.Module, generator: torch.Generator | None) -> dict[str, Tensor]:
        weight = module.weight
        dtype = weight.dtype if weight.dtype in _FLOATS else torch.float32
        # Made in float32 and cast to the layer's dtype, as PEFT makes and moves them (so a float64 layer's
        # lambda_d starts at float32(d_initial), PEFT's value).
        if self.init_weights:  # PEFT's reset_vera_parameters
            lambda_b = torch.zeros(self.out_features)
            lambda_d = torch.full((self.r,), float(self.d_initial))
        else:  # PEFT's construction values: ones, and torch.randn
            lambda_b = torch.ones(self.out_features)
            lambda_d = torch.randn(self.r, generator=generator)
        return {
            "vera_lambda_b": lambda_b.to(device=weight.device, dtype=dtype),
            "vera_lambda_d": lambda_d.to(device=weight.device, dtype=dtype),
        }

    def _slices(self, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """This layer's frozen ``A[:, :in]`` ``(r, in)`` and ``B[:out]`` ``(out, r)``."""
        a, b = tensors["vera_A"].detach(), tensors["vera_B"].detach()
        return a[..., : self.in_features], b[..., : self.out_features, :]

    def _dropped(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, True) if self.dropout > 0.0 and module.training else x

    def forward(
        self, module: nn.Module, tensors: Mapping[str, Tensor], base: BaseForward, x: Tensor, *args: Any, **kwargs: Any
    ) -> Tensor:
        result = base(module, x, *args, **kwargs)
        lambda_b, lambda_d = tensors["vera_lambda_b"], tensors["vera_lambda_d"]
        a, b = self._slices(tensors)
        h = self._dropped(module, x.to(lambda_d.dtype))
        delta = lambda_b * F.linear(lambda_d * F.linear(h, a.to(h.dtype)), b.to(h.dtype))
        return (result + delta).to(result.dtype)

    def effective_weight(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        weight = _layers.canonical_weight(module, self.kind)  # (out, in)
        a, b = self._slices(tensors)
        lambda_b, lambda_d = tensors["vera_lambda_b"], tensors["vera_lambda_d"]
        dtype = lambda_d.dtype
        delta = (lambda_b.unsqueeze(-1) * b.to(dtype)) @ (lambda_d.unsqueeze(-1) * a.to(dtype))
        return weight + delta.to(weight.dtype), getattr(module, "bias", None)

    def forward_mixed(
        self,
        module: nn.Module,
        tensors: Mapping[str, Tensor],
        rows: Rows,
        path: str,
        base: BaseForward,
        x: Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        """Row ``i`` with adapter ``rows.index[i]``'s vectors: the shared projections are applied once for all rows
        (two matmuls), each row scaled by its gathered ``lambda_d`` / ``lambda_b`` (0 for base rows)."""
        rows = rows_for(rows, x, path)
        result = base(module, x, *args, **kwargs)
        if x.shape[0] == 0:
            return result
        a, b = _one_projection(tensors["vera_A"], path, "vera_A"), _one_projection(tensors["vera_B"], path, "vera_B")
        lambda_b, lambda_d = tensors["vera_lambda_b"], tensors["vera_lambda_d"]
        n, lead = x.shape[0], (1,) * (x.dim() - 2)
        d = gather(lambda_d, rows, 0.0).view(n, *lead, -1)
        scale_b = gather(lambda_b, rows, 0.0).view(n, *lead, -1)
        a, b = self._slices({"vera_A": a, "vera_B": b})
        h = self._dropped(module, x.to(lambda_d.dtype))
        delta = scale_b * F.linear(d * F.linear(h, a.to(h.dtype)), b.to(h.dtype))
        return (result + delta).to(result.dtype)


def _one_projection(t: Tensor, path: str, name: str) -> Tensor:
    """The projection all rows of a mixed batch share: a stacked ``(K, ...)`` one must hold K equal copies.

    Raises:
        ValueError: the stacked adapters' projections differ (on the CPU, eagerly; under torch.compile and on an
            accelerator the device asserts it, failing at the next synchronization).
    """
    if t.dim() == 2:  # the fwd's own (a tree without the root entry)
        return t
    first = t[0]
    if torch.compiler.is_compiling() or t.device.type != "cpu":  # in the graph / on the device: no host stall
        torch._assert_async((t == first).all(), f"stacked `params[''][{name!r}]` differ between adapters")
    elif not torch.equal(t, first.expand_as(t)):
        raise ValueError(
            f"Mixed batch at {path!r}: the stacked adapters' `params[''][{name!r}]` differ. VeRA adapters of one "
            "model share their projections (PEFT requires one `projection_prng_key` for all adapters); stack "
            "adapters made with the same key and model, or run them one by one (or vmap over the stacked tree)."
        )
    return first


def projections(config: VeraConfig, in_features: int, out_features: int) -> dict[str, Tensor]:
    """PEFT's shared ``vera_A`` ``(r, in_features)`` and ``vera_B`` ``(out_features, r)`` for ``config``'s key,
    bit for bit (``VeraModel._init_vera_A_vera_B``): one CPU generator, A drawn first, float32."""
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    out = {}
    for name, shape in (("vera_A", (config.r, in_features)), ("vera_B", (out_features, config.r))):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])  # Kaiming uniform, fan_in, gain sqrt(2)
        out[name] = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    return out


def shared(
    config: VeraConfig, modules: Mapping[str, nn.Module], layers: Mapping[str, AdapterLayer]
) -> dict[str, Tensor]:
    """The root entry: projections sized to the largest in/out features of the adapted layers, on the device and
    in the dtype of the first one's vectors (float32 values, exactly PEFT's)."""
    vera = [(path, layer) for path, layer in layers.items() if isinstance(layer, VeraLayer)]
    max_in = max(layer.in_features for _, layer in vera)
    max_out = max(layer.out_features for _, layer in vera)
    weight = modules[vera[0][0]].weight
    dtype = weight.dtype if weight.dtype in _FLOATS else torch.float32
    return {k: v.to(device=weight.device, dtype=dtype) for k, v in projections(config, max_in, max_out).items()}


def frozen_mask(params: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict[str, bool]]:
    """A tree of ``params``' structure, True at the frozen projections (for :func:`funcpeft.optim.freeze`)."""
    return {path: {name: path == "" for name in entry} for path, entry in params.items()}


def make_layer(config: VeraConfig, path: str, module: nn.Module, kind: Kind | None) -> VeraLayer:
    if kind not in (Kind.LINEAR, Kind.CONV1D_GPT2):
        what = type(module).__name__ if kind is None else f"{type(module).__name__} ({kind.value})"
        raise ValueError(
            f"Module {path!r} ({what}) matched `target_modules`, but VeRA can only adapt nn.Linear and transformers' "
            "Conv1D (as PEFT); narrow `target_modules`."
        )
    n_in, n_out = _layers.in_out_features(module, kind)
    return VeraLayer(
        kind=kind,
        in_features=n_in,
        out_features=n_out,
        r=config.r,
        dropout=float(config.vera_dropout),
        d_initial=float(config.d_initial),
        init_weights=config.init_weights,
    )


def to_checkpoint(config: VeraConfig, path: str, entry: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Without ``save_projection`` the projections are not saved (PEFT's non-persistent buffers)."""
    return {} if path == "" and config is not None and not config.save_projection else entry


def required(config: VeraConfig, names: frozenset[str]) -> frozenset[str]:
    if names & {"vera_A", "vera_B"}:
        return frozenset({"vera_A", "vera_B"})
    return frozenset({"vera_lambda_b", "vera_lambda_d"})


METHOD = register(
    Method(
        name="vera",
        config_type=VeraConfig,
        default_targets=DEFAULT_TARGETS,
        make_layer=make_layer,
        peft_keys={
            "vera_lambda_b": "vera_lambda_b",
            "vera_lambda_d": "vera_lambda_d",
            "vera_A": "vera_A",
            "vera_B": "vera_B",
        },
        required=required,
        to_checkpoint=to_checkpoint,
        shared=shared,
    )
)
