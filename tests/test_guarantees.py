"""The user's model is never modified, threads each see their own adapter, and ``params`` are independent leaves."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from _models import MLP, tiny_gpt2, token_ids
from torch import nn

import funcpeft as fp


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a user could observe about a model without running it."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "tensor_ids": [id(p) for p in model.parameters()] + [id(b) for b in model.buffers()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "repr": repr(model),
        "types": [type(m) for m in model.modules()],
        "training": [m.training for m in model.modules()],
        "dict_keys": [sorted(m.__dict__) for m in model.modules()],
        "children": [list(m._modules.items()) for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
            for m in model.modules()
        ],
        "forward_in_dict": ["forward" in m.__dict__ for m in model.modules()],
    }


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = snapshot(model)
    for key in before:
        if key == "state":
            assert before["state"].keys() == after["state"].keys()
            for name, value in before["state"].items():
                assert torch.equal(value, after["state"][name]), f"{name} changed"
        else:
            assert before[key] == after[key], f"model {key} changed"


CONFIGS = [
    fp.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False),
    fp.LoraConfig(r=4, target_modules=["lin0"], use_dora=True, bias="all", modules_to_save=["head"]),
    fp.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.2, bias="lora_only"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_model_untouched_by_adapt_calls_training_and_merge(config: fp.LoraConfig) -> None:
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 10)
    base_out = model(x).detach()
    before = snapshot(model)
    params, fwd = fp.adapt(model, config)
    assert_unchanged(before, model)
    opt = torch.optim.SGD([t for e in params.values() for t in e.values()], lr=0.1)
    for _ in range(2):
        fwd(params, x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    torch.func.grad(lambda p: fwd(p, x).sum())(params)
    fwd.merge(params)
    assert_unchanged(before, model)
    assert torch.equal(model(x), base_out)


def test_params_are_fresh_leaves_sharing_no_storage() -> None:
    model = MLP()
    params, _ = fp.adapt(model, fp.LoraConfig(target_modules=["lin0"], bias="all", modules_to_save=["head"]))
    model_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    for entry in params.values():
        for leaf in entry.values():
            assert leaf.is_leaf and leaf.requires_grad
            assert leaf.untyped_storage().data_ptr() not in model_ptrs
    # trainable copies start equal to the base values
    assert torch.equal(params["head"]["weight"], model.head.weight)
    assert torch.equal(params["lin1"]["bias"], model.lin1.bias)


def test_model_changes_after_adapt_are_seen_by_fwd() -> None:
    """The view reads the model live: mode switches, weight updates and attributes set later apply to fwd."""
    torch.manual_seed(0)
    model = MLP()
    model.drop.p = 0.5
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["lin1"], init_lora_weights=False, lora_dropout=0.5))
    x = torch.randn(8, 10)
    model.eval()
    assert torch.equal(fwd(params, x), fwd(params, x))
    model.train()
    assert not torch.equal(fwd(params, x), fwd(params, x)), "dropout must follow model.train()"
    model.eval()
    with torch.no_grad():
        model.lin1.weight.mul_(2)
        model.lin0.weight.mul_(2)
    reference = fp.adapt(model, fp.LoraConfig(target_modules=["lin1"]))[1]
    assert torch.equal(fwd(params, x), reference(params, x))


def test_threads_each_see_their_own_adapter() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    _, fwd = fp.adapt(model, fp.LoraConfig(r=4, target_modules=["lin0", "lin1", "head"], init_lora_weights=False))
    adapters = [fwd.init(torch.Generator().manual_seed(i)) for i in range(4)]
    x = torch.randn(16, 10)
    expected = [fwd(a, x).detach() for a in adapters] + [model(x).detach()]
    barrier = threading.Barrier(5)
    failures: list[str] = []

    def worker(k: int) -> None:
        barrier.wait()
        for _ in range(200):
            out = fwd(adapters[k], x) if k < 4 else model(x)
            if not torch.equal(out, expected[k]):
                failures.append(f"thread {k} got another adapter's output")
                return

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


class Pausing(nn.Module):
    """Blocks inside its forward until released, to observe the model while a ``fwd`` call is in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.pause = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.pause and threading.current_thread() is not threading.main_thread():
            self.entered.set()
            self.release.wait(timeout=10)
        return self.head(h)


