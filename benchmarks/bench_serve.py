"""Serving with adapters: decoding, mixed batches over many resident adapters, heterogeneous stacks, stacking.

Everything is measured in one process (2 CPU threads by default); times are compared only as ratios of programs
interleaved in one ``_timing.measure`` call: the median over repeats of the paired per-repeat ratio [interquartile
range]. Before anything is timed, each program is checked to compute what its counterpart computes.

1. *Decoding* (``fwd.generate``). GPT-2-style model (4 layers, width 256, vocabulary 1000), LoRA r=8 on every
   linear layer (``c_attn``, ``c_proj``, ``c_fc``), batch 8 prompts of 16 tokens, 32 new tokens, greedy, KV cache:
   ``base`` (``model.generate``), ``funcpeft one`` (one adapter for the batch), ``funcpeft mixed`` (8 distinct
   adapters, ``adapter_ids=arange(8)``) and ``PEFT one`` / ``PEFT mixed`` (a PeftModel with the same 8 adapters,
   the second with ``adapter_names=``), all checked to produce PEFT's tokens.

The other figures use a GPT-2-style model of 12 layers, width 64 (4 heads, vocabulary 1000), all 48 linear
layers adapted unless said otherwise, batches of 64 rows x 32 tokens, ``init_lora_weights=False`` adapters
(``lora_alpha = r``), ``--quick``: 250 resident adapters instead of 1,000:

2. *Mixed inference over 1,000 resident adapters* (a): a same-config ``funcpeft.stack`` of 1,000 adapters (r=8
   and r=64; the stacked bytes are printed), the 64 rows using 64 distinct adapters drawn from the 1,000
   (``fwd(stacked, x, adapter_ids=ids)``, ``torch.no_grad()``, ``eval()``) against the same 64 rows with one
   adapter (``fwd(params, x)``; funcpeft folds a single adapter into the weight at this size) and the base model.
3. *Mixed training step* (b), ``train()``: forward, per-row mean next-token cross-entropy summed over rows,
   ``backward()`` to the stacked leaves (their ``.grad`` set to None after every step), with dense gradients
   (the default) and with ``fwd(..., sparse_grad=True)``, against the same step of one adapter on the same rows.
   Gradient memory: the bytes ``.grad`` holds after one step (dense: its storages; sparse: indices plus values),
   against the bytes of the 64 used adapters' own tensors.
4. *Heterogeneous stack* (c): 16 adapters, adapter ``k`` with rank ``(4, 8, 16, 64)[k % 4]`` and target set
   ``k // 4`` of ``HETERO_TARGETS`` (every rank with every target set once), built with ``funcpeft.adapt(model,
   [configs])`` and ``fwd.stack``: bytes of the stacked tree against the sum of the adapters' own tensors, and
   for comparison what zero-padding every adapter to rank 64 would cost (on every module any adapter targets, as
   a same-config stack needs; or on the modules each adapter targets).
5. *Heterogeneous mixed batch* (d), inference, 64 rows, row ``i`` with adapter ``i % 16``: the stack of (c)
   against the same 16 target sets all at r=23 (mean rank 23: the same total rank on every module; also a
   heterogeneous fwd). For comparison, ranks (4, 8, 16, 64) all on every linear layer against a same-config
   ``funcpeft.stack`` of 16 r=23 adapters, and r=23 packed against that stack.
6. *Stacking 1,000 adapters* (e): ``funcpeft.stack`` of 1,000 r=64 adapters (3.1 GB) against the bare copy, one
   ``torch.stack`` per leaf of the same tensors; and ``fwd.stack`` of 1,000 heterogeneous adapters (the 16
   configs of (c), cycled) against one ``torch.cat`` per packed leaf in the packed layout, both checked equal
   first. One ``torch.cat`` of every tensor, flattened, into one buffer is timed for comparison.
   Peak memory during a stack, against the result's size, is the rise of this process's peak resident set while
   the stack runs: ``VmHWM`` of ``/proc/self/status``, reset to the current RSS (``VmRSS``) by writing 5 to
   ``/proc/self/clear_refs`` just before, after ``gc.collect()`` and glibc's ``malloc_trim(0)`` have returned
   freed memory to the system (so an allocation cannot hide in pages the process already holds; torch's CPU
   allocator caches nothing). RSS sees all the stack allocates and touches, tensors and Python objects alike
   (``tracemalloc`` does not see torch's allocations). The bare copy is measured the same way, as a check of the
   method: it should read 1.00. Linux only; elsewhere those rows read n/a.

Run from the repository root::

    python benchmarks/bench_serve.py            # about 5 minutes, up to ~12 GB of memory
    python benchmarks/bench_serve.py --quick    # under 2 minutes, 250 resident adapters, noisier
    python benchmarks/bench_serve.py --profile  # instead: torch.profiler tables of the r=64 mixed forward / steps
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import _timing as timing
import peft
import torch
import torch.nn.functional as F
import transformers
from _timing import fmt, gpt2_config, ratio, recorded
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import funcpeft

K, PROMPT, NEW, BATCH = 8, 16, 32, 8
TARGETS = ["c_attn", "c_proj", "c_fc"]

RESIDENT, RESIDENT_QUICK = 1000, 250  # adapters in the stacks of (a), (b), (e)
ROWS, SEQ = 64, 32  # the batches of (a), (b), (d): rows (in (a), (b) each with its own adapter) x tokens
MANY_RANKS = (8, 64)
HETERO_RANKS = (4, 8, 16, 64)
HETERO_TARGETS = (TARGETS, ["c_attn"], ["c_fc", "mlp.c_proj"], ["attn.c_proj", "c_fc"])
HETERO_K = 16
HETERO_MEAN_RANK = sum(HETERO_RANKS) // len(HETERO_RANKS)  # 23: 16 r=23 adapters have the same total rank
assert HETERO_MEAN_RANK * len(HETERO_RANKS) == sum(HETERO_RANKS)

Params = dict[str, dict[str, Tensor]]
Programs = dict[str, Callable[[], Any]]
Times = dict[str, list[float]]
Row = tuple[str, str, float | None, float | None]  # label, measured, target (<=), the value compared to it


# ----- shared helpers -------------------------------------------------------------------------------------------


def serving_model() -> nn.Module:
    """The 12 x 64 GPT-2-style model of figures (a)-(e), frozen, in eval mode."""
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(gpt2_config(n_layer=12, n_embd=64, n_head=4)).requires_grad_(False).eval()


def lora(r: int, targets: Sequence[str] = TARGETS) -> funcpeft.LoraConfig:
    return funcpeft.LoraConfig(r=r, lora_alpha=r, target_modules=list(targets), init_lora_weights=False)


def hetero_configs(count: int, same_rank: int | None = None, all_targets: bool = False) -> list[funcpeft.LoraConfig]:
    """Adapter ``k``: rank ``HETERO_RANKS[k % 4]`` (or ``same_rank``), targets ``HETERO_TARGETS[(k // 4) % 4]``
    (or every linear layer)."""
    n = len(HETERO_RANKS)
    return [
        lora(same_rank or HETERO_RANKS[k % n], TARGETS if all_targets else HETERO_TARGETS[(k // n) % n])
        for k in range(count)
    ]


class Fwds:
    """One ``funcpeft.adapt(model, config)`` per distinct config."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._seen: list[tuple[funcpeft.LoraConfig, funcpeft.Adapted]] = []

    def __call__(self, config: funcpeft.LoraConfig) -> funcpeft.Adapted:
        fwd = next((f for c, f in self._seen if c == config), None)
        if fwd is None:
            fwd = funcpeft.adapt(self.model, config)[1]
            self._seen.append((config, fwd))
        return fwd


def own_adapters(fwds: Fwds, configs: Sequence[funcpeft.LoraConfig], seed: int) -> list[Params]:
    """Adapter ``k`` as ``funcpeft.adapt(model, configs[k])`` initialises it, seeded ``seed + k``."""
    return [fwds(config).init(torch.Generator().manual_seed(seed + k)) for k, config in enumerate(configs)]


def leaves(tree: Mapping[str, Mapping[str, Tensor]]) -> list[Tensor]:
    return [t for entry in tree.values() for t in entry.values()]


def tree_bytes(tree: Mapping[str, Mapping[str, Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in leaves(tree))


def held_bytes(tensors: Sequence[Tensor | None]) -> int:
    """Bytes the tensors hold: dense ones their storages (each counted once), sparse ones their indices and
    values."""
    seen: set[int] = set()
    total = 0

    def add(t: Tensor) -> None:
        nonlocal total
        if t.layout == torch.sparse_coo:
            parts = (t._indices(), t._values())
        elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
            parts = (t.crow_indices(), t.col_indices(), t.values())
        elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
            parts = (t.ccol_indices(), t.row_indices(), t.values())
        else:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            return
        for part in parts:
            add(part)

    for t in tensors:
        if t is not None:
            add(t)
    return total


def row_losses(logits: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy, averaged within each row and summed over rows (so row i's gradient is its own)."""
    n, t, v = logits.shape
    flat = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="none")
    return flat.view(n, t - 1).mean(1).sum()


def nograd(run: Callable[[], Any]) -> Callable[[], Any]:
    def go() -> Any:
        with torch.no_grad():
            return run()

    return go


def timed_ratio(label: str, times: Times, num: str, den: str, target: float | None) -> Row:
    stats = ratio(times, num, den)
    return label, fmt(stats), target, stats[0]


def matmul_macs(model: nn.Module, fwd: funcpeft.Adapted, r: int) -> tuple[int, int]:
    """Multiply-accumulates per token of the model's matmuls (every Linear / Conv1D weight, LM head included, and
    attention's two products over ``SEQ`` positions, a full upper count), and what LoRA of rank ``r`` on
    ``fwd.targets`` adds: ``r * (in + out)`` per adapted layer. A mixed batch cannot fold its adapters into the
    weights, so at equal efficiency it costs at least ``1 + lora / base`` times the folded single adapter."""
    base = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)))
    base += model.config.n_layer * 2 * SEQ * model.config.n_embd
    modules = dict(model.named_modules())
    return base, sum(r * sum(modules[p].weight.shape) for p in fwd.targets)


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


# ----- 1. decoding ----------------------------------------------------------------------------------------------


def decoding(quick: bool) -> tuple[list[Row], str]:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    config = funcpeft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    _, fwd = funcpeft.adapt(model, config)
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(K)]
    stacked = funcpeft.stack(adapters)
    names = [f"a{k}" for k in range(K)]
    peft_config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS)
    twin = peft.get_peft_model(copy.deepcopy(model), peft_config, adapter_name=names[0])
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
    repeats, inner = (5, 1) if quick else (12, 2)
    times = timing.measure(programs, warmup=1, repeats=repeats, inner=inner)
    mixed = "funcpeft mixed (8 distinct adapters) / funcpeft one adapter"
    rows = [
        timed_ratio("funcpeft generate, one adapter / base generate", times, "funcpeft one", "base", 1.10),
        timed_ratio(mixed, times, "funcpeft mixed", "funcpeft one", 1.15),
        timed_ratio("funcpeft mixed / PEFT generate(adapter_names=)", times, "funcpeft mixed", "PEFT mixed", 0.80),
        timed_ratio("PEFT mixed / PEFT one adapter (comparison)", times, "PEFT mixed", "PEFT one", None),
        timed_ratio("PEFT one adapter / base (comparison)", times, "PEFT one", "base", None),
    ]
    ms = "ms per generate call: " + ", ".join(f"{n} {1e3 * statistics.median(t):.1f}" for n, t in times.items())
    return rows, ms


