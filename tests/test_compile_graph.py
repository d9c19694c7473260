"""What ``fwd.compile`` hands inductor for a LoRA layer: the floor's kernels, no more.

Inductor cannot fuse a pointwise op that sits between two GEMMs, so a scaling applied to the rank-r hidden state
(``(x A^T) * s``) is a kernel of its own per layer (48 extra kernels on a 12-layer GPT-2). Under compile the
scaling multiplies B's product instead, where it fuses into the add that follows (as PEFT orders it:
``lora_B(lora_A(x)) * scaling``), and a scaling of exactly 1 (PEFT's default ``r = lora_alpha = 8``) multiplies
nothing.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch.testing import assert_close

import funcpeft
from tests._models import MLP


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _multiplies(alpha: int, grad: bool) -> list[torch.Size]:
    """The input shapes of every multiply in the graph dynamo traces for one LoRA layer (r=2, 20 -> 20)."""
    model = MLP().eval()
    config = funcpeft.LoraConfig(r=2, lora_alpha=alpha, target_modules=["lin1"], init_lora_weights=False)
    params, fwd = funcpeft.adapt(model, config)
    graphs = []

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        graphs.append(gm)
        return gm.forward

    compiled = fwd.compile(backend=backend, fullgraph=True)
    x = torch.randn(3, 10)  # few rows: the unmerged form (no fold)
    with torch.set_grad_enabled(grad):
        assert_close(compiled(params, x), fwd(params, x))
    (graph,) = graphs
    muls = [n for n in graph.graph.nodes if n.op == "call_function" and n.target in (operator.mul, torch.mul)]
    return [n.args[0].meta["example_value"].shape for n in muls]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_scaling_of_one_multiplies_nothing(grad: bool) -> None:
    assert _multiplies(alpha=2, grad=grad) == []


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_the_scaling_multiplies_b_s_product_not_the_rank_r_hidden_state(grad: bool) -> None:
    assert _multiplies(alpha=4, grad=grad) == [torch.Size([3, 20])]  # (rows, out), never (rows, r)
