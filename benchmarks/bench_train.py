"""Training steps, eager and compiled, funcpeft vs PEFT, on the GPT-2-style 4x256 model (batch 8x64, LoRA r=8
on ``c_attn``, ``c_proj``, ``c_fc``: 16 layers).

A step is the loss, its gradients and an AdamW update. Variants, interleaved in one process (``_timing.measure``:
round-robin blocks, medians of per-repeat paired ratios):

- ``funcpeft autograd``: ``torch.autograd.grad`` of the loss through ``fwd``, ``funcpeft.optim.adamw``;
  ``compiled``: the same with the loss function under ``torch.compile`` (the update eager: ``_foreach`` ops);
- ``funcpeft.grad_and_value`` (when the installed funcpeft has it) and ``torch.func.grad_and_value``, eager;
- ``PEFT``: ``loss.backward()`` on ``get_peft_model`` of a copy of the same model holding the same adapter,
  ``torch.optim.AdamW(foreach=True)``; ``compiled``: ``torch.compile`` of the PEFT model's loss.

Printed, and written to ``--out``: each step / funcpeft eager autograd, and the compiled speed-ups (eager /
compiled) of funcpeft and PEFT, whose ratio is the issue's "compiled speed-up >= PEFT's" figure. First calls
(compilation) are reported in seconds. Run: ``python benchmarks/bench_train.py [--quick] [--threads 2] [--out F]``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from _timing import fmt, gpt2_config, measure, ratio

import funcpeft
from funcpeft import optim

TARGETS = ["c_attn", "c_proj", "c_fc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/bench_train.md", help="where to write the table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import peft

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval().requires_grad_(False)
    model.set_attn_implementation("eager")  # the same attention for every variant (torch.func needs it compiled)
    config = funcpeft.LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False)
    params, fwd = funcpeft.adapt(model, config, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(2))
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, target_modules=TARGETS)).eval()
    named = dict(peft_model.named_modules())
    with torch.no_grad():
        for path, entry in params.items():
            for name, t in entry.items():
                named["base_model.model." + path].get_submodule(f"{name}.default").weight.copy_(t)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def loss_fn(p):
        return loss_of(fwd(p, ids, use_cache=False).logits)

    with torch.no_grad():
        torch.testing.assert_close(loss_fn(params), loss_of(peft_model(input_ids=ids, use_cache=False).logits))

    opt = optim.adamw(1e-4)
    state = {"p": params, "s": opt.init(params)}
    leaves = [t for e in params.values() for t in e.values()]

    def autograd_step(loss: Callable = loss_fn) -> Callable[[], object]:
        def run() -> None:
            grads_list = torch.autograd.grad(loss(params), leaves)
            it = iter(grads_list)
            grads = {k: {n: next(it) for n in e} for k, e in params.items()}
            opt.update(grads, state["s"], params)  # the update's cost; params stay the same for every variant

        return run

    def functional_step(grad_and_value: Callable) -> Callable[[], object]:
        def run() -> None:
            grads, _ = grad_and_value(loss_fn)(params)
            opt.update(grads, state["s"], params)

        return run

    peft_leaves = [p for p in peft_model.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(peft_leaves, lr=0.0, foreach=True)  # lr 0: the same weights every step

    def peft_step(forward: Callable) -> Callable[[], object]:
        def run() -> None:
            loss_of(forward(input_ids=ids, use_cache=False).logits).backward()
            torch_opt.step()
            torch_opt.zero_grad(set_to_none=True)

        return run

    variants = {
        "funcpeft autograd": autograd_step(),
        "funcpeft autograd, compiled loss": autograd_step(torch.compile(loss_fn)),
        "torch.func.grad_and_value": functional_step(torch.func.grad_and_value),
        "PEFT": peft_step(peft_model),
        "PEFT, compiled": peft_step(torch.compile(peft_model)),
    }
    if hasattr(funcpeft, "grad_and_value"):
        variants["funcpeft.grad_and_value"] = functional_step(funcpeft.grad_and_value)
    first = {}
    for name, run in variants.items():
        start = time.perf_counter()
        run()
        first[name] = time.perf_counter() - start
    t = measure(variants, warmup=2, repeats=6 if args.quick else 15, inner=2 if args.quick else 3)

    lines = [
        f"bench_train.py, {datetime.date.today()}, {args.threads} threads, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}; GPT-2 4x256, batch 8x64, LoRA r=8 on 16 layers, eager attention",
        "",
        "| step | / funcpeft eager autograd: median [quartiles] | first call s |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {fmt(ratio(t, name, 'funcpeft autograd'))} | {first[name]:.1f} |" for name in variants]
    ours = ratio(t, "funcpeft autograd", "funcpeft autograd, compiled loss")
    theirs = ratio(t, "PEFT", "PEFT, compiled")
    verdict = "met" if ours[0] >= theirs[0] else "MISSED"
    lines += [
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
        f"| compiled speed-up over eager: funcpeft | {fmt(ours)}x | >= PEFT's ({theirs[0]:.3f}x) | {verdict} |",
        f"| compiled speed-up over eager: PEFT | {fmt(theirs)}x | report | |",
        f"| compiled funcpeft / compiled PEFT | {fmt(ratio(t, 'funcpeft autograd, compiled loss', 'PEFT, compiled'))}"
        " | report | |",
    ]
    if "funcpeft.grad_and_value" in variants:
        g = ratio(t, "funcpeft.grad_and_value", "funcpeft autograd")
        lines.append(
            f"| funcpeft.grad_and_value / autograd | {fmt(g)} | <= 1.02 | {'met' if g[0] <= 1.02 else 'MISSED'} |"
        )
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