# ----- 6. stacking: time and peak memory ------------------------------------------------------------------------


def bare_stack(adapters: Sequence[Params]) -> Params:
    """What ``funcpeft.stack`` copies, without its checks: one ``torch.stack`` per leaf."""
    return {p: {n: torch.stack([a[p][n] for a in adapters]) for n in e} for p, e in adapters[0].items()}


def bare_cat(fwd: funcpeft.Adapted, adapters: Sequence[Params], b_rank_major: bool) -> Params:
    """What a heterogeneous ``fwd.stack`` copies: per module, its adapters' ``A`` rows and ``B`` columns in adapter
    order, one ``torch.cat`` per packed leaf; ``B`` as ``(out, R)`` or rank-major ``(R, out)``."""
    out = {}
    for path in fwd.targets:
        members = [a[path] for a in adapters if path in a]
        b = [m["lora_B"].t() for m in members] if b_rank_major else [m["lora_B"] for m in members]
        out[path] = {
            "lora_A": torch.cat([m["lora_A"] for m in members], 0),
            "lora_B": torch.cat(b, 0 if b_rank_major else 1),
        }
    return out


def packed_layout(fwd: funcpeft.Adapted, adapters: Sequence[Params], stacked: Params) -> bool:
    """Whether ``fwd.stack`` (which gave ``stacked``) holds ``B`` rank-major: the bare layout that equals it."""
    for rank_major in (True, False):
        bare = bare_cat(fwd, adapters, rank_major)
        if all(
            bare[p][n].shape == t.shape and torch.equal(bare[p][n], t) for p, e in stacked.items() for n, t in e.items()
        ):
            return rank_major
    raise AssertionError("fwd.stack holds the adapters in neither layout bare_cat knows")


