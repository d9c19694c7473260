"""How much does funcpeft's interception cost compared with PEFT and with a hand-inlined LoRA?

Three measurements, in one process, on 2 CPU threads, each on GPT-2-style models (``GPT2LMHeadModel``,
vocabulary 1000, dropout 0) with LoRA r=8 on every linear layer (``c_attn``, ``attn.c_proj``, ``c_fc``,
``mlp.c_proj``) and non-trivial adapters (``init_lora_weights=False``):

1. *training step*: forward + backward to the adapter tensors (``loss = logits.float().mean()``), 4 layers,
   width 256, batch 8x64;
2. *inference*: the same model and batch, unmerged, ``eval()`` under ``torch.no_grad()``;
3. *small-batch latency*: 12 layers, width 64, batch 1x16, inference; here Python overhead dominates.

Implementations, all holding the same weights (checked with ``assert_close`` on logits and gradients before
anything is timed, so no row can time a wrong program):

- ``funcpeft``: ``fwd(params, ids, use_cache=False)`` from ``funcpeft.adapt``;
- ``PEFT``: ``peft.get_peft_model`` on a copy of the model, with funcpeft's A/B copied in;
- ``floor``: a copy of the model whose targeted ``Conv1D`` instances get their class swapped to a subclass whose
  own forward computes ``addmm(bias, x, W) + (x @ A.T) @ B.T * scaling``: the LoRA term inline in the base
  layer, no wrapper module, no dispatch; what a hand-written unmerged LoRA costs;
- ``base``: the model without adapter (inference rows only).

After warm-up, each repeat times a block of iterations of every implementation, round-robin in an order rotated
every repeat, and keeps the block's median iteration. The reported ratio is the median over repeats of the
per-repeat ratio (paired, so slow drift of the machine cancels), with the interquartile range in brackets;
absolute medians (ms per iteration) follow. On a shared machine, rerun when the brackets are wide.

With ``--compiled``, each implementation's inference is also compiled (dynamo + inductor, ``fullgraph``; funcpeft's
with ``fwd.compile``, each implementation through a code object of its own), and for the small batch the compiled
call is split in two halves, timed in the same rounds: the inductor graph alone, and the call with a graph that
does nothing (dynamo's per-call work around the graph), so that a gap to the floor can be placed.

Run from the repository root::

    python benchmarks/bench_core.py          # about 1-2 minutes (longer on a busy machine)
    python benchmarks/bench_core.py --quick  # about 30 seconds, noisier
    python benchmarks/bench_core.py --threads 1  # Python overhead without OpenMP scheduling noise
    python benchmarks/bench_core.py --compiled   # also compiled inference and its two halves (about 4-5 minutes)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import peft
import torch
import transformers
from _timing import fmt, gpt2_config, measure, ratio, recorded
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import funcpeft
from funcpeft._compile import guard_filter

TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]
RANK = 8
ALPHA = 8


class FloorConv1D(Conv1D):
    """GPT-2's ``Conv1D`` with the LoRA term computed inside its own forward: no wrapper, no dispatch."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    scaling: float

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x2d = x.view(-1, x.size(-1))
        out = torch.addmm(self.bias, x2d, self.weight) + (x2d @ self.lora_A.T) @ self.lora_B.T * self.scaling
        return out.view(size_out)


@dataclass
class Setup:
    """One model in four implementations with the same weights."""

    ids: Tensor
    params: funcpeft.Params
    fwd: funcpeft.Adapted
    model: nn.Module  # the untouched base model that funcpeft adapts
    peft_model: nn.Module
    floor: nn.Module

    def train(self, mode: bool) -> None:
        for m in (self.model, self.peft_model, self.floor):
            m.train(mode)

    def adapter_leaves(self) -> dict[str, list[Tensor]]:
        """Each implementation's adapter tensors, in the same order (``fwd.targets``, A then B)."""
        peft_inner = self.peft_model.base_model.model
        return {
            "funcpeft": [self.params[p][k] for p in self.fwd.targets for k in ("lora_A", "lora_B")],
            "PEFT": [
                getattr(peft_inner.get_submodule(p), k)["default"].weight
                for p in self.fwd.targets
                for k in ("lora_A", "lora_B")
            ],
            "floor": [getattr(self.floor.get_submodule(p), k) for p in self.fwd.targets for k in ("lora_A", "lora_B")],
        }


