"""AdaLoRA against PEFT: outputs and gradients, the rank allocator step by step, the regulariser, checkpoints.

PEFT's ``AdaLoraModel`` is the oracle. The allocator test runs PEFT's training protocol for 20 steps (backward,
SGD step, ``update_and_allocate(step)``) and feeds the very same gradients to ``funcpeft.adalora``'s pure step: the
parameters, the smoothed scores, the budgets and the masks must be bit-identical at every step. Checkpoints go both
ways, including pruned ranks and a module pruned to rank 0.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from _models import MLP, ConvNet, EmbNet, conv_inputs, oracle, tiny_gpt2, tiny_llama, token_ids
from safetensors.torch import load_file
from torch import Tensor, nn

import funcpeft as fp
from funcpeft import adalora

peft = oracle("peft")

pytestmark = pytest.mark.filterwarnings(
    "ignore:fan_in_fan_out is set to False but the target module is `Conv1D`",  # PEFT fixes it up for GPT-2
    "ignore:The following rank_pattern keys did not match",  # PEFT also reads AdaLoRA's masks as LoRA patterns
    "ignore:Adapter 'default'.*invalid shape",  # PEFT suspects unsharded ZeRO-3 in a module pruned to rank 0
)

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Every op here is tiny: intra-op threads cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----- models -----------------------------------------------------------------------------------------------------
def _gpt2() -> nn.Module:
    return tiny_gpt2(n_embd=16, vocab=50).double()


def _llama() -> nn.Module:
    return tiny_llama(hidden=16, vocab=50).double()


def _conv() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet(stride=2).double().eval()


def _ids() -> tuple[Tensor, ...]:
    return (token_ids(batch=2, length=6, vocab=50),)


def _conv_in() -> tuple[Tensor, ...]:
    return tuple(x.double() for x in conv_inputs())


MODELS: dict[str, tuple[Any, Any, list[str], dict[str, Any]]] = {
    "gpt2": (_gpt2, _ids, ["c_attn", "c_proj", "c_fc"], {"use_cache": False}),
    "llama": (_llama, _ids, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              {"use_cache": False}),
    "conv": (_conv, _conv_in, ["c2", "head"], {}),  # Conv2d and a Linear
}  # fmt: skip


def _out(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


def _peft_model(model: nn.Module, kw: dict[str, Any]) -> nn.Module:
    return peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(**kw)).double()


def _peft_tensors(peft_model: nn.Module) -> dict[str, Tensor]:
    """PEFT's AdaLoRA parameters by funcpeft's (path, name), from ``<path>.<name>.default``."""
    named = dict(peft_model.base_model.model.named_parameters())
    return {n.removesuffix(".default"): p for n, p in named.items() if re.search(r"\.lora_[ABE]\.default$", n)}


def _load_into_peft(params: fp.Params, peft_model: nn.Module) -> dict[str, Tensor]:
    """Copy ``params`` into PEFT's parameters; every PEFT adapter tensor must be covered, and only those."""
    theirs = _peft_tensors(peft_model)
    ours = {f"{path}.{name}": t for path, entry in params.items() for name, t in entry.items()}
    assert ours.keys() == theirs.keys()
    with torch.no_grad():
        for key, t in ours.items():
            assert theirs[key].shape == t.shape and theirs[key].dtype == t.dtype, key
            theirs[key].copy_(t)
    # PEFT re-registers `ranknum` when it casts the adapter to a non-float32 base dtype, which makes it trainable
    # (a PEFT quirk); funcpeft's divisor is a constant from the config.
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad and ".ranknum." not in n}
    assert len(trainable) == len(theirs), "PEFT trains more than lora_A/B/E"
    return theirs


