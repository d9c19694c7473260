"""Hostile review of serving: ``fwd.generate`` / ``fwd.method("generate")`` on mixed batches against PEFT's
``generate(adapter_names=...)``, and misuse of ``adapter_ids`` that must fail clearly rather than deep in a layer."""

from __future__ import annotations

import copy
import threading
from functools import partial

import pytest
import torch
from _models import MLP, oracle, tiny_gpt2, tiny_llama, tiny_t5, token_ids

import funcpeft as fp

peft = oracle("peft")
transformers = oracle("transformers")

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning",
    "ignore::funcpeft.FuncpeftWarning",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",  # PEFT's, not ours
)

LLAMA = ["q_proj", "v_proj", "down_proj"]
BEAMS = {"do_sample": False, "num_beams": 3, "num_return_sequences": 2}


def _setup(factory=tiny_llama, targets=LLAMA, n: int = 3, dtype: torch.dtype | None = None):
    """A model, its ``fwd``, ``n`` random adapters (scaled up so they change the tokens) and a PEFT twin holding
    them as ``a0``, ``a1``, ..."""
    model = factory() if dtype is None else factory().to(dtype)
    kw = {"target_modules": targets}
    _, fwd = fp.adapt(model, fp.LoraConfig(**kw, init_lora_weights=False))
    with torch.no_grad():
        adapters = [
            {p: {n: (t * 3).requires_grad_(True) for n, t in e.items()} for p, e in fwd.init(g).items()}
            for g in (torch.Generator().manual_seed(s) for s in range(n))
        ]
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw), adapter_name="a0")
    for i in range(1, n):
        twin.add_adapter(f"a{i}", peft.LoraConfig(**kw))
    for i, adapter in enumerate(adapters):
        peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(adapter, fp.LoraConfig(**kw)), adapter_name=f"a{i}")
    return model, fwd, adapters, twin.eval()


def _names(ids: torch.Tensor) -> list[str]:
    return [f"a{k}" if k >= 0 else "__base__" for k in ids.tolist()]


def _gen(call, ids, **kw):
    torch.manual_seed(0)
    return call(ids, pad_token_id=0, max_new_tokens=5, **kw)


def _peft(twin, ids, **kw):
    return twin.generate(input_ids=ids, **kw)


# ----- bugs found ---------------------------------------------------------------------------------------------------
def test_method_generate_keeps_each_prompt_rows_adapter_across_beams_as_fwd_generate() -> None:
    """``fwd.method("generate")`` is ``fwd.generate`` (the contract): it raised on the rows beams expand to."""
    model, fwd, adapters, twin = _setup()
    stacked, ids, adapter_ids = fp.stack(adapters), token_ids(batch=3, length=5), torch.tensor([2, -1, 0])
    kw = {"attention_mask": torch.ones_like(ids), **BEAMS}
    ours = _gen(partial(fwd.method("generate"), stacked, adapter_ids=adapter_ids), ids, **kw)
    assert torch.equal(ours, _gen(partial(fwd.generate, stacked, adapter_ids=adapter_ids), ids, **kw))
    assert torch.equal(ours, _gen(partial(_peft, twin, adapter_names=_names(adapter_ids)), ids, **kw))
    assert not torch.equal(ours, _gen(model.generate, ids, **kw)), "the adapters must matter"
    # a single adapter through fwd.method("generate") is still PEFT's generate
    twin.set_adapter("a1")
    assert torch.equal(
        _gen(partial(fwd.method("generate"), adapters[1]), ids, **kw), _gen(partial(_peft, twin), ids, **kw)
    )


