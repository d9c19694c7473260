"""Hardening of the drop-in API (issue 9, points 23-24): no half-injected model, and PEFT's refusals.

``inject_adapter_in_model`` either injects the whole adapter or leaves the model exactly as it was (PEFT leaves it
half-injected); a second adapter is refused where PEFT refuses it (two adapters with a bias, a second trainable
AdaLoRA adapter) and otherwise behaves as PEFT's, checked side by side.
"""

from __future__ import annotations

import copy
import threading
import warnings
from typing import Any

import pytest
import torch
from _models import MLP, oracle
from torch import Tensor, nn

import funcpeft

peft = oracle("peft")

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")


class Locked(nn.Linear):
    """A Linear holding a lock: ``copy.deepcopy`` (PEFT's and funcpeft's ``modules_to_save`` copy) fails on it."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        self.lock = threading.Lock()


class Fragile(nn.Linear):
    """A Linear that refuses its third new child: a failure halfway through adapting the module list."""

    def add_module(self, name: str, module: nn.Module | None) -> None:
        if len(self._modules) == 2:
            raise RuntimeError(f"{type(self).__name__} refuses the child {name!r}")
        super().add_module(name, module)


class Net(nn.Module):
    """Three adaptable Linears and three savable ones; ``broken`` names which module fails, and how."""

    def __init__(self, broken: str | None = None, interrupt: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        for i in range(3):
            cls = Fragile if broken == f"lin{i}" else nn.Linear
            setattr(self, f"lin{i}", cls(6, 6))
            setattr(self, f"s{i}", Locked(6, 6) if broken == f"s{i}" else nn.Linear(6, 6))
        if interrupt:  # a KeyboardInterrupt (BaseException) mid-way instead of an error
            self.lin1.add_module = self._interrupt  # type: ignore[method-assign]

    @staticmethod
    def _interrupt(name: str, module: nn.Module | None) -> None:
        raise KeyboardInterrupt

    def forward(self, x: Tensor) -> Tensor:
        for i in range(3):
            x = torch.tanh(getattr(self, f"s{i}")(getattr(self, f"lin{i}")(x)))
        return x


def _everything(model: nn.Module) -> dict[str, Any]:
    """What a failed injection must leave exactly as it was."""
    return {
        "repr": repr(model),
        "modules": [
            (n, type(m), id(m), [(k, id(c)) for k, c in m._modules.items()], m.training, sorted(m.__dict__))
            for n, m in model.named_modules()
        ],
        "params": [(n, id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()],
        "keys": list(model.state_dict()),
        "peft_config": dict(model.peft_config) if hasattr(model, "peft_config") else None,
    }


def _assert_exactly_as_before(before: dict[str, Any], model: nn.Module) -> None:
    after = _everything(model)
    for key in ("repr", "modules", "keys", "peft_config"):
        assert after[key] == before[key], key
    assert [p[:3] for p in after["params"]] == [p[:3] for p in before["params"]]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(after["params"], before["params"], strict=True))


FAILURES: dict[str, tuple[type[BaseException], str | None]] = {
    "lin0": (RuntimeError, "refuses"),
    "lin1": (RuntimeError, "refuses"),
    "lin2": (RuntimeError, "refuses"),
    "s0": (TypeError, "'s0'.*deep-copied"),
    "s1": (TypeError, "'s1'.*deep-copied"),
    "s2": (TypeError, "'s2'.*deep-copied"),
    "interrupt": (KeyboardInterrupt, None),
}
_ALL = {"target_modules": ["lin0", "lin1", "lin2"], "modules_to_save": ["s0", "s1", "s2"]}


@pytest.mark.parametrize("broken", list(FAILURES))
def test_a_failing_first_injection_leaves_the_model_exactly_as_before(broken: str) -> None:
    model = Net(broken=None if broken == "interrupt" else broken, interrupt=broken == "interrupt")
    before = _everything(model)
    error, match = FAILURES[broken]
    with pytest.raises(error, match=match):
        funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**_ALL), model)
    _assert_exactly_as_before(before, model)
    assert not hasattr(model, "peft_config")


@pytest.mark.parametrize("broken", ["lin1", "lin2", "s1", "s2", "interrupt"])
def test_a_failing_second_injection_keeps_the_first_adapter_intact_and_usable(broken: str) -> None:
    model = Net(broken=None if broken == "interrupt" else broken, interrupt=broken == "interrupt")
    first = {"target_modules": ["lin0"], "modules_to_save": ["s0"], "init_lora_weights": False}
    funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**first), model, adapter_name="a")
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    out = model(x).detach()
    state = {k: v.clone() for k, v in funcpeft.get_peft_model_state_dict(model, adapter_name="a").items()}
    before = _everything(model)
    error, _ = FAILURES[broken]
    with pytest.raises(error):
        funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**_ALL), model, adapter_name="b")
    _assert_exactly_as_before(before, model)
    assert list(model.peft_config) == ["a"]
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    got = funcpeft.get_peft_model_state_dict(model, adapter_name="a")
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    model(x).sum().backward()  # still trainable: gradients reach exactly the first adapter's tensors
    assert (
        {n for n, p in model.named_parameters() if p.grad is not None}
        == {n for n, p in model.named_parameters() if p.requires_grad}
        == {"lin0.lora_A.a.weight", "lin0.lora_B.a.weight", "s0.modules_to_save.a.weight", "s0.modules_to_save.a.bias"}
    )
    funcpeft.set_peft_model_state_dict(model, {k: v + 1 for k, v in state.items()}, adapter_name="a")
    assert not torch.equal(model(x), out)
    good = Net()  # the same second injection succeeds on a model without the faulty module
    funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**first), good, adapter_name="a")
    funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**_ALL), good, adapter_name="b")


# ----- PEFT's refusals -----------------------------------------------------------------------------------------
def _peft_refuses(configs: list[Any]) -> str | None:
    """PEFT's error message when injecting ``configs`` one after the other into one MLP, or None."""
    model = MLP()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, config in enumerate(configs):
                peft.inject_adapter_in_model(config, model, adapter_name="ab"[i])
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    ("first", "second"),
    [("all", "all"), ("lora_only", "all"), ("all", "lora_only"), ("none", "all"), ("lora_only", "none")],
)
def test_a_second_adapter_with_a_bias_is_refused_as_in_peft(first: str, second: str) -> None:
    kw = [{"target_modules": ["lin0"], "bias": first}, {"target_modules": ["lin1"], "bias": second}]
    refused = _peft_refuses([peft.LoraConfig(**k) for k in kw])
    assert (refused is not None) == (first != "none" and second != "none")
    model = funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**kw[0]), MLP(), adapter_name="a")
    before = _everything(model)
    if refused is None:
        funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**kw[1]), model, adapter_name="b")
        return
    assert "only 1 adapter with bias" in refused
    with pytest.raises(ValueError, match=rf"adapter 'a' has `bias='{first}'`.*`bias='none'`"):
        funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**kw[1]), model, adapter_name="b")
    _assert_exactly_as_before(before, model)


