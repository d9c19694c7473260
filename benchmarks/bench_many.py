"""Many adapters over one base: mixed batches, training K adapters in one batch, and vmap, against PEFT.

Measured in one process (2 CPU threads by default) on a GPT-2-style model (``GPT2LMHeadModel``, 4 layers, width
256, 4 heads, vocabulary 1000, dropout 0) with K=8 different LoRA adapters, r=8 on every linear layer (``c_attn``,
``attn.c_proj``, ``c_fc``, ``mlp.c_proj``; ``init_lora_weights=False``), stacked with ``funcpeft.stack`` (or
``optree.tree_map(torch.stack)`` where that does not exist yet):

1. *mixed-batch inference*, 8 rows x 64 tokens, row i with adapter i, ``eval()`` under ``torch.no_grad()``:
   ``fwd(stacked, ids, adapter_ids=arange(8))`` against ``fwd(params_0, ids)`` (one adapter for the whole batch;
   note that funcpeft folds a single adapter into the weight at this size) and against PEFT's
   ``model(input_ids=ids, adapter_names=[...])`` (the 8 adapters loaded under 8 names with
   ``set_peft_model_state_dict``), which PEFT runs as one masked sub-batch per adapter; PEFT with one active
   adapter and the base model are timed for context;
2. *training 8 adapters, each on its own row*: one funcpeft mixed-batch step (forward, per-row mean
   cross-entropy summed over rows, ``torch.autograd.grad`` to the stacked leaves) against 8 PEFT steps, each
   ``set_adapter(name)`` then forward and backward of that adapter's row to that adapter's tensors; one
   funcpeft step of a single adapter on the whole batch is timed as the floor a mixed step can reach;
3. *vmap over the K=8 adapters on one batch* (1x64 and 8x64, inference): ``torch.func.vmap(fwd, in_dims=(0,
   None))`` against a Python loop of 8 ``fwd`` calls (which keeps a list; it does not stack the outputs).

Before anything is timed, the programs are checked to compute the same thing (``assert_close``): the mixed
batch equals PEFT's ``adapter_names`` forward and each row run alone with its adapter, the single-adapter rows
agree, the stacked gradient ``[k]`` equals PEFT's gradient of adapter ``k``, and vmap equals the loop.

After warm-up, each repeat times a block of iterations of every program of a benchmark, round-robin in an order
rotated every repeat, and keeps the block's median iteration. A ratio is the median over repeats of the paired
per-repeat ratio (slow drift of the machine cancels), with the interquartile range in brackets; absolute medians
(ms per iteration) follow. The number of repeats is what fits a time budget per benchmark, going by the warm-up
(within fixed bounds). On a shared machine, rerun when the brackets are wide: with other processes on the same
CPUs, multi-threaded timings collapse unevenly (each parallel region waits for a descheduled thread), and
``--threads 1`` gives steadier ratios.

With ``--device cuda`` the models and tensors live on the GPU, every timed iteration is bracketed by
``torch.cuda.synchronize()``, and the mixed-batch benchmark also runs at batch 1x64. PEFT rows (or vmap rows)
are skipped, with the reason printed, only if PEFT (or vmap) raises an error on that device; a wrong result
always stops the script.

Run from the repository root::

    python benchmarks/bench_many.py                  # about 2 minutes on CPU (longer on a busy machine)
    python benchmarks/bench_many.py --threads 1      # steadier on a shared machine
    python benchmarks/bench_many.py --quick          # about 40 seconds, noisier
    python benchmarks/bench_many.py --device cuda    # on a GPU
    python benchmarks/bench_many.py --profile        # instead: torch.profiler tables of the 8x64 forwards
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import _timing as timing
import optree
import peft
import torch
import torch.nn.functional as F
import transformers
from _timing import fmt, gpt2_config, ratio, recorded
from torch import Tensor, nn

import funcpeft

TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]
RANK = 8
ALPHA = 8
K = 8  # adapters
SEQ = 64
NAMES = [f"adapter{k}" for k in range(K)]

Programs = dict[str, Callable[[], object]]


@dataclass
class Setup:
    """One base model, K adapters as funcpeft pytrees (single and stacked) and as named PEFT adapters."""

    device: torch.device
    ids: Tensor  # (K, SEQ) token ids
    model: nn.Module  # the untouched base model that funcpeft adapts
    fwd: funcpeft.Adapted
    adapters: list[funcpeft.Params]
    stacked: funcpeft.Params
    peft_model: nn.Module | None  # None where PEFT failed on this device
    peft_error: str | None = None
    vmap_error: str | None = None
    notes: list[str] = field(default_factory=list)

    def assert_close(self, actual: Tensor, expected: Tensor, what: str) -> None:
        """``assert_close`` with float32 defaults on CPU; on GPUs, whose batched and plain matmul kernels reduce in
        different orders, to 1e-4."""
        tol = {} if self.device.type == "cpu" else {"rtol": 1e-4, "atol": 1e-4}
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tol)

    def train(self, mode: bool) -> None:
        self.model.train(mode)
        if self.peft_model is not None:
            self.peft_model.train(mode)

    def stacked_leaves(self) -> list[Tensor]:
        return [self.stacked[p][n] for p in self.fwd.targets for n in ("lora_A", "lora_B")]

    def peft_leaves(self, name: str) -> list[Tensor]:
        assert self.peft_model is not None
        inner = self.peft_model.base_model.model
        return [getattr(inner.get_submodule(p), n)[name].weight for p in self.fwd.targets for n in ("lora_A", "lora_B")]


def stack(adapters: list[funcpeft.Params]) -> funcpeft.Params:
    """K adapters as one tree of (K, ...) leaves that require grad."""
    if hasattr(funcpeft, "stack"):
        return funcpeft.stack(adapters)
    return optree.tree_map(lambda *xs: torch.stack(xs).detach().requires_grad_(), *adapters)


def build(device: torch.device, seed: int = 0) -> Setup:
    torch.manual_seed(seed)
    config = gpt2_config()
    model = transformers.GPT2LMHeadModel(config).requires_grad_(False).to(device)
    ids = torch.randint(0, config.vocab_size, (K, SEQ), generator=torch.Generator().manual_seed(seed)).to(device)

    lora = funcpeft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES, init_lora_weights=False)
    first, fwd = funcpeft.adapt(model, lora, generator=torch.Generator().manual_seed(seed + 1))
    if len(fwd.targets) != 4 * config.n_layer:
        raise RuntimeError(f"expected {4 * config.n_layer} adapted Conv1D layers, got {len(fwd.targets)}")
    adapters = [first] + [fwd.init(torch.Generator().manual_seed(seed + 2 + k)) for k in range(K - 1)]
    s = Setup(device=device, ids=ids, model=model, fwd=fwd, adapters=adapters, stacked=stack(adapters), peft_model=None)

    try:
        with warnings.catch_warnings():
            # PEFT reads transformers' deprecated `is_gradient_checkpointing`; not this benchmark's concern.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            peft_config = peft.LoraConfig(
                r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES, fan_in_fan_out=True, init_lora_weights=False
            )
            peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config, adapter_name=NAMES[0])
            for name in NAMES[1:]:
                peft_model.add_adapter(name, peft_config)
            for name, params in zip(NAMES, adapters, strict=True):
                result = peft.set_peft_model_state_dict(
                    peft_model, funcpeft.to_peft_state_dict(params, lora), adapter_name=name
                )
                if result.unexpected_keys:
                    raise RuntimeError(f"PEFT did not load {result.unexpected_keys[:3]} for {name}")
            peft_model.to(device)
        s.peft_model = peft_model
    except Exception as err:  # reported, and the PEFT rows are skipped
        if device.type == "cpu":
            raise
        s.peft_error = f"PEFT setup failed on {device}: {type(err).__name__}: {err}"
    return s


# ----- the timed programs ---------------------------------------------------------------------------------------


def nograd(run: Callable[[], Tensor]) -> Callable[[], Tensor]:
    def go() -> Tensor:
        with torch.no_grad():
            return run()

    return go


def mixed_inference(s: Setup, batch: int) -> Programs:
    """Row i with adapter i % K (mixed), against one adapter for all rows, PEFT's ``adapter_names`` and the base."""
    ids = s.ids[:batch]
    adapter_ids = torch.arange(batch, device=s.device) % K
    names = [NAMES[int(i)] for i in adapter_ids]
    fwd, stacked, single = s.fwd, s.stacked, s.adapters[0]
    programs: Programs = {
        "funcpeft mixed": nograd(lambda: fwd(stacked, ids, adapter_ids=adapter_ids, use_cache=False).logits),
        "funcpeft single": nograd(lambda: fwd(single, ids, use_cache=False).logits),
        "base": nograd(lambda: s.model(ids, use_cache=False).logits),
    }
    pm = s.peft_model
    if pm is not None:
        pm.set_adapter(NAMES[0])  # only for "PEFT single"; adapter_names overrides the active adapter
        programs["PEFT adapter_names"] = nograd(lambda: pm(input_ids=ids, adapter_names=names, use_cache=False).logits)
        programs["PEFT single"] = nograd(lambda: pm(input_ids=ids, use_cache=False).logits)
    return programs