def test_adapter_ids_on_another_device_than_the_stack_are_refused_by_name() -> None:
    """CPU ids for adapters elsewhere (as `torch.tensor([...])` for a model on an accelerator) failed deep inside the
    first adapted layer with torch's own device error. A meta model stands for the accelerator on a CPU machine."""
    model = tiny_gpt2().to("meta")
    _, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["c_attn"]))
    stacked, prompts = fp.stack([fwd.init(), fwd.init()]), torch.zeros(2, 3, dtype=torch.long, device="meta")
    refused = r"`adapter_ids` is on device cpu, but the stacked params are on meta.*adapter_ids\.to\('meta'\)"
    with pytest.raises(ValueError, match=refused):
        fwd.generate(stacked, prompts, adapter_ids=torch.tensor([0, 1]), max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match=refused):
        fwd(stacked, prompts, adapter_ids=torch.tensor([0, 1]))
    assert fwd(stacked, prompts, adapter_ids=torch.tensor([0, 1], device="meta")).logits.shape == (2, 3, 100)
    configs = [fp.LoraConfig(r=2, target_modules=["lin0"]), fp.LoraConfig(r=4, target_modules=["lin1"])]
    hetero_stacked, hetero = fp.adapt(MLP().to("meta"), configs)
    with pytest.raises(ValueError, match=refused):
        hetero(hetero_stacked, torch.randn(3, 10, device="meta"), adapter_ids=torch.tensor([0, 1, -1]))


def test_peft_adapter_names_is_refused_with_the_adapter_ids_spelling() -> None:
    """PEFT's ``adapter_names=`` reached transformers (an unused-kwarg error) or the validator (a shape error)."""
    _, fwd, adapters, _ = _setup(n=2)
    ids = token_ids(batch=2, length=5)
    for params in (adapters[0], fp.stack(adapters)):
        with pytest.raises(TypeError, match=r"`adapter_names=\['a0', '__base__'\]`.*`adapter_ids`.*torch.tensor"):
            fwd.generate(params, ids, adapter_names=["a0", "__base__"], max_new_tokens=2, pad_token_id=0)
    with pytest.raises(TypeError, match=r"adapter_ids"):
        fwd.method("generate")(fp.stack(adapters), ids, adapter_names=["a0", "a1"], max_new_tokens=2)


# ----- hostile cases that were already right --------------------------------------------------------------------------
def test_mixed_generate_with_left_padding_beams_and_no_cache_equals_peft() -> None:
    model, fwd, adapters, twin = _setup()
    stacked, ids, adapter_ids = fp.stack(adapters), token_ids(batch=4, length=6), torch.tensor([2, -1, 0, 2])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :3] = 0
    for mode in ({"do_sample": False}, BEAMS, {"do_sample": False, "num_beams": 2, "use_cache": False}):
        kw = {"attention_mask": mask, **mode}
        ours = _gen(partial(fwd.generate, stacked, adapter_ids=adapter_ids), ids, **kw)
        assert torch.equal(ours, _gen(partial(_peft, twin, adapter_names=_names(adapter_ids)), ids, **kw)), mode


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_generate_on_a_half_precision_model_equals_peft(dtype: torch.dtype) -> None:
    model, fwd, adapters, twin = _setup(dtype=dtype)
    stacked, ids, adapter_ids = fp.stack(adapters), token_ids(batch=4, length=5), torch.tensor([2, -1, 0, 1])
    kw = {"attention_mask": torch.ones_like(ids), "do_sample": False}
    ours = _gen(partial(fwd.generate, stacked, adapter_ids=adapter_ids), ids, **kw)
    assert torch.equal(ours, _gen(partial(_peft, twin, adapter_names=_names(adapter_ids)), ids, **kw))


def test_every_row_base_the_same_adapter_twice_and_narrow_id_dtypes() -> None:
    model, fwd, adapters, _ = _setup(factory=tiny_gpt2, targets=["c_attn", "c_fc"], n=2)
    ids = token_ids(batch=3, length=5)
    kw = {"attention_mask": torch.ones_like(ids), **BEAMS}
    all_base = _gen(partial(fwd.generate, fp.stack(adapters), adapter_ids=torch.full((3,), -1)), ids, **kw)
    assert torch.equal(all_base, _gen(model.generate, ids, **kw))
    twice = fp.stack([adapters[1], adapters[1]])
    alone = _gen(partial(fwd.generate, adapters[1]), ids, **kw)
    assert not torch.equal(alone, all_base)
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.int8):
        adapter_ids = torch.tensor([0, 1, 1], dtype=dtype)
        assert torch.equal(_gen(partial(fwd.generate, twice, adapter_ids=adapter_ids), ids, **kw), alone), dtype


