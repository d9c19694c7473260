"""Mixed batches: ``fwd(stacked, x, adapter_ids=ids)`` runs row ``i`` with adapter ``ids[i]`` (-1: the base)."""

from __future__ import annotations

import copy
from typing import Any

import optree
import pytest
import torch
from _models import MLP, ConvNet, EmbNet, conv_inputs, oracle, tiny_gpt2, tiny_llama, token_ids

import funcpeft as fp

IDS = torch.tensor([2, -1, 0, 1, 2])  # five rows, adapter 1 used once, the base model once


def _stack(adapters: list[fp.Params]) -> fp.Params:
    return optree.tree_map(lambda *xs: torch.stack(xs).detach().requires_grad_(), *adapters)


def _out(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.logits


def _rows(inputs: tuple[torch.Tensor, ...], n: int = 5) -> tuple[torch.Tensor, ...]:
    return tuple(t.repeat(n, *([1] * (t.dim() - 1)))[:n] for t in inputs)


def _mlp_in():
    return (torch.randn(5, 10, generator=torch.Generator().manual_seed(3)),)


def _conv_in():
    return _rows(conv_inputs(batch=1))


CASES = [
    ("linear", MLP, _mlp_in, fp.LoraConfig, {"target_modules": ["lin0", "lin1", "head"]}),
    ("linear-dora-rslora", MLP, _mlp_in, fp.LoraConfig, {"target_modules": ["lin0", "lin1"], "use_dora": True,
                                                           "use_rslora": True}),
    ("linear-lora_bias", MLP, _mlp_in, fp.LoraConfig, {"target_modules": ["lin0", "lin1"], "lora_bias": True}),
    ("embedding-dora", lambda: EmbNet(padding_idx=0), lambda: (torch.randint(0, 20, (5, 6)),), fp.LoraConfig,
     {"target_modules": ["emb", "lin"], "use_dora": True}),
    ("conv-groups", lambda: ConvNet(groups=2), _conv_in, fp.LoraConfig, {"target_modules": ["c1", "c2", "c3"], "r": 4}),
    ("conv-dora-dilated", lambda: ConvNet(stride=2, dilation=2, padding=2), _conv_in, fp.LoraConfig,
     {"target_modules": ["c1", "c2", "c3"], "use_dora": True}),
    ("ia3", MLP, _mlp_in, fp.IA3Config, {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]}),
    ("ia3-conv", ConvNet, _conv_in, fp.IA3Config, {"target_modules": ["c2", "c3"], "feedforward_modules": ["c3"]}),
    ("gpt2", tiny_gpt2, lambda: (token_ids(batch=5),), fp.LoraConfig, {"target_modules": "all-linear"}),
    ("llama-dora", tiny_llama, lambda: (token_ids(batch=5),), fp.LoraConfig,
     {"target_modules": "all-linear", "use_dora": True}),
]  # fmt: skip


def _setup(factory, inputs, config_cls, kw, train: bool = False):
    torch.manual_seed(0)
    model = factory().double()
    model.train(train)
    random = {"init_ia3_weights": False} if config_cls is fp.IA3Config else {"init_lora_weights": False}
    _, fwd = fp.adapt(model, config_cls(**kw, **random))
    g = torch.Generator().manual_seed(1)
    adapters = [
        optree.tree_map(lambda t: t.detach() + 0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype), fwd.init(g))
        for _ in range(3)
    ]
    x = tuple(t.double() if t.is_floating_point() else t for t in inputs())
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    return model, fwd, adapters, x, kwargs


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("name", "factory", "inputs", "config_cls", "kw"), CASES, ids=[c[0] for c in CASES])
def test_mixed_batch_equals_each_row_with_its_own_adapter(name, factory, inputs, config_cls, kw, train) -> None:
    model, fwd, adapters, x, kwargs = _setup(factory, inputs, config_cls, kw, train)
    out = _out(fwd(_stack(adapters), *x, adapter_ids=IDS, **kwargs))
    for i, k in enumerate(IDS.tolist()):
        row = tuple(t[i : i + 1] for t in x)
        expected = _out(fwd(adapters[k] if k >= 0 else None, *row, **kwargs))
        torch.testing.assert_close(out[i : i + 1], expected, rtol=1e-10, atol=1e-10)
        if k >= 0:
            assert not torch.allclose(out[i : i + 1], _out(model(*row, **kwargs))), "the adapter must matter"


