"""What a config alone says about an adapter tree: which method its tensor names belong to, and whether it fits.

``save`` has no model, so it checks what the config determines before it replaces a checkpoint: the method's
tensor names (and no other method's), the complete set of tensors an adapted module needs (the method
registry's ``required``), the rank of every module (``r`` / ``rank_pattern``; AdaLoRA's ``init_r`` or the kept
triplets of its mask), the rank dimensions of A, B, E agreeing with each other, the shapes that follow from B's
output dimension (DoRA magnitude, ``lora_B.bias``, a trainable bias), and which entries may be trainable copies
(``bias``, ``modules_to_save``). The base shapes (in/out features) need the model and are checked by ``fwd``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from funcpeft._targeting import pattern_value, saves_module
from funcpeft.config import AdapterConfig, LoraConfig
from funcpeft.methods.base import _REGISTRY, Method, method_for

__all__ = ["check_fit", "check_names", "check_params", "infer_method"]

_FIX = "save the tree with the config it was made with (the one given to funcpeft.adapt or returned by funcpeft.load)"


def check_params(params: Any) -> None:
    """Check that ``params`` is a ``{module_path: {name: Tensor}}`` tree.

    Raises:
        TypeError: it is not (the offending entry is named).
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"`params` must be a dict {{module_path: {{name: Tensor}}}}, got {type(params).__name__}.")
    for path, entry in params.items():
        if not isinstance(path, str) or not isinstance(entry, Mapping):
            raise TypeError(f"`params` entry {path!r} must map a module path to a dict of tensors.")
        for name, value in entry.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"`params[{path!r}][{name!r}]` must be a Tensor, got {type(value).__name__}.")


def infer_method(params: Mapping[str, Mapping[str, Tensor]]) -> Method:
    """The method a tree without its config belongs to, from its tensor names: ``ia3_l`` is IA3, ``lora_E``
    AdaLoRA, and ``lora_A``/``lora_B`` (or a tree with only trainable copies) LoRA, PEFT's default.

    Raises:
        ValueError: no one method has all the tree's tensor names (the tree mixes methods; one tensor of each
            is named).
    """
    lora = method_for(LoraConfig())
    seen: dict[str, str] = {}  # adapter tensor name -> where it was first seen
    for path, entry in params.items():
        for name in entry:
            if name not in seen and any(name in m.peft_keys for m in _REGISTRY.values()):
                seen[name] = f"`params[{path!r}][{name!r}]`"
    fits = [m for m in _REGISTRY.values() if set(seen) <= set(m.peft_keys)]
    if lora in fits or not seen:
        return lora
    if len(fits) == 1:
        return fits[0]
    shown = "; ".join(
        f"{where} ({'/'.join(m.name for m in _REGISTRY.values() if name in m.peft_keys)})"
        for name, where in seen.items()
    )
    raise ValueError(
        f"`params` mixes the tensors of several adapter methods ({shown}); a checkpoint holds one method. Split the "
        "tree, or pass the `config` of the method it belongs to."
    )


def check_names(params: Mapping[str, Mapping[str, Tensor]], config: AdapterConfig, method: Method) -> None:
    """Refuse tensors of another method than ``config``'s: their keys would be written as PEFT never names them.

    Raises:
        ValueError: an entry holds another method's tensor (named).
    """
    for path, entry in params.items():
        for name in entry:
            if name in method.peft_keys:
                continue
            owners = [m.name for m in _REGISTRY.values() if name in m.peft_keys]
            if owners:
                raise ValueError(
                    f"`params[{path!r}][{name!r}]` is a tensor of {'/'.join(owners)}, but `config` is a "
                    f"{type(config).__name__} ({method.name}): {_FIX}."
                )


