"""Any model method with the adapter bound (``fwd.method``), and text generation (``fwd.generate``).

``fwd.method(name)`` is flax's ``apply(..., method=...)``: it returns ``call(params, *args, adapter_ids=None,
base=None, **kwargs)``, which binds the adapter exactly as ``fwd`` does (:meth:`funcpeft.Adapted._run`: validation, the
per-thread binding, checkpoint recomputation) and runs ``model.<name>`` *of the view*, so every submodule the
method reaches (``self.forward``, ``self.get_encoder()``, ``self.text_model``) runs adapted, and the model is
never modified. A function ``function(model, *args, **kwargs)`` runs the same way with the view as ``model``; use
one when a method returns a submodule to be called (``lambda m, x: m.get_encoder()(x)``): a module the call
returns is part of the view and must not be called after the call has returned.

``fwd.generate`` is ``fwd.method("generate")`` (which returns ``fwd.generate`` itself, so both follow these rules)
with two serving rules:

- with a stacked tree and ``adapter_ids`` (one per prompt row, ``-1``: the base), rows that ``generate``
  expands by ``repeat_interleave`` (``num_beams``, ``num_return_sequences``) keep their prompt row's adapter, and
  an encoder-decoder's encoder, which runs on the unexpanded prompts, uses the ids as given;
- generation runs without gradients (``generate`` is a ``no_grad`` function), so the lean view serves it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from funcpeft._rows import refuse_adapter_names

if TYPE_CHECKING:
    from funcpeft.core import Adapted

__all__ = ["bound_method", "generate"]


def bound_method(fwd: Adapted, name_or_function: str | Callable[..., Any]) -> Callable[..., Any]:
    """See :meth:`funcpeft.Adapted.method`."""
    if isinstance(name_or_function, str):
        name = name_or_function
        if not callable(getattr(fwd.model, name, None)):
            what = "has no attribute" if not hasattr(fwd.model, name) else "has a non-callable attribute"
            raise AttributeError(
                f"{type(fwd.model).__name__} {what} {name!r}, so fwd.method({name!r}) cannot call it; pass a method "
                "name of the model or a function (model, *args, **kwargs) -> result."
            )

        if name == "generate":
            # the one generate: mixed batches keep each prompt row's adapter across the rows it expands to
            return fwd.generate

        def call_named(view: Any, *args: Any, **kwargs: Any) -> Any:
            return getattr(view, name)(*args, **kwargs)

        function, label = call_named, name
    elif callable(name_or_function):
        function, label = name_or_function, getattr(name_or_function, "__name__", "function")
    else:
        raise TypeError(
            f"fwd.method takes a method name (str) or a function (model, *args, **kwargs), got "
            f"{type(name_or_function).__name__}."
        )

    def call(
        params: Any,
        /,
        *args: Any,
        adapter_ids: Tensor | None = None,
        sparse_grad: bool = False,
        base: Any = None,
        **kwargs: Any,
    ) -> Any:
        view = None if base is None else fwd._with_base(base, lean=False)
        return fwd._run(params, adapter_ids, function, view, args, kwargs, sparse=sparse_grad)

    call.__name__ = call.__qualname__ = f"fwd.method({label!r})"
    call.__doc__ = f"``{label}`` of {type(fwd.model).__name__} with the adapter ``params`` bound."
    return call


def generate(
    fwd: Adapted, params: Any, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_ids: Any, base: Any = None
) -> Any:
    """See :meth:`funcpeft.Adapted.generate`.

    Raises:
        AttributeError: the model has no ``generate``.
        TypeError: PEFT's ``adapter_names`` is given (funcpeft selects adapters with ``adapter_ids``).
        ValueError: ``adapter_ids`` does not have one entry per prompt row.
    """
    if not callable(getattr(fwd.model, "generate", None)):
        raise AttributeError(
            f"{type(fwd.model).__name__} has no `generate`; fwd.generate needs a transformers generation model "
            "(e.g. AutoModelForCausalLM / AutoModelForSeq2SeqLM)."
        )
    if "adapter_names" in kwargs:
        refuse_adapter_names(kwargs["adapter_names"], "fwd.generate")
    if adapter_ids is not None and isinstance(adapter_ids, Tensor) and adapter_ids.dim() == 1:
        prompts = _prompt_rows(args, kwargs)
        if prompts is not None and prompts != adapter_ids.shape[0]:
            raise ValueError(
                f"`adapter_ids` has {adapter_ids.shape[0]} entries, but the prompt batch has {prompts} rows: give one "
                "adapter id per prompt row (rows that generate expands for beams or num_return_sequences keep "
                "their prompt row's adapter)."
            )
    view = fwd._view if base is None else fwd._with_base(base, lean=True)
    return fwd._run(params, adapter_ids, _generate, view, args, kwargs, repeat=True)


def _generate(view: Any, *args: Any, **kwargs: Any) -> Any:
    return view.generate(*args, **kwargs)


def _prompt_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs"), kwargs.get("inputs_embeds")):
        if isinstance(value, Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None
