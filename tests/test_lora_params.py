"""LoRA ``target_parameters`` (raw nn.Parameters, e.g. MoE experts) against PEFT 0.21.2's ``lora.ParamWrapper``:
shapes and checkpoint keys, outputs and gradients, merge, checkpoints both ways, vmap, torch.func, compile, errors."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import oracle, tiny_llama, token_ids
from torch import nn

import funcpeft as fp

peft = oracle("peft")
transformers = oracle("transformers")


class Experts(nn.Module):
    """A 3-D expert stack ``w3`` (E, d1, d2) and a 2-D ``w2`` (out, in), read directly by the forward."""

    def __init__(self, transposed: bool | None = None) -> None:
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(4, 6, 10))
        self.w2 = nn.Parameter(torch.randn(5, 6 if transposed else 10))
        if transposed is not None:
            self.is_transposed = transposed  # transformers' flag: w3 stored (E, in, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (E, n, 6)
        if getattr(self, "is_transposed", False):
            return torch.bmm(x, self.w3).relu().sum(-1, keepdim=True) * (x @ self.w2.T)
        return torch.bmm(x, self.w3) @ self.w2.T


class Net(nn.Module):
    def __init__(self, transposed: bool | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.experts = Experts(transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(self.fc(x))


def _net_in() -> tuple[torch.Tensor, ...]:
    return (torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(1)),)


def _moe(name: str) -> nn.Module:
    torch.manual_seed(0)
    common = {
        "num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
        "vocab_size": 50, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
        "head_dim": 8,
    }  # fmt: skip
    if name == "llama4":
        config = transformers.Llama4TextConfig(
            intermediate_size=8, intermediate_size_mlp=16, num_local_experts=3, num_experts_per_tok=1,
            interleave_moe_layer_step=1, **common,
        )  # fmt: skip
        model = transformers.Llama4ForCausalLM(config)
    elif name == "gptoss":
        config = transformers.GptOssConfig(intermediate_size=8, num_local_experts=3, num_experts_per_tok=2, **common)
        model = transformers.GptOssForCausalLM(config)
    else:
        config = transformers.Qwen3MoeConfig(
            intermediate_size=16, moe_intermediate_size=8, num_experts=3, num_experts_per_tok=2, **common
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # some expert stacks start as zeros (or empty): give every parameter values
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.config._experts_implementation = "eager"  # torch's grouped_mm has no float64 kernel
    return model.eval()


def _ids() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1)),)


LLAMA4 = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
# (name, model, inputs, LoraConfig kwargs shared by funcpeft and PEFT)
CASES: list[tuple[str, Any, Any, dict[str, Any]]] = [
    ("custom", Net, _net_in, {"target_modules": [], "target_parameters": ["experts.w3", "w2"]}),
    ("custom-transposed", lambda: Net(True), _net_in, {"target_modules": [], "target_parameters": ["w3", "w2"]}),
    ("custom-3d-only", Net, _net_in, {"target_modules": [], "target_parameters": ["w3"], "use_rslora": True}),
    ("custom-with-modules", Net, _net_in, {"target_modules": ["fc"], "target_parameters": ["w3", "w2"],
                                          "rank_pattern": {"w3": 3}, "alpha_pattern": {"experts.w2": 5}}),
    ("llama4", lambda: _moe("llama4"), _ids, {"target_modules": [], "target_parameters": LLAMA4}),
    ("llama4-attention", lambda: _moe("llama4"), _ids, {"target_modules": ["q_proj", "v_proj"],
                                                         "target_parameters": LLAMA4}),
    # target_modules=None: PEFT's defaults for llama (q_proj, v_proj) and the parameters
    ("llama-defaults", tiny_llama, lambda: (token_ids(length=5),), {"target_parameters": ["mlp.down_proj.weight"]}),
    ("gptoss", lambda: _moe("gptoss"), _ids,
     {"target_modules": [], "target_parameters": ["mlp.experts.gate_up_proj", "down_proj", "gate_up_proj_bias"]}),
    ("qwen3moe", lambda: _moe("qwen3moe"), _ids,
     {"target_modules": ["o_proj"], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}),
]  # fmt: skip
IDS = [c[0] for c in CASES]


def _cases(*names: str) -> Any:
    """A parametrization over the named CASES."""
    chosen = [c for c in CASES if c[0] in names]
    return pytest.mark.parametrize(("name", "factory", "inputs", "kw"), chosen, ids=[c[0] for c in chosen])


def _out(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.logits


def _perturbed(params: fp.Params, seed: int) -> fp.Params:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return {
            p: {
                n: (t + 0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype)).requires_grad_(True)
                for n, t in e.items()
            }
            for p, e in params.items()
        }


def _setup(factory: Any, kw: dict[str, Any], seed: int = 1):
    model = factory().double().eval()
    config = fp.LoraConfig(r=2, **kw)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(0))
    params = _perturbed(params, seed)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, **kw))
    result = peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k], "every PEFT adapter tensor is loaded"
    return model, config, params, fwd, peft_model.eval()


def _x(inputs: Any) -> tuple[torch.Tensor, ...]:
    return tuple(t.double() if t.is_floating_point() else t for t in inputs())


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=IDS)
def test_shapes_and_checkpoint_keys_are_peft(name: str, factory, inputs, kw) -> None:
    model = factory()
    config = fp.LoraConfig(r=2, **kw)
    params, fwd = fp.adapt(model, config)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, **kw))
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(peft_model).items()}
    ours = {k: tuple(v.shape) for k, v in fp.to_peft_state_dict(params, config).items()}
    assert ours == theirs
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == sum(t.numel() for e in params.values() for t in e.values())


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=IDS)
def test_outputs_and_gradients_equal_peft(name: str, factory, inputs, kw) -> None:
    model, config, params, fwd, peft_model = _setup(factory, kw)
    x = _x(inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, peft_out = _out(fwd(params, *x)), _out(peft_model(*x))
    assert not torch.allclose(out, _out(model(*x)))
    torch.testing.assert_close(out, peft_out, rtol=1e-10, atol=1e-10)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weights).sum().backward()
    (peft_out * weights).sum().backward()
    theirs = {k.replace(".default", ""): v.grad for k, v in peft_model.named_parameters() if v.requires_grad}
    grads = fp.to_peft_state_dict({p: {n: t.grad for n, t in e.items()} for p, e in params.items()}, config)
    assert grads.keys() == theirs.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, theirs[key], rtol=1e-9, atol=1e-11, msg=key)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the model is untouched"


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=IDS)
def test_fresh_adapter_is_base_and_merge_equals_forward(name: str, factory, inputs, kw) -> None:
    model = factory().double().eval()
    x = _x(inputs)
    params, fwd = fp.adapt(model, fp.LoraConfig(r=2, **kw))
    assert torch.equal(_out(fwd(params, *x)), _out(model(*x)))
    params = _perturbed(params, 3)
    out = _out(fwd(params, *x))
    merged = copy.deepcopy(model)
    merged.load_state_dict(fwd.merge(params))
    torch.testing.assert_close(_out(merged(*x)), out, rtol=1e-10, atol=1e-10)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, **kw))
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, fwd.config))
    theirs = peft_model.merge_and_unload().state_dict()
    for key, value in fwd.merge(params).items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-10, atol=1e-10, msg=key)


@_cases("custom", "llama4", "llama-defaults", "gptoss")
def test_checkpoints_both_ways(tmp_path: Path, name: str, factory, inputs, kw) -> None:
    model, config, params, fwd, peft_model = _setup(factory, kw)
    x = _x(inputs)
    fp.save(tmp_path / "ours", params, config)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(_out(loaded(*x)), _out(fwd(params, *x)), rtol=1e-10, atol=1e-10)
    peft_model.save_pretrained(tmp_path / "theirs")
    back, back_config = fp.load(tmp_path / "theirs")
    assert back_config.target_parameters == kw["target_parameters"]
    assert back.keys() == params.keys()
    for path, entry in params.items():
        assert back[path].keys() == entry.keys()
        for key, tensor in entry.items():
            assert torch.equal(back[path][key], tensor.detach()), (path, key)
    _, fwd2 = fp.adapt(model, back_config)
    torch.testing.assert_close(_out(fwd2(back, *x)), _out(peft_model(*x)), rtol=1e-10, atol=1e-10)
    cli = subprocess.run([sys.executable, "-m", "funcpeft", "inspect", str(tmp_path / "ours")], capture_output=True)
    assert cli.returncode == 0, cli.stderr.decode()
    assert "target_parameters" in cli.stdout.decode() and next(iter(params)) in cli.stdout.decode()


# (Llama4 with its attention adapted too: its MoE adds the routed experts in place into the shared expert's output,
# which vmap allows only when that output is batched as well; eager MoE loops (gpt-oss, Qwen3-MoE) route with
# data-dependent indexing, which vmap cannot run at all.)
@_cases("custom", "custom-transposed", "llama4-attention")
def test_vmap_over_stacked_adapters_and_func_grad(name: str, factory, inputs, kw) -> None:
    model = factory().double().eval()
    x = _x(inputs)
    params, fwd = fp.adapt(model, fp.LoraConfig(r=2, **kw))
    adapters = [_perturbed(params, s) for s in range(3)]
    extra = {"use_cache": False} if name.startswith("llama4") else {}
    out = torch.func.vmap(lambda p: _out(fwd(p, *x, **extra)))(fp.stack(adapters))
    for k, adapter in enumerate(adapters):
        torch.testing.assert_close(out[k], _out(fwd(adapter, *x)), rtol=1e-10, atol=1e-10)
    grads = torch.func.grad(lambda p: _out(fwd(p, *x)).square().sum())(adapters[0])
    _out(fwd(adapters[0], *x)).square().sum().backward()
    for path, entry in adapters[0].items():
        for key, leaf in entry.items():
            torch.testing.assert_close(grads[path][key], leaf.grad, rtol=1e-10, atol=1e-12)


def test_compile_and_base_tensors() -> None:
    model = Net().eval()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=[], target_parameters=["w3", "w2"]))
    params = _perturbed(params, 4)
    x = _net_in()
    expected = fwd(params, *x)
    compiled = torch.compile(fwd, fullgraph=True)
    torch.testing.assert_close(compiled(params, *x), expected)
    base = {k: v + 1 for k, v in model.state_dict().items()}  # fwd(..., base=) reads W from `base`, then adapts it
    other = copy.deepcopy(model)
    other.load_state_dict(base)
    _, fwd_other = fp.adapt(other, fwd.config)
    torch.testing.assert_close(fwd(params, *x, base=base), fwd_other(params, *x))
    with torch.no_grad():
        assert torch.equal(fwd(None, *x), model(*x))


def test_init_follows_peft() -> None:
    model = Net()
    for init in (True, False, "gaussian"):
        config = fp.LoraConfig(r=4, target_modules=[], target_parameters=["w3"], init_lora_weights=init)
        entry = fp.adapt(model, config, generator=torch.Generator().manual_seed(0))[0]["experts"]
        a, b = entry["lora_A"], entry["lora_B"]
        assert a.shape == (16, 10) and b.shape == (6, 16)  # (r*E, d2), (d1, r*E): no is_transposed
        if init == "gaussian":
            assert 0.15 < a.std() < 0.35 and not b.any()  # std 1 / r
        else:
            assert a.abs().max() <= 1 / 10**0.5 and a.std() > 0.1  # kaiming-uniform(a=sqrt(5)): bound 1/sqrt(fan_in)
            assert b.any() if init is False else not b.any()


def test_targets_none_without_defaults_adapts_parameters_only() -> None:
    params, fwd = fp.adapt(Net(), fp.LoraConfig(target_parameters=["w2"]))
    assert list(params) == ["experts"] and fwd.targets == ("experts",)
    moe_params, _ = fp.adapt(_moe("llama4"), fp.LoraConfig(target_parameters=LLAMA4))  # llama4_text: no defaults
    assert list(moe_params) == ["model.layers.0.feed_forward.experts"]
    llama_params, _ = fp.adapt(tiny_llama(), fp.LoraConfig(target_parameters=["down_proj.weight"]))
    assert any(p.endswith("q_proj") for p in llama_params)  # PEFT's defaults for llama apply too


def test_a_linear_weight_as_parameter_equals_lora_on_the_linear() -> None:
    """A 2-D target parameter is PEFT's Linear LoRA on that weight: same tensors, keys and outputs."""
    model = Net().double()
    by_param, fwd_param = fp.adapt(model, fp.LoraConfig(target_modules=[], target_parameters=["fc.weight"]))
    _, fwd_module = fp.adapt(model, fp.LoraConfig(target_modules=["fc"]))
    by_param = _perturbed(by_param, 5)
    x = _x(_net_in)
    torch.testing.assert_close(fwd_param(by_param, *x), fwd_module(by_param, *x), rtol=1e-12, atol=1e-12)


