"""funcpeft: functional (JAX-style) adapters for PyTorch.

``params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(...))`` returns the adapter as a plain pytree and a
function ``fwd(params, *args)`` that runs the untouched model with it, so adapters can be differentiated,
vmapped, stacked, saved and compiled like any other function argument.
"""

from __future__ import annotations

from funcpeft import adalora, distributed, optim
from funcpeft import methods as _methods  # noqa: F401  (registers the built-in methods)
from funcpeft._warnings import FuncpeftWarning
from funcpeft.autograd import grad, grad_and_value
from funcpeft.compat import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from funcpeft.config import AdaLoraConfig, AdapterConfig, IA3Config, LoraConfig
from funcpeft.core import Adapted, Params, adapt
from funcpeft.io import from_peft_state_dict, load, read_base_weights, save, to_peft_state_dict
from funcpeft.many import combine, stack, unstack
from funcpeft.methods.loha import LoHaConfig
from funcpeft.methods.lokr import LoKrConfig
from funcpeft.methods.oft import OFTConfig
from funcpeft.methods.trainable_tokens import TrainableTokensConfig
from funcpeft.methods.vera import VeraConfig

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "Adapted",
    "FuncpeftWarning",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "OFTConfig",
    "TrainableTokensConfig",
    "VeraConfig",
    "Params",
    "adalora",
    "adapt",
    "distributed",
    "from_peft_state_dict",
    "grad",
    "grad_and_value",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load",
    "optim",
    "read_base_weights",
    "save",
    "set_peft_model_state_dict",
    "to_peft_state_dict",
    "combine",
    "stack",
    "unstack",
]
__version__ = "0.1.0"
