"""Child process of tests/test_io_atomic.py: saves killed with SIGKILL, and concurrent saves, on real files.

``python tests/_io_driver.py MODE DIR`` prints one JSON object. The driver imports torch once and forks a
process per save to kill (a fork is milliseconds, an interpreter with torch seconds), so the tests stay fast.

- ``steps``: count the filesystem calls a save makes (``os.open``, ``write``, ``fsync``, ``replace``, ...), then,
  for every call N, fork a saver that SIGKILLs itself at call N (a write first writes half its bytes); then
  ``funcpeft.load`` the folder, then save a third adapter over it and load again. Starting from a funcpeft
  checkpoint, a PEFT-written one (no hash in its metadata) and no folder.
- ``random``: a forked saver alternates two adapters in a loop and is SIGKILLed after a random delay, 30 times.
- ``concurrent``: two forked savers write different adapters to one folder in a loop while this process loads it.

Each load is classified as the name of the adapter it equals exactly (tensors and config), "absent"
(FileNotFoundError), "mixed" (anything else that loaded) or "error: ..." (any other exception).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)  # no thread pool alive across fork()

from safetensors.torch import save_file  # noqa: E402

import funcpeft as fp  # noqa: E402
import funcpeft.io as fio  # noqa: E402

WEIGHTS = "adapter_model.safetensors"
_STEPS = {"open", "write", "fsync", "fchmod", "fchown", "close", "replace", "rename", "unlink"}
_MODULES = [fio] + [m for m in (sys.modules.get("funcpeft._atomic"),) if m is not None]


def adapters() -> dict[str, tuple[fp.Params, Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("lin0", torch.nn.Linear(6, 5))
    model.add_module("lin1", torch.nn.Linear(5, 4))
    out = {}
    for name, r, alpha in (("A", 2, 8), ("B", 4, 16), ("C", 3, 3)):
        config = fp.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin0", "lin1"], init_lora_weights=False)
        out[name] = (fp.adapt(model, config, generator=torch.Generator().manual_seed(r))[0], config)
    return out


ADAPTERS = adapters()


def classify(folder: Path) -> str:
    try:
        params, config = fp.load(folder)
    except FileNotFoundError:
        return "absent"
    except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
        return f"error: {type(err).__name__}: {err}"
    for name, (expected, expected_config) in ADAPTERS.items():
        same = config == expected_config and params.keys() == expected.keys()
        if same and all(
            params[p].keys() == e.keys() and all(torch.equal(params[p][n], t) for n, t in e.items())
            for p, e in expected.items()
        ):
            return name
    return "mixed"


class KillingOs:
    """``os`` for the saver: counts filesystem calls and SIGKILLs the process at call ``kill_at``."""

    def __init__(self, kill_at: int) -> None:
        self.kill_at, self.calls = kill_at, []

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in _STEPS:
            return real

        def step(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if len(self.calls) == self.kill_at:
                if name == "write":
                    os.write(args[0], bytes(args[1])[: len(args[1]) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return step


def fork(body: Any) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    return pid


def killed_save(folder: Path, name: str, kill_at: int, count_file: Path | None = None) -> None:
    def body() -> None:
        killer = KillingOs(kill_at)
        for module in _MODULES:
            module.os = killer
        fp.save(folder, *ADAPTERS[name])
        if count_file is not None:
            count_file.write_text(json.dumps(killer.calls))

    os.waitpid(fork(body), 0)


def start(folder: Path, kind: str, torn_at: int = 0) -> None:
    """The folder a killed save starts from: ``kind``'s checkpoint, with stale temporaries and a user's file."""
    if kind == "fresh":
        return
    fp.save(folder, *ADAPTERS["A"])
    if kind == "peft":  # PEFT's own files: the same tensors with PEFT's metadata, no hash
        state = fp.to_peft_state_dict(ADAPTERS["A"][0], ADAPTERS["A"][1])
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS), {"format": "pt"})
    if kind == "torn":  # B's weights beside A's config, B's config in its temporary: reads as B
        killed_save(folder, "B", torn_at)
    (folder / ".adapter_config.json.funcpeft-0123456789abcdef.tmp").write_text('{"peft_type": "LO')
    (folder / ".adapter_model.safetensors.funcpeft-fedcba9876543210.tmp").write_bytes(b"\0" * 10)
    (folder / "README.md").write_text("user file")


# kind: (checkpoint before the save, the adapter saved and killed, the adapter saved over it afterwards)
KINDS = {"funcpeft": ("A", "B", "C"), "peft": ("A", "B", "C"), "fresh": ("absent", "B", "C"), "torn": ("B", "C", "A")}


def steps(root: Path) -> dict[str, Any]:
    results, calls = [], {}
    for kind, (_, new, follow) in KINDS.items():
        torn_at = [i for i, c in enumerate(calls.get("funcpeft", []), 1) if c == "replace"][-1:] or [0]
        start(root / f"{kind}-dry", kind, torn_at[0])
        killed_save(root / f"{kind}-dry", new, kill_at=0, count_file=root / "calls")
        calls[kind] = json.loads((root / "calls").read_text())
        for kill_at in range(1, len(calls[kind]) + 2):
            folder = root / f"{kind}-{kill_at}"
            start(folder, kind, torn_at[0])
            killed_save(folder, new, kill_at)
            left = sorted(os.listdir(folder)) if folder.exists() else []
            outcome = classify(folder)
            fp.save(folder, *ADAPTERS[follow])
            results.append([kind, kill_at, outcome, left, classify(folder), sorted(os.listdir(folder))])
    return {"kinds": KINDS, "calls": calls, "results": results}


def save_loop(folder: Path, names: list[str], seconds: float | None = None) -> None:
    end = None if seconds is None else time.monotonic() + seconds
    i = 0
    while end is None or time.monotonic() < end:
        fp.save(folder, *ADAPTERS[names[i % len(names)]])
        i += 1


def random_kills(root: Path, kills: int = 30) -> dict[str, Any]:
    folder = root / "ckpt"
    fp.save(folder, *ADAPTERS["A"])
    begin = time.perf_counter()
    for _ in range(5):
        fp.save(folder, *ADAPTERS["A"])
    duration = (time.perf_counter() - begin) / 5
    rng = random.Random(0)
    outcomes = []
    for _ in range(kills):
        pid = fork(lambda: save_loop(folder, ["B", "A"]))
        time.sleep(rng.uniform(0, 30 * duration))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcomes.append(classify(folder))
    return {"save_seconds": duration, "outcomes": outcomes}


def concurrent(root: Path, seconds: float = 2.0) -> dict[str, Any]:
    folder = root / "ckpt"
    fp.save(folder, *ADAPTERS["A"])
    writers = [fork(lambda: save_loop(folder, ["A"], seconds)), fork(lambda: save_loop(folder, ["B"], seconds))]
    reads: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        reads.append(classify(folder))
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in writers]
    return {"reads": reads, "final": classify(folder), "writer_codes": codes, "files": sorted(os.listdir(folder))}


if __name__ == "__main__":
    mode, root = sys.argv[1], Path(sys.argv[2])
    print(json.dumps({"steps": steps, "random": random_kills, "concurrent": concurrent}[mode](root)))
