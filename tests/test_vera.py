"""VeRA against PEFT: shared projections bit for bit, outputs, gradients, merging, checkpoints both ways (with and
without the projections), mixed batches, vmap, torch.func, compile, inspect, and refusals."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import test_contract as contract
import torch
from _models import MLP, ConvNet, EmbNet, oracle, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from safetensors.torch import load_file
from torch import nn

import funcpeft as fp
from funcpeft import optim
from funcpeft.methods import vera

peft = oracle("peft")


def _out(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return x.logits if hasattr(x, "logits") else x.last_hidden_state


class Wide(nn.Module):
    """Layers of different in/out features, so the projections are sliced differently per layer."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 14)
        self.mid = nn.Linear(14, 9, bias=False)
        self.down = nn.Linear(9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.relu(self.up(x)))))


# (name, model factory, inputs, VeRA kwargs shared by funcpeft and PEFT); None targets = PEFT's defaults
CASES: list[tuple[str, Any, Any, dict[str, Any]]] = [
    ("mlp", MLP, lambda: (torch.randn(3, 10),), {"target_modules": ["lin0", "lin1", "head"], "r": 6}),
    ("wide-3d-input", Wide, lambda: (torch.randn(2, 3, 6),), {"target_modules": ["up", "mid", "down"], "r": 4}),
    ("mlp-modules_to_save", MLP, lambda: (torch.randn(3, 10),),
     {"target_modules": ["lin0"], "modules_to_save": ["head"], "r": 8, "projection_prng_key": 7}),
    ("mlp-vera_only-bias", MLP, lambda: (torch.randn(3, 10),),
     {"target_modules": ["lin0", "lin1"], "bias": "vera_only", "r": 5}),
    ("gpt2-defaults", tiny_gpt2, lambda: (token_ids(),), {"r": 8, "fan_in_fan_out": True}),
    ("gpt2-conv1d-mixed-sizes", tiny_gpt2, lambda: (token_ids(),),
     {"target_modules": ["c_attn", "c_fc", "mlp.c_proj"], "r": 4, "fan_in_fan_out": True}),
    ("llama-defaults", tiny_llama, lambda: (token_ids(),), {"r": 8}),
    ("bert-defaults", tiny_bert, lambda: (token_ids(),), {"r": 8, "layers_to_transform": [1]}),
]  # fmt: skip
IDS = [c[0] for c in CASES]


def _setup(factory: Any, inputs: Any, kw: dict[str, Any], dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    model = factory().to(dtype).eval()
    twin = copy.deepcopy(model)
    x = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs())
    config = fp.VeraConfig(init_weights=False, **kw)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notices
        peft_model = peft.get_peft_model(twin, peft.VeraConfig(init_weights=False, **kw))
    # PEFT built its own projections from the key: they must be funcpeft's, bit for bit (float32 values)
    for name in ("vera_A", "vera_B"):
        assert torch.equal(getattr(peft_model.base_model, name)["default"].to(dtype), params[""][name])
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config))
    return model, x, config, params, fwd, peft_model.eval()


