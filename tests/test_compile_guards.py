"""``fwd.compile()``'s guards: funcpeft's own immutable structure is not guarded, everything a user can change is.

Dynamo guards every Python value a trace reads; ``fwd.compile`` drops those on the closures ``adapt`` made (the
view's forwards and flag properties, the layers' hyper-parameters) and keeps the guards on the model (its flags,
read live), the inputs and every tensor. These tests pin both halves: a flag changed on a submodule after
compiling recompiles and is obeyed, the count of kept guards has none on funcpeft's closures, and a caller's own
``guard_filter_fn`` still applies.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import funcpeft
from funcpeft._compile import guard_filter
from funcpeft.methods.lora import LoraLayer
from tests._models import MLP, tiny_gpt2, token_ids


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Block(nn.Module):
    """Reads its own ``training`` flag (not through a child): in the view, a flag read live from the model."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(self.lin(x), 0.5, self.training)


class Dropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_a_submodule_flag_changed_after_compiling_is_obeyed() -> None:
    """The kind of call follows ``model.training``; a submodule's own flag is one of the guards that must stay."""
    model = Dropped().eval()
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(r=2, target_modules=["block.lin"], init_lora_weights=False))
    compiled = fwd.compile(backend="eager", fullgraph=True)
    x = torch.randn(64, 6)
    with torch.no_grad():
        assert_close(compiled(params, x), fwd(params, x))
        model.block.train()  # only the block (a viewed module): the top-level mode, the kind of call, is unchanged
        out = compiled(params, x)
        assert (out == 0).any(), "dropout in train mode must drop activations in the compiled call"
        model.block.eval()
        assert_close(compiled(params, x), fwd(params, x))


def test_no_kept_guard_is_on_funcpeft_closures_and_model_guards_stay() -> None:
    model = tiny_gpt2().eval()
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(r=2, target_modules=["c_attn", "c_proj"]))
    kept: list[str] = []
    seen: list[str] = []
    layers: set[str] = set()  # the closures that hold an adapted layer: the view's intercepting forwards

    def record(entries):
        seen.extend(e.name for e in entries)
        layers.update(e.name.rpartition(".__closure__")[0] for e in entries if isinstance(e.value, LoraLayer))
        decisions = guard_filter(entries)
        kept.extend(e.name for e, keep in zip(entries, decisions, strict=True) if keep)
        return [True] * len(entries)  # funcpeft's own filter still runs (composed) and decides

    compiled = fwd.compile(backend="eager", fullgraph=True, options={"guard_filter_fn": record})
    x = token_ids(1, 8)
    with torch.no_grad():
        assert_close(compiled(params, x, use_cache=False).logits, fwd(params, x, use_cache=False).logits)
    assert len(layers) == len(fwd.targets), "every adapted layer's closure is read (or the test proves nothing)"
    assert not [n for n in kept if n.startswith(tuple(f"{root}.__closure__" for root in layers))]
    # what a user can change keeps its guards: a flag of the model read live through the view, and the closures of
    # the model's own decorated forwards (transformers' wrappers)
    assert any(n.endswith("__dict__['_funcpeft_original'].training") for n in kept)
    assert any(".__dict__)['forward'].__closure__" in n for n in kept)
    assert len(kept) < len(seen)


def test_a_callers_guard_filter_still_applies() -> None:
    model = MLP().eval()
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(r=2, target_modules=["lin0"]))
    calls = []

    def drop_nothing(entries):
        calls.append(len(entries))
        return [True] * len(entries)

    compiled = fwd.compile(backend="eager", options={"guard_filter_fn": drop_nothing})
    x = torch.randn(3, 10)
    with torch.no_grad():
        assert_close(compiled(params, x), fwd(params, x))
    assert calls and calls[0] > 0


def test_every_kind_of_call_keeps_both_guard_filters() -> None:
    """torch.compile pops ``guard_filter_fn`` out of the options dict it is given: each kind of call's compile must
    get its own, or every kind compiled after the first runs without funcpeft's filter and the caller's."""
    model = tiny_gpt2().eval()
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(r=2, target_modules=["c_attn", "c_proj"]))
    calls: list[int] = []
    kept: list[int] = []

    def record(entries):
        calls.append(len(entries))
        kept.append(sum(guard_filter(entries)))
        return [True] * len(entries)

    compiled = fwd.compile(backend="eager", fullgraph=True, options={"guard_filter_fn": record})
    x = token_ids(1, 8)
    with torch.no_grad():
        compiled(params, x, use_cache=False)  # kind 1: an adapter, no grad
        compiled(None, x, use_cache=False)  # kind 2: the base
    with torch.enable_grad():
        out = compiled(params, x, use_cache=False).logits  # kind 3: an adapter, with gradients
    assert_close(out, fwd(params, x, use_cache=False).logits)
    assert len(calls) == 3, f"the caller's guard_filter_fn must run for every kind compiled, ran {len(calls)} times"
    # `record` runs only inside the filter composed with funcpeft's, and every kind's trace has guards on
    # funcpeft's closures for that filter to drop
    assert all(k < c for k, c in zip(kept, calls, strict=True))
    assert len(compiled._compiled) == 3


def test_guard_filter_keeps_everything_without_funcpeft_values() -> None:
    class Entry:
        def __init__(self, name: str, value: object, guard_type: str = "CONSTANT_MATCH") -> None:
            self.name, self.value, self.has_value, self.guard_type = name, value, True, guard_type

    def user_closure():
        return None

    entries = [
        Entry("L['f'].__closure__[0].cell_contents", 3),
        Entry("L['f'].__closure__[0].cell_contents.x", 1.0),
        Entry("G['user'].forward", user_closure),
    ]
    assert guard_filter(entries) == [True, True, True]
