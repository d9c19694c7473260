"""``fwd(params, *args, base=...)``: the base as a pytree, read instead of the model's own tensors for one call.

The reference is ``torch.func.functional_call`` of the model on the merged state: the adapter folded (with
``fwd.merge`` of a copy of the model holding the base tensors, or with LoRA's W + s BA where gradients must flow
through the merge) into the same base tensors.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from _models import MLP, tiny_gpt2, tiny_llama, token_ids
from torch.func import functional_call

import funcpeft as fp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = {"mlp": ["lin0", "lin1"], "gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if name == "mlp":
        torch.manual_seed(0)
        return MLP().eval(), torch.randn(3, 10)
    return (tiny_gpt2() if name == "gpt2" else tiny_llama()), token_ids()


def logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def random_adapter(params, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {
        p: {n: (torch.randn(t.shape, generator=g) * 0.3).requires_grad_(True) for n, t in e.items()}
        for p, e in params.items()
    }


def perturbed(model, seed: int, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """Another checkpoint of the same architecture: every floating tensor for which ``keep(name)`` holds, moved."""
    g = torch.Generator().manual_seed(seed)
    state, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if keep(name) and t.is_floating_point() and id(t) not in seen:  # a tied tensor under its first name only
            seen.add(id(t))
            state[name] = t.detach() + torch.randn(t.shape, generator=g) * 0.2
    return state


def merged_reference(model, config, params, base, *args):
    """functional_call of the model with the adapter merged into ``base`` (fwd.merge of a copy loaded with it)."""
    twin = copy.deepcopy(model)
    twin.load_state_dict(base, strict=False)
    _, fwd2 = fp.adapt(twin, config)
    with torch.no_grad():
        return logits(functional_call(model, fwd2.merge(params), args, tie_weights=False))


@pytest.mark.parametrize("name", ["mlp", "gpt2", "llama"])
@pytest.mark.parametrize("part", ["all", "some"])
def test_equals_functional_call_on_merged(name, part):
    model, x = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = fp.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name])
    params, fwd = fp.adapt(model, config)
    params = random_adapter(params)
    # "some": only the first block's tensors (and, for GPT-2, the tied embedding under one of its names)
    keep = (lambda n: True) if part == "all" else (lambda n: ".0." in n or n.startswith("lin0") or "wte" in n)
    base = perturbed(model, 2, keep)
    with torch.no_grad():
        own = logits(fwd(params, x))
        got = logits(fwd(params, x, base=base))
    expected = merged_reference(model, config, params, base, x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, own, atol=1e-3)  # the base was really read
    for k, v in model.state_dict().items():  # the model untouched, and calls without base see it
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        torch.testing.assert_close(logits(fwd(params, x)), own, rtol=0, atol=0)


def lora_merged(model, params, base, scaling):
    """W + scaling * B @ A for every nn.Linear target, differentiable in both ``base`` and ``params``."""
    state = {**{k: v for k, v in model.state_dict().items()}, **base}
    for path, entry in params.items():
        state[f"{path}.weight"] = state[f"{path}.weight"] + scaling * entry["lora_B"] @ entry["lora_A"]
    return state


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_grad_wrt_base_and_adapter(name):
    model, x = build(name)
    config = fp.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name])
    params, fwd = fp.adapt(model, config)
    params = {p: {n: t.detach() for n, t in e.items()} for p, e in random_adapter(params).items()}
    base = perturbed(model, 3)

    def loss(base, params):
        return logits(fwd(params, x, base=base)).square().mean()

    def reference(base, params):
        return logits(functional_call(model, lora_merged(model, params, base, 2.0), (x,))).square().mean()

    got = torch.func.grad(loss, argnums=(0, 1))(base, params)
    expected = torch.func.grad(reference, argnums=(0, 1))(base, params)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in got[0].values())
    # plain autograd too: gradients reach the given base leaves, never the model's own parameters
    leaves = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    loss(leaves, params).backward()
    torch.testing.assert_close({k: v.grad for k, v in leaves.items()}, expected[0], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_vmap_over_base_checkpoints(name):
    model, x = build(name)
    config = fp.LoraConfig(r=4, target_modules=TARGETS[name])
    params, fwd = fp.adapt(model, config)
    params = random_adapter(params)
    bases = [perturbed(model, seed) for seed in (4, 5, 6)]
    stacked = {k: torch.stack([b[k] for b in bases]) for k in bases[0]}
    with torch.no_grad():
        got = torch.func.vmap(lambda b: logits(fwd(params, x, base=b)))(stacked)
        for i, base in enumerate(bases):
            torch.testing.assert_close(got[i], merged_reference(model, config, params, base, x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_meta_model_runs_with_real_weights():
    torch.manual_seed(0)
    real, x = MLP(), torch.randn(3, 10)
    config = fp.LoraConfig(r=4, target_modules=["lin0", "lin1"], modules_to_save=["head"])
    params, fwd = fp.adapt(real, config)
    params = random_adapter(params)
    with torch.device("meta"):
        ghost = MLP()
    _, ghost_fwd = fp.adapt(ghost, config)
    state = dict(real.state_dict())
    torch.testing.assert_close(ghost_fwd(params, x, base=state), fwd(params, x), rtol=0, atol=0)
    missing = {k: v for k, v in state.items() if k != "lin1.bias"}
    with pytest.raises(ValueError, match="'lin1.bias' is on the meta device"):
        ghost_fwd(params, x, base=missing)
    assert all(p.is_meta for p in ghost.parameters())


def test_meta_llama_with_non_persistent_buffers():
    real, x = build("llama")
    config = fp.LoraConfig(r=4, target_modules=TARGETS["llama"])
    params, fwd = fp.adapt(real, config)
    params = random_adapter(params)
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ghost = transformers.LlamaForCausalLM(real.config).eval()
    _, ghost_fwd = fp.adapt(ghost, config)
    state = {**dict(real.named_buffers()), **real.state_dict()}
    with torch.no_grad():
        torch.testing.assert_close(
            logits(ghost_fwd(params, x, base=state)), logits(fwd(params, x)), rtol=1e-5, atol=1e-6
        )


def test_threads_each_with_their_own_base():
    model, x = build("mlp")
    config = fp.LoraConfig(r=4, target_modules=TARGETS["mlp"])
    params, fwd = fp.adapt(model, config)
    params = random_adapter(params)
    bases = [perturbed(model, seed) for seed in range(10, 14)]
    with torch.no_grad():
        expected = [merged_reference(model, config, params, b, x) for b in bases]
        plain = model(x)
    errors, start = [], threading.Barrier(len(bases) + 1)

    def work(i):
        start.wait()
        for _ in range(200):
            with torch.no_grad():
                if not torch.allclose(fwd(params, x, base=bases[i]), expected[i], rtol=1e-4, atol=1e-5):
                    errors.append(i)
                    return

    def plain_calls():
        start.wait()
        for _ in range(200):
            with torch.no_grad():
                if not torch.equal(model(x), plain):
                    errors.append("model")
                    return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bases))]
    threads.append(threading.Thread(target=plain_calls))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_mixed_batch_rows_share_the_base():
    model, x = build("mlp")
    config = fp.LoraConfig(r=4, target_modules=TARGETS["mlp"])
    params, fwd = fp.adapt(model, config)
    adapters = [random_adapter(params, seed) for seed in (1, 2)]
    stacked = fwd.stack(adapters)
    base = perturbed(model, 7)
    ids = torch.tensor([1, -1, 0])
    with torch.no_grad():
        got = fwd(stacked, x, adapter_ids=ids, base=base)
        for row, k in enumerate(ids.tolist()):
            want = fwd(None if k < 0 else adapters[k], x[row : row + 1], base=base)
            torch.testing.assert_close(got[row : row + 1], want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[1], model(x[1:2])[0])


def test_trainable_copies_win_over_the_base():
    model, x = build("mlp")
    config = fp.LoraConfig(r=4, target_modules=["lin0"], modules_to_save=["head"], bias="all")
    params, fwd = fp.adapt(model, config)
    params = random_adapter(params)
    base = perturbed(model, 8)
    with torch.no_grad():
        got = fwd(params, x, base=base)
        torch.testing.assert_close(got, merged_reference(model, config, params, base, x), rtol=1e-4, atol=1e-5)
        # with params=None the base's own head (and biases) are read
        assert torch.allclose(fwd(None, x, base=base), functional_call(model, base, (x,)))


def test_method_and_generate_pass_base_through():
    model, ids = build("gpt2")
    config = fp.LoraConfig(r=4, target_modules=TARGETS["gpt2"])
    params, fwd = fp.adapt(model, config)
    params = random_adapter(params)
    base = perturbed(model, 9)
    twin = copy.deepcopy(model)
    twin.load_state_dict(base, strict=False)
    _, twin_fwd = fp.adapt(twin, config)
    with torch.no_grad():
        got = fwd.method("forward")(params, ids, base=base).logits
        torch.testing.assert_close(got, twin_fwd(params, ids).logits, rtol=1e-5, atol=1e-6)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    out = fwd.generate(params, ids, base=base, **kwargs)
    assert torch.equal(out, twin_fwd.generate(params, ids, **kwargs))
    assert not torch.equal(out, fwd.generate(params, ids, **kwargs))


def test_checkpointed_layers_recompute_with_the_base():
    model, ids = build("llama")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = fp.LoraConfig(r=4, target_modules=TARGETS["llama"])
    params, fwd = fp.adapt(model, config)
    params = random_adapter(params)
    base = perturbed(model, 10)
    twin = copy.deepcopy(model)
    twin.load_state_dict(base, strict=False)
    _, twin_fwd = fp.adapt(twin, config)
    fwd(params, ids, base=base).logits.square().mean().backward()
    got = {p: {n: t.grad.clone() for n, t in e.items()} for p, e in params.items()}
    for entry in params.values():
        for t in entry.values():
            t.grad = None
    twin_fwd(params, ids).logits.square().mean().backward()
    torch.testing.assert_close(
        got, {p: {n: t.grad for n, t in e.items()} for p, e in params.items()}, rtol=1e-4, atol=1e-6
    )


def test_clear_errors():
    model, x = build("gpt2")
    params, fwd = fp.adapt(model, fp.LoraConfig(r=4, target_modules=TARGETS["gpt2"]))
    state = dict(model.state_dict())
    with pytest.raises(
        ValueError, match=r"\['transformer.h.0.attn.c_attn.weigth'\].*transformer.h.0.attn.c_attn.weight"
    ):
        fwd(params, x, base={"transformer.h.0.attn.c_attn.weigth": state["transformer.h.0.attn.c_attn.weight"]})
    with pytest.raises(ValueError, match=r"`base\['transformer.ln_f.weight'\]`.*shape \(3,\)"):
        fwd(params, x, base={"transformer.ln_f.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"`base\['transformer.ln_f.weight'\]` is a torch.float64"):
        fwd(params, x, base={"transformer.ln_f.weight": state["transformer.ln_f.weight"].double()})
    with pytest.raises(ValueError, match=r"`base\['transformer.ln_f.bias'\]` is on device meta"):
        fwd(params, x, base={"transformer.ln_f.bias": state["transformer.ln_f.bias"].to("meta")})
    with pytest.raises(ValueError, match="tied"):
        fwd(
            params,
            x,
            base={"lm_head.weight": state["lm_head.weight"] + 1, "transformer.wte.weight": state["lm_head.weight"]},
        )
    with pytest.raises(TypeError, match="`base` must be a dict"):
        fwd(params, x, base=[1])
    # views of the same memory under tied names (as state_dict() gives) are one tensor: accepted
    with torch.no_grad():
        torch.testing.assert_close(fwd(params, x, base=state).logits, fwd(params, x).logits, rtol=0, atol=0)
    # a dict of a signature that passed before is still checked for tied names given different tensors
    tied = {"lm_head.weight": state["lm_head.weight"], "transformer.wte.weight": state["transformer.wte.weight"]}
    with torch.no_grad():
        fwd(params, x, base=tied)
        with pytest.raises(ValueError, match="tied"):
            fwd(params, x, base={**tied, "lm_head.weight": tied["lm_head.weight"] + 1})
    # and a bad dict after good ones is refused (the signature differs)
    with pytest.raises(ValueError, match="shape"):
        fwd(params, x, base={**tied, "lm_head.weight": torch.ones(3)})
