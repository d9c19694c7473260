"""How fast are funcpeft's merge and checkpoint round trip compared with PEFT's?

One GPT-2-style model (``GPT2LMHeadModel``: 4 layers, width 256, 4 heads, vocabulary 1000, 128 positions,
dropout 0) with LoRA r=8, alpha 8 on every linear layer (``target_modules="all-linear"``: 16 ``Conv1D``, the tied
LM head excluded) and a non-trivial adapter (``init_lora_weights=False``); PEFT's model gets funcpeft's A/B
copied in, so both libraries hold the same weights. Measured, in one process on 2 CPU threads:

1. *merge*: ``fwd.merge(params)`` (a merged ``state_dict``; the model is not touched) vs PEFT's
   ``merge_and_unload()`` on a ``copy.deepcopy`` of the PEFT model (it merges in place; the copy is made before
   the clock starts). Because ``fwd.merge`` stops at a state dict, a second row adds
   ``load_state_dict`` into a copy of the base model, which is what it takes to end, as PEFT does, with a
   merged ``nn.Module``. Before timing, both merged models must give the unmerged adapter's logits.
2. *save + load*: ``funcpeft.save(dir, params, config)`` + ``funcpeft.load(dir)`` vs PEFT's
   ``save_pretrained(dir)`` + ``load_adapter(dir, adapter_name=...)`` on the same ``PeftModel`` (each repeat
   loads under a new name and the adapter is deleted after the clock stops). ``load_adapter`` is the PEFT
   counterpart of ``funcpeft.load``: both read a checkpoint for a model that is already set up.
   ``PeftModel.from_pretrained`` also wraps a fresh base model, whose funcpeft counterpart is
   ``load`` + ``adapt``; that pair is the last row. Save and load are also reported alone. Note that
   ``funcpeft.save`` fsyncs both files (PEFT does not) and PEFT also writes a README model card, so the
   save rows depend on the file system of ``--dir``. Before timing, the loaded tensors must equal the saved ones.

Each repeat runs every (funcpeft, PEFT) pair once, in an order alternated every repeat; rows report the median
over repeats (ms) and the median of the per-repeat ratio funcpeft/PEFT with its interquartile range.

Run from the repository root::

    python benchmarks/bench_io.py            # about 1.5 minutes
    python benchmarks/bench_io.py --quick    # about 30 seconds, noisier
    python benchmarks/bench_io.py --dir /dev/shm  # keep disk latency out of the save rows
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers
from _timing import gpt2_config, recorded
from peft.utils import get_peft_model_state_dict
from torch import nn

import funcpeft

RANK = 8
ALPHA = 8
Timing = dict[str, list[float]]  # row -> seconds, one value per repeat


def build(seed: int = 0) -> tuple[nn.Module, funcpeft.Params, funcpeft.Adapted, peft.PeftModel, torch.Tensor]:
    """The base model, funcpeft's adapter and a PEFT model holding the same LoRA weights."""
    torch.manual_seed(seed)
    config = gpt2_config()
    model = transformers.GPT2LMHeadModel(config).eval().requires_grad_(False)
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed))
    lora = {"r": RANK, "lora_alpha": ALPHA, "target_modules": "all-linear", "init_lora_weights": False}
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(**lora), generator=torch.Generator().manual_seed(1))
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(fan_in_fan_out=True, **lora)).eval()
    inner = peft_model.base_model.model
    peft_targets = sorted(n for n, m in inner.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    if peft_targets != sorted(fwd.targets) or len(fwd.targets) != 16:
        raise RuntimeError(f"targets differ: funcpeft {fwd.targets}, PEFT {peft_targets}")
    with torch.no_grad():
        for path in fwd.targets:
            layer = inner.get_submodule(path)
            layer.lora_A["default"].weight.copy_(params[path]["lora_A"])
            layer.lora_B["default"].weight.copy_(params[path]["lora_B"])
    return model, params, fwd, peft_model, ids


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def check(
    model: nn.Module, params: funcpeft.Params, fwd: funcpeft.Adapted, peft_model: nn.Module, ids: torch.Tensor
) -> None:
    """Unmerged, merged (both ways) and reloaded adapters agree, so no row can time a wrong program."""
    with torch.no_grad():
        unmerged = fwd(params, ids, use_cache=False).logits
    torch.testing.assert_close(logits(peft_model, ids), unmerged, msg=lambda m: f"unmerged PEFT vs funcpeft: {m}")
    if torch.allclose(unmerged, logits(model, ids), atol=1e-3):
        raise RuntimeError("the adapter does not change the logits: the benchmark would time a no-op")
    ours = copy.deepcopy(model)
    ours.load_state_dict(fwd.merge(params))
    theirs = copy.deepcopy(peft_model).merge_and_unload()
    torch.testing.assert_close(logits(ours, ids), unmerged, msg=lambda m: f"funcpeft merged vs unmerged: {m}")
    torch.testing.assert_close(logits(theirs, ids), unmerged, msg=lambda m: f"PEFT merged vs unmerged: {m}")
    with tempfile.TemporaryDirectory() as tmp:
        funcpeft.save(tmp, params, fwd.config)
        loaded, _ = funcpeft.load(tmp)
        for path, entry in params.items():
            for name, tensor in entry.items():
                if not torch.equal(loaded[path][name], tensor):
                    raise RuntimeError(f"funcpeft.load changed {path} {name}")
        peft_model.save_pretrained(tmp)
        peft_model.load_adapter(tmp, adapter_name="check")
        before = get_peft_model_state_dict(peft_model, adapter_name="default")
        after = get_peft_model_state_dict(peft_model, adapter_name="check")
        peft_model.delete_adapter("check")
        if before.keys() != after.keys() or not all(torch.equal(before[k], after[k]) for k in before):
            raise RuntimeError("PEFT's load_adapter did not restore the saved adapter")


def clock(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(
    model: nn.Module,
    params: funcpeft.Params,
    fwd: funcpeft.Adapted,
    peft_model: peft.PeftModel,
    folder: Path,
    *,
    warmup: int,
    repeats: int,
) -> dict[str, Timing]:
    """Seconds per operation, per repeat. Copies, adapter deletion and garbage collection happen off the clock."""
    ours_dir, theirs_dir = folder / "funcpeft", folder / "peft"
    config = fwd.config
    times: dict[str, Timing] = {}

    def record(row: str, lib: str, seconds: float) -> None:
        times.setdefault(row, {"funcpeft": [], "PEFT": []})[lib].append(seconds)

    def funcpeft_pass(keep: bool) -> None:
        target = copy.deepcopy(model)
        gc.collect()
        merge = clock(lambda: fwd.merge(params))
        gc.collect()
        into_model = clock(lambda: target.load_state_dict(fwd.merge(params)))
        save = clock(lambda: funcpeft.save(ours_dir, params, config))
        gc.collect()
        load = clock(lambda: funcpeft.load(ours_dir))
        gc.collect()
        fresh = clock(lambda: funcpeft.adapt(model, funcpeft.load(ours_dir)[1]))
        if keep:
            record("merge", "funcpeft", merge)
            record("merge into a model", "funcpeft", into_model)
            record("save", "funcpeft", save)
            record("load", "funcpeft", load)
            record("save + load", "funcpeft", save + load)
            record("load onto a fresh model", "funcpeft", fresh)

    def peft_pass(keep: bool, rep: int) -> None:
        victim = copy.deepcopy(peft_model)
        gc.collect()
        merge = clock(lambda: victim.merge_and_unload())
        gc.collect()
        save = clock(lambda: peft_model.save_pretrained(theirs_dir))
        gc.collect()
        name = f"bench{rep}"
        load = clock(lambda: peft_model.load_adapter(theirs_dir, adapter_name=name))
        peft_model.delete_adapter(name)
        base = copy.deepcopy(model)
        gc.collect()
        fresh = clock(lambda: peft.PeftModel.from_pretrained(base, theirs_dir))
        if keep:
            record("merge", "PEFT", merge)
            record("merge into a model", "PEFT", merge)
            record("save", "PEFT", save)
            record("load", "PEFT", load)
            record("save + load", "PEFT", save + load)
            record("load onto a fresh model", "PEFT", fresh)

    for rep in range(warmup + repeats):
        keep = rep >= warmup
        if rep % 2:
            funcpeft_pass(keep)
            peft_pass(keep, rep)
        else:
            peft_pass(keep, rep)
            funcpeft_pass(keep)
    return times


def ratio(timing: Timing) -> tuple[float, float, float]:
    """Median and quartiles over repeats of the paired per-repeat ratio funcpeft/PEFT."""
    r = sorted(a / b for a, b in zip(timing["funcpeft"], timing["PEFT"], strict=True))
    if len(r) < 4:
        return statistics.median(r), r[0], r[-1]
    q1, _, q3 = statistics.quantiles(r, n=4)
    return statistics.median(r), q1, q3


ROWS = {
    "merge": ("`fwd.merge(params)`", "`merge_and_unload()`"),
    "merge into a model": ("`fwd.merge` + `load_state_dict`", "`merge_and_unload()`"),
    "save": ("`funcpeft.save`", "`save_pretrained`"),
    "load": ("`funcpeft.load`", "`load_adapter`"),
    "save + load": ("`save` + `load`", "`save_pretrained` + `load_adapter`"),
    "load onto a fresh model": ("`load` + `adapt`", "`PeftModel.from_pretrained`"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 30 s, noisier)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: the system temp dir)")
    parser.add_argument("--out", default="benchmarks/results/bench_io.md", help="where to write the results")
    args = parser.parse_args()
    with recorded(args.out):
        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations inside PEFT's save

        t0 = time.perf_counter()
        model, params, fwd, peft_model, ids = build()
        check(model, params, fwd, peft_model, ids)
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            times = measure(
                model,
                params,
                fwd,
                peft_model,
                Path(tmp),
                warmup=2 if args.quick else 3,
                repeats=10 if args.quick else 40,
            )
            where = Path(tmp).parent
        elapsed = time.perf_counter() - t0

        print(
            f"\nfuncpeft I/O benchmark: torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, {torch.get_num_threads()} threads, {len(times['merge']['PEFT'])} repeats, "
            f"checkpoints in {where}{', --quick' if args.quick else ''}\n"
        )
        print("| operation | funcpeft | PEFT | funcpeft ms | PEFT ms | funcpeft/PEFT [IQR] |")
        print("|---|---|---|---|---|---|")
        for row, timing in times.items():
            ours, theirs = ROWS[row]
            med, lo, hi = ratio(timing)
            ms = [statistics.median(timing[lib]) * 1e3 for lib in ("funcpeft", "PEFT")]
            print(f"| {row} | {ours} | {theirs} | {ms[0]:.2f} | {ms[1]:.2f} | {med:.3f} [{lo:.3f}-{hi:.3f}] |")
        print(f"\nTotal time: {elapsed:.0f} s")


if __name__ == "__main__":
    main()
