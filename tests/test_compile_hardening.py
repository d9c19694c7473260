"""Hostile calls of compiled ``fwd``: ``fwd.compile()``, ``torch.compile(fwd)`` and a compiled training step around
``funcpeft.grad_and_value``.

Each compiled call must equal eager ``fwd`` (and PEFT), or be refused with eager ``fwd``'s own error: never a
stale graph, never dynamo's wrapper error in place of the check's. The attacks: mixed batches that do not fit
(under ``fullgraph``, dynamo reports a refusal raised while tracing as its own ``Unsupported``), ``base=None``
(``fwd``'s default), a tree missing an entry called from two threads at once (a graph compiled for it must never
exist, not even until the caller's check drops it), adapters of other values mutated in place, several threads
with different adapters, batches of size 0 and 1, ``K`` changing between mixed batches, a NaN leaf,
``inference_mode``, and a compiled step switching between train/eval and ``no_grad``. The ``eager`` and
``aot_eager`` backends keep it fast: dynamo's tracing, guards and caches are inductor's.
"""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from _models import MLP, oracle
from torch._dynamo.utils import counters
from torch.testing import assert_close

import funcpeft
from funcpeft._check import Validator

TARGETS = ["lin0", "lin1"]


@pytest.fixture
def setup():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP().eval().requires_grad_(False)
    config = funcpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    params, fwd = funcpeft.adapt(model, config, generator=torch.Generator().manual_seed(0))
    yield model, params, fwd
    torch._dynamo.reset()


def fresh(fwd, seed: int) -> funcpeft.Params:
    """An adapter with random values (B nonzero), detached leaves: safe to edit in place."""
    return {p: {n: t.detach() for n, t in e.items()} for p, e in fwd.init(torch.Generator().manual_seed(seed)).items()}


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def eager_error(call) -> BaseException:
    with pytest.raises((TypeError, ValueError)) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph_breaks_allowed"])
def test_a_mixed_batch_that_does_not_fit_raises_fwds_own_error(setup, fullgraph) -> None:
    """Before: with ``fullgraph=True`` every refusal of a mixed batch came back as dynamo's ``Unsupported``
    ("Observed exception"), the check's message buried in ``__cause__``; out-of-range CPU ids as the graph's
    ``RuntimeError`` assertion instead of eager ``fwd``'s ``ValueError`` naming the values."""
    _, params, fwd = setup
    stacked = funcpeft.stack([params, fresh(fwd, 1), fresh(fwd, 2)])
    compiled = fwd.compile(fullgraph=fullgraph, backend="eager")
    x = torch.randn(3, 10)
    ok = torch.tensor([2, -1, 0])
    ragged = {p: {n: (t[:2] if n == "lora_A" else t) for n, t in e.items()} for p, e in stacked.items()}
    cases = {
        "ragged K": (ragged, ok),
        "missing entry": ({"lin0": stacked["lin0"]}, ok),
        "unstacked tree": (params, ok),
        "ids out of range": (stacked, torch.tensor([3, 0, 0])),
        "ids 2-D": (stacked, ok[None]),
        "ids float": (stacked, ok.float()),
    }
    with torch.no_grad():
        assert_close(compiled(stacked, x, adapter_ids=ok), fwd(stacked, x, adapter_ids=ok))
        for name, (tree, ids) in cases.items():
            want = eager_error(lambda tree=tree, ids=ids: fwd(tree, x, adapter_ids=ids))
            for _attempt in range(2):
                with pytest.raises(type(want)) as caught:
                    compiled(tree, x, adapter_ids=ids)
                assert str(caught.value) == str(want), name
                assert caught.value.__suppress_context__, f"{name}: dynamo's own error must not be the story"
        assert_close(compiled(stacked, x, adapter_ids=ok), fwd(stacked, x, adapter_ids=ok))


def test_base_none_is_fwds_default_not_a_keyword_for_the_model(setup) -> None:
    """Before: ``compiled(params, x, base=None)`` passed ``base=None`` on to ``model.forward`` (a TypeError, or
    dynamo's ``Unsupported`` under ``fullgraph``; a model taking ``**kwargs`` received it), unlike ``fwd``."""
    _, params, fwd = setup
    compiled = fwd.compile(fullgraph=True, backend="eager")
    x = torch.randn(3, 10)
    with torch.no_grad():
        assert_close(compiled(params, x, base=None), fwd(params, x, base=None))
        assert_close(compiled(None, x, base=None), fwd(None, x))
        assert_close(compiled(params, x, base=None, adapter_ids=None), fwd(params, x))