# ----- forward and gradients --------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout"])
@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_and_gradients_match_peft(name: str, train: bool) -> None:
    build, inputs, targets, call_kw = MODELS[name]
    kw = {"init_r": 4, "target_r": 2, "total_step": 10, "lora_alpha": 6, "target_modules": targets,
          "init_lora_weights": False, "lora_dropout": 0.3 if train else 0.0}  # fmt: skip
    model = build().train(train)
    peft_model = _peft_model(model, kw).train(train)
    params, fwd = fp.adapt(model, fp.AdaLoraConfig(**kw), generator=torch.Generator().manual_seed(0))
    theirs = _load_into_peft(params, peft_model)

    args = inputs()
    torch.manual_seed(7)  # the same dropout masks: one draw per adapted layer, on its input, in module order
    out = _out(fwd(params, *args, **call_kw))
    torch.manual_seed(7)
    expected = _out(peft_model(*args, **call_kw))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, _out(fwd(None, *args, **call_kw)))

    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    leaves = {f"{p}.{n}": t for p, e in params.items() for n, t in e.items()}
    grads = torch.autograd.grad((out * weights).sum(), list(leaves.values()))
    (expected * weights).sum().backward()
    for (key, _), grad in zip(leaves.items(), grads, strict=True):
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(grad, theirs[key].grad, msg=lambda m, key=key: f"gradient of {key}: {m}")


def test_orth_regularization_equals_peft_term() -> None:
    kw = {"init_r": 4, "target_r": 2, "total_step": 10, "target_modules": ["c_attn", "c_fc"],
          "init_lora_weights": False, "orth_reg_weight": 0.7}  # fmt: skip
    model = _gpt2()
    peft_model = _peft_model(model, kw)
    params, fwd = fp.adapt(model, fp.AdaLoraConfig(**kw), generator=torch.Generator().manual_seed(0))
    _load_into_peft(params, peft_model)
    (ids,) = _ids()
    with torch.no_grad():  # AdaLoraModel.forward adds the weighted term to `outputs.loss`; its inner model does not
        adalora_model = peft_model.base_model
        term = adalora_model(ids, labels=ids, use_cache=False).loss - adalora_model.model(ids, labels=ids).loss
    ours = adalora.orth_regularization(params)
    torch.testing.assert_close((0.7 * ours).float(), term, rtol=1e-5, atol=1e-5)  # transformers' loss is float32
    assert ours > 1.0  # random A and B are far from orthogonal: the term is not trivially zero
    # differentiable with torch.func, and it includes A and B only
    grads = torch.func.grad(adalora.orth_regularization)(params)
    path = next(iter(params))
    assert grads[path]["lora_A"].abs().sum() > 0 and grads[path]["lora_B"].abs().sum() > 0
    assert torch.equal(grads[path]["lora_E"], torch.zeros_like(grads[path]["lora_E"]))


# ----- the allocator, step by step --------------------------------------------------------------------------------
ALLOC_KW = {"init_r": 4, "target_r": 2, "tinit": 3, "tfinal": 5, "deltaT": 3, "total_step": 20, "lora_alpha": 4,
            "orth_reg_weight": 0.3, "target_modules": ["c_attn", "c_proj", "c_fc"]}  # fmt: skip
LR = 0.5