def test_projections_are_peft_s_for_the_key_and_sized_to_the_largest_layer() -> None:
    params, _ = fp.adapt(Wide(), fp.VeraConfig(target_modules=["up", "mid", "down"], r=3, projection_prng_key=11))
    assert params[""]["vera_A"].shape == (3, 14) and params[""]["vera_B"].shape == (14, 3)
    peft_model = peft.get_peft_model(Wide(), peft.VeraConfig(target_modules=["up", "mid", "down"], r=3,
                                                              projection_prng_key=11))  # fmt: skip
    assert torch.equal(peft_model.base_model.vera_A["default"], params[""]["vera_A"])
    assert torch.equal(peft_model.base_model.vera_B["default"], params[""]["vera_B"])
    other, _ = fp.adapt(Wide(), fp.VeraConfig(target_modules=["up"], r=3, projection_prng_key=12))
    assert not torch.equal(other[""]["vera_A"][:, :6], params[""]["vera_A"][:, :6])
    assert set(params) == {"", "up", "mid", "down"}, "the projections live once, in the root entry"
    assert params["mid"]["vera_lambda_b"].shape == (9,) and params["mid"]["vera_lambda_d"].shape == (3,)


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=IDS)
def test_outputs_and_gradients_equal_peft(name: str, factory, inputs, kw) -> None:
    model, x, config, params, fwd, peft_model = _setup(factory, inputs, kw)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == sum(len(e) for p, e in params.items() if p), "PEFT trains all but the projections"
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
            if path == "":
                assert tensor.grad is None, "the shared projections are frozen"
                continue
            if leaf.startswith("vera_lambda"):
                key = f"base_model.model.{path}.{leaf}.default"
            elif leaf == "bias" and path in fwd.targets:
                key = f"base_model.model.{path}.base_layer.bias"
            else:  # a modules_to_save copy
                key = f"base_model.model.{path}.modules_to_save.default.{leaf}"
            torch.testing.assert_close(tensor.grad, theirs[key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES[:2] + CASES[4:6], ids=IDS[:2] + IDS[4:6])
def test_merge_equals_forward_and_peft_merge(name: str, factory, inputs, kw) -> None:
    model, x, config, params, fwd, peft_model = _setup(factory, inputs, kw)
    merged_model = copy.deepcopy(model)
    merged_model.load_state_dict(fwd.merge(params))
    expected = _out(fwd(params, *x))
    torch.testing.assert_close(_out(merged_model(*x)), expected, rtol=1e-10, atol=1e-10)
    peft_merged = peft_model.merge_and_unload()
    for key, value in peft_merged.state_dict().items():
        torch.testing.assert_close(merged_model.state_dict()[key], value, rtol=1e-10, atol=1e-12)
    for path in fwd.targets:
        layer = fwd._layers[path]
        tensors = {**params[""], **params[path]}
        weight, _ = layer.effective_weight(fwd._modules[path], tensors)
        w = fwd._modules[path].weight
        assert not torch.equal(weight, w.T if layer.kind.value == "Conv1D" else w)


def test_fresh_vera_is_the_base_model() -> None:
    model = tiny_gpt2().double()
    x = token_ids()
    params, fwd = fp.adapt(model, fp.VeraConfig(r=8, d_initial=0.3))
    assert torch.equal(_out(fwd(params, x)), _out(model(x)))
    assert torch.equal(params["transformer.h.0.attn.c_attn"]["vera_lambda_d"], torch.full((8,), 0.3).double())
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=8, d_initial=0.3))
    state = peft_model.state_dict()
    for path in fwd.targets:
        for name in ("vera_lambda_b", "vera_lambda_d"):
            assert torch.equal(state[f"base_model.model.{path}.{name}.default"].double(), params[path][name])


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), [CASES[1], CASES[5]], ids=[IDS[1], IDS[5]])
def test_checkpoints_both_ways(tmp_path: Path, name: str, factory, inputs, kw, save_projection: bool) -> None:
    kw = {**kw, "save_projection": save_projection}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about regenerating from the key
        model, x, config, params, fwd, peft_model = _setup(factory, inputs, kw)
        fp.save(tmp_path / "fp", params, config)
        keys = set(load_file(tmp_path / "fp" / "adapter_model.safetensors"))
        assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) is save_projection
        assert not any(".vera_A" in k and not k.startswith("base_model.vera_A") for k in keys)
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fp").eval()
        torch.testing.assert_close(_out(reloaded(*x)), _out(fwd(params, *x)), rtol=1e-10, atol=1e-10)
        peft_model.save_pretrained(tmp_path / "peft")
        peft_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
        assert peft_keys == keys, "funcpeft writes exactly PEFT's keys"
        assert set(fp.to_peft_state_dict(params)) == keys | {"base_model.vera_A", "base_model.vera_B"}
        loaded, loaded_config = fp.load(tmp_path / "peft")
    assert set(loaded_config.target_modules) == set(config.target_modules)  # PEFT saves a set: any order
    assert loaded_config.replace(target_modules=config.target_modules) == config
    assert ("" in loaded) is save_projection
    _, fwd2 = fp.adapt(model, loaded_config)
    # without the projections in the file, fwd regenerates them from the key, as PEFT does
    torch.testing.assert_close(_out(fwd2(loaded, *x)), _out(peft_model(*x)), rtol=1e-10, atol=1e-10)
    merged = copy.deepcopy(model)
    merged.load_state_dict(fwd2.merge(loaded))
    torch.testing.assert_close(_out(merged(*x)), _out(peft_model(*x)), rtol=1e-10, atol=1e-10)


