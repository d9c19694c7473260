"""PEFT's standalone ``TrainableTokensConfig`` against PEFT 0.21.2: outputs, gradients, tied heads, checkpoints both
ways (PEFT's copy of a tied head's rows), merging, mixed batches, vmap, inspect, and refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import EmbNet, oracle, tiny_gpt2, tiny_llama, token_ids
from safetensors.torch import load_file, save_file
from test_lora_tokens import tied_llama

import funcpeft as fp

peft = oracle("peft")

TOKENS = "trainable_tokens_delta"
IDS = [2, 9, 11]

# (name, model factory, target_modules, embedding path, tied head path or None)
MODELS: list[tuple[str, Any, Any, str, str | None]] = [
    ("gpt2-tied", tiny_gpt2, None, "transformer.wte", "lm_head"),
    ("llama-tied", tied_llama, None, "model.embed_tokens", "lm_head"),
    ("llama-untied", tiny_llama, None, "model.embed_tokens", None),
    ("llama-untied-regex", tiny_llama, r".*embed_tokens", "model.embed_tokens", None),
]
MODEL_IDS = [m[0] for m in MODELS]


def _ids() -> torch.Tensor:
    x = token_ids(batch=3, length=6, seed=1)
    x[:, :3] = torch.tensor(IDS)
    return x


def _setup(factory: Any, targets: Any):
    model = factory().double()
    config = fp.TrainableTokensConfig(token_indices=IDS, target_modules=targets)
    params, fwd = fp.adapt(model, config)
    with torch.no_grad():
        for entry in params.values():
            entry[TOKENS].normal_(generator=torch.Generator().manual_seed(3))
    twin = peft.get_peft_model(
        copy.deepcopy(model), peft.TrainableTokensConfig(token_indices=IDS, target_modules=targets)
    )
    peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(params, config))
    return model, config, params, fwd, twin.eval()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize(("name", "factory", "targets", "emb", "head"), MODELS, ids=MODEL_IDS)
def test_outputs_gradients_and_keys_equal_peft(name: str, factory: Any, targets: Any, emb: str, head: Any) -> None:
    model, config, params, fwd, twin = _setup(factory, targets)
    assert list(params) == [emb] and (head in fwd.targets) is (head is not None)
    ours = set(fp.to_peft_state_dict(params, config))
    assert ours == {f"base_model.model.{emb}.{TOKENS}"}
    # PEFT also writes a tied head's rows (the same tensor): the only key we leave out
    assert set(peft.get_peft_model_state_dict(twin)) - ours == (
        {f"base_model.model.{head}.{TOKENS}"} if head else set()
    )
    x = _ids()
    out, ref = fwd(params, x).logits, twin(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)
    grad = torch.func.grad(lambda p: (fwd(p, x).logits * weights).sum())(params)[emb][TOKENS]
    (ref * weights).sum().backward()
    trainable = [p for p in twin.parameters() if p.requires_grad]
    assert len(trainable) == 1
    torch.testing.assert_close(grad, trainable[0].grad, rtol=1e-9, atol=1e-10)
    twin2 = copy.deepcopy(model)
    twin2.load_state_dict(fwd.merge(params))
    torch.testing.assert_close(twin2(x).logits, out, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize(("name", "factory", "targets", "emb", "head"), MODELS, ids=MODEL_IDS)
def test_checkpoints_both_ways(tmp_path: Path, name: str, factory: Any, targets: Any, emb: str, head: Any) -> None:
    model, config, params, fwd, twin = _setup(factory, targets)
    x = _ids()
    fp.save(tmp_path / "fp", params, config)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fp").eval()
    torch.testing.assert_close(loaded(x).logits, fwd(params, x).logits, rtol=1e-10, atol=1e-10)
    twin.save_pretrained(tmp_path / "peft")
    back, back_config = fp.load(tmp_path / "peft")
    assert isinstance(back_config, fp.TrainableTokensConfig) and back_config.token_indices == IDS
    assert list(back) == [emb] and torch.equal(back[emb][TOKENS], params[emb][TOKENS].detach())
    _, fwd2 = fp.adapt(model, back_config)
    torch.testing.assert_close(fwd2(back, x).logits, twin(x).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_untied_head_named_too_trains_its_own_rows() -> None:
    model, config, params, fwd, twin = _setup(tiny_llama, ["embed_tokens", "lm_head"])
    assert set(params) == {"model.embed_tokens", "lm_head"}
    assert set(fp.to_peft_state_dict(params, config)) == set(peft.get_peft_model_state_dict(twin))
    x = _ids()
    torch.testing.assert_close(fwd(params, x).logits, twin(x).logits, rtol=1e-10, atol=1e-10)
    twin2 = copy.deepcopy(model)
    twin2.load_state_dict(fwd.merge(params))
    torch.testing.assert_close(twin2(x).logits, fwd(params, x).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_a_tied_copy_that_differs_is_refused(tmp_path: Path) -> None:
    _, _, _, _, twin = _setup(tiny_gpt2, None)
    twin.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights[f"base_model.model.lm_head.{TOKENS}"] = weights[f"base_model.model.lm_head.{TOKENS}"] + 1
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="'lm_head', which `target_modules`='transformer.wte' does not select"):
        fp.load(tmp_path)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_mixed_batch_vmap_and_init_false() -> None:
    model = tiny_gpt2().double()
    config = fp.TrainableTokensConfig(token_indices=IDS, init_weights=False)
    _, fwd = fp.adapt(model, config)
    adapters = [fwd.init(torch.Generator().manual_seed(k)) for k in range(2)]
    x = _ids()
    assert not torch.allclose(fwd(adapters[0], x).logits, model(x).logits)  # random rows: not the base
    assert not torch.equal(adapters[0]["transformer.wte"][TOKENS], adapters[1]["transformer.wte"][TOKENS])
    stacked = fp.stack(adapters)
    ids = torch.tensor([1, -1, 0])
    mixed = fwd(stacked, x, adapter_ids=ids).logits
    for row, k in enumerate(ids.tolist()):
        one = fwd(adapters[k] if k >= 0 else None, x[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], one, rtol=1e-10, atol=1e-10)
    mapped = torch.func.vmap(lambda p: fwd(p, x, use_cache=False).logits)(stacked)
    for k, p in enumerate(adapters):
        torch.testing.assert_close(mapped[k], fwd(p, x).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_inspect_and_custom_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from funcpeft.__main__ import main

    model = EmbNet(vocab=20, dim=8)
    config = fp.TrainableTokensConfig(token_indices=[3, 4], target_modules=["emb"])
    params, fwd = fp.adapt(model, config)
    x = torch.tensor([[3, 1, 4]])
    torch.testing.assert_close(fwd(params, x), model(x), rtol=0, atol=0)
    fp.save(tmp_path, params, config)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["peft_type"] == "TRAINABLE_TOKENS" and facts["targets"] == ["emb"]
    assert facts["parameters"]["adapter"] == 2 * 8


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="more than once"):
        fp.TrainableTokensConfig(token_indices=[1, 1])
    with pytest.raises(ValueError, match="empty"):
        fp.TrainableTokensConfig()
    with pytest.raises(ValueError, match="task head"):
        fp.TrainableTokensConfig(token_indices=[1], task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="'embed_tokens' matched no module"):
        fp.adapt(EmbNet(), fp.TrainableTokensConfig(token_indices=[1]))  # no get_input_embeddings: embed_tokens
    with pytest.raises(ValueError, match="out of range: it has 20 rows"):
        fp.adapt(EmbNet(vocab=20), fp.TrainableTokensConfig(token_indices=[20], target_modules=["emb"]))
    with pytest.raises(ValueError, match=r"selects \['lm_head'\], which share their weight"):
        fp.adapt(tied_llama(), fp.TrainableTokensConfig(token_indices=[1], target_modules=["embed_tokens", "lm_head"]))
    with pytest.raises(ValueError, match="a LlamaRMSNorm"):
        fp.adapt(tiny_llama(), fp.TrainableTokensConfig(token_indices=[1], target_modules=["norm"]))
    params = {"emb": {TOKENS: torch.zeros(3, 8)}}
    with pytest.raises(ValueError, match=r"`params\['emb'\]` does not fit the config: .* has 3 rows, but the config"):
        fp.save(tmp_path, params, fp.TrainableTokensConfig(token_indices=[1, 2], target_modules=["emb"]))
