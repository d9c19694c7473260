"""The seed's mutating low-level API as a PEFT drop-in: ``inject_adapter_in_model`` and the adapter state dicts.

``inject_adapter_in_model(config, model)`` changes ``model`` in place the way PEFT 0.21's does, but built on
funcpeft's core: targets come from :func:`funcpeft._targeting.find_targets`, each adapted module's math is the
:class:`~funcpeft.methods.base.AdapterLayer` that ``funcpeft.adapt``'s ``fwd`` uses (one implementation, no
second copy). Unlike PEFT, no ``base_layer`` wrapper is inserted: an adapted module keeps its class name and its
own weight, as the seed page prints it. Its class becomes a one-off subclass (same ``__name__``) whose ``forward``
reads the adapter tensors from PEFT-named children (``lora_dropout``, ``lora_A``, ``lora_B``, ``lora_embedding_A``,
``lora_embedding_B`` and, for DoRA, ``lora_magnitude_vector``, all keyed by adapter name) and calls
``layer.forward(module, tensors, original_forward, x)``. Parameter names are therefore PEFT's for the adapter
(``linear.lora_A.default.weight``) and the module's own otherwise (``linear.weight`` where PEFT has
``linear.base_layer.weight``). ``modules_to_save`` gets the same treatment: the module keeps its weights (frozen)
and gains a ``modules_to_save`` ModuleDict of trainable copies, so trainable names are PEFT's
(``head.modules_to_save.default.weight``).

The state dicts use PEFT's keys exactly (``linear.lora_A.weight``, ``emb.lora_embedding_A``,
``lin.lora_magnitude_vector``, ``lin.base_layer.bias`` for ``bias="lora_only"``), computed by PEFT's own selection
rules on the model's parameter names translated to PEFT's layout, so a dict from ``peft.get_peft_model_state_dict``
on a PEFT-injected twin loads here and vice versa.

Layout: :mod:`~funcpeft.compat._modules` (the PEFT-named children and one-off subclasses),
:mod:`~funcpeft.compat.inject` and :mod:`~funcpeft.compat.state_dict`.
"""

from __future__ import annotations

from funcpeft.compat._modules import DoraMagnitude, _Adapted, _adapter_tensors, _Saved
from funcpeft.compat.inject import inject_adapter_in_model
from funcpeft.compat.state_dict import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = ["DoraMagnitude", "get_peft_model_state_dict", "inject_adapter_in_model", "set_peft_model_state_dict"]
__all__ += ["_Adapted", "_Saved", "_adapter_tensors"]  # used by the tests to look inside injected modules
