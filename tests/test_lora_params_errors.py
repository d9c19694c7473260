"""LoRA ``target_parameters``: what is refused (with the module path, the value and the fix), and where funcpeft
follows PEFT's rules that may surprise (``exclude_modules`` does not apply to parameters)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _models import oracle
from test_lora_params import Net, _net_in
from torch import nn

import funcpeft as fp

peft = oracle("peft")


def test_mixed_batches_are_refused_naming_the_parameter() -> None:
    params, fwd = fp.adapt(Net(), fp.LoraConfig(target_modules=["fc"], target_parameters=["w3"]))
    stacked = fp.stack([params, params])
    with pytest.raises(ValueError, match=r"Mixed batches.*'experts'.*experts\.w3.*vmap"):
        fwd(stacked, *_net_in(), adapter_ids=torch.tensor([0, 1, -1, 0]))


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"target_parameters": "w3"}, TypeError, "list of parameter names"),
        ({"target_parameters": ["w3"], "lora_dropout": 0.1}, ValueError, "lora_dropout"),
        ({"target_parameters": ["w3"], "use_dora": True}, ValueError, "use_dora"),
        ({"target_parameters": ["w3"], "lora_bias": True}, ValueError, "lora_bias"),
        ({"target_parameters": ["w3"], "fan_in_fan_out": True}, ValueError, "fan_in_fan_out"),
        ({"target_parameters": ["w3"], "init_lora_weights": "pissa"}, ValueError, "pissa"),
        ({"target_parameters": ["w3"], "init_lora_weights": "olora"}, ValueError, "olora"),
    ],
)
def test_config_refusals(kw: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        fp.LoraConfig(target_modules=[], **kw)


def test_adalora_refuses_target_parameters() -> None:
    with pytest.raises(ValueError, match="target_parameters"):
        fp.AdaLoraConfig(target_modules=["fc"], target_parameters=["w3"], total_step=10)


class Top(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6, 6))
        self.net = Net()
        self.vec = nn.Linear(6, 6)
        self.vec.register_parameter("gain", nn.Parameter(torch.ones(6)))
        self.ints = nn.Module()
        self.ints.register_parameter("table", nn.Parameter(torch.ones(2, 2, dtype=torch.long), requires_grad=False))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"target_parameters": ["w_typo"]}, r"\['w_typo'\] matched no parameter.*w3"),
        ({"target_parameters": ["scale"]}, "top-level module Top"),
        ({"target_modules": ["fc"], "target_parameters": ["fc.weight"]}, "'net.fc', which `target_modules` adapts"),
        ({"target_parameters": ["gain"]}, r"'vec.gain'.*shape \(6,\).*2-D"),
        ({"target_parameters": ["table"]}, "torch.int64"),
        ({"target_parameters": ["w3"], "modules_to_save": ["experts"]}, "modules_to_save"),
    ],
)
def test_targeting_refusals(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fp.adapt(Top(), fp.LoraConfig(**{"target_modules": [], **kw}))


def test_parametrized_module_is_refused() -> None:
    model = Net()
    torch.nn.utils.parametrizations.weight_norm(model.fc)
    with pytest.raises(ValueError, match="fc.weight, which is parametrized"):
        fp.adapt(model, fp.LoraConfig(target_modules=[], target_parameters=["fc.weight"]))


def test_other_apis_refuse_target_parameters() -> None:
    model, config = Net(), fp.LoraConfig(target_modules=["fc"], target_parameters=["w3"])
    params, _ = fp.adapt(model, config)
    with pytest.raises(ValueError, match="combined"):
        fp.combine([params, params], [0.5, 0.5], config, method="linear")
    with pytest.raises(ValueError, match="target_parameters"):
        fp.inject_adapter_in_model(config, copy.deepcopy(model))
    with pytest.raises(ValueError, match="heterogeneous"):
        fp.adapt(model, [config, config.replace(r=4)])


def test_exclude_modules_does_not_apply_to_parameters_as_in_peft() -> None:
    model = Net()
    kw = {"target_modules": ["fc"], "target_parameters": ["w3"], "exclude_modules": ["experts"]}
    with pytest.warns(fp.FuncpeftWarning, match="does not apply to `target_parameters`"):
        params, _ = fp.adapt(model, fp.LoraConfig(**kw))
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    assert fp.to_peft_state_dict(params).keys() == peft.get_peft_model_state_dict(peft_model).keys()
