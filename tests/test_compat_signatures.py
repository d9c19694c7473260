"""PEFT's signatures for the drop-in API (issue 9, point 25), each argument checked against PEFT's own function.

``set_peft_model_state_dict(..., ignore_mismatched_sizes, low_cpu_mem_usage)``, ``get_peft_model_state_dict(...,
unwrap_compiled, save_embedding_layers)`` and ``inject_adapter_in_model(..., state_dict=)`` on ``torch.compile``-d
models: the same model is adapted by funcpeft and by PEFT, and keys, values, warnings and outputs are compared.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _models import MLP, oracle, tiny_gpt2, tiny_llama, token_ids
from torch import Tensor, nn

import funcpeft
from funcpeft.compat import _Adapted

peft = oracle("peft")

pytestmark = pytest.mark.filterwarnings(
    "ignore:Adapter 'default'.*have invalid shape",  # PEFT 0.21 mistakes 1-D tensors for unsharded ones
    "ignore:fan_in_fan_out is set to False but the target module is `Conv1D`",  # PEFT on GPT-2
)


@pytest.fixture(autouse=True)
def _no_compile_state() -> Any:
    yield
    torch._dynamo.reset()  # compiled test models must not leave graphs (or recompile limits) to later tests


@pytest.mark.parametrize("name", ["inject_adapter_in_model", "get_peft_model_state_dict", "set_peft_model_state_dict"])
def test_signatures_are_peft_s(name: str) -> None:
    def params(fn: Callable[..., Any]) -> list[tuple[str, Any]]:
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(getattr(funcpeft, name)) == params(getattr(peft, name))


def _twins(config: dict[str, Any], build: Callable[[], nn.Module] = MLP) -> tuple[nn.Module, nn.Module]:
    """(funcpeft-injected, PEFT-injected) float64 copies of one model, with PEFT's adapter values in both."""
    model = build().double().eval()
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), copy.deepcopy(model)).eval()
    ours = funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**config), model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = peft.get_peft_model_state_dict(theirs, save_embedding_layers=False)
    funcpeft.set_peft_model_state_dict(ours, state)
    return ours, theirs


def _assert_same(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


_X = torch.randn(3, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
_LIN = {"target_modules": ["lin0", "lin1"], "r": 4, "init_lora_weights": False}


def _donor(**kw: Any) -> dict[str, Tensor]:
    """A PEFT adapter state dict of an MLP, with moved values."""
    torch.manual_seed(5)
    model = peft.inject_adapter_in_model(peft.LoraConfig(**{**_LIN, **kw}), MLP().double())
    return {k: v + 1 for k, v in peft.get_peft_model_state_dict(model).items()}


# ----- set_peft_model_state_dict --------------------------------------------------------------------------------
def test_ignore_mismatched_sizes_drops_and_reports_as_peft() -> None:
    ours, theirs = _twins(_LIN)
    state = _donor(rank_pattern={"lin1": 2})  # lin1's tensors have rank 2, the model's 4
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes") as peft_warned:
        peft_result = peft.set_peft_model_state_dict(theirs, state, ignore_mismatched_sizes=True)
    with pytest.warns(funcpeft.FuncpeftWarning) as our_warned:
        result = funcpeft.set_peft_model_state_dict(ours, state, ignore_mismatched_sizes=True)
    assert [str(w.message) for w in our_warned] == [str(w.message) for w in peft_warned]
    assert result.missing_keys == ["lin1.lora_A.default.weight", "lin1.lora_B.default.weight"]
    assert set(result.missing_keys) <= set(peft_result.missing_keys) and result.unexpected_keys == []
    _assert_same(funcpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs))
    assert torch.equal(ours.lin0.lora_A["default"].weight, state["lin0.lora_A.weight"])  # the rest did load
    torch.testing.assert_close(ours(_X), theirs(_X), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"'lin1.lora_A.weight'.*\(2, 20\).*ignore_mismatched_sizes=True"):
        funcpeft.set_peft_model_state_dict(ours, state)  # without the flag nothing loads (PEFT half-loads, raises)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["same_dtype", "cast"])
def test_low_cpu_mem_usage_loads_as_peft(dtype: torch.dtype) -> None:
    ours, theirs = _twins(_LIN)
    state = {k: v.to(dtype) for k, v in _donor().items()}
    params = list(ours.parameters())
    peft.set_peft_model_state_dict(theirs, state, low_cpu_mem_usage=True)
    result = funcpeft.set_peft_model_state_dict(ours, state, low_cpu_mem_usage=True)
    assert result.missing_keys == result.unexpected_keys == []
    _assert_same(funcpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs))
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n.replace(".base_layer.", "."): p.requires_grad for n, p in theirs.named_parameters()
    }
    assert all(a is b for a, b in zip(ours.parameters(), params, strict=True))  # an optimizer on them stays valid
    torch.testing.assert_close(ours(_X), theirs(_X), rtol=0, atol=0)


def test_set_refuses_a_meta_tensor_instead_of_loading_nothing() -> None:
    with torch.device("meta"):
        model = funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**_LIN), MLP())
    with pytest.raises(ValueError, match="'lin0.lora_A.default.weight' is on the meta device"):
        funcpeft.set_peft_model_state_dict(model, _donor(), low_cpu_mem_usage=True)


# ----- get_peft_model_state_dict --------------------------------------------------------------------------------
@pytest.mark.parametrize("unwrap", [False, True])
def test_state_dict_of_a_compiled_model_matches_peft(unwrap: bool) -> None:
    ours, theirs = _twins(_LIN)
    ours, theirs = torch.compile(ours, backend="eager"), torch.compile(theirs, backend="eager")
    expected = peft.get_peft_model_state_dict(theirs, unwrap_compiled=unwrap)
    assert all(k.startswith("_orig_mod.") != unwrap for k in expected)
    _assert_same(funcpeft.get_peft_model_state_dict(ours, None, "default", unwrap), expected)
    funcpeft.set_peft_model_state_dict(ours, expected)  # either form loads back into the compiled model


