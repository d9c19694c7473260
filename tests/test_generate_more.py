"""More of ``fwd.generate`` against PEFT's generate: AdaLoRA (one adapter, beams, a mixed batch), streamers,
stopping criteria, the KV cache on and off, scores and logits, and sampled mixed batches with several sequences per
prompt. Every test also checks that the adapter changes the tokens, so none can pass with the adapter ignored."""

from __future__ import annotations

import copy
import re
import warnings
from functools import partial

import pytest
import torch
from _models import oracle, tiny_gpt2, tiny_llama, token_ids

import funcpeft as fp

transformers = oracle("transformers")
peft = oracle("peft")

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",  # PEFT's, not ours
)

MODELS = {"gpt2": (tiny_gpt2, ["c_attn", "c_fc"]), "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"])}
MODES = {
    "greedy": {"do_sample": False},
    "beams": {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
    "sample": {"do_sample": True, "top_k": 20},
}
PROMPT = 5


def _configs(method: str, targets: list[str]):
    if method == "adalora":
        kw = {"init_r": 4, "target_r": 2, "total_step": 10, "lora_alpha": 6, "target_modules": targets}
        return fp.AdaLoraConfig, peft.AdaLoraConfig, kw
    return fp.LoraConfig, peft.LoraConfig, {"target_modules": targets}


def _setup(name: str, method: str = "lora", n: int = 1):
    """The model, ``fwd``, ``n`` random adapters and a PEFT twin holding them as ``a0``, ``a1``, ..."""
    factory, targets = MODELS[name]
    model = factory()
    config_cls, peft_cls, kw = _configs(method, targets)
    _, fwd = fp.adapt(model, config_cls(**kw, init_lora_weights=False))  # random A, B (and AdaLoRA's E)
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(n)]
    # inference_mode: PEFT's AdaLoraModel refuses a second *trainable* adapter
    twin = peft.get_peft_model(copy.deepcopy(model), peft_cls(**kw, inference_mode=True), adapter_name="a0")
    for i in range(1, n):
        twin.add_adapter(f"a{i}", peft_cls(**kw, inference_mode=True))
    for i, adapter in enumerate(adapters):
        state = fp.to_peft_state_dict(adapter, config_cls(**kw))
        loaded = peft.set_peft_model_state_dict(twin, state, adapter_name=f"a{i}")
        assert not loaded.unexpected_keys
        assert not [k for k in loaded.missing_keys if re.search(rf"\.lora_[ABE]\.a{i}(\.weight)?$", k)]
    twin.set_adapter("a0")
    return model, fwd, adapters, twin.eval()


def _gen(call, ids, seed: int = 0, max_new_tokens: int = 6, **kw):
    torch.manual_seed(seed)
    return call(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, max_new_tokens=max_new_tokens, **kw)


def _peft(twin, ids, **kw):
    return twin.generate(input_ids=ids, **kw)


# ----- AdaLoRA ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["greedy", "beams"])
@pytest.mark.parametrize("name", list(MODELS))
def test_adalora_generate_equals_peft_token_for_token(name: str, mode: str) -> None:
    model, fwd, (params,), twin = _setup(name, "adalora")
    assert all(entry["lora_E"].abs().min() > 0 for entry in params.values()), "E must be random, not zero"
    ids = token_ids(batch=2, length=PROMPT)
    ours = _gen(partial(fwd.generate, params), ids, **MODES[mode])
    assert torch.equal(ours, _gen(partial(_peft, twin), ids, **MODES[mode]))
    assert not torch.equal(ours, _gen(model.generate, ids, **MODES[mode])), "the adapter must matter"


