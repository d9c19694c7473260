"""Turning :func:`funcpeft._describe.describe`'s facts into ``funcpeft inspect``'s text report.

:func:`render` lays the facts out as ``label  value`` rows; the helpers fold module paths that differ in one layer
index (``h.{0-3}.attn.c_attn``) and group modules by a per-module value (rank, scaling), most common first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["render"]


def _compact(paths: Sequence[str]) -> str:
    """Module paths with one varying layer index folded: ``h.{0-3}.attn.c_attn, lm_head``."""
    groups: dict[tuple[str, ...], list[int]] = {}
    singles: list[str] = []
    for path in paths:
        parts = path.split(".")
        numeric = [i for i, p in enumerate(parts) if p.isdigit()]
        if len(numeric) != 1:
            singles.append(path)
            continue
        i = numeric[0]
        groups.setdefault((".".join(parts[:i]), ".".join(parts[i + 1 :])), []).append(int(parts[i]))
    out = []
    for (head, tail), indices in groups.items():
        ranges = _ranges(sorted(set(indices)))
        mid = ranges if len(indices) == 1 else "{" + ranges + "}"
        out.append(".".join(s for s in (head, mid, tail) if s))
    return ", ".join(out + singles)


def _ranges(indices: list[int]) -> str:
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _by_value(values: Mapping[str, float], name: str, fmt: Callable[[float], str]) -> list[str]:
    """``name=value`` groups, most common first; modules listed unless one value covers them all."""
    groups: dict[float, list[str]] = {}
    for path, value in values.items():
        groups.setdefault(value, []).append(path)
    if len(groups) == 1:
        [(value, paths)] = groups.items()
        return [f"{name}={fmt(value)} (all {_plural(len(paths), 'module')})"]
    ordered = sorted(groups.items(), key=lambda vp: (-len(vp[1]), vp[0]))
    return [f"{name}={fmt(v)} ({_plural(len(paths), 'module')}): {_compact(paths)}" for v, paths in ordered]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _number(x: float) -> str:
    return f"{x:g}"


def render(facts: Mapping[str, Any]) -> str:
    """The human-readable report of :func:`describe`'s facts."""
    rows: list[tuple[str, str]] = []

    def add(label: str, lines: Sequence[str]) -> None:
        rows.extend((label if i == 0 else "", line) for i, line in enumerate(lines))

    hub = facts.get("hub")
    if hub:
        at = [f"revision {hub['revision']!r}" if hub["revision"] is not None else "default revision"]
        if hub["commit"] and hub["commit"] != hub["revision"]:
            at.append(f"commit {hub['commit']}")
        if hub["subfolder"]:
            at.append(f"subfolder {hub['subfolder']!r}")
        add("adapter", [f"{hub['repo_id']} (Hugging Face Hub; {', '.join(at)})", f"cached at {facts['path']}"])
    else:
        add("adapter", [facts["path"]])
    add("method", [facts["peft_type"]])

    if facts["task_type"]:
        add("task_type", [facts["task_type"]])
    targets = facts["targets"]
    add("targets", [f"{_plural(len(targets), 'module')}: {_compact(targets)}"])
    recorded = facts["target_modules"]
    if isinstance(recorded, list) and sorted(recorded) == sorted(targets):
        add("target_modules", [f"the {len(recorded)} adapted modules' paths"])
    elif isinstance(recorded, list) and len(recorded) > 6:
        add("target_modules", [f"{len(recorded)} names: {_compact(recorded)}"])
    else:
        add("target_modules", [repr(recorded)])
    if facts["peft_type"] == "ADALORA":
        _render_adalora(facts, add)
    elif facts["peft_type"] == "OFT" and "block_sizes" in facts:
        add("block size", _by_value(facts["block_sizes"], "b", str))
        if facts["block_share"]:
            add("blocks", ["one b x b block shared by all blocks of each module (block_share)"])
        else:
            add("blocks", _by_value(facts["blocks"], "r", str))
        add(
            "options",
            [
                f"coft={facts['coft']} (eps={facts['eps']:g})  use_cayley_neumann={facts['use_cayley_neumann']} "
                f"(terms={facts['num_cayley_neumann_terms']})  bias={facts['bias']!r}  "
                f"modules_to_save={facts['modules_to_save']!r}"
            ],
        )
    elif facts["peft_type"] in ("LOHA", "LOKR") and "forms" in facts:
        add("rank", _by_value(facts["ranks"], "r", str))
        alpha = _number(facts["alpha"]) + (
            f", alpha_pattern={facts['alpha_pattern']!r}" if facts["alpha_pattern"] else ""
        )
        add("alpha", [alpha])
        add("scaling", _by_value(facts["scaling"], "scaling", lambda s: f"{s:.6g}") + ["(alpha/r)"])
        add("factors", _by_value(facts["forms"], "dW", str))
        options = "  ".join(f"{k}={v!r}" for k, v in facts["options"].items())
        add("options", [f"{options}  modules_to_save={facts['modules_to_save']!r}"])
    elif "ranks" in facts:
        add("rank", _by_value(facts["ranks"], "r", str))
        if facts["rank_pattern"]:
            add("", [f"(r={facts['r']}, rank_pattern={facts['rank_pattern']!r})"])
        alpha = _number(facts["lora_alpha"])
        if facts["alpha_pattern"]:
            alpha += f", alpha_pattern={facts['alpha_pattern']!r}"
        add("lora_alpha", [alpha])
        kind = "lora_alpha/sqrt(r), rsLoRA" if facts["use_rslora"] else "lora_alpha/r"
        add("scaling", _by_value(facts["scaling"], "scaling", lambda s: f"{s:.6g}") + [f"({kind})"])
        add(
            "options",
            [
                f"use_dora={facts['use_dora']}  use_rslora={facts['use_rslora']}  lora_bias={facts['lora_bias']}  "
                f"bias={facts['bias']!r}  modules_to_save={facts['modules_to_save']!r}"
            ],
        )
        if facts.get("trainable_tokens"):
            add("tokens", [f"{n} trainable token rows of {p}" for p, n in facts["trainable_tokens"].items()])
        if facts.get("target_parameters"):
            add("target_parameters", [repr(facts["target_parameters"]), "(A: r * experts rows, PEFT's nesting)"])
            for path, shapes in facts["parameter_adapters"].items():
                add("", [f"{path}: " + "  ".join(f"{n} {tuple(s)}" for n, s in shapes.items())])
    counts = facts["parameters"]
    add(
        "parameters",
        [f"{counts['total']:,} trainable = {counts['adapter']:,} adapter + {counts['full_copies']:,} in full copies"],
    )
    if facts["full_copies"]:
        by_names: dict[tuple[str, ...], list[str]] = {}
        for path, names in facts["full_copies"].items():
            by_names.setdefault(tuple(names), []).append(path)
        add("full copies", [f"{_compact(paths)} ({', '.join(names)})" for names, paths in by_names.items()])
    if facts.get("shared"):
        shapes = ", ".join(f"{n} {tuple(s)}" for n, s in facts["shared"].items())
        add("shared", [f"{shapes}: frozen, shared by all adapted modules (not trainable)"])
    add("dtypes", [", ".join(f"{d} ({_plural(n, 'tensor')})" for d, n in facts["dtypes"].items())])
    files = facts["files"]
    add("files", [", ".join(f"{f['name']} {_size(f['bytes'])}" for f in (files["weights"], files["config"]))])
    rows += [("WARNING", w) for w in facts["warnings"]]
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in rows)


def _render_adalora(facts: Mapping[str, Any], add: Callable[[str, Sequence[str]], None]) -> None:
    ranks = facts["ranks"]
    if not ranks:
        return
    add("rank", _by_value(ranks, "r", str))
    budget = facts["budget"]
    sources = set(facts["rank_source"].values())
    if sources == {"tensors"}:
        origin = "from the tensors: no rank_pattern, not pruned yet"
    elif sources == {"rank_pattern"}:
        origin = "from rank_pattern"
    else:
        masked = sum(s == "rank_pattern" for s in facts["rank_source"].values())
        origin = f"from rank_pattern for {_plural(masked, 'module')}, the tensors for the others"
    add(
        "",
        [
            f"(ranks {origin}; init_r={facts['init_r']}, target_r={facts['target_r']}; {budget['kept']} of "
            f"{budget['initial']} triplets kept, target budget {budget['target']})"
        ],
    )
    add("lora_alpha", [_number(facts["lora_alpha"])])
    add("scaling", _by_value(facts["scaling"], "scaling", lambda s: f"{s:.6g}") + ["(lora_alpha/init_r, AdaLoRA)"])
    add("options", [f"bias={facts['bias']!r}  modules_to_save={facts['modules_to_save']!r}"])
