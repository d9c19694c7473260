"""The seed's mutating API (``funcpeft.inject_adapter_in_model`` and the PEFT state dicts), with PEFT as the oracle.

Every case injects funcpeft's adapter into one copy of a model and PEFT's into another (same config kwargs), then
compares what a PEFT user relies on: the printed model (the seed page's block), trainable parameter names and
``requires_grad`` flags (PEFT's ``base_layer``/``original_module`` segments removed, since funcpeft inserts no
wrapper), ``get_peft_model_state_dict`` keys and shapes, and outputs after loading PEFT's adapter state dict with
``set_peft_model_state_dict`` (and reading it back). Outputs must also equal ``funcpeft.adapt``'s ``fwd`` with the
same tensors, through the very same method layer.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _models import MLP, ConvNet, EmbNet, conv_inputs, oracle, tiny_gpt2, tiny_llama, token_ids
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import funcpeft
from funcpeft import compat
from funcpeft.methods.lora import LoraLayer

peft = oracle("peft")

pytestmark = pytest.mark.filterwarnings(
    "ignore:`lora_bias=True` was passed but the targeted layer",  # PEFT: Llama's Linears have no bias
    "ignore:Already found a `peft_config` attribute",  # PEFT: a second adapter
    "ignore:LoRA adapter added to ConvNd layer with groups",  # PEFT: merging grouped convs is unsupported
    "ignore:Adapter 'default'.*have invalid shape",  # PEFT 0.21 mistakes a 1-D lora_B.bias for a sharded tensor
)

SEED_REPR = """\
DummyModel(
  (embedding): Embedding(10, 10)
  (linear): Linear(
    in_features=10, out_features=10, bias=True
    (lora_dropout): ModuleDict(
      (default): Dropout(p=0.1, inplace=False)
    )
    (lora_A): ModuleDict(
      (default): Linear(in_features=10, out_features=64, bias=False)
    )
    (lora_B): ModuleDict(
      (default): Linear(in_features=64, out_features=10, bias=False)
    )
    (lora_embedding_A): ParameterDict()
    (lora_embedding_B): ParameterDict()
  )
  (lm_head): Linear(in_features=10, out_features=10, bias=True)
)"""


# ----- the seed page's example, verbatim ------------------------------------------------------------------------
def test_seed_example_runs_verbatim_and_prints_as_the_seed(capsys: pytest.CaptureFixture[str]) -> None:
    import torch  # noqa: I001  (the seed page's import lines, verbatim with peft -> funcpeft)
    from funcpeft import inject_adapter_in_model, LoraConfig

    class DummyModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(10, 10)
            self.linear = torch.nn.Linear(10, 10)
            self.lm_head = torch.nn.Linear(10, 10)

        def forward(self, input_ids):
            x = self.embedding(input_ids)
            x = self.linear(x)
            x = self.lm_head(x)
            return x

    lora_config = LoraConfig(
        lora_alpha=16,
        lora_dropout=0.1,
        r=64,
        bias="none",
        target_modules=["linear"],
    )

    model = DummyModel()
    twin = copy.deepcopy(model)
    model = inject_adapter_in_model(lora_config, model)

    dummy_inputs = torch.LongTensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    dummy_outputs = model(dummy_inputs)

    capsys.readouterr()
    print(model)
    # PEFT >= 0.9 also prints an empty `(lora_magnitude_vector): ModuleDict()`; funcpeft adds it only with DoRA,
    # which gives exactly the seed page's block.
    assert capsys.readouterr().out == SEED_REPR + "\n"
    assert dummy_outputs.shape == (1, 8, 10)

    from funcpeft import get_peft_model_state_dict

    peft_state_dict = get_peft_model_state_dict(model)
    print(peft_state_dict)

    twin = peft.inject_adapter_in_model(peft.LoraConfig(lora_alpha=16, lora_dropout=0.1, r=64, bias="none",
                                                        target_modules=["linear"]), twin)  # fmt: skip
    expected = peft.get_peft_model_state_dict(twin)
    assert {k: v.shape for k, v in peft_state_dict.items()} == {k: v.shape for k, v in expected.items()}
    assert list(peft_state_dict) == ["linear.lora_A.weight", "linear.lora_B.weight"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, p in twin.named_parameters() if p.requires_grad
    ]


# ----- the PEFT parity matrix -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    config: dict[str, Any]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _x() -> tuple[Tensor]:
    return (torch.randn(3, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64),)


def _ids(vocab: int) -> Callable[[], tuple[Tensor]]:
    return lambda: (token_ids(batch=2, length=6, vocab=vocab),)


def _convs() -> tuple[Tensor, ...]:
    return tuple(x.double() for x in conv_inputs())


_LIN = {"target_modules": ["lin0", "lin1"]}
_GPT2 = {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}
_NO_CACHE = {"use_cache": False}
CASES: dict[str, Case] = {
    "linear": Case(MLP, _x, _LIN),
    "embedding": Case(lambda: EmbNet(padding_idx=0), _ids(20), {"target_modules": ["emb", "lin"]}),
    "conv": Case(lambda: ConvNet(stride=2), _convs, {"target_modules": ["c1", "c2", "c3"]}),
    "conv_groups": Case(lambda: ConvNet(groups=2), _convs, {"target_modules": ["c1", "c2", "c3"]}),
    "gpt2": Case(lambda: tiny_gpt2(n_embd=16, vocab=50), _ids(50), _GPT2, _NO_CACHE),
    "llama": Case(lambda: tiny_llama(hidden=16, vocab=50), _ids(50), {"target_modules": "all-linear"}, _NO_CACHE),
    "dora": Case(MLP, _x, {**_LIN, "use_dora": True}),
    "dora_embedding": Case(EmbNet, _ids(20), {"target_modules": ["emb", "lin"], "use_dora": True}),
    "dora_conv": Case(ConvNet, _convs, {"target_modules": ["c1", "c2", "c3"], "use_dora": True}),
    "dora_gpt2": Case(lambda: tiny_gpt2(n_embd=16, vocab=50), _ids(50), {**_GPT2, "use_dora": True}, _NO_CACHE),
    "lora_bias": Case(MLP, _x, {**_LIN, "lora_bias": True}),
    "lora_bias_conv": Case(ConvNet, _convs, {"target_modules": ["c2"], "lora_bias": True}),
    "bias_all": Case(MLP, _x, {**_LIN, "bias": "all"}),
    "bias_lora_only": Case(MLP, _x, {**_LIN, "bias": "lora_only"}),
    "bias_all_gpt2": Case(lambda: tiny_gpt2(n_embd=16, vocab=50), _ids(50), {**_GPT2, "bias": "all"}, _NO_CACHE),
    "modules_to_save": Case(MLP, _x, {**_LIN, "modules_to_save": ["head"]}),
    "modules_to_save_bias_all": Case(MLP, _x, {"target_modules": ["lin0"], "modules_to_save": ["head"], "bias": "all"}),
    "patterns_rslora": Case(
        MLP, _x, {**_LIN, "rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin0": 3.0}, "use_rslora": True}
    ),  # fmt: skip
}


def _kw(case: Case) -> dict[str, Any]:
    return {"r": 4, "lora_alpha": 6, "lora_dropout": 0.2, "init_lora_weights": False, **case.config}


def _twins(case: Case) -> tuple[nn.Module, nn.Module]:
    """(funcpeft-injected, PEFT-injected) copies of one float64 model, in eval mode."""
    model = case.build().double().eval()
    theirs = copy.deepcopy(model)
    ours = funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**_kw(case)), model)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**_kw(case)), theirs)
    assert not any(m.training for m in ours.modules())
    return ours, theirs.eval()  # PEFT leaves the modules it creates in train mode (dropout on) in an eval model


def _peft_name(name: str) -> str:
    """A PEFT parameter name in funcpeft's layout: no ``base_layer``/``original_module`` segment."""
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def _flags(model: nn.Module, peft_names: bool = False) -> dict[str, bool]:
    return {(_peft_name(n) if peft_names else n): p.requires_grad for n, p in model.named_parameters()}