def _stacked(fwd: fp.Adapted, k: int = 3) -> tuple[list[dict], dict]:
    trees = [fwd.init(torch.Generator().manual_seed(i)) for i in range(k)]
    with torch.no_grad():
        for i, tree in enumerate(trees):  # distinct trained-looking vectors, shared projections
            for path in fwd.targets:
                for t in tree[path].values():
                    t.normal_(generator=torch.Generator().manual_seed(10 + i))
    return trees, fp.stack(trees)


def test_mixed_batches_and_vmap_equal_a_loop_over_adapters() -> None:
    model = tiny_gpt2().double()
    params, fwd = fp.adapt(model, fp.VeraConfig(target_modules=["c_attn", "c_fc"], r=4))
    trees, stacked = _stacked(fwd)
    x = token_ids(batch=4)
    ids = torch.tensor([2, -1, 0, 1])
    out = _out(fwd(stacked, x, adapter_ids=ids))
    for row, k in enumerate(ids.tolist()):
        want = _out(fwd(trees[k] if k >= 0 else None, x[row : row + 1]))
        torch.testing.assert_close(out[row : row + 1], want, rtol=1e-10, atol=1e-10)
    (out.square().sum()).backward()
    assert stacked[""]["vera_A"].grad is None, "frozen in mixed batches too"
    assert stacked["transformer.h.0.attn.c_attn"]["vera_lambda_b"].grad[1:].abs().sum() > 0
    # a tree without the root entry (a checkpoint saved without projections) uses fwd's own, from the key
    without = {path: entry for path, entry in stacked.items() if path}
    torch.testing.assert_close(_out(fwd(without, x, adapter_ids=ids)), out, rtol=0, atol=0)
    compiled = torch.compile(fwd, fullgraph=True, backend="eager")
    torch.testing.assert_close(_out(compiled(stacked, x, adapter_ids=ids)), out, rtol=1e-12, atol=1e-12)
    mapped = torch.func.vmap(lambda p: _out(fwd(p, x)), in_dims=(0,))(stacked)
    for k, tree in enumerate(trees):
        torch.testing.assert_close(mapped[k], _out(fwd(tree, x)), rtol=1e-10, atol=1e-10)
    # adapters with other projections cannot share one mixed batch: refused, naming the fix
    other, _ = fp.adapt(model, fp.VeraConfig(target_modules=["c_attn", "c_fc"], r=4, projection_prng_key=3))
    with pytest.raises(ValueError, match="projection_prng_key"):
        fwd(fp.stack([trees[0], other]), x[:2], adapter_ids=torch.tensor([0, 1]))


def test_torch_func_grad_gives_zero_for_the_projections_and_compile_fullgraph() -> None:
    model = MLP().double()
    x = torch.randn(3, 10, dtype=torch.float64)
    params, fwd = fp.adapt(model, fp.VeraConfig(target_modules=["lin0", "lin1"], r=4, init_weights=False))

    def loss(p: dict) -> torch.Tensor:
        return fwd(p, x).square().sum()

    grads = torch.func.grad(loss)(params)
    loss(params).backward()
    for path, entry in params.items():
        for name, tensor in entry.items():
            if path == "":
                assert torch.equal(grads[path][name], torch.zeros_like(tensor))
            else:
                torch.testing.assert_close(grads[path][name], tensor.grad, rtol=1e-12, atol=1e-12)
    compiled = torch.compile(fwd, fullgraph=True)
    torch.testing.assert_close(compiled(params, x), fwd(params, x), rtol=1e-10, atol=1e-10)


