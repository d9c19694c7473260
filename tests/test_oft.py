"""OFT against PEFT 0.21.2: outputs, gradients, merged weights and checkpoints both ways on the same weights.

PEFT's model is built with ``peft.get_peft_model`` on a copy of the model, and funcpeft's random (non-zero)
``oft_R`` tensors are copied into it, so every comparison is between the two libraries' math on equal inputs.
A ``k x k`` Conv2d (k > 1) is compared with PEFT's merged model: PEFT's unmerged forward there is not the
paper's OFT (see :mod:`funcpeft.methods.oft`), which ``test_oft_conv.py`` checks.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import MLP, ConvNet, EmbNet, conv_inputs, oracle, tiny_bert, tiny_llama, token_ids
from torch import nn

import funcpeft as fp

peft = oracle("peft")


def _out(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return x.logits if hasattr(x, "logits") else x.last_hidden_state


def _mlp_in() -> tuple[torch.Tensor, ...]:
    return (torch.randn(3, 10, generator=torch.Generator().manual_seed(5)),)


def _emb_in() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(5)),)


def _conv1x1(**kw: Any) -> nn.Module:
    return ConvNet(kernel_size=1, padding=0, **kw)


LIN = {"target_modules": ["lin0", "lin1"], "oft_block_size": 5}
R2 = {"target_modules": ["lin0", "lin1"], "r": 2, "oft_block_size": 0}
# (name, model factory, inputs, OFT kwargs shared by funcpeft and PEFT)
CASES: list[tuple[str, Any, Any, dict[str, Any]]] = [
    ("linear-block_size", MLP, _mlp_in, LIN),
    ("linear-r", MLP, _mlp_in, R2),
    ("linear-exact-cayley", MLP, _mlp_in, {**LIN, "use_cayley_neumann": False}),
    ("linear-neumann-2", MLP, _mlp_in, {**LIN, "num_cayley_neumann_terms": 2}),
    ("linear-neumann-3", MLP, _mlp_in, {**LIN, "num_cayley_neumann_terms": 3}),
    ("linear-neumann-7", MLP, _mlp_in, {**R2, "num_cayley_neumann_terms": 7}),
    ("linear-coft", MLP, _mlp_in, {**LIN, "coft": True}),  # every block outside the default ball: all projected
    ("linear-coft-mixed", MLP, _mlp_in, {**LIN, "coft": True, "eps": 0.9}),  # some blocks inside, some projected
    ("linear-coft-exact", MLP, _mlp_in, {**R2, "coft": True, "eps": 0.5, "use_cayley_neumann": False}),
    ("linear-block_share", MLP, _mlp_in, {**LIN, "block_share": True}),
    ("linear-block_share-r", MLP, _mlp_in, {**R2, "block_share": True}),
    ("linear-block_share-coft", MLP, _mlp_in, {**LIN, "block_share": True, "coft": True, "eps": 0.2}),
    ("linear-bias_all", MLP, _mlp_in, {**LIN, "bias": "all"}),
    ("linear-bias_oft_only", MLP, _mlp_in, {**LIN, "bias": "oft_only"}),
    ("linear-no-bias", lambda: MLP(bias=False), _mlp_in, LIN),
    ("linear-modules_to_save", MLP, _mlp_in, {**LIN, "modules_to_save": ["head"]}),
    ("linear-adjusted", MLP, _mlp_in, {"target_modules": ["lin0", "lin1"], "oft_block_size": 3}),  # 3 -> 2
    ("linear-adjusted-r", MLP, _mlp_in, {"target_modules": ["lin0", "lin1"], "r": 3, "oft_block_size": 0}),
    ("linear-whole", MLP, _mlp_in, {"target_modules": ["lin0", "head"], "oft_block_size": 32}),  # 32 -> 10, 20
    ("conv1x1", _conv1x1, conv_inputs, {"target_modules": ["c2"], "oft_block_size": 2}),
    ("conv1x1-r-strided-padded", lambda: ConvNet(kernel_size=1, padding=1, stride=2), conv_inputs,
     {"target_modules": ["c2", "head"], "r": 2, "oft_block_size": 0}),
    ("conv1x1-reflect", lambda: ConvNet(kernel_size=1, padding=1, padding_mode="reflect"), conv_inputs,
     {"target_modules": ["c2"], "oft_block_size": 2, "block_share": True}),
    ("embedding", lambda: EmbNet(padding_idx=0), _emb_in, {"target_modules": ["emb", "lin"], "oft_block_size": 4}),
    ("embedding-block_share-coft", EmbNet, _emb_in,
     {"target_modules": ["emb"], "r": 2, "oft_block_size": 0, "block_share": True, "coft": True, "eps": 0.1}),
    ("llama-defaults", tiny_llama, lambda: (token_ids(),), {"oft_block_size": 8}),
    ("llama-embed-mlp", tiny_llama, lambda: (token_ids(),),
     {"target_modules": ["embed_tokens", "gate_proj", "down_proj"], "oft_block_size": 16}),
    ("llama-layers-exclude", tiny_llama, lambda: (token_ids(),),
     {"oft_block_size": 8, "target_modules": ["q_proj", "v_proj", "o_proj"], "layers_to_transform": [1],
      "layers_pattern": "layers", "exclude_modules": ["model.layers.1.self_attn.v_proj"]}),
    ("bert-defaults", tiny_bert, lambda: (token_ids(),), {"oft_block_size": 8, "coft": True, "eps": 1e-3}),
]  # fmt: skip
BY_NAME = {c[0]: c for c in CASES}


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` with both libraries' block-size adjustment warnings silenced (asserted in their own test)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _setup(factory: Any, inputs: Any, kw: dict[str, Any], dtype: torch.dtype = torch.float64, seed: int = 1,
           adapter_dtype: torch.dtype | None = None):  # fmt: skip
    torch.manual_seed(0)
    model = factory().to(dtype).eval()
    x = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs())
    config = fp.OFTConfig(init_weights=False, **kw)
    params, fwd = _quiet(fp.adapt, model, config, generator=torch.Generator().manual_seed(seed))
    if adapter_dtype is not None:
        params = {
            p: {n: t.detach().to(adapter_dtype).requires_grad_() for n, t in e.items()} for p, e in params.items()
        }
    peft_config = peft.OFTConfig(init_weights=False, **kw)
    peft_model = _quiet(
        peft.get_peft_model, copy.deepcopy(model), peft_config, autocast_adapter_dtype=adapter_dtype is None
    )
    result = peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config))
    assert not result.unexpected_keys
    return model, x, config, params, fwd, peft_model.eval()


def _our_key(peft_name: str) -> str:
    """PEFT's trainable parameter name as ``<path>.<leaf>`` of funcpeft's params (oft tensors end in .weight)."""
    key = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return key.replace("base_layer.", "").replace("modules_to_save.", "")


def _flat(params: fp.Params) -> dict[str, torch.Tensor]:
    return {
        f"{path}.{leaf}.weight" if leaf.startswith("oft_") else f"{path}.{leaf}": t
        for path, entry in params.items()
        for leaf, t in entry.items()
    }


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_outputs_and_gradients_equal_peft(name: str, factory: Any, inputs: Any, kw: dict[str, Any]) -> None:
    model, x, config, params, fwd, peft_model = _setup(factory, inputs, kw)
    theirs = {_our_key(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    ours = _flat(params)
    assert theirs.keys() == ours.keys(), "PEFT trains exactly what params holds"
    assert all(theirs[k].shape == t.shape for k, t in ours.items())
    out = _out(fwd(params, *x))
    assert not torch.allclose(out, _out(model(*x)))
    peft_out = _out(peft_model(*x))
    torch.testing.assert_close(out, peft_out, rtol=1e-10, atol=1e-10)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weights).sum().backward()
    (peft_out * weights).sum().backward()
    for key, tensor in ours.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, key
        torch.testing.assert_close(tensor.grad, theirs[key].grad, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", ["linear-coft", "linear-block_share", "conv1x1", "embedding", "llama-defaults"])
def test_bfloat16_base_equals_peft(name: str) -> None:
    # PEFT's get_peft_model upcasts adapters of half-precision bases to float32 (autocast_adapter_dtype); so does
    # funcpeft, and both rotate in float32 and cast back before the base layer.
    _, factory, inputs, kw = BY_NAME[name]
    model, x, config, params, fwd, peft_model = _setup(factory, inputs, kw, dtype=torch.bfloat16)
    assert all(t.dtype == torch.float32 for e in params.values() for n, t in e.items() if n.startswith("oft_"))
    out = _out(fwd(params, *x))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _out(peft_model(*x)), rtol=0, atol=0)


@pytest.mark.parametrize(
    "name", ["linear-coft-mixed", "linear-exact-cayley", "linear-coft-exact", "linear-block_share-coft", "conv1x1",
             "embedding-block_share-coft"],
)  # fmt: skip
def test_bfloat16_adapters_equal_peft(name: str) -> None:
    # bfloat16 oft_R (PEFT with autocast_adapter_dtype=False): the same roundings, bit for bit; the exact Cayley
    # transform is solved in float32 (PEFT's float32 identity promotes it; CPUs have no bfloat16 LU)
    _, factory, inputs, kw = BY_NAME[name]
    model, x, config, params, fwd, peft_model = _setup(factory, inputs, kw, torch.bfloat16, 1, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in peft_model.parameters())
    out, theirs = _out(fwd(params, *x)), _out(peft_model(*x))
    assert not torch.equal(out, _out(model(*x)))
    torch.testing.assert_close(out, theirs, rtol=0, atol=0)
    out.float().square().sum().backward()
    theirs.float().square().sum().backward()
    grads = {_our_key(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for key, t in _flat(params).items():
        torch.testing.assert_close(t.grad, grads[key], rtol=0.02, atol=1e-3, msg=key)


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_merge_equals_forward_and_peft_merge(name: str, factory: Any, inputs: Any, kw: dict[str, Any]) -> None:
    model, x, config, params, fwd, peft_model = _setup(factory, inputs, kw)
    merged = fwd.merge(params)
    assert all(t.grad_fn is None and not t.requires_grad for t in merged.values())
    twin = copy.deepcopy(model)
    twin.load_state_dict(merged)
    out = _out(fwd(params, *x))
    torch.testing.assert_close(_out(twin(*x)), out, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(_out(fwd(params, *x)), out.detach(), rtol=1e-12, atol=1e-12)
    theirs = peft_model.merge_and_unload().state_dict()
    assert theirs.keys() == merged.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-10, atol=1e-12, msg=key)


# case -> (the module the probe input feeds, which model input it is)
PROBES = {"linear-block_size": ("lin0", 0), "linear-coft": ("lin0", 0), "linear-block_share": ("lin0", 0),
          "conv1x1": ("c2", 1), "conv1x1-r-strided-padded": ("c2", 1), "embedding": ("emb", 0)}  # fmt: skip


@pytest.mark.parametrize("name", list(PROBES))
def test_effective_weight_runs_the_base_layer(name: str) -> None:
    from funcpeft import _layers
    from funcpeft.methods.base import build_layers

    _, factory, inputs, kw = BY_NAME[name]
    model, x, config, params, fwd, _ = _setup(factory, inputs, kw)
    modules = dict(model.named_modules())
    for path, layer in _quiet(build_layers, model, config, list(fwd.targets)).items():
        module, entry = modules[path], params[path]
        weight, bias = layer.effective_weight(module, entry)
        shape = (module.embedding_dim, module.num_embeddings) if layer.kind is _layers.Kind.EMBEDDING else None
        assert weight.shape == (shape or _layers.canonical_weight(module, layer.kind).shape)
        if path != PROBES[name][0]:
            continue
        probe = x[PROBES[name][1]]
        expected = layer.forward(module, entry, lambda m, *a, **k: m(*a, **k), probe)
        torch.testing.assert_close(_layers.run(module, layer.kind, probe, weight, bias), expected)


def test_a_fresh_adapter_is_the_base_model() -> None:
    for name in ("linear-block_size", "linear-exact-cayley", "linear-coft", "conv1x1-reflect", "embedding"):
        _, factory, inputs, kw = BY_NAME[name]
        model = factory().eval()
        params, fwd = fp.adapt(model, fp.OFTConfig(**kw))
        assert all(not t.any() for e in params.values() for t in e.values()), "PEFT's init: zeros, R = I"
        x = inputs()
        assert torch.equal(_out(fwd(params, *x)), _out(model(*x))), name
    model = tiny_llama()
    params, fwd = fp.adapt(model, fp.OFTConfig(oft_block_size=8))
    assert torch.equal(fwd(params, token_ids()).logits, model(token_ids()).logits)


@pytest.mark.parametrize(
    "name",
    ["linear-block_size", "linear-coft", "linear-block_share-r", "linear-bias_all", "linear-bias_oft_only",
     "linear-modules_to_save", "conv1x1", "embedding", "llama-embed-mlp"],
)  # fmt: skip
def test_checkpoints_both_ways(tmp_path: Path, name: str) -> None:
    _, factory, inputs, kw = BY_NAME[name]
    model, x, config, params, fwd, peft_model = _setup(factory, inputs, kw)
    before = _out(fwd(params, *x)).detach()
    copies = [t for entry in params.values() for leaf, t in entry.items() if not leaf.startswith("oft_")]
    with torch.no_grad():  # trained copies (biases, modules_to_save): a checkpoint that drops one fails below
        for t in copies:
            t.add_(0.5)
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config))
    assert not copies or not torch.allclose(_out(fwd(params, *x)), before)
    fp.save(tmp_path / "fp", params, config)
    reloaded = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(model), tmp_path / "fp").eval()
    torch.testing.assert_close(_out(reloaded(*x)), _out(fwd(params, *x)), rtol=1e-10, atol=1e-10)
    _quiet(peft_model.save_pretrained, tmp_path / "peft")
    loaded, loaded_config = fp.load(tmp_path / "peft")
    targets = loaded_config.target_modules  # PEFT saves its set of names in set order
    assert (targets is None) == (config.target_modules is None)
    assert set(targets or ()) == set(config.target_modules or ())
    assert dataclasses.replace(loaded_config, target_modules=config.target_modules) == config
    assert _flat(loaded).keys() == _flat(params).keys()
    for key, t in _flat(loaded).items():
        # PEFT's COFT projects its stored tensors in place in every forward: it saves the projected ones
        assert torch.equal(t, _flat(params)[key]) or config.coft, key
    _, fwd2 = _quiet(fp.adapt, model, loaded_config)
    torch.testing.assert_close(_out(fwd2(loaded, *x)), _out(peft_model(*x)), rtol=1e-10, atol=1e-10)


def test_coft_projection_as_peft_stores_it() -> None:
    # PEFT writes the projected tensor into its parameter in every forward; funcpeft never changes params but
    # computes with the same projected value, so loading PEFT's projected tensors changes nothing.
    _, factory, inputs, kw = BY_NAME["linear-coft-mixed"]
    model, x, config, params, fwd, peft_model = _setup(factory, inputs, kw)
    before = {k: t.detach().clone() for k, t in _flat(params).items()}
    out = _out(fwd(params, *x))
    assert all(torch.equal(t, before[k]) for k, t in _flat(params).items()), "params are never written"
    peft_model(*x)
    projected = fp.from_peft_state_dict(peft.get_peft_model_state_dict(peft_model), config)
    moved = [k for k, t in _flat(projected).items() if not torch.equal(t, before[k])]
    assert moved, "some block lies outside its ball, so PEFT changed it"
    torch.testing.assert_close(_out(fwd(projected, *x)), out, rtol=1e-12, atol=1e-12)


def test_block_size_adjustment_warns_like_peft_and_keeps_its_shapes() -> None:
    model = MLP()
    with pytest.warns(fp.FuncpeftWarning, match=r"oft_block_size=3.*'lin0'.*oft_block_size=2 \(r=5\)"):
        params, _ = fp.adapt(model, fp.OFTConfig(target_modules=["lin0"], oft_block_size=3))
    with pytest.warns(UserWarning, match=r"Adjusted `oft_block_size` to \(2\)"):
        theirs = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(target_modules=["lin0"], oft_block_size=3))
    shape = dict(theirs.named_parameters())["base_model.model.lin0.oft_R.default.weight"].shape
    assert params["lin0"]["oft_R"].shape == shape == (5, 1)
