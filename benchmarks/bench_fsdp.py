"""Peak memory per rank of LoRA training on an FSDP2-sharded base: 1 process vs 2 processes (gloo, CPU).

The base is a residual tower of MLP blocks (``--blocks`` x [LayerNorm, Linear(d, 4d), GELU, Linear(4d, d)],
float32, frozen; 400 MB at the defaults). It is built on the meta device and sharded with ``fully_shard`` per
block and at the root before its weights are materialised (``to_empty`` + init), as a large model is loaded for
FSDP: no rank ever holds all the weights at once. funcpeft adapts the sharded model (LoRA r=8 on both Linears of
every block) and runs ``--steps`` steps of ``torch.func.grad_and_value`` (or, with ``--grad autograd``,
``loss.backward()``) + ``average_gradients`` + adamw.

Each configuration runs in fresh processes (spawned), so ``ru_maxrss`` is that run's own peak. Reported per rank:
the resident set after the imports (the interpreter, torch and funcpeft: the same in every configuration), the
peak, and the peak less the imports (what the model, the adapter and the training step cost). Configurations:
``plain`` (1 process, no FSDP), ``fsdp x1`` (``fully_shard`` on a 1-rank mesh) and ``fsdp x2``; the ratio is
``fsdp x2`` / ``fsdp x1``. Expect ~0.5 of the base weights per rank plus what FSDP gathers for one block at a time
(its weights, freed after the block runs) and the activations, which are not sharded.

glibc's heap: by default freed blocks below a dynamic threshold (up to 32 MiB) stay in the process, in per-thread
arenas (gloo's threads have their own), so the resident set keeps the high-water mark of every transient buffer
and FSDP's all-gather buffers (one block's weights, gathered and freed per block, twice per step) make 2 ranks
peak *above* 1 (measured: 1.17). The children therefore run with ``MALLOC_MMAP_THRESHOLD_=65536`` (allocations of
64 KiB and more are mapped and returned on free), so the peak is the live memory's; ``--glibc-default`` keeps
glibc's default. A CUDA run has no such effect (the caching allocator reuses its blocks).

Run: ``python benchmarks/bench_fsdp.py [--blocks N] [--dim D] [--steps S] [--grad func|autograd]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

import optree
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

MB = 2**20


class Tower(nn.Module):
    """``blocks`` residual MLP blocks of width ``dim`` (4x hidden), then a LayerNorm."""

    def __init__(self, blocks: int, dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x)


def _rss_mb() -> float:
    """The current resident set (``VmRSS``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark reads Linux's /proc)")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def _init(model: nn.Module, generator: torch.Generator) -> None:
    """Fill the (local shards of the) materialised weights: LayerNorms as identity, Linears small and random."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            _local(module.weight).fill_(1.0)
            _local(module.bias).zero_()
        elif isinstance(module, nn.Linear):
            _local(module.weight).normal_(0.0, 0.02, generator=generator)
            _local(module.bias).zero_()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _rank(rank: int, world: int, fsdp: bool, args: argparse.Namespace, folder: str) -> None:
    import funcpeft
    from funcpeft import optim
    from funcpeft.distributed import average_gradients, broadcast_params

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        imports = _rss_mb()
        with torch.device("meta"):
            model = Tower(args.blocks, args.dim)
        model.requires_grad_(False)
        base_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
        if fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        _init(model, torch.Generator().manual_seed(rank))
        built = _peak_mb()

        config = funcpeft.LoraConfig(r=8, target_modules=r"blocks\.\d+\.[13]")  # both Linears of every block
        params, fwd = funcpeft.adapt(model, config)
        params = broadcast_params(params)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.tokens // world, args.dim, generator=g)  # this rank's share of the batch
        y = torch.randn(args.tokens // world, args.dim, generator=g)

        def loss_fn(p: funcpeft.Params) -> torch.Tensor:
            return nn.functional.mse_loss(fwd(p, x), y)

        def autograd(p: funcpeft.Params) -> tuple[funcpeft.Params, torch.Tensor]:
            leaves = optree.tree_map(lambda t: t.detach().requires_grad_(), p)
            loss = loss_fn(leaves)
            loss.backward()
            return optree.tree_map(lambda t: t.grad, leaves), loss.detach()

        grad_and_loss = torch.func.grad_and_value(loss_fn) if args.grad == "func" else autograd
        opt = optim.adamw(1e-3)
        state = opt.init(params)
        for _ in range(args.steps):
            grads, _loss = grad_and_loss(params)
            updates, state = opt.update(average_gradients(grads), state, params)
            params = optim.apply_updates(params, updates)
        result = {"imports": imports, "built": built, "peak": _peak_mb(), "base_mb": base_mb}
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(world: int, fsdp: bool, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_rank, args=(world, fsdp, args, folder), nprocs=world, start_method="spawn")
        return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=12, help="MLP blocks (default: 12)")
    parser.add_argument("--dim", type=int, default=1024, help="width d; hidden 4d (default: 1024)")
    parser.add_argument("--tokens", type=int, default=128, help="rows in the global batch (default: 128)")
    parser.add_argument(
        "--grad", choices=["func", "autograd"], default="func", help="torch.func.grad_and_value or loss.backward()"
    )
    parser.add_argument("--steps", type=int, default=3, help="training steps (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default: 1)")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's default mmap threshold")
    args = parser.parse_args()
    if not args.glibc_default:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned children's glibc at start

    rows = {"plain": run(1, False, args), "fsdp x1": run(1, True, args), "fsdp x2": run(2, True, args)}
    base = rows["plain"][0]["base_mb"]
    print(
        f"base weights: {base:.0f} MiB float32 ({args.blocks} blocks, d={args.dim}); batch {args.tokens} rows; "
        f"gradients: {args.grad}; MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'glibc default')}"
    )
    print(f"{'run':<9} {'rank':>4} {'imports MiB':>12} {'after build':>12} {'peak MiB':>9} {'peak-imports':>13}")
    for name, ranks in rows.items():
        for rank, r in enumerate(ranks):
            print(
                f"{name:<9} {rank:>4} {r['imports']:>12.0f} {r['built']:>12.0f} {r['peak']:>9.0f} "
                f"{r['peak'] - r['imports']:>13.0f}"
            )
    one = rows["fsdp x1"][0]
    two = max(rows["fsdp x2"], key=lambda r: r["peak"])
    built = (max(r["built"] for r in rows["fsdp x2"]) - two["imports"]) / (one["built"] - one["imports"])
    print(f"fsdp x2 / fsdp x1, after build less imports: {built:.2f}")
    print(f"fsdp x2 / fsdp x1, peak per rank:         {two['peak'] / one['peak']:.2f}")
    cost = (two["peak"] - two["imports"]) / (one["peak"] - one["imports"])
    print(f"fsdp x2 / fsdp x1, peak less imports:     {cost:.2f}")


if __name__ == "__main__":
    main()
