"""``fwd.method`` and ``fwd.generate``: any model method with the adapter bound, token for token PEFT's generate."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from _models import MLP, oracle, tiny_gpt2, tiny_llama, tiny_t5, token_ids

import funcpeft as fp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


MODELS = {
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "t5": (tiny_t5, ["q", "v", "wo"]),
}
MODES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "top_k": 20},
    "beams": {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
}


def _peft_twin(model, config_cls, peft_cls, kw, adapters, names):
    peft = oracle("peft")
    twin = peft.get_peft_model(copy.deepcopy(model), peft_cls(**kw), adapter_name=names[0])
    for name in names[1:]:
        twin.add_adapter(name, peft_cls(**kw))
    for name, adapter in zip(names, adapters, strict=True):
        peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(adapter, config_cls(**kw)), adapter_name=name)
    return twin.eval()


def _setup(name, method="lora", n=1):
    peft = oracle("peft")
    factory, targets = MODELS[name]
    model = factory()
    if method == "lora":
        config_cls, peft_cls, kw, rand = (
            fp.LoraConfig,
            peft.LoraConfig,
            {"target_modules": targets},
            {"init_lora_weights": False},
        )
    else:
        config_cls, peft_cls, kw, rand = fp.IA3Config, peft.IA3Config, {
            "target_modules": targets, "feedforward_modules": targets[-1:]
        }, {"init_ia3_weights": False}  # fmt: skip
    _, fwd = fp.adapt(model, config_cls(**kw, **rand))
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(n)]
    twin = _peft_twin(model, config_cls, peft_cls, kw, adapters, [f"a{i}" for i in range(n)])
    return model, fwd, adapters, twin


def _generate(gen, seed, ids, **kw):
    torch.manual_seed(seed)
    return gen(ids, pad_token_id=0, max_new_tokens=6, **kw)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(MODELS))
def test_generate_equals_peft_token_for_token(name, mode) -> None:
    model, fwd, (params,), twin = _setup(name)
    ids = token_ids(batch=2, length=5)
    ours = _generate(lambda i, **k: fwd.generate(params, i, **k), 0, ids, **MODES[mode])
    theirs = _generate(lambda i, **k: twin.generate(input_ids=i, **k), 0, ids, **MODES[mode])
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, _generate(model.generate, 0, ids, **MODES[mode])), "the adapter must matter"


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_ia3_generate_equals_peft(name) -> None:
    model, fwd, (params,), twin = _setup(name, "ia3")
    ids = token_ids(batch=2, length=5)
    ours = _generate(lambda i, **k: fwd.generate(params, i, **k), 0, ids, **MODES["beams"])
    assert torch.equal(ours, _generate(lambda i, **k: twin.generate(input_ids=i, **k), 0, ids, **MODES["beams"]))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_mixed_generate_keeps_each_prompt_rows_adapter_as_peft_adapter_names(name, mode) -> None:
    model, fwd, adapters, twin = _setup(name, n=3)
    ids = token_ids(batch=4, length=5)
    adapter_ids = torch.tensor([2, -1, 0, 2])
    names = [f"a{k}" if k >= 0 else "__base__" for k in adapter_ids.tolist()]
    stacked = fp.stack(adapters)
    ours = _generate(lambda i, **k: fwd.generate(stacked, i, adapter_ids=adapter_ids, **k), 0, ids, **MODES[mode])
    theirs = _generate(lambda i, **k: twin.generate(input_ids=i, adapter_names=names, **k), 0, ids, **MODES[mode])
    assert torch.equal(ours, theirs)
    if mode != "sample":  # each row alone, with its own adapter, generates the same tokens
        per = MODES[mode].get("num_return_sequences", 1)
        for row, k in enumerate(adapter_ids.tolist()):
            alone = _generate(lambda i, k=k, **kw: fwd.generate(adapters[k] if k >= 0 else None, i, **kw), 0,
                              ids[row : row + 1], **MODES[mode])  # fmt: skip
            assert torch.equal(ours[row * per : (row + 1) * per, : alone.shape[1]], alone)


def test_generate_with_left_padding_and_a_cache_equals_peft() -> None:
    model, fwd, (params,), twin = _setup("llama")
    ids = token_ids(batch=2, length=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = {"attention_mask": mask, "use_cache": True, **MODES["greedy"]}
    ours = _generate(lambda i, **k: fwd.generate(params, i, **k), 0, ids, **kw)
    assert torch.equal(ours, _generate(lambda i, **k: twin.generate(input_ids=i, **k), 0, ids, **kw))


def test_generate_leaves_the_model_untouched_and_threads_see_their_own_adapter() -> None:
    model, fwd, adapters, _ = _setup("gpt2", n=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = token_ids(batch=1, length=5)
    expected = [_generate(lambda i, a=a, **k: fwd.generate(a, i, **k), 0, ids) for a in adapters]
    results: dict[int, list] = {0: [], 1: []}

    def work(i: int) -> None:
        for _ in range(3):
            results[i].append(fwd.generate(adapters[i], ids, pad_token_id=0, max_new_tokens=6, do_sample=False))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert all(torch.equal(r, expected[i]) for r in results[i])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_generate_refuses_adapter_ids_that_do_not_match_the_prompt_batch() -> None:
    model, fwd, adapters, _ = _setup("gpt2", n=2)
    with pytest.raises(ValueError, match="`adapter_ids` has 3 entries, but the prompt batch has 2 rows"):
        fwd.generate(fp.stack(adapters), token_ids(batch=2), adapter_ids=torch.tensor([0, 1, 0]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fwd.generate(fp.stack(adapters), token_ids(batch=2), adapter_ids=torch.tensor([0, 2]), max_new_tokens=2)
    _, plain = fp.adapt(MLP(), fp.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(AttributeError, match="MLP has no `generate`"):
        plain.generate(plain.init(), torch.randn(1, 10))


def test_method_runs_any_model_method_and_functions_with_the_adapter() -> None:
    model, fwd, (params,), twin = _setup("t5")
    ids = token_ids(batch=2, length=5)
    encode = fwd.method(lambda m, x: m.get_encoder()(input_ids=x).last_hidden_state)
    torch.testing.assert_close(encode(params, ids), twin.get_encoder()(input_ids=ids).last_hidden_state)
    logits = fwd.method("forward")(params, input_ids=ids, decoder_input_ids=ids[:, :2]).logits
    torch.testing.assert_close(logits, fwd(params, input_ids=ids, decoder_input_ids=ids[:, :2]).logits)
    with pytest.raises(AttributeError, match="T5ForConditionalGeneration has no attribute 'get_text_features'"):
        fwd.method("get_text_features")
    with pytest.raises(TypeError, match="method name"):
        fwd.method(3)
    escaped = fwd.method("get_encoder")(params)
    with pytest.raises(RuntimeError, match="called outside any fwd call"):
        escaped(input_ids=ids)


def test_method_composes_with_torch_func_grad() -> None:
    model, fwd, (params,), twin = _setup("t5")
    ids = token_ids(batch=1, length=4)
    encode = fwd.method(lambda m, x: m.get_encoder()(input_ids=x).last_hidden_state.sum())
    grads = torch.func.grad(encode)(params, ids)
    encode(params, ids).backward()
    for path, entry in params.items():
        for name, leaf in entry.items():
            expected = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad  # decoder-only: no gradient
            torch.testing.assert_close(grads[path][name], expected)