@pytest.mark.parametrize("mode", ["greedy", "beams"])
@pytest.mark.parametrize("name", list(MODELS))
def test_mixed_adalora_batch_rows_equal_peft_with_each_rows_adapter(name: str, mode: str) -> None:
    model, fwd, adapters, twin = _setup(name, "adalora", n=2)
    ids = token_ids(batch=1, length=PROMPT).repeat(3, 1)  # one prompt: the rows differ by their adapter only
    names = ["a0", "a1", "__base__"]
    ours = _gen(partial(fwd.generate, fp.stack(adapters), adapter_ids=torch.tensor([0, 1, -1])), ids, **MODES[mode])
    # PEFT 0.21 refuses adapter_names for AdaLoRA (its SVD layers pass the keyword on to the base layer:
    # "TypeError: Conv1D.forward() got an unexpected keyword argument 'adapter_names'") and then leaves its hooks on
    # the model, so it tries on a copy; compared if it ever accepts.
    try:
        theirs = _gen(partial(_peft, copy.deepcopy(twin), adapter_names=names), ids, **MODES[mode])
    except (TypeError, ValueError):
        theirs = None
    if theirs is not None:
        assert torch.equal(ours, theirs)
    per = MODES[mode].get("num_return_sequences", 1)
    rows = []
    for row, adapter in enumerate(names):  # each row alone against PEFT with that row's adapter active
        if adapter == "__base__":
            with twin.disable_adapter():
                alone = _gen(partial(_peft, twin), ids[row : row + 1], **MODES[mode])
        else:
            twin.set_adapter(adapter)
            alone = _gen(partial(_peft, twin), ids[row : row + 1], **MODES[mode])
        mine = ours[row * per : (row + 1) * per]
        assert torch.equal(mine[:, : alone.shape[1]], alone), f"row {row} ({adapter})"
        assert (mine[:, alone.shape[1] :] == 0).all()  # a row that ended early is padded
        rows.append(mine)
    assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[0], rows[2]) and not torch.equal(rows[1], rows[2])


# ----- streamers ----------------------------------------------------------------------------------------------------
class Collect(transformers.generation.streamers.BaseStreamer):
    """Keeps every tensor ``generate`` puts: the prompt first, then one token per row and step."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.detach().clone())

    def end(self) -> None:
        self.ended += 1

    def tokens(self, batch: int) -> torch.Tensor:
        return torch.cat([c.reshape(batch, -1) for c in self.chunks], dim=1)


@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize(("name", "method"), [("gpt2", "lora"), ("llama", "adalora")])
def test_a_streamer_receives_exactly_the_returned_tokens_as_with_peft(name: str, method: str, mode: str) -> None:
    model, fwd, (params,), twin = _setup(name, method)
    ids = token_ids(batch=2, length=PROMPT)
    ours_streamer, theirs_streamer, base_streamer = Collect(), Collect(), Collect()
    ours = _gen(partial(fwd.generate, params), ids, streamer=ours_streamer, **MODES[mode])
    theirs = _gen(partial(_peft, twin), ids, streamer=theirs_streamer, **MODES[mode])
    base = _gen(model.generate, ids, streamer=base_streamer, **MODES[mode])
    assert torch.equal(ours, theirs) and not torch.equal(ours, base)
    assert ours_streamer.ended == theirs_streamer.ended == 1
    assert torch.equal(ours_streamer.tokens(2), ours)
    assert torch.equal(theirs_streamer.tokens(2), ours)
    assert torch.equal(base_streamer.tokens(2), base)


# ----- stopping criteria --------------------------------------------------------------------------------------------
class StopAt(transformers.StoppingCriteria):
    """Stops the whole batch once any row has generated ``token``."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        hit = bool((input_ids[:, PROMPT:] == self.token).any())
        return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("criterion", ["token", "max_length"])
@pytest.mark.parametrize(("name", "method"), [("gpt2", "adalora"), ("llama", "lora")])
def test_stopping_criteria_stop_early_as_with_peft(name: str, method: str, criterion: str) -> None:
    model, fwd, (params,), twin = _setup(name, method)
    ids = token_ids(batch=2, length=PROMPT)
    full = _gen(partial(fwd.generate, params), ids, max_new_tokens=8, do_sample=False)
    assert full.shape[1] == PROMPT + 8
    new = full[:, PROMPT:]
    if criterion == "token":
        token = int(new[0, 2])  # a token the adapted greedy output has: the batch stops where it first appears
        stop = next(j for j in range(8) if (new[:, j] == token).any()) + 1
        criteria = transformers.StoppingCriteriaList([StopAt(token)])
    else:
        stop = 3
        criteria = transformers.StoppingCriteriaList([transformers.MaxLengthCriteria(max_length=PROMPT + stop)])
    kw = {"stopping_criteria": criteria, "max_new_tokens": 8, "do_sample": False}
    ours = _gen(partial(fwd.generate, params), ids, **kw)
    assert ours.shape[1] == PROMPT + stop < PROMPT + 8
    assert torch.equal(ours, full[:, : PROMPT + stop])
    assert torch.equal(ours, _gen(partial(_peft, twin), ids, **kw))
    assert not torch.equal(full, _gen(model.generate, ids, max_new_tokens=8, do_sample=False))


