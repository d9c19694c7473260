"""OFT with many adapters and torch.func: mixed batches and vmap equal a loop over adapters, gradients through
both, torch.func.grad equal to autograd, torch.compile(fullgraph=True), and a non-finite adapter kept in its rows."""

from __future__ import annotations

import warnings
from typing import Any

import optree
import pytest
import torch
from _models import MLP, ConvNet, EmbNet, conv_inputs, tiny_llama, token_ids
from torch import nn

import funcpeft as fp


def _out(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.logits


def _mlp_in() -> tuple[torch.Tensor, ...]:
    return (torch.randn(5, 10, generator=torch.Generator().manual_seed(5)),)


def _emb_in() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 20, (5, 6), generator=torch.Generator().manual_seed(5)),)


LIN = {"target_modules": ["lin0", "lin1"], "oft_block_size": 5}
# (name, model factory, inputs (batch of 5), OFT kwargs)
CASES: list[tuple[str, Any, Any, dict[str, Any]]] = [
    ("linear", MLP, _mlp_in, LIN),
    ("linear-coft-exact", MLP, _mlp_in, {**LIN, "coft": True, "eps": 0.9, "use_cayley_neumann": False}),
    ("linear-block_share", MLP, _mlp_in, {**LIN, "block_share": True}),
    ("conv1x1", lambda: ConvNet(kernel_size=1, padding=0), lambda: conv_inputs(batch=5),
     {"target_modules": ["c2"], "oft_block_size": 2}),
    ("conv3x3-strided", lambda: ConvNet(stride=2), lambda: conv_inputs(batch=5),
     {"target_modules": ["c2"], "oft_block_size": 4}),
    ("conv3x3-reflect-share", lambda: ConvNet(padding_mode="reflect"), lambda: conv_inputs(batch=5),
     {"target_modules": ["c2", "head"], "r": 3, "oft_block_size": 0, "block_share": True}),
    ("embedding", lambda: EmbNet(padding_idx=0), _emb_in, {"target_modules": ["emb", "lin"], "oft_block_size": 4}),
    ("llama", tiny_llama, lambda: (token_ids(batch=5),), {"oft_block_size": 8, "coft": True, "eps": 0.5}),
]  # fmt: skip
IDS = torch.tensor([2, -1, 0, 1, 2])


def _build(factory: Any, inputs: Any, kw: dict[str, Any]):
    torch.manual_seed(0)
    model = factory().double().eval()
    x = tuple(t.double() if t.is_floating_point() else t for t in inputs())
    _, fwd = fp.adapt(model, fp.OFTConfig(init_weights=False, **kw))
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(3)]
    return model, x, fwd, adapters


def _rows(x: tuple[torch.Tensor, ...], i: int) -> tuple[torch.Tensor, ...]:
    return tuple(t[i : i + 1] for t in x)


