"""The tools people train with train a bound adapter (``fwd.bind(params)``) unchanged, with the numbers of a plain
loop (and of PEFT's ``get_peft_model``): Lightning (fit, checkpoint, resume), ``accelerate`` (one and two
processes), ``DistributedDataParallel(bound)`` (two gloo processes). ``adapt`` warns when given a data-parallel
wrapper, whose gradient synchronisation ``fwd`` goes around.

The two-process runs share one spawn (a module-scoped fixture) to keep the file fast; their process group meets
through a file in a temporary folder, as in ``test_distributed.py``. Float64 everywhere, so "equal" is tight.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import MLP, oracle, tiny_gpt2, token_ids
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import funcpeft
from funcpeft.distributed import broadcast_params

WORLD = 2
STEPS = 3
BATCH = 8  # per step; split into WORLD equal shards
LR = 0.1
TIMEOUT_S = 150.0
MLP_CONFIG = funcpeft.LoraConfig(
    r=4, target_modules=["lin0", "lin1"], modules_to_save=["head"], init_lora_weights=False
)  # random B: every tensor has a gradient from the first step


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces: the MLP adapter, its data, a plain training loop (the reference)


def _mlp_adapter(seed: int) -> tuple[funcpeft.Params, funcpeft.Adapted]:
    """The same float64 MLP in every process; the adapter's initialisation depends on ``seed``."""
    torch.manual_seed(0)
    return funcpeft.adapt(MLP().double(), MLP_CONFIG, generator=torch.Generator().manual_seed(seed))


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    n = STEPS * BATCH
    return TensorDataset(
        torch.randn(n, 10, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g, dtype=torch.float64)
    )


def _sgd(module: nn.Module) -> torch.optim.Optimizer:
    # SGD with momentum: its update scales with the gradient, so a summed (not averaged) gradient would show, and
    # the momentum buffers make a resume without the optimizer state show.
    return torch.optim.SGD(module.parameters(), lr=LR, momentum=0.9)


def _train(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Any,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    shard: slice = slice(None),
) -> None:
    """One optimizer step per batch on the mean squared error of ``module`` over ``batch[shard]``."""
    for x, y in batches:
        loss = nn.functional.mse_loss(module(x[shard]), y[shard])
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def _values(params: funcpeft.Params) -> dict[str, dict[str, torch.Tensor]]:
    return {path: {name: t.detach().clone() for name, t in entry.items()} for path, entry in params.items()}


def _reference(seed: int = 0) -> tuple[dict, dict]:
    """(initial, final) adapter of one process trained on the whole of every batch, from ``_mlp_adapter(seed)``."""
    params, fwd = _mlp_adapter(seed)
    initial = _values(params)
    bound = fwd.bind(params)
    _train(bound, _sgd(bound), DataLoader(_dataset(), batch_size=BATCH))
    return initial, _values(params)


def _assert_trained(final: dict, initial: dict) -> None:
    for path, entry in initial.items():
        for name, t in entry.items():
            assert not torch.equal(final[path][name], t), f"{path}.{name} did not change: nothing was trained"


# ---------------------------------------------------------------------------------------------------------------
# Two processes: DDP(bound), accelerate, and raw fwd of a DDP-wrapped model; one spawn for all three


