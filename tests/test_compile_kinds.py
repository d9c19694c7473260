"""``fwd.compile()``: one compiled ``fwd`` for the base, adapters, mixed batches, train/eval, grad on and off and
changing batch and sequence sizes (calls with ``base=`` run eagerly), past torch's recompile limit, each event
compiling what the README says it compiles (counted with dynamo's graph counter), every result equal to eager.

The ``eager`` backend keeps the test fast: dynamo's tracing, guards and caches are the same as with inductor
(``tests/test_contract.py`` compiles with inductor).
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from torch.testing import assert_close

import funcpeft
from tests._models import tiny_gpt2

VOCAB = 100


@pytest.fixture
def setup():
    torch._dynamo.reset()
    model = tiny_gpt2(vocab=VOCAB).eval().requires_grad_(False)
    config = funcpeft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    params, fwd = funcpeft.adapt(model, config, generator=torch.Generator().manual_seed(0))
    other = fwd.init(generator=torch.Generator().manual_seed(1))
    yield model, params, fwd, funcpeft.stack([params, other])
    torch._dynamo.reset()


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_every_kind_of_call_compiles_once_and_equals_eager(setup) -> None:
    model, params, fwd, stacked = setup
    compiled = fwd.compile(fullgraph=True, backend="eager")
    state = model.state_dict()

    def logits(p, x, **kw):
        return compiled(p, x, use_cache=False, **kw).logits

    def eager(p, x, **kw):
        return fwd(p, x, use_cache=False, **kw).logits

    def event(expected_new_graphs: int, call) -> None:
        before = graphs()
        call()
        assert graphs() - before == expected_new_graphs

    x = ids(2, 8)
    mixed = torch.tensor([1, -1])
    with torch.no_grad():
        event(1, lambda: assert_close(logits(None, x), eager(None, x)))  # the base model
        event(1, lambda: assert_close(logits(params, x), eager(params, x)))  # an adapter
        event(1, lambda: assert_close(logits(stacked, x, adapter_ids=mixed), eager(stacked, x, adapter_ids=mixed)))
        event(0, lambda: assert_close(logits(params, x, base=state), eager(params, x)))  # base=: runs eagerly
        event(1, lambda: logits(params, ids(4, 8)))  # a new batch size: compiled again with the batch dynamic
        event(0, lambda: assert_close(logits(params, ids(7, 8)), eager(params, ids(7, 8))))  # then served
        event(1, lambda: logits(params, ids(4, 12)))  # a new length: compiled again with the length dynamic
        # fewer rows than a layer's fold threshold (inference folds B A into the weight from there): the other
        # branch, compiled once, then served for every size on that side
        event(1, lambda: assert_close(logits(params, ids(3, 5)), eager(params, ids(3, 5))))
        event(0, lambda: assert_close(logits(params, ids(2, 7)), eager(params, ids(2, 7))))
        event(1, lambda: logits(stacked, ids(5, 8), adapter_ids=torch.zeros(5, dtype=torch.long)))  # the same, mixed
        event(1, lambda: logits(stacked, ids(6, 11), adapter_ids=torch.ones(6, dtype=torch.long)))
        rows = torch.tensor([0, -1, 1])
        event(
            0,
            lambda: assert_close(
                logits(stacked, ids(3, 7), adapter_ids=rows), eager(stacked, ids(3, 7), adapter_ids=rows)
            ),
        )
        event(0, lambda: logits(params, x))  # nothing seen before compiles again
        event(0, lambda: logits(None, x))
    # Gradients on: each kind once more (grad mode is part of every guard); then training mode.
    leaves = {p: {k: v.detach().requires_grad_() for k, v in e.items()} for p, e in params.items()}
    event(1, lambda: logits(leaves, x).sum().backward())
    want = torch.autograd.grad(eager(leaves, x).sum(), leaves["transformer.h.0.attn.c_attn"]["lora_B"])[0]
    assert_close(leaves["transformer.h.0.attn.c_attn"]["lora_B"].grad, want)
    model.train()
    try:
        event(1, lambda: logits(leaves, x).sum().backward())
        event(0, lambda: logits(leaves, x).sum().backward())
    finally:
        model.eval()
    assert graphs() > torch._dynamo.config.recompile_limit  # more variants than one cache may hold, no error


def test_torch_compile_of_fwd_meets_the_recompile_limit_that_fwd_compile_avoids(setup) -> None:
    """Why ``fwd.compile`` exists: ``torch.compile(fwd)`` keeps every variant in one cache (torch's behaviour;
    if torch lifts the limit this test fails and the README's advice can change)."""
    model, params, fwd, stacked = setup
    compiled = torch.compile(fwd, fullgraph=True, backend="eager")
    x = ids(2, 8)
    kinds = [(None, {}), (params, {}), (stacked, {"adapter_ids": torch.tensor([0, 1])})]
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for training in (False, True):
            model.train(training)
            for grad in (False, True):
                for p, kw in kinds:  # 12 variants, one code object
                    with torch.set_grad_enabled(grad):
                        compiled(p, x, use_cache=False, **kw)
    model.eval()


def test_threads_share_one_compiled_function_per_kind(setup) -> None:
    _, params, fwd, _ = setup
    compiled = fwd.compile(backend="eager")
    x = ids(2, 8)
    results: list[torch.Tensor] = []

    def work() -> None:
        with torch.no_grad():
            results.append(compiled(params, x, use_cache=False).logits)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(compiled._compiled) == 1
    with torch.no_grad():
        for r in results:
            assert_close(r, fwd(params, x, use_cache=False).logits)


def test_options_are_checked_and_repr_says_what_is_compiled(setup) -> None:
    _, params, fwd, _ = setup
    with pytest.raises(TypeError, match="fullgraph"):
        fwd.compile(fullgraph="yes")
    compiled = fwd.compile(backend="eager")
    with torch.no_grad():
        compiled(params, ids(1, 4), use_cache=False)
    assert "1 kinds of call compiled" in repr(compiled)


def test_a_wrong_adapter_is_refused_before_anything_compiles(setup) -> None:
    _, params, fwd, _ = setup
    compiled = fwd.compile(fullgraph=True, backend="eager")
    path = next(iter(params))
    bad = {**params, path: {**params[path], "lora_A": params[path]["lora_A"][:, :-1]}}
    with torch.no_grad():
        compiled(params, ids(2, 4), use_cache=False)
        with pytest.raises(ValueError, match=path):
            compiled(bad, ids(2, 4), use_cache=False)
