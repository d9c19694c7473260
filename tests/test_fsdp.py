"""FSDP2: a funcpeft adapter trained on a base sharded with ``fully_shard`` (per decoder layer and at the root) by
two gloo processes, each on half of every batch, equals one process on the whole batch with the unsharded model.

The adapter is replicated, not sharded: its gradients are averaged either with
``funcpeft.distributed.average_gradients`` (after ``torch.func.grad`` or plain autograd) or by
``DistributedDataParallel(fwd.bind(params))``. Also with transformers' activation checkpointing and with the base
computed in bfloat16 through ``MixedPrecisionPolicy``; the adapter is saved by rank 0 only and loaded on every rank.
All scenarios share one spawn (a module-scoped fixture), which meets through a file in a temporary folder as in
``test_distributed.py``. Float64 except for the bfloat16 scenario, so "equal" is tight.
"""

from __future__ import annotations

import datetime
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import tiny_llama
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close

import funcpeft
from funcpeft import optim
from funcpeft.distributed import average_gradients, broadcast_params

WORLD = 2
STEPS = 3
BATCH = 4  # sequences per step; split into WORLD equal shards
LENGTH = 8
VOCAB = 100
LR = 0.5
TIMEOUT_S = 120.0
CONFIG = funcpeft.LoraConfig(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
)  # random B: every tensor has a gradient from the first step

Tree = dict[str, dict[str, torch.Tensor]]
GradFn = Callable[[funcpeft.Params, funcpeft.Adapted, torch.Tensor], funcpeft.Params]


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces: the model, the data, the training loops (used by the ranks and by the one-process reference)


def _model() -> nn.Module:
    """The same float64 tiny Llama in every process, frozen (as a user freezes the base before sharding)."""
    return tiny_llama(n_layer=2, hidden=32, vocab=VOCAB, seed=0).double().train().requires_grad_(False)


def _adapt(model: nn.Module, seed: int) -> tuple[funcpeft.Params, funcpeft.Adapted]:
    return funcpeft.adapt(model, CONFIG, generator=torch.Generator().manual_seed(seed))


def _batches() -> torch.Tensor:
    """STEPS batches of BATCH token sequences: ``[STEPS, BATCH, LENGTH]``."""
    return torch.randint(0, VOCAB, (STEPS, BATCH, LENGTH), generator=torch.Generator().manual_seed(1))


def _shard(rank: int) -> slice:
    return slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)


def _loss(fwd: funcpeft.Adapted, params: funcpeft.Params, ids: torch.Tensor) -> torch.Tensor:
    return fwd(params, ids, labels=ids, use_cache=False).loss  # the mean over the tokens: shards of equal size


def _func_grads(params: funcpeft.Params, fwd: funcpeft.Adapted, ids: torch.Tensor) -> funcpeft.Params:
    return torch.func.grad(lambda p: _loss(fwd, p, ids))(params)


def _autograd_grads(params: funcpeft.Params, fwd: funcpeft.Adapted, ids: torch.Tensor) -> funcpeft.Params:
    leaves = optree.tree_map(lambda t: t.detach().requires_grad_(), params)
    _loss(fwd, leaves, ids).backward()
    return optree.tree_map(lambda t: t.grad, leaves)


def _train(
    params: funcpeft.Params,
    fwd: funcpeft.Adapted,
    batches: torch.Tensor,
    grads_of: GradFn,
    average: Callable[[funcpeft.Params], funcpeft.Params] = lambda grads: grads,
) -> funcpeft.Params:
    """One SGD-with-momentum step per batch; ``average`` is applied to the gradients.

    SGD rather than Adam: its update scales with the gradient, so a summed (not averaged) gradient would show.
    """
    opt = optim.sgd(LR, momentum=0.9)
    state = opt.init(params)
    for ids in batches:
        updates, state = opt.update(average(grads_of(params, fwd, ids)), state, params)
        params = optim.apply_updates(params, updates)
    return params