def row_losses(logits: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy, averaged within each row and summed over rows (so row i's gradient is its own)."""
    n, t, v = logits.shape
    flat = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="none")
    return flat.view(n, t - 1).mean(1).sum()


def training(s: Setup) -> Programs:
    """One funcpeft mixed-batch step for K adapters against K PEFT ``set_adapter`` steps, one row each."""
    ids, fwd, stacked = s.ids, s.fwd, s.stacked
    adapter_ids = torch.arange(K, device=s.device)
    leaves = s.stacked_leaves()

    def funcpeft_step() -> tuple[Tensor, ...]:
        loss = row_losses(fwd(stacked, ids, adapter_ids=adapter_ids, use_cache=False).logits, ids)
        return torch.autograd.grad(loss, leaves)

    single, single_leaves = s.adapters[0], [s.adapters[0][p][n] for p in fwd.targets for n in ("lora_A", "lora_B")]

    def single_step() -> tuple[Tensor, ...]:  # the floor: one adapter for the whole batch
        loss = row_losses(fwd(single, ids, use_cache=False).logits, ids)
        return torch.autograd.grad(loss, single_leaves)

    programs: Programs = {"funcpeft mixed step": funcpeft_step, "funcpeft single step": single_step}
    pm = s.peft_model
    if pm is not None:
        peft_leaves = {name: s.peft_leaves(name) for name in NAMES}

        def peft_steps() -> list[tuple[Tensor, ...]]:
            grads = []
            for k, name in enumerate(NAMES):
                pm.set_adapter(name)
                row = ids[k : k + 1]
                loss = row_losses(pm(input_ids=row, use_cache=False).logits, row)
                grads.append(torch.autograd.grad(loss, peft_leaves[name]))
            return grads

        programs["PEFT 8 set_adapter steps"] = peft_steps
    return programs


def vmapped(s: Setup, batch: int) -> Programs:
    """All K adapters on one batch: ``vmap`` over the stacked leaves against a loop of K calls."""
    ids, fwd, stacked, adapters = s.ids[:batch], s.fwd, s.stacked, s.adapters
    run = torch.func.vmap(lambda p, x: fwd(p, x, use_cache=False).logits, in_dims=(0, None))
    return {
        "vmap": nograd(lambda: run(stacked, ids)),
        "loop": nograd(lambda: [fwd(p, ids, use_cache=False).logits for p in adapters]),
    }


# ----- checks ---------------------------------------------------------------------------------------------------


def check_inference(s: Setup, batch: int) -> None:
    """The mixed batch equals each row run alone and PEFT's ``adapter_names``; the single-adapter rows agree."""
    s.train(False)
    programs = mixed_inference(s, batch)
    outs = {name: run() for name, run in programs.items()}
    mixed = outs["funcpeft mixed"]
    for i in range(batch):
        alone = s.fwd(s.adapters[i % K], s.ids[i : i + 1], use_cache=False).logits
        s.assert_close(mixed[i : i + 1], alone, f"mixed row {i} vs alone")
    if batch > 1 and torch.allclose(mixed[1], outs["funcpeft single"][1], atol=1e-3):
        raise RuntimeError("rows 0 and 1 get the same adapter: the mixed batch would time a uniform batch")
    if torch.allclose(mixed, outs["base"], atol=1e-3):
        raise RuntimeError("the adapters do not change the logits: the benchmark would time no-op adapters")
    if "PEFT adapter_names" in outs:
        s.assert_close(mixed, outs["PEFT adapter_names"], "mixed vs PEFT adapter_names")
        s.assert_close(outs["funcpeft single"], outs["PEFT single"], "single adapter vs PEFT")


def check_training(s: Setup) -> None:
    """The stacked gradient [k] of one mixed step equals PEFT's gradient of adapter k on row k."""
    s.train(True)
    programs = training(s)
    ours = programs["funcpeft mixed step"]()
    if "PEFT 8 set_adapter steps" not in programs:
        return
    theirs = programs["PEFT 8 set_adapter steps"]()
    for k in range(K):
        for i, (g, h) in enumerate(zip(ours, theirs[k], strict=True)):
            s.assert_close(g[k], h, f"adapter {k}, gradient {i} vs PEFT")


def check_vmap(s: Setup, batch: int) -> None:
    """vmap equals the loop; warnings (e.g. a missing batching rule, so vmap loops inside) become notes."""
    s.train(False)
    programs = vmapped(s, batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = programs["vmap"]()
    for w in caught:
        note = f"vmap ({batch}x{SEQ}): {str(w.message).splitlines()[0]}"
        if note not in s.notes:
            s.notes.append(note)
    for k, ref in enumerate(programs["loop"]()):
        s.assert_close(out[k], ref, f"vmap adapter {k} vs loop")


# ----- timing ---------------------------------------------------------------------------------------------------


def measure(
    programs: Programs, *, warmup: int, inner: int, budget_s: float, repeats: tuple[int, int], sync: Callable[[], None]
) -> dict[str, list[float]]:
    """:func:`_timing.measure` (interleaved blocks, per-repeat block medians) after a timed warm-up.

    The number of repeats is what fits in ``budget_s`` going by the warm-up, within ``repeats = (least, most)``,
    so that the whole script stays within a few minutes on a slow or busy machine (with wider brackets)."""
    names = list(programs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported once by the checks
        per_round = 0.0
        for name in names:
            for _ in range(warmup):
                sync()
                start = time.perf_counter()
                programs[name]()
                sync()
            per_round += time.perf_counter() - start  # the last, warmest iteration
        least, most = repeats
        n_repeats = max(least, min(most, int(budget_s / (per_round * inner))))
        return timing.measure(programs, warmup=0, repeats=n_repeats, inner=inner, sync=sync)


def profile_mixed(s: Setup) -> None:
    """Where the 8x64 mixed-batch and single-adapter forwards spend their time (operator totals)."""
    from torch.profiler import ProfilerActivity, profile

    s.train(False)
    programs = mixed_inference(s, K)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    for name in ("funcpeft mixed", "funcpeft single"):
        run = programs[name]
        for _ in range(5):
            run()
        with profile(activities=activities) as prof:
            for _ in range(20):
                run()
        print(f"\nProfile of {name} ({K}x{SEQ}), 20 calls:\n")
        sort = "self_device_time_total" if s.device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=18))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 40 s, noisier)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda")
    parser.add_argument(
        "--profile", action="store_true", help="instead of timing, profile the mixed and single-adapter forwards"
    )
    parser.add_argument("--out", default="benchmarks/results/bench_many.md", help="where to write the results")
    args = parser.parse_args()
    with recorded(args.out):
        torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        cuda = device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        load = os.getloadavg()[0]  # before this process adds its own
        t0 = time.perf_counter()
        s = build(device)
        batches = (1, K) if cuda else (K,)
        for check in [lambda b=b: check_inference(s, b) for b in batches] + [lambda: check_training(s)]:
            try:
                check()
            except AssertionError:
                raise  # a wrong result is never skipped
            except Exception as err:
                if not cuda or s.peft_model is None:
                    raise
                s.peft_model, s.peft_error = None, f"PEFT failed on {device}: {type(err).__name__}: {err}"
                check()  # again without the PEFT programs
        try:
            for b in (1, K):
                check_vmap(s, b)
        except AssertionError:
            raise
        except Exception as err:
            if not cuda:
                raise
            s.vmap_error = f"vmap failed on {device}, its rows are skipped: {type(err).__name__}: {err}"

        if args.profile:
            profile_mixed(s)
            return

        # budgets in seconds per benchmark; repeats within (least, most)
        scale = 0.25 if args.quick else 1.0
        infer_t = {}
        for b in batches:
            s.train(False)
            infer_t[b] = measure(
                mixed_inference(s, b),
                warmup=3,
                inner=3 if b > 1 else 10,
                budget_s=40 * scale,
                repeats=(5, 30),
                sync=sync,
            )
        s.train(True)
        train_t = measure(training(s), warmup=2, inner=2, budget_s=40 * scale, repeats=(4, 20), sync=sync)
        s.train(False)
        vmap_t = {
            b: measure(
                vmapped(s, b), warmup=2, inner=2 if b > 1 else 3, budget_s=20 * scale, repeats=(4, 15), sync=sync
            )
            for b in ((1, K) if s.vmap_error is None else ())
        }
        elapsed = time.perf_counter() - t0

        where = f"{torch.cuda.get_device_name(device)}" if cuda else f"{torch.get_num_threads()} CPU threads"
        print(
            f"\nfuncpeft many-adapter benchmark: torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, {where}{', --quick' if args.quick else ''}\n"
        )
        print(f"GPT-2-style 4 layers x 256, K={K} LoRA adapters r={RANK} on all linear layers.")
        cpus = os.cpu_count() or 1
        print(f"Load average before the run: {load:.1f} on {cpus} CPUs.")
        if not cuda and load + args.threads > cpus:
            print(
                "**Warning**: other processes share these CPUs; with several threads, each waits at every parallel "
                "region for a descheduled sibling, so timings can swing by 10x: rerun on a quiet machine or with "
                "--threads 1."
            )
        print()
        print("Ratios: median over repeats of the paired per-repeat ratio [interquartile range].\n")
        print("| benchmark | ratio | measured | target | meets target | for comparison |")
        print("|---|---|---|---|---|---|")
        peft_na = "skipped (PEFT failed on this device)"

        def row(label: str, times: dict[str, list[float]], num: str, den: str, target: float | None, note: str) -> None:
            if num not in times or den not in times:
                print(f"| {label} | {num} / {den} | {peft_na} | - | - | {note} |")
                return
            stats = ratio(times, num, den)
            target_s = f"<= {target:.2f}" if target is not None else "-"
            met = "-" if target is None else ("yes" if stats[0] <= target else "**no**")
            print(f"| {label} | {num} / {den} | {fmt(stats)} | {target_s} | {met} | {note} |")

        for b in batches:
            t, label = infer_t[b], f"mixed inference ({b}x{SEQ})"
            issue = "PEFT adapter_names / PEFT single: 1.49 in the issue"
            row(label, t, "funcpeft mixed", "funcpeft single", 1.15 if b == K else None, issue)
            row(label, t, "funcpeft mixed", "PEFT adapter_names", 0.8 if b == K else None, "")
            row(label, t, "PEFT adapter_names", "PEFT single", None, "PEFT's own cost of mixing")
            row(label, t, "funcpeft mixed", "base", None, "the adapters' total cost")
            row(label, t, "funcpeft single", "base", None, "funcpeft folds one adapter into W on large batches")
        label = f"training {K} adapters ({K}x{SEQ})"
        row(label, train_t, "funcpeft mixed step", "PEFT 8 set_adapter steps", 0.3, "")
        row(
            label,
            train_t,
            "funcpeft single step",
            "PEFT 8 set_adapter steps",
            None,
            "the floor: 1 adapter, whole batch",
        )
        row(label, train_t, "funcpeft mixed step", "funcpeft single step", None, "the mixed step's own cost")
        vmap_note = "" if cuda else "expected ~1 on CPU"
        for b, times in vmap_t.items():
            row(f"vmap over K={K} ({b}x{SEQ})", times, "vmap", "loop", None, vmap_note)

        print("\nAbsolute medians, ms per iteration:\n")
        print("| benchmark | program | ms |")
        print("|---|---|---|")
        tables = [(f"mixed inference ({b}x{SEQ})", infer_t[b]) for b in batches]
        tables += [(f"training {K} adapters ({K}x{SEQ})", train_t)]
        tables += [(f"vmap over K={K} ({b}x{SEQ})", times) for b, times in vmap_t.items()]
        for label, times in tables:
            for name, values in times.items():
                print(f"| {label} | {name} | {statistics.median(values) * 1e3:.3f} |")
        for error in (s.peft_error, s.vmap_error):
            if error:
                print(f"\n{error}")
        for note in s.notes:
            print(f"\nNote: {note}")
        print(f"\nTotal time: {elapsed:.0f} s")


if __name__ == "__main__":
    main()