# ----- the KV cache, scores and logits ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["greedy", "beams"])
@pytest.mark.parametrize(("name", "method"), [("gpt2", "lora"), ("llama", "lora"), ("llama", "adalora")])
def test_cache_off_on_and_an_explicit_cache_give_the_same_tokens(name: str, method: str, mode: str) -> None:
    model, fwd, (params,), twin = _setup(name, method)
    ids = token_ids(batch=2, length=PROMPT)
    run = partial(_gen, partial(fwd.generate, params), ids, **MODES[mode])
    cached = run(use_cache=True)
    assert torch.equal(run(use_cache=False), cached)
    if mode == "greedy":  # a cache passed in (transformers 5 names it `cache`, `past_key_values` is deprecated)
        for key in ("cache", "past_key_values"):
            given = transformers.DynamicCache(config=model.config)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
                assert torch.equal(run(**{key: given}), cached), key
            assert given.get_seq_length() == PROMPT + 6 - 1, f"{key}: generate did not fill the cache given"
    assert torch.equal(_gen(partial(_peft, twin), ids, use_cache=False, **MODES[mode]), cached)
    assert not torch.equal(cached, _gen(model.generate, ids, use_cache=True, **MODES[mode]))


@pytest.mark.parametrize("mode", ["greedy", "beams", "sample"])
@pytest.mark.parametrize(("name", "method"), [("gpt2", "adalora"), ("llama", "lora")])
def test_scores_and_logits_equal_peft(name: str, method: str, mode: str) -> None:
    model, fwd, (params,), twin = _setup(name, method)
    ids = token_ids(batch=2, length=PROMPT)
    kw = {"return_dict_in_generate": True, "output_scores": True, "output_logits": True, **MODES[mode]}
    ours = _gen(partial(fwd.generate, params), ids, **kw)
    theirs = _gen(partial(_peft, twin), ids, **kw)
    base = _gen(model.generate, ids, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(ours.scores) == len(ours.logits) == 6
    for mine, other in ((ours.scores, theirs.scores), (ours.logits, theirs.logits)):
        for a, b in zip(mine, other, strict=True):
            torch.testing.assert_close(a, b)
    if mode == "beams":
        torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores)
        assert torch.equal(ours.beam_indices, theirs.beam_indices)
    assert not torch.allclose(ours.logits[0], base.logits[0]), "the adapter must matter"


# ----- sampled mixed batches, several sequences per prompt ----------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_sampled_mixed_batch_with_two_sequences_per_prompt_equals_peft_adapter_names(name: str) -> None:
    model, fwd, adapters, twin = _setup(name, n=3)
    ids = token_ids(batch=3, length=PROMPT)
    adapter_ids = torch.tensor([2, -1, 0])
    names = [f"a{k}" if k >= 0 else "__base__" for k in adapter_ids.tolist()]
    kw = {**MODES["sample"], "num_return_sequences": 2}
    ours = _gen(partial(fwd.generate, fp.stack(adapters), adapter_ids=adapter_ids), ids, seed=3, **kw)
    assert ours.shape == (6, PROMPT + 6)
    # PEFT expands adapter_names for num_beams only: for sampled return sequences it takes one name per output row
    expanded = [n for n in names for _ in range(2)]
    assert torch.equal(ours, _gen(partial(_peft, twin, adapter_names=expanded), ids, seed=3, **kw))
    base = _gen(model.generate, ids, seed=3, **kw)
    assert torch.equal(ours[2:4], base[2:4]) and not torch.equal(ours, base)  # only the base row samples as base
