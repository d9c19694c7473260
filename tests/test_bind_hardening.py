"""Hostile cases for ``fwd.bind`` (:mod:`funcpeft.bind`), the drop-in state dicts (:mod:`funcpeft.compat`) and
:mod:`funcpeft.distributed`: failures that must change nothing, moves that must keep ``params``' leaves, objects that
cannot be pickled, frozen leaves under DDP, adapter names that look like path segments, sparse gradients."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from _models import MLP
from torch import nn

import funcpeft as fp
from funcpeft.distributed import average_gradients

LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": False}


def _adapted(**kw):
    model = MLP().eval()
    params, fwd = fp.adapt(model, fp.LoraConfig(**{**LORA, **kw}), generator=torch.Generator().manual_seed(0))
    return model, params, fwd


def _leaves(params):
    return [t for entry in params.values() for t in entry.values()]


def _x(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 10, generator=torch.Generator().manual_seed(1))


# ----- fwd.bind ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("broken", ["shape", "missing", "meta"])
def test_a_load_state_dict_that_raises_leaves_the_adapter_as_it_was(broken: str) -> None:
    """torch copies key by key and raises at the end; the keys before the culprit must not stay loaded."""
    _, params, fwd = _adapted()
    bound = fwd.bind(params)
    before = [t.detach().clone() for t in _leaves(params)]
    state = {k: v + 1.0 for k, v in bound.state_dict().items()}
    last = list(state)[-1]  # every other key comes first
    if broken == "shape":
        state[last] = torch.zeros(3, 3)
    elif broken == "missing":
        del state[last]
    else:
        state[last] = torch.empty(state[last].shape, device="meta")
    with pytest.raises(RuntimeError, match="Error"):
        bound.load_state_dict(state)
    for leaf, old in zip(_leaves(params), before, strict=True):
        assert torch.equal(leaf, old)
    assert [id(p) for p in bound.parameters()] == [id(t) for t in _leaves(params)]


def test_to_meta_and_back_keeps_params_leaves_and_moves_the_model_with_them() -> None:
    model, params, fwd = _adapted()
    leaves = _leaves(params)
    bound = fwd.bind(params)
    bound(_x()).sum().backward()
    assert bound.to("meta") is bound
    assert [id(p) for p in bound.parameters()] == [id(t) for t in leaves]  # still params' leaves
    assert all(t.is_meta and t.is_leaf and t.requires_grad and t.grad.is_meta for t in leaves)
    assert all(p.is_meta for p in model.parameters())
    assert bound(_x().to("meta")).shape == (3, 4)  # runs on meta, as the model would
    bound.to_empty(device="cpu")
    assert [id(p) for p in bound.parameters()] == [id(t) for t in _leaves(params)]
    assert all(t.device.type == "cpu" and t.requires_grad for t in leaves)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_move_torch_cannot_make_in_place_changes_neither_adapter_nor_model() -> None:
    model, params, fwd = _adapted()
    bound = fwd.bind(params).to("meta")
    held = bound(_x().to("meta"))  # its graph still holds the adapter's leaves: torch cannot swap them
    with pytest.raises(RuntimeError, match="adapter's tensor .* drop the outputs .* Nothing was moved"):
        bound.to_empty(device="cpu")
    assert all(t.is_meta for t in _leaves(params)) and all(p.is_meta for p in model.parameters())
    del held
    bound.to_empty(device="cpu")
    assert all(t.device.type == "cpu" for t in _leaves(params))


def test_pickling_a_bound_adapter_is_refused_clearly_and_shallow_copy_still_works(tmp_path: Path) -> None:
    _, params, fwd = _adapted()
    bound = fwd.bind(params)
    with pytest.raises(TypeError, match=r"cannot be pickled.*save_pretrained.*state_dict\(\)"):
        pickle.dumps(bound)
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(bound, tmp_path / "bound.pt")
    shallow = copy.copy(bound)
    assert shallow.params is params and shallow.adapter is bound.adapter
    torch.testing.assert_close(shallow(_x()), bound(_x()), rtol=0, atol=0)


@pytest.mark.usefixtures("one_process_group")
def test_ddp_of_a_bound_vera_adapter_trains_and_keeps_the_frozen_projections_as_buffers() -> None:
    """VeRA's shared projections never get a gradient; as parameters DDP fails at its second step."""
    model = MLP().eval()
    params, fwd = fp.adapt(model, fp.VeraConfig(r=4, target_modules=["lin1"]))
    projections = [t.detach().clone() for t in params[""].values()]
    bound = fwd.bind(params)
    assert [n for n, _ in bound.named_buffers()] == ["adapter.vera_A", "adapter.vera_B"]
    assert [id(p) for p in bound.parameters()] == [id(t) for t in params["lin1"].values()]
    assert list(bound.state_dict()) == ["adapter.vera_A", "adapter.vera_B", *(n for n, _ in bound.named_parameters())]
    ddp = nn.parallel.DistributedDataParallel(bound)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    lambdas = params["lin1"]["vera_lambda_b"].detach().clone()
    for _ in range(3):
        ddp(_x()).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(params["lin1"]["vera_lambda_b"], lambdas)
    for t, old in zip(params[""].values(), projections, strict=True):
        assert torch.equal(t, old)
    state = {k: v.clone() for k, v in bound.state_dict().items()}  # buffers round-trip with the rest
    with torch.no_grad():
        params[""]["vera_A"].zero_()
    bound.load_state_dict(state)
    assert torch.equal(params[""]["vera_A"], projections[0])
    bound.double()
    assert params[""]["vera_A"].dtype == torch.float64 and bound.adapter.vera_A is params[""]["vera_A"]