def _train_module(module: nn.Module, batches: torch.Tensor) -> None:
    """The same steps with ``torch.optim.SGD`` on a module that returns the model's output (DDP's route)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=LR, momentum=0.9)
    for ids in batches:
        module(ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _values(params: funcpeft.Params) -> Tree:
    return {path: {name: t.detach().clone() for name, t in entry.items()} for path, entry in params.items()}


def _to_bfloat16_params(model: nn.Module) -> nn.Module:
    """What ``MixedPrecisionPolicy(param_dtype=bfloat16)`` computes with: the parameters cast, buffers as they are."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False))
    return model


# ---------------------------------------------------------------------------------------------------------------
# The ranks: every scenario in one spawn


def _sharded(mp_policy: Any = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model sharded per decoder layer and at the root, and a copy of this rank's shards of its state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    policy = mp_policy or MixedPrecisionPolicy()
    model = _model()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model, _local_state(model)


def _local_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone() for k, v in model.state_dict().items()}


def _model_report(model: nn.Module, before: dict[str, torch.Tensor]) -> dict:
    """Whether the model is still sharded, and whether its state is what it was before funcpeft saw it."""
    from torch.distributed.tensor import DTensor

    after = _local_state(model)
    weight = model.model.layers[0].self_attn.q_proj.weight
    return {
        "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
        "local_rows": weight.to_local().shape[0],
        "full_rows": weight.shape[0],
        "unchanged": after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before),
    }


def _func_scenario(rank: int, folder: Path) -> dict:
    """torch.func.grad + average_gradients; then rank 0 saves the adapter, every rank loads it."""
    model, before = _sharded()
    params, fwd = _adapt(model, seed=rank)  # a different adapter per rank, until the broadcast
    start = broadcast_params(params)
    final = _train(start, fwd, _batches()[:, _shard(rank)], _func_grads, average=average_gradients)

    where = folder / "adapter"
    if rank == 0:
        funcpeft.save(where, final, fwd.config)
    dist.barrier()  # the others wait for rank 0's files
    loaded, config = funcpeft.load(where)
    with torch.no_grad():
        ids = _batches()[0, _shard(rank)]
        same_output = torch.equal(fwd(loaded, ids).logits, fwd(final, ids).logits)
    return {
        "start": _values(start),
        "final": _values(final),
        "loaded": _values(loaded),
        "config_equal": config == fwd.config,
        "same_output": same_output,
        **_model_report(model, before),
    }


def _ddp_scenario(rank: int, folder: Path) -> dict:
    """DistributedDataParallel around the bound adapter of the sharded model: DDP broadcasts and averages."""
    model, before = _sharded()
    params, fwd = _adapt(model, seed=rank)  # DDP must start every rank from rank 0's adapter
    _train_module(DDP(fwd.bind(params)), _batches()[:, _shard(rank)])
    return {"final": _values(params), **_model_report(model, before)}


def _checkpoint_scenario(rank: int, folder: Path) -> dict:
    """transformers' activation checkpointing (non-reentrant), plain autograd, average_gradients."""
    model, before = _sharded()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params, fwd = _adapt(model, seed=0)
    final = _train(params, fwd, _batches()[:, _shard(rank)], _autograd_grads, average=average_gradients)
    return {"final": _values(final), **_model_report(model, before)}