def _peft_masks(peft_model: nn.Module) -> dict[str, list[bool]]:
    pattern = peft_model.peft_config["default"].rank_pattern or {}
    return {re.sub(r"\.lora_E(\.default)?$", "", k): list(v) for k, v in pattern.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """20 steps of PEFT's protocol, and funcpeft's pure allocator fed the same gradients, compared every step."""
    model = _gpt2()
    config = fp.AdaLoraConfig(**ALLOC_KW)
    peft_model = _peft_model(model, ALLOC_KW)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(0))
    params = {p: {n: t.detach() for n, t in e.items()} for p, e in params.items()}
    theirs = _load_into_peft(params, peft_model)
    ranker = peft_model.base_model.rankallocator
    alloc = adalora.allocator(config)
    state = alloc.init(params)
    seen_masks, seen_budgets = set(), []

    def loss_fn(p: fp.Params, ids: Tensor) -> Tensor:
        loss = fwd(p, ids, labels=ids, use_cache=False).loss
        return loss + config.orth_reg_weight * adalora.orth_regularization(p)

    for step in range(config.total_step):
        (ids,) = (token_ids(batch=2, length=6, vocab=50, seed=step),)
        peft_model.base_model(ids, labels=ids, use_cache=False).loss.backward()  # AdaLoraModel adds the orth term
        grads = {p: {n: theirs[f"{p}.{n}"].grad.clone() for n in e} for p, e in params.items()}
        if step == 0:  # funcpeft's own gradients (loss + weighted regulariser) are PEFT's
            ours, _ = torch.func.grad_and_value(loss_fn)(params, ids)
            optree.tree_map(torch.testing.assert_close, ours, grads)
        with torch.no_grad():
            for t in theirs.values():
                t.sub_(LR * t.grad)
        peft_model.base_model.update_and_allocate(step)
        peft_model.zero_grad()
        stepped = {p: {n: t - LR * grads[p][n] for n, t in e.items()} for p, e in params.items()}
        before = optree.tree_map(torch.clone, stepped)
        params, state = alloc.update(stepped, grads, state, step)
        optree.tree_map(lambda a, b: torch.equal(a, b) or pytest.fail("update modified its input"), stepped, before)

        for key, t in theirs.items():
            path, name = key.rsplit(".", 1)
            assert torch.equal(params[path][name], t), f"step {step}: {key} differs from PEFT's"
        assert state.budget == ranker.budget_schedule(step)[0], f"step {step}: budget"
        masks = {p: m.tolist() for p, m in state.masks.items()}
        assert masks == _peft_masks(peft_model), f"step {step}: masks"
        for key, ipt in ranker.exp_avg_ipt.items():
            path, name = key.removesuffix(".default").rsplit(".", 1)
            assert torch.equal(state.exp_avg_ipt[path][name], ipt), f"step {step}: sensitivity of {key}"
            assert torch.equal(state.exp_avg_unc[path][name], ranker.exp_avg_unc[key]), f"step {step}: {key}"
        seen_masks.add(tuple(tuple(m) for m in masks.values()))
        seen_budgets.append(state.budget)

    n = len(params)
    assert seen_budgets[0] == 4 * n and seen_budgets[-1] == 2 * n and len(set(seen_budgets)) > 3
    assert len(seen_masks) > 2, "the masks must change over the run, or the comparison proves little"
    kept = sum(sum(m) for m in masks.values())
    assert kept == 2 * n
    for path, mask in state.masks.items():  # after the final allocation, pruned E entries stay zero
        assert torch.all(params[path]["lora_E"][~mask] == 0)
    folder = tmp_path_factory.mktemp("adalora")
    return {"model": model, "config": config, "params": params, "state": state, "fwd": fwd,
            "peft_model": peft_model, "folder": folder}  # fmt: skip


def test_allocator_matches_peft_over_20_steps(trained: dict[str, Any]) -> None:
    """The comparisons run in the fixture, at every step; here the end state: finalize is PEFT's rank_pattern."""
    config = adalora.finalize(trained["config"], trained["state"])
    assert {k.removesuffix(".lora_E"): v for k, v in config.rank_pattern.items()} == _peft_masks(trained["peft_model"])
    assert all(k.endswith(".lora_E") for k in config.rank_pattern)
    assert trained["config"].rank_pattern is None, "finalize must not modify the config it is given"


def test_finalize_and_save_write_what_peft_writes(trained: dict[str, Any]) -> None:
    peft_model, params = trained["peft_model"], trained["params"]
    ours_dir, peft_dir = trained["folder"] / "ours", trained["folder"] / "peft"
    config = adalora.finalize(trained["config"], trained["state"])
    fp.save(ours_dir, params, config)
    peft_model.save_pretrained(peft_dir)

    ours_cfg = json.loads((ours_dir / "adapter_config.json").read_text())
    peft_cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    for cfg in (ours_cfg, peft_cfg):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        for key in ("auto_mapping", "peft_version", "fan_in_fan_out"):  # PEFT flips fan_in_fan_out for Conv1D
            cfg.pop(key, None)
    assert ours_cfg == peft_cfg
    ours_t, peft_t = (
        load_file(ours_dir / "adapter_model.safetensors"),
        load_file(peft_dir / "adapter_model.safetensors"),
    )
    assert ours_t.keys() == peft_t.keys()
    for key in peft_t:
        assert torch.equal(ours_t[key], peft_t[key]), key
    ranks = {t.shape[0] for k, t in peft_t.items() if k.endswith("lora_E")}
    assert ranks != {ALLOC_KW["init_r"]}, "the checkpoint must hold pruned ranks"

    # funcpeft's folder in PEFT, PEFT's folder in funcpeft: the trained model's outputs on both sides
    model, (ids,) = trained["model"], _ids()
    with torch.no_grad():
        expected = _out(peft_model(ids, use_cache=False))
        full = _out(trained["fwd"](params, ids, use_cache=False))
        torch.testing.assert_close(full, expected)
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), ours_dir)
        torch.testing.assert_close(_out(reloaded(ids, use_cache=False)), expected)
        loaded, loaded_config = fp.load(peft_dir)
        assert loaded_config.rank_pattern == config.rank_pattern
        _, fwd = fp.adapt(model, loaded_config)
        torch.testing.assert_close(_out(fwd(loaded, ids, use_cache=False)), expected)
        _, fwd_pruned = fp.adapt(model, config)  # prune() gives the same tensors as the checkpoint
        pruned = adalora.prune(params, config)
        torch.testing.assert_close(_out(fwd_pruned(pruned, ids, use_cache=False)), expected)
        optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0), pruned, loaded)


