"""``funcpeft.grad_and_value`` against plain autograd and ``torch.func.grad_and_value``: one gradient step each.

On bench_core.py's GPT-2-style models (``GPT2LMHeadModel``, vocabulary 1000, dropout 0, base frozen) with LoRA
r=8 on every linear layer (``init_lora_weights=False``): 12 layers, width 64, batch 1x16 (Python overhead
dominates) and 4 layers, width 256, batch 8x64. A step computes the next-token cross-entropy of
``fwd(params, ids)`` and its gradients with respect to the adapter, returned as a tree shaped like ``params``:

- ``funcpeft``: ``funcpeft.grad_and_value(loss_fn)(params)``;
- ``backward``: plain autograd as a training loop writes it: ``.grad = None`` on every leaf, ``loss.backward()``,
  the leaves' ``.grad`` read into a tree (the denominator of the target);
- ``autograd.grad``: ``torch.autograd.grad(loss, leaves)`` rebuilt into a tree by hand (the floor: nothing but the
  gradient computation);
- ``torch.func``: ``torch.func.grad_and_value(loss_fn)(params)``.

All four are checked to give the same loss and gradients before anything is timed. Variants run interleaved
(``_timing.measure``: blocks round-robin, order rotated every repeat); ratios are medians of per-repeat paired
ratios [interquartile range]; beside them the ratio of the fastest repeats (other processes only ever add time,
so on a shared machine the minima are the steadier figure). Target (issue 13): funcpeft / backward <= 1.02 at
both sizes, judged on the median.

Run: ``python benchmarks/bench_grad.py [--quick] [--threads 2] [--out benchmarks/results/bench_grad.md]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from _timing import fmt, gpt2_config, measure, ratio

import funcpeft

TARGET = 1.02


def build(n_layer: int, n_embd: int, batch: int, seq: int) -> dict[str, Callable[[], Any]]:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config(n_layer, n_embd, 4)).requires_grad_(False)
    config = funcpeft.LoraConfig(
        r=8, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False
    )
    params, fwd = funcpeft.adapt(model, config, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(2))
    leaves = [t for e in params.values() for t in e.values()]

    def loss_fn(p: Any) -> torch.Tensor:
        logits = fwd(p, ids, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def tree(values: Any) -> Any:
        it = iter(values)
        return {k: {n: next(it) for n in e} for k, e in params.items()}

    def backward() -> Any:
        for t in leaves:
            t.grad = None
        loss = loss_fn(params)
        loss.backward()
        return tree(t.grad for t in leaves), loss.detach()

    def autograd_grad() -> Any:
        loss = loss_fn(params)
        return tree(torch.autograd.grad(loss, leaves)), loss.detach()

    return {
        "funcpeft": lambda: funcpeft.grad_and_value(loss_fn)(params),
        "backward": backward,
        "autograd.grad": autograd_grad,
        "torch.func": lambda: torch.func.grad_and_value(loss_fn)(params),
    }


def check_agree(programs: dict[str, Callable[[], Any]]) -> None:
    grads, loss = programs["funcpeft"]()
    for name, run in programs.items():
        other, other_loss = run()
        torch.testing.assert_close(loss, other_loss, msg=lambda m, n=name: f"loss vs {n}: {m}")
        for path in grads:
            for key in grads[path]:
                torch.testing.assert_close(grads[path][key], other[path][key], rtol=1e-4, atol=1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--out", default="benchmarks/results/bench_grad.md", help="where to write the table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    q = args.quick
    sizes = [
        ("12L, 64d, 1x16", (12, 64, 1, 16), dict(warmup=10, repeats=10 if q else 40, inner=10)),
        ("4L, 256d, 8x64", (4, 256, 8, 64), dict(warmup=3, repeats=6 if q else 30, inner=3)),
    ]
    lines = [
        f"bench_grad.py, {datetime.date.today()}, {args.threads} threads, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}{', --quick' if q else ''}",
        "",
        "Ratios: median over repeats of the paired per-repeat ratio [interquartile range].",
        "",
        "| model, batch | funcpeft / backward | (minima) | funcpeft / autograd.grad | torch.func / backward "
        "| target funcpeft / backward | met | ms per step: backward, funcpeft, torch.func |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print(*lines, sep="\n", flush=True)
    for label, shape, timing in sizes:
        programs = build(*shape)
        check_agree(programs)
        times = measure(programs, **timing)
        ours = ratio(times, "funcpeft", "backward")
        ms = ", ".join(f"{statistics.median(times[n]) * 1e3:.2f}" for n in ("backward", "funcpeft", "torch.func"))
        row = (
            f"| {label} | {fmt(ours)} | {min(times['funcpeft']) / min(times['backward']):.3f} "
            f"| {fmt(ratio(times, 'funcpeft', 'autograd.grad'))} "
            f"| {fmt(ratio(times, 'torch.func', 'backward'))} | <= {TARGET:.2f} "
            f"| {'yes' if ours[0] <= TARGET else '**no**'} | {ms} |"
        )
        print(row, flush=True)
        lines.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