def _fail(path: str, problem: str, fix: str = _FIX) -> ValueError:
    return ValueError(f"`params[{path!r}]` does not fit the config: {problem}; {fix}.")


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_fit(params: Mapping[str, Mapping[str, Tensor]], config: AdapterConfig, method: Method) -> None:
    """Check that ``params`` fits ``config`` as far as the config alone determines (see the module docstring).

    Raises:
        TypeError: a tensor is not floating point (named).
        ValueError: an entry is empty, holds another method's tensor, lacks a tensor its config requires, holds
            one it does not allow, is not a copy the config trains, or has a rank or shape that contradicts the
            config or its other tensors (each message names the module path, the tensor and the shapes).
    """
    check_names(params, config, method)
    bias = getattr(config, "bias", "none")
    saved = list(getattr(config, "modules_to_save", None) or [])
    for path, entry in params.items():
        if not entry:
            raise _fail(path, "it holds no tensors", "drop the empty entry")
        for name, value in entry.items():
            if not value.is_floating_point():
                raise TypeError(
                    f"`params[{path!r}][{name!r}]` is a {value.dtype} tensor; adapters hold floating-point tensors "
                    "only (a checkpoint with it would not load). Convert it with `.float()` or drop it."
                )
        adapter = frozenset(n for n in entry if n in method.peft_keys)
        others = sorted(set(entry) - adapter)
        if not adapter:
            if saves_module(config, path):
                continue  # a modules_to_save copy: its parameters are the module's, which only the model knows
            if bias == "all" and others == ["bias"]:
                continue
            raise _fail(
                path,
                f"it holds {others} but no {method.name} tensor, and the config trains no copy of it "
                f"(bias={bias!r}, modules_to_save={saved!r})",
                f"add its module to `modules_to_save`, or {_FIX}",
            )
        need = method.required(config, adapter)
        if need - adapter:
            raise _fail(
                path, f"it lacks {sorted(need - adapter)} (it has {sorted(entry)}; the config needs {sorted(need)})"
            )
        if adapter - need:
            raise _fail(
                path, f"it holds {sorted(adapter - need)}, which the config does not use (it needs {sorted(need)})"
            )
        if others and (others != ["bias"] or bias == "none"):
            raise _fail(
                path,
                f"it holds {others} beside its adapter tensors (an adapted module's only copy is its `bias`, with "
                f"bias='all' or 'lora_only'; the config has bias={bias!r})",
            )
        check = _SHAPES.get(method.name)
        if check is not None:
            check(config, path, entry)


def _rank_error(path: str, name: str, t: Tensor, rank: Any, where: str) -> ValueError:
    return _fail(
        path,
        f"{name!r} has shape {_shape(t)}, so rank {t.shape[0] if t.dim() else '?'}, but the config gives this module "
        f"rank {rank} ({where}); a stacked tree (funcpeft.stack) is saved one adapter at a time",
        f"{_FIX}, or set the rank it was trained with",
    )


def _check_lora(config: Any, path: str, entry: Mapping[str, Tensor]) -> None:
    if "trainable_tokens_delta" in entry:  # trainable tokens: one row per listed token
        return _check_tokens(config, path, entry)
    from funcpeft.methods.lora_params_io import check_entry as check_parameters

    problem = check_parameters(config, path, entry)  # target_parameters: A has r * experts rows (experts: the model)
    if problem != "":
        if problem is not None:
            raise _fail(path, problem)
        return
    r = pattern_value(config.rank_pattern, path, config.r)
    where = f"`rank_pattern` gives {r}" if r != config.r else f"`r={config.r}`"
    embedding = "lora_embedding_A" in entry
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    a, b = entry[a_name], entry[b_name]
    if a.dim() < 2 or a.shape[0] != r or (embedding and a.dim() != 2):
        raise _rank_error(path, a_name, a, r, where)
    kernel = a.dim() - 2
    if b.dim() != a.dim() or b.shape[1] == 0 or r % b.shape[1] or any(s != 1 for s in b.shape[2:]):
        raise _fail(path, f"{b_name!r} has shape {_shape(b)}, which does not fit {a_name!r} {_shape(a)} (rank {r})")
    groups = r // b.shape[1]
    if (groups > 1 and (embedding or kernel == 0)) or b.shape[0] % groups:
        raise _fail(path, f"{b_name!r} has shape {_shape(b)}: its rank dimension must be {r} (that of {a_name!r})")
    out = b.shape[0]
    expected = {"lora_B.bias": (out,), "bias": (out,)}
    expected["lora_magnitude_vector"] = (1, out, *(1,) * kernel) if kernel else (out,)
    if embedding and "bias" in entry:
        raise _fail(path, "an embedding has no bias, but the entry holds 'bias'")
    _check_expected(path, entry, expected, b_name, b)