def test_optimizers_leave_the_projections_alone() -> None:
    model = MLP()
    x = torch.randn(3, 10)
    params, fwd = fp.adapt(model, fp.VeraConfig(target_modules=["lin0", "lin1"], r=4))
    before = {k: v.clone() for k, v in params[""].items()}
    torch_opt = torch.optim.AdamW([t for e in params.values() for t in e.values()], lr=0.1, weight_decay=0.1)
    fwd(params, x).square().sum().backward()
    torch_opt.step()
    tx = optim.chain(optim.adamw(0.1, weight_decay=0.1), optim.freeze(vera.frozen_mask(params)))
    state = tx.init(params)
    grads = torch.func.grad(lambda p: fwd(p, x).square().sum())(params)
    updates, state = tx.update(grads, state, params)
    params = optim.apply_updates(params, updates)
    for name, value in before.items():
        assert torch.equal(params[""][name], value)
    assert not torch.equal(params["lin0"]["vera_lambda_b"], torch.zeros(20))


def test_inspect_describes_a_vera_adapter(tmp_path: Path) -> None:
    params, fwd = fp.adapt(tiny_gpt2(), config := fp.VeraConfig(r=8))
    fp.save(tmp_path, params, config)
    run = [sys.executable, "-m", "funcpeft", "inspect", str(tmp_path)]
    text = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert "VERA" in text and "vera_A (8, 32)" in text and "frozen" in text
    facts = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, check=True).stdout)
    assert facts["targets"] == list(fwd.targets)
    assert facts["parameters"]["adapter"] == sum(t.numel() for p, e in params.items() if p for t in e.values())
    assert facts["shared"] == {"vera_A": [8, 32], "vera_B": [96, 8]}


def test_combine_is_refused_as_peft_has_no_vera_add_weighted_adapter() -> None:
    params, _ = fp.adapt(MLP(), config := fp.VeraConfig(target_modules=["lin0"], r=4))
    with pytest.raises(TypeError, match="VeraConfig: PEFT.s add_weighted_adapter combines only LoRA and IA3"):
        fp.combine([params, params], [0.5, 0.5], config)


@pytest.mark.parametrize(
    ("factory", "kw", "match"),
    [
        (lambda: ConvNet(), {"target_modules": ["c2"]}, r"'c2'.*Linear and transformers' Conv1D"),
        (EmbNet, {"target_modules": ["emb"]}, r"'emb'.*only adapt nn.Linear"),
    ],
)
def test_unsupported_layers_are_refused_by_path(factory, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        fp.adapt(factory(), fp.VeraConfig(r=2, **kw))


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"r": 0}, ValueError, "`r`"),
        ({"vera_dropout": 1.0}, ValueError, "vera_dropout"),
        ({"bias": "lora_only"}, ValueError, "vera_only"),
        ({"projection_prng_key": 1.5}, ValueError, "projection_prng_key"),
        ({"save_projection": "no"}, TypeError, "save_projection"),
        ({"layers_pattern": "h"}, ValueError, "layers_to_transform"),
    ],
)
def test_bad_configs_name_the_field(kw, error, match) -> None:
    with pytest.raises(error, match=match):
        fp.VeraConfig(target_modules=["lin0"], **kw)


def test_peft_config_round_trip_and_unknown_features_refused() -> None:
    config = fp.VeraConfig(target_modules=["q"], r=16, projection_prng_key=5, save_projection=False, d_initial=0.2)
    data = config.to_peft_dict()
    assert peft.VeraConfig(**{k: v for k, v in data.items() if k != "peft_type"}).r == 16
    assert fp.VeraConfig.from_peft_dict(data) == config
    with pytest.raises(ValueError, match="exclude_modules"):
        fp.VeraConfig.from_peft_dict({**data, "exclude_modules": ["k"]})


# ----- the method contract on VeRA ------------------------------------------------------------------------------
@dataclass
class _VeraCase(contract.Case):
    config_cls: type = fp.VeraConfig

    def random_init(self) -> dict[str, Any]:
        return {"init_weights": False}


