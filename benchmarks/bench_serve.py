"""Decoding with adapters: funcpeft's ``fwd.generate`` against the base model and PEFT, in one process.

GPT-2-style model (4 layers, width 256, vocabulary 1000), LoRA r=8 on every linear layer (``c_attn``,
``c_proj``, ``c_fc``), non-trivial adapters; batch 8 prompts of 16 tokens, 32 new tokens, greedy, KV cache.
Programs, all checked to produce the same tokens as their PEFT counterpart before anything is timed:

- ``base``: ``model.generate``;
- ``funcpeft one``: ``fwd.generate(params, ...)``, one adapter for the whole batch;
- ``funcpeft mixed``: ``fwd.generate(stacked, ..., adapter_ids=arange(8))``, 8 distinct adapters in one batch;
- ``PEFT one`` / ``PEFT mixed``: ``generate`` on a PeftModel holding the same 8 adapters, the second with
  ``adapter_names=``.

Ratios are medians over repeats of paired per-repeat ratios [interquartile range] (``_timing.measure``).

Run from the repository root::

    python benchmarks/bench_serve.py           # about a minute
    python benchmarks/bench_serve.py --quick   # about 20 seconds, noisier
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import _timing as timing
import peft
import torch
import transformers
from _timing import fmt, gpt2_config, ratio

import funcpeft

K, PROMPT, NEW, BATCH = 8, 16, 32, 8
TARGETS = ["c_attn", "c_proj", "c_fc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    config = funcpeft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    _, fwd = funcpeft.adapt(model, config)
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(K)]
    stacked = funcpeft.stack(adapters)
    names = [f"a{k}" for k in range(K)]
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS),
                               adapter_name=names[0])  # fmt: skip
    for name in names[1:]:
        twin.add_adapter(name, peft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
    for name, adapter in zip(names, adapters, strict=True):
        peft.set_peft_model_state_dict(twin, funcpeft.to_peft_state_dict(adapter, config), adapter_name=name)
    twin.eval()
    twin.set_adapter(names[0])
    ids = torch.randint(0, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    adapter_ids = torch.arange(BATCH) % K
    gen = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    programs = {
        "base": lambda: model.generate(ids, **gen),
        "funcpeft one": lambda: fwd.generate(adapters[0], ids, **gen),
        "funcpeft mixed": lambda: fwd.generate(stacked, ids, adapter_ids=adapter_ids, **gen),
        "PEFT one": lambda: twin.generate(input_ids=ids, **gen),
        "PEFT mixed": lambda: twin.generate(input_ids=ids, adapter_names=[names[k] for k in adapter_ids], **gen),
    }
    assert torch.equal(programs["funcpeft one"](), programs["PEFT one"]())
    assert torch.equal(programs["funcpeft mixed"](), programs["PEFT mixed"]())
    repeats, inner = (5, 1) if args.quick else (12, 2)
    times = timing.measure(programs, warmup=1, repeats=repeats, inner=inner)
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    print(f"\nfuncpeft serving benchmark: {versions}, {args.threads} threads; {BATCH}x{PROMPT}, {NEW} new tokens\n")
    rows = [
        ("funcpeft generate, one adapter / base generate", "funcpeft one", "base", 1.10),
        ("funcpeft mixed (8 distinct adapters) / funcpeft one adapter", "funcpeft mixed", "funcpeft one", 1.15),
        ("funcpeft mixed / PEFT generate(adapter_names=)", "funcpeft mixed", "PEFT mixed", 0.80),
        ("PEFT mixed / PEFT one adapter (comparison)", "PEFT mixed", "PEFT one", None),
        ("PEFT one adapter / base (comparison)", "PEFT one", "base", None),
    ]
    print("| figure | ratio [IQR] | target | met |\n|---|---|---|---|")
    for label, num, den, target in rows:
        stats = ratio(times, num, den)
        met = "-" if target is None else ("yes" if stats[0] <= target else "**no**")
        print(f"| {label} | {fmt(stats)} | {'-' if target is None else f'<= {target:.2f}'} | {met} |")
    print("\nms per generate call: " + ", ".join(f"{n} {1e3 * statistics.median(t):.1f}" for n, t in times.items()))


if __name__ == "__main__":
    main()