def test_bfloat16_parameters_match_peft() -> None:
    """A bf16 expert stack: float32 adapter tensors (PEFT's autocast_adapter_dtype), factors cast to bf16 for the
    update as PEFT's forward does."""
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16).eval()
    kw = {"target_modules": [], "target_parameters": ["w3", "w2"]}
    params, fwd = fp.adapt(model, fp.LoraConfig(**kw))
    params = _perturbed(params, 7)
    assert all(t.dtype == torch.float32 for e in params.values() for t in e.values())
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, fwd.config))
    x = tuple(t.to(torch.bfloat16) for t in _net_in())
    torch.testing.assert_close(fwd(params, *x), peft_model(*x), rtol=0, atol=0)


def test_bind_carries_the_parameter_adapter(tmp_path: Path) -> None:
    model = Net().double()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=[], target_parameters=["w3"]))
    params = _perturbed(params, 8)
    bound = fwd.bind(params)
    x = _x(_net_in)
    torch.testing.assert_close(bound(*x), fwd(params, *x))
    assert {id(p) for p in bound.parameters()} == {id(t) for e in params.values() for t in e.values()}
    bound.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    torch.testing.assert_close(loaded(*x), fwd(params, *x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["gptoss", "qwen3moe"])
def test_grouped_mm_experts_match_peft(name: str) -> None:
    """transformers' grouped_mm experts implementation (float32) reads the adapted stacks too."""
    model = _moe(name)
    model.config._experts_implementation = "grouped_mm"
    kw = {"target_modules": [], "target_parameters": ["gate_up_proj", "down_proj"]}
    params, fwd = fp.adapt(model, fp.LoraConfig(**kw))
    params = _perturbed(params, 9)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, fwd.config))
    x = _ids()
    torch.testing.assert_close(_out(fwd(params, *x)), _out(peft_model(*x)))


