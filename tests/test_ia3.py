"""IA3 against PEFT: outputs, gradients, checkpoints both ways, merging, the drop-in API, and errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from _models import MLP, ConvNet, EmbNet, conv_inputs, oracle, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from torch import nn

import funcpeft as fp

peft = oracle("peft")


def _out(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return x.logits if hasattr(x, "logits") else x.last_hidden_state


# (name, model factory, inputs, IA3 kwargs shared by funcpeft and PEFT); None targets = PEFT's defaults
CASES: list[tuple[str, Any, Any, dict[str, Any]]] = [
    # PEFT needs feedforward_modules spelled out for models that are not known transformers architectures
    ("mlp", MLP, lambda: (torch.randn(3, 10),), {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}),
    ("mlp-feedforward", MLP, lambda: (torch.randn(3, 10),),
     {"target_modules": ["lin0", "lin1", "head"], "feedforward_modules": ["lin1"]}),
    ("mlp-modules_to_save", MLP, lambda: (torch.randn(3, 10),),
     {"target_modules": ["lin0"], "modules_to_save": ["head"], "feedforward_modules": []}),
    ("conv2d-3d", ConvNet, conv_inputs, {"target_modules": ["c2", "c3"], "feedforward_modules": ["c3"]}),
    ("conv-groups", lambda: ConvNet(groups=2), conv_inputs, {"target_modules": ["c2", "c3"],
                                                             "feedforward_modules": ["c2"]}),
    ("gpt2-defaults", tiny_gpt2, lambda: (token_ids(),), {"fan_in_fan_out": True}),
    ("llama-defaults", tiny_llama, lambda: (token_ids(),), {}),
    ("bert-defaults", tiny_bert, lambda: (token_ids(),), {}),
]  # fmt: skip


def _setup(factory: Any, inputs: Any, kw: dict[str, Any]):
    torch.manual_seed(0)
    model = factory().double().eval()
    twin = copy.deepcopy(model)
    x = tuple(t.double() if t.is_floating_point() else t for t in inputs())
    config = fp.IA3Config(init_ia3_weights=False, **kw)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(1))
    peft_model = peft.get_peft_model(twin, peft.IA3Config(init_ia3_weights=False, **kw))
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config))
    return model, x, config, params, fwd, peft_model.eval()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_outputs_and_gradients_equal_peft(name: str, factory, inputs, kw) -> None:
    model, x, config, params, fwd, peft_model = _setup(factory, inputs, kw)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == sum(len(e) for e in params.values()), "PEFT trains exactly what params holds"
    out = _out(fwd(params, *x))
    assert not torch.allclose(out, _out(model(*x)))
    peft_out = _out(peft_model(*x))
    torch.testing.assert_close(out, peft_out, rtol=1e-10, atol=1e-10)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weights).sum().backward()
    (peft_out * weights).sum().backward()
    theirs = {k: v.grad for k, v in peft_model.named_parameters() if v.requires_grad}
    for path, entry in params.items():
        for leaf, tensor in entry.items():
            if leaf == "ia3_l":
                key = f"base_model.model.{path}.ia3_l.default"
            else:  # a modules_to_save copy
                key = f"base_model.model.{path}.modules_to_save.default.{leaf}"
            torch.testing.assert_close(tensor.grad, theirs[key], rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_checkpoints_both_ways(tmp_path: Path, name: str, factory, inputs, kw) -> None:
    model, x, config, params, fwd, peft_model = _setup(factory, inputs, kw)
    fp.save(tmp_path / "fp", params, config)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fp").eval()
    torch.testing.assert_close(_out(reloaded(*x)), _out(fwd(params, *x)), rtol=1e-10, atol=1e-10)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded, loaded_config = fp.load(tmp_path / "peft")
    assert isinstance(loaded_config, fp.IA3Config)
    _, fwd2 = fp.adapt(model, loaded_config)
    torch.testing.assert_close(_out(fwd2(loaded, *x)), _out(peft_model(*x)), rtol=1e-10, atol=1e-10)


def test_merge_scales_bias_only_for_output_scaling() -> None:
    torch.manual_seed(0)
    model = MLP().double().eval()
    config = fp.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False)
    params, fwd = fp.adapt(model, config)
    merged = fwd.merge(params)
    out_scale = params["lin0"]["ia3_l"].detach().reshape(-1)
    in_scale = params["lin1"]["ia3_l"].detach().reshape(-1)
    torch.testing.assert_close(merged["lin0.weight"], model.lin0.weight * out_scale[:, None])
    torch.testing.assert_close(merged["lin0.bias"], model.lin0.bias * out_scale)
    torch.testing.assert_close(merged["lin1.weight"], model.lin1.weight * in_scale[None, :])
    assert torch.equal(merged["lin1.bias"], model.lin1.bias)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**{**config.to_dict(), "task_type": None}))
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config))
    for key, value in peft_model.merge_and_unload().state_dict().items():
        torch.testing.assert_close(merged[key], value, rtol=1e-12, atol=1e-12)


def test_fresh_ia3_is_the_base_model_and_compiles_without_recompiles() -> None:
    model = tiny_llama()
    params, fwd = fp.adapt(model, fp.IA3Config())
    ids = token_ids()
    assert torch.equal(fwd(params, ids).logits, model(ids).logits)
    counter = {"graphs": 0}

    def backend(gm, example_inputs):
        counter["graphs"] += 1
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fwd, fullgraph=True, backend=backend)
    other = optree.tree_map(lambda t: (t.detach() * 1.5).requires_grad_(), params)
    with torch.no_grad():
        torch.testing.assert_close(compiled(other, ids).logits, fwd(other, ids).logits)
        compiled(params, ids)
    assert counter["graphs"] == 1


def test_vmap_and_grad_over_ia3() -> None:
    model = tiny_gpt2()
    _, fwd = fp.adapt(model, fp.IA3Config(init_ia3_weights=False))
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(3)]
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *adapters)
    ids = token_ids()
    out = torch.func.vmap(lambda p: fwd(p, ids, use_cache=False).logits)(stacked)
    for k, adapter in enumerate(adapters):
        torch.testing.assert_close(out[k], fwd(adapter, ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    grads = torch.func.grad(lambda p: fwd(p, ids, use_cache=False).logits.square().mean())(adapters[0])
    assert all(g.abs().sum() > 0 for g in optree.tree_leaves(grads))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_inject_adapter_in_model_with_ia3_equals_peft() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    twin = copy.deepcopy(model)
    kw = {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"], "init_ia3_weights": False}
    fp.inject_adapter_in_model(fp.IA3Config(**kw), model)
    peft.inject_adapter_in_model(peft.IA3Config(**kw), twin)
    assert fp.get_peft_model_state_dict(model).keys() == peft.get_peft_model_state_dict(twin).keys()
    fp.set_peft_model_state_dict(model, peft.get_peft_model_state_dict(twin))
    x = torch.randn(4, 10)
    torch.testing.assert_close(model(x), twin(x))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in twin.named_parameters() if p.requires_grad)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("model_factory", "kw", "match"),
    [
        (MLP, {"target_modules": ["lin0"], "feedforward_modules": ["lin1"]}, "subset"),
        (EmbNet, {"target_modules": ["emb"]}, "'emb'.*Embedding"),
        (ConvNet, {"target_modules": ["c1"]}, "'c1'.*Conv1d"),
        (MLP, {}, "target_modules"),
    ],
)
def test_bad_configs_are_clear_and_leave_the_model_alone(model_factory, kw, match) -> None:
    model = model_factory()
    before, text = _state(model), repr(model)
    with pytest.raises(ValueError, match=match):
        fp.adapt(model, fp.IA3Config(**kw))
    assert repr(model) == text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ia3_targets_default_like_peft() -> None:
    model = tiny_gpt2()
    params, fwd = fp.adapt(model, fp.IA3Config())
    assert fwd.targets == (
        "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
        "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj",
    )  # fmt: skip
    # mlp.c_proj is a feedforward module by default: its vector scales the 128 input features
    assert params["transformer.h.0.mlp.c_proj"]["ia3_l"].shape == (1, 128)
    assert params["transformer.h.0.attn.c_attn"]["ia3_l"].shape == (96, 1)


def _peft_ia3_shapes(model: nn.Module, **kw: Any) -> dict[str, tuple[int, ...]]:
    adapted = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**kw))
    return {
        n.removeprefix("base_model.model.").removesuffix(".ia3_l.default"): tuple(p.shape)
        for n, p in adapted.named_parameters()
        if "ia3_l" in n
    }


@pytest.mark.parametrize(
    "kw",
    [
        {"target_modules": "lin0", "feedforward_modules": ["lin1"]},  # not targeted
        {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"], "exclude_modules": ["lin1"]},  # excluded
        {"target_modules": "lin0", "feedforward_modules": "lin1|head"},
    ],
)
def test_a_feedforward_module_that_is_not_adapted_is_ignored_as_in_peft(kw: dict[str, Any]) -> None:
    model = MLP()
    with pytest.warns(fp.FuncpeftWarning, match=r"`feedforward_modules` (entry 'lin1'|regex 'lin1\|head')") as info:
        params, fwd = fp.adapt(model, fp.IA3Config(**kw))
    assert len(info) == 1 and info[0].filename == __file__
    assert fwd.targets == ("lin0",)
    assert {p: tuple(e["ia3_l"].shape) for p, e in params.items()} == _peft_ia3_shapes(model, **kw) == {"lin0": (20, 1)}


def test_feedforward_applies_to_the_adapted_part_of_its_matches_without_a_warning() -> None:
    model = MLP()
    kw = {"target_modules": "lin[01]", "feedforward_modules": "lin[01]", "exclude_modules": ["lin1"]}
    params, _ = fp.adapt(model, fp.IA3Config(**kw))  # 'lin[01]' matches lin0, which is adapted: no warning
    assert {p: tuple(e["ia3_l"].shape) for p, e in params.items()} == _peft_ia3_shapes(model, **kw) == {"lin0": (1, 10)}


def test_default_feedforward_modules_that_are_not_targets_are_ignored_as_in_peft() -> None:
    model = tiny_llama()
    params, _ = fp.adapt(model, fp.IA3Config(target_modules=["q_proj"]))  # default feedforward: down_proj; no warning
    ours = {p: tuple(e["ia3_l"].shape) for p, e in params.items()}
    assert ours == _peft_ia3_shapes(model, target_modules=["q_proj"])
    assert sorted(ours) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


class _Suffixes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(4, 6)
        self.proj = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.q_proj(x))


def test_feedforward_list_entries_match_a_plain_suffix_as_in_peft() -> None:
    # PEFT tests `key.endswith(entry)`: 'proj' makes q_proj a feedforward module too (input scaling, (1, 4))
    torch.manual_seed(0)
    model = _Suffixes().double()
    kw = {"target_modules": ".*proj", "feedforward_modules": ["proj"], "init_ia3_weights": False}
    params, fwd = fp.adapt(model, fp.IA3Config(**kw), generator=torch.Generator().manual_seed(1))
    assert {p: tuple(e["ia3_l"].shape) for p, e in params.items()} == {"q_proj": (1, 4), "proj": (1, 6)}
    assert _peft_ia3_shapes(model, **kw) == {"q_proj": (1, 4), "proj": (1, 6)}
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**kw))
    peft.set_peft_model_state_dict(theirs, fp.to_peft_state_dict(params, fp.IA3Config(**kw)))
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(fwd(params, x), theirs(x))