_ADA = {"target_modules": ["lin0", "lin1"], "total_step": 10, "init_r": 6, "target_r": 3}


@pytest.mark.parametrize("first", ["adalora", "lora"])
def test_a_second_trainable_adalora_adapter_is_refused_as_in_peft(first: str) -> None:
    lora = {"target_modules": ["head"]}
    refused = _peft_refuses([peft.AdaLoraConfig(**_ADA) if first == "adalora" else peft.LoraConfig(**lora),
                             peft.AdaLoraConfig(**_ADA)])  # fmt: skip
    assert refused is not None and "supports only 1 trainable adapter" in refused
    config = funcpeft.AdaLoraConfig(**_ADA) if first == "adalora" else funcpeft.LoraConfig(**lora)
    model = funcpeft.inject_adapter_in_model(config, MLP(), adapter_name="a")
    before = _everything(model)
    with pytest.raises(ValueError, match="AdaLoRA.*only one trainable adapter.*'a'"):
        funcpeft.inject_adapter_in_model(funcpeft.AdaLoraConfig(**_ADA), model, adapter_name="b")
    _assert_exactly_as_before(before, model)


def test_another_method_on_a_module_holding_an_adalora_adapter_is_refused() -> None:
    """PEFT adds a LoRA config to an AdaLoRA module as a second *AdaLoRA* adapter (silently); funcpeft refuses."""
    model = funcpeft.inject_adapter_in_model(funcpeft.AdaLoraConfig(**_ADA), MLP(), adapter_name="a")
    before = _everything(model)
    with pytest.raises(ValueError, match=r"'lin0'.*adalora adapter 'a'.*lora adapter 'b'"):
        funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(target_modules=["lin0", "head"]), model, "b")
    _assert_exactly_as_before(before, model)
    funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(target_modules=["head"]), model, "b")  # another module


def _peft_key(name: str) -> str:
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


@pytest.mark.parametrize("second_bias", ["none", "all"])
@pytest.mark.parametrize("second_targets", [["lin1"], ["lin0"]], ids=["other_module", "same_module"])
def test_a_second_adapter_with_the_same_modules_to_save_matches_peft(
    second_targets: list[str], second_bias: str
) -> None:
    base = MLP().double().eval()
    theirs = copy.deepcopy(base)
    first = {"target_modules": ["lin0"], "modules_to_save": ["head"], "init_lora_weights": False}
    second = {"target_modules": second_targets, "modules_to_save": ["head"], "init_lora_weights": False,
              "bias": second_bias}  # fmt: skip
    ours = funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**first), base, adapter_name="a")
    funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**second), ours, adapter_name="b")
    peft.inject_adapter_in_model(peft.LoraConfig(**first), theirs, adapter_name="a")
    peft.inject_adapter_in_model(peft.LoraConfig(**second), theirs, adapter_name="b")

    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        _peft_key(n): p.requires_grad for n, p in theirs.named_parameters()
    }
    for path in ("lin0", "lin1", "head"):
        active = getattr(theirs.get_submodule(path), "active_adapters", None)
        assert getattr(ours.get_submodule(path), "active_adapters", None) == active, path
    assert theirs.head.active_adapters == []  # PEFT: the saved module runs its original, not "a"'s or "b"'s copy
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in theirs.parameters():
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        ours.load_state_dict({_peft_key(k): v for k, v in theirs.state_dict().items()})
        for name in ("a", "b"):
            state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
            got = funcpeft.get_peft_model_state_dict(ours, adapter_name=name)
            assert list(got) == list(state) and all(torch.equal(got[k], v) for k, v in state.items()), name
        torch.testing.assert_close(ours(x), theirs(x))
