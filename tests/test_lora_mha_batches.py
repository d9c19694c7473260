"""LoRA on nn.MultiheadAttention: mixed batches, vmap, torch.func.grad, torch.compile, combine, and the refusals."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _models import oracle
from test_lora_mha import HEADS, LK, LQ, CrossAttn, E, SelfAttn, _causal, _encoder, _outputs, _padding, _seq
from torch import Tensor, nn

import funcpeft as fp

peft = oracle("peft")

pytestmark = pytest.mark.filterwarnings(
    "ignore:LoRA on nn.MultiheadAttention applies out_proj:funcpeft.FuncpeftWarning"
)

IDS = torch.tensor([1, -1, 0])  # one id per batch element (BATCH = 3 in test_lora_mha)

# (name, model factory, batch_first, inputs -> (args, kwargs), targets); the per-row masks are sliced by _row. In
# sequence-first models only the attention modules are targets: other layers there see (seq, batch, ...) inputs,
# refused for mixed batches (test_mixed_batches_refuse_other_targets_of_sequence_first_layers_and_bad_inputs)
CASES: list[tuple[str, Any, bool, Any, list[str]]] = [
    ("self-batch_first", lambda: SelfAttn(True), True, lambda: ((_seq(True, LQ, 1),),
     {"key_padding_mask": _padding(), "average_attn_weights": False}), ["attn"]),
    ("self-seq_first", lambda: SelfAttn(False, add_bias_kv=True), False, lambda: ((_seq(False, LQ, 1),),
     {"attn_mask": _causal(LQ), "key_padding_mask": _padding()}), ["attn"]),
    ("cross-seq_first-distinct", lambda: CrossAttn(False, distinct=True), False,
     lambda: ((_seq(False, LQ, 1), _seq(False, LK, 2)), {}), ["attn"]),
    ("encoder-seq_first", lambda: _encoder(False, 2), False, lambda: ((_seq(False, LQ, 1),),
     {"src_key_padding_mask": _padding()}), ["self_attn"]),
    ("decoder-batch_first", lambda: nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True), True,
     lambda: ((_seq(True, LQ, 1), _seq(True, LK, 2)), {}), ["self_attn", "multihead_attn", "linear1"]),
]  # fmt: skip


def _row(batch_first: bool, i: int, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Batch element ``i`` of the inputs (masks with a batch dimension sliced too)."""
    dim = 0 if batch_first else 1
    row_args = tuple(a.narrow(dim, i, 1) for a in args)
    row_kwargs = {k: v[i : i + 1] if k.endswith("key_padding_mask") else v for k, v in kwargs.items()}
    return row_args, row_kwargs


