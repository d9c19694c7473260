"""OFT's config validation and refusals, hostile params, the method contract matrix, the drop-in API against PEFT,
``funcpeft inspect`` and ``funcpeft.combine`` (which PEFT's ``add_weighted_adapter`` does not define for OFT)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import test_contract as contract
import torch
from _models import MLP, ConvNet, EmbNet, conv_inputs, oracle, tiny_gpt2, token_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import funcpeft as fp
from funcpeft.__main__ import main
from funcpeft.methods import oft_math

peft = oracle("peft")
LIN = {"target_modules": ["lin0", "lin1"], "oft_block_size": 5}


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"r": 2}, r"exactly one of `r` \(2\) and `oft_block_size` \(32\)"),
        ({"r": 0, "oft_block_size": 0}, "exactly one of `r`"),
        ({"r": -1, "oft_block_size": 0}, r"`r` must be a non-negative integer, got -1"),
        ({"oft_block_size": 2.5}, "`oft_block_size` must be a non-negative integer"),
        ({"oft_block_size": True}, "`oft_block_size`"),
        ({"module_dropout": 1.0}, r"`module_dropout` must be a probability in \[0, 1\)"),
        ({"bias": "lora_only"}, "`bias` must be 'none', 'all' or 'oft_only', got 'lora_only'"),
        ({"eps": -1e-3}, "`eps`"),
        ({"eps": float("inf")}, "`eps`"),
        ({"coft": "yes"}, "`coft`"),
        (
            {"num_cayley_neumann_terms": 1},
            r"`num_cayley_neumann_terms` must be an integer >= 2 with `use_cayley_neumann=True`, got 1",
        ),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
        ({"task_type": "SEQ2SEQ"}, "task_type"),
    ],
)
def test_bad_configs_name_the_field(kw: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        fp.OFTConfig(**kw)


def test_the_exact_transform_ignores_the_series_length_as_peft() -> None:
    config = fp.OFTConfig(use_cayley_neumann=False, num_cayley_neumann_terms=1)
    assert fp.OFTConfig.from_peft_dict(config.to_peft_dict()) == config


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("factory", "kw", "match"),
    [
        (ConvNet, {"target_modules": ["c1"]}, r"'c1' \(Conv1d.*nn.Linear, nn.Conv2d and nn.Embedding"),
        (ConvNet, {"target_modules": ["c3"]}, r"'c3' \(Conv3d"),
        (lambda: ConvNet(groups=2), {"target_modules": ["c2"]}, r"grouped Conv2d 'c2' \(groups=2\)"),
        (lambda: ConvNet(dilation=2), {"target_modules": ["c2"]}, r"'c2' with dilation=\(2, 2\)"),
        (lambda: ConvNet(kernel_size=(1, 3), padding=0), {"target_modules": ["c2"]}, r"'c2'.*\(1, 3\) is not square"),
        (tiny_gpt2, {}, r"'transformer.h.0.attn.c_attn' \(Conv1D.*refuses transformers' Conv1D"),
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), {"target_modules": ["1"]}, r"'1' \(LayerNorm\)"),
        (MLP, {}, "target_modules"),
        (MLP, {"target_modules": ["lin9"]}, "lin9"),
    ],
)
def test_unsupported_layers_are_refused_by_path_and_the_model_is_untouched(factory: Any, kw: dict[str, Any],
                                                                         match: str) -> None:  # fmt: skip
    model = factory()
    before, text = _state(model), repr(model)
    with pytest.raises(ValueError, match=match):
        fp.adapt(model, fp.OFTConfig(**kw))
    assert repr(model) == text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_peft_refuses_the_same_layers() -> None:
    with pytest.raises(TypeError, match="not supported"):
        peft.get_peft_model(tiny_gpt2(), peft.OFTConfig())  # GPT-2's Conv1D: PEFT's OFT has no layer for it
    with pytest.raises(ValueError, match="dilation"):
        peft.get_peft_model(ConvNet(dilation=2), peft.OFTConfig(target_modules=["c2"]))


@pytest.mark.parametrize(
    ("tensor", "error", "match"),
    [
        (torch.zeros(2, 9), ValueError, r"`params\['lin0'\]\['oft_R'\]` has shape \(2, 9\).*'lin0'.*\(2, 10\)"),
        (torch.zeros(1, 10), ValueError, r"shape \(1, 10\).*needs \(2, 10\)"),  # a block_share tensor
        (torch.zeros(2, 10, 1), ValueError, r"shape \(2, 10, 1\)"),
        (torch.zeros(2, 10, dtype=torch.int64), TypeError, r"`params\['lin0'\]\['oft_R'\]` is a torch.int64"),
        (torch.zeros(2, 10, dtype=torch.complex64), TypeError, "complex64"),
        (torch.zeros(2, 10, dtype=torch.bool), TypeError, "bool"),
    ],
)
def test_hostile_params_are_refused_by_name(tensor: torch.Tensor, error: type, match: str) -> None:
    params, fwd = fp.adapt(MLP(), fp.OFTConfig(**LIN))
    with pytest.raises(error, match=match):
        fwd({**params, "lin0": {"oft_R": tensor}}, torch.randn(2, 10))
    with pytest.raises(ValueError, match=r"`params\['lin0'\]` must hold \['oft_R'\]"):
        fwd({**params, "lin0": {"oft_embedding_R": torch.zeros(2, 10)}}, torch.randn(2, 10))


def test_checkpoints_funcpeft_cannot_compute_are_refused(tmp_path: Path) -> None:
    params, fwd = fp.adapt(MLP(), fp.OFTConfig(**LIN))
    fp.save(tmp_path, params, fwd.config)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_version"] == "0.21.2"  # so PEFT does not warn about the Cayley-Neumann series
    old_series = {**data, "peft_version": "0.17.1"}
    with pytest.raises(ValueError, match="PEFT 0.17.1; PEFT 0.18 changed that series"):
        fp.OFTConfig.from_peft_dict(old_series)
    assert fp.OFTConfig.from_peft_dict({**old_series, "use_cayley_neumann": False}).use_cayley_neumann is False
    pre_014 = {k: v for k, v in data.items() if k != "oft_block_size"}
    with pytest.raises(ValueError, match="PEFT < 0.14"):
        fp.OFTConfig.from_peft_dict(pre_014)
    with pytest.raises(ValueError, match="`use_dora`"):
        fp.OFTConfig.from_peft_dict({**data, "use_dora": True})


def test_module_dropout_has_no_effect_in_either_library_and_says_so() -> None:
    torch.manual_seed(0)
    model = MLP().train()
    kw = {**LIN, "module_dropout": 0.5, "init_weights": False}
    with pytest.warns(fp.FuncpeftWarning, match=r"`module_dropout=0.5` has no effect"):
        params, fwd = fp.adapt(model, fp.OFTConfig(**kw))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(**kw)).train()
    peft.set_peft_model_state_dict(theirs, fp.to_peft_state_dict(params, fwd.config))
    x = torch.randn(4, 10)
    torch.testing.assert_close(fwd(params, x), theirs(x))
    torch.testing.assert_close(fwd(params, x), theirs(x))  # no randomness in train mode either


def test_combine_refuses_oft_as_peft_does() -> None:
    params, fwd = fp.adapt(MLP(), fp.OFTConfig(**LIN))
    with pytest.raises(TypeError, match="LoraConfig or IA3Config, got OFTConfig"):
        fp.combine([params, params], [0.5, 0.5], fwd.config)
    theirs = peft.get_peft_model(MLP(), peft.OFTConfig(**LIN))
    assert not hasattr(theirs.base_model, "add_weighted_adapter")  # PEFT's OFTModel does not define it


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_inspect_describes_an_oft_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = MLP()
    config = fp.OFTConfig(**LIN, block_share=True, bias="oft_only")
    params, _ = fp.adapt(model, config)
    fp.save(tmp_path / "fp", params, config)
    peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(**LIN)).save_pretrained(tmp_path / "peft")
    assert main(["inspect", str(tmp_path / "fp"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["peft_type"] == "OFT" and facts["targets"] == ["lin0", "lin1"]
    assert facts["parameters"] == {"total": 20 + 20 + 20, "adapter": 20, "full_copies": 40}  # (1, 10) each + biases
    assert facts["full_copies"] == {"lin0": ["bias"], "lin1": ["bias"]}
    assert facts["block_sizes"] == {"lin0": 5, "lin1": 5} and facts["blocks"] == {"lin0": 1, "lin1": 1}
    assert facts["block_share"] is True and facts["coft"] is False and facts["bias"] == "oft_only"
    done = subprocess.run([sys.executable, "-m", "funcpeft", "inspect", str(tmp_path / "peft")], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "OFT" in done.stdout and "2 modules: lin0, lin1" in done.stdout and "60 adapter" in done.stdout
    assert "b=5 (all 2 modules)" in done.stdout and "r=2 (1 module): lin0" in done.stdout  # PEFT's, unshared
    state = load_file(tmp_path / "fp" / "adapter_model.safetensors")
    state["base_model.model.lin0.oft_R.weight"] = torch.zeros(2, 9)  # 9 is no b(b-1)/2
    save_file(state, tmp_path / "fp" / "adapter_model.safetensors")
    assert main(["inspect", str(tmp_path / "fp")]) == 2
    assert "module 'lin0': oft_R has shape (2, 9)" in capsys.readouterr().err


def test_inject_adapter_in_model_equals_peft() -> None:
    for factory, kw, x in [
        (MLP, {**LIN, "init_weights": False}, torch.randn(3, 10)),
        (EmbNet, {"target_modules": ["emb", "lin"], "oft_block_size": 4}, torch.randint(0, 20, (3, 5))),
        (lambda: ConvNet(kernel_size=1, padding=0), {"target_modules": ["c2"], "oft_block_size": 2}, None),
    ]:  # fmt: skip
        torch.manual_seed(0)
        model = factory().eval()
        twin = copy.deepcopy(model)
        fp.inject_adapter_in_model(fp.OFTConfig(**kw), model)
        peft.inject_adapter_in_model(peft.OFTConfig(**kw), twin)
        theirs = peft.get_peft_model_state_dict(twin)
        assert fp.get_peft_model_state_dict(model).keys() == theirs.keys()
        with torch.no_grad():  # a trained-looking adapter in PEFT's model, loaded into funcpeft's
            for t in theirs.values():
                t.normal_(0.0, 0.1)
        peft.set_peft_model_state_dict(twin, theirs)
        fp.set_peft_model_state_dict(model, theirs)
        inputs = conv_inputs() if x is None else (x,)
        torch.testing.assert_close(model(*inputs), twin(*inputs))
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        assert trainable == sorted(n for n, p in twin.named_parameters() if p.requires_grad)


@dataclass
class _OFTCase(contract.Case):
    config_cls: type = fp.OFTConfig

    def random_init(self) -> dict[str, Any]:
        return {"init_weights": False}


CASES = [
    _OFTCase("oft-linear", MLP, contract._mlp_in, LIN),
    _OFTCase("oft-linear-coft-share", MLP, contract._mlp_in, {**LIN, "coft": True, "eps": 0.3, "block_share": True}),
    _OFTCase("oft-linear-exact-bias", MLP, contract._mlp_in, {**LIN, "use_cayley_neumann": False, "bias": "all"}),
    _OFTCase("oft-linear-modules_to_save", MLP, contract._mlp_in, {**LIN, "modules_to_save": ["head"]}),
    _OFTCase("oft-conv1x1", lambda: ConvNet(kernel_size=1, padding=0), conv_inputs, {"target_modules": ["c2"],
                                                                                     "oft_block_size": 2}),
    _OFTCase("oft-conv3x3", lambda: ConvNet(stride=2, padding_mode="reflect"), conv_inputs,
             {"target_modules": ["c2"], "r": 4, "oft_block_size": 0}),
    _OFTCase("oft-conv3x3-bias-coft", ConvNet, conv_inputs,
             {"target_modules": ["c2", "head"], "oft_block_size": 6, "bias": "oft_only", "coft": True, "eps": 0.2}),
    _OFTCase("oft-embedding", lambda: EmbNet(padding_idx=0), contract._ids, {"target_modules": ["emb"], "r": 2,
                                                                             "oft_block_size": 0}),
]  # fmt: skip


@contract.GRAD_MODES
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_contract_fresh_adapter_is_the_base_model(case: _OFTCase, grad: bool) -> None:
    contract.test_fresh_adapter_is_the_base_model(case, grad)


@contract.GRAD_MODES
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_contract_adapted_equals_merged(case: _OFTCase, grad: bool) -> None:
    contract.test_adapted_equals_merged(case, grad)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_contract_gradients_reach_adapter_leaves_only(case: _OFTCase) -> None:
    contract.test_gradients_reach_adapter_leaves_only(case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_contract_vmap_over_adapters_equals_loop(case: _OFTCase) -> None:
    contract.test_vmap_over_adapters_equals_loop(case, True)


def test_tied_embedding_merge_is_refused() -> None:
    model = oracle("transformers").GPT2LMHeadModel(tiny_gpt2().config)  # wte tied to lm_head
    params, fwd = fp.adapt(model, fp.OFTConfig(target_modules=["wte"], oft_block_size=8, init_weights=False))
    out = fwd(params, token_ids()).logits
    assert not torch.allclose(out, model(token_ids()).logits)
    with pytest.raises(ValueError, match="tied"):
        fwd.merge(params)


def test_block_adjustment_is_peft_s() -> None:
    adjust_peft = peft.tuners.oft.layer.OFTLayer.adjust_oft_parameters
    for features in range(1, 65):
        for value in range(1, 70):
            assert oft_math.adjust(features, value) == adjust_peft(None, features, value), (features, value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotations_are_orthogonal_and_the_neumann_series_approximates_cayley(dtype: torch.dtype) -> None:
    vec = 0.05 * torch.randn(3, 4, 15, generator=torch.Generator().manual_seed(0)).to(dtype)  # blocks of 6
    eye = torch.eye(6, dtype=dtype)
    exact = oft_math.rotations(vec, 6, neumann=False, terms=5, coft_eps=None)
    torch.testing.assert_close(exact.transpose(-1, -2) @ exact, eye.expand_as(exact))
    # PEFT's series I + 2Q + 2Q^2 + ... is that of (I + Q)(I - Q)^-1: the transpose of its exact transform
    # (I - Q)(I + Q)^-1, so one oft_R gives inverse rotations with use_cayley_neumann on and off (as in PEFT)
    series = oft_math.rotations(vec, 6, neumann=True, terms=12, coft_eps=None)
    torch.testing.assert_close(series, exact.transpose(-1, -2), rtol=0, atol=1e-4)
    assert not torch.allclose(series, exact, atol=1e-2)
    projected = oft_math.project(vec, 6, 0.05)
    norms = torch.linalg.matrix_norm(oft_math.skew(projected, 6))
    assert (norms <= 0.05 + 1e-6).all()
    assert torch.equal(oft_math.project(projected * 0.5, 6, 0.05), projected * 0.5)  # inside the ball: unchanged


def test_peft_s_neumann_and_exact_transforms_are_inverse_rotations() -> None:
    # The quirk above, in PEFT itself: its two paths, on the same oft_R, rotate in opposite directions
    rotation = peft.tuners.oft.layer.OFTRotationModule(4, 15, 6, 24, num_cayley_neumann_terms=12).double()
    vec = 0.05 * torch.randn(4, 15, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    series = rotation._cayley_batch(vec, 6, use_cayley_neumann=True, num_neumann_terms=12)
    exact = rotation._cayley_batch(vec, 6, use_cayley_neumann=False)
    torch.testing.assert_close(series, exact.transpose(-1, -2), rtol=0, atol=1e-4)
    torch.testing.assert_close(oft_math.rotations(vec, 6, True, 12, None), series, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(oft_math.rotations(vec, 6, False, 12, None), exact, rtol=1e-12, atol=1e-14)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    features=st.integers(1, 40),
    out=st.integers(1, 6),
    size=st.integers(0, 45),
    block_share=st.booleans(),
    neumann=st.booleans(),
)
def test_any_linear_shape_matches_peft(features: int, out: int, size: int, block_share: bool, neumann: bool) -> None:
    # size 0: r=3 instead of a block size; both are adjusted per layer as PEFT adjusts them
    kw = {"target_modules": ["0"], "r": 0 if size else 3, "oft_block_size": size, "block_share": block_share,
          "use_cayley_neumann": neumann, "init_weights": False}  # fmt: skip
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features, out)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, fwd = fp.adapt(model, fp.OFTConfig(**kw), generator=torch.Generator().manual_seed(1))
        theirs = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(**kw))
    shape = dict(theirs.named_parameters())["base_model.model.0.oft_R.default.weight"].shape
    assert params["0"]["oft_R"].shape == shape
    peft.set_peft_model_state_dict(theirs, fp.to_peft_state_dict(params, fwd.config))
    x = torch.randn(3, features, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fwd(params, x), theirs(x), rtol=1e-10, atol=1e-10)