def _call(fwd: Any, params: Any, x: tuple[torch.Tensor, ...], **kw: Any) -> torch.Tensor:
    extra = {"use_cache": False} if hasattr(fwd.model, "generate") else {}  # vmap cannot return a cache
    return _out(fwd(params, *x, **kw, **extra))


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_mixed_batch_equals_a_loop_with_gradients(name: str, factory: Any, inputs: Any, kw: dict[str, Any]) -> None:
    model, x, fwd, adapters = _build(factory, inputs, kw)
    stacked = fp.stack(adapters)
    out = _call(fwd, stacked, x, adapter_ids=IDS)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weights).sum().backward()
    for i, k in enumerate(IDS.tolist()):
        row = _call(fwd, None if k < 0 else adapters[k], _rows(x, i))
        torch.testing.assert_close(out[i : i + 1], row, rtol=1e-10, atol=1e-10)
        if k >= 0:
            (row * weights[i : i + 1]).sum().backward()
    for path, entry in stacked.items():
        for leaf, t in entry.items():
            expected = torch.stack([a[path][leaf].grad for a in adapters])
            torch.testing.assert_close(t.grad, expected, rtol=1e-9, atol=1e-12, msg=f"{path}.{leaf}")


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_vmap_over_stacked_adapters_equals_a_loop(name: str, factory: Any, inputs: Any, kw: dict[str, Any],
                                                  grad: bool) -> None:  # fmt: skip
    model, x, fwd, adapters = _build(factory, inputs, kw)
    with torch.set_grad_enabled(grad):
        out = torch.func.vmap(lambda p: _call(fwd, p, x))(fp.stack(adapters))
        for k, adapter in enumerate(adapters):
            torch.testing.assert_close(out[k], _call(fwd, adapter, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["linear-coft-exact", "conv3x3-strided", "embedding", "llama"])
def test_func_grad_equals_autograd(name: str) -> None:
    _, factory, inputs, kw = next(c for c in CASES if c[0] == name)
    model, x, fwd, adapters = _build(factory, inputs, kw)

    def loss(p: fp.Params) -> torch.Tensor:
        return _call(fwd, p, x).square().mean()

    grads = torch.func.grad(loss)(adapters[1])
    loss(adapters[1]).backward()
    for path, entry in grads.items():
        for leaf, g in entry.items():
            assert g.abs().sum() > 0
            torch.testing.assert_close(g, adapters[1][path][leaf].grad, rtol=1e-9, atol=1e-12)
    per_sample = torch.func.vmap(torch.func.grad(loss))(fp.stack(adapters[1:]))
    for path, entry in per_sample.items():
        for leaf, g in entry.items():
            torch.testing.assert_close(g[0], adapters[1][path][leaf].grad, rtol=1e-9, atol=1e-12)


COMPILED = [
    ("conv3x3-linear-coft", ConvNet, lambda: conv_inputs(batch=3),
     {"target_modules": ["c2", "head"], "oft_block_size": 4, "coft": True, "eps": 0.5}),
    ("conv1x1-exact", lambda: ConvNet(kernel_size=1, padding=0), lambda: conv_inputs(batch=3),
     {"target_modules": ["c2"], "oft_block_size": 2, "use_cayley_neumann": False}),
    ("embedding-share", EmbNet, lambda: _emb_in()[0][:3],
     {"target_modules": ["emb", "lin"], "oft_block_size": 4, "block_share": True}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), COMPILED, ids=[c[0] for c in COMPILED])
def test_compile_fullgraph_one_graph_for_new_adapters(name: str, factory: Any, inputs: Any, kw: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    params, fwd = fp.adapt(model, fp.OFTConfig(init_weights=False, **kw), generator=torch.Generator().manual_seed(1))
    x = inputs()
    x = x if isinstance(x, tuple) else (x,)
    graphs = {"n": 0}

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs["n"] += 1
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fwd, fullgraph=True, backend=backend)
    other = optree.tree_map(lambda t: (t.detach() * 1.5).requires_grad_(), params)
    out = compiled(params, *x)
    torch.testing.assert_close(out, fwd(params, *x))
    out.sum().backward()
    assert all(t.grad.abs().sum() > 0 for e in params.values() for t in e.values())
    torch.testing.assert_close(compiled(other, *x), fwd(other, *x))
    assert graphs["n"] == 1
    backend = "inductor" if name.startswith("conv3x3") else "aot_eager"  # inductor once: it compiles slowly
    mixed = torch.compile(lambda p, *a: fwd(p, *a, adapter_ids=torch.tensor([1, -1, 0])), fullgraph=True,
                          backend=backend)  # fmt: skip
    torch.testing.assert_close(
        mixed(fp.stack([params, other]), *x), fwd(fp.stack([params, other]), *x, adapter_ids=torch.tensor([1, -1, 0]))
    )


@pytest.mark.parametrize("name", ["linear", "linear-coft-exact", "conv1x1", "conv3x3-strided", "embedding"])
def test_a_non_finite_adapter_stays_in_its_rows(name: str) -> None:
    _, factory, inputs, kw = next(c for c in CASES if c[0] == name)
    model, x, fwd, adapters = _build(factory, inputs, kw)
    bad = optree.tree_map(lambda t: torch.full_like(t.detach(), float("nan")).requires_grad_(), adapters[2])
    stacked = fp.stack([adapters[0], adapters[1], bad])
    out = _call(fwd, stacked, x, adapter_ids=IDS)
    poisoned = IDS == 2
    assert out[poisoned].isnan().all(), "a NaN adapter gives NaN, never a silently repaired output"
    assert out[~poisoned].isfinite().all()
    out[~poisoned].sum().backward()
    clean = fp.stack(adapters)  # the same batch with a finite third adapter: the others' gradients are unchanged
    _call(fwd, clean, x, adapter_ids=IDS)[~poisoned].sum().backward()
    for path, entry in stacked.items():
        for leaf, t in entry.items():
            assert t.grad[:2].abs().sum() > 0
            torch.testing.assert_close(t.grad[:2], clean[path][leaf].grad[:2], rtol=1e-12, atol=1e-14)
    assert _call(fwd, bad, x).isnan().all()
    with torch.no_grad():
        merged = fwd.merge(bad)
    assert any(v.isnan().any() for v in merged.values())


def test_sparse_gradients_in_mixed_batches() -> None:
    model, x, fwd, adapters = _build(MLP, _mlp_in, LIN)
    stacked = fp.stack(adapters)
    out = fwd(stacked, *x, adapter_ids=torch.tensor([0, 0, -1, 2, 2]), sparse_grad=True)
    out.sum().backward()
    grad = stacked["lin0"]["oft_R"].grad
    assert grad.is_sparse and sorted(grad.coalesce().indices()[0].tolist()) == [0, 2]
    dense = fp.stack(adapters)
    fwd(dense, *x, adapter_ids=torch.tensor([0, 0, -1, 2, 2])).sum().backward()
    torch.testing.assert_close(grad.to_dense(), dense["lin0"]["oft_R"].grad)


class _Deep(nn.Module):
    """An adapted Linear on 3-D inputs (batch, tokens, features), as in transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_mixed_batch_on_token_inputs_and_generate_style_repeats() -> None:
    torch.manual_seed(0)
    model = _Deep().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, fwd = fp.adapt(model, fp.OFTConfig(target_modules=["proj"], r=2, oft_block_size=0, init_weights=False))
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(2)]
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    ids = torch.tensor([1, 0, -1])
    out = fwd(fp.stack(adapters), x, adapter_ids=ids)
    for i, k in enumerate(ids.tolist()):
        torch.testing.assert_close(out[i], fwd(None if k < 0 else adapters[k], x[i]), rtol=1e-12, atol=1e-12)


def test_mixed_batches_refuse_trained_bias_copies() -> None:
    _, fwd = fp.adapt(MLP(), fp.OFTConfig(**LIN, bias="oft_only"))
    with pytest.raises(ValueError, match=r"full copies of \['lin0', 'lin1'\]"):
        fwd(fp.stack([fwd.init(), fwd.init()]), torch.randn(2, 10), adapter_ids=torch.tensor([0, 1]))


def test_generate_with_a_mixed_batch_and_beams_equals_each_prompt_alone() -> None:
    model = tiny_llama()
    config = fp.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_weights=False)
    _, fwd = fp.adapt(model, config)
    adapters = [optree.tree_map(lambda t: (5 * t.detach()).requires_grad_(), fwd.init(torch.Generator().manual_seed(s)))
                for s in range(2)]  # fmt: skip
    prompts, ids = token_ids(batch=3, length=5), torch.tensor([1, -1, 0])
    kw = {"max_new_tokens": 6, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    out = fwd.generate(fp.stack(adapters), prompts, adapter_ids=ids, **kw)
    for i, k in enumerate(ids.tolist()):
        alone = fwd.generate(None if k < 0 else adapters[k], prompts[i : i + 1], **kw)[0]
        assert torch.equal(out[i, : alone.shape[0]], alone) and not out[i, alone.shape[0] :].any()  # 0-padded
    bound = fwd.bind(adapters[0])
    assert torch.equal(bound(prompts).logits, fwd(adapters[0], prompts).logits)
    assert [id(p) for p in bound.parameters()] == [id(t) for t in optree.tree_leaves(adapters[0])]


def test_compile_fullgraph_on_llama() -> None:
    model = tiny_llama()
    config = fp.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj", "embed_tokens", "down_proj"],
                          init_weights=False)  # fmt: skip
    params, fwd = fp.adapt(model, config)
    graphs = {"n": 0}

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs["n"] += 1
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fwd, fullgraph=True, backend=backend)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(compiled(params, ids).logits, fwd(params, ids).logits)
        compiled(fwd.init(torch.Generator().manual_seed(3)), ids)
    assert graphs["n"] == 1