@pytest.mark.parametrize(("name", "factory", "inputs", "config_cls", "kw"), CASES, ids=[c[0] for c in CASES])
def test_mixed_batch_gradients_equal_per_adapter_gradients(name, factory, inputs, config_cls, kw) -> None:
    model, fwd, adapters, x, kwargs = _setup(factory, inputs, config_cls, kw)
    stacked = _stack(adapters)
    weights = torch.randn(_out(fwd(None, *x, **kwargs)).shape, generator=torch.Generator().manual_seed(5)).double()
    (_out(fwd(stacked, *x, adapter_ids=IDS, **kwargs)) * weights).sum().backward()
    for k, adapter in enumerate(adapters):
        leaves = optree.tree_map(lambda t: t.detach().requires_grad_(), adapter)
        rows = [i for i, j in enumerate(IDS.tolist()) if j == k]
        sub = tuple(t[rows] for t in x)
        (_out(fwd(leaves, *sub, **kwargs)) * weights[rows]).sum().backward()
        for path, entry in leaves.items():
            for leaf, tensor in entry.items():
                torch.testing.assert_close(stacked[path][leaf].grad[k], tensor.grad, rtol=1e-9, atol=1e-11)


def test_an_adapter_no_row_uses_gets_a_zero_gradient() -> None:
    model, fwd, adapters, x, _ = _setup(*CASES[0][1:])
    stacked = _stack(adapters)
    fwd(stacked, *x, adapter_ids=torch.tensor([0, 0, -1, 2, 2])).sum().backward()
    for leaf in optree.tree_leaves(stacked):
        assert leaf.grad[1].abs().sum() == 0
        assert leaf.grad[0].abs().sum() > 0


def test_all_base_rows_equal_the_base_model() -> None:
    model, fwd, adapters, x, _ = _setup(*CASES[1][1:])
    torch.testing.assert_close(fwd(_stack(adapters), *x, adapter_ids=torch.full((5,), -1)), model(*x))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("factory", [MLP, tiny_gpt2], ids=["mlp", "gpt2"])
def test_mixed_batch_equals_peft_adapter_names(factory) -> None:
    peft = oracle("peft")
    torch.manual_seed(0)
    model = factory().double().eval()
    twin = copy.deepcopy(model)
    kw = {"target_modules": ["lin0", "lin1"]} if factory is MLP else {"target_modules": ["c_attn", "c_fc"]}
    config = fp.LoraConfig(init_lora_weights=False, **kw)
    _, fwd = fp.adapt(model, config)
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(3)]
    names = ["a", "b", "c"]
    peft_model = peft.get_peft_model(twin, peft.LoraConfig(**kw), adapter_name="a")
    for name in names[1:]:
        peft_model.add_adapter(name, peft.LoraConfig(**kw))
    for name, adapter in zip(names, adapters, strict=True):
        peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(adapter, config), adapter_name=name)
    peft_model.eval()
    x = torch.randn(5, 10, dtype=torch.float64) if factory is MLP else token_ids(batch=5)
    kwargs = {} if factory is MLP else {"use_cache": False}
    ours = _out(fwd(_stack(adapters), x, adapter_ids=IDS, **kwargs))
    theirs = _out(peft_model(x, adapter_names=[names[k] if k >= 0 else "__base__" for k in IDS.tolist()], **kwargs))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_mixed_batches_compile_once_for_any_ids_and_adapters() -> None:
    torch._dynamo.reset()
    model, fwd, adapters, x, kwargs = _setup(tiny_gpt2, lambda: (token_ids(batch=5),), fp.LoraConfig,
                                             {"target_modules": "all-linear"})  # fmt: skip
    graphs = []
    compiled = torch.compile(fwd, fullgraph=True, backend=lambda gm, ex: graphs.append(gm) or gm.forward)
    with torch.no_grad():
        for seed, ids in [(0, IDS), (1, torch.tensor([0, 0, 1, -1, 2])), (2, torch.tensor([-1, 2, 2, 2, 1]))]:
            stacked = _stack([optree.tree_map(lambda t, s=seed: t * (1 + s), a) for a in adapters])
            expected = _out(fwd(stacked, *x, adapter_ids=ids, **kwargs))
            torch.testing.assert_close(_out(compiled(stacked, *x, adapter_ids=ids, **kwargs)), expected)
    assert len(graphs) == 1


