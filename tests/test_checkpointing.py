"""Activation checkpointing: layers recomputed during backward() still see the adapter (plain autograd path)."""

from __future__ import annotations

import threading

import optree
import pytest
import torch
import torch.utils.checkpoint as cp
from _models import tiny_gpt2, tiny_llama, token_ids
from torch import nn

import funcpeft as fp


def _grads(fwd, params, *args, adapter_ids=None, **kwargs) -> dict:
    leaves = optree.tree_map(lambda t: t.detach().requires_grad_(), params)
    out = fwd(leaves, *args, adapter_ids=adapter_ids, **kwargs)
    out = out.logits if hasattr(out, "logits") else out
    out.square().mean().backward()
    return optree.tree_map(lambda t: t.grad, leaves)


def _assert_same(a: dict, b: dict) -> None:
    optree.tree_map(lambda x, y: torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12), a, b)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("enable_before_adapt", [False, True], ids=["enabled-after-adapt", "enabled-before-adapt"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_transformers_gradient_checkpointing_gives_the_same_gradients(factory, reentrant, enable_before_adapt) -> None:
    model = factory().double().train()
    config = fp.LoraConfig(target_modules="all-linear", init_lora_weights=False, use_dora=True)
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    if enable_before_adapt:
        model.gradient_checkpointing_enable(**kwargs)
        model.gradient_checkpointing_disable()
    params, fwd = fp.adapt(model, config)
    ids = token_ids()
    plain = _grads(fwd, params, ids, use_cache=False)
    model.gradient_checkpointing_enable(**kwargs)
    recomputed = []
    layer = type(fwd._layers[fwd.targets[0]])
    original = layer.forward

    def spy(self, *args, **kw):
        recomputed.append(1)
        return original(self, *args, **kw)

    layer.forward = spy
    try:
        checkpointed = _grads(fwd, params, ids, use_cache=False)
    finally:
        layer.forward = original
    assert len(recomputed) > len(fwd.targets), "checkpointing must actually recompute the adapted layers"
    _assert_same(checkpointed, plain)


class Blocks(nn.Module):
    """Two MLP blocks run under torch.utils.checkpoint."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)) for _ in range(2))
        self.reentrant = reentrant
        self.checkpoint = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = cp.checkpoint(block, x, use_reentrant=self.reentrant) if self.checkpoint else block(x)
        return x


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_torch_checkpoint_in_custom_models_and_mixed_batches(reentrant: bool) -> None:
    torch.manual_seed(0)
    model = Blocks(reentrant).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=reentrant)  # reentrant needs an input with grad
    _, fwd = fp.adapt(model, fp.LoraConfig(target_modules=r"blocks\.\d\.(0|2)", init_lora_weights=False))
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(2)]
    model.checkpoint = False
    plain = _grads(fwd, adapters[0], x)
    stacked = fp.stack(adapters) if hasattr(fp, "stack") else optree.tree_map(lambda *t: torch.stack(t), *adapters)
    ids = torch.tensor([0, 1, -1, 1])
    plain_mixed = _grads(fwd, stacked, x, adapter_ids=ids)
    model.checkpoint = True
    _assert_same(_grads(fwd, adapters[0], x), plain)
    _assert_same(_grads(fwd, stacked, x, adapter_ids=ids), plain_mixed)


def test_torch_func_grad_with_checkpointing_says_which_path_to_use() -> None:
    model = tiny_llama().train()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["q_proj"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(RuntimeError, match=r"activation checkpointing.*loss\.backward\(\)"):
        torch.func.grad(lambda p: fwd(p, token_ids(), use_cache=False).logits.sum())(params)
    # and the plain autograd path it recommends works
    fwd(params, token_ids(), use_cache=False).logits.sum().backward()
    assert all(t.grad is not None for t in optree.tree_leaves(params))


def _checkpointed_setup(reentrant: bool):
    torch.manual_seed(0)
    model = Blocks(reentrant).double()
    _, fwd = fp.adapt(model, fp.LoraConfig(target_modules=r"blocks\.\d\.(0|2)", init_lora_weights=False))
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(4)]
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    model.checkpoint = False
    plain = [_grads(fwd, a, x.clone().requires_grad_(reentrant)) for a in adapters]
    model.checkpoint = True
    return model, fwd, adapters, x, plain


def _fresh(adapter):
    return optree.tree_map(lambda t: t.detach().requires_grad_(), adapter)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_backward_after_another_call_recomputes_with_its_own_adapter(reentrant: bool) -> None:
    model, fwd, adapters, x, plain = _checkpointed_setup(reentrant)
    a, b = _fresh(adapters[0]), _fresh(adapters[1])
    out_a = fwd(a, x.clone().requires_grad_(reentrant))
    out_b = fwd(b, x.clone().requires_grad_(reentrant))  # a later call with another adapter
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    _assert_same(optree.tree_map(lambda t: t.grad, a), plain[0])
    _assert_same(optree.tree_map(lambda t: t.grad, b), plain[1])


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_threads_interleaving_forward_and_backward_each_recompute_their_own_adapter(reentrant: bool) -> None:
    model, fwd, adapters, x, plain = _checkpointed_setup(reentrant)
    n = len(adapters)
    forwarded, backwarded = threading.Barrier(n), threading.Barrier(n)
    grads: list = [None] * n
    errors: list = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                leaves = _fresh(adapters[i])
                out = fwd(leaves, x.clone().requires_grad_(reentrant))
                forwarded.wait()  # every thread has run its forward before any runs backward
                out.square().mean().backward()
                backwarded.wait()
                grads[i] = optree.tree_map(lambda t: t.grad, leaves)
                _assert_same(grads[i], plain[i])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
            forwarded.abort()
            backwarded.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_one_backward_over_two_adapters_under_checkpointing_is_refused_not_guessed() -> None:
    model, fwd, adapters, x, plain = _checkpointed_setup(False)
    a, b = _fresh(adapters[0]), _fresh(adapters[1])
    loss = fwd(a, x).square().mean() + fwd(b, x).square().mean()
    with pytest.raises(RuntimeError, match="combines the outputs of fwd calls with different adapters"):
        loss.backward()
    same = _fresh(adapters[2])  # the same adapter twice in one backward is fine
    (fwd(same, x).square().mean() + fwd(same, x).square().mean()).backward()
    _assert_same(optree.tree_map(lambda t: t.grad / 2, same), plain[2])