def test_no_graph_ever_serves_a_tree_missing_an_entry_not_even_from_another_thread(setup, monkeypatch) -> None:
    """Before: a tree missing a module's entry (whose matmuls run: that module silently runs the base) got a
    graph of its own, refused by the caller's full check only after it returned; a second thread calling with the
    same tree in between reused the graph unchecked and got a wrong result. Now the trace refuses it: no graph."""
    _, params, fwd = setup
    compiled = fwd.compile(fullgraph=True, backend="eager")
    x = torch.randn(3, 10)
    partial = {"lin0": params["lin0"]}
    with torch.no_grad():
        compiled(params, x)
    first = {}
    checking, release = threading.Event(), threading.Event()
    original = Validator.check

    def slow_check(self, p, stacked=False):
        if p is partial and threading.get_ident() == first.get("ident"):
            checking.set()  # the first caller's graph (if any) exists now; its check has not refused it yet
            release.wait(20)
        return original(self, p, stacked)

    monkeypatch.setattr(Validator, "check", slow_check)

    def call_first() -> None:
        first["ident"] = threading.get_ident()
        try:
            with torch.no_grad():
                compiled(partial, x)
        except ValueError as err:
            first["error"] = err
        finally:
            checking.set()

    thread = threading.Thread(target=call_first)
    before = graphs()
    thread.start()
    try:
        assert checking.wait(20)
        with torch.no_grad(), pytest.raises(ValueError, match=r"params\['lin1'\]` is missing"):
            compiled(partial, x)
    finally:
        release.set()
        thread.join()
    assert "is missing" in str(first.get("error"))
    assert graphs() == before, "a graph was compiled for a tree that does not fit"


def test_in_place_edits_of_the_values_are_seen_and_threads_keep_their_own_adapter(setup) -> None:
    """Adapter values are graph inputs, never constants baked into the graph: an optimizer-style in-place update
    (``mul_``, ``copy_``, ``.data =`` of the same shape) is seen by the next call; four threads with four different
    adapters calling the one compiled callable at once each get their own."""
    _, _, fwd = setup
    compiled = fwd.compile(fullgraph=True, backend="eager")
    x = torch.randn(5, 10)
    trees = [fresh(fwd, seed) for seed in range(4)]
    with torch.no_grad():
        tree = trees[0]
        compiled(tree, x)
        tree["lin0"]["lora_B"].mul_(3.0)
        assert_close(compiled(tree, x), fwd(tree, x))
        tree["lin1"]["lora_A"].copy_(trees[1]["lin1"]["lora_A"])
        assert_close(compiled(tree, x), fwd(tree, x))
        tree["lin1"]["lora_B"].data = torch.randn(20, 4)
        assert_close(compiled(tree, x), fwd(tree, x))
        want = [fwd(t, x) for t in trees]
    errors: list[str] = []
    barrier = threading.Barrier(4)

    def work(k: int) -> None:
        try:
            barrier.wait(20)
            with torch.no_grad():
                for _ in range(10):
                    assert_close(compiled(trees[k], x), want[k])
        except Exception as err:  # reported below, with the thread's adapter
            errors.append(f"adapter {k}: {err!r}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_batches_of_size_zero_and_one_and_a_nan_leaf_equal_eager(setup) -> None:
    """Sizes 0 and 1 are specialised by torch (one graph each, then served); a batch size after them reuses the
    dynamic graph; a NaN in an adapter propagates exactly as eagerly (nothing is folded or cached around it)."""
    _, params, fwd = setup
    compiled = fwd.compile(fullgraph=True, backend="eager")
    with torch.no_grad():
        for batch in (2, 0, 1, 3, 0, 1, 7):
            x = torch.randn(batch, 10)
            assert_close(compiled(params, x), fwd(params, x), msg=f"batch {batch}")
        before = graphs()
        for batch in (0, 1, 5):
            compiled(params, torch.randn(batch, 10))
        assert graphs() == before, "sizes 0, 1 and a dynamic size seen before compile nothing new"
        nan = fresh(fwd, 3)
        nan["lin1"]["lora_B"][0, 0] = float("nan")
        x = torch.randn(4, 10)
        assert_close(compiled(nan, x), fwd(nan, x), equal_nan=True)
        assert compiled(nan, x).isnan().any() and not compiled(params, x).isnan().any()
        with torch.inference_mode():
            assert_close(compiled(params, x), fwd(params, x))


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph_breaks_allowed"])
def test_mixed_batches_whose_k_changes_equal_eager(setup, fullgraph) -> None:
    """K stacked adapters, K changing between calls (a new graph, then K dynamic) and in place in the same dicts
    (the graph's range check must use the new K, not the traced one)."""
    _, _, fwd = setup
    compiled = fwd.compile(fullgraph=fullgraph, backend="eager")
    trees = [fresh(fwd, seed) for seed in range(5)]
    x = torch.randn(3, 10)
    with torch.no_grad():
        for k in (2, 3, 5, 2, 4):
            stacked = funcpeft.stack(trees[:k])
            ids = torch.tensor([k - 1, -1, 0])
            assert_close(compiled(stacked, x, adapter_ids=ids), fwd(stacked, x, adapter_ids=ids), msg=f"K={k}")
        stacked = {p: {n: t.detach().clone() for n, t in e.items()} for p, e in funcpeft.stack(trees[:2]).items()}
        compiled(stacked, x, adapter_ids=torch.tensor([1, 0, -1]))
        bigger = funcpeft.stack(trees)
        for path, entry in stacked.items():
            for name, leaf in entry.items():
                leaf.data = bigger[path][name].detach().clone()
        ids = torch.tensor([4, 3, -1])
        assert_close(compiled(stacked, x, adapter_ids=ids), fwd(stacked, x, adapter_ids=ids))


def test_a_compiled_training_step_equals_eager_and_peft_across_modes(setup) -> None:
    """``torch.compile(step, fullgraph=True)`` around ``funcpeft.grad_and_value``: loss and gradients equal eager
    and PEFT's (the same weights loaded into PEFT), after in-place updates of the adapter, in train mode and under
    ``no_grad``; a tree of another r is refused, never served by the step's graph."""
    peft = oracle("peft")
    model, params, fwd = setup
    x, y = torch.randn(6, 10), torch.randn(6, 4)

    def loss(p, x, y):
        return ((fwd(p, x) - y) ** 2).mean()

    grad_and_value = funcpeft.grad_and_value(loss)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(p, x, y):
        grads, value = grad_and_value(p, x, y)
        return {k: {n: t - 0.1 * grads[k][n] for n, t in e.items()} for k, e in p.items()}, value, grads

    tree = fresh(fwd, 1)
    reference = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    )

    def peft_grads(p):
        peft.set_peft_model_state_dict(reference, funcpeft.to_peft_state_dict(p, fwd.config))
        reference.train(model.training)
        reference.zero_grad()
        with torch.enable_grad():
            value = ((reference(x) - y) ** 2).mean()
            value.backward()
        modules = dict(reference.base_model.model.named_modules())
        return value.detach(), {k: {n: getattr(modules[k], n)["default"].weight.grad for n in e} for k, e in p.items()}

    def agree(p) -> None:
        new, value, grads = step(p, x, y)
        want_grads, want_value = grad_and_value(p, x, y)
        assert_close(value, want_value)
        assert_close(grads, want_grads)
        peft_value, peft_grad = peft_grads(p)
        assert_close(value, peft_value)
        assert_close(grads, peft_grad)
        return new

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about the custom model
        tree = agree(tree)
        tree = agree(tree)  # the step's own output, fed back
        with torch.no_grad():
            for entry in tree.values():
                for leaf in entry.values():
                    leaf.mul_(0.5)
        agree(tree)
        model.train()
        try:
            agree(tree)
        finally:
            model.eval()
        with torch.no_grad():
            agree(tree)
    other_r = {**tree, "lin0": {"lora_A": tree["lin0"]["lora_A"][:2], "lora_B": tree["lin0"]["lora_B"][:, :2]}}
    with pytest.raises(RuntimeError, match=r"params\['lin0'\]\['lora_A'\]` has shape"):
        step(other_r, x, y)  # dynamo's Unsupported, carrying the check's message (torch.compile's own rule)