# ----- funcpeft.compat -----------------------------------------------------------------------------------------------
class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_adapter_names_that_are_path_segments_keep_every_module_in_the_state_dicts() -> None:
    """Adapters "0" and "1" on `layers.0/1/2`: PEFT drops adapter "0"'s `layers.1.*` (its name filter matches the
    path segment), and strips a last segment "0" from base keys (`layers.0.bias` -> `layers.bias`)."""
    torch.manual_seed(0)
    model = Deep()
    targets = ["layers.1", "layers.2"]
    fp.inject_adapter_in_model(fp.LoraConfig(r=2, target_modules=targets, init_lora_weights=False), model, "1")
    fp.inject_adapter_in_model(
        fp.LoraConfig(r=2, target_modules=targets, bias="all", init_lora_weights=False), model, "0"
    )
    for name in ("0", "1"):
        state = fp.get_peft_model_state_dict(model, adapter_name=name)
        lora = {k for k in state if "lora_" in k}
        assert lora == {f"layers.{i}.lora_{ab}.weight" for i in (1, 2) for ab in "AB"}, name
        for i in (1, 2):
            own = model.layers[i].lora_A[name].weight
            assert state[f"layers.{i}.lora_A.weight"].data_ptr() == own.data_ptr()
    biases = {k for k in fp.get_peft_model_state_dict(model, adapter_name="0") if "lora_" not in k}
    assert biases == {"layers.0.bias", "layers.1.base_layer.bias", "layers.2.base_layer.bias"}

    new = {k: v.detach() + 1.0 for k, v in fp.get_peft_model_state_dict(model, adapter_name="0").items()}
    other = fp.get_peft_model_state_dict(model, adapter_name="1")["layers.1.lora_A.weight"].detach().clone()
    fp.set_peft_model_state_dict(model, new, adapter_name="0")
    for k, v in fp.get_peft_model_state_dict(model, adapter_name="0").items():
        assert torch.equal(v, new[k]), k
    assert torch.equal(model.layers[1].lora_A["1"].weight, other)  # the other adapter is untouched


@pytest.mark.parametrize("broken", ["meta", "complex"])
def test_set_with_a_value_that_cannot_be_loaded_changes_nothing(broken: str) -> None:
    model = MLP().eval()
    fp.inject_adapter_in_model(fp.LoraConfig(**LORA), model)
    state = fp.get_peft_model_state_dict(model)
    before = {k: v.detach().clone() for k, v in state.items()}
    new = {k: v.detach() + 1.0 for k, v in state.items()}
    last = sorted(new)[-1]
    if broken == "meta":
        new[last] = torch.empty(new[last].shape, device="meta")
        error, match = ValueError, rf"\['{last}'\]` is on the meta device"
    else:
        new[last] = torch.complex(new[last], new[last])
        error, match = TypeError, rf"\['{last}'\]` is a torch.complex64 tensor.*imaginary"
    with pytest.raises(error, match=match):
        fp.set_peft_model_state_dict(model, new)
    for k, v in fp.get_peft_model_state_dict(model).items():
        assert torch.equal(v, before[k]), k


# ----- funcpeft.distributed ------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.usefixtures("one_process_group")
def test_average_gradients_takes_the_sparse_gradients_of_sparse_grad_training() -> None:
    params, fwd = fp.adapt(MLP(), fp.LoraConfig(r=2, target_modules=["lin0"]))
    stacked = fp.stack([params, fwd.init(torch.Generator().manual_seed(1)), fwd.init()])
    fwd(stacked, _x(2), adapter_ids=torch.tensor([0, 2]), sparse_grad=True).square().sum().backward()
    grads = {path: {name: t.grad for name, t in entry.items()} for path, entry in stacked.items()}
    grads["dense"] = {"g": torch.ones(2, 3)}
    averaged = average_gradients(grads)  # one process: the mean is the gradient itself
    for name, grad in grads["lin0"].items():
        assert averaged["lin0"][name].layout is torch.sparse_coo
        assert torch.equal(averaged["lin0"][name].to_dense(), grad.to_dense()), name
    assert torch.equal(averaged["dense"]["g"], grads["dense"]["g"])
    with pytest.raises(TypeError, match=r"`grads\['g'\]` has layout torch.sparse_csr.*to_dense"):
        average_gradients({"g": torch.eye(3).to_sparse_csr()})
