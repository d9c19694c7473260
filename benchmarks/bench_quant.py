"""Large bases: LoRA training and inference on quantized bases, the peak memory of a training step per base
format, and the cost of passing the base as a pytree (``fwd(params, x, base=...)``); funcpeft vs PEFT.

The model is a GPT-2-sized decoder built with ``nn.Linear`` layers (transformers' Llama architecture from a config:
4 layers, d=256, 4 heads, MLP 1024, vocab 1000; ``--wide`` adds d=1024, 16 heads, MLP 4096), since torchao's
``quantize_`` and ``to_nf4`` quantize ``nn.Linear`` weights and GPT-2's ``Conv1D`` is not one. LoRA r=8 on every
linear layer of the decoder (QLoRA's recipe), the head and embeddings float and frozen. Base formats: float32,
bfloat16, torchao int8 weight-only (``Int8WeightOnlyConfig``) and NF4 (``to_nf4``, torchtune's QLoRA format) on
every decoder linear layer. PEFT runs on a deep copy of the same quantized model (``get_peft_model``), with the
same adapter copied in; the outputs are checked equal before anything is timed.

- **time** (interleaved, medians of per-repeat paired ratios, ``_timing.measure``): a training step
  (forward with labels, ``backward``) and ``no_grad`` inference on the int8 and NF4 bases, batch 8x128;
  ``base model`` is the frozen quantized model alone (no adapter), the floor any adapter sits on.
- **memory**: the peak resident memory a training step adds (batch 8x512), per format, funcpeft / PEFT, read as
  Linux's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` before each step) less the resident
  set before the step; variants interleaved, median of 3. Also what stays resident after the step (gradients
  dropped): funcpeft must keep nothing alive that PEFT does not. A peak above PEFT's by at most 2 MiB reads "parity",
  not "met". The process runs with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (it re-executes itself with it), so freed buffers leave the resident set as
  they would on a CUDA caching allocator's reuse (see ``bench_fsdp.py``).
- **base=**: ``fwd(params, x, base=state)`` with the model's whole state dict passed / ``fwd(params, x)``, no_grad
  on the 4x256 GPT-2 (``_timing.gpt2_config``) at 1x16 and 8x128.

FSDP2's memory per rank is ``bench_fsdp.py``'s figure. Run: ``python benchmarks/bench_quant.py [--quick]
[--wide] [--threads 2] [--out benchmarks/results/bench_quant.md]``; the table is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from _timing import fmt, gpt2_config, measure, ratio
from torch import nn

import funcpeft

MMAP = "65536"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FORMATS = ("float32", "bfloat16", "int8", "nf4")


def llama(d: int, heads: int) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=d, intermediate_size=4 * d, num_hidden_layers=4, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=1000, max_position_embeddings=512, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().requires_grad_(False)


def quantized(model: nn.Module, base: str) -> nn.Module:
    """A copy of ``model`` with its decoder's linear layers in format ``base``."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_, to_nf4

    model = copy.deepcopy(model)
    if base == "bfloat16":
        return model.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for layer in model.model.layers:
            if base == "int8":
                quantize_(layer, Int8WeightOnlyConfig())
            elif base == "nf4":
                for m in layer.modules():
                    if isinstance(m, nn.Linear):
                        m.weight = nn.Parameter(to_nf4(m.weight.detach(), 64, 256), requires_grad=False)
    return model