def flat_cat(adapters: Sequence[Params]) -> Tensor:
    """Every tensor copied into one flat buffer by one ``torch.cat``."""
    return torch.cat([t.reshape(-1) for a in adapters for t in leaves(a)])


def status_bytes(field: str) -> int:
    """A size field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


_PEAKS: list[int] = []  # VmHWM as peak_rise found it, before resetting it


def process_peak() -> float:
    """This process's peak resident set so far, in bytes (``peak_rise`` resets the kernel's own record, and with
    it ``ru_maxrss``, so the peaks it found are kept)."""
    try:
        return max([*_PEAKS, status_bytes("VmHWM")])
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def peak_rise(run: Callable[[], Any]) -> tuple[int | None, Any]:
    """``run()``'s result, and how far this process's resident set rose above its level before while ``run`` ran
    (None where Linux's ``/proc`` interface or glibc is missing). Freed memory is returned to the system first
    (``gc.collect``, ``malloc_trim``), so an allocation cannot hide in pages the process already holds."""
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        _PEAKS.append(status_bytes("VmHWM"))
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := the current RSS
        before = status_bytes("VmRSS")
    except (OSError, RuntimeError, AttributeError):
        return None, run()
    result = run()
    return status_bytes("VmHWM") - before, result


def stacking(
    what: str,
    stack: Callable[[Sequence[Params]], Params],
    bare: Callable[[Sequence[Params]], Params],
    bare_what: str,
    adapters: Sequence[Params],
    repeats: int,
) -> tuple[list[Row], Times]:
    """(e): ``stack(adapters)`` against the bare copy (checked equal), in time (and against one flat
    ``torch.cat``) and in peak memory against the result's size (the bare copy too, as a check of the method)."""
    rise, ours = peak_rise(lambda: stack(adapters))
    bare_rise, reference = peak_rise(lambda: bare(adapters))
    assert list(ours) == list(reference), "the stack's modules are not in the bare copy's order"
    assert all(torch.equal(ours[p][n], reference[p][n]) for p in reference for n in reference[p])
    size = tree_bytes(reference)
    del ours, reference
    programs = {  # each call's result is freed right after it: one lives at a time
        "funcpeft": lambda: stack(adapters),
        "bare": lambda: bare(adapters),
        "flat cat": lambda: flat_cat(adapters),
    }
    times = timing.measure(programs, warmup=0, repeats=repeats, inner=1)  # warmed up by the calls above
    rows = [
        timed_ratio(f"(e) {what} / bare {bare_what}", times, "funcpeft", "bare", 2.0),
        timed_ratio(
            f"(e) {what} / one torch.cat of all its tensors, flattened (comparison)",
            times,
            "funcpeft",
            "flat cat",
            None,
        ),
    ]
    for label, value, target in ((what, rise, 1.1), ("the bare copy (method check)", bare_rise, None)):
        shown = "n/a (Linux /proc needed)" if value is None else f"{value / size:.3f} ({mb(value)} / {mb(size)})"
        rows.append((f"(e) peak memory during {label} / result size", shown, target, value and value / size))
    return rows, {f"{what}: {name}": t for name, t in times.items()}


# ----- 2.-3. mixed batches over 1,000 resident adapters ---------------------------------------------------------


class Resident:
    """``count`` same-config adapters of rank ``r``, stacked, and the rows that use distinct ones of them."""

    def __init__(
        self, fwd: funcpeft.Adapted, r: int, ids: Tensor, adapter_ids: Tensor, adapters: list[Params], stacked: Params
    ) -> None:
        self.fwd, self.r, self.ids, self.adapter_ids, self.stacked = fwd, r, ids, adapter_ids, stacked
        self.count = len(adapters)
        self.single = adapters[int(adapter_ids[0])]
        self.used_bytes = sum(tree_bytes(adapters[int(k)]) for k in adapter_ids.unique())
        self.checked = (1, adapters[int(adapter_ids[1])])  # a row and its adapter, for the checks
        self.grad_bytes: dict[str, int] = {}  # after one step, by variant

    def inference(self) -> Programs:
        fwd, stacked, single, ids, aids = self.fwd, self.stacked, self.single, self.ids, self.adapter_ids
        return {
            f"mixed r={self.r}": nograd(lambda: fwd(stacked, ids, adapter_ids=aids, use_cache=False).logits),
            f"single r={self.r}": nograd(lambda: fwd(single, ids, use_cache=False).logits),
        }

    def step(self, variant: str) -> list[Tensor]:
        """One training step, ``"dense"``, ``"sparse"`` (``sparse_grad=True``) or ``"single"``: forward and
        backward into ``.grad`` of the leaves, which it returns."""
        params = self.single if variant == "single" else self.stacked
        kw: dict[str, Any] = {} if variant == "single" else {"adapter_ids": self.adapter_ids}
        if variant == "sparse":
            kw["sparse_grad"] = True
        row_losses(self.fwd(params, self.ids, use_cache=False, **kw).logits, self.ids).backward()
        return leaves(params)

    def training(self) -> Programs:
        """The timed steps; each sets the gradients it made to None when done, so that no step pays for freeing
        another's."""

        def timed(variant: str) -> Callable[[], None]:
            def go() -> None:
                for leaf in self.step(variant):
                    leaf.grad = None

            return go

        return {f"{v} step r={self.r}": timed(v) for v in ("dense", "sparse", "single")}

    def check(self) -> None:
        """A mixed row equals its adapter alone, and differs from the single-adapter batch (rows really mix); in
        a mixed step (dense and sparse), the gradient of that row's adapter is that row's own, and an adapter no
        row uses gets none. Records the bytes ``.grad`` holds after each kind of step."""
        i, own = self.checked
        mixed = self.inference()[f"mixed r={self.r}"]()
        alone = nograd(lambda: self.fwd(own, self.ids[i : i + 1], use_cache=False).logits)()
        torch.testing.assert_close(mixed[i : i + 1], alone, msg=lambda m: f"r={self.r} mixed row {i} vs alone: {m}")
        single = self.inference()[f"single r={self.r}"]()
        if torch.allclose(mixed[i], single[i], atol=1e-3):
            raise RuntimeError("the mixed batch computes what the single-adapter batch does: the adapters are alike")
        row = self.ids[i : i + 1]
        expect = torch.autograd.grad(row_losses(self.fwd(own, row, use_cache=False).logits, row), leaves(own))
        k = int(self.adapter_ids[i])
        unused = next(j for j in range(self.count) if j not in set(self.adapter_ids.tolist()))
        for variant in ("dense", "sparse"):
            grads = [leaf.grad for leaf in self.step(variant)]
            self.grad_bytes[variant] = held_bytes(grads)
            for grad, want in zip(grads, expect, strict=True):
                assert grad is not None, "a stacked leaf got no gradient"
                pick = grad.index_select(0, torch.tensor([k, unused]))  # dense or sparse alike
                pick = pick.to_dense() if pick.is_sparse else pick
                torch.testing.assert_close(pick[0], want, msg=lambda m, v=variant: f"r={self.r} {v} gradient: {m}")
                assert not pick[1].any(), "an adapter no row uses got a nonzero gradient"
            for leaf in leaves(self.stacked):
                leaf.grad = None


def resident(model: nn.Module, count: int, quick: bool) -> tuple[list[Row], list[str], Times]:
    """Figures (a), (b) and (e) for the same-config stack."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 1000, (ROWS, SEQ), generator=gen)
    adapter_ids = torch.randperm(count, generator=gen)[:ROWS]
    fwds = Fwds(model)
    rows: list[Row] = []
    notes: list[str] = []
    times: Times = {}
    setups = {}
    for r in MANY_RANKS:
        t0 = time.perf_counter()
        adapters = own_adapters(fwds, [lora(r)] * count, seed=10_000 * r)
        if r == max(MANY_RANKS):  # (e), stacking 1,000 r=64 adapters (3.1 GB)
            what = f"funcpeft.stack of {count} r={r}"
            stack_rows, stack_times = stacking(
                what, funcpeft.stack, bare_stack, "torch.stack per leaf", adapters, 2 if quick else 5
            )
            rows += stack_rows
            times.update(stack_times)
        stacked = funcpeft.stack(adapters)
        setups[r] = s = Resident(fwds(lora(r)), r, ids, adapter_ids, adapters, stacked)
        del adapters, stacked
        s.check()
        base, extra = matmul_macs(model, s.fwd, r)
        notes.append(
            f"r={r}: {count} adapters stacked {mb(tree_bytes(s.stacked))}, the {ROWS} used ones {mb(s.used_bytes)}"
            f" (built, stacked and checked in {time.perf_counter() - t0:.0f} s); LoRA adds {extra / base:.0%} to the "
            f"{base / 1e3:.0f}k matmul MACs per token: unfolded, a mixed batch costs >= {1 + extra / base:.2f}x the "
            "folded single adapter at equal efficiency"
        )
    infer: Programs = {}
    train: Programs = {}
    for s in setups.values():
        infer.update(s.inference())
        train.update(s.training())
    infer["base"] = nograd(lambda: model(ids, use_cache=False).logits)
    repeats, inner = (5, 2) if quick else (15, 3)
    model.eval()
    infer_t = timing.measure(infer, warmup=2, repeats=repeats, inner=inner)
    model.train()
    train_t = timing.measure(train, warmup=1, repeats=3 if quick else 8, inner=1)
    model.eval()
    for r in MANY_RANKS:
        label = f"(a) mixed inference, {ROWS} of {count} adapters r={r} / one adapter"
        rows.append(timed_ratio(label, infer_t, f"mixed r={r}", f"single r={r}", 1.15))
        rows.append(timed_ratio(f"(a) mixed r={r} / base (comparison)", infer_t, f"mixed r={r}", "base", None))
        rows.append(timed_ratio(f"(a) one adapter r={r} / base (comparison)", infer_t, f"single r={r}", "base", None))
    for r, s in setups.items():
        for variant, how in (("dense", "dense .grad"), ("sparse", "sparse_grad=True")):
            label = f"(b) mixed training step, {ROWS} of {count} r={r}, {how} / one adapter"
            rows.append(timed_ratio(label, train_t, f"{variant} step r={r}", f"single step r={r}", 1.2))
        for variant, how in (("dense", "dense"), ("sparse", "sparse_grad=True")):
            grad = s.grad_bytes[variant]
            label = f"(b) gradient bytes after backward ({how}), r={r} / the {ROWS} used adapters' bytes"
            rows.append((label, f"{grad / s.used_bytes:.2f} ({mb(grad)} / {mb(s.used_bytes)})", None, None))
    times.update(infer_t)
    times.update(train_t)
    return rows, notes, times


# ----- 4.-5. heterogeneous stacks -------------------------------------------------------------------------------


def padded_bytes(fwd: funcpeft.Adapted, adapters: Sequence[Params], every_module: bool) -> int:
    """Bytes of the adapters zero-padded to the largest rank: on every module any of them targets (a same-config
    stack), or only on the modules each one targets."""
    r_max = max(a[p]["lora_A"].shape[0] for a in adapters for p in a)
    total = 0
    for path in fwd.targets:
        first = next(a[path] for a in adapters if path in a)
        fan_in, fan_out = first["lora_A"].shape[1], first["lora_B"].shape[0]
        count = len(adapters) if every_module else sum(path in a for a in adapters)
        total += count * r_max * (fan_in + fan_out) * first["lora_A"].element_size()
    return total


def hetero(model: nn.Module, count: int, quick: bool) -> tuple[list[Row], list[str], Times]:
    """Figures (c), (d) and (e) for the heterogeneous stack."""
    fwds = Fwds(model)
    rows: list[Row] = []
    configs = hetero_configs(HETERO_K)
    own = own_adapters(fwds, configs, seed=1)
    _, fwd = funcpeft.adapt(model, configs)
    stacked = fwd.stack(own)
    packed, own_total = tree_bytes(stacked), sum(tree_bytes(a) for a in own)
    label = f"(c) heterogeneous stack of {HETERO_K} (r in {HETERO_RANKS}, 4 target sets) / own tensors"
    rows.append((label, f"{packed / own_total:.3f} ({mb(packed)} / {mb(own_total)})", 1.25, packed / own_total))
    for every, what in ((True, "on every targeted module (a same-config stack)"), (False, "on its own modules")):
        pad = padded_bytes(fwd, own, every)
        label = f"(c) zero-padded to r={max(HETERO_RANKS)} {what} / own (comparison)"
        rows.append((label, f"{pad / own_total:.3f} ({mb(pad)})", None, None))
    for k, back in enumerate(fwd.unstack(stacked)):  # an exact round trip
        assert all(torch.equal(back[p][n], own[k][p][n]) for p in own[k] for n in own[k][p]), f"unstack [{k}]"
    b_rank_major = packed_layout(fwd, own, stacked)

    # (d): 64 rows, row i with adapter i % 16
    ids = torch.randint(0, 1000, (ROWS, SEQ), generator=torch.Generator().manual_seed(3))
    aids = torch.arange(ROWS) % HETERO_K
    variants: dict[str, tuple[Callable[..., Any], Params, list[funcpeft.LoraConfig], list[Params]]] = {}
    variants["hetero"] = (fwd, stacked, configs, own)
    for name, cfgs, seed in (
        ("same rank", hetero_configs(HETERO_K, same_rank=HETERO_MEAN_RANK), 100),
        ("hetero, all targets", hetero_configs(HETERO_K, all_targets=True), 200),
        ("stack, all targets", [lora(HETERO_MEAN_RANK)] * HETERO_K, 300),
    ):
        adapters = own_adapters(fwds, cfgs, seed)
        if name.startswith("stack"):
            variants[name] = (fwds(cfgs[0]), funcpeft.stack(adapters), cfgs, adapters)
        else:
            f = funcpeft.adapt(model, cfgs)[1]
            variants[name] = (f, f.stack(adapters), cfgs, adapters)
    programs: Programs = {}
    for name, (f, st, cfgs, adapters) in variants.items():
        run = nograd(lambda f=f, st=st: f(st, ids, adapter_ids=aids, use_cache=False).logits)
        out = run()
        for i in range(HETERO_K):  # every adapter's first row equals that adapter alone, under its own config
            with torch.no_grad():
                alone = fwds(cfgs[i])(adapters[i], ids[i : i + 1], use_cache=False).logits
            torch.testing.assert_close(out[i : i + 1], alone, msg=lambda m, n=name, i=i: f"{n}, row {i}: {m}")
        programs[name] = run
    repeats, inner = (5, 2) if quick else (15, 3)
    times = timing.measure(programs, warmup=2, repeats=repeats, inner=inner)
    r = HETERO_MEAN_RANK
    rows += [
        timed_ratio(
            f"(d) heterogeneous mixed batch / same targets all r={r} (equal total rank)",
            times,
            "hetero",
            "same rank",
            1.2,
        ),
        timed_ratio(
            f"(d) ranks {HETERO_RANKS} on all layers / funcpeft.stack r={r} (comparison)",
            times,
            "hetero, all targets",
            "stack, all targets",
            None,
        ),
        timed_ratio(
            f"(d) same targets all r={r} (packed) / funcpeft.stack r={r} on all layers (comparison)",
            times,
            "same rank",
            "stack, all targets",
            None,
        ),
    ]
    del variants, stacked, own

    # (e): fwd.stack of `count` heterogeneous adapters
    many = hetero_configs(count)
    many_own = own_adapters(fwds, many, seed=1)
    t0 = time.perf_counter()
    many_fwd = funcpeft.adapt(model, many)[1]
    notes = [
        f"(e) {count} heterogeneous adapters (the {HETERO_K} configs of (c), cycled): "
        f"{mb(sum(tree_bytes(a) for a in many_own))}; funcpeft.adapt(model, {count} configs) took "
        f"{time.perf_counter() - t0:.1f} s"
    ]

    def bare(adapters: Sequence[Params]) -> Params:
        return bare_cat(many_fwd, adapters, b_rank_major)

    what = f"heterogeneous fwd.stack of {count}"
    stack_rows, stack_times = stacking(what, many_fwd.stack, bare, "torch.cat per leaf", many_own, 4 if quick else 10)
    times.update(stack_times)
    return rows + stack_rows, notes, times


# ----- report ---------------------------------------------------------------------------------------------------


def print_table(rows: Sequence[Row]) -> None:
    print("| figure | ratio [IQR] | target | met |\n|---|---|---|---|")
    for label, shown, target, value in rows:
        target_s = "-" if target is None else f"<= {target:.2f}"
        met = "-" if target is None else ("n/a" if value is None else ("yes" if value <= target else "**no**"))
        print(f"| {label} | {shown} | {target_s} | {met} |")


def profile(model: nn.Module) -> None:
    """Where the r=64 mixed forward and training steps over 1,000 resident adapters spend their time."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 1000, (ROWS, SEQ), generator=gen)
    adapter_ids = torch.randperm(RESIDENT, generator=gen)[:ROWS]
    r = max(MANY_RANKS)
    fwds = Fwds(model)
    adapters = own_adapters(fwds, [lora(r)] * RESIDENT, seed=0)
    s = Resident(fwds(lora(r)), r, ids, adapter_ids, adapters, funcpeft.stack(adapters))
    del adapters
    for name, run in {**s.inference(), **s.training()}.items():
        model.train("step" in name)
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run()
        print(f"\nProfile of {name} ({ROWS}x{SEQ}, {RESIDENT} resident adapters), 3 calls:\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"fewer repeats, {RESIDENT_QUICK} resident adapters")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--profile", action="store_true", help="instead: profile the r=64 mixed forward and steps")
    parser.add_argument("--out", default="benchmarks/results/bench_serve.md", help="where to write the results")
    args = parser.parse_args()
    with recorded(args.out):
        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore")
        transformers.logging.set_verbosity_error()
        if args.profile:
            profile(serving_model())
            return
        count = RESIDENT_QUICK if args.quick else RESIDENT
        load = os.getloadavg()[0]  # before this process adds its own
        t0 = time.perf_counter()
        decode_rows, decode_ms = decoding(args.quick)
        t1 = time.perf_counter()
        model = serving_model()
        resident_rows, resident_notes, resident_t = resident(model, count, args.quick)
        t2 = time.perf_counter()
        hetero_rows, hetero_notes, hetero_t = hetero(model, count, args.quick)
        t3 = time.perf_counter()

        versions = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
        quick = ", --quick" if args.quick else ""
        print(f"\nfuncpeft serving benchmark: {versions}, {args.threads} threads{quick}")
        print(f"Load average before the run: {load:.1f} on {os.cpu_count()} CPUs.\n")
        print(f"Decoding: GPT-2 style 4x256, LoRA r=8; {BATCH}x{PROMPT}, {NEW} new tokens\n")
        print_table(decode_rows)
        print(f"\n{decode_ms}\n")
        print(
            f"Many adapters: GPT-2 style 12x64, all linear layers unless said otherwise; {ROWS} rows x {SEQ} tokens\n"
        )
        print_table(sorted(resident_rows + hetero_rows, key=lambda row: row[0][:3]))  # by figure, (a)-(e), stable
        print()
        for note in resident_notes + hetero_notes:
            print(f"- {note}")
        times = {**resident_t, **hetero_t}
        print("- ms per call: " + ", ".join(f"{n} {1e3 * statistics.median(t):.1f}" for n, t in times.items()))
        print(
            f"\nPeak memory of this process: {process_peak() / 1e9:.1f} GB; total time: {t3 - t0:.0f} s (decoding "
            f"{t1 - t0:.0f}, resident adapters {t2 - t1:.0f}, heterogeneous {t3 - t2:.0f})"
        )


if __name__ == "__main__":
    main()