def build(n_layer: int, n_embd: int, n_head: int, batch: int, seq: int, seed: int = 0) -> Setup:
    torch.manual_seed(seed)
    config = gpt2_config(n_layer, n_embd, n_head)
    model = transformers.GPT2LMHeadModel(config).requires_grad_(False)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))

    params, fwd = funcpeft.adapt(
        model,
        funcpeft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES, init_lora_weights=False),
        generator=torch.Generator().manual_seed(seed + 1),
    )
    if len(fwd.targets) != 4 * n_layer:
        raise RuntimeError(f"expected {4 * n_layer} adapted Conv1D layers, got {len(fwd.targets)}: {fwd.targets}")

    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated `is_gradient_checkpointing`; not this benchmark's concern.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = peft.get_peft_model(
            copy.deepcopy(model),
            peft.LoraConfig(
                r=RANK,
                lora_alpha=ALPHA,
                target_modules=TARGET_MODULES,
                fan_in_fan_out=True,
                init_lora_weights=False,
            ),
        )
    floor = copy.deepcopy(model)
    peft_inner = peft_model.base_model.model
    with torch.no_grad():
        for path in fwd.targets:
            a, b = params[path]["lora_A"], params[path]["lora_B"]
            layer = peft_inner.get_submodule(path)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            if layer.scaling["default"] != ALPHA / RANK:
                raise RuntimeError(f"PEFT's scaling on {path} is {layer.scaling['default']}, not {ALPHA / RANK}")
            module = floor.get_submodule(path)
            if type(module) is not Conv1D:
                raise RuntimeError(f"{path} is a {type(module).__name__}, expected transformers' Conv1D")
            module.__class__ = FloorConv1D
            module.lora_A = nn.Parameter(a.detach().clone())
            module.lora_B = nn.Parameter(b.detach().clone())
            module.scaling = ALPHA / RANK
    return Setup(ids=ids, params=params, fwd=fwd, model=model, peft_model=peft_model, floor=floor)


# ----- the timed programs ---------------------------------------------------------------------------------------


def training_steps(s: Setup) -> dict[str, Callable[[], object]]:
    leaves = s.adapter_leaves()
    ids = s.ids

    def step(run: Callable[[], Tensor], inputs: list[Tensor]) -> Callable[[], tuple[Tensor, ...]]:
        def go() -> tuple[Tensor, ...]:
            loss = run().float().mean()
            return torch.autograd.grad(loss, inputs)

        return go

    return {
        "funcpeft": step(lambda: s.fwd(s.params, ids, use_cache=False).logits, leaves["funcpeft"]),
        "PEFT": step(lambda: s.peft_model(input_ids=ids, use_cache=False).logits, leaves["PEFT"]),
        "floor": step(lambda: s.floor(ids, use_cache=False).logits, leaves["floor"]),
    }


def inference(s: Setup, with_base: bool) -> dict[str, Callable[[], object]]:
    ids = s.ids

    def nograd(run: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def go() -> Tensor:
            with torch.no_grad():
                return run()

        return go

    programs = {
        "funcpeft": nograd(lambda: s.fwd(s.params, ids, use_cache=False).logits),
        "PEFT": nograd(lambda: s.peft_model(input_ids=ids, use_cache=False).logits),
        "floor": nograd(lambda: s.floor(ids, use_cache=False).logits),
    }
    if with_base:
        programs["base"] = nograd(lambda: s.model(ids, use_cache=False).logits)
    return programs


def module_caller(module: nn.Module, name: str) -> Callable[[Tensor], Any]:
    """``x -> module(x, use_cache=False)`` with a code object of its own: dynamo keeps its compiled variants per code
    object and checks a call against every variant's guards in turn, so callers sharing one code object would each
    pay for the others' guards (``fwd.compile`` gives each kind of call its own code object too). The compiled frame
    returns the model's whole output, as ``torch.compile(model)`` and ``fwd.compile`` do: dynamo's bytecode rebuilds
    the ``ModelOutput`` after the graph (about 5-25 us here), so a frame returning only ``.logits`` would skip work
    the others pay for. Callers read ``.logits`` outside the compiled frame."""

    def call(x: Tensor) -> Any:
        return module(x, use_cache=False)

    code = call.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, call.__globals__, name, None, call.__closure__)


