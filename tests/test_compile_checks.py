"""``fwd.compile``'s checks of a single adapter's tree: in full whenever a graph is compiled for it, and by the
graph's guards on every other call.

The full check (structure, shapes, dtypes, devices) costs tens of microseconds per call in Python; a compiled call
that reuses a graph needs none of it, because the graph was traced with :meth:`Validator.pin` reading the tree's
keys and every leaf's shape, so its guards hold all that validity depends on. These tests attack that claim:
every kind of unfit tree is refused with the full check's message on every call after a good one compiled, with
and without ``fullgraph``, with static and dynamic shapes, and when dynamo runs the frame eagerly past its
recompile limit; a good call after a refused one is still right; and a call that reuses a graph runs no check.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import funcpeft
from funcpeft._check import Validator
from tests._models import tiny_gpt2

VOCAB = 100
PATH = "transformer.h.0.attn.c_attn"


@pytest.fixture
def setup():
    torch._dynamo.reset()
    model = tiny_gpt2(vocab=VOCAB).eval().requires_grad_(False)
    config = funcpeft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    params, fwd = funcpeft.adapt(model, config, generator=torch.Generator().manual_seed(0))
    yield params, fwd
    torch._dynamo.reset()


def ids(batch: int = 2, length: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def unfit(params: funcpeft.Params) -> dict[str, tuple[type[Exception], str, funcpeft.Params]]:
    """Trees that must never run, with the error and a fragment of the message the full check gives for each."""
    entry = params[PATH]
    a, b = entry["lora_A"], entry["lora_B"]
    return {
        "A narrower": (ValueError, "has shape", {**params, PATH: {**entry, "lora_A": a[:, :-1]}}),
        # consistent with itself (the matmuls would run), but not the config's r: only the check can tell
        "another r": (ValueError, "has shape", {**params, PATH: {"lora_A": a[:2], "lora_B": b[:, :2]}}),
        "extra name": (ValueError, "must hold", {**params, PATH: {**entry, "lora_magnitude_vector": b[:, 0]}}),
        "extra path": (ValueError, "does not adapt", {**params, "transformer.h.0.mlp.c_fc": entry}),
        "missing path": (ValueError, "is missing", {k: v for k, v in params.items() if k != PATH}),
        "integer": (TypeError, "floating point", {**params, PATH: {**entry, "lora_A": a.long()}}),
        "not a tensor": (TypeError, "must be a Tensor", {**params, PATH: {**entry, "lora_A": 0.5}}),
        "other device": (ValueError, "on device meta", {**params, PATH: {**entry, "lora_A": a.to("meta")}}),
    }


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph_breaks_allowed"])
@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
def test_every_unfit_tree_is_refused_on_every_call_after_a_good_one_compiled(setup, fullgraph, dynamic) -> None:
    params, fwd = setup
    compiled = fwd.compile(fullgraph=fullgraph, dynamic=dynamic, backend="eager")
    with torch.no_grad():
        expected = fwd(params, ids(), use_cache=False).logits
        assert_close(compiled(params, ids(), use_cache=False).logits, expected)
        for name, (error, message, tree) in unfit(params).items():
            for _attempt in range(2):  # the second time a graph may exist for it: it must not serve the call
                with pytest.raises(error, match=message) as caught:
                    compiled(tree, ids(), use_cache=False)
                assert caught.value.__suppress_context__, f"{name}: dynamo's own error must not be the story"
            assert_close(compiled(params, ids(), use_cache=False).logits, expected, msg=name)


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph_breaks_allowed"])
@pytest.mark.parametrize("how", ["data", "set_", "resize_"])
def test_a_leaf_reshaped_in_place_in_the_same_dict_is_refused(setup, fullgraph, how) -> None:
    """The same dicts, their tags unchanged, but a leaf (and its partner, consistently: the matmuls would run) given
    another r in place: dynamo skips tensor guards on a dict's values when the dict's tag matches
    (``skip_tensor_guards_with_matching_dict_tags``), so this is the attack that could slip past a graph."""
    params, fwd = setup
    tree = {path: {name: t.detach().clone() for name, t in entry.items()} for path, entry in params.items()}
    compiled = fwd.compile(fullgraph=fullgraph, backend="eager")
    with torch.no_grad():
        compiled(tree, ids(), use_cache=False)
        a, b = tree[PATH]["lora_A"], tree[PATH]["lora_B"]
        wider_a, wider_b = torch.ones(8, a.shape[1]), torch.ones(b.shape[0], 8)
        if how == "data":
            a.data, b.data = wider_a, wider_b
        elif how == "set_":
            a.set_(wider_a), b.set_(wider_b)
        else:
            a.resize_(wider_a.shape), b.resize_(wider_b.shape)
        for _attempt in range(2):
            with pytest.raises(ValueError, match="has shape"):
                compiled(tree, ids(), use_cache=False)
            with pytest.raises(ValueError, match="has shape"):
                fwd(tree, ids(), use_cache=False)


def test_past_the_recompile_limit_the_eager_frame_checks_the_tree(setup) -> None:
    params, fwd = setup
    compiled = fwd.compile(backend="eager")  # without fullgraph, dynamo runs the frame eagerly past the limit
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():
        compiled(params, ids(), use_cache=False)
        assert_close(
            compiled(params, ids(3, 5), use_cache=False).logits, fwd(params, ids(3, 5), use_cache=False).logits
        )
        for error, message, tree in unfit(params).values():
            with pytest.raises(error, match=message):
                compiled(tree, ids(), use_cache=False)


def test_a_call_that_reuses_a_graph_runs_no_check_and_one_that_compiles_runs_one(setup, monkeypatch) -> None:
    params, fwd = setup
    other = fwd.init(generator=torch.Generator().manual_seed(1))  # same structure: same graph, other values
    checks = []
    original = Validator.check
    monkeypatch.setattr(
        Validator, "check", lambda self, p, stacked=False: checks.append(p) or original(self, p, stacked)
    )
    compiled = fwd.compile(fullgraph=True, backend="eager")
    with torch.no_grad():
        compiled(params, ids(), use_cache=False)
        assert len(checks) == 1  # compiled for this tree: checked in full
        assert_close(compiled(other, ids(), use_cache=False).logits, fwd(other, ids(), use_cache=False).logits)
        compiled(params, ids(), use_cache=False)
        assert len(checks) == 2  # the eager `fwd(other, ...)` above; the two compiled calls reused the graph
        double = {p: {n: t.double() for n, t in entry.items()} for p, entry in params.items()}
        compiled(double, ids(), use_cache=False)  # float64 leaves fit (any floating dtype does): a new graph
        assert len(checks) == 3


def test_inside_a_users_compiled_function_the_call_is_traced_as_fwd(setup) -> None:
    """``fwd.compile()`` called from a function the user compiles: the outer trace takes in ``fwd`` itself (its
    in-trace check included), with ``fullgraph``; an unfit tree is still refused (with ``fullgraph``, dynamo
    reports the check's error as its own ``Unsupported``, a ``RuntimeError`` carrying the check's message)."""
    params, fwd = setup
    fast = fwd.compile(fullgraph=True, backend="eager")

    @torch.compile(fullgraph=True, backend="eager")
    def loss(p, x):
        return fast(p, x, use_cache=False).logits.sum()

    with torch.no_grad():
        assert_close(loss(params, ids()), fwd(params, ids(), use_cache=False).logits.sum())
        _, message, tree = unfit(params)["A narrower"]
        with pytest.raises(RuntimeError, match=message):
            loss(tree, ids())