def _worker(rank: int, init_file: str, out: str) -> None:
    """One rank of every two-process scenario; each scenario's result (or its traceback) is saved for the test."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    os.environ.update(OMP_NUM_THREADS="1")  # accelerate sets the thread count itself otherwise
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),  # a rank left waiting by a failed peer gives up, not hangs
    )
    results: dict[str, Any] = {}
    try:
        for name, scenario in (("ddp", _ddp_scenario), ("accelerate", _accelerate_scenario), ("wrapped", _wrapped)):
            try:
                results[name] = scenario(rank)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                raise
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _shard(rank: int) -> slice:
    return slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)


def _ddp_scenario(rank: int) -> dict:
    params, fwd = _mlp_adapter(seed=rank)  # a different adapter per rank: DDP must start them from rank 0's
    model = DDP(fwd.bind(params))
    _train(model, _sgd(model), DataLoader(_dataset(), batch_size=BATCH), shard=_shard(rank))
    return {"params": _values(params), "state_dict": {k: v.clone() for k, v in model.module.state_dict().items()}}


def _accelerate_scenario(rank: int) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    # split_batches: every rank gets its half of each BATCH-row batch, so the global batch is the reference's.
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
    params, fwd = _mlp_adapter(seed=rank)
    bound = fwd.bind(params)
    model, optimizer, loader = accelerator.prepare(bound, _sgd(bound), DataLoader(_dataset(), batch_size=BATCH))
    rows = []
    for x, _ in loader:
        rows.append(x.shape[0])
    _train(model, optimizer, loader, backward=accelerator.backward)
    return {
        "distributed_type": accelerator.distributed_type.value,
        "wrapped": type(model).__name__,
        "rows": rows,
        "unwrapped_is_bound": accelerator.unwrap_model(model) is bound,
        "params": _values(params),
    }


def _wrapped(rank: int) -> dict:
    """The trap the warning is for: raw ``fwd`` of a DDP-wrapped model trains each rank on its own gradients."""
    torch.manual_seed(0)
    wrapped = DDP(MLP().double())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, fwd = funcpeft.adapt(wrapped, MLP_CONFIG, generator=torch.Generator().manual_seed(0))
    params = broadcast_params(params)  # the same start on both ranks: any difference at the end is the gradients'
    bound = fwd.bind(params)  # a plain optimizer on the leaves, no DDP around the adapter
    _train(bound, _sgd(bound), DataLoader(_dataset(), batch_size=BATCH), shard=_shard(rank))
    return {
        "warnings": [(w.category, str(w.message), w.filename) for w in caught],
        "model_is_inner": fwd.model is wrapped.module,
        "params": _values(params),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every scenario's results on each of the WORLD ranks (one spawn; killed after TIMEOUT_S)."""
    folder = tmp_path_factory.mktemp("two_ranks")
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
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _scenario(results: list[dict], name: str) -> list[dict]:
    per_rank = []
    for rank, result in enumerate(results):
        got = result.get(name)
        if got is None:
            pytest.fail(f"rank {rank} did not reach the {name!r} scenario (an earlier scenario failed)")
        if "error" in got:
            pytest.fail(f"rank {rank}, scenario {name!r}:\n{got['error']}")
        per_rank.append(got)
    return per_rank


def _assert_ranks_equal_reference(per_rank: list[dict], key: str = "params") -> None:
    initial, expected = _reference(seed=0)  # rank 0's initial adapter, the whole batch
    for rank, got in enumerate(per_rank):
        assert_close(got[key], expected, msg=lambda m, r=rank: f"rank {r} vs one process on the whole batch: {m}")
    assert_close(per_rank[1][key], per_rank[0][key], rtol=0, atol=0)  # the ranks stay identical, bit for bit
    _assert_trained(expected, initial)


def test_ddp_of_the_bound_adapter_equals_one_process_on_the_whole_batch(two_ranks: list[dict]) -> None:
    per_rank = _scenario(two_ranks, "ddp")
    _assert_ranks_equal_reference(per_rank)
    # DDP trained `params` itself (the module's parameters are its leaves), and its state dict is that adapter.
    for got in per_rank:
        flat = {f"adapter.{path}.{name}": t for path, entry in got["params"].items() for name, t in entry.items()}
        assert_close(got["state_dict"], flat, rtol=0, atol=0)