def _setup(factory: Any, targets: list[str], train: bool = False):
    torch.manual_seed(0)
    model = factory().double().train(train)
    params, fwd = fp.adapt(model, fp.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    others = [fwd.init(torch.Generator().manual_seed(k)) for k in (1, 2)]
    return model, fwd, others


def _row_output(out: Any, batch_first: bool, i: int) -> list[Tensor]:
    """Row ``i`` of every output (attention weights are batch-first whatever the module's layout)."""
    tensors = _outputs(out)
    first = tensors[0].narrow(0 if batch_first else 1, i, 1)
    return [first, *(t.narrow(0, i, 1) for t in tensors[1:])]


@pytest.mark.parametrize(("name", "factory", "batch_first", "inputs", "targets"), CASES, ids=[c[0] for c in CASES])
def test_mixed_batch_equals_each_row_alone(name: str, factory, batch_first: bool, inputs, targets) -> None:
    model, fwd, others = _setup(factory, targets)
    args, kwargs = inputs()
    out = fwd(fp.stack(others), *args, adapter_ids=IDS, **kwargs)
    for i, k in enumerate(IDS.tolist()):
        row_args, row_kwargs = _row(batch_first, i, args, kwargs)
        alone = fwd(others[k], *row_args, **row_kwargs) if k >= 0 else model(*row_args, **row_kwargs)
        for a, b in zip(_row_output(out, batch_first, i), _outputs(alone), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_mixed_batch_gradients_equal_the_loop() -> None:
    model, fwd, others = _setup(lambda: CrossAttn(False), ["attn"], train=True)
    args, _ = CASES[2][3]()
    stacked = fp.stack(others)
    out = fwd(stacked, *args, adapter_ids=IDS)[0]
    out.square().sum().backward()
    for i, k in enumerate(IDS.tolist()):
        if k >= 0:
            row_args, _ = _row(False, i, args, {})
            fwd(others[k], *row_args)[0].square().sum().backward()
    for path, entry in stacked.items():
        for name, tensor in entry.items():
            expected = torch.stack([o[path][name].grad for o in others])
            torch.testing.assert_close(tensor.grad, expected, rtol=1e-9, atol=1e-12)


def test_mixed_batches_refuse_other_targets_of_sequence_first_layers_and_bad_inputs() -> None:
    model, fwd, others = _setup(lambda: _encoder(False), ["self_attn", "linear1"])
    x = _seq(False, LQ, 1)
    with pytest.raises(ValueError, match=r"target 'linear1' lies inside 'the model', which is sequence-first"):
        fwd(fp.stack(others), x, adapter_ids=IDS)
    model, fwd, others = _setup(lambda: SelfAttn(False), ["attn"])
    with pytest.raises(ValueError, match=r"'attn' received an input with leading dimension 3, but `adapter_ids` has 2"):
        fwd(fp.stack(others), x, adapter_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"nn.MultiheadAttention 'attn' received an unbatched query of shape \(5, 8\)"):
        fwd(fp.stack(others), x[:, 0], adapter_ids=torch.tensor([0]))


def test_unbatched_inputs_run_as_torch_does() -> None:
    model, fwd, others = _setup(lambda: SelfAttn(True), ["attn"])
    x = _seq(True, LQ, 1)
    for a, b in zip(fwd(others[0], x[0]), fwd(others[0], x[:1]), strict=True):
        torch.testing.assert_close(a, b[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_first", [True, False])
def test_vmap_over_stacked_adapters_equals_the_loop(batch_first: bool) -> None:
    model, fwd, others = _setup(lambda: SelfAttn(batch_first), ["attn"])
    x, mask = _seq(batch_first, LQ, 1), _padding()
    outs = torch.func.vmap(lambda p: fwd(p, x, key_padding_mask=mask))(fp.stack(others))
    for k, params in enumerate(others):
        for a, b in zip(_outputs(outs), _outputs(fwd(params, x, key_padding_mask=mask)), strict=True):
            torch.testing.assert_close(a[k], b, rtol=1e-10, atol=1e-10)


def test_torch_func_grad_equals_autograd() -> None:
    model, fwd, others = _setup(lambda: CrossAttn(True), ["attn", "q"])
    x, memory = _seq(True, LQ, 1), _seq(True, LK, 2)

    def loss(p: Any) -> Tensor:
        out, weights = fwd(p, x, memory)
        return out.square().sum() + weights.sum()

    grads = torch.func.grad(loss)(others[0])
    loss(others[0]).backward()
    for path, entry in others[0].items():
        for name, tensor in entry.items():
            torch.testing.assert_close(grads[path][name], tensor.grad, rtol=1e-10, atol=1e-12)


def test_torch_compile_fullgraph_single_and_mixed() -> None:
    model, fwd, others = _setup(lambda: SelfAttn(True), ["attn"])
    x = _seq(True, LQ, 1)
    compiled = torch.compile(fwd, fullgraph=True, backend="eager")
    for a, b in zip(compiled(others[0], x), fwd(others[0], x), strict=True):
        torch.testing.assert_close(a, b)
    stacked = fp.stack(others)
    for a, b in zip(compiled(stacked, x, adapter_ids=IDS), fwd(stacked, x, adapter_ids=IDS), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_combine_equals_peft_add_weighted_adapter(method: str) -> None:
    torch.manual_seed(0)
    model = CrossAttn(True).double()
    kw = {"r": 2, "target_modules": ["attn", "q"], "init_lora_weights": False}
    config = fp.LoraConfig(**kw)
    first, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(1))
    second = fwd.init(torch.Generator().manual_seed(2))
    combined, new_config = fp.combine([first, second], [0.7, 0.4], config, method=method)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw), adapter_name="one")
    peft_model.add_adapter("two", peft.LoraConfig(**kw))
    for name, params in (("one", first), ("two", second)):
        peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config), adapter_name=name)
    peft_model.add_weighted_adapter(["one", "two"], [0.7, 0.4], "both", combination_type=method)
    theirs = peft.get_peft_model_state_dict(peft_model, adapter_name="both")
    theirs = fp.from_peft_state_dict(theirs, new_config)
    assert combined.keys() == theirs.keys() and combined["attn"].keys() == theirs["attn"].keys()
    for path, entry in combined.items():
        for a_name, b_name in (("lora_A", "lora_B"), ("out_proj.lora_A", "out_proj.lora_B")):
            if a_name in entry:  # (SVD factors are unique up to each singular pair's sign: compare the deltas)
                ours, peft_delta = entry[b_name] @ entry[a_name], theirs[path][b_name] @ theirs[path][a_name]
                torch.testing.assert_close(ours, peft_delta, msg=f"{path}.{b_name} @ {a_name}")
                if method != "svd":
                    torch.testing.assert_close(entry[a_name], theirs[path][a_name])
    assert (new_config.r, new_config.lora_alpha) == (
        peft_model.peft_config["both"].r,
        peft_model.peft_config["both"].lora_alpha,
    )


