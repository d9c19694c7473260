"""What every benchmark script here shares: the interleaved timing loop, paired ratios, and the model.

Machines are noisy, so no absolute time is trusted: programs run in blocks, round-robin, in an order rotated every
repeat, and results are reported as the median (and quartiles) of per-repeat *ratios* between programs measured
side by side in one process.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import io
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import transformers


def gpt2_config(n_layer: int = 4, n_embd: int = 256, n_head: int = 4) -> transformers.GPT2Config:
    """The benchmarks' GPT-2-style model (vocab 1000, 128 positions, no dropout), by default the 4x256 one."""
    return transformers.GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=1000, n_positions=128, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,  # GPT-2's 50256 lies outside vocab
    )  # fmt: skip


def measure(
    programs: dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    inner: int,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds per iteration of each program: one value per repeat, the median of a block of ``inner`` timed
    iterations (each bracketed by ``sync``, e.g. ``torch.cuda.synchronize``). Blocks run round-robin in an order
    rotated every repeat, so drift and cache warmth from the previous block spread evenly; the block median drops
    iterations stalled by other processes."""
    names = list(programs)
    for name in names:
        for _ in range(warmup):
            programs[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection triggered by one program must not be charged to another
    try:
        for rep in range(repeats):
            gc.collect()
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                run = programs[name]
                block = []
                for _ in range(inner):
                    sync()
                    start = time.perf_counter()
                    run()
                    sync()
                    block.append(time.perf_counter() - start)
                times[name].append(statistics.median(block))
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median and quartiles over repeats of the paired per-repeat ratio ``num / den``."""
    r = sorted(a / b for a, b in zip(times[num], times[den], strict=True))
    if len(r) < 4:
        return statistics.median(r), r[0], r[-1]
    q1, _, q3 = statistics.quantiles(r, n=4)
    return statistics.median(r), q1, q3


def fmt(stats: tuple[float, float, float]) -> str:
    med, lo, hi = stats
    return f"{med:.3f} [{lo:.3f}-{hi:.3f}]"


class _Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def recorded(out: str | None) -> Iterator[None]:
    """Print as usual and, when the block completes, also write what it printed to ``out`` (a markdown results
    file, with the date, the command line and the load average before and after: the README quotes these files).
    ``out`` None or empty: print only."""
    if not out:
        yield
        return
    import torch

    before = os.getloadavg()[0]
    buffer = io.StringIO()
    stdout = sys.stdout
    sys.stdout = _Tee(stdout, buffer)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout = stdout
    header = (
        f"`python {' '.join(sys.argv)}`, {datetime.date.today()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {before:.1f} before / {os.getloadavg()[0]:.1f} after\n"
    )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + buffer.getvalue())
    print(f"written to {path}")