def test_accelerate_two_processes_equal_one_process_on_the_whole_batch(two_ranks: list[dict]) -> None:
    per_rank = _scenario(two_ranks, "accelerate")
    for got in per_rank:
        assert got["distributed_type"] == "MULTI_CPU"
        assert got["wrapped"] == "DistributedDataParallel"
        assert got["unwrapped_is_bound"]
        assert got["rows"] == [BATCH // WORLD] * STEPS  # each rank trained on half of each batch
    _assert_ranks_equal_reference(per_rank)


def test_raw_fwd_of_a_ddp_wrapped_model_warns_and_its_ranks_diverge(two_ranks: list[dict]) -> None:
    per_rank = _scenario(two_ranks, "wrapped")
    for got in per_rank:
        [(category, message, filename)] = got["warnings"]
        assert category is funcpeft.FuncpeftWarning
        assert filename == __file__  # attributed to the caller of adapt
        assert "does not synchronise the gradients of `params`" in message
        assert "DistributedDataParallel(fwd.bind(params))" in message and "average_gradients" in message
        assert got["model_is_inner"]
    # What the warning says: the wrapper did not average the adapter's gradients, so the ranks parted ways.
    a, b = (got["params"]["lin0"]["lora_B"] for got in per_rank)
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------------------------
# One process: accelerate; the warnings for data-parallel wrappers in a one-process gloo group


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        PartialState._reset_state()

    reset()
    try:
        yield
    finally:
        reset()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_accelerate_one_process_equals_plain_training() -> None:
    accelerate = oracle("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    params, fwd = _mlp_adapter(seed=0)
    bound = fwd.bind(params)
    model, optimizer, loader = accelerator.prepare(bound, _sgd(bound), DataLoader(_dataset(), batch_size=BATCH))
    assert accelerator.unwrap_model(model) is bound
    _train(model, optimizer, loader, backward=accelerator.backward)

    initial, expected = _reference(seed=0)
    assert_close(_values(params), expected)  # the user's own tree holds the trained adapter
    _assert_trained(expected, initial)


def _x() -> torch.Tensor:
    return torch.randn(3, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.mark.usefixtures("one_process_group")
def test_adapt_of_a_ddp_wrapper_warns_and_adapts_the_wrapped_module() -> None:
    torch.manual_seed(0)
    wrapped = DDP(MLP().double())
    plain_params, plain_fwd = _mlp_adapter(seed=0)
    for model in (wrapped, torch.compile(wrapped)):  # compile's wrapper and DDP's, in any nesting
        with pytest.warns(funcpeft.FuncpeftWarning, match="wrapped in DistributedDataParallel") as caught:
            params, fwd = funcpeft.adapt(model, MLP_CONFIG, generator=torch.Generator().manual_seed(0))
        [warning] = caught.list
        assert warning.filename == __file__
        message = str(warning.message)
        assert "does not synchronise the gradients of `params`" in message and "silently diverge" in message
        assert "`model.module`" in message and "DistributedDataParallel(fwd.bind(params))" in message
        assert "funcpeft.distributed.average_gradients" in message
        # The module DDP wraps is adapted: the plain model's paths, the same adapted forward.
        assert fwd.model is wrapped.module
        assert list(params) == list(plain_params) == ["lin0", "lin1", "head"]
        assert_close(fwd(params, _x()), plain_fwd(plain_params, _x()), rtol=0, atol=0)


@pytest.mark.usefixtures("one_process_group")
def test_adapt_of_an_fsdp_wrapper_warns_and_keeps_the_wrapper() -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plain_params, plain_fwd = _mlp_adapter(seed=0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "FSDP is switching to use `NO_SHARD`", UserWarning)  # one process
        wrapped = FSDP(MLP().double(), device_id=torch.device("cpu"), use_orig_params=True)
    with pytest.warns(funcpeft.FuncpeftWarning, match="wrapped in FullyShardedDataParallel") as caught:
        params, fwd = funcpeft.adapt(wrapped, MLP_CONFIG, generator=torch.Generator().manual_seed(0))
    [warning] = caught.list
    assert warning.filename == __file__
    message = str(warning.message)
    assert "does not synchronise the gradients of `params`" in message and "_fsdp_wrapped_module." in message
    assert "DistributedDataParallel(fwd.bind(params))" in message and "fully_shard" in message
    # The wrapper is adapted (its forward gathers the weights), under its own paths.
    assert fwd.model is wrapped
    assert list(params) == [f"_fsdp_wrapped_module.{path}" for path in plain_params]
    assert_close(fwd(params, _x()), plain_fwd(plain_params, _x()))


def test_adapt_of_a_plain_model_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", funcpeft.FuncpeftWarning)
        _, fwd = _mlp_adapter(seed=0)
    assert type(fwd.model) is MLP


@pytest.mark.usefixtures("one_process_group")
def test_adapt_of_a_fully_sharded_model_does_not_warn() -> None:
    """FSDP2's ``fully_shard`` shards the model in place and wraps nothing: no wrapper to warn about."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = MLP().double()
    fully_shard(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", funcpeft.FuncpeftWarning)
        params, fwd = funcpeft.adapt(model, MLP_CONFIG, generator=torch.Generator().manual_seed(0))
    assert fwd.model is model
    assert list(params) == ["lin0", "lin1", "head"]


# ---------------------------------------------------------------------------------------------------------------
# Lightning on a tiny GPT-2: fit, the checkpoint holds the adapter only, resume continues, equal to PEFT's model

LIGHTNING_STEPS = 4  # two epochs of two batches; a checkpoint every two steps
GPT2_CONFIG = funcpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)


def _lightning_module(net: nn.Module) -> Any:
    L = oracle("lightning")

    class LanguageModel(L.LightningModule):
        """The LightningModule a user writes: the network is a submodule, the loss its causal LM loss."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            (ids,) = batch
            return self.net(input_ids=ids, labels=ids).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR, momentum=0.9)

    return LanguageModel()


def _fit(net: nn.Module, root: Path, ckpt_path: Path | None = None, checkpoints: bool = False) -> Any:
    L = oracle("lightning")
    # Every 2 steps, not every epoch: in Lightning 2.6 a resume from an every_n_epochs checkpoint re-runs epoch 0
    # (one batch) for any model, so it would not continue where the checkpoint was taken.
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)]
    trainer = L.Trainer(
        max_steps=LIGHTNING_STEPS,
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoints,
        callbacks=callbacks if checkpoints else None,
        default_root_dir=root,
    )
    module = _lightning_module(net)
    loader = DataLoader(TensorDataset(token_ids(batch=2 * 4, length=8, seed=3)), batch_size=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module


def _gpt2_adapter(seed: int) -> tuple[funcpeft.Params, funcpeft.Adapted]:
    return funcpeft.adapt(tiny_gpt2().double(), GPT2_CONFIG, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted Lightning fit of a bound adapter, checkpointing every epoch."""
    root = tmp_path_factory.mktemp("lightning")
    params, fwd = _gpt2_adapter(seed=0)
    initial = _values(params)
    module = _fit(fwd.bind(params), root, checkpoints=True)
    return {"initial": initial, "final": _values(params), "module": module, "root": root, "fwd": fwd}


def test_lightning_checkpoint_holds_exactly_the_adapter(lightning_run: dict) -> None:
    root, final = lightning_run["root"], lightning_run["final"]
    assert sorted(p.name for p in root.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    state = torch.load(root / "epoch=1-step=4.ckpt", weights_only=False)["state_dict"]
    expected = {f"net.adapter.{path}.{name}": t for path, entry in final.items() for name, t in entry.items()}
    assert_close(state, expected, rtol=0, atol=0)  # every adapter tensor, with its trained value, and nothing else
    base = lightning_run["fwd"].model.state_dict()
    assert len(state) == 4 < len(base)
    _assert_trained(final, lightning_run["initial"])


def test_lightning_resume_continues_as_the_uninterrupted_run(lightning_run: dict, tmp_path: Path) -> None:
    params, fwd = _gpt2_adapter(seed=1)  # another start: the checkpoint must restore the adapter
    assert not torch.equal(
        params["transformer.h.0.attn.c_attn"]["lora_B"],
        lightning_run["initial"]["transformer.h.0.attn.c_attn"]["lora_B"],
    )
    _fit(fwd.bind(params), tmp_path, ckpt_path=lightning_run["root"] / "epoch=0-step=2.ckpt")
    # Equal only if the adapter, the momentum buffers and the loop's position (epoch 1, step 2) were all restored.
    assert_close(_values(params), lightning_run["final"], rtol=0, atol=0)


def test_lightning_fit_equals_peft_get_peft_model(lightning_run: dict, tmp_path: Path) -> None:
    peft = oracle("peft")
    base = tiny_gpt2().double()  # the same weights as the funcpeft run's base (same seed)
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    loaded = peft.set_peft_model_state_dict(peft_model, funcpeft.to_peft_state_dict(lightning_run["initial"]))
    assert not loaded.unexpected_keys
    _fit(peft_model, tmp_path)

    got = peft.get_peft_model_state_dict(peft_model)
    expected = funcpeft.to_peft_state_dict(lightning_run["final"])
    assert sorted(got) == sorted(expected)
    assert_close(got, expected)
    _assert_trained(lightning_run["final"], lightning_run["initial"])