def test_single_expert_transposed_stack() -> None:
    """(1, in, out) with `is_transposed`: the per-expert delta (PEFT 0.21.2 adds an (out, in) delta there and fails
    with a shape error, or silently transposes it when in == out)."""
    model = Net()
    model.experts.w3 = nn.Parameter(torch.randn(1, 6, 10))
    model.experts.is_transposed = True
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=[], target_parameters=["w3"], init_lora_weights=False))
    a, b = params["experts"]["lora_A"], params["experts"]["lora_B"]
    assert a.shape == (8, 6) and b.shape == (10, 8)
    merged = fwd.merge(params)["experts.w3"]
    torch.testing.assert_close(merged, model.experts.w3 + (b @ a).T.unsqueeze(0))

    model.experts.w3 = nn.Parameter(torch.randn(1, 6, 6))  # square: PEFT silently adds the untransposed delta
    with pytest.warns(fp.FuncpeftWarning, match="single transposed expert"):
        fp.adapt(model, fp.LoraConfig(target_modules=[], target_parameters=["w3"]))


def test_generate_matches_peft() -> None:
    model, config, params, fwd, peft_model = _setup(lambda: _moe("llama4"), CASES[4][3])
    with torch.no_grad():  # an update large enough to change greedy tokens
        for entry in params.values():
            for tensor in entry.values():
                tensor.mul_(20)
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config))
    ids = _ids()[0]
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    ours = fwd.generate(params, ids, **kw)
    assert torch.equal(ours, peft_model.generate(input_ids=ids, **kw))
    assert not torch.equal(ours, model.generate(ids, **kw))


class _Config(dict):  # a transformers-like config PEFT and funcpeft read `model_type` from
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def test_save_with_default_targets_records_only_modules(tmp_path: Path) -> None:
    """target_modules=None on an architecture with defaults and a bare parameter name: the folder records the
    default modules only (PEFT must not also wrap the experts as a module), and loads into PEFT as built."""

    class Lm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = _Config(model_type="llama")
            self.q_proj, self.v_proj, self.experts = nn.Linear(6, 6), nn.Linear(6, 6), Experts()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.experts(self.q_proj(x) + self.v_proj(x))

    model = Lm().double()
    params, fwd = fp.adapt(model, fp.LoraConfig(r=2, target_parameters=["w3"]))
    assert list(params) == ["q_proj", "v_proj", "experts"]
    params = _perturbed(params, 1)
    fp.save(tmp_path, params, fwd.config)
    assert fp.load(tmp_path)[1].target_modules == ["q_proj", "v_proj"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    x = _x(_net_in)
    torch.testing.assert_close(loaded(*x), fwd(params, *x), rtol=1e-10, atol=1e-10)
