"""Models the view cannot reach are adapted correctly or refused at ``adapt``, never a silent no-op
(funcpeft._preflight, and the first-call probe of targets that never ran)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from _models import MLP
from torch import nn

import funcpeft as fp

CONFIG = fp.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False)


def test_a_compiled_model_is_adapted_through_the_module_it_wraps() -> None:
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(3, 10)
    params, fwd = fp.adapt(model, CONFIG)
    compiled = torch.compile(model, backend="eager")
    params_c, fwd_c = fp.adapt(compiled, CONFIG)
    assert fwd_c.model is model and fwd_c.targets == ("lin0", "lin1")
    torch.testing.assert_close(fwd_c(params, x), fwd(params, x))
    assert not torch.allclose(fwd_c(params, x), model(x)), "the adapter must act"
    assert set(params_c) == set(params)


def test_a_target_with_an_instance_forward_is_refused() -> None:
    model = MLP()
    original = model.lin1.forward
    model.lin1.forward = lambda x: original(x)  # e.g. accelerate's hooks wrap forward on the instance
    with pytest.raises(ValueError, match=r"Module 'lin1' \(Linear\) has its `forward` replaced on the instance"):
        fp.adapt(model, CONFIG)


def test_an_ancestor_with_an_instance_forward_is_refused() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = MLP()

        def forward(self, x):
            return self.inner(x)

    model = Wrapper()
    model.inner.forward = types.MethodType(MLP.forward, model.inner)  # bound to the original: bypasses a view
    with pytest.raises(ValueError, match=r"Module 'inner' \(MLP\)"):
        fp.adapt(model, fp.LoraConfig(target_modules=["lin0"]))


def test_a_compiled_submodule_is_refused_with_the_fix() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.compile(MLP(), backend="eager")

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(ValueError, match=r"torch\.compile\(fwd\)"):
        fp.adapt(Wrapper(), fp.LoraConfig(target_modules=["lin0"]))


class Attn(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(self.attn(x, x, x)[0])


@pytest.mark.parametrize("targets", [["out_proj"], ["attn.out_proj", "lin"], "all-linear"])
def test_multihead_attention_out_proj_is_refused_not_silently_ignored(targets) -> None:
    with pytest.raises(ValueError, match=r"'attn\.out_proj' is the output projection of the nn\.MultiheadAttention"):
        fp.adapt(Attn(), fp.LoraConfig(target_modules=targets))
    params, fwd = fp.adapt(Attn(), fp.LoraConfig(target_modules="all-linear", exclude_modules=["attn.out_proj"]))
    assert fwd.targets == ("lin",)


def test_a_target_that_never_runs_is_reported_after_the_first_call() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.spare = nn.Linear(4, 4)  # read directly, never called

        def forward(self, x):
            return self.used(x) + x @ self.spare.weight.T

    params, fwd = fp.adapt(Unused(), fp.LoraConfig(target_modules=["used", "spare"]))
    x = torch.randn(2, 4)
    with pytest.warns(fp.FuncpeftWarning, match=r"\['spare'\] did not run in the first call") as record:
        fwd(params, x)
    assert record[0].filename == __file__  # the warning points at the user's call, not into funcpeft
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fwd(params, x)  # reported once, not on every call


def test_no_report_when_every_target_runs() -> None:
    params, fwd = fp.adapt(MLP(), CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fwd(params, torch.randn(2, 10))


def test_mixed_batches_refuse_sequence_first_models() -> None:
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=False, dropout=0.0)
    params, fwd = fp.adapt(model, fp.LoraConfig(r=2, target_modules=["linear1", "linear2"]))
    stacked = fp.stack([params, fwd.init()])
    x = torch.randn(2, 2, 8)  # (seq, batch, d) with seq == batch: the row check alone cannot tell
    with pytest.raises(ValueError, match=r"target 'linear1' lies inside 'the model', which is sequence-first"):
        fwd(stacked, x, adapter_ids=torch.tensor([0, 1]))
    torch.func.vmap(fwd, in_dims=(0, None))(stacked, x)  # one adapter per slice stays available


def test_mixed_batches_work_for_batch_first_transformer_layers() -> None:
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0).eval()
    params, fwd = fp.adapt(model, fp.LoraConfig(r=2, target_modules=["linear1", "linear2"], init_lora_weights=False))
    other = fwd.init(torch.Generator().manual_seed(1))
    x = torch.randn(3, 2, 8)
    out = fwd(fp.stack([params, other]), x, adapter_ids=torch.tensor([1, -1, 0]))
    torch.testing.assert_close(out[0], fwd(other, x[:1])[0])
    torch.testing.assert_close(out[1], model(x[1:2])[0])
    torch.testing.assert_close(out[2], fwd(params, x[2:])[0])


@pytest.mark.parametrize("stacked_layers", [False, True], ids=["layer", "encoder"])
def test_the_transformer_encoder_fast_path_does_not_skip_the_adapter(stacked_layers) -> None:
    import copy

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    model = (nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False) if stacked_layers else layer).eval()
    params, fwd = fp.adapt(model, fp.LoraConfig(r=2, target_modules=["linear1", "linear2"], init_lora_weights=False))
    merged = copy.deepcopy(model)
    merged.load_state_dict(fwd.merge(params))
    x = torch.randn(3, 4, 8)
    with torch.no_grad():  # eval + no_grad: the model itself takes the fused fast path
        out = fwd(params, x)
        torch.testing.assert_close(out, merged(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, model(x), atol=1e-3)
