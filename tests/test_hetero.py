"""Heterogeneous adapters: ``funcpeft.adapt(model, [configs])``, K LoRA configs in one mixed batch, against PEFT."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from _models import MLP, ConvNet, EmbNet, conv_inputs, oracle, tiny_gpt2, tiny_llama, token_ids

import funcpeft as fp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::funcpeft.FuncpeftWarning")

# Per adapter: everything a LoRA config can vary per row.
MLP_CONFIGS = [
    {"r": 4, "target_modules": ["lin0", "lin1"]},
    {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["lin1", "head"]},
    {"r": 2, "use_dora": True, "target_modules": ["lin0", "head"]},
    {"r": 3, "lora_bias": True, "target_modules": ["head", "lin0"], "rank_pattern": {"head": 5},
     "alpha_pattern": {"head": 3.0}},
    {"r": 6, "lora_alpha": 2, "target_modules": ["lin1"]},
]  # fmt: skip
NO_DORA = [c for c in MLP_CONFIGS if not c.get("use_dora")]
IDS = torch.tensor([0, 1, 2, 3, -1, 1, 4, 0])


def _configs(kws, **extra):
    return [fp.LoraConfig(init_lora_weights=False, **kw, **extra) for kw in kws]


def _peft_twin(model, kws, own, configs):
    """A PeftModel holding the same K adapters (PEFT's own configs, our weights)."""
    peft = oracle("peft")
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kws[0]), adapter_name="a0")
    for k, kw in enumerate(kws[1:], 1):
        twin.add_adapter(f"a{k}", peft.LoraConfig(**kw))
    for k, (params, config) in enumerate(zip(own, configs, strict=True)):
        result = peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(params, config), adapter_name=f"a{k}")
        assert not result.unexpected_keys and not [m for m in result.missing_keys if f".a{k}." in m]
    return twin.eval()


def _peft_rows(twin, x, ids, **kwargs):
    """PEFT's output for each row alone with that row's adapter active (the oracle where adapter_names refuses)."""
    outs = []
    for i, k in enumerate(ids.tolist()):
        if k < 0:
            with twin.disable_adapter():
                outs.append(_out(twin(x[i : i + 1], **kwargs)))
        else:
            twin.set_adapter(f"a{k}")
            outs.append(_out(twin(x[i : i + 1], **kwargs)))
    return torch.cat(outs)


def _out(y):
    return y if isinstance(y, torch.Tensor) else y.logits


def _bytes(tree):
    return sum(t.numel() * t.element_size() for entry in tree.values() for t in entry.values())