def _masks(params: fp.Params, r: int) -> dict[str, list[bool]]:
    """A pattern with a module partly pruned, one pruned to rank 0, one full, and the rest left out (full rank)."""
    paths = list(params)
    shapes = [[True, False] * (r // 2), [False] * r, [True] * r]
    return {f"{p}.lora_E": m for p, m in zip(paths[:3], shapes, strict=True)}


@pytest.mark.parametrize("name", ["gpt2", "conv"])
def test_pruned_checkpoint_funcpeft_to_peft(name: str, tmp_path: Path) -> None:
    build, inputs, targets, call_kw = MODELS[name]
    if name == "conv":
        targets = ["c2", "head", "lin"]
        build = lambda: _ConvLin().double().eval()  # noqa: E731 - three adaptable modules
    kw = {"init_r": 4, "target_r": 2, "total_step": 10, "target_modules": targets, "init_lora_weights": False}
    model = build()
    full, _ = fp.adapt(model, fp.AdaLoraConfig(**kw), generator=torch.Generator().manual_seed(0))
    config = fp.AdaLoraConfig(**kw, rank_pattern=_masks(full, 4))
    fp.save(tmp_path, full, config)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    first, second = list(full)[:2]
    assert stored[f"base_model.model.{first}.lora_B"].shape[1] == 2
    assert stored[f"base_model.model.{second}.lora_E"].shape == (0, 1)
    assert stored[f"base_model.model.{second}.lora_A"].shape[0] == 0

    params, fwd = fp.adapt(model, config)
    pruned = adalora.prune(full, config)
    loaded, loaded_config = fp.load(tmp_path)
    assert loaded_config == config
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0), pruned, loaded)
    args = inputs()
    with torch.no_grad():
        out = _out(fwd(loaded, *args, **call_kw))
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).double()
        torch.testing.assert_close(out, _out(peft_model(*args, **call_kw)))
        # pruning is masking: the full-rank adapter with the pruned E entries zeroed gives the same output
        _, fwd_full = fp.adapt(model, fp.AdaLoraConfig(**kw))
        masked = {p: dict(e) for p, e in full.items()}
        for key, mask in config.rank_pattern.items():
            path = key.removesuffix(".lora_E")
            masked[path]["lora_E"] = full[path]["lora_E"] * torch.tensor(mask, dtype=torch.float64).view(-1, 1)
        torch.testing.assert_close(out, _out(fwd_full(masked, *args, **call_kw)))
        assert not torch.allclose(out, _out(fwd(None, *args, **call_kw)))