def test_model_is_the_base_model_while_fwd_runs_in_another_thread() -> None:
    torch.manual_seed(0)
    model = Pausing()
    params, fwd = fp.adapt(
        model, fp.LoraConfig(target_modules=["lin", "head"], init_lora_weights=False, modules_to_save=None)
    )
    x = torch.randn(3, 6)
    base = model(x).detach()
    adapted = fwd(params, x).detach()
    before = snapshot(model)
    model.pause = True
    result: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: result.append(fwd(params, x)))
    thread.start()
    assert model.entered.wait(timeout=10)
    # fwd is suspended mid-forward in the other thread: the model, seen from here, is untouched
    assert torch.equal(model(x), base)
    assert torch.equal(fwd(None, x), base)
    model.release.set()
    thread.join()
    model.pause = False
    assert torch.equal(result[0], adapted)
    assert_unchanged(before, model)


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, explode: bool = False) -> torch.Tensor:
        h = self.lin(x)
        if explode:
            raise RuntimeError("boom")
        return self.head(h)


def test_a_call_that_raises_leaves_nothing_behind() -> None:
    torch.manual_seed(0)
    model = Exploding()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["lin", "head"], init_lora_weights=False, bias="all"))
    x = torch.randn(2, 4)
    base, adapted = model(x).detach(), fwd(params, x).detach()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        fwd(params, x, explode=True)
    assert_unchanged(before, model)
    assert torch.equal(fwd(None, x), base), "the adapter must not stay bound after an exception"
    assert torch.equal(fwd(params, x), adapted)


def test_two_adapts_of_one_model_are_independent() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    p1, f1 = fp.adapt(model, fp.LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False))
    x = torch.randn(3, 10)
    out1 = f1(p1, x).detach()
    p2, f2 = fp.adapt(model, fp.LoraConfig(r=4, target_modules=["lin1", "head"], init_lora_weights=False))
    assert torch.equal(f1(p1, x), out1)
    assert not torch.equal(f2(p2, x), out1)
    assert torch.equal(f2(None, x), model(x))
    # an adapter of one fwd is meaningless to the other: a clear error, not silence
    with pytest.raises(ValueError, match="lin0"):
        f2(p1, x)


def test_fwd_attributes_and_init() -> None:
    model = tiny_gpt2()
    config = fp.LoraConfig(r=4, target_modules=["c_attn"])
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(3))
    assert fwd.config is config and fwd.model is model
    assert fwd.targets == ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn")
    assert list(params) == list(fwd.targets)
    again = fwd.init(torch.Generator().manual_seed(3))
    other = fwd.init(torch.Generator().manual_seed(4))
    for path in params:
        assert torch.equal(params[path]["lora_A"], again[path]["lora_A"])
        assert not torch.equal(params[path]["lora_A"], other[path]["lora_A"])
        assert params[path]["lora_A"].shape == (4, 32) and params[path]["lora_B"].shape == (96, 4)
    ids = token_ids()
    torch.testing.assert_close(fwd(params, ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bad_params_are_rejected_clearly() -> None:
    model = MLP()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["lin0"]))
    x = torch.randn(2, 10)
    with pytest.raises(TypeError, match="params"):
        fwd([params], x)
    with pytest.raises(ValueError, match="nope"):
        fwd({**params, "nope": {}}, x)
    with pytest.raises(ValueError, match=r"'lin0'.*lora_A.*\(8, 12\).*\(8, 10\)"):
        fwd({"lin0": {**params["lin0"], "lora_A": torch.zeros(8, 12)}}, x)
    with pytest.raises(ValueError, match="lin0"):
        fwd({"lin0": {"lora_A": params["lin0"]["lora_A"]}}, x)
    with pytest.raises(ValueError, match="lin0"):
        fwd({}, x)
    with pytest.raises(TypeError, match="generator"):
        fwd.init(generator=0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fp.adapt(lambda x: x, fp.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(TypeError, match="LoraConfig"):
        fp.adapt(model, {"r": 8})


@pytest.mark.parametrize("shape", [(4, 10), (2, 3, 10)])
def test_adapted_linear_output_is_not_a_view_with_gradients(shape) -> None:
    """FSDP2 skips the pre-backward all-gather of a block whose output is a view (then an in-place residual on it
    fails in backward); the adapted layer's output is a fresh tensor, as nn.Linear's on 2-D inputs."""
    from _models import MLP

    model = MLP()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["lin0", "lin1", "head"], init_lora_weights=False))
    x = torch.randn(*shape)
    out = fwd(params, x)
    assert not out._is_view()
    expected = model(x) + 0
    out_of_place = fwd(params, x) + x.sum(-1, keepdim=True)
    out += x.sum(-1, keepdim=True)
    torch.testing.assert_close(out, out_of_place)
    assert not torch.allclose(out, expected + x.sum(-1, keepdim=True))