def test_each_row_equals_peft_with_its_own_config_and_adapter() -> None:
    model = MLP().double().eval()
    configs = _configs(MLP_CONFIGS)
    stacked, fwd = fp.adapt(model, configs)
    own = fwd.unstack(stacked)
    twin = _peft_twin(model, MLP_CONFIGS, own, configs)
    x = torch.randn(len(IDS), 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = fwd(stacked, x, adapter_ids=IDS)
    torch.testing.assert_close(ours, _peft_rows(twin, x, IDS), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ours, model(x))  # the adapters do something


@pytest.mark.parametrize("factory", [MLP, tiny_gpt2, tiny_llama], ids=["mlp", "gpt2", "llama"])
def test_mixed_batch_equals_peft_adapter_names(factory) -> None:
    """PEFT's adapter_names refuses DoRA; every other per-adapter option is compared in one PEFT batch."""
    if factory is MLP:
        kws, x = NO_DORA, torch.randn(len(IDS), 10, dtype=torch.float64)
    else:
        names = ["c_attn", "c_fc", "c_proj"] if factory is tiny_gpt2 else ["q_proj", "v_proj", "down_proj"]
        kws = [
            {"r": 2, "target_modules": names[:1]},
            {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": names[1:]},
            {"r": 4, "target_modules": names, "rank_pattern": {names[2]: 6}, "lora_bias": True},
            {"r": 16, "target_modules": names[::2], "alpha_pattern": {names[0]: 32.0}},
        ]
        x = token_ids(batch=len(IDS))
    model = factory().double().eval()
    configs = _configs(kws)
    stacked, fwd = fp.adapt(model, configs)
    own = fwd.unstack(stacked)
    twin = _peft_twin(model, kws, own, configs)
    ids = IDS.clamp(max=len(kws) - 1)
    kwargs = {} if factory is MLP else {"use_cache": False}
    ours = _out(fwd(stacked, x, adapter_ids=ids, **kwargs))
    theirs = _out(twin(x, adapter_names=[f"a{k}" if k >= 0 else "__base__" for k in ids.tolist()], **kwargs))
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "factory, inputs, kws",
    [
        (lambda: EmbNet(padding_idx=0), lambda: (torch.randint(0, 20, (len(IDS), 6)),),
         [{"r": 2, "target_modules": ["emb"]}, {"r": 5, "target_modules": ["emb", "lin"], "use_dora": True},
          {"r": 3, "target_modules": ["lin"]}]),
        (ConvNet, lambda: tuple(t.repeat(len(IDS), *([1] * (t.dim() - 1))) for t in conv_inputs(batch=1)),
         [{"r": 2, "target_modules": ["c1", "c2"]}, {"r": 4, "target_modules": ["c2", "c3"], "use_dora": True},
          {"r": 3, "target_modules": ["c1", "c3"], "lora_bias": True}]),
    ],
    ids=["embedding", "conv"],
)  # fmt: skip
def test_embeddings_and_convs_equal_each_adapter_alone(factory, inputs, kws) -> None:
    torch.manual_seed(0)
    model = factory().double().eval()
    configs = _configs(kws)
    stacked, fwd = fp.adapt(model, configs)
    x = tuple(t.double() if t.is_floating_point() else t for t in inputs())
    ids = IDS.clamp(max=len(kws) - 1)
    ours = fwd(stacked, *x, adapter_ids=ids)
    for i, k in enumerate(ids.tolist()):
        row = tuple(t[i : i + 1] for t in x)
        if k < 0:
            expected = model(*row)
        else:
            _, alone = fp.adapt(model, configs[k])
            expected = alone(fwd.unstack(stacked)[k], *row)
        torch.testing.assert_close(ours[i : i + 1], expected, rtol=1e-10, atol=1e-10)


def test_init_stack_unstack_round_trip_and_memory() -> None:
    model = MLP()
    configs = _configs(MLP_CONFIGS)
    stacked, fwd = fp.adapt(model, configs, generator=torch.Generator().manual_seed(7))
    assert fwd.configs == tuple(configs)
    # adapter k is what adapt(model, configs[k]) initialises, drawn in adapter order from the generator
    generator = torch.Generator().manual_seed(7)
    alone = [fp.adapt(model, c, generator=generator)[0] for c in configs]
    own = fwd.unstack(stacked)
    for mine, theirs in zip(own, alone, strict=True):
        assert list(mine) == list(theirs)
        for path in mine:
            assert mine[path].keys() == theirs[path].keys()
            for name in mine[path]:
                assert torch.equal(mine[path][name], theirs[path][name])
    restacked = fwd.stack(alone)
    assert all(torch.equal(restacked[p][n], stacked[p][n]) for p in stacked for n in stacked[p])
    assert _bytes(stacked) == sum(_bytes(a) for a in alone)  # packed, no padding
    leaves = [t for entry in restacked.values() for t in entry.values()]
    assert all(t.is_leaf and t.requires_grad for t in leaves)
    inputs = {t.untyped_storage().data_ptr() for a in alone for e in a.values() for t in e.values()}
    assert not inputs & {t.untyped_storage().data_ptr() for t in leaves}


def _grads(tree, loss):
    leaves = [t for e in tree.values() for t in e.values()]
    values = iter(torch.autograd.grad(loss, leaves))
    return {p: {n: next(values) for n in e} for p, e in tree.items()}


def test_gradients_equal_each_adapter_trained_alone_on_its_rows() -> None:
    model = MLP().double()
    configs = _configs(MLP_CONFIGS)
    stacked, fwd = fp.adapt(model, configs)
    x = torch.randn(len(IDS), 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = torch.randn(len(IDS), 4, dtype=torch.float64)

    def loss_fn(params):
        return ((fwd(params, x, adapter_ids=IDS) - target) ** 2).sum()

    autograd = _grads(stacked, loss_fn(stacked))
    grads = fwd.unstack(autograd)
    for k, config in enumerate(configs):
        rows = k == IDS
        _, alone = fp.adapt(model, config)
        params = fwd.unstack(stacked)[k]
        expected = _grads(params, ((alone(params, x[rows]) - target[rows]) ** 2).sum())
        for path in expected:
            for name in expected[path]:
                torch.testing.assert_close(grads[k][path][name], expected[path][name], rtol=1e-10, atol=1e-10)
    functional = torch.func.grad(loss_fn)(stacked)  # torch.func composes: the same gradient
    for path in functional:
        for name in functional[path]:
            torch.testing.assert_close(functional[path][name], autograd[path][name], rtol=1e-12, atol=1e-12)


def test_generate_equals_peft_adapter_names() -> None:
    model = tiny_gpt2().eval()
    kws = [
        {"r": 2, "target_modules": ["c_attn"]},
        {"r": 8, "lora_alpha": 32, "target_modules": ["c_fc", "c_proj"]},
        {"r": 16, "use_rslora": True, "target_modules": ["c_attn", "c_fc"]},
    ]
    configs = _configs(kws)
    stacked, fwd = fp.adapt(model, configs)
    with torch.no_grad():  # large enough to change the tokens
        stacked = {p: {n: t * 3 for n, t in e.items()} for p, e in stacked.items()}
    twin = _peft_twin(model, kws, fwd.unstack(stacked), configs)
    prompts, ids = token_ids(batch=4, length=5), torch.tensor([2, -1, 0, 1])
    names = [f"a{k}" if k >= 0 else "__base__" for k in ids.tolist()]
    for mode in ({"do_sample": False}, {"num_beams": 3, "do_sample": False}):
        kw = {"max_new_tokens": 6, "pad_token_id": 0, **mode}
        ours = fwd.generate(stacked, prompts, adapter_ids=ids, **kw)
        theirs = twin.generate(input_ids=prompts, adapter_names=names, **kw)
        assert torch.equal(ours, theirs)
    assert not torch.equal(ours[0], model.generate(prompts[:1], **kw)[0])


def test_compiles_once_for_any_ids_and_values() -> None:
    torch._dynamo.reset()
    model = tiny_llama().eval()
    kws = [{"r": 2, "target_modules": ["q_proj"]}, {"r": 6, "target_modules": ["v_proj", "down_proj"],
           "use_dora": True}]  # fmt: skip
    stacked, fwd = fp.adapt(model, _configs(kws))
    graphs = []
    compiled = torch.compile(fwd, fullgraph=True, backend=lambda gm, ex: graphs.append(gm) or gm.forward)
    x = token_ids(batch=4)
    with torch.no_grad():
        for scale, ids in [(1.0, [0, 1, -1, 1]), (2.0, [1, 1, 0, 0]), (3.0, [-1, 0, 1, 0])]:
            tree = {p: {n: t * scale for n, t in e.items()} for p, e in stacked.items()}
            ids = torch.tensor(ids)
            torch.testing.assert_close(compiled(tree, x, adapter_ids=ids).logits, fwd(tree, x, adapter_ids=ids).logits)
    assert len(graphs) == 1


def test_per_adapter_dropout_only_touches_its_rows() -> None:
    model = MLP().train()
    configs = _configs(
        [{"r": 4, "target_modules": ["lin0"]}, {"r": 4, "target_modules": ["lin0"], "lora_dropout": 0.5}]
    )
    stacked, fwd = fp.adapt(model, configs)
    x = torch.randn(6, 10)
    ids = torch.tensor([0, 1, 0, 1, -1, 1])
    train = fwd(stacked, x, adapter_ids=ids)
    model.eval()
    evaluated = fwd(stacked, x, adapter_ids=ids)
    model.train()
    keep = ids != 1
    torch.testing.assert_close(train[keep], evaluated[keep])
    assert not torch.allclose(train[~keep], evaluated[~keep])


def test_model_untouched_and_threads_see_their_own_batch() -> None:
    model = MLP().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stacked, fwd = fp.adapt(model, _configs(MLP_CONFIGS))
    x = torch.randn(len(IDS), 10)
    expected = {k: fwd(stacked, x, adapter_ids=IDS.roll(k)) for k in range(4)}
    errors = []

    def work(k):
        for _ in range(20):
            if not torch.equal(fwd(stacked, x, adapter_ids=IDS.roll(k)), expected[k]):
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert set(model.state_dict()) == set(before)


def test_configs_that_cannot_share_a_fwd_are_refused_by_name() -> None:
    model = MLP()
    lora = fp.LoraConfig(target_modules=["lin0"])
    with pytest.raises(ValueError, match=r"mix methods.*IA3Config.*LoraConfig"):
        fp.adapt(model, [lora, fp.IA3Config(target_modules=["lin0"], feedforward_modules=[])])
    with pytest.raises(ValueError, match=r"supported for LoraConfig; got IA3Config"):
        fp.adapt(model, [fp.IA3Config(target_modules=["lin0"], feedforward_modules=[])] * 2)
    with pytest.raises(ValueError, match=r"`config\[1\]\.bias` is 'all'.*bias='none'"):
        fp.adapt(model, [lora, fp.LoraConfig(target_modules=["lin0"], bias="all")])
    with pytest.raises(ValueError, match=r"`config\[0\]\.modules_to_save`"):
        fp.adapt(model, [fp.LoraConfig(target_modules=["lin0"], modules_to_save=["head"]), lora])
    with pytest.raises(ValueError, match=r"`config\[1\]`: .*'nope'"):
        fp.adapt(model, [lora, fp.LoraConfig(target_modules=["nope"])])
    with pytest.raises(ValueError, match=r"empty list"):
        fp.adapt(model, [])
    with pytest.raises(TypeError, match=r"`config\[1\]` must be a funcpeft adapter config"):
        fp.adapt(model, [lora, {"r": 4}])

    class Classifier(MLP):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(4, 2)

    seq_cls = fp.LoraConfig(target_modules=["lin0"], task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"`config\[1\].task_type` is 'SEQ_CLS'.*\['classifier'\]"):
        fp.adapt(Classifier(), [lora, seq_cls])
    with pytest.raises(ValueError, match=r"grouped convolution 'c2'"):
        fp.adapt(ConvNet(groups=2), [fp.LoraConfig(r=4, target_modules=["c2"])])


def test_misuse_is_refused_clearly_and_changes_nothing() -> None:
    model = MLP()
    configs = _configs(MLP_CONFIGS[:3])
    stacked, fwd = fp.adapt(model, configs)
    own = fwd.unstack(stacked)
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"pass `adapter_ids`"):
        fwd(stacked, x)
    with pytest.raises(ValueError, match=r"\[-1, 2\] for 3 stacked adapters.*from 0 to 3"):
        fwd(stacked, x, adapter_ids=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"leading dimension 3.*`adapter_ids` has 2 rows"):
        fwd(stacked, x, adapter_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"vmap cannot map over a heterogeneous stacked tree"):
        torch.func.vmap(lambda p: fwd(p, x, adapter_ids=torch.tensor([0, 1, 2])))(
            {p: {n: t[:1] for n, t in e.items()} for p, e in stacked.items()}
        )
    with pytest.raises(ValueError, match=r"`list_of_params` has 2 adapters.*3 configs"):
        fwd.stack(own[:2])
    with pytest.raises(ValueError, match=r"`list_of_params\[1\]` does not fit `fwd.configs\[1\]`"):
        fwd.stack([own[0], own[0], own[2]])
    with pytest.raises(TypeError, match=r"list of 3 adapter dicts"):
        fwd.stack(own[0])
    mixed_dtypes = [own[0], {p: {n: t.double() for n, t in e.items()} for p, e in own[1].items()}, own[2]]
    with pytest.raises(ValueError, match=r"'lin1'.*different dtypes or devices"):
        fwd.stack(mixed_dtypes)
    with pytest.raises(ValueError, match=r"merge adapter k alone"):
        fwd.merge(stacked)
    with pytest.raises(AttributeError, match=r"fwd.configs"):
        fwd.config  # noqa: B018
    with pytest.raises(ValueError, match=r"must hold|shape"):
        fwd.unstack(own[0])  # one adapter's own params are not a stacked tree
    assert torch.equal(fwd(None, x), model(x))  # the base still runs without ids