def _llama() -> nn.Module:
    return tiny_llama(hidden=16, vocab=40)


def _gpt2() -> nn.Module:
    return tiny_gpt2(n_embd=16, vocab=40)


EMBEDDINGS = {  # name: (model, target_modules)
    "llama_embedding_targeted": (_llama, ["embed_tokens", "q_proj"]),
    "llama_regex_targeted": (_llama, r".*(embed_tokens|q_proj)"),
    "llama_not_targeted": (_llama, ["q_proj"]),
    "gpt2_tied_not_targeted": (_gpt2, ["c_attn"]),
    "gpt2_wte_adapted": (_gpt2, ["wte", "c_attn"]),
    "not_transformers": (MLP, ["lin0"]),
}


@pytest.mark.parametrize("save", ["auto", True, False])
@pytest.mark.parametrize("name", list(EMBEDDINGS))
def test_save_embedding_layers_matches_peft(name: str, save: bool | str) -> None:
    build, targets = EMBEDDINGS[name]
    ours, theirs = _twins({"target_modules": targets, "r": 2, "init_lora_weights": False}, build)
    with warnings.catch_warnings(record=True) as peft_warned:
        warnings.simplefilter("always")
        expected = peft.get_peft_model_state_dict(theirs, save_embedding_layers=save)
    with warnings.catch_warnings(record=True) as our_warned:
        warnings.simplefilter("always")
        got = funcpeft.get_peft_model_state_dict(ours, save_embedding_layers=save)
    relevant = ("save_embedding_layers", "embedding layer")
    assert [str(w.message) for w in our_warned if isinstance(w.message, funcpeft.FuncpeftWarning)] == [
        str(w.message) for w in peft_warned if any(r in str(w.message) for r in relevant)
    ]
    _assert_same(got, expected)
    with torch.no_grad():  # both libraries load either dict, embedding tensors included
        moved = {k: v + 0.5 for k, v in expected.items()}
        assert peft.set_peft_model_state_dict(theirs, moved).unexpected_keys == []
        funcpeft.set_peft_model_state_dict(ours, moved)
    _assert_same(funcpeft.get_peft_model_state_dict(ours, save_embedding_layers=False),
                 peft.get_peft_model_state_dict(theirs, save_embedding_layers=False))  # fmt: skip
    if build is not MLP:
        ids = token_ids(batch=2, length=5, vocab=40)
        torch.testing.assert_close(ours(ids, use_cache=False).logits, theirs(ids, use_cache=False).logits)


# ----- inject into a compiled model -----------------------------------------------------------------------------
@pytest.mark.parametrize("prefixed", [False, True], ids=["plain_keys", "orig_mod_keys"])
def test_inject_with_state_dict_into_a_compiled_model_as_peft(prefixed: bool) -> None:
    state = _donor(target_modules=["lin1"])
    state = {f"_orig_mod.{k}" if prefixed else k: v for k, v in state.items()}
    base = MLP().double().eval()
    reference = copy.deepcopy(base)
    ours = torch.compile(base, backend="eager")
    theirs = torch.compile(copy.deepcopy(base), backend="eager")
    config = {"target_modules": ["lin1"], "r": 4}
    assert funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**config), ours, state_dict=state) is ours
    peft.inject_adapter_in_model(peft.LoraConfig(**config), theirs, state_dict=state)
    assert [n for n, m in ours.named_modules() if isinstance(m, _Adapted)] == ["_orig_mod.lin1"]
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in theirs.named_parameters() if p.requires_grad
    ]
    theirs_result = peft.set_peft_model_state_dict(theirs, state)
    assert (theirs_result.unexpected_keys != []) == (not prefixed)  # PEFT silently loads nothing from plain keys
    funcpeft.set_peft_model_state_dict(ours, state)  # funcpeft loads either form
    if not prefixed:
        peft.set_peft_model_state_dict(theirs, {f"_orig_mod.{k}": v for k, v in state.items()})
    out = ours(_X)
    torch.testing.assert_close(out, theirs(_X), rtol=0, atol=0)
    assert not torch.allclose(out, reference(_X))


@pytest.mark.parametrize("targets", [["lin0", "lin1"], "lin[01]"], ids=["list", "regex"])
def test_plain_injection_into_a_compiled_model_changes_its_output_as_peft(targets: list[str] | str) -> None:
    base = MLP().double().eval()
    reference = copy.deepcopy(base)
    ours = torch.compile(base, backend="eager")
    theirs = torch.compile(copy.deepcopy(base), backend="eager")
    before = ours(_X).detach()  # compiled and cached before the injection
    theirs(_X)
    torch.testing.assert_close(before, reference(_X), rtol=0, atol=0)
    funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(target_modules=targets, r=4, init_lora_weights=False), ours)
    assert [n for n, m in ours.named_modules() if isinstance(m, _Adapted)] == ["_orig_mod.lin0", "_orig_mod.lin1"]
    peft.inject_adapter_in_model(peft.LoraConfig(**_LIN), theirs)  # PEFT's regex matches nothing on _orig_mod.*
    funcpeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    out = ours(_X)
    assert not torch.allclose(out, before), "the compiled model still runs its pre-injection graph"
    torch.testing.assert_close(out, theirs(_X), rtol=0, atol=0)
    torch.testing.assert_close(out, base(_X), rtol=0, atol=0)  # the compiled model and the model it wraps agree