def test_one_and_zero_new_tokens_as_peft() -> None:
    _, fwd, adapters, twin = _setup(n=2)
    stacked, ids, adapter_ids = fp.stack(adapters), token_ids(batch=2, length=5), torch.tensor([1, -1])
    kw = {"attention_mask": torch.ones_like(ids), "pad_token_id": 0, **BEAMS}
    ours = fwd.generate(stacked, ids, adapter_ids=adapter_ids, max_new_tokens=1, **kw)
    assert ours.shape == (4, 6)
    assert torch.equal(ours, twin.generate(input_ids=ids, adapter_names=_names(adapter_ids), max_new_tokens=1, **kw))
    with pytest.raises(ValueError, match="`max_new_tokens` must be greater than 0"):  # transformers' own refusal
        fwd.generate(stacked, ids, adapter_ids=adapter_ids, max_new_tokens=0, **kw)


def test_threads_generating_different_mixed_batches_each_get_their_own_rows() -> None:
    model, fwd, adapters, _ = _setup(n=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stacked, ids = fp.stack(adapters), token_ids(batch=4, length=5)
    cases = [torch.tensor([2, -1, 0, 2]), torch.tensor([0, 1, -1, 1]), torch.tensor([-1, -1, 2, 0])]
    kw = {"attention_mask": torch.ones_like(ids), "pad_token_id": 0, "max_new_tokens": 4, "num_beams": 2}
    expected = [fwd.generate(stacked, ids, adapter_ids=c, **kw) for c in cases]
    assert len({tuple(e.flatten().tolist()) for e in expected}) == 3, "the cases must generate different tokens"
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(3)}

    def work(i: int) -> None:
        for _ in range(2):
            results[i].append(fwd.generate(stacked, ids, adapter_ids=cases[i], **kw))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(results[i]) == 2 and all(torch.equal(r, expected[i]) for r in results[i]) for i in range(3))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_heterogeneous_t5_generate_with_return_sequences_equals_each_adapter_alone() -> None:
    model = tiny_t5()
    targets = ["q", "v", "wo", "shared"]
    configs = [
        fp.LoraConfig(r=2, target_modules=targets[:1], init_lora_weights=False),
        fp.LoraConfig(r=8, lora_alpha=32, target_modules=targets[1:], init_lora_weights=False),
        fp.LoraConfig(r=6, target_modules=targets[:3], use_dora=True, init_lora_weights=False),
        fp.LoraConfig(r=3, target_modules=targets[1:3], lora_bias=True, init_lora_weights=False),
    ]
    stacked, fwd = fp.adapt(model, configs)
    with torch.no_grad():
        stacked = {p: {n: t * 3 for n, t in e.items()} for p, e in stacked.items()}
    own = fwd.unstack(stacked)
    ids, adapter_ids = token_ids(batch=5, length=5), torch.tensor([3, 2, -1, 0, 1])
    kw = {"max_new_tokens": 5, **BEAMS}
    ours = fwd.method("generate")(stacked, ids, adapter_ids=adapter_ids, **kw)
    changed = False
    for i, k in enumerate(adapter_ids.tolist()):
        if k < 0:
            alone = model.generate(ids[i : i + 1], **kw)
        else:
            alone = fp.adapt(model, configs[k])[1].generate(own[k], ids[i : i + 1], **kw)
            changed |= not torch.equal(alone, model.generate(ids[i : i + 1], **kw))
        assert torch.equal(ours[2 * i : 2 * i + 2, : alone.shape[1]], alone), (i, k)
    assert changed, "the adapters must matter"


def test_dora_mixed_generate_computes_each_layers_scale_once_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """DoRA's per-adapter norm was recomputed at every decode step and each result kept until generate returned
    (memory and work growing with the tokens); now once per layer per call, with the same tokens."""
    import funcpeft.core as core

    model = tiny_llama()
    config = fp.LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    _, fwd = fp.adapt(model, config)
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(2)]
    with torch.no_grad():
        for adapter in adapters:
            for entry in adapter.values():
                entry["lora_B"].mul_(3)
    stacked, prompts, ids = fp.stack(adapters), token_ids(batch=3, length=4), torch.tensor([1, -1, 0])
    seen, select = [], core.select  # every mixed call's rows, to read their per-call caches
    monkeypatch.setattr(core, "select", lambda *a, **k: seen.append(select(*a, **k)) or seen[-1])

    def cached() -> int:  # what the call keeps alive until it returns: its caches' entries
        caches, count = [r.cache for r in seen if r.cache is not None], 0
        while caches:
            cache = caches.pop()
            count += len(cache)
            caches += [v.cache for k, v in cache.items() if k[0] == "rows" and v.cache is not None]
        return count

    counts, tokens = [], []
    for new in (2, 8):
        seen.clear()
        tokens.append(fwd.generate(stacked, prompts, adapter_ids=ids, max_new_tokens=new, **BEAMS))
        counts.append(cached())
    assert counts[0] == counts[1], f"entries kept by generate grow with the tokens: {counts}"
    for row, i in enumerate(ids.tolist()):  # each row is its adapter (or the base) alone
        alone = model.generate if i < 0 else partial(fwd.generate, adapters[i])
        expected = alone(prompts[row : row + 1], max_new_tokens=8, **BEAMS)
        assert torch.equal(tokens[1][row * 2 : row * 2 + 2], expected)


