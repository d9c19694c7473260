"""``fwd.bind(params)``: the adapter as an ``nn.Module`` (see :mod:`funcpeft.bind`).

The bound module's parameters are the adapter's leaves, its state dict is the adapter, its forward is ``fwd`` with
the model's signature, its mode and device follow to the model, and the model's attributes fall through with the
adapter applied. What Trainer does with it is in ``test_trainer.py``.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _models import MLP, oracle, tiny_gpt2, token_ids
from torch import nn

import funcpeft as fp

LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": False}


class Net(MLP):
    """An MLP with a config attribute and a method besides ``forward``: what falls through from the model."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"name": "net"}

    def hidden(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return scale * self.lin1(torch.relu(self.lin0(x)))


def _adapted(model: nn.Module | None = None, seed: int = 0, **kw):
    model = Net().eval() if model is None else model
    config = fp.LoraConfig(**{**LORA, **kw})
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(seed))
    return model, config, params, fwd


def _x(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 10, generator=torch.Generator().manual_seed(seed))


def _leaves(params):
    return [t for entry in params.values() for t in entry.values()]


def test_parameters_are_the_leaves_under_readable_stable_names() -> None:
    _, _, params, fwd = _adapted()
    bound = fwd.bind(params)
    assert [id(p) for p in bound.parameters()] == [id(t) for t in _leaves(params)]
    names = [name for name, _ in bound.named_parameters()]
    assert names == [f"adapter.{path}.{name}" for path, entry in params.items() for name in entry]
    assert names[0] == "adapter.lin0.lora_A"
    assert [name for name, _ in fwd.bind(params).named_parameters()] == names  # stable across binds
    assert all(p.requires_grad for p in bound.parameters())


def test_state_dict_is_the_adapter_only_and_loads_into_another_bind() -> None:
    model, _, params, fwd = _adapted()
    bound = fwd.bind(params)
    state = bound.state_dict()
    assert list(state) == [name for name, _ in bound.named_parameters()]
    assert not set(state) & set(model.state_dict())  # no base tensors, under any name
    for key, leaf in zip(state, _leaves(params), strict=True):
        assert torch.equal(state[key], leaf)

    other = fwd.init(torch.Generator().manual_seed(7))
    leaves = _leaves(other)
    fresh = fwd.bind(other)
    x = _x()
    assert not torch.allclose(fresh(x), bound(x))
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert [id(t) for t in _leaves(other)] == [id(t) for t in leaves]  # copied into the same leaves, in place
    for mine, theirs in zip(_leaves(other), _leaves(params), strict=True):
        assert torch.equal(mine, theirs)
    torch.testing.assert_close(fresh(x), fwd(params, x), rtol=0, atol=0)


