"""Every method's training step, funcpeft / PEFT, on the same model holding the same adapter.

The model is a Llama-architecture decoder from a config (4 layers, d=256, 4 heads, MLP 1024, vocab 1000, eager
attention), adapted on ``q_proj`` and ``v_proj`` by LoRA, DoRA, IA3, AdaLoRA, LoHa, LoKr, OFT and VeRA with
PEFT's field values. Each adapter is perturbed away from its initialisation (so no method times a no-op),
written into ``peft.get_peft_model`` of a copy of the model with ``funcpeft.to_peft_state_dict`` +
``set_peft_model_state_dict``, and the logits are checked equal before anything is timed. A step is the forward
with labels and ``backward`` to the adapter tensors, batch 8x64; variants interleaved in one process
(``_timing.measure``), medians of per-repeat paired ratios. Run: ``python benchmarks/bench_methods.py [--quick]
[--out benchmarks/results/bench_methods.md]``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers
from _timing import fmt, measure, ratio

import funcpeft

TARGETS = ["q_proj", "v_proj"]
METHODS: dict[str, tuple[Callable[..., object], Callable[..., object], dict]] = {
    "LoRA": (funcpeft.LoraConfig, peft.LoraConfig, {"r": 8, "init_lora_weights": False}),
    "DoRA": (funcpeft.LoraConfig, peft.LoraConfig, {"r": 8, "use_dora": True, "init_lora_weights": False}),
    "IA3": (funcpeft.IA3Config, peft.IA3Config, {"feedforward_modules": []}),
    "AdaLoRA": (funcpeft.AdaLoraConfig, peft.AdaLoraConfig, {"init_r": 8, "target_r": 4, "total_step": 100}),
    "LoHa": (funcpeft.LoHaConfig, peft.LoHaConfig, {"r": 8, "init_weights": False}),
    "LoKr": (funcpeft.LoKrConfig, peft.LoKrConfig, {"r": 8, "init_weights": False}),
    "OFT": (funcpeft.OFTConfig, peft.OFTConfig, {"r": 0, "oft_block_size": 32}),
    "VeRA": (funcpeft.VeraConfig, peft.VeraConfig, {"r": 64}),
}


def model() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=1000, max_position_embeddings=128, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().requires_grad_(False)


def pair(base: torch.nn.Module, name: str, ids: torch.Tensor):
    ours_cls, theirs_cls, kwargs = METHODS[name]
    config = ours_cls(target_modules=TARGETS, **kwargs)
    params, fwd = funcpeft.adapt(base, config, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # away from the initialisation; a frozen shared entry (VeRA's projections) stays
        params = {
            path: {
                k: (v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if path else v).detach()
                for k, v in entry.items()
            }
            for path, entry in params.items()
        }
    params = {p: {k: v.requires_grad_() for k, v in e.items()} for p, e in params.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), theirs_cls(target_modules=TARGETS, **kwargs)).eval()
        peft.set_peft_model_state_dict(theirs, funcpeft.to_peft_state_dict(params, config))
    with torch.no_grad():
        torch.testing.assert_close(
            fwd(params, ids, use_cache=False).logits, theirs(input_ids=ids, use_cache=False).logits
        )
    leaves = [t for path, e in params.items() if path for t in e.values()]
    peft_leaves = [p for p in theirs.parameters() if p.requires_grad]

    def ours_step() -> None:
        torch.autograd.grad(fwd(params, ids, labels=ids, use_cache=False).loss, leaves)

    def theirs_step() -> None:
        torch.autograd.grad(theirs(input_ids=ids, labels=ids, use_cache=False).loss, peft_leaves)

    return ours_step, theirs_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/bench_methods.md", help="where to write the table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    base = model()
    ids = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(3))
    lines = [
        f"bench_methods.py, {datetime.date.today()}, {args.threads} threads, torch {torch.__version__}, "
        f"peft {peft.__version__}, load average {os.getloadavg()[0]:.1f}; Llama 4x256, q_proj+v_proj, batch 8x64",
        "",
        "| method | training step funcpeft / PEFT: median [quartiles] | target | |",
        "|---|---|---|---|",
    ]
    print(*lines, sep="\n", flush=True)
    for name in METHODS:
        ours, theirs = pair(base, name, ids)
        t = measure({"funcpeft": ours, "PEFT": theirs}, warmup=2, repeats=6 if args.quick else 16, inner=2)
        stats = ratio(t, "funcpeft", "PEFT")
        lines.append(f"| {name} | {fmt(stats)} | <= 1.0 | {'met' if stats[0] <= 1.0 else 'MISSED'} |")
        print(lines[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