class Pair:
    """funcpeft and PEFT on two copies of one base, holding the same adapter (random B: the update is not zero)."""

    def __init__(self, model: nn.Module) -> None:
        import peft

        config = funcpeft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        # Both libraries' default adapter dtype: float32, also on a bfloat16 base (PEFT's autocast_adapter_dtype)
        self.params, self.fwd = funcpeft.adapt(model, config, generator=torch.Generator().manual_seed(1))
        peft_config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        self.model = model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.peft = peft.get_peft_model(copy.deepcopy(model), peft_config).eval()
        named = dict(self.peft.named_modules())
        with torch.no_grad():
            for path, entry in self.params.items():
                for name, t in entry.items():
                    named["base_model.model." + path].get_submodule(f"{name}.default").weight.copy_(t)
        self.peft_leaves = [p for p in self.peft.parameters() if p.requires_grad]

    def train_step(self, ids: torch.Tensor) -> Callable[[], object]:
        def run() -> None:
            self.fwd(self.params, ids, labels=ids, use_cache=False).loss.backward()
            for entry in self.params.values():
                for t in entry.values():
                    t.grad = None

        return run

    def peft_train_step(self, ids: torch.Tensor) -> Callable[[], object]:
        def run() -> None:
            self.peft(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for t in self.peft_leaves:
                t.grad = None

        return run

    def check(self, ids: torch.Tensor) -> None:
        with torch.no_grad():
            got = self.fwd(self.params, ids, use_cache=False).logits
            want = self.peft(input_ids=ids, use_cache=False).logits
        tol = 5e-2 if got.dtype == torch.bfloat16 else 1e-3  # bfloat16: a few units in the last place of the logits
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def infer(call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return call()

    return run


def timing(quick: bool) -> list[str]:
    rows = []
    model = llama(256, 4)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (8, 128), generator=gen)
    for base in ("int8", "nf4"):
        pair = Pair(quantized(model, base))
        pair.check(ids[:2])
        base_model = pair.model

        def base_step(m: nn.Module = base_model) -> None:
            # the frozen base alone: the same loss, the gradient reaching the embeddings' output only
            h = m.model.embed_tokens(ids).requires_grad_()
            m(inputs_embeds=h, labels=ids, use_cache=False).loss.backward()

        t = measure(
            {
                "funcpeft": pair.train_step(ids),
                "peft": pair.peft_train_step(ids),
                "base": base_step,
                "funcpeft infer": infer(lambda p=pair: p.fwd(p.params, ids, use_cache=False)),
                "peft infer": infer(lambda p=pair: p.peft(input_ids=ids, use_cache=False)),
                "base infer": infer(lambda m=base_model: m(input_ids=ids, use_cache=False)),
            },
            warmup=1,
            repeats=4 if quick else 10,
            inner=1 if quick else 2,
        )
        step, inference = ratio(t, "funcpeft", "peft"), ratio(t, "funcpeft infer", "peft infer")
        rows.append(
            f"| training step, {base} base, 8x128: funcpeft / PEFT | {fmt(step)} | <= 0.95 | {_verdict(step, 0.95)} "
            f"| base alone / PEFT {fmt(ratio(t, 'base', 'peft'))} |"
        )
        rows.append(
            f"| no_grad inference, {base} base, 8x128: funcpeft / PEFT | {fmt(inference)} | <= 0.95 "
            f"| {_verdict(inference, 0.95)} | base alone / PEFT {fmt(ratio(t, 'base infer', 'peft infer'))} |"
        )
        print(*rows[-2:], sep="\n", flush=True)
        del pair
        gc.collect()
    return rows


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def step_memory(run: Callable[[], object]) -> tuple[float, float]:
    """MiB: the peak a call of ``run`` adds to the resident set, and what it leaves resident."""
    gc.collect()
    before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    run()
    gc.collect()
    return (_rss_kb("VmHWM") - before) / 1024, (_rss_kb("VmRSS") - before) / 1024


def memory(d: int, heads: int) -> list[str]:
    rows = []
    model = llama(d, heads)
    ids = torch.randint(0, 1000, (8, 512), generator=torch.Generator().manual_seed(4))
    for base in FORMATS:
        pair = Pair(quantized(model, base))
        pair.check(ids[:1, :32])
        programs = {"funcpeft": pair.train_step(ids), "peft": pair.peft_train_step(ids)}
        for run in programs.values():
            run()  # warm: lazily created state, the allocator's first arenas
        got: dict[str, list[tuple[float, float]]] = {name: [] for name in programs}
        for rep in range(3):
            for name in list(programs)[rep % 2 :] + list(programs)[: rep % 2]:
                got[name].append(step_memory(programs[name]))
        peak = {n: statistics.median(p for p, _ in v) for n, v in got.items()}
        kept = {n: statistics.median(k for _, k in v) for n, v in got.items()}
        r, extra = peak["funcpeft"] / peak["peft"], peak["funcpeft"] - peak["peft"]
        verdict = "met" if r <= 1.0 else (f"MISSED by {extra:.1f} MiB" if extra > 2 else f"parity (+{extra:.1f} MiB)")
        rows.append(
            f"| peak memory of a training step, {base} base, 4x{d} 8x512: funcpeft / PEFT | {r:.3f} "
            f"({peak['funcpeft']:.0f} / {peak['peft']:.0f} MiB) | <= 1.0 | {verdict} "
            f"| kept after the step: {kept['funcpeft']:.0f} / {kept['peft']:.0f} MiB |"
        )
        print(rows[-1], flush=True)
        del pair, programs
        gc.collect()
    return rows


def base_tree(quick: bool) -> list[str]:
    rows = []
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval().requires_grad_(False)
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(r=8, target_modules=["c_attn"]))
    state = dict(model.state_dict())
    gen = torch.Generator().manual_seed(5)
    for shape in ((1, 16), (8, 128)):
        x = torch.randint(0, 1000, shape, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(fwd(params, x, base=state).logits, fwd(params, x).logits, rtol=0, atol=0)
        small = shape[1] == 16
        t = measure(
            {
                "base=": infer(lambda x=x: fwd(params, x, base=state)),
                "plain": infer(lambda x=x: fwd(params, x)),
            },
            warmup=20 if small else 3,
            repeats=(10 if quick else 30) if small else (6 if quick else 16),
            inner=20 if small else 3,
        )
        stats = ratio(t, "base=", "plain")
        rows.append(
            f"| `fwd(params, x, base=state_dict)` / `fwd(params, x)`, GPT-2 4x256 {shape[0]}x{shape[1]} | "
            f"{fmt(stats)} | <= 1.05 | {_verdict(stats, 1.05)} | |"
        )
        print(rows[-1], flush=True)
    return rows


def _verdict(stats: tuple[float, float, float], target: float) -> str:
    return "met" if stats[0] <= target else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--wide", action="store_true", help="also the memory of the d=1024 model")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--out", default="benchmarks/results/bench_quant.md", help="where to write the table")
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP:  # glibc reads it at start: run again with it set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP})
    torch.set_num_threads(args.threads)
    header = [
        f"bench_quant.py, {datetime.date.today()}, {args.threads} threads, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}",
        "",
        "| figure | measured: median [quartiles] | target | | notes |",
        "|---|---|---|---|---|",
    ]
    print(*header, sep="\n", flush=True)
    rows = timing(args.quick) + memory(256, 4) + (memory(1024, 16) if args.wide else []) + base_tree(args.quick)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + rows) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