def _bfloat16_scenario(rank: int, folder: Path) -> dict:
    """The base computed in bfloat16 (MixedPrecisionPolicy), the adapter in float64; func.grad + average."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model, before = _sharded(MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    params, fwd = _adapt(model, seed=0)
    final = _train(params, fwd, _batches()[:, _shard(rank)], _func_grads, average=average_gradients)
    with torch.no_grad():
        logits_dtype = fwd(final, _batches()[0, _shard(rank)]).logits.dtype
    return {"final": _values(final), "logits_dtype": logits_dtype, **_model_report(model, before)}


MERGE_CONFIG = funcpeft.LoraConfig(
    r=4,
    target_modules=["embed_tokens", "q_proj", "v_proj"],
    use_dora=True,
    bias="all",
    modules_to_save=["lm_head"],
    init_lora_weights=False,
)  # everything adapt and merge read from the base: DoRA's norms, the copied head, embedding and bias targets


def _merge_adapter(model: nn.Module) -> tuple[funcpeft.Params, funcpeft.Adapted]:
    params, fwd = funcpeft.adapt(model, MERGE_CONFIG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-zero copies, so that a merge that dropped them would show
        for entry in params.values():
            for name, t in entry.items():
                if name in ("weight", "bias"):
                    t.add_(0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(2), dtype=t.dtype))
    return params, fwd


def _merge_scenario(rank: int, folder: Path) -> dict:
    """adapt (DoRA, modules_to_save, bias, an embedding target) and fwd.merge on the sharded model; the merged
    state dict is sharded like the model's own, loads back into a sharded model and computes fwd's output."""
    from torch.distributed.tensor import DTensor

    model, before = _sharded()
    params, fwd = _merge_adapter(model)
    ids = _batches()[0]
    with torch.no_grad():
        adapted = fwd(params, ids).logits
        merged = fwd.merge(params)
        target, _ = _sharded()
        target.load_state_dict(merged)
        reloaded = target(ids).logits
    return {
        "params": _values(params),
        "adapted": adapted,
        "reloaded": reloaded,
        "merged_full": {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in merged.items()},
        "merged_sharded": all(isinstance(merged[k], DTensor) for k in model.state_dict()),
        **_model_report(model, before),
    }


SCENARIOS = {
    "merge": _merge_scenario,
    "func": _func_scenario,
    "ddp": _ddp_scenario,
    "checkpoint": _checkpoint_scenario,
    "bfloat16": _bfloat16_scenario,
}


def _worker(rank: int, init_file: str, out: str) -> None:
    """One rank of every scenario; each scenario's result (or its traceback) is saved for the tests."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),  # a rank left waiting by a failed peer gives up, not hangs
    )
    results: dict[str, Any] = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(rank, Path(out))
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                raise
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """Every scenario's results on each of the WORLD ranks, and their folder (one spawn; killed after TIMEOUT_S)."""
    folder = tmp_path_factory.mktemp("fsdp")
    context = mp.start_processes(
        _worker, args=(str(folder / "rendezvous"), str(folder)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} gloo processes did not finish within {TIMEOUT_S:.0f} s")
    except mp.ProcessRaisedException:
        pass  # the saved results carry the traceback; each test reports its own scenario's
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)], folder


def _scenario(two_ranks: tuple[list[dict], Path], name: str) -> list[dict]:
    per_rank = []
    for rank, result in enumerate(two_ranks[0]):
        got = result.get(name)
        if got is None:
            pytest.fail(f"rank {rank} did not reach the {name!r} scenario (an earlier scenario failed)")
        if "error" in got:
            pytest.fail(f"rank {rank}, scenario {name!r}:\n{got['error']}")
        per_rank.append(got)
    return per_rank


# ---------------------------------------------------------------------------------------------------------------
# The one-process references: the unsharded model, the same initial adapter (rank 0's), the whole batch


def _reference(grads_of: GradFn = _func_grads, bfloat16: bool = False) -> tuple[Tree, Tree]:
    model = _model()
    params, fwd = _adapt(model, seed=0)  # the adapter is made from the float64 model, as on the sharded ranks
    if bfloat16:
        _to_bfloat16_params(model)
    return _values(params), _values(_train(params, fwd, _batches(), grads_of))


def _assert_ranks_match(per_rank: list[dict], expected: Tree, initial: Tree, **tolerance: float) -> None:
    for rank, got in enumerate(per_rank):
        assert got["all_dtensor"], f"rank {rank}: the model's parameters are no longer all sharded DTensors"
        assert got["local_rows"] * WORLD == got["full_rows"], f"rank {rank}: q_proj is not sharded over {WORLD}"
        assert got["unchanged"], f"rank {rank}: the sharded model's state changed during adapter training"
        assert_close(got["final"], expected, **tolerance, msg=lambda m, r=rank: f"rank {r} vs one process: {m}")
    assert_close(per_rank[1]["final"], per_rank[0]["final"], rtol=0, atol=0)  # the ranks stay identical, bit for bit
    for path, entry in expected.items():  # training moved every tensor
        for name, t in entry.items():
            assert not torch.allclose(t, initial[path][name]), f"{path}.{name} did not change in training"


def test_func_grad_with_average_gradients_equals_one_process(two_ranks: tuple[list[dict], Path]) -> None:
    per_rank = _scenario(two_ranks, "func")
    initial, expected = _reference()
    for rank, got in enumerate(per_rank):
        assert_close(got["start"], initial, rtol=0, atol=0, msg=lambda m, r=rank: f"rank {r} start: {m}")
    _assert_ranks_match(per_rank, expected, initial)


