"""Shared test configuration.

PEFT and transformers are the oracles. Locally a missing oracle skips its tests; with ``CI=true`` it is a
failure, so parity tests can never silently disappear from CI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not IN_CI:
        return
    for item in items:
        for mark in item.iter_markers("skip"):
            raise pytest.UsageError(f"{item.nodeid} is skipped ({mark.kwargs.get('reason')}) but CI=true forbids skips")


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Every test that compiles starts and ends with empty dynamo caches: torch keeps at most 8 compiled variants
    per code object (``Adapted.__call__`` is one code object for every ``fwd``), so graphs left by earlier tests
    would make a later ``torch.compile(fwd)`` hit the recompile limit depending on test order."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    yield
    if counters["stats"]["unique_graphs"] != before:
        torch._dynamo.reset()


@pytest.fixture
def one_process_group(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of one rank for the test's duration (collectives run single-process)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
