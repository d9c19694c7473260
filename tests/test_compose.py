"""``fwd`` composes with torch.func (grad, grad_and_value, vmap, jvp), plain autograd and torch.compile."""

from __future__ import annotations

import optree
import pytest
import torch
from _models import tiny_bert, tiny_gpt2, tiny_llama, token_ids

import funcpeft as fp

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _adapt(name: str, **kw):
    model = MODELS[name]()
    config = fp.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, **kw)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(0))
    kwargs = {"use_cache": False} if name != "bert" else {}
    return model, params, fwd, kwargs


@pytest.mark.parametrize("name", list(MODELS))
def test_grad_and_value_equal_plain_autograd(name: str) -> None:
    _, params, fwd, kw = _adapt(name, use_dora=True)
    ids = token_ids()

    def loss_fn(p):
        return _logits(fwd(p, ids, **kw)).square().mean()

    grads, value = torch.func.grad_and_value(loss_fn)(params)
    loss_fn(params).backward()
    torch.testing.assert_close(value, loss_fn(params))
    for path, entry in params.items():
        for leaf_name, leaf in entry.items():
            # plain autograd leaves .grad None where the loss does not depend on a leaf (BERT's pooler)
            expected = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            torch.testing.assert_close(grads[path][leaf_name], expected, msg=f"{path}.{leaf_name}")
    only = torch.func.grad(loss_fn)(params)
    optree.tree_map(torch.testing.assert_close, only, grads)


@pytest.mark.parametrize("name", list(MODELS))
def test_vmap_over_adapters(name: str) -> None:
    _, params, fwd, kw = _adapt(name)
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(3)]
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *adapters)
    ids = token_ids()
    out = torch.func.vmap(lambda p, x: _logits(fwd(p, x, **kw)), in_dims=(0, None))(stacked, ids)
    assert out.shape[0] == 3
    for k, adapter in enumerate(adapters):
        torch.testing.assert_close(out[k], _logits(fwd(adapter, ids, **kw)), rtol=1e-5, atol=1e-5)


def test_jvp_is_the_directional_derivative() -> None:
    model = tiny_llama()
    model.set_attn_implementation("eager")  # CPU SDPA has no forward-mode AD rule
    params, fwd = fp.adapt(model, fp.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    kw = {"use_cache": False}
    ids = token_ids()
    tangent = optree.tree_map(torch.randn_like, params)

    def f(p):
        return _logits(fwd(p, ids, **kw)).sum()

    _, directional = torch.func.jvp(f, (params,), (tangent,))
    grads = torch.func.grad(f)(params)
    expected = sum(optree.tree_leaves(optree.tree_map(lambda g, t: (g * t).sum(), grads, tangent)))
    torch.testing.assert_close(directional, expected, rtol=1e-4, atol=1e-4)


class CountingBackend:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_compile_fullgraph_without_recompiles(name: str) -> None:
    torch._dynamo.reset()
    _, params, fwd, kw = _adapt(name, use_dora=name == "llama")
    ids = token_ids()
    backend = CountingBackend()
    compiled = torch.compile(fwd, fullgraph=True, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(_logits(compiled(params, ids, **kw)), _logits(fwd(params, ids, **kw)))
        assert backend.graphs == 1
        for seed in (1, 2):  # swapping in other adapters of the same shapes never recompiles
            other = fwd.init(torch.Generator().manual_seed(seed))
            other = optree.tree_map(lambda t, s=seed: (t.detach() + 0.01 * s).requires_grad_(), other)
            torch.testing.assert_close(_logits(compiled(other, ids, **kw)), _logits(fwd(other, ids, **kw)))
        assert backend.graphs == 1


def test_compiled_gradients_equal_eager() -> None:
    torch._dynamo.reset()
    _, params, fwd, kw = _adapt("gpt2")
    ids = token_ids()

    def loss_fn(p):
        return _logits(fwd(p, ids, **kw)).square().mean()

    backend = CountingBackend()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    compiled(params).backward()
    compiled_grads = {p: {n: t.grad.clone() for n, t in e.items()} for p, e in params.items()}
    for e in params.values():
        for t in e.values():
            t.grad = None
    loss_fn(params).backward()
    for path, entry in params.items():
        for leaf_name, leaf in entry.items():
            torch.testing.assert_close(compiled_grads[path][leaf_name], leaf.grad)
    assert backend.graphs == 1


def test_compiled_vmap_over_stacked_adapters_has_no_graph_breaks() -> None:
    torch._dynamo.reset()
    model = tiny_llama()
    model.set_attn_implementation("eager")  # CPU SDPA has no vmap batching rule (a fallback loop breaks the graph)
    _, fwd = fp.adapt(model, fp.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = token_ids()
    backend = CountingBackend()
    batched = torch.compile(
        torch.func.vmap(lambda p, x: fwd(p, x, use_cache=False).logits, in_dims=(0, None)), fullgraph=True,
        backend=backend,
    )  # fmt: skip
    with torch.no_grad():
        for seed in (0, 1):
            stacked = fp.stack([fwd.init(torch.Generator().manual_seed(seed + k)) for k in range(3)])
            expected = torch.stack([fwd(a, ids, use_cache=False).logits for a in fp.unstack(stacked)])
            torch.testing.assert_close(batched(stacked, ids), expected, rtol=1e-5, atol=1e-5)
    assert backend.graphs == 1


def test_inductor_matches_eager_with_and_without_gradients() -> None:
    """The default backend, compiled kernels and all (the counting backend above runs the graph eagerly)."""
    from _models import MLP

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    params, fwd = fp.adapt(model, fp.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False))
    x = torch.randn(3, 10)
    compiled = torch.compile(fwd, fullgraph=True)
    torch.testing.assert_close(compiled(params, x), fwd(params, x))
    grads = torch.autograd.grad(compiled(params, x).sum(), optree.tree_leaves(params))
    expected = torch.autograd.grad(fwd(params, x).sum(), optree.tree_leaves(params))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(compiled(params, x), fwd(params, x))


def test_vmap_dropout_masks_differ_per_adapter_with_randomness_different() -> None:
    from _models import MLP

    model = MLP().train()
    _, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["lin0", "lin1"], lora_dropout=0.5, init_lora_weights=False))
    adapter = fwd.init(torch.Generator().manual_seed(0))
    twins = fp.stack([adapter, adapter])  # the same adapter twice: only dropout can tell the outputs apart
    x = torch.randn(4, 10)
    different = torch.func.vmap(fwd, in_dims=(0, None), randomness="different")(twins, x)
    same = torch.func.vmap(fwd, in_dims=(0, None), randomness="same")(twins, x)
    assert not torch.allclose(different[0], different[1])
    torch.testing.assert_close(same[0], same[1])
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(fwd, in_dims=(0, None))(twins, x)  # torch's default refuses random ops under vmap
