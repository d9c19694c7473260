"""``fwd.merge`` writes what ``load_state_dict`` accepts and what computes ``fwd`` (funcpeft._merge)."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import MLP
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import funcpeft as fp

CONFIGS = [
    fp.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False),
    fp.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False, use_dora=True),
    fp.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False),
]


def _merged_equals_fwd(model: nn.Module, config, twin: nn.Module | None = None) -> None:
    params, fwd = fp.adapt(model, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model) if twin is None else twin
    twin.load_state_dict(fwd.merge(params))  # strict: every key is one the model has
    x = torch.randn(5, 10)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), fwd(params, x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(twin(x), model(x), atol=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"merge changed the model's {k}"


@pytest.mark.parametrize("config", CONFIGS, ids=["lora", "dora", "ia3"])
def test_merge_into_weight_norm_parametrizations(config) -> None:
    torch.manual_seed(0)
    model = MLP()
    parametrizations.weight_norm(model.lin0)
    parametrizations.weight_norm(model.lin1, dim=1)
    _merged_equals_fwd(model, config)


@pytest.mark.filterwarnings("ignore:.*weight_norm is deprecated.*:FutureWarning")
@pytest.mark.parametrize("config", CONFIGS, ids=["lora", "dora", "ia3"])
def test_merge_into_legacy_hook_weight_norm(config) -> None:
    model, twin = MLP(), MLP()  # (a legacy weight-normed module cannot be deep-copied)
    for m in (model, twin):
        torch.nn.utils.weight_norm(m.lin0)
    _merged_equals_fwd(model, config, twin)


class Scaled(nn.Module):
    """A parametrization with an exact right inverse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w / 2


def test_merge_into_a_chain_of_invertible_parametrizations() -> None:
    torch.manual_seed(0)
    model = MLP()
    parametrize.register_parametrization(model.lin0, "weight", Scaled())
    parametrize.register_parametrization(model.lin0, "weight", Scaled())
    _merged_equals_fwd(model, CONFIGS[0])


def test_merge_refuses_a_parametrization_that_cannot_hold_the_merged_weight() -> None:
    torch.manual_seed(0)
    model = MLP()
    model.lin1 = nn.Linear(20, 20)
    parametrizations.orthogonal(model.lin1)
    params, fwd = fp.adapt(model, CONFIGS[0])
    with pytest.raises(ValueError, match=r"'lin1'.*parametrized.*orthogonal"):
        fwd.merge(params)


class Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).T


def test_merge_refuses_a_parametrization_without_right_inverse() -> None:
    model = MLP()
    parametrize.register_parametrization(model.lin1, "weight", Symmetric())
    params, fwd = fp.adapt(model, CONFIGS[0])
    with pytest.raises(ValueError, match=r"'lin1'.*Symmetric, which has no `right_inverse`"):
        fwd.merge(params)