def test_mixed_batches_refuse_mixture_of_experts_experts_and_serve_the_rest() -> None:
    """An expert receives the tokens routed to it, flattened across the batch: a routed count equal to (or a multiple
    of) the batch size was taken for the batch's rows, silently giving tokens other rows' adapters."""
    config = transformers.SwitchTransformersConfig(
        vocab_size=100, d_model=16, d_ff=32, d_kv=4, num_layers=2, num_decoder_layers=2, num_heads=2,
        num_experts=2, expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    ids, adapter_ids = token_ids(batch=2, length=5), torch.tensor([0, 1])
    _, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["q", "v", "wi", "wo"], init_lora_weights=False))
    stacked = fp.stack([fwd.init(torch.Generator().manual_seed(s)) for s in range(2)])
    with pytest.raises(ValueError, match=r"target '.*experts\.expert_0\.wi' is an expert of the mixture-of-experts"):
        fwd(stacked, ids, decoder_input_ids=ids, adapter_ids=adapter_ids)
    with pytest.raises(ValueError, match=r"mixture-of-experts"):
        fwd.generate(stacked, ids, adapter_ids=adapter_ids, max_new_tokens=2)
    # attention targets only: each row is its own adapter alone
    _, fwd = fp.adapt(model, fp.LoraConfig(target_modules=["q", "v"], init_lora_weights=False))
    adapters = [fwd.init(torch.Generator().manual_seed(s)) for s in range(2)]
    mixed = fwd.generate(fp.stack(adapters), ids, adapter_ids=adapter_ids, max_new_tokens=3, do_sample=False)
    for row in range(2):
        alone = fwd.generate(adapters[row], ids[row : row + 1], max_new_tokens=3, do_sample=False)
        assert torch.equal(mixed[row : row + 1, : alone.shape[1]], alone)


def test_peft_adapter_names_in_a_forward_is_refused_not_ignored() -> None:
    """Llama's forward takes **kwargs: PEFT's `adapter_names=` reached it and was ignored, so every row ran with the
    one tree given, silently."""
    _, fwd, adapters, _ = _setup(n=2)
    ids = token_ids(batch=2, length=5)
    with pytest.raises(TypeError, match=r"^fwd got PEFT's `adapter_names=\['a0', 'a1'\]`.*adapter_ids"):
        fwd(adapters[0], ids, adapter_names=["a0", "a1"])
    with pytest.raises(TypeError, match=r"^fwd got PEFT's `adapter_names="):
        fwd.bind(adapters[0])(ids, adapter_names=["a0", "a1"])


def test_adapter_names_with_a_stacked_tree_is_refused_before_the_trees_check() -> None:
    """The PEFT-porting call (a stacked tree, `adapter_names=`, no `adapter_ids`) got the validator's shape error
    about the stacked leading dim: the refusal ran only after the tree's check."""
    params, fwd = fp.adapt(MLP(), fp.LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    stacked, x = fp.stack([params, params]), torch.randn(5, 10)
    for call in (fwd, fwd.method("forward"), fwd.bind(stacked), fwd.compile(backend="eager")):
        args = (x,) if isinstance(call, torch.nn.Module) else (stacked, x)
        with pytest.raises(TypeError, match=r"PEFT's `adapter_names=.*adapter_ids"):
            call(*args, adapter_names=["a", "b", "a", "b", "__base__"])