class OwnForward(nn.MultiheadAttention):
    def forward(self, query: Tensor, key: Tensor, value: Tensor, **kw: Any) -> Any:
        return super().forward(query, key, value, **kw)


class Separate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, kdim=6, vdim=6)


REFUSALS = [
    (lambda: Separate(), {}, r"'attn' has kdim=6, vdim=6 != embed_dim=8 \(separate q/k/v weights\)"),
    (lambda: SelfAttn(), {"use_dora": True}, r"'attn': DoRA is not supported on nn.MultiheadAttention"),
    (lambda: SelfAttn(), {"lora_bias": True}, r"'attn': `lora_bias=True` is not supported on nn.MultiheadAttention"),
    (lambda: SelfAttn(), {"init_lora_weights": "pissa"}, r"'attn': `init_lora_weights='pissa'` is not supported"),
    (lambda: SelfAttn(), {"init_lora_weights": "orthogonal"}, r"`init_lora_weights='orthogonal'` is not supported"),
]


@pytest.mark.parametrize(("factory", "kw", "match"), REFUSALS)
def test_unsupported_combinations_are_refused(factory, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fp.adapt(factory(), fp.LoraConfig(target_modules=["attn"], **kw))


def test_subclass_with_own_forward_is_refused() -> None:
    model = SelfAttn()
    model.attn = OwnForward(E, HEADS, batch_first=True)
    with pytest.raises(ValueError, match=r"'attn' is a OwnForward with its own forward"):
        fp.adapt(model, fp.LoraConfig(target_modules=["attn"]))


def test_out_proj_alone_or_beside_its_attention_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"target the attention module itself, e\.g\. `target_modules=\['attn'\]`"):
        fp.adapt(SelfAttn(), fp.LoraConfig(target_modules=["out_proj"]))
    with pytest.raises(ValueError, match=r"'attn' is targeted too, .*`exclude_modules=\['attn\.out_proj'\]`"):
        fp.adapt(SelfAttn(), fp.LoraConfig(target_modules=["attn", "out_proj"]))
    params, _ = fp.adapt(SelfAttn(), fp.LoraConfig(target_modules=["attn", "out_proj"], exclude_modules=["out_proj"]))
    assert list(params) == ["attn"]


def test_other_methods_heterogeneous_stacks_and_the_drop_in_api_refuse_it() -> None:
    with pytest.raises(ValueError, match=r"'attn' \(MultiheadAttention\) matched `target_modules`"):
        fp.adapt(SelfAttn(), fp.IA3Config(target_modules=["attn"], feedforward_modules=[]))
    configs = [fp.LoraConfig(target_modules=["attn"]), fp.LoraConfig(target_modules=["attn"], r=4)]
    with pytest.raises(ValueError, match=r"adapts the nn.MultiheadAttention 'attn'; heterogeneous stacks"):
        fp.adapt(SelfAttn(), configs)
    model = SelfAttn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"inject_adapter_in_model does not support LoRA on nn.MultiheadAttention"):
        fp.inject_adapter_in_model(fp.LoraConfig(target_modules=["attn"]), model)
    assert model.state_dict().keys() == before.keys() and "lora" not in repr(model)


def test_a_checkpoint_missing_out_proj_is_refused_naming_the_keys() -> None:
    config = fp.LoraConfig(target_modules=["attn"])
    params, fwd = fp.adapt(SelfAttn(), config)
    state = fp.to_peft_state_dict(params, config)
    del state["base_model.model.attn.base_layer.out_proj.lora_B.weight"]
    with pytest.raises(
        ValueError, match=r"missing \['base_model\.model\.attn\.base_layer\.out_proj\.lora_B\.weight'\]"
    ):
        fp.from_peft_state_dict(state, config)