class _ConvLin(nn.Module):
    """A Conv2d and two Linears, so a pattern can prune the conv partly, a Linear to rank 0 and keep the other."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 5)
        self.lin = nn.Linear(5, 3)

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor) -> Tensor:
        return self.lin(torch.tanh(self.head(self.c2(x2).mean((-1, -2)))))


def test_pruned_checkpoint_peft_to_funcpeft(tmp_path: Path) -> None:
    """A PEFT AdaLoRA model with masks set as ``update_and_allocate`` leaves them, saved by PEFT, loads here."""
    targets = ["q_proj", "v_proj", "down_proj"]
    kw = {
        "init_r": 4,
        "target_r": 2,
        "total_step": 10,
        "target_modules": targets,
        "init_lora_weights": False,
        "lora_alpha": 3,
    }
    model = _llama()
    peft_model = _peft_model(model, kw)
    paths = [n.removesuffix(".lora_E.default") for n, _ in peft_model.base_model.model.named_parameters()
             if n.endswith(".lora_E.default")]  # fmt: skip
    masks = {f"{p}.lora_E.default": m for p, m in zip(paths, [[False] * 4, [True, False, False, True]], strict=False)}
    with torch.no_grad():
        named = dict(peft_model.base_model.model.named_parameters())
        for key, mask in masks.items():
            named[key].masked_fill_(~torch.tensor(mask).view(-1, 1), 0.0)
    peft_model.peft_config["default"].rank_pattern = masks
    peft_model.save_pretrained(tmp_path)

    params, config = fp.load(tmp_path)
    assert config.rank_pattern == {k.removesuffix(".default"): v for k, v in masks.items()}
    assert params[paths[0]]["lora_A"].shape == (0, 16) and params[paths[0]]["lora_B"].shape[1] == 0
    assert params[paths[1]]["lora_E"].shape == (2, 1) and params[paths[1]]["lora_B"].shape[1] == 2
    _, fwd = fp.adapt(model, config)
    (ids,) = _ids()
    with torch.no_grad():
        expected = _out(peft_model(ids, use_cache=False))
        torch.testing.assert_close(_out(fwd(params, ids, use_cache=False)), expected)
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).double()
        torch.testing.assert_close(_out(reloaded(ids, use_cache=False)), expected)


# ----- the rest of the adapter contract on AdaLoRA ----------------------------------------------------------------
def test_mixed_batch_and_vmap_over_adalora_adapters() -> None:
    for build, inputs, targets in ((lambda: MLP().double(), None, ["lin0", "lin1"]), (_conv, _conv_in, ["c2", "head"])):
        model = build()
        config = fp.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=targets, init_lora_weights=False)
        _, fwd = fp.adapt(model, config)
        g = torch.Generator().manual_seed(1)
        adapters = [fwd.init(g) for _ in range(3)]
        stacked = optree.tree_map(lambda *xs: torch.stack(xs), *adapters)
        ids = torch.tensor([2, -1, 0, 1])
        if inputs is None:
            x = (torch.randn(4, 10, generator=g, dtype=torch.float64),)
        else:
            x = tuple(t[:1].repeat(4, *([1] * (t.dim() - 1))) for t in inputs())
        out = fwd(stacked, *x, adapter_ids=ids)
        for i, k in enumerate(ids.tolist()):
            row = tuple(t[i : i + 1] for t in x)
            torch.testing.assert_close(out[i : i + 1], fwd(adapters[k] if k >= 0 else None, *row))


def test_allocator_state_is_a_pytree_and_update_is_pure() -> None:
    model = MLP()
    config = fp.AdaLoraConfig(init_r=4, target_r=1, total_step=4, target_modules=["lin0", "lin1"], deltaT=1)
    params, _ = fp.adapt(model, config, generator=torch.Generator().manual_seed(0))
    alloc = adalora.allocator(config)
    state = alloc.init(params)
    leaves, spec = optree.tree_flatten(state)
    assert isinstance(state, adalora.AllocatorState) and len(leaves) == 13  # 2 x 6 EMA tensors + the budget
    assert optree.tree_unflatten(spec, leaves) == state
    grads = optree.tree_map(lambda t: torch.randn(t.shape, generator=torch.Generator().manual_seed(3)), params)
    snapshot = optree.tree_map(torch.clone, (params, grads))
    new, state = alloc.update(params, grads, state, 1)
    optree.tree_map(lambda a, b: torch.equal(a, b) or pytest.fail("an input was modified"), (params, grads), snapshot)
    assert state.masks and all(m.dtype == torch.bool for m in state.masks.values())
    assert new["lin0"]["lora_A"] is params["lin0"]["lora_A"]  # untouched tensors are shared, not copied
    assert new["lin0"]["lora_E"].requires_grad


# ----- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({}, ValueError, "total_step"),
        ({"total_step": 0}, ValueError, "total_step"),
        ({"total_step": 10, "tinit": 6, "tfinal": 4}, ValueError, "budgeting phase"),
        ({"total_step": 10, "use_dora": True}, ValueError, "DoRA"),
        ({"total_step": 10, "use_rslora": True}, ValueError, "use_rslora"),
        ({"total_step": 10, "lora_bias": True}, ValueError, "lora_bias"),
        ({"total_step": 10, "target_r": 16}, ValueError, "target_r=16"),
        ({"total_step": 10, "init_r": 0}, ValueError, "init_r"),
        ({"total_step": 10, "beta1": 0.0}, ValueError, "beta1"),
        ({"total_step": 10, "beta2": 1.0}, ValueError, "beta2"),
        ({"total_step": 10, "deltaT": 0}, ValueError, "deltaT"),
        ({"total_step": 10, "orth_reg_weight": -1}, ValueError, "orth_reg_weight"),
        ({"total_step": 10, "alpha_pattern": {"lin0": 2}}, ValueError, "alpha_pattern"),
        ({"total_step": 10, "init_lora_weights": "gaussian"}, ValueError, "init_lora_weights"),
        ({"total_step": 10, "rank_pattern": {"lin0": [True]}}, ValueError, "'<module_path>.lora_E'"),
        ({"total_step": 10, "rank_pattern": {"lin0.lora_E": [1, 0]}}, TypeError, "True/False"),
    ],
)
def test_bad_configs_are_refused(kw: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=re.escape(match)):
        fp.AdaLoraConfig(**kw)


@pytest.mark.parametrize(
    ("build", "kw", "match"),
    [
        (lambda: EmbNet(), {"target_modules": ["emb"]}, "AdaLoRA can only adapt nn.Linear, nn.Conv2d"),
        (lambda: ConvNet(), {"target_modules": ["c1"]}, "'c1' (Conv1d)"),
        (lambda: ConvNet(), {"target_modules": ["c3"]}, "'c3' (Conv3d)"),
        (lambda: ConvNet(groups=2), {"target_modules": ["c2"]}, "grouped convolution 'c2' (groups=2)"),
        (MLP, {"target_modules": ["lin0"], "rank_pattern": {"lin0.lora_E": [True] * 3}}, "has 3 entries"),
        (MLP, {"target_modules": ["lin0"], "rank_pattern": {"lin1.lora_E": [True] * 12}}, "'lin1.lora_E' does not"),
    ],
)
def test_unsupported_modules_and_patterns_name_the_module(build: Any, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        fp.adapt(build(), fp.AdaLoraConfig(total_step=10, **kw))


def test_allocator_errors_are_clear() -> None:
    model = MLP()
    config = fp.AdaLoraConfig(init_r=4, target_r=2, total_step=6, tfinal=2, target_modules=["lin0", "lin1"])
    params, _ = fp.adapt(model, config)
    alloc = adalora.allocator(config)
    lora_params, _ = fp.adapt(model, fp.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="no AdaLoRA module"):
        alloc.init(lora_params)
    with pytest.raises(ValueError, match="no AdaLoRA module"):
        adalora.orth_regularization(lora_params)
    with pytest.raises(TypeError, match="AdaLoraConfig"):
        adalora.allocator(fp.LoraConfig())
    state = alloc.init(params)
    with pytest.raises(ValueError, match=re.escape("`grads['lin0']['lora_B']` must be a tensor of shape (20, 4)")):
        alloc.update(params, {"lin0": {"lora_A": torch.zeros(4, 10)}}, state, 1)
    with pytest.raises(TypeError, match="grads"):
        alloc.update(params, None, state, 1)
    with pytest.raises(TypeError, match="step"):
        alloc.update(params, params, state, -1)
    with pytest.raises(ValueError, match="no allocation was made yet"):
        alloc.update(params, None, state, 5)  # after total_step - tfinal = 4, without the final mask
    with pytest.raises(ValueError, match="has not pruned yet"):
        adalora.finalize(config, state)
    _, state = alloc.update(params, None, state, 4)  # the final allocation needs no gradients
    assert sum(sum(m) for m in adalora.finalize(config, state).rank_pattern.values()) <= 4


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worked example in README.md's "## AdaLoRA" section, run exactly as written."""
    text = README.read_text()
    section = text[text.index("## AdaLoRA\n") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    config, params = namespace["config"], namespace["params"]
    assert config.rank_pattern is not None and (tmp_path / "my-adalora" / "adapter_config.json").is_file()
    kept = {k.removesuffix(".lora_E"): sum(v) for k, v in config.rank_pattern.items()}
    assert {p: e["lora_E"].shape[0] for p, e in params.items()} == kept
    assert sum(kept.values()) == config.target_r * len(kept)
