"""PiSSA, OLoRA and orthogonal LoRA init against PEFT: funcpeft carries the initial factors, PEFT rewrites the base."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import MLP, ConvNet, conv_inputs, oracle, tiny_gpt2, token_ids
from torch import nn

import funcpeft as fp
from funcpeft.methods import lora_init

peft = oracle("peft")


def _out(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.logits


def _peft(model: nn.Module, **kw: Any) -> Any:
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))


def _peft_tensors(pm: Any) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's lora_A / lora_B by funcpeft module path."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in pm.named_parameters():
        for kind in ("lora_A", "lora_B"):
            if f".{kind}.default." in name:
                path = name.removeprefix("base_model.model.").split(f".{kind}.")[0]
                out.setdefault(path, {})[kind] = p.detach().clone()
    return out


def _perturb(pm: Any, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


CASES = [
    ("mlp", MLP, lambda: (torch.randn(3, 10),), {"target_modules": ["lin0", "lin1", "head"]}),
    ("gpt2", tiny_gpt2, lambda: (token_ids(),), {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
]


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize(("name", "factory", "inputs", "kw"), CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients_equal_peft(name: str, factory: Any, inputs: Any, kw: dict, init: str, use_dora: bool):
    model = factory().eval()
    args = inputs()
    kw = {**kw, "r": 4, "lora_alpha": 8, "init_lora_weights": init, "use_dora": use_dora}
    params, fwd = fp.adapt(model, fp.LoraConfig(**kw))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if name == "gpt2" and init == "olora":
        # PEFT's olora_init takes the QR of Conv1D's (in, out) weight untransposed: a wrong-shaped residual that
        # crashes the forward. funcpeft factors the (out, in) weight: a fresh adapter is the base.
        with pytest.raises(RuntimeError, match="cannot be multiplied|must match the size"):  # (DoRA: at init)
            _peft(model, **kw).eval()(*args)
        torch.testing.assert_close(_out(fwd(params, *args)), _out(model(*args)), atol=1e-5, rtol=1e-5)
        return
    pm = _peft(model, **kw).eval()
    # fresh: funcpeft's adapter is the base model, and equals PEFT's residual model
    torch.testing.assert_close(_out(fwd(params, *args)), _out(model(*args)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_out(fwd(params, *args)), _out(pm(*args)), atol=1e-5, rtol=1e-5)
    # the initial factors' product is PEFT's (factors agree up to SVD signs)
    for path, theirs in _peft_tensors(pm).items():
        mine = params[path]
        torch.testing.assert_close(mine["lora_B0"] @ mine["lora_A0"], theirs["lora_B"] @ theirs["lora_A"])
    _perturb(pm)
    theirs = _peft_tensors(pm)
    with torch.no_grad():
        for path, t in theirs.items():  # PEFT's trained factors, and PEFT's initial ones (signs) as ours
            params[path]["lora_A"].copy_(t["lora_A"])
            params[path]["lora_B"].copy_(t["lora_B"])
        if use_dora:
            for n, p in pm.named_parameters():
                if "lora_magnitude_vector" in n:
                    path = n.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]
                    params[path]["lora_magnitude_vector"].copy_(p)
    ours, ref = _out(fwd(params, *args)), _out(pm(*args))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    ours.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    for n, p in pm.named_parameters():
        for kind in ("lora_A", "lora_B"):
            if f".{kind}.default." in n:
                path = n.removeprefix("base_model.model.").split(f".{kind}.")[0]
                torch.testing.assert_close(params[path][kind].grad, p.grad, atol=1e-4, rtol=1e-4)
                assert params[path][kind + "0"].grad is None, "the initial factors are frozen"
    # merge equals the forward; the model was never touched
    model2 = copy.deepcopy(model)
    model2.load_state_dict(fwd.merge(params))
    torch.testing.assert_close(_out(model2(*args)), ours.detach(), atol=1e-4, rtol=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_3"])
def test_save_converted_loads_in_peft_onto_the_original_base(tmp_path: Path, init: str, use_rslora: bool) -> None:
    model = MLP().eval()
    x = torch.randn(3, 10)
    config = fp.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=init,
                           use_rslora=use_rslora)  # fmt: skip
    params, fwd = fp.adapt(model, config)
    with torch.no_grad():
        for entry in params.values():
            entry["lora_A"].add_(0.1)
    fp.save(tmp_path, params, config)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert saved["lora_alpha"] == pytest.approx(8 * 2**0.5 if use_rslora else 16)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    torch.testing.assert_close(loaded(x), fwd(params, x), atol=1e-5, rtol=1e-5)
    # and funcpeft reads it back as a plain rank-2r LoRA on the original base
    params2, config2 = fp.load(tmp_path)
    _, fwd2 = fp.adapt(model, config2)
    torch.testing.assert_close(fwd2(params2, x), fwd(params, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_save_unconverted_is_peft_residual_form(tmp_path: Path, init: str) -> None:
    model = MLP().eval()
    x = torch.randn(3, 10)
    config = fp.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=init)
    params, fwd = fp.adapt(model, config)
    with torch.no_grad():
        params["lin0"]["lora_B"].add_(0.1)
    fp.save(tmp_path, params, config, convert=False)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["init_lora_weights"] == init
    # PEFT loading it onto the original base re-runs the init there (rewriting its copy to the residual)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    torch.testing.assert_close(loaded(x), fwd(params, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="residual base.*path_initial_model_for_weight_conversion"):
        fp.load(tmp_path)
    # on the residual base (PEFT's rewritten model), the tensors are a plain LoRA
    state = fp.to_peft_state_dict(params, config)
    residual = copy.deepcopy(model)
    with torch.no_grad():
        for path in ("lin0", "lin1"):
            p = params[path]
            residual.get_submodule(path).weight.sub_(2.0 * p["lora_B0"] @ p["lora_A0"])
    plain = dataclasses.replace(config, init_lora_weights=True)
    _, fwd_res = fp.adapt(residual, plain)
    torch.testing.assert_close(fwd_res(fp.from_peft_state_dict(state, plain), x), fwd(params, x), atol=1e-5, rtol=1e-5)


def test_pissa_niter_is_a_low_rank_svd_and_reproducible() -> None:
    model = MLP().eval()
    with torch.no_grad():  # a clear spectral gap after 4 directions, where a randomized SVD with q=r is accurate
        model.lin1.weight.copy_(torch.randn(20, 4) @ torch.randn(4, 20) + 1e-3 * torch.randn(20, 20))
    config = fp.LoraConfig(r=4, lora_alpha=8, target_modules=["lin1"], init_lora_weights="pissa_niter_8")
    _, fwd = fp.adapt(model, config)
    p1 = fwd.init(torch.Generator().manual_seed(0))["lin1"]
    p2 = fwd.init(torch.Generator().manual_seed(0))["lin1"]
    assert torch.equal(p1["lora_A0"], p2["lora_A0"])
    exact = lora_init.initial_factors(model.lin1.weight, 4, 2.0, "pissa")
    torch.testing.assert_close(p1["lora_B0"] @ p1["lora_A0"], exact[1] @ exact[0], atol=1e-3, rtol=1e-3)
    w = model.lin1.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(2.0 * exact[1] @ exact[0], (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=1e-5)


def test_mixed_batch_of_pissa_adapters() -> None:
    model = MLP().eval()
    x = torch.randn(4, 10)
    config = fp.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights="pissa")
    p1, fwd = fp.adapt(model, config)
    p2 = fwd.init()
    with torch.no_grad():
        p1["lin0"]["lora_A"].add_(0.2)
        p2["lin1"]["lora_B"].sub_(0.3)
    ids = torch.tensor([0, 1, -1, 1])
    out = fwd(fp.stack([p1, p2]), x, adapter_ids=ids)
    expected = torch.stack([fwd(p1, x)[0], fwd(p2, x)[1], model(x)[2], fwd(p2, x)[3]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    ys = torch.func.vmap(fwd, in_dims=(0, None))(fp.stack([p1, p2]), x)
    torch.testing.assert_close(ys[1], fwd(p2, x), atol=1e-5, rtol=1e-5)


def test_orthogonal_init() -> None:
    model = MLP().eval()
    x = torch.randn(3, 10)
    config = fp.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights="orthogonal")
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(0))
    assert set(params["lin0"]) == {"lora_A", "lora_B"} and params["lin0"]["lora_A"].abs().sum() > 0
    torch.testing.assert_close(fwd(params, x), model(x), atol=1e-6, rtol=1e-6)  # B A = 0
    pm = _peft(model, r=4, target_modules=["lin0", "lin1"], init_lora_weights="orthogonal").eval()
    torch.testing.assert_close(pm(x), model(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="even rank"):
        fp.adapt(model, fp.LoraConfig(r=3, target_modules=["lin0"], init_lora_weights="orthogonal"))


def test_refusals() -> None:
    with pytest.raises(ValueError, match="Linear"):
        fp.adapt(ConvNet(), fp.LoraConfig(r=2, target_modules=["c2"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="r <= 4"):
        fp.adapt(MLP(), fp.LoraConfig(r=8, target_modules=["head"], init_lora_weights="olora"))
    with pytest.raises(ValueError, match="pissa_niter_"):
        fp.LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(ValueError, match="not supported by funcpeft yet"):
        fp.LoraConfig(init_lora_weights="corda")
    config = fp.LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="pissa", use_rslora=True,
                           rank_pattern={"lin0": 4})  # fmt: skip
    params, _ = fp.adapt(MLP(), config)
    with pytest.raises(ValueError, match="convert=False"):
        fp.save("/nonexistent/never", params, config)
    assert conv_inputs  # (ConvNet's inputs are never needed: the refusal comes first)


def test_apis_that_cannot_carry_the_initial_factors_refuse() -> None:
    model = MLP().eval()
    config = fp.LoraConfig(r=4, target_modules=["lin0"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="rewriting the base weights"):
        fp.inject_adapter_in_model(config, copy.deepcopy(model))
    with pytest.raises(ValueError, match=r"config\[0\].*initial factors"):
        fp.adapt(model, [config, fp.LoraConfig(r=2, target_modules=["lin0"])])
    params, _ = fp.adapt(model, config)
    with pytest.raises(ValueError, match="lora_A0"):  # PEFT's add_weighted_adapter has no initial factors either
        fp.combine([params, params], [0.5, 0.5], config, method="linear")


def test_optimizers_leave_the_initial_factors_alone() -> None:
    from funcpeft import optim

    model = MLP()
    x = torch.randn(3, 10)
    params, fwd = fp.adapt(model, fp.LoraConfig(r=4, target_modules=["lin0"], init_lora_weights="olora"))
    before = {k: v.clone() for k, v in params["lin0"].items()}
    torch_opt = torch.optim.AdamW([t for e in params.values() for t in e.values()], lr=0.1, weight_decay=0.1)
    fwd(params, x).square().sum().backward()
    torch_opt.step()
    tx = optim.chain(optim.adamw(0.1, weight_decay=0.1), optim.freeze(lora_init.frozen_mask(params)))
    state = tx.init(params)
    grads = torch.func.grad(lambda p: fwd(p, x).square().sum())(params)
    updates, state = tx.update(grads, state, params)
    params = optim.apply_updates(params, updates)
    for name in lora_init.INITIAL:
        assert torch.equal(params["lin0"][name], before[name])
    assert not torch.equal(params["lin0"]["lora_A"], before["lora_A"])


def test_compile_fullgraph() -> None:
    model = MLP().eval()
    x = torch.randn(2, 10)
    params, fwd = fp.adapt(model, fp.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights="pissa"))
    with torch.no_grad():
        params["lin0"]["lora_B"].add_(0.1)
    compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager")
    out = compiled(params, x)
    torch.testing.assert_close(out, fwd(params, x), atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert params["lin0"]["lora_A"].grad is not None and params["lin0"]["lora_A0"].grad is None
