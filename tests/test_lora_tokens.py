"""LoRA's ``trainable_token_indices`` against PEFT 0.21.2: outputs, gradients, tied LM heads, checkpoints both ways,
merging, mixed batches, vmap, compile, a resized vocabulary, and every refusal."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import EmbNet, oracle, tiny_gpt2, tiny_llama, token_ids
from torch import nn

import funcpeft as fp

peft = oracle("peft")
transformers = oracle("transformers")

TOKENS = "trainable_tokens_delta"
IDS = [1, 5, 7, 42]


def tied_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=100,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


# (name, model factory, LoRA targets, embedding path, tied head path or None)
MODELS: list[tuple[str, Any, list[str], str, str | None]] = [
    ("gpt2-tied", tiny_gpt2, ["c_attn"], "transformer.wte", "lm_head"),
    ("llama-tied", tied_llama, ["q_proj", "v_proj"], "model.embed_tokens", "lm_head"),
    ("llama-untied", tiny_llama, ["q_proj", "v_proj"], "model.embed_tokens", None),
]
MODEL_IDS = [m[0] for m in MODELS]


def _ids(seed: int = 0) -> torch.Tensor:
    x = token_ids(batch=3, length=8, seed=seed)
    x[:, :4] = torch.tensor(IDS)  # every row looks up every trained token
    return x


def _setup(factory: Any, targets: list[str], **kw: Any):
    model = factory().double()
    config = fp.LoraConfig(target_modules=targets, init_lora_weights=False, trainable_token_indices=IDS, **kw)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for entry in params.values():
            if TOKENS in entry:
                entry[TOKENS].add_(torch.randn(entry[TOKENS].shape, generator=torch.Generator().manual_seed(2)))
    twin = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(target_modules=targets, trainable_token_indices=IDS, **kw)
    )
    peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(params, config))
    return model, config, params, fwd, twin.eval()


def _peft_key(path: str, leaf: str) -> str:
    if leaf == TOKENS:
        return f"base_model.model.{path}.token_adapter.{TOKENS}.default"
    return f"base_model.model.{path}.{leaf}.default.weight"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize(("name", "factory", "targets", "emb", "head"), MODELS, ids=MODEL_IDS)
def test_outputs_gradients_and_keys_equal_peft(name: str, factory: Any, targets: list[str], emb: str, head: Any):
    model, config, params, fwd, twin = _setup(factory, targets)
    assert params[emb][TOKENS].shape == (len(IDS), model.get_input_embeddings().embedding_dim)
    assert set(fp.to_peft_state_dict(params, config)) == set(peft.get_peft_model_state_dict(twin))
    assert f"base_model.model.{emb}.token_adapter.{TOKENS}" in fp.to_peft_state_dict(params, config)
    assert (head in fwd.targets) is (head is not None) and head not in params  # a tied head reads emb's entry
    trainable = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    assert set(trainable) == {_peft_key(p, leaf) for p, e in params.items() for leaf in e}
    x = _ids()
    out = fwd(params, x).logits
    ref = twin(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    grads = torch.func.grad(lambda p: (fwd(p, x).logits * weights).sum())(params)
    (ref * weights).sum().backward()
    for path, entry in grads.items():
        for leaf, grad in entry.items():
            torch.testing.assert_close(grad, trainable[_peft_key(path, leaf)].grad, rtol=1e-9, atol=1e-10)
    # only the listed rows train: the model's weights get no gradient, and the base is untouched
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize(("name", "factory", "targets", "emb", "head"), MODELS, ids=MODEL_IDS)
def test_tied_head_logits_use_the_new_rows(name: str, factory: Any, targets: list[str], emb: str, head: Any):
    model = factory().double()
    config = fp.LoraConfig(target_modules=targets, trainable_token_indices=IDS)
    params, fwd = fp.adapt(model, config)
    x = _ids()
    torch.testing.assert_close(fwd(params, x).logits, model(x).logits, rtol=0, atol=0)  # fresh == base, exactly
    new = torch.randn(len(IDS), params[emb][TOKENS].shape[1], dtype=torch.double)
    params[emb][TOKENS] = new.requires_grad_(True)
    hidden = fwd.method(lambda m, ids: m.model(ids) if hasattr(m, "model") else m.transformer(ids))(params, x)
    logits = fwd(params, x).logits
    head_rows = new if head is not None else model.get_output_embeddings().weight[IDS]
    torch.testing.assert_close(logits[..., IDS], hidden.last_hidden_state @ head_rows.T, rtol=1e-9, atol=1e-9)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize(("name", "factory", "targets", "emb", "head"), MODELS, ids=MODEL_IDS)
def test_merge_equals_forward(name: str, factory: Any, targets: list[str], emb: str, head: Any) -> None:
    model, _, params, fwd, _ = _setup(factory, targets)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = fwd.merge(params)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched
    torch.testing.assert_close(merged[f"{emb}.weight"][IDS], params[emb][TOKENS].detach(), rtol=0, atol=0)
    if head is not None:  # one tied tensor: both names carry the new rows, whichever loads last
        assert torch.equal(merged[f"{head}.weight"], merged[f"{emb}.weight"])
    twin = copy.deepcopy(model)
    twin.load_state_dict(merged)
    x = _ids()
    torch.testing.assert_close(twin(x).logits, fwd(params, x).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize(("name", "factory", "targets", "emb", "head"), MODELS, ids=MODEL_IDS)
def test_checkpoints_both_ways(tmp_path: Path, name: str, factory: Any, targets: list[str], emb: str, head: Any):
    model, config, params, fwd, twin = _setup(factory, targets)
    x = _ids()
    fp.save(tmp_path / "fp", params, config)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fp").eval()
    torch.testing.assert_close(loaded(x).logits, fwd(params, x).logits, rtol=1e-10, atol=1e-10)
    twin.save_pretrained(tmp_path / "peft")
    back, back_config = fp.load(tmp_path / "peft")
    assert back_config.trainable_token_indices == IDS
    assert set(back) == set(params)
    for path, entry in params.items():
        for leaf, tensor in entry.items():
            assert torch.equal(back[path][leaf], tensor.detach()), (path, leaf)
    _, fwd2 = fp.adapt(model, back_config)
    torch.testing.assert_close(fwd2(back, x).logits, twin(x).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize(("name", "factory", "targets", "emb", "head"), MODELS, ids=MODEL_IDS)
def test_mixed_batch_and_vmap_equal_a_loop(name: str, factory: Any, targets: list[str], emb: str, head: Any):
    model = factory().double()
    config = fp.LoraConfig(target_modules=targets, init_lora_weights=False, trainable_token_indices=IDS)
    _, fwd = fp.adapt(model, config)
    adapters = [fwd.init(torch.Generator().manual_seed(k)) for k in range(3)]
    for k, p in enumerate(adapters):
        with torch.no_grad():
            p[emb][TOKENS].add_(torch.randn(p[emb][TOKENS].shape, generator=torch.Generator().manual_seed(10 + k)))
    stacked = fp.stack(adapters)
    x = _ids()
    ids = torch.tensor([2, -1, 0])
    mixed = fwd(stacked, x, adapter_ids=ids).logits
    for row, k in enumerate(ids.tolist()):
        one = fwd(adapters[k] if k >= 0 else None, x[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], one, rtol=1e-10, atol=1e-10)
    # differentiable per row: adapter 1 is used by no row, so it gets exactly zero
    grads = torch.autograd.grad(mixed.square().sum(), stacked[emb][TOKENS])[0]
    assert grads[1].abs().max() == 0 and grads[0].abs().max() > 0 and grads[2].abs().max() > 0
    mapped = torch.func.vmap(lambda p: fwd(p, x, use_cache=False).logits)(stacked)
    for k, p in enumerate(adapters):
        torch.testing.assert_close(mapped[k], fwd(p, x).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_dict_form_untied_head_and_mismatched_tied_rows() -> None:
    x = _ids()
    # an untied LM head (a Linear) named in the dict trains its output rows; PEFT wraps it the same way
    model = tiny_llama().double()
    spec = {"lm_head": [3, 4], "embed_tokens": [1, 2]}
    model_, config, params, fwd, twin = _setup_dict(model, spec)
    assert params["lm_head"][TOKENS].shape == (2, 32) and params["model.embed_tokens"][TOKENS].shape == (2, 32)
    torch.testing.assert_close(fwd(params, x).logits, twin(x).logits, rtol=1e-10, atol=1e-10)
    big = torch.randint(0, 100, (2, 40))  # more rows than the head has inputs
    torch.testing.assert_close(fwd(params, big).logits, twin(big).logits, rtol=1e-10, atol=1e-10)
    twin2 = copy.deepcopy(model)
    twin2.load_state_dict(fwd.merge(params))
    torch.testing.assert_close(twin2(x).logits, fwd(params, x).logits, rtol=1e-10, atol=1e-10)
    # tied, the dict giving the head other rows than the embedding: PEFT trains each on its own, untied
    tied = tied_llama().double()
    _, config, params, fwd, twin = _setup_dict(tied, {"embed_tokens": [1, 2], "lm_head": [3]})
    assert set(params) >= {"lm_head", "model.embed_tokens"}
    assert set(fp.to_peft_state_dict(params, config)) == set(peft.get_peft_model_state_dict(twin))
    torch.testing.assert_close(fwd(params, x).logits, twin(x).logits, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="tied to"):
        fwd.merge(params)  # two entries write one tied tensor differently
    # tied, the same rows under both names: one entry, tied (as PEFT)
    _, config, params, fwd, twin = _setup_dict(tied, {"embed_tokens": [1, 2], "lm_head": [1, 2]})
    assert "lm_head" not in params and "lm_head" in fwd.targets
    torch.testing.assert_close(fwd(params, x).logits, twin(x).logits, rtol=1e-10, atol=1e-10)


def _setup_dict(model: nn.Module, spec: dict[str, list[int]]):
    config = fp.LoraConfig(target_modules=["q_proj"], trainable_token_indices=spec)
    params, fwd = fp.adapt(model, config)
    with torch.no_grad():
        for entry in params.values():
            if TOKENS in entry:
                entry[TOKENS].normal_(generator=torch.Generator().manual_seed(5))
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"], **_kw(spec)))
    peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(params, config))
    return model, config, params, fwd, twin.eval()


def _kw(spec: Any) -> dict[str, Any]:
    return {"trainable_token_indices": spec}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_padding_row_gets_no_gradient_as_in_peft() -> None:
    model = EmbNet(vocab=20, dim=8, padding_idx=3).double()
    spec = {"emb": [3, 4]}
    _, config, params, fwd, twin = _setup_dict_custom(model, spec)
    x = torch.tensor([[3, 4, 5, 3], [4, 1, 2, 3]])
    out, ref = fwd(params, x), twin(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.func.grad(lambda p: fwd(p, x).square().sum())(params)["emb"][TOKENS]
    ref.square().sum().backward()
    theirs = dict(twin.named_parameters())[f"base_model.model.emb.token_adapter.{TOKENS}.default"].grad
    torch.testing.assert_close(grad, theirs, rtol=1e-9, atol=1e-12)
    assert grad[0].abs().max() == 0 and grad[1].abs().max() > 0


def _setup_dict_custom(model: nn.Module, spec: dict[str, list[int]]):
    config = fp.LoraConfig(target_modules=["lin"], trainable_token_indices=spec)
    params, fwd = fp.adapt(model, config)
    with torch.no_grad():
        params["emb"][TOKENS].normal_(generator=torch.Generator().manual_seed(5))
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["lin"], **_kw(spec)))
    peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(params, config))
    return model, config, params, fwd, twin.eval()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_resized_vocabulary_trains_the_new_rows() -> None:
    model = tiny_gpt2().double()
    model.resize_token_embeddings(104)
    new = [100, 101, 102, 103]
    config = fp.LoraConfig(target_modules=["c_attn"], trainable_token_indices=new)
    params, fwd = fp.adapt(model, config)
    x = torch.tensor([[100, 5, 103, 7]])
    torch.testing.assert_close(fwd(params, x).logits, model(x).logits, rtol=1e-12, atol=1e-12)
    grad = torch.func.grad(lambda p: fwd(p, x).logits.square().sum())(params)["transformer.wte"][TOKENS]
    assert grad.shape == (4, 32) and grad.abs().amax(-1).gt(0).all()  # the tied head gives every new row a gradient
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["c_attn"], **_kw(new)))
    twin.eval()
    with torch.no_grad():
        params["transformer.wte"][TOKENS].normal_()
    peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(params, config))
    torch.testing.assert_close(fwd(params, x).logits, twin(x).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_compiled_forward_equals_eager() -> None:
    model = tied_llama()
    config = fp.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS)
    params, fwd = fp.adapt(model, config)
    with torch.no_grad():
        params["model.embed_tokens"][TOKENS].normal_(generator=torch.Generator().manual_seed(0))
    x = _ids()
    compiled = torch.compile(fwd, fullgraph=True)
    torch.testing.assert_close(compiled(params, x).logits, fwd(params, x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_generate_equals_peft() -> None:
    model, _, params, fwd, twin = _setup(tiny_gpt2, ["c_attn"])
    x = _ids()[:2, :5]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    ours = fwd.generate(params, x, **kw)
    assert torch.equal(ours, twin.generate(input_ids=x, **kw))
    assert not torch.equal(ours, model.generate(x, **kw))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_inspect_describes_the_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from funcpeft.__main__ import main

    _, config, params, _, _ = _setup(tiny_gpt2, ["c_attn"])
    fp.save(tmp_path, params, config)
    assert main(["inspect", str(tmp_path)]) == 0
    assert f"{len(IDS)} trainable token rows of transformer.wte" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["trainable_tokens"] == {"transformer.wte": len(IDS)} and facts["trainable_token_indices"] == IDS
    assert "transformer.wte" in facts["targets"] and "transformer.wte" not in facts["ranks"]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_half_precision_table_keeps_float32_rows_as_peft() -> None:
    model = tied_llama().to(torch.bfloat16)
    config = fp.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDS)
    params, fwd = fp.adapt(model, config)
    assert params["model.embed_tokens"][TOKENS].dtype == torch.float32
    with torch.no_grad():
        params["model.embed_tokens"][TOKENS].normal_(generator=torch.Generator().manual_seed(0))
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"], **_kw(IDS))).eval()
    theirs = dict(twin.named_parameters())[_peft_key("model.embed_tokens", TOKENS)]
    assert theirs.dtype == torch.float32
    peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(params, config))
    x = _ids()
    ours, theirs = fwd(params, x).logits, twin(x).logits
    torch.testing.assert_close(ours, theirs, rtol=0.02, atol=0.02)  # bfloat16 rounding (the head's columns)
    keep = [i for i in range(ours.shape[-1]) if i not in IDS]  # the other tokens' logits: exactly PEFT's
    torch.testing.assert_close(ours[..., keep], theirs[..., keep], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_default_lora_targets_round_trip(tmp_path: Path) -> None:
    model = tiny_llama().double()
    config = fp.LoraConfig(trainable_token_indices=IDS)  # PEFT's default LoRA targets for llama: q_proj, v_proj
    params, fwd = fp.adapt(model, config)
    fp.save(tmp_path, params, config)
    back, back_config = fp.load(tmp_path)
    assert "model.embed_tokens" not in back_config.target_modules  # recorded LoRA targets only
    _, fwd2 = fp.adapt(model, back_config)
    x = _ids()
    torch.testing.assert_close(fwd2(back, x).logits, fwd(params, x).logits, rtol=0, atol=0)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    torch.testing.assert_close(loaded(x).logits, fwd(params, x).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_sparse_gradients_in_a_mixed_batch() -> None:
    model = tiny_gpt2().double()
    config = fp.LoraConfig(target_modules=["c_attn"], init_lora_weights=False, trainable_token_indices=IDS)
    _, fwd = fp.adapt(model, config)
    stacked = fp.stack([fwd.init(torch.Generator().manual_seed(k)) for k in range(3)])
    x, ids = _ids(), torch.tensor([2, -1, 2])
    dense = torch.autograd.grad(fwd(stacked, x, adapter_ids=ids).logits.sum(), stacked["transformer.wte"][TOKENS])[0]
    sparse = torch.autograd.grad(
        fwd(stacked, x, adapter_ids=ids, sparse_grad=True).logits.sum(), stacked["transformer.wte"][TOKENS]
    )[0]
    assert sparse.is_sparse and sparse._indices().tolist() == [[2]]
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_combine_refuses_token_adapters_and_base_bind_work() -> None:
    model, config, params, fwd, _ = _setup(tiny_gpt2, ["c_attn"])
    with pytest.raises(ValueError, match="fresh token rows"):
        fp.combine([params, params], [0.5, 0.5], config, method="linear")
    x = _ids()
    base = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: one name
    torch.testing.assert_close(fwd(params, x, base=base).logits, fwd(params, x).logits, rtol=0, atol=0)
    bound = fwd.bind(params)
    torch.testing.assert_close(bound(x).logits, fwd(params, x).logits, rtol=0, atol=0)
    assert any(p is params["transformer.wte"][TOKENS] for p in bound.parameters())


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_mixed_generate_and_activation_checkpointing() -> None:
    model = tied_llama().double()
    config = fp.LoraConfig(target_modules=["q_proj"], init_lora_weights=False, trainable_token_indices=IDS)
    _, fwd = fp.adapt(model, config)
    adapters = [fwd.init(torch.Generator().manual_seed(k)) for k in range(2)]
    for k, p in enumerate(adapters):
        with torch.no_grad():
            p["model.embed_tokens"][TOKENS].normal_(generator=torch.Generator().manual_seed(20 + k))
    x, ids = _ids()[:, :5], torch.tensor([1, -1, 0])
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "num_beams": 2}
    mixed = fwd.generate(fp.stack(adapters), x, adapter_ids=ids, **kw)
    for row, k in enumerate(ids.tolist()):
        assert torch.equal(mixed[row], fwd.generate(adapters[k] if k >= 0 else None, x[row : row + 1], **kw)[0])
    # activation checkpointing: plain backward gives the gradients of the run without it
    params = adapters[0]
    plain = torch.autograd.grad(fwd(params, x).logits.square().sum(), params["model.embed_tokens"][TOKENS])[0]
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss = fwd(params, x).logits.square().sum()
    checkpointed = torch.autograd.grad(loss, params["model.embed_tokens"][TOKENS])[0]
    torch.testing.assert_close(checkpointed, plain, rtol=1e-10, atol=1e-10)
