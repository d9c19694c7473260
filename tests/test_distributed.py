"""funcpeft.distributed: data-parallel training on two gloo processes equals one process on the whole batch.

The process groups rendezvous through a file in ``tmp_path`` (a ``FileStore``), so no TCP port is picked or raced
for; gloo's own connections use ports the OS assigns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import MLP
from torch.testing import assert_close

import funcpeft
from funcpeft import optim
from funcpeft.distributed import average_gradients, broadcast_params

WORLD = 2
STEPS = 3
BATCH = 8  # split into WORLD equal shards
TIMEOUT_S = 120.0


def _adapt(seed: int) -> tuple[funcpeft.Params, funcpeft.Adapted]:
    """The same float64 model on every process; the adapter's initialisation depends on ``seed``."""
    torch.manual_seed(0)
    model = MLP().double()
    config = funcpeft.LoraConfig(r=4, target_modules=["lin0", "lin1"], modules_to_save=["head"])
    return funcpeft.adapt(model, config, generator=torch.Generator().manual_seed(seed))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 10, generator=g, dtype=torch.float64), torch.randn(
        BATCH, 4, generator=g, dtype=torch.float64
    )


def _train(
    params: funcpeft.Params,
    fwd: funcpeft.Adapted,
    x: torch.Tensor,
    y: torch.Tensor,
    average: Callable[[funcpeft.Params], funcpeft.Params] = lambda grads: grads,
) -> funcpeft.Params:
    """STEPS of SGD with momentum on the mean squared error over ``(x, y)``, ``average`` applied to the gradients.

    SGD rather than Adam: its update scales with the gradient, so a sum in place of a mean would show (Adam's
    update is nearly scale-invariant and would hide it).
    """
    grad_and_loss = torch.func.grad_and_value(lambda p: torch.nn.functional.mse_loss(fwd(p, x), y))
    opt = optim.sgd(0.1, momentum=0.9)
    state = opt.init(params)
    for _ in range(STEPS):
        grads, _loss = grad_and_loss(params)
        updates, state = opt.update(average(grads), state, params)
        params = optim.apply_updates(params, updates)
    return params


def _detached(params: funcpeft.Params) -> dict[str, dict[str, torch.Tensor]]:
    return {path: {name: t.detach() for name, t in entry.items()} for path, entry in params.items()}


def _worker(rank: int, init_file: str, out: str) -> None:
    """One rank: start from rank 0's adapter, train on this rank's half of the batch, save the result."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        params, fwd = _adapt(seed=rank)  # a different adapter per rank, until the broadcast
        start = broadcast_params(params)
        x, y = _batch()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        final = _train(start, fwd, x[shard], y[shard], average=average_gradients)

        # A stacked tree with two dtypes (two buffers, two collectives) and a None entry, averaged across ranks.
        stacked = funcpeft.stack([start, start])
        grads = {
            "stacked": {path: {n: t.detach() * (rank + 1) for n, t in e.items()} for path, e in stacked.items()},
            "f32": torch.full((3, 2), float(rank + 1), dtype=torch.float32),
            "none": None,
        }
        before = {path: {n: t.clone() for n, t in e.items()} for path, e in grads["stacked"].items()}
        averaged = average_gradients(grads)
        assert averaged["none"] is None
        assert_close(averaged["f32"], torch.full((3, 2), 1.5))
        assert_close(averaged["stacked"], {p: {n: t.detach() * 1.5 for n, t in e.items()} for p, e in stacked.items()})
        assert_close(grads["stacked"], before, rtol=0, atol=0)  # the input tree is not modified

        torch.save({"start": _detached(start), "final": _detached(final)}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path) -> None:
    """Run ``_worker`` on WORLD processes; fail (and kill them) after TIMEOUT_S."""
    init_file = tmp_path / "rendezvous"
    context = mp.start_processes(
        _worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} gloo processes did not finish within {TIMEOUT_S:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def test_data_parallel_equals_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    _spawn(tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]

    params, fwd = _adapt(seed=0)
    x, y = _batch()
    # The mean over the whole batch is the average of the equal-size shards' means.
    expected = _detached(_train(params, fwd, x, y))

    for rank, result in enumerate(results):
        assert_close(result["start"], _detached(params), rtol=0, atol=0, msg=lambda m, r=rank: f"rank {r}: {m}")
        assert_close(result["final"], expected, msg=lambda m, r=rank: f"rank {r}: {m}")
    assert_close(results[1]["final"], results[0]["final"], rtol=0, atol=0)  # ranks stay identical, bit for bit
    assert not torch.equal(expected["lin0"]["lora_B"], params["lin0"]["lora_B"].detach())  # training did something


def test_helpers_need_an_initialized_process_group() -> None:
    assert not dist.is_initialized()
    grads = {"lin": {"lora_A": torch.ones(2, 3)}}
    for helper in (average_gradients, broadcast_params):
        with pytest.raises(RuntimeError, match="no initialized|needs an initialized") as info:
            helper(grads)
        assert "torchrun --nproc_per_node" in str(info.value)
        assert "init_process_group" in str(info.value)


@pytest.mark.usefixtures("one_process_group")
def test_one_process_average_is_the_identity_and_returns_a_new_tree() -> None:
    params, _ = _adapt(seed=0)
    grads = funcpeft.stack([_detached(params), _detached(params)])
    grads["extra"] = {"half": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    averaged = average_gradients(grads)
    assert_close(averaged, grads, rtol=0, atol=0)
    averaged["lin0"]["lora_A"].add_(1.0)  # the result does not alias the input
    assert_close(grads["lin0"]["lora_A"][0], params["lin0"]["lora_A"].detach(), rtol=0, atol=0)


@pytest.mark.usefixtures("one_process_group")
def test_one_process_broadcast_returns_fresh_trainable_leaves() -> None:
    params, _ = _adapt(seed=0)
    copy = broadcast_params(params)
    assert_close(_detached(copy), _detached(params), rtol=0, atol=0)
    for path, entry in copy.items():
        for name, t in entry.items():
            assert t.is_leaf and t.requires_grad
            assert t.untyped_storage().data_ptr() != params[path][name].untyped_storage().data_ptr()


@pytest.mark.usefixtures("one_process_group")
def test_non_float_or_non_tensor_leaves_are_refused_by_path() -> None:
    with pytest.raises(TypeError, match=r"`grads\['lin'\]\['lora_A'\]` is a torch.int64 tensor"):
        average_gradients({"lin": {"lora_A": torch.ones(2, dtype=torch.int64)}})
    with pytest.raises(TypeError, match=r"`params\['lin'\]\['lora_A'\]` must be a Tensor, got float"):
        broadcast_params({"lin": {"lora_A": 1.0}})