def _perturb_trainable(model: nn.Module, seed: int) -> None:
    """Move every trainable tensor off its initial value (biases and copies start equal to the base's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _out(model: nn.Module, case: Case, args: tuple[Any, ...]) -> Tensor:
    out = model(*args, **case.kwargs)
    return out if isinstance(out, Tensor) else out.logits


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(CASES))
def test_trainable_names_flags_and_state_dict_keys_match_peft(name: str) -> None:
    ours, theirs = _twins(CASES[name])
    assert _flags(ours) == _flags(theirs, peft_names=True)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    expected = {n for n, p in theirs.named_parameters() if p.requires_grad}
    adapter_names = {n for n in expected if ".base_layer." not in n}  # every name but the base biases is PEFT's
    assert adapter_names <= trainable and {_peft_name(n) for n in expected} == trainable
    got = {k: (v.shape, v.dtype) for k, v in funcpeft.get_peft_model_state_dict(ours).items()}
    want = {k: (v.shape, v.dtype) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert got == want


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_match_peft_after_loading_its_state_dict(name: str) -> None:
    case = CASES[name]
    ours, theirs = _twins(case)
    args = case.inputs()
    with torch.no_grad():
        before = _out(ours, case, args)
        _perturb_trainable(theirs, seed=3)
        state = peft.get_peft_model_state_dict(theirs)
        result = funcpeft.set_peft_model_state_dict(ours, state)
        assert list(result.missing_keys) == list(result.unexpected_keys) == []
        back = funcpeft.get_peft_model_state_dict(ours)
        assert back.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(back[key], value), key
    out, expected = _out(ours, case, args), _out(theirs, case, args)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, before), "loading changed nothing: the comparison would prove nothing"

    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    peft_grads = {_peft_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads.keys() == peft_grads.keys()
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    for key, grad in grads.items():
        zeros = torch.zeros_like(ours.get_parameter(key))
        torch.testing.assert_close(
            zeros if grad is None else grad, zeros if peft_grads[key] is None else peft_grads[key], msg=key
        )


def _functional_params(model: nn.Module, params: funcpeft.Params) -> funcpeft.Params:
    """``fwd``'s params filled with the injected model's own tensors (adapter leaves, bias and full copies)."""
    modules = dict(model.named_modules())
    out: funcpeft.Params = {}
    for path, entry in params.items():
        module = modules[path]
        own = compat._adapter_tensors(module, "default") if isinstance(module, compat._Adapted) else {}
        saved = module.modules_to_save["default"] if isinstance(module, compat._Saved) else module
        out[path] = {k: own[k] if k in own else saved.get_parameter(k) for k in entry}
    return out


@pytest.mark.parametrize("name", ["linear", "embedding", "conv_groups", "gpt2", "llama", "dora", "dora_conv",
                                  "lora_bias", "bias_all", "modules_to_save"])  # fmt: skip
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_outputs_equal_functional_fwd_through_the_same_layer(
    name: str, train: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name]
    base = case.build().double().train(train)
    config = funcpeft.LoraConfig(**_kw(case))
    params, fwd = funcpeft.adapt(copy.deepcopy(base), config)
    model = funcpeft.inject_adapter_in_model(config, base)
    _perturb_trainable(model, seed=5)
    same = _functional_params(model, params)

    calls: list[LoraLayer] = []
    original = LoraLayer.forward

    def counting(self: LoraLayer, *args: Any, **kwargs: Any) -> Any:
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "forward", counting)
    args = case.inputs()
    torch.manual_seed(0)  # in train mode both draw the same dropout masks: the same code runs in the same order
    out = _out(model, case, args)
    assert {id(layer) for layer in calls} == {id(layer) for m in model.modules()
                                             for layer in getattr(m, "_funcpeft_layers", {}).values()}  # fmt: skip
    torch.manual_seed(0)
    expected = fwd(same, *args, **case.kwargs)
    torch.testing.assert_close(out, expected if isinstance(expected, Tensor) else expected.logits, rtol=0, atol=0)
    assert len(calls) == 2 * len(fwd.targets)
    for path in fwd.targets:  # the layer objects are funcpeft.adapt's (same r, scaling, kind)
        assert model.get_submodule(path)._funcpeft_layers["default"] == fwd._layers[path]


# ----- several adapters -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("second_targets", [["lin1"], ["lin0", "lin1"]], ids=["other_module", "same_module"])
def test_second_adapter_is_added_and_active_as_in_peft(second_targets: list[str]) -> None:
    model = MLP().double().eval()
    theirs = copy.deepcopy(model)
    first = {"r": 4, "target_modules": ["lin0"], "modules_to_save": ["head"], "init_lora_weights": False}
    second = {"r": 2, "target_modules": second_targets, "init_lora_weights": False, "bias": "all", "use_dora": True}
    ours = funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**first), model, adapter_name="a")
    ours = funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**second), ours, adapter_name="b")
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**first), theirs, adapter_name="a")
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**second), theirs, adapter_name="b")

    assert list(ours.peft_config) == ["a", "b"]
    assert ours.lin0.lora_A["a"].weight.shape == (4, 10) and ours.lin1.lora_A["b"].weight.shape == (2, 20)
    for path in ("lin0", "lin1", "head"):
        assert ours.get_submodule(path).active_adapters == theirs.get_submodule(path).active_adapters, path
    assert _flags(ours) == _flags(theirs, peft_names=True)
    x = _x()
    with torch.no_grad():
        _perturb_trainable(theirs, seed=4)
        for name in ("a", "b"):
            state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
            assert funcpeft.get_peft_model_state_dict(ours, adapter_name=name).keys() == state.keys()
            funcpeft.set_peft_model_state_dict(ours, state, adapter_name=name)
        torch.testing.assert_close(ours(*x), theirs(*x))
        only_b = funcpeft.inject_adapter_in_model(
            funcpeft.LoraConfig(**second), MLP().double().eval().requires_grad_(False), adapter_name="b"
        )
        only_b.load_state_dict({k: v for k, v in ours.state_dict().items() if ".a." not in k and "modules_to" not in k})
        torch.testing.assert_close(ours(*x), only_b(*x))  # "a" is inactive everywhere, its head copy too


def test_state_dict_keys_choose_the_targets_as_in_peft() -> None:
    model = MLP().eval()
    donor = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["lin1"]), copy.deepcopy(model))
    state = peft.get_peft_model_state_dict(donor)
    theirs = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="lin0"):
        ours = funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(target_modules=["lin0"]), model, state_dict=state)
    with pytest.warns(RuntimeWarning):
        theirs = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["lin0"]), theirs, state_dict=state)
    assert _flags(ours) == _flags(theirs, peft_names=True)
    assert isinstance(ours.lin1, compat._Adapted) and not isinstance(ours.lin0, compat._Adapted)
    funcpeft.set_peft_model_state_dict(ours, state)


def test_dtype_follows_the_base_as_in_peft() -> None:
    model = MLP().to(torch.bfloat16)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**_LIN, use_dora=True), copy.deepcopy(model))
    ours = funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**_LIN, use_dora=True), model)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {
        _peft_name(n): p.dtype for n, p in theirs.named_parameters()
    }


def test_adapted_model_deepcopies_and_pickles() -> None:
    model = funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(**_LIN, modules_to_save=["head"]), MLP().eval())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    x = torch.randn(2, 10)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert repr(clone) == repr(model) and isinstance(clone.lin0, compat._Adapted)
        assert clone.lin0.lora_A["default"].weight.data_ptr() != model.lin0.lora_A["default"].weight.data_ptr()
        torch.testing.assert_close(clone(x), model(x))


# ----- errors change nothing --------------------------------------------------------------------------------------
def _snapshot(model: nn.Module) -> tuple[Any, ...]:
    return (
        repr(model),
        {k: v.clone() for k, v in model.state_dict().items()},
        _flags(model),
        [type(m) for m in model.modules()],
        dict(getattr(model, "peft_config", {})),
    )


def _assert_same(before: tuple[Any, ...], after: tuple[Any, ...]) -> None:
    assert before[0] == after[0] and before[2:] == after[2:]
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def _injected() -> nn.Module:
    return funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(target_modules=["lin0"]), MLP())


INJECT_ERRORS: dict[str, tuple[Callable[[nn.Module], Any], type[Exception], str]] = {
    "peft_config": (lambda m: funcpeft.inject_adapter_in_model(peft.LoraConfig(target_modules=["lin1"]), m, "b"),
                    TypeError, "funcpeft.LoraConfig"),
    "typo": (lambda m: funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(target_modules=["lin1", "lin_2"]), m, "b"),
             ValueError, "lin_2"),
    "unsupported_module": (lambda m: funcpeft.inject_adapter_in_model(
        funcpeft.LoraConfig(target_modules=["lin1", "drop"]), m, "b"), ValueError, "'drop'"),
    "same_name": (lambda m: funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(target_modules=["lin1"]), m),
                  ValueError, "already has an adapter named 'default'"),
    "saved_and_adapted": (lambda m: funcpeft.inject_adapter_in_model(
        funcpeft.LoraConfig(target_modules=["lin1"], modules_to_save=["lin0"]), m, "b"), ValueError, "lin0"),
    "state_dict_names_nothing": (lambda m: funcpeft.inject_adapter_in_model(
        funcpeft.LoraConfig(target_modules=["lin1"]), m, "b", state_dict={"nope.lora_A.weight": None}),
        ValueError, "nope"),
    "get_unknown_adapter": (lambda m: funcpeft.get_peft_model_state_dict(m, adapter_name="b"), ValueError, "'b'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(INJECT_ERRORS))
def test_inject_errors_leave_the_model_unchanged(case: str) -> None:
    call, error, match = INJECT_ERRORS[case]
    model = _injected()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    _assert_same(before, _snapshot(model))


def _bad_state(kind: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    state = {k: v + 1 for k, v in state.items()}  # would change the model if anything were loaded
    if kind == "unexpected":
        state["lin0.lora_C.weight"] = torch.zeros(2)
    elif kind == "missing":
        del state["lin0.lora_B.weight"]
    elif kind == "shape":
        state["lin0.lora_B.weight"] = torch.zeros(20, 3)
    return state


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("unexpected", "lora_C"),
        ("missing", r"missing keys \['lin0.lora_B.weight'\]"),
        ("shape", r"\(20, 3\).*\(20, 8\)"),
    ],
)
def test_set_state_dict_errors_leave_the_model_unchanged(kind: str, match: str) -> None:
    model = _injected()
    good = {k: v.clone() for k, v in funcpeft.get_peft_model_state_dict(model).items()}
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        funcpeft.set_peft_model_state_dict(model, _bad_state(kind, good))
    _assert_same(before, _snapshot(model))
    funcpeft.set_peft_model_state_dict(model, _bad_state("ok", good))  # the same dict without the fault loads
    assert not torch.equal(model.lin0.lora_B["default"].weight, good["lin0.lora_B.weight"])


def test_an_attribute_clash_is_an_error_that_changes_nothing() -> None:
    model = MLP()
    model.lin1.lora_B = nn.Linear(2, 2)  # a user's own child under one of PEFT's names
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'lin1'.*\['lora_B'\]"):
        funcpeft.inject_adapter_in_model(funcpeft.LoraConfig(target_modules=["lin0", "lin1"]), model)
    _assert_same(before, _snapshot(model))


@settings(max_examples=25, deadline=None)
@given(
    r=st.integers(1, 6),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    extra=st.sampled_from([{}, {"use_dora": True}, {"lora_bias": True}, {"use_rslora": True}]),
    targets=st.sampled_from([["emb"], ["lin"], ["emb", "lin", "head"]]),
    save=st.booleans(),
)
def test_flags_keys_and_round_trip_match_peft_for_any_options(
    r: int, bias: str, extra: dict[str, Any], targets: list[str], save: bool
) -> None:
    if extra.get("lora_bias"):
        targets = [t for t in targets if t != "emb"] or ["lin"]  # PEFT has no lora_bias on embeddings
    kw = {"r": r, "bias": bias, "target_modules": targets, "init_lora_weights": False, **extra}
    if save and "head" not in targets:
        kw["modules_to_save"] = ["head"]
    ours, theirs = _twins(Case(EmbNet, _ids(20), kw))
    assert _flags(ours) == _flags(theirs, peft_names=True)
    state = peft.get_peft_model_state_dict(theirs)
    assert {k: v.shape for k, v in funcpeft.get_peft_model_state_dict(ours).items()} == {
        k: v.shape for k, v in state.items()
    }
    funcpeft.set_peft_model_state_dict(ours, state)
    back = funcpeft.get_peft_model_state_dict(ours)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_adalora_injection_matches_peft() -> None:
    """AdaLoRA through the drop-in API: PEFT's ParameterDict names (``lin0.lora_E.default``), keys and outputs."""
    peft = oracle("peft")
    torch.manual_seed(0)
    model = MLP()
    twin = copy.deepcopy(model)
    kw = {"target_modules": ["lin0", "lin1"], "total_step": 10, "init_r": 6, "target_r": 3}
    funcpeft.inject_adapter_in_model(funcpeft.AdaLoraConfig(**kw), model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(peft.AdaLoraConfig(**kw), twin)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        n for n, p in twin.named_parameters() if p.requires_grad
    )
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if ".lora_" in name:
                p.normal_()
    theirs = peft.get_peft_model_state_dict(twin)
    assert funcpeft.get_peft_model_state_dict(model).keys() == theirs.keys()
    funcpeft.set_peft_model_state_dict(model, theirs)
    x = torch.randn(3, 10)
    torch.testing.assert_close(model.eval()(x), twin.eval()(x))