def test_ddp_of_the_bound_adapter_equals_one_process(two_ranks: tuple[list[dict], Path]) -> None:
    per_rank = _scenario(two_ranks, "ddp")
    model = _model()
    params, fwd = _adapt(model, seed=0)
    initial = _values(params)
    _train_module(fwd.bind(params), _batches())  # torch.optim.SGD on the bound adapter, the whole batch
    _assert_ranks_match(per_rank, _values(params), initial)


def test_activation_checkpointing_equals_one_process_without_it(two_ranks: tuple[list[dict], Path]) -> None:
    per_rank = _scenario(two_ranks, "checkpoint")
    initial, expected = _reference(_autograd_grads)
    _assert_ranks_match(per_rank, expected, initial)


def _update_error(got: Tree, want: Tree, initial: Tree) -> dict[str, float]:
    """Per tensor, ``|got update - want update| / |want update|`` (the update: final minus initial adapter)."""
    return {
        f"{path}.{name}": ((got[path][name] - t) - (want[path][name] - t)).norm().item()
        / (want[path][name] - t).norm().item()
        for path, entry in initial.items()
        for name, t in entry.items()
    }


BF16_RTOL = 2e-3  # on the updates; see below


def test_bfloat16_base_equals_one_process_bfloat16_base(two_ranks: tuple[list[dict], Path]) -> None:
    per_rank = _scenario(two_ranks, "bfloat16")
    initial, expected = _reference(bfloat16=True)
    for rank, got in enumerate(per_rank):
        assert got["logits_dtype"] == torch.bfloat16  # the base really ran in bfloat16
        assert got["all_dtensor"] and got["unchanged"], f"rank {rank}: the sharded model changed"
        # Shards of the batch may round differently from the whole batch in bfloat16 (on CPU they do not: ~1e-15),
        # so the updates are compared relative to their size. A summed or unaveraged gradient is off by ~100 %,
        # a gradient 10 % too large by 10 %, and a base computed in float64 instead by ~1 % (asserted below).
        errors = _update_error(got["final"], expected, initial)
        worst = max(errors, key=errors.__getitem__)
        assert errors[worst] < BF16_RTOL, f"rank {rank}, {worst}: update off by {errors[worst]:.2%} from one process"
    assert_close(per_rank[1]["final"], per_rank[0]["final"], rtol=0, atol=0)
    _, float64 = _reference()
    assert min(_update_error(float64, expected, initial).values()) > BF16_RTOL  # bfloat16 is told from float64


def test_adapt_and_merge_on_the_sharded_model_equal_one_process(two_ranks: tuple[list[dict], Path]) -> None:
    per_rank = _scenario(two_ranks, "merge")
    model = _model()
    params, fwd = _merge_adapter(model)
    with torch.no_grad():
        adapted = fwd(params, _batches()[0]).logits
        merged = fwd.merge(params)
    for rank, got in enumerate(per_rank):
        assert got["all_dtensor"] and got["unchanged"], f"rank {rank}: the sharded model changed"
        assert_close(got["params"], _values(params), rtol=0, atol=0)  # DoRA's magnitudes, copies: from whole tensors
        assert_close(got["adapted"], adapted)
        assert got["merged_sharded"], f"rank {rank}: the merged state dict is not sharded like the model's"
        assert_close(got["merged_full"], merged, rtol=0, atol=0)
        assert_close(got["reloaded"], adapted)  # the merged shards, loaded into a sharded model, compute fwd


def test_saved_by_rank_zero_and_loaded_on_every_rank(two_ranks: tuple[list[dict], Path]) -> None:
    per_rank = _scenario(two_ranks, "func")
    folder = two_ranks[1] / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    on_disk, _ = funcpeft.load(folder)
    for rank, got in enumerate(per_rank):
        assert_close(got["loaded"], got["final"], rtol=0, atol=0, msg=lambda m, r=rank: f"rank {r}: {m}")
        assert_close(_values(on_disk), got["final"], rtol=0, atol=0)
        assert got["config_equal"] and got["same_output"]