_LIN = {"target_modules": contract.LINEAR + ["head"], "r": 4}
CONTRACT = [
    _VeraCase("vera-linear", MLP, contract._mlp_in, _LIN),
    _VeraCase("vera-linear-bias-dropout", MLP, contract._mlp_in, {**_LIN, "bias": "all", "vera_dropout": 0.2}),
    _VeraCase("vera-linear-modules_to_save", MLP, contract._mlp_in, {**_LIN, "modules_to_save": ["head"]}),
    _VeraCase("vera-gpt2conv1d", contract.GPT2Style, contract._gpt2_in, {"target_modules": ["c_fc", "c_proj"], "r": 3}),
]


@contract.GRAD_MODES
@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.name)
def test_contract_fresh_adapter_is_the_base_model(case: _VeraCase, grad: bool) -> None:
    contract.test_fresh_adapter_is_the_base_model(case, grad)


@contract.GRAD_MODES
@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.name)
def test_contract_adapted_equals_merged(case: _VeraCase, grad: bool) -> None:
    contract.test_adapted_equals_merged(case, grad)


@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.name)
def test_contract_gradients_reach_the_vectors_only(case: _VeraCase) -> None:
    model, inputs, params, fwd = contract._build(case, dtype=torch.float32, random=True)
    params = contract._perturb(params, seed=2)
    contract._output(fwd(params, *inputs)).square().sum().backward()
    for path, entry in params.items():
        for name, leaf in entry.items():
            if path == "":
                assert leaf.grad is None, f"the frozen {name} got a gradient"
            else:
                assert leaf.grad is not None and leaf.grad.abs().sum() > 0, f"{path}.{name} got no gradient"
    assert all(p.grad is None for p in model.parameters()), "the base model must not receive gradients"


@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.name)
def test_contract_vmap_over_adapters_equals_loop(case: _VeraCase) -> None:
    contract.test_vmap_over_adapters_equals_loop(case, True)


def test_the_mutating_drop_in_api_refuses_vera_clearly() -> None:
    model = MLP()
    with pytest.raises(ValueError, match="shares"):
        fp.compat.inject_adapter_in_model(fp.VeraConfig(target_modules=["lin0"], r=4), model)
    assert not hasattr(model.lin0, "vera_lambda_b"), "the model is left alone"


def test_a_bfloat16_model_keeps_float32_vectors_and_projections_as_peft() -> None:
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    x = torch.randn(3, 10).to(torch.bfloat16)
    config = fp.VeraConfig(target_modules=["lin0", "lin1"], r=4, init_weights=False)
    params, fwd = fp.adapt(model, config)
    assert {t.dtype for e in params.values() for t in e.values()} == {torch.float32}
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(**{**config.to_dict(), "target_modules":
                                                                                  ["lin0", "lin1"]}))  # fmt: skip
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config))
    out = fwd(params, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, peft_model(x), rtol=0, atol=0)


def test_root_entry_is_validated_and_sparse_gradients_skip_it() -> None:
    params, fwd = fp.adapt(MLP(), fp.VeraConfig(target_modules=["lin0", "lin1"], r=4, init_weights=False))
    x = torch.randn(3, 10)
    bad = {**params, "": {"vera_A": torch.zeros(4, 3), "vera_B": params[""]["vera_B"]}}
    with pytest.raises(ValueError, match=r"params\[''\]\['vera_A'\].*\(4, 20\)"):
        fwd(bad, x)
    trees = [fwd.init(torch.Generator().manual_seed(i)) for i in range(3)]
    stacked = fp.stack(trees)
    out = fwd(stacked, x, adapter_ids=torch.tensor([2, 2, -1]), sparse_grad=True)
    out.square().sum().backward()
    grad = stacked["lin0"]["vera_lambda_b"].grad
    assert grad.is_sparse and grad.coalesce().indices().tolist() == [[2]]
    assert stacked[""]["vera_A"].grad is None