def test_strict_loading_names_wrong_keys_and_assign_is_refused() -> None:
    _, _, params, fwd = _adapted()
    bound = fwd.bind(params)
    state = bound.state_dict()
    missing = dict(state)
    del missing["adapter.lin0.lora_A"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*adapter\.lin0\.lora_A"):
        bound.load_state_dict(missing)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*lin0\.lora_A"):
        bound.load_state_dict({k.removeprefix("adapter."): v for k, v in state.items()})  # keys without the prefix
    result = bound.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["adapter.lin0.lora_A"]
    with pytest.raises(ValueError, match="assign=True"):
        bound.load_state_dict(state, assign=True)
    assert bound.adapter.lin0.lora_A is params["lin0"]["lora_A"]


def test_forward_is_fwd_with_the_models_signature() -> None:
    model, _, params, fwd = _adapted()
    bound = fwd.bind(params)
    x = _x()
    torch.testing.assert_close(bound(x), fwd(params, x), rtol=0, atol=0)
    assert not torch.allclose(bound(x), model(x))
    assert inspect.signature(bound.forward) == inspect.signature(model.forward)

    gpt2 = tiny_gpt2()
    gparams, gfwd = fp.adapt(gpt2, fp.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    gbound = gfwd.bind(gparams)
    assert inspect.signature(gbound.forward) == inspect.signature(gpt2.forward)
    ids = token_ids(vocab=100)
    torch.testing.assert_close(gbound(ids, labels=ids).loss, gfwd(gparams, ids, labels=ids).loss, rtol=0, atol=0)


def test_the_class_forward_has_the_models_signature_for_trainers_label_probe() -> None:
    """Trainer reads the labels' names (hence whether evaluate reports eval_loss) from ``type(model).forward`` and,
    for question answering, the class name."""
    transformers = oracle("transformers")
    from transformers.utils.generic import can_return_loss, find_labels

    config = transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=50
    )
    for cls in (transformers.BertForSequenceClassification, transformers.BertForQuestionAnswering):
        model = cls(config).eval()
        params, fwd = fp.adapt(model, fp.LoraConfig(r=2, target_modules=["query"]))
        bound = fwd.bind(params)
        assert find_labels(type(bound)) == find_labels(cls) != []
        assert can_return_loss(type(bound)) == can_return_loss(cls)
        assert isinstance(bound, fp.bind.Bound) and type(bound).__name__ == f"Bound{cls.__name__}"


def test_adapter_ids_on_a_stacked_tree() -> None:
    _, _, first, fwd = _adapted()
    second = fwd.init(torch.Generator().manual_seed(3))
    stacked = fp.stack([first, second])
    bound = fwd.bind(stacked)
    x, ids = _x(5), torch.tensor([0, 1, -1, 1, 0])
    out = bound(x, adapter_ids=ids)
    torch.testing.assert_close(out, fwd(stacked, x, adapter_ids=ids), rtol=0, atol=0)
    torch.testing.assert_close(out[1], fwd(second, x[1:2])[0])
    torch.testing.assert_close(out[2], fwd.model(x[2:3])[0])
    assert [id(p) for p in bound.parameters()] == [id(t) for t in _leaves(stacked)]


def test_train_and_eval_switch_dropout_and_the_models_mode() -> None:
    model, _, params, fwd = _adapted(lora_dropout=0.5)
    bound = fwd.bind(params)
    assert not any(m.training for m in bound.modules()) and not model.training  # the mode the model had
    assert all(m.training for m in fwd.model.train().modules()) and all(m.training for m in fwd.bind(params).modules())
    model.eval()
    x = _x(16)
    bound.train()
    assert bound.training and model.training and model.lin0.training
    torch.manual_seed(0)
    a, b = bound(x), bound(x)
    assert not torch.allclose(a, b)  # dropout on the adapter's input
    bound.eval()
    assert not any(m.training for m in bound.modules()) and not any(m.training for m in model.modules())
    torch.testing.assert_close(bound(x), bound(x), rtol=0, atol=0)
    torch.testing.assert_close(bound(x), fwd(params, x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="mode"):
        bound.train("yes")


def test_an_optimizer_step_on_bound_updates_params() -> None:
    _, _, params, fwd = _adapted()
    before = {path: {n: t.detach().clone() for n, t in entry.items()} for path, entry in params.items()}
    bound = fwd.bind(params)
    optimizer = torch.optim.SGD(bound.parameters(), lr=0.1)
    x = _x()
    bound(x).square().mean().backward()
    grads = [t.grad.clone() for t in _leaves(params)]
    assert all(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    for leaf, old, grad in zip(_leaves(params), _leaves(before), grads, strict=True):
        torch.testing.assert_close(leaf.detach(), old - 0.1 * grad)


def test_attributes_and_methods_fall_through_with_the_adapter() -> None:
    model, _, params, fwd = _adapted()
    bound = fwd.bind(params)
    assert bound.config is model.config
    x = _x()
    torch.testing.assert_close(bound.hidden(x, scale=2.0), fwd.method("hidden")(params, x, scale=2.0), rtol=0, atol=0)
    assert not torch.allclose(bound.hidden(x), model.hidden(x))  # the adapter is applied
    with pytest.raises(AttributeError, match=r"Net has an attribute 'no_such_thing'"):
        bound.no_such_thing  # noqa: B018

    gpt2 = tiny_gpt2()
    gparams, gfwd = fp.adapt(
        gpt2, fp.LoraConfig(r=4, lora_alpha=64, target_modules=["c_attn"], init_lora_weights=False)
    )
    gbound = gfwd.bind(gparams)
    assert gbound.config is gpt2.config and gbound.device == gpt2.device and gbound.dtype == gpt2.dtype
    prompt = token_ids(batch=2, length=4, vocab=100)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    ours = gbound.generate(prompt, **kw)
    assert torch.equal(ours, gfwd.generate(gparams, prompt, **kw))
    assert not torch.equal(ours, gpt2.generate(prompt, **kw))


def test_save_pretrained_writes_a_folder_funcpeft_and_peft_load(tmp_path) -> None:
    peft = oracle("peft")
    model, config, params, fwd = _adapted()
    bound = fwd.bind(params)
    bound.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    loaded, loaded_config = fp.load(tmp_path / "adapter")
    x = _x()
    torch.testing.assert_close(fwd(loaded, x), bound(x), rtol=0, atol=0)
    assert loaded_config.r == config.r and loaded_config.target_modules == config.target_modules
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").eval()
    torch.testing.assert_close(theirs(x), bound(x))

    bound.save_pretrained(tmp_path / "other", is_main_process=False)  # the other ranks of a distributed run
    assert not (tmp_path / "other").exists()


def test_to_moves_and_casts_the_adapter_and_the_base() -> None:
    model, _, params, fwd = _adapted()
    leaves = _leaves(params)
    bound = fwd.bind(params)
    x = _x()
    expected = fwd(params, x).double()
    assert bound.to(torch.float64) is bound
    assert [id(t) for t in _leaves(params)] == [id(t) for t in leaves]  # cast in place: still params' leaves
    assert all(t.dtype == torch.float64 and t.is_leaf and t.requires_grad for t in bound.parameters())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    out = bound(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, fwd(params, x.double()), rtol=0, atol=0)
    torch.testing.assert_close(out, expected)


def test_bind_refuses_what_it_cannot_train() -> None:
    _, _, params, fwd = _adapted()
    with pytest.raises(TypeError, match="adapter dict"):
        fwd.bind(None)
    with pytest.raises(TypeError, match="adapter dict"):
        fwd.bind(fwd.model)
    nonleaf = {path: {n: t * 1 for n, t in entry.items()} for path, entry in params.items()}
    with pytest.raises(ValueError, match=r"params\['lin0'\]\['lora_A'\].*is_leaf=False"):
        fwd.bind(nonleaf)
    frozen = {path: {n: t.detach() for n, t in entry.items()} for path, entry in params.items()}
    with pytest.raises(ValueError, match="requires_grad=False"):
        fwd.bind(frozen)
    with pytest.raises(ValueError, match=r"params\['lin1'\]"):  # a tree that does not fit: now, not at step one
        fwd.bind({"lin0": params["lin0"]})
    wrong = {**params, "lin0": {"lora_A": torch.zeros(2, 3, requires_grad=True), "lora_B": params["lin0"]["lora_B"]}}
    with pytest.raises(ValueError, match="lin0"):
        fwd.bind(wrong)


def test_the_models_weights_are_untouched() -> None:
    model, _, params, fwd = _adapted(lora_dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bound = fwd.bind(params)
    optimizer = torch.optim.AdamW(bound.parameters(), lr=0.1)
    for _ in range(2):
        bound.train()
        bound(_x()).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    bound.eval()
    bound.hidden(_x())
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(p.grad is None for p in model.parameters())
    assert dict(model.named_modules()).keys() == dict(Net().named_modules()).keys()


def test_deepcopy_copies_the_adapter_and_shares_the_model() -> None:
    model, _, params, fwd = _adapted()
    bound = fwd.bind(params)
    twin = copy.deepcopy(bound)  # what EMA/SWA averaging (torch.optim.swa_utils.AveragedModel) does
    assert twin.fwd is fwd and twin.fwd.model is model
    assert [id(p) for p in twin.parameters()] == [id(t) for t in _leaves(twin.params)]
    assert not {id(p) for p in twin.parameters()} & {id(p) for p in bound.parameters()}
    x = _x()
    torch.testing.assert_close(twin(x), bound(x), rtol=0, atol=0)
    with torch.no_grad():
        twin.params["lin0"]["lora_B"].add_(1.0)
    assert not torch.allclose(twin(x), bound(x))
    averaged = torch.optim.swa_utils.AveragedModel(bound)
    averaged.update_parameters(bound)
    torch.testing.assert_close(averaged(x), bound(x), rtol=0, atol=0)


def test_a_heterogeneous_fwd_binds_and_runs_but_does_not_save_as_one_folder(tmp_path) -> None:
    model = Net().eval()
    configs = [
        fp.LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False),
        fp.LoraConfig(r=4, lora_alpha=2, target_modules=["lin0", "head"], init_lora_weights=False),
    ]
    stacked, fwd = fp.adapt(model, configs, generator=torch.Generator().manual_seed(0))
    bound = fwd.bind(stacked)
    assert [id(p) for p in bound.parameters()] == [id(t) for t in _leaves(stacked)]
    x, ids = _x(3), torch.tensor([1, 0, -1])
    torch.testing.assert_close(bound(x, adapter_ids=ids), fwd(stacked, x, adapter_ids=ids), rtol=0, atol=0)
    bound(x, adapter_ids=ids).sum().backward()
    assert all(t.grad is not None for t in _leaves(stacked))
    with pytest.raises(ValueError, match="2 heterogeneous adapters.*fwd.unstack"):
        bound.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
