"""Shared test configuration.

PEFT and transformers are the oracles. Locally a missing oracle skips its tests; with ``CI=true`` it is a
failure, so parity tests can never silently disappear from CI.
"""

from __future__ import annotations

import os

import pytest
import torch

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
