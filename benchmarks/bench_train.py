"""Compiled vs eager JAX-style training step on the GPT-2-style 4x256 model.

A step is ``grad_and_value(loss_fn)(params)`` (or plain autograd), an ``adamw`` update and ``apply_updates``.
Measured in one process on 2 CPU threads: eager, and the step under ``torch.compile`` (compile time reported
separately: the first call, which traces and compiles). Two gradient paths:

- ``torch.func.grad_and_value``: the functional path, compiled as a whole step (loss, gradients, update). Under
  ``torch.compile`` every op needs a rule for differentiating its backward: on CPU, SDPA attention has none
  (``_scaled_dot_product_flash_attention_for_cpu_backward``), so the compiled functional step needs the model's
  eager attention (``model.set_attn_implementation("eager")``); the SDPA variant is listed to show the error.
- plain autograd (``loss.backward()`` through ``fwd``): compiled with ``torch.compile`` on the loss function,
  the optimizer update running eagerly (``torch._foreach_*`` ops, already fused).

Run: ``python benchmarks/bench_train.py [--steps N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
import transformers
from _timing import gpt2_config

import funcpeft
from funcpeft import optim


def build(attention: str = "sdpa"):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    model.set_attn_implementation(attention)
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(r=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    ids = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(1))
    return params, fwd, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    params, fwd, ids = build()
    _, fwd_eager_attention, _ = build("eager")
    opt = optim.adamw(1e-3)

    def loss_fn(p, f=fwd):
        logits = f(p, ids, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def functional_step(p, state, f=fwd):
        grads, loss = torch.func.grad_and_value(lambda q: loss_fn(q, f))(p)
        updates, state = opt.update(grads, state, p)
        return optim.apply_updates(p, updates), state, loss

    def functional_step_eager_attention(p, state):
        return functional_step(p, state, fwd_eager_attention)

    compiled_loss = torch.compile(loss_fn)
    leaves = lambda p: [t for e in p.values() for t in e.values()]  # noqa: E731

    def autograd_step(p, state, loss_function=loss_fn):
        loss = loss_function(p)
        grads_list = torch.autograd.grad(loss, leaves(p))
        it = iter(grads_list)
        grads = {k: {n: next(it) for n in e} for k, e in p.items()}
        updates, state = opt.update(grads, state, p)
        return optim.apply_updates(p, updates), state, loss.detach()

    variants = {
        "eager, torch.func.grad_and_value": functional_step,
        "compiled, torch.func.grad_and_value (SDPA attention)": torch.compile(functional_step),
        "eager, torch.func.grad_and_value, eager attention": functional_step_eager_attention,
        "compiled, torch.func.grad_and_value, eager attention": torch.compile(functional_step_eager_attention),
        "eager, autograd": autograd_step,
        "compiled loss, autograd": lambda p, s: autograd_step(p, s, compiled_loss),
    }
    compile_time, failed = {}, {}
    for name, step in variants.items():
        state = opt.init(params)
        start = time.perf_counter()
        try:
            step(params, state)
        except Exception as err:  # noqa: BLE001 - report what torch refuses instead of crashing the benchmark
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:150]}"
        compile_time[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in variants if name not in failed}
    for _ in range(args.repeats):
        for name in times:
            state, p = opt.init(params), params
            start = time.perf_counter()
            for _ in range(args.steps):
                p, state, loss = variants[name](p, state)
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    eager = statistics.median(times["eager, autograd"])
    print(f"torch {torch.__version__}, {args.threads} threads, GPT-2 4x256, batch 8x64, LoRA r=8 on 16 layers\n")
    print("| step | ms per step | vs eager autograd | first call (compile) s |")
    print("|---|---|---|---|")
    for name in variants:
        if name in failed:
            print(f"| {name} | fails: {failed[name]} | - | - |")
            continue
        ms = statistics.median(times[name])
        print(f"| {name} | {ms:.1f} | {eager / ms:.2f}x | {compile_time[name]:.1f} |")


if __name__ == "__main__":
    main()