def _check_expected(
    path: str, entry: Mapping[str, Tensor], expected: dict[str, tuple[int, ...]], b_name: str, b: Tensor
) -> None:
    for name, shape in expected.items():
        if name in entry and _shape(entry[name]) != shape:
            raise _fail(path, f"{name!r} has shape {_shape(entry[name])}, but {b_name!r} {_shape(b)} makes it {shape}")


def _check_adalora(config: Any, path: str, entry: Mapping[str, Tensor]) -> None:
    mask = None if config.rank_pattern is None else config.rank_pattern.get(f"{path}.lora_E")
    if mask is not None and len(mask) != config.init_r:
        raise _fail(
            path,
            f"`rank_pattern[{path + '.lora_E'!r}]` has {len(mask)} flags, but `init_r` is {config.init_r}",
            "use the config the allocation was made with",
        )
    ranks = {config.init_r} if mask is None else {len(mask), sum(mask)}
    where = f"`init_r={config.init_r}`" if mask is None else f"its `rank_pattern` mask keeps {sum(mask)} of {len(mask)}"
    a, e, b = entry["lora_A"], entry["lora_E"], entry["lora_B"]
    if a.dim() != 2 or a.shape[0] not in ranks:
        raise _rank_error(path, "lora_A", a, " or ".join(map(str, sorted(ranks))), where)
    r = a.shape[0]
    for name, t, shape in (("lora_E", e, (r, 1)), ("lora_B", b, (b.shape[0] if b.dim() else 0, r))):
        if _shape(t) != shape:
            raise _fail(path, f"{name!r} has shape {_shape(t)}, but 'lora_A' {_shape(a)} makes it {shape}")
    _check_expected(path, entry, {"bias": (b.shape[0],)}, "lora_B", b)


def _check_ia3(config: Any, path: str, entry: Mapping[str, Tensor]) -> None:
    vector = entry["ia3_l"]
    shape = _shape(vector)
    conv = len(shape) > 2 and shape[0] == 1 and all(s == 1 for s in shape[2:])
    if not (conv or (len(shape) == 2 and 1 in shape)):
        raise _fail(path, f"'ia3_l' has shape {shape}; IA3 vectors are (out, 1), (1, in) or (1, channels, 1, ...)")
    if len(shape) == 2 and shape != (1, 1) and config.feedforward_modules is not None:
        from funcpeft.methods.ia3 import _is_feedforward

        feedforward = _is_feedforward(config, path)
        if feedforward != (shape[0] == 1):
            kind = "scales its input, (1, in)" if feedforward else "scales its output, (out, 1)"
            raise _fail(
                path, f"'ia3_l' has shape {shape}, but the config's `feedforward_modules` say the module {kind}"
            )


def _check_tokens(config: Any, path: str, entry: Mapping[str, Tensor]) -> None:
    from funcpeft.methods.lora_tokens import check_entry

    problem = check_entry(config, path, entry)
    if problem is not None:
        raise _fail(path, problem)


_SHAPES: dict[str, Callable[[Any, str, Mapping[str, Tensor]], None]] = {
    "trainable_tokens": _check_tokens,
    "lora": _check_lora,
    "adalora": _check_adalora,
    "ia3": _check_ia3,
}
