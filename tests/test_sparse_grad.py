"""``fwd(stacked, x, adapter_ids=ids, sparse_grad=True)``: gradients hold only the adapters the rows use."""

from __future__ import annotations

import pytest
import torch
from _models import MLP, ConvNet, EmbNet, conv_inputs, tiny_gpt2, token_ids

import funcpeft as fp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::funcpeft.FuncpeftWarning")

K = 6
IDS = torch.tensor([4, -1, 1, 4, 1])  # adapters 1 and 4 used, the base once


def _inputs(factory):
    if factory is MLP:
        return (torch.randn(len(IDS), 10),)
    if factory is EmbNet:
        return (torch.randint(0, 20, (len(IDS), 6)),)
    if factory is ConvNet:
        return tuple(t.repeat(len(IDS), *([1] * (t.dim() - 1))) for t in conv_inputs(batch=1))
    return (token_ids(batch=len(IDS)),)


CASES = {
    "lora": (MLP, fp.LoraConfig, {"target_modules": ["lin0", "lin1"]}),
    "dora": (MLP, fp.LoraConfig, {"target_modules": ["lin0", "head"], "use_dora": True}),
    "lora_bias": (MLP, fp.LoraConfig, {"target_modules": ["lin0", "head"], "lora_bias": True}),
    "embedding-dora": (EmbNet, fp.LoraConfig, {"target_modules": ["emb", "lin"], "use_dora": True}),
    "conv": (ConvNet, fp.LoraConfig, {"target_modules": ["c1", "c2", "c3"]}),
    "ia3": (MLP, fp.IA3Config, {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]}),
    "adalora": (MLP, fp.AdaLoraConfig, {"target_modules": ["lin0", "lin1"], "total_step": 10}),
    "gpt2": (tiny_gpt2, fp.LoraConfig, {"target_modules": ["c_attn", "c_fc"]}),
}


def _stacked(factory, config_cls, kw):
    torch.manual_seed(0)
    model = factory()
    config = config_cls(**kw, **({"init_ia3_weights": False} if config_cls is fp.IA3Config else {}))
    if config_cls is not fp.IA3Config:
        config = config_cls(**kw, init_lora_weights=False)
    _, fwd = fp.adapt(model, config)
    return model, fwd, fp.stack([fwd.init(torch.Generator().manual_seed(s)) for s in range(K)])


def _grads(fwd, stacked, x, sparse):
    out = fwd(stacked, *x, adapter_ids=IDS, sparse_grad=sparse)
    out = out if isinstance(out, torch.Tensor) else out.logits
    leaves = [t for e in stacked.values() for t in e.values()]
    return torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), leaves)


@pytest.mark.parametrize("case", list(CASES))
def test_sparse_gradients_equal_the_dense_ones_and_hold_only_used_adapters(case) -> None:
    model, fwd, stacked = _stacked(*CASES[case])
    x = _inputs(CASES[case][0])
    dense, sparse = _grads(fwd, stacked, x, False), _grads(fwd, stacked, x, True)
    used = IDS[IDS >= 0].unique()
    n_sparse = 0
    for d, s in zip(dense, sparse, strict=True):
        if s.is_sparse:
            n_sparse += 1
            assert torch.equal(s._indices().flatten().unique(), used)  # only the adapters the rows use
        torch.testing.assert_close(s.to_dense(), d, rtol=1e-6, atol=1e-7)
    assert n_sparse >= len(dense) // 2  # every gathered tensor (DoRA magnitudes may stay dense: tiny)


def test_heterogeneous_stack_sparse_gradients_equal_dense() -> None:
    model = MLP()
    configs = [
        fp.LoraConfig(r=r, target_modules=t, init_lora_weights=False, use_dora=d, lora_bias=b)
        for r, t, d, b in [(2, ["lin0"], False, False), (4, ["lin0", "lin1"], True, False), (8, ["lin1"], True, False),
                           (3, ["head", "lin0"], False, True), (5, ["lin1"], False, False), (6, ["lin0"], False, False)]
    ]  # fmt: skip
    stacked, fwd = fp.adapt(model, configs)
    x = _inputs(MLP)
    for d, s in zip(_grads(fwd, stacked, x, False), _grads(fwd, stacked, x, True), strict=True):
        torch.testing.assert_close(s.to_dense(), d, rtol=1e-6, atol=1e-7)


def test_a_sparse_step_updates_only_the_used_adapters() -> None:
    model, fwd, stacked = _stacked(*CASES["lora"])
    before = {p: {n: t.detach().clone() for n, t in e.items()} for p, e in stacked.items()}
    leaves = [t for e in stacked.values() for t in e.values()]
    for optimizer in (torch.optim.SparseAdam(leaves, lr=1e-2), torch.optim.SGD(leaves, lr=1e-2, momentum=0.9)):
        for _ in range(2):
            optimizer.zero_grad()
            fwd(stacked, *_inputs(MLP), adapter_ids=IDS, sparse_grad=True).pow(2).sum().backward()
            assert all(t.grad.is_sparse for t in leaves)
            optimizer.step()
    for path, entry in stacked.items():
        for name, t in entry.items():
            for k in range(K):
                assert torch.equal(t[k], before[path][name][k]) == (k not in (1, 4))


def test_sparse_grad_misuse_is_refused_clearly() -> None:
    model, fwd, stacked = _stacked(*CASES["lora"])
    x = _inputs(MLP)
    with pytest.raises(ValueError, match=r"pass `adapter_ids` too"):
        fwd(fwd.init(), *x, sparse_grad=True)
    with pytest.raises(TypeError, match=r"`sparse_grad` must be True or False, got 'yes'"):
        fwd(stacked, *x, adapter_ids=IDS, sparse_grad="yes")
    with pytest.raises(ValueError, match=r"torch.func transforms"):
        torch.func.grad(lambda p: fwd(p, *x, adapter_ids=IDS, sparse_grad=True).sum())(stacked)
    with pytest.raises(Exception, match=r"does not compose with torch.compile"):
        torch.compile(fwd, backend="eager", fullgraph=True)(stacked, *x, adapter_ids=IDS, sparse_grad=True)
    # without fullgraph, Dynamo runs the call eagerly: the same sparse gradient
    out = torch.compile(fwd, backend="eager")(stacked, *x, adapter_ids=IDS, sparse_grad=True)
    leaves = [t for e in stacked.values() for t in e.values()]
    assert all(g.is_sparse for g in torch.autograd.grad(out.sum(), leaves))
    with torch.no_grad():  # without gradients it is just a mixed batch
        torch.testing.assert_close(
            fwd(stacked, *x, adapter_ids=IDS, sparse_grad=True), fwd(stacked, *x, adapter_ids=IDS)
        )


def test_funcpeft_optim_refuses_sparse_gradients_by_name() -> None:
    model, fwd, stacked = _stacked(*CASES["lora"])
    values = iter(_grads(fwd, stacked, _inputs(MLP), True))
    grads = {p: {n: next(values) for n in e} for p, e in stacked.items()}
    optimizer = fp.optim.adamw(1e-3)
    with pytest.raises(TypeError, match=r"lin0.lora_A is a torch.sparse_coo tensor; funcpeft.optim"):
        optimizer.update(grads, optimizer.init(stacked), stacked)
