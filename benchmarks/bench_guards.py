"""Where a compiled call spends its time around the graph: guards, bytecode, wrappers (issue 13, item 1).

Each implementation of the small-batch model (12 layers, 64 wide, batch 1x16, no_grad) is compiled with a backend
whose graph does nothing (it returns the outputs it computed once), so a call times only what dynamo does around
the graph. For each one the script times, interleaved, the whole call and the guard check alone
(``guard_manager.check`` on the frame's locals), and counts the lines of its guard tree and its guards of a few kinds
(``--no-dict-tags`` builds the guards with torch's dict-tag skipping of tensor guards off):

- ``funcpeft``: ``fwd.compile`` with the adapter, through ``CompiledAdapted``;
- ``funcpeft, kind's function``: the same compiled function called directly (without ``CompiledAdapted.__call__``);
- ``funcpeft, Parameter leaves``: the adapter's leaves wrapped as ``nn.Parameter`` (torch then skips the
  ``NO_TENSOR_ALIASING`` guards on them): what those guards cost;
- ``funcpeft, params=None``: ``fwd.compile`` called for the base model (no adapter tree): what the view costs;
- ``floor`` and ``base``: the inline floor and the base model under ``torch.compile``.

Run: ``python benchmarks/bench_guards.py [--repeats 31]``. Prints medians in microseconds (absolute times: compare
rows of one run only).
"""

from __future__ import annotations

import argparse
import re
import timeit
from collections.abc import Callable
from typing import Any

import torch
from bench_core import build, module_caller
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as cache_entries


def no_graph(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
    outputs = gm(*example_inputs)
    return lambda *args: outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-dict-tags",
        action="store_true",
        help="build the guards with torch._dynamo.config.skip_tensor_guards_with_matching_dict_tags=False",
    )
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    if opts.no_dict_tags:
        torch._dynamo.config.skip_tensor_guards_with_matching_dict_tags = False
    s = build(12, 64, 4, 1, 16)
    s.train(False)
    ids, args, kwargs = s.ids, (s.ids,), {"use_cache": False}
    as_parameters = {k: {n: torch.nn.Parameter(t.detach()) for n, t in v.items()} for k, v in s.params.items()}
    rows: dict[str, tuple[Any, dict[str, Any], Callable[[], Any]]] = {}
    with torch.no_grad():
        for name, params in (
            ("funcpeft", s.params),
            ("funcpeft, Parameter leaves", as_parameters),
            ("funcpeft, params=None", None),
        ):
            compiled = s.fwd.compile(fullgraph=True, backend=no_graph)
            compiled(params, ids, use_cache=False)
            inner, code = next(iter(compiled._compiled.values()))
            local = {"fwd": s.fwd, "params": params, "args": args, "kwargs": kwargs}
            guards = cache_entries(code)[0].guard_manager
            rows[name] = (guards, local, lambda c=compiled, p=params: c(p, ids, use_cache=False))
            if name == "funcpeft":
                rows["funcpeft, kind's function"] = (guards, local, lambda f=inner, p=params: f(s.fwd, p, args, kwargs))
        for name, module in (("floor", s.floor), ("base", s.model)):
            fn = module_caller(module, f"guards_{name}")
            compiled = torch.compile(fn, fullgraph=True, backend=no_graph)
            compiled(ids)
            rows[name] = (
                cache_entries(fn.__code__)[0].guard_manager,
                {"x": ids, "module": module},
                lambda c=compiled: c(ids),
            )
        for name, (guards, local, _) in rows.items():
            if not guards.check(local):
                raise RuntimeError(f"{name}: the guards fail on the locals given to them (the timing would be wrong)")
        check = {name: [] for name in rows}
        call = {name: [] for name in rows}
        for _ in range(opts.repeats):
            for name, (guards, local, run) in rows.items():
                check[name].append(timeit.timeit(lambda g=guards, x=local: g.check(x), number=200) / 200 * 1e6)
                call[name].append(timeit.timeit(run, number=100) / 100 * 1e6)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    tags = "off" if opts.no_dict_tags else "on"
    head = f"torch {torch.__version__}, {opts.threads} threads, {opts.repeats} repeats, medians"
    print(f"{head}, dict-tag skipping {tags}")
    print(
        "| implementation | call, no-op graph (us) | guard check (us) | the rest (us) | guard-tree lines | "
        + " | ".join(KINDS)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(KINDS))
    for name, (guards, _, _) in rows.items():
        c, g = median(call[name]), median(check[name])
        tree = str(guards)
        counts = " | ".join(str(len(re.findall(rf"\b{kind}\b", tree))) for kind in KINDS)
        print(f"| {name} | {c:.1f} | {g:.1f} | {c - g:.1f} | {tree.count(chr(10))} | {counts} |")


# guard kinds whose counts tell the trees apart (TENSOR_MATCH: tensors guarded; EQUALS_MATCH: values and dict keys)
KINDS = ("TENSOR_MATCH", "NO_TENSOR_ALIASING", "EQUALS_MATCH", "ID_MATCH", "TYPE_MATCH")


if __name__ == "__main__":
    main()
