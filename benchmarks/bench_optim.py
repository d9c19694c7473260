"""How fast is a funcpeft.optim step compared with torch.optim's foreach implementation?

One optimizer step on the same tree in both: 100 LoRA modules, each ``lora_A`` (8, 625) and ``lora_B`` (625, 8),
so 200 leaves and 1,000,000 float32 parameters, on 2 CPU threads.

- ``funcpeft``: ``updates, state = opt.update(grads, state, params); params = apply_updates(params, updates)``
  (pure: new params, new state, nothing mutated);
- ``torch``: ``opt.step()`` of ``torch.optim.<Optimizer>(foreach=True)`` with ``.grad`` set (in place).

The gradients are the same fixed tree every step. Before anything is timed, both run the same 5 steps from
the same start and the parameters are compared, so no row can time a wrong program. After warm-up, steps of the
two run in back-to-back pairs (the order alternating every pair); the ratio is the median of the per-pair ratios
(paired, so load that comes and goes cancels), with the interquartile range in brackets, and the absolute
columns are median step times. Target for AdamW: ratio <= 1.2.

The heap matters on CPU. funcpeft's update is pure: every step allocates new moments, updates and params (four
tensors the size of the params) where torch writes in place. In a process that never frees a large tensor,
glibc returns freed memory at the top of the heap to the OS after each step, and one set of the next step's
fresh tensors page-faults (about 900 faults per step here). A training step frees activations, and glibc then
keeps freed memory for reuse: its trim threshold follows the largest freed block, up to 32 MB (measured here: one
freed block of 8 MB or more removes the faults, 2 MB halves them). The benchmark frees one 32 MB buffer to stand
for that; the first row measures AdamW before it, as in a process that does nothing but optimizer steps.

On 2 threads both sides call ``sqrt`` on every leaf, which ATen parallelises from 4096 elements on: one OpenMP
region per leaf. On a machine shared with other jobs those regions wait for descheduled threads and the wall
clock becomes noise for both; ``--clock cpu`` (this process's CPU time) or ``--threads 1`` then compare the work.

Run from the repository root::

    python benchmarks/bench_optim.py               # about 20 seconds on an idle machine
    python benchmarks/bench_optim.py --quick       # a few seconds, noisier
    python benchmarks/bench_optim.py --clock cpu   # on a busy machine
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import optree
import torch
from _timing import recorded
from torch import Tensor

import funcpeft.optim as fo

MODULES, RANK, WIDTH = 100, 8, 625


def make_tree(seed: int) -> dict[str, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.proj": {
            "lora_A": torch.randn(RANK, WIDTH, generator=g),
            "lora_B": torch.randn(WIDTH, RANK, generator=g),
        }
        for i in range(MODULES)
    }


CASES: dict[str, tuple[Callable[[], fo.GradientTransformation], Callable[[list[Tensor]], torch.optim.Optimizer]]] = {
    "AdamW": (lambda: fo.adamw(1e-3), lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
    "Adam": (lambda: fo.adam(1e-3), lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)),
    "SGD (momentum 0.9, wd 1e-4)": (
        lambda: fo.sgd(1e-2, momentum=0.9, weight_decay=1e-4),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=1e-4, foreach=True),
    ),
}


class Runner:
    """Both implementations of one optimizer, stepping the same start with the same gradients."""

    def __init__(
        self, make_fp: Callable[[], fo.GradientTransformation], make_torch: Callable[..., torch.optim.Optimizer]
    ):
        start = make_tree(0)
        self.grads = make_tree(1)
        self.params = optree.tree_map(lambda t: t.clone().requires_grad_(True), start)
        self.opt = make_fp()
        self.state = self.opt.init(self.params)
        self.leaves = [t.clone().requires_grad_(True) for t in optree.tree_leaves(start)]
        for p, g in zip(self.leaves, optree.tree_leaves(self.grads), strict=True):
            p.grad = g.clone()
        self.torch_opt = make_torch(self.leaves)

    def step_funcpeft(self) -> None:
        updates, self.state = self.opt.update(self.grads, self.state, self.params)
        self.params = fo.apply_updates(self.params, updates)

    def step_torch(self) -> None:
        self.torch_opt.step()

    def check(self) -> None:
        for a, b in zip(optree.tree_leaves(self.params), self.leaves, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def warm_heap() -> None:
    """Free a 32 MB buffer, as a training step frees its activations: glibc then keeps freed memory for reuse
    instead of returning it to the OS after every optimizer step (see the module docstring)."""
    buffer = torch.empty(8_000_000)
    buffer.fill_(0.0)
    del buffer


def measure(runner: Runner, pairs: int, clock: Callable[[], float]) -> tuple[float, float, float, float, float]:
    """Time ``pairs`` back-to-back pairs of steps (order alternating); the ratio is the median of the per-pair
    ratios, so load that comes and goes on a shared machine hits both sides of a pair alike."""
    fns = [runner.step_funcpeft, runner.step_torch]
    for _ in range(10):  # warm-up
        for f in fns:
            f()
    gc.collect()
    times: dict[Callable[[], None], list[float]] = {f: [] for f in fns}
    for i in range(pairs):
        for f in fns if i % 2 == 0 else fns[::-1]:
            t0 = clock()
            f()
            times[f].append(clock() - t0)
    ours, theirs = times[fns[0]], times[fns[1]]
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q1, q3, statistics.median(ours), statistics.median(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time, steadier on a machine shared with other jobs",
    )
    parser.add_argument("--out", default="benchmarks/results/bench_optim.md", help="where to write the results")
    args = parser.parse_args()
    with recorded(args.out):
        torch.set_num_threads(args.threads)
        pairs = 60 if args.quick else 400
        clock = time.perf_counter if args.clock == "wall" else time.process_time

        def row(name: str, label: str) -> tuple:
            runner = Runner(*CASES[name])
            for _ in range(5):
                runner.step_funcpeft()
                runner.step_torch()
            runner.check()
            return (label, *measure(runner, pairs, clock))

        rows = [row("AdamW", "AdamW, optimizer-only process (nothing large freed yet)")]
        warm_heap()
        rows += [row(name, f"{name}, in a training process") for name in CASES]

        leaves = make_tree(0)
        count = sum(t.numel() for t in optree.tree_leaves(leaves))
        print(
            f"Optimizer step, funcpeft.optim vs torch.optim(foreach=True): {len(optree.tree_leaves(leaves))} leaves, "
            f"{count:,} float32 parameters, {torch.get_num_threads()} threads, {args.clock} clock, {pairs} pairs, "
            f"torch {torch.__version__}\n"
        )
        print("| optimizer | funcpeft / torch | funcpeft (ms) | torch (ms) |")
        print("|---|---|---|---|")
        for name, ratio, q1, q3, ours, theirs in rows:
            print(f"| {name} | {ratio:.2f} [{q1:.2f}-{q3:.2f}] | {ours * 1e3:.2f} | {theirs * 1e3:.2f} |")


if __name__ == "__main__":
    main()
