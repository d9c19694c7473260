"""Does an adapter tree of plain dicts cost more to guard than the same tensors as module parameters? (issue 13.1)

``bench_guards.py`` compares funcpeft's compiled call with the inline floor's and the base model's. This script
adds controls that take funcpeft out: the base model compiled with funcpeft's adapter tree as a second argument,
its 96 leaves read in the graph (iterated as ``params.items()``, or read by key), against the base alone passed the
same way, the floor (the same 96 tensors as module parameters), ``fwd.bind(params)`` compiled as a module (the
leaves as its parameters), and ``fwd.compile`` with and without the tree.
Every frame is compiled with a backend whose graph does nothing, and only the guard check
(``guard_manager.check`` on the frame's locals) is timed, rows interleaved. ``--reverse`` times the rows in the
opposite order: two rows with the same guard tree ("base, argument" and "base, closure") show how far apart rows
land for reasons other than their guards.

Run: ``python benchmarks/bench_guards_tree.py [--repeats 31] [--reverse]``. Prints medians in microseconds
(absolute times: compare rows of one run only).
"""

from __future__ import annotations

import argparse
import timeit
from typing import Any

import torch
from bench_core import build, module_caller
from bench_guards import no_graph
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as cache_entries


def base_and_tree(model: torch.nn.Module, params: dict[str, dict[str, torch.Tensor]], x: torch.Tensor) -> Any:
    out = model(x, use_cache=False).logits
    for entry in params.values():
        for leaf in entry.values():
            out = out + leaf.sum()
    return out


def base_and_tree_by_key(model: torch.nn.Module, params: dict[str, dict[str, torch.Tensor]], x: torch.Tensor) -> Any:
    out = model(x, use_cache=False).logits
    for path in PATHS:
        out = out + params[path]["lora_A"].sum() + params[path]["lora_B"].sum()
    return out


def base_alone(model: torch.nn.Module, params: dict[str, dict[str, torch.Tensor]], x: torch.Tensor) -> Any:
    return model(x, use_cache=False).logits


PATHS: list[str] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reverse", action="store_true", help="time the rows in the opposite order")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    s = build(12, 64, 4, 1, 16)
    s.train(False)
    ids, tree = s.ids, s.params
    PATHS[:] = list(tree)
    rows: dict[str, tuple[Any, dict[str, Any]]] = {}
    with torch.no_grad():
        for name, fn in (
            ("base + tree, items()", base_and_tree),
            ("base + tree, by key", base_and_tree_by_key),
            ("base, argument", base_alone),
        ):
            torch.compile(fn, fullgraph=True, backend=no_graph)(s.model, tree, ids)
            rows[name] = (cache_entries(fn.__code__)[0].guard_manager, {"model": s.model, "params": tree, "x": ids})
        modules = (("base, closure", s.model), ("floor", s.floor), ("fwd.bind(params)", s.fwd.bind(tree)))
        for i, (name, module) in enumerate(modules):
            fn = module_caller(module, f"guards_tree_{i}")
            torch.compile(fn, fullgraph=True, backend=no_graph)(ids)
            rows[name] = (cache_entries(fn.__code__)[0].guard_manager, {"x": ids, "module": module})
        for name, params in (("funcpeft, params=None", None), ("funcpeft", tree)):
            compiled = s.fwd.compile(fullgraph=True, backend=no_graph)
            compiled(params, ids, use_cache=False)
            code = next(iter(compiled._compiled.values()))[1]
            local = {"fwd": s.fwd, "params": params, "args": (ids,), "kwargs": {"use_cache": False}}
            rows[name] = (cache_entries(code)[0].guard_manager, local)
        for name, (guards, local) in rows.items():
            if not guards.check(local):
                raise RuntimeError(f"{name}: the guards fail on the locals given to them (the timing would be wrong)")
        order = list(reversed(rows)) if opts.reverse else list(rows)
        times: dict[str, list[float]] = {name: [] for name in order}
        for _ in range(opts.repeats):
            for name in order:
                guards, local = rows[name]
                times[name].append(timeit.timeit(lambda g=guards, x=local: g.check(x), number=200) / 200 * 1e6)
    head = f"torch {torch.__version__}, {opts.threads} threads, {opts.repeats} repeats, medians"
    print(f"{head}, order {order[0]!r} first")
    print("| frame | guard check (us) | guard-tree lines | TENSOR_MATCH | NO_TENSOR_ALIASING |")
    print("|---|---|---|---|---|")
    for name in rows:
        tree_text = str(rows[name][0])
        median = sorted(times[name])[len(times[name]) // 2]
        tensors, aliasing = tree_text.count("TENSOR_MATCH"), tree_text.count("NO_TENSOR_ALIASING")
        print(f"| {name} | {median:.1f} | {tree_text.count(chr(10))} | {tensors} | {aliasing} |")


if __name__ == "__main__":
    main()