def test_bad_adapter_ids_are_rejected_clearly() -> None:
    model, fwd, adapters, x, _ = _setup(*CASES[0][1:])
    stacked = _stack(adapters)
    with pytest.raises(ValueError, match=r"leading dimension 5.*`adapter_ids` has 4 rows"):
        fwd(stacked, *x, adapter_ids=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"\[-1, 2\].*from 0 to 3"):
        fwd(stacked, *x, adapter_ids=torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        fwd(stacked, *x, adapter_ids=torch.tensor([0, -2, 2, 1, 0]))
    with pytest.raises(TypeError, match="integer"):
        fwd(stacked, *x, adapter_ids=torch.tensor([0.0, 1, 2, 1, 0]))
    with pytest.raises(TypeError, match="1-D"):
        fwd(stacked, *x, adapter_ids=[0, 1, 2, 1, 0])
    with pytest.raises(ValueError, match="stacked"):
        fwd(adapters[0], *x, adapter_ids=IDS)
    with pytest.raises(ValueError, match="funcpeft.stack"):
        fwd(None, *x, adapter_ids=IDS)
    _, with_copies = fp.adapt(model, fp.LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    copies = _stack([with_copies.init() for _ in range(2)])
    with pytest.raises(ValueError, match="head"):
        with_copies(copies, *x, adapter_ids=torch.tensor([0, 1, 0, 1, 0]))


def _poisoned(adapters: list[fp.Params]) -> list[fp.Params]:
    """Adapter 0 all nan, adapter 1 all inf (base rows gather adapter 0's slot: the leak a 0 * nan would cause)."""
    nan = optree.tree_map(lambda t: torch.full_like(t, float("nan")), adapters[0])
    inf = optree.tree_map(lambda t: torch.full_like(t, float("inf")), adapters[1])
    return [nan, inf, adapters[2]]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("name", "factory", "inputs", "config_cls", "kw"), CASES, ids=[c[0] for c in CASES])
def test_a_nonfinite_adapter_never_reaches_other_rows(name, factory, inputs, config_cls, kw, train) -> None:
    model, fwd, adapters, x, kwargs = _setup(factory, inputs, config_cls, kw, train)
    adapters = _poisoned(adapters)
    stacked = _stack(adapters)
    out = _out(fwd(stacked, *x, adapter_ids=IDS, **kwargs))
    clean = [i for i, k in enumerate(IDS.tolist()) if k in (-1, 2)]
    for i in clean:
        k = IDS[i].item()
        row = tuple(t[i : i + 1] for t in x)
        expected = _out(fwd(adapters[k] if k >= 0 else None, *row, **kwargs))
        assert torch.isfinite(out[i]).all(), f"row {i} (adapter {k}) caught another adapter's nan/inf"
        torch.testing.assert_close(out[i : i + 1], expected, rtol=1e-10, atol=1e-10)
    if train:
        return  # dropout masks differ between the two calls below
    weights = torch.randn(out[clean].shape, generator=torch.Generator().manual_seed(5)).double()
    (out[clean] * weights).sum().backward()
    alone = optree.tree_map(lambda t: t.detach().requires_grad_(), adapters[2])
    rows = [i for i in clean if IDS[i] == 2]
    picked = [j for j, i in enumerate(clean) if i in rows]
    (_out(fwd(alone, *(t[rows] for t in x), **kwargs)) * weights[picked]).sum().backward()
    for path, entry in alone.items():
        for leaf, tensor in entry.items():
            torch.testing.assert_close(stacked[path][leaf].grad[2], tensor.grad, rtol=1e-9, atol=1e-11)


def test_base_rows_input_gradients_stay_finite_next_to_a_nan_adapter() -> None:
    model, fwd, adapters, (x,), _ = _setup(*CASES[1][1:])
    stacked = _stack(_poisoned(adapters))
    x = x.clone().requires_grad_()
    ids = torch.tensor([-1, 0, -1, 1, 2])
    fwd(stacked, x, adapter_ids=ids)[[0, 2, 4]].sum().backward()
    base_x = x.detach()[[0, 2]].requires_grad_()
    model(base_x).sum().backward()
    torch.testing.assert_close(x.grad[[0, 2]], base_x.grad)
    assert torch.isfinite(x.grad[4]).all()


@pytest.mark.parametrize(("name", "factory", "inputs", "config_cls", "kw"), CASES[:8], ids=[c[0] for c in CASES[:8]])
def test_an_empty_mixed_batch_returns_the_empty_base_output(name, factory, inputs, config_cls, kw) -> None:
    model, fwd, adapters, x, kwargs = _setup(factory, inputs, config_cls, kw)
    empty = tuple(t[:0] for t in x)
    out = _out(fwd(_stack(adapters), *empty, adapter_ids=IDS[:0], **kwargs))
    assert out.shape == _out(model(*empty, **kwargs)).shape and out.shape[0] == 0
    assert _out(fwd(adapters[0], *empty, **kwargs)).shape == out.shape
