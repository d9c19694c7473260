"""What LoHa and LoKr share (:mod:`funcpeft.methods.lycoris_math`), tested for both: mixed batches and vmap equal a
loop over adapters, train-mode mixed batches, torch.func and torch.compile, quantized bases, refused layers,
``funcpeft.combine`` (which PEFT's ``add_weighted_adapter`` does not define for them), ``funcpeft inspect``, the
drop-in API against PEFT, and the method contract matrix. PEFT parity of each method's math: ``test_loha.py`` and
``test_lokr.py``."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import test_contract as contract
import torch
from _lycoris import flat, out, peft, setup
from _models import MLP, ConvNet, EmbNet, conv_inputs, tiny_gpt2, tiny_llama, token_ids
from torch import nn

import funcpeft as fp
from funcpeft.__main__ import main
from tests.test_quant import FORMATS, float_model, inputs, quantized_model

METHODS = pytest.mark.parametrize("method", ["LoHa", "LoKr"])
LIN = {"target_modules": ["lin0", "lin1"], "r": 2, "alpha": 3}
CONV = {"target_modules": ["c1", "c2"], "r": 2, "use_effective_conv2d": True}  # LoHa: CP; LoKr on 16 channels: CP
SETS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "linear": (MLP, lambda: (torch.randn(4, 10, generator=torch.Generator().manual_seed(5)),), LIN),
    "conv": (lambda: ConvNet(channels=16, groups=2, stride=2), lambda: conv_inputs(16), CONV),
    "conv-flat": (ConvNet, conv_inputs, {"target_modules": ["c1", "c2"], "r": 1}),
    "llama": (tiny_llama, lambda: (token_ids(),), {"r": 2}),
}


def _three(method: str, name: str) -> tuple[Any, ...]:
    factory, inputs_, kw = SETS[name]
    model, x, config, params, fwd, _ = setup(method, factory, inputs_, kw)
    return model, x, fwd, [contract._perturb(params, s) for s in range(3)]


@METHODS
@pytest.mark.parametrize("name", list(SETS))
def test_mixed_batches_and_vmap_equal_a_loop(method: str, name: str) -> None:
    model, x, fwd, adapters = _three(method, name)
    stacked = fp.stack(adapters)
    ids = torch.tensor([2, -1, 0, 1][: x[0].shape[0]]) if x[0].shape[0] > 2 else torch.tensor([1, -1])
    mixed = out(fwd(stacked, *x, adapter_ids=ids))
    for row, i in enumerate(ids.tolist()):
        sub = tuple(t[row : row + 1] for t in x)
        expected = out(fwd(adapters[i], *sub) if i >= 0 else model(*sub))
        torch.testing.assert_close(mixed[row : row + 1], expected, rtol=1e-10, atol=1e-10)
    mixed.square().sum().backward()
    used = set(ids.tolist()) - {-1}
    for leaf in (t for e in stacked.values() for t in e.values()):
        assert [bool(leaf.grad[k].any()) for k in range(3)] == [k in used for k in range(3)]
    vmapped = torch.func.vmap(lambda p: out(fwd(p, *x)))(stacked)
    for k, adapter in enumerate(adapters):
        torch.testing.assert_close(vmapped[k], out(fwd(adapter, *x)), rtol=1e-10, atol=1e-10)


@METHODS
@pytest.mark.parametrize("rows", [4, 2], ids=["deltas-per-adapter", "deltas-per-row"])
def test_a_non_finite_adapter_stays_in_its_rows(method: str, rows: int) -> None:
    model, x, fwd, adapters = _three(method, "linear")
    x = (x[0][:rows],)
    with torch.no_grad():
        for t in adapters[1].values():
            for leaf in t.values():
                leaf.fill_(float("nan"))
    ids = torch.tensor([0, 1, -1, 2][:rows])
    mixed = fwd(fp.stack(adapters), *x, adapter_ids=ids)
    for row, i in enumerate(ids.tolist()):
        if i == 1:
            assert mixed[row].isnan().all()
        else:
            expected = fwd(adapters[i], *x) if i >= 0 else model(*x)
            torch.testing.assert_close(mixed[row], expected[row], rtol=1e-10, atol=1e-10)


@METHODS
def test_sparse_gradients_of_a_mixed_batch_equal_the_dense_ones(method: str) -> None:
    model, x, fwd, adapters = _three(method, "linear")
    ids = torch.tensor([0, -1, 2, 0])
    dense, sparse = fp.stack(adapters), fp.stack(adapters)
    fwd(dense, *x, adapter_ids=ids).square().sum().backward()
    fwd(sparse, *x, adapter_ids=ids, sparse_grad=True).square().sum().backward()
    for path, entry in sparse.items():
        for n, t in entry.items():
            assert t.grad.is_sparse
            torch.testing.assert_close(t.grad.to_dense(), dense[path][n].grad)


@METHODS
def test_mixed_batch_train_mode_draws_per_row_and_refuses_unbatched_conv_inputs(method: str) -> None:
    model, x, fwd, adapters = _three(method, "conv")
    with pytest.raises(ValueError, match=r"'c2' received an unbatched input"):
        fwd(fp.stack(adapters), x[0], x[1][0], x[2], adapter_ids=torch.tensor([0, 1]))
    model = MLP().train()
    config = getattr(fp, f"{method}Config")(**LIN, module_dropout=0.5, init_weights=False)
    params, fwd = fp.adapt(model, config)
    xs = torch.randn(16, 10)
    torch.manual_seed(0)
    mixed = fwd(fp.stack([params, params]), xs, adapter_ids=torch.zeros(16, dtype=torch.long))
    base = model(xs)
    same = [torch.equal(mixed[i], base[i]) for i in range(16)]
    assert any(same) and not all(same), "rows draw their own module dropout"


@METHODS
def test_torch_func_grad_and_compile(method: str) -> None:
    model, x, fwd, adapters = _three(method, "conv")
    grads = torch.func.grad(lambda p: out(fwd(p, *x)).square().sum())(adapters[0])
    out(fwd(adapters[0], *x)).square().sum().backward()
    for path, entry in adapters[0].items():
        for n, t in entry.items():
            torch.testing.assert_close(grads[path][n], t.grad)
    compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(adapters[1], *x), fwd(adapters[1], *x))
    stacked, ids = fp.stack(adapters), torch.tensor([1, -1])
    torch.testing.assert_close(compiled(stacked, *x, adapter_ids=ids), fwd(stacked, *x, adapter_ids=ids))


@METHODS
def test_compile_fullgraph_under_inductor(method: str) -> None:
    model, x, fwd, adapters = _three(method, "linear")
    params = {p: {n: t.detach().float() for n, t in e.items()} for p, e in adapters[0].items()}
    model.float()
    compiled = torch.compile(fwd, fullgraph=True)
    xf = x[0].float()
    torch.testing.assert_close(compiled(params, xf), fwd(params, xf), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@METHODS
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_bases_add_their_dequantized_merge_s_delta_and_batch(method: str, fmt: str) -> None:
    # train mode (no dropout anywhere): bitsandbytes' 4-bit layer keeps one kernel (no eval-time repacking)
    model = quantized_model(fmt).requires_grad_(False).train()
    config = getattr(fp, f"{method}Config")(target_modules=["lin0", "lin1"], r=2, init_weights=False)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(1))
    x = inputs()
    result = fwd(params, x)
    grads = torch.func.grad(lambda p: fwd(p, x).square().sum())(params)
    result.square().sum().backward()
    for path, entry in grads.items():
        for n, g in entry.items():
            assert g.abs().sum() > 0
            torch.testing.assert_close(g, params[path][n].grad, rtol=1e-5, atol=1e-6)
    # the base's kernel is not exactly a float matmul with its dequantized weight (bitsandbytes quantizes int8
    # activations; its 4-bit kernel rounds differently), so compare what the adapter adds
    twin, base_twin = float_model(), float_model()
    twin.load_state_dict(fwd.merge(params, dequantize=True))
    zeros = {p: {n: torch.zeros_like(t) for n, t in e.items()} for p, e in params.items()}
    base_twin.load_state_dict(fwd.merge(zeros, dequantize=True))
    with torch.no_grad():
        added, expected = result - fwd(None, x), twin(x) - base_twin(x)
    assert expected.abs().max() > 0.01
    torch.testing.assert_close(added, expected, rtol=1e-4, atol=1e-5)
    other = fwd.init(torch.Generator().manual_seed(7))
    ids = torch.tensor([0, 1, -1, 0, 1, -1])
    mixed = fwd(fp.stack([params, other]), x, adapter_ids=ids)
    rows = {0: fwd(params, x), 1: fwd(other, x), -1: fwd(None, x)}  # bitsandbytes' kernels depend on the batch
    for i, k in enumerate(ids.tolist()):
        torch.testing.assert_close(mixed[i], rows[k][i], rtol=1e-5, atol=1e-5)


# ----- refusals, combine, inspect, drop-in --------------------------------------------------------------------
@METHODS
@pytest.mark.parametrize(
    ("factory", "kw", "match"),
    [
        (ConvNet, {"target_modules": ["c3"]}, r"'c3' \(Conv3d.*can only adapt nn.Linear, nn.Conv1d and nn.Conv2d"),
        (EmbNet, {"target_modules": ["emb"]}, r"'emb' \(Embedding"),
        (tiny_gpt2, {}, r"'transformer.h.0.attn.c_attn' \(Conv1D.*transformers' Conv1D too"),
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), {"target_modules": ["1"]}, r"'1' \(LayerNorm\)"),
        (MLP, {}, "target_modules"),
    ],
)
def test_unsupported_layers_are_refused_by_path(method: str, factory: Any, kw: dict[str, Any], match: str) -> None:
    model = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fp.adapt(model, getattr(fp, f"{method}Config")(**kw))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if kw.get("target_modules") in (["c3"], ["emb"]):  # PEFT refuses them too
        with pytest.raises(TypeError, match="not supported"):
            peft.get_peft_model(factory(), getattr(peft, f"{method}Config")(**kw))


@METHODS
def test_combine_is_refused_as_peft_does(method: str) -> None:
    params, fwd = fp.adapt(MLP(), getattr(fp, f"{method}Config")(**LIN))
    with pytest.raises(TypeError, match=f"LoraConfig or IA3Config, got {method}Config"):
        fp.combine([params, params], [0.5, 0.5], fwd.config)
    theirs = peft.get_peft_model(MLP(), getattr(peft, f"{method}Config")(**LIN))
    assert not hasattr(theirs.base_model, "add_weighted_adapter")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@METHODS
def test_inspect_describes_a_saved_adapter(method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    factory, _, kw = SETS["conv"]
    model = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(model), getattr(peft, f"{method}Config")(**kw))
        theirs.save_pretrained(tmp_path / "peft")
    assert main(["inspect", str(tmp_path / "peft"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["peft_type"] == method.upper() and facts["targets"] == ["c1", "c2"]
    params, _ = fp.adapt(model, getattr(fp, f"{method}Config")(**kw))
    assert facts["parameters"]["adapter"] == sum(t.numel() for t in flat(params).values())
    assert facts["ranks"] == {"c1": 2, "c2": 2} and facts["scaling"] == {"c1": 4.0, "c2": 4.0} and not facts["warnings"]
    cp = "CP (hada_t1, hada_t2)" if method == "LoHa" else "kron(w1, CP (lokr_t2))"
    assert facts["forms"] == {"c1": cp, "c2": cp} and facts["options"]["use_effective_conv2d"] is True
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    text = capsys.readouterr().out
    assert method.upper() in text and "scaling=4 (all 2 modules)" in text and f"dW={cp} (all 2 modules)" in text
    # a checkpoint whose tensors do not have the config's rank is reported
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"c2": 3}}))
    assert main(["inspect", str(tmp_path / "peft"), "--json"]) == 0
    warned = json.loads(capsys.readouterr().out)["warnings"]
    assert warned == ["c2: the tensors have rank [2] but the config gives r=3."]


@METHODS
def test_drop_in_api_has_peft_s_names_and_outputs(method: str) -> None:
    kw = {**LIN, "init_weights": False}
    model = MLP()
    ours = fp.inject_adapter_in_model(getattr(fp, f"{method}Config")(**kw), copy.deepcopy(model))
    theirs = peft.inject_adapter_in_model(getattr(peft, f"{method}Config")(**kw), copy.deepcopy(model))
    names = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert any(n.startswith("lin0.hada_" if method == "LoHa" else "lin0.lokr_") for n in names)
    assert names == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    state = fp.get_peft_model_state_dict(ours)
    assert sorted(state) == sorted(peft.get_peft_model_state_dict(theirs))
    peft.set_peft_model_state_dict(theirs, state)
    x = SETS["linear"][1]()[0]
    torch.testing.assert_close(ours(x), theirs(x))


# ----- the method contract matrix ---------------------------------------------------------------------------------
@dataclass
class _Case(contract.Case):
    def random_init(self) -> dict[str, Any]:
        return {"init_weights": False}


_WIDE = (lambda: ConvNet(channels=16, groups=2, padding_mode="reflect"), lambda: conv_inputs(16))
CONTRACT = [
    c
    for cls in (fp.LoHaConfig, fp.LoKrConfig)
    for c in (
        _Case(f"{cls.peft_type.lower()}-linear", MLP, contract._mlp_in, LIN, cls),
        _Case(
            f"{cls.peft_type.lower()}-linear-saved", MLP, contract._mlp_in, {**LIN, "modules_to_save": ["head"]}, cls
        ),
        _Case(f"{cls.peft_type.lower()}-conv-flat", ConvNet, conv_inputs, SETS["conv-flat"][2], cls),
        _Case(f"{cls.peft_type.lower()}-conv-cp-grouped-reflect", *_WIDE, CONV, cls),
    )
]


@contract.GRAD_MODES
@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.name)
def test_contract_fresh_adapter_is_the_base_model(case: _Case, grad: bool) -> None:
    contract.test_fresh_adapter_is_the_base_model(case, grad)


@contract.GRAD_MODES
@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.name)
def test_contract_adapted_equals_merged(case: _Case, grad: bool) -> None:
    contract.test_adapted_equals_merged(case, grad)


@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.name)
def test_contract_gradients_reach_adapter_leaves_only(case: _Case) -> None:
    contract.test_gradients_reach_adapter_leaves_only(case)


@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.name)
def test_contract_vmap_over_adapters_equals_loop(case: _Case) -> None:
    contract.test_vmap_over_adapters_equals_loop(case, True)


@METHODS
def test_generate_matches_peft_and_mixed_rows_their_own_adapter(method: str) -> None:
    model, x, config, params, fwd, peft_model = setup(method, tiny_llama, lambda: (token_ids(),), {"r": 2})
    ids = x[0]
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    ours = fwd.generate(params, ids, **kw)
    assert torch.equal(ours, peft_model.generate(input_ids=ids, **kw))
    assert not torch.equal(ours, model.generate(ids, **kw)), "the adapter changes the tokens"
    other = contract._perturb(params, 3)
    mixed = fwd.generate(fp.stack([params, other]), ids, adapter_ids=torch.tensor([1, -1]), **kw)
    assert torch.equal(mixed[0], fwd.generate(other, ids, **kw)[0])
    assert torch.equal(mixed[1], model.generate(ids, **kw)[1])
