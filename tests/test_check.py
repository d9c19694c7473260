"""``params`` are validated on every call: a tree changed after a good call never runs unchecked (funcpeft._check)."""

from __future__ import annotations

import optree
import pytest
import torch
from _models import MLP, tiny_gpt2, token_ids

import funcpeft as fp

CONFIG = fp.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False)


def _setup():
    torch.manual_seed(0)
    model = MLP()
    params, fwd = fp.adapt(model, CONFIG)
    return model, params, fwd, torch.randn(3, 10)


def test_deleting_an_entry_after_a_good_call_is_caught() -> None:
    _, params, fwd, x = _setup()
    fwd(params, x)
    del params["lin1"]
    with pytest.raises(ValueError, match=r"params\['lin1'\]` is missing"):
        fwd(params, x)


def test_deleting_a_tensor_after_a_good_call_is_caught() -> None:
    _, params, fwd, x = _setup()
    fwd(params, x)
    del params["lin0"]["lora_B"]
    with pytest.raises(ValueError, match=r"params\['lin0'\]` must hold \['lora_A', 'lora_B'\]"):
        fwd(params, x)


def test_replacing_a_tensor_with_another_shape_after_a_good_call_is_caught() -> None:
    _, params, fwd, x = _setup()
    fwd(params, x)
    params["lin0"]["lora_A"] = torch.zeros(8, 10)
    with pytest.raises(ValueError, match=r"params\['lin0'\]\['lora_A'\]` has shape \(8, 10\).*needs \(4, 10\)"):
        fwd(params, x)
    with pytest.raises(ValueError, match="lora_A"):
        fwd.merge(params)


def test_a_new_dict_at_a_reused_address_is_checked() -> None:
    _, params, fwd, x = _setup()
    reused = 0
    for _ in range(20):  # CPython reuses a freed dict's address for the next dict of the same size
        good = {path: dict(entry) for path, entry in params.items()}
        fwd(good, x)
        address = id(good)
        inner, empty = dict(params["lin0"]), {}
        del good  # (no gc.collect() here: it would allocate over the freed slot)
        bad = {"lin0": inner, "lin1": empty}
        reused += id(bad) == address
        with pytest.raises(ValueError, match=r"params\['lin1'\]` must hold"):
            fwd(bad, x)
    assert reused, "the allocator never reused an address: the test did not exercise the old id() cache"


def test_the_same_signature_passes_again_and_runs_correctly() -> None:
    model, params, fwd, x = _setup()
    first = fwd(params, x)
    other = optree.tree_map(lambda t: t.detach() * 2, params)
    torch.testing.assert_close(fwd(params, x), first)
    assert not torch.allclose(fwd(other, x), first)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_non_float_params_are_refused_naming_the_tensor(dtype) -> None:
    _, params, fwd, x = _setup()
    fwd(params, x)
    params["lin1"]["lora_B"] = params["lin1"]["lora_B"].detach().to(dtype)
    with pytest.raises(TypeError, match=rf"params\['lin1'\]\['lora_B'\]` is a {dtype}.*floating point"):
        fwd(params, x)


def test_params_on_another_device_are_refused_naming_the_module() -> None:
    _, params, fwd, x = _setup()
    fwd(params, x)
    params["lin0"]["lora_A"] = params["lin0"]["lora_A"].detach().to("meta")
    with pytest.raises(
        ValueError, match=r"params\['lin0'\]\['lora_A'\]` is on device meta, but module 'lin0' is on cpu"
    ):
        fwd(params, x)


def test_bfloat16_params_on_a_float32_model_run_as_peft_runs_them() -> None:
    _, params, fwd, x = _setup()
    half = optree.tree_map(lambda t: t.detach().bfloat16(), params)
    expected = fwd(optree.tree_map(lambda t: t.float(), half), x)
    torch.testing.assert_close(fwd(half, x), expected, rtol=1e-2, atol=1e-2)


def test_non_tensor_leaves_are_refused() -> None:
    _, params, fwd, x = _setup()
    fwd(params, x)
    params["lin0"]["lora_A"] = params["lin0"]["lora_A"].tolist()
    with pytest.raises(TypeError, match=r"params\['lin0'\]\['lora_A'\]` must be a Tensor, got list"):
        fwd(params, x)


def test_stacked_trees_are_checked_on_every_call() -> None:
    _, params, fwd, x = _setup()
    stacked = fp.stack([params, fwd.init()])
    ids = torch.tensor([0, 1, -1])
    fwd(stacked, x, adapter_ids=ids)
    stacked["lin1"]["lora_A"] = stacked["lin1"]["lora_A"][:, :2]
    with pytest.raises(ValueError, match=r"params\['lin1'\]\['lora_A'\]` has shape \(2, 2, 20\)"):
        fwd(stacked, x, adapter_ids=ids)


def _compiled(fwd):
    torch._dynamo.reset()
    return torch.compile(fwd, fullgraph=True, backend="eager")


def test_compiled_fwd_refuses_a_tree_with_a_missing_module() -> None:
    _, params, fwd, x = _setup()
    compiled = _compiled(fwd)
    with torch.no_grad():
        torch.testing.assert_close(compiled(params, x), fwd(params, x))
        partial = {"lin0": params["lin0"]}
        with pytest.raises(Exception, match=r"params\['lin1'\]` is missing") as info:
            compiled(partial, x)
    assert not isinstance(info.value, AssertionError)
    with torch.no_grad(), pytest.raises(ValueError, match=r"params\['lin1'\]` is missing"):
        torch.compile(fwd, backend="eager")(partial, x)  # without fullgraph the original error surfaces


def test_compiled_fwd_refuses_out_of_range_adapter_ids() -> None:
    _, params, fwd, x = _setup()
    stacked = fp.stack([params, fwd.init()])
    compiled = _compiled(fwd)
    with torch.no_grad():
        ok = torch.tensor([0, 1, -1])
        torch.testing.assert_close(compiled(stacked, x, adapter_ids=ok), fwd(stacked, x, adapter_ids=ok))
        for bad in ([0, -3, 1], [0, 2, 1]):
            with pytest.raises(RuntimeError, match=r"`adapter_ids` must lie in \[-1, 1\]"):
                compiled(stacked, x, adapter_ids=torch.tensor(bad))


def test_validation_holds_on_a_transformers_model_with_many_modules() -> None:
    model = tiny_gpt2()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules="all-linear"))
    ids = token_ids()
    fwd(params, ids)
    params["transformer.h.1.mlp.c_fc"]["lora_B"] = torch.zeros(3, 8)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc"):
        fwd(params, ids)