def compiled_inference(s: Setup) -> tuple[dict[str, Callable[[], object]], dict[str, int]]:
    """Inference of each implementation compiled by dynamo + inductor with ``fullgraph`` (``torch._dynamo.optimize``,
    what ``torch.compile`` calls; funcpeft's with ``fwd.compile``, as a user calls it), and the number of guards each
    compiled frame keeps and checks per call."""
    ids = s.ids
    guards: dict[str, int] = {}

    def counter(name: str, keep: Callable[[Sequence[object]], list[bool]]) -> Callable[[Sequence[object]], list[bool]]:
        def count(entries: Sequence[object]) -> list[bool]:  # the guards each compiled frame keeps and checks
            kept = keep(entries)
            guards[name] = guards.get(name, 0) + sum(kept)
            return kept

        return count

    def compiled(name: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        count = counter(name, lambda entries: [True] * len(entries))
        return torch._dynamo.optimize("inductor", nopython=True, guard_filter_fn=count)(fn)

    # fwd.compile ANDs a guard_filter_fn of the caller's with its own filter: counting what that filter keeps
    fwd_compiled = s.fwd.compile(
        fullgraph=True, backend="inductor", options={"guard_filter_fn": counter("funcpeft", guard_filter)}
    )

    def call_fwd(params: funcpeft.Params, x: Tensor) -> Tensor:
        return fwd_compiled(params, x, use_cache=False).logits

    f_peft = compiled("PEFT", module_caller(s.peft_model, "peft"))
    f_floor = compiled("floor", module_caller(s.floor, "floor"))
    f_base = compiled("base", module_caller(s.model, "base"))
    programs_raw = {
        "funcpeft": lambda: call_fwd(s.params, ids),
        "PEFT": lambda: f_peft(ids).logits,
        "floor": lambda: f_floor(ids).logits,
        "base": lambda: f_base(ids).logits,
    }

    def nograd(run: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def go() -> Tensor:
            with torch.no_grad():
                return run()

        return go

    programs = {name: nograd(run) for name, run in programs_raw.items()}
    outs = {name: run() for name, run in programs.items()}  # compiles each once
    for name in ("PEFT", "floor"):
        torch.testing.assert_close(outs["funcpeft"], outs[name], msg=lambda m, n=name: f"compiled vs {n}: {m}")
    return programs, guards


def compiled_parts(s: Setup) -> dict[str, Callable[[], object]]:
    """Two halves of each implementation's compiled inference (:func:`compiled_inference`), as programs:

    - ``graph <name>``: the inductor graph alone, called with the inputs dynamo gave it at its first call;
    - ``around <name>``: the compiled call with a graph that does nothing (it returns the outputs it computed once):
      what dynamo does per call around the graph (the guard check, the bytecode gathering the graph's inputs and
      rebuilding the output, the compiled callable's wrappers).

    Compiled again here, through backends that record the graph's inputs or replace the graph."""
    from torch._inductor.compile_fx import compile_fx

    ids = s.ids
    captured: dict[str, tuple[Callable[..., object], list[object]]] = {}

    def recording(name: str) -> Callable[..., Callable[..., object]]:
        def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., object]:
            graph = compile_fx(gm, example_inputs)

            def first(*args: object) -> object:
                captured.setdefault(name, (graph, list(args)))
                return graph(*args)

            return first

        return backend

    def no_graph(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., object]:
        outputs = gm(*example_inputs)
        return lambda *args: outputs

    def nograd(run: Callable[[], object]) -> Callable[[], object]:
        def go() -> object:
            with torch.no_grad():
                return run()

        return go

    programs: dict[str, Callable[[], object]] = {}
    with torch.no_grad():
        for backend, kind in ((recording("funcpeft"), "graph"), (no_graph, "around")):
            compiled = s.fwd.compile(fullgraph=True, backend=backend)
            compiled(s.params, ids, use_cache=False)
            programs[f"{kind} funcpeft"] = nograd(lambda c=compiled: c(s.params, ids, use_cache=False))
        for name, module in (("PEFT", s.peft_model), ("floor", s.floor), ("base", s.model)):
            for backend, kind in ((recording(name), "graph"), (no_graph, "around")):
                compiled = torch.compile(module_caller(module, f"{kind}_{name}"), fullgraph=True, backend=backend)
                compiled(ids)
                programs[f"{kind} {name}"] = nograd(lambda c=compiled: c(ids))
        adapted, base = (s.fwd(p, ids, use_cache=False).logits for p in (s.params, None))
    if len(captured) != 4:
        raise RuntimeError(f"expected one graph for each implementation, got {sorted(captured)}")
    for name, (graph, args) in captured.items():
        programs[f"graph {name}"] = nograd(lambda g=graph, a=args: g(*a))
        expected = base if name == "base" else adapted  # each graph computes the logits that were checked
        outs = [t for t in programs[f"graph {name}"]() if isinstance(t, Tensor) and t.shape == expected.shape]
        if not any(torch.allclose(t, expected, atol=1e-5) for t in outs):
            raise RuntimeError(f"the graph recorded for {name} does not compute the logits")
    return programs


def check_agree(s: Setup) -> None:
    """Logits (eval) and adapter gradients (train) of the three implementations agree."""
    s.train(False)
    outs = {name: run() for name, run in inference(s, with_base=True).items()}
    for name in ("PEFT", "floor"):
        torch.testing.assert_close(outs["funcpeft"], outs[name], msg=lambda m, n=name: f"logits vs {n}: {m}")
    if torch.allclose(outs["funcpeft"], outs["base"], atol=1e-3):
        raise RuntimeError("the adapter does not change the logits: the benchmark would time a no-op adapter")
    s.train(True)
    grads = {name: run() for name, run in training_steps(s).items()}
    for name in ("PEFT", "floor"):
        for i, (g, h) in enumerate(zip(grads["funcpeft"], grads[name], strict=True)):
            torch.testing.assert_close(g, h, msg=lambda m, n=name, i=i: f"gradient {i} vs {n}: {m}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 30 s, noisier)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--compiled", action="store_true", help="also compiled inference (both models) and guards")
    parser.add_argument("--out", default="benchmarks/results/bench_core.md", help="where to write the results")
    args = parser.parse_args()
    with recorded(args.out):
        torch.set_num_threads(args.threads)
        q = args.quick

        t0 = time.perf_counter()
        big = build(n_layer=4, n_embd=256, n_head=4, batch=8, seq=64)
        small = build(n_layer=12, n_embd=64, n_head=4, batch=1, seq=16)
        check_agree(big)
        check_agree(small)

        big.train(True)
        train_t = measure(training_steps(big), warmup=2 if q else 3, repeats=8 if q else 30, inner=3)
        big.train(False)
        infer_t = measure(inference(big, with_base=True), warmup=2 if q else 5, repeats=8 if q else 24, inner=5)
        small.train(False)
        small_t = measure(inference(small, with_base=True), warmup=20 if q else 50, repeats=15 if q else 40, inner=20)
        compiled_runs = []  # (label, eager times, compiled times, guards)
        if args.compiled:
            programs, guards = compiled_inference(small)
            programs.update(compiled_parts(small))
            compiled_t = measure(programs, warmup=20, repeats=15 if q else 40, inner=20)
            compiled_runs.append(("small-batch latency (12L, 64d, 1x16)", small_t, compiled_t, guards))
            programs, guards = compiled_inference(big)
            compiled_t = measure(programs, warmup=3, repeats=8 if q else 24, inner=5)
            compiled_runs.append(("inference (4L, 256d, 8x64)", infer_t, compiled_t, guards))
        elapsed = time.perf_counter() - t0

        print(
            f"\nfuncpeft benchmark: torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, {torch.get_num_threads()} threads{', --quick' if q else ''}\n"
        )
        print("Ratios: median over repeats of the paired per-repeat ratio [interquartile range].\n")
        print("| benchmark | ratio | funcpeft | PEFT | target (funcpeft) | PEFT in the issue | funcpeft meets target |")
        print("|---|---|---|---|---|---|---|")
        rows = [
            ("training step (4L, 256d, 8x64)", train_t, "floor", 1.03, 1.08),
            ("inference (4L, 256d, 8x64)", infer_t, "floor", 1.05, 1.17),
            ("small-batch latency (12L, 64d, 1x16)", small_t, "base", 1.15, 1.57),
            ("small-batch latency (12L, 64d, 1x16)", small_t, "floor", None, None),
        ]
        for label, times, den, target, issue in rows:
            ours, theirs = ratio(times, "funcpeft", den), ratio(times, "PEFT", den)
            target_s = f"<= {target:.2f}" if target is not None else "-"
            issue_s = f"{issue:.2f}" if issue is not None else "-"
            met = "-" if target is None else ("yes" if ours[0] <= target else "**no**")
            print(f"| {label} | /{den} | {fmt(ours)} | {fmt(theirs)} | {target_s} | {issue_s} | {met} |")
        if "base" in small_t:
            print(f"\nSmall batch, floor/base: {fmt(ratio(small_t, 'floor', 'base'))}")

        for label, eager_t, compiled_t, guards in compiled_runs:
            print(f"\nCompiled (`torch.compile(fullgraph=True)`, inductor), {label}, no_grad:\n")
            print("| implementation | / compiled base | guards per call | compiled / its eager |")
            print("|---|---|---|---|")
            for name in ("funcpeft", "PEFT", "floor", "base"):
                eager = statistics.median(eager_t[name]) / statistics.median(compiled_t[name])
                print(f"| {name} | {fmt(ratio(compiled_t, name, 'base'))} | {guards.get(name, '-')} | 1/{eager:.2f} |")
            ours = ratio(compiled_t, "funcpeft", "base")[0]
            floor, theirs = ratio(compiled_t, "floor", "base")[0], ratio(compiled_t, "PEFT", "base")[0]
            print(
                f"\ncompiled funcpeft / compiled base <= the floor's ratio ({floor:.3f}): "
                f"{'met' if ours <= floor else 'MISSED'}; "
                f"<= PEFT's ({theirs:.3f}): {'met' if ours <= theirs else 'MISSED'}"
            )
            if "graph base" in compiled_t:
                print(
                    "\nThe two halves of a compiled call (`compiled_parts`): the inductor graph alone, and the call "
                    "with a graph that does nothing (dynamo's work around the graph: guards, gathering inputs, "
                    "rebuilding the output, wrappers):\n"
                )
                print("| implementation | graph / floor's graph | around the graph / floor's | around the graph, us |")
                print("|---|---|---|---|")
                for name in ("funcpeft", "PEFT", "floor", "base"):
                    around = statistics.median(compiled_t["around " + name]) * 1e6
                    print(
                        f"| {name} | {fmt(ratio(compiled_t, 'graph ' + name, 'graph floor'))} | "
                        f"{fmt(ratio(compiled_t, 'around ' + name, 'around floor'))} | {around:.0f} |"
                    )

        print("\nAbsolute medians, ms per iteration:\n")
        print("| benchmark | base | floor | funcpeft | PEFT |")
        print("|---|---|---|---|---|")
        for label, times in (
            ("training step", train_t),
            ("inference", infer_t),
            ("small-batch latency", small_t),
        ):
            cells = [
                f"{statistics.median(times[n]) * 1e3:.3f}" if n in times else "-"
                for n in ("base", "floor", "funcpeft", "PEFT")
            ]
            print(f"| {label} | " + " | ".join(cells) + " |")
        print(f"\nTotal time: {elapsed:.0f} s")


if __name__ == "__main__":
    main()