def test_a_compiled_heterogeneous_fwd_without_adapter_ids_raises_fwds_error() -> None:
    """fwd.compile's single-adapter path passed `checked=` to a _run that did not take it: a TypeError about a
    keyword (Unsupported under fullgraph) instead of the heterogeneous fwd's "pass `adapter_ids`"."""
    configs = [funcpeft.LoraConfig(r=2, target_modules=["lin0"]), funcpeft.LoraConfig(r=4, target_modules=["lin1"])]
    stacked, hetero = funcpeft.adapt(MLP(), configs)
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="pass `adapter_ids`") as eager:
        hetero(stacked, x)
    for fullgraph in (False, True):
        with pytest.raises(ValueError, match="pass `adapter_ids`") as compiled:
            hetero.compile(fullgraph=fullgraph, backend="eager")(stacked, x)
        assert str(compiled.value) == str(eager.value)


def test_sparse_grad_under_fwd_compile_fullgraph_raises_fwds_error() -> None:
    """check_sparse refuses only while tracing, so the eager re-check of the failed call passed and dynamo's
    Unsupported ("Observed exception") reached the user, funcpeft's message buried in its debug context."""
    params, fwd = funcpeft.adapt(MLP(), funcpeft.LoraConfig(r=4, target_modules=TARGETS))
    stacked, ids = funcpeft.stack([params, params]), torch.tensor([0, 1, 0, 1, -1])
    with pytest.raises(ValueError, match=r"^`sparse_grad=True` does not compose with torch.compile"):
        fwd.compile(fullgraph=True, backend="eager")(stacked, torch.randn(5, 10), adapter_ids=ids, sparse_grad=True)
