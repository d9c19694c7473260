"""Which modules ``funcpeft.adapt`` adapts (``fwd.targets``), with which ranks and scalings, and its errors.

PEFT is the oracle: for the same ``LoraConfig`` keywords, ``peft.inject_adapter_in_model`` on a deep copy must put
LoRA layers on exactly the modules funcpeft reports in ``fwd.targets``, with the same tensor shapes.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings

import pytest
import torch
from torch import nn

import funcpeft as fp
from tests._models import MLP, ConvNet, EmbNet, oracle, tiny_bert, tiny_gpt2, tiny_llama, token_ids

# --------------------------------------------------------------------------------------------------------------
# helpers and models
# --------------------------------------------------------------------------------------------------------------


def peft_model(model: nn.Module, **kwargs) -> nn.Module:
    """``model`` deep-copied and adapted by PEFT with ``peft.LoraConfig(**kwargs)``."""
    peft = oracle("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), copy.deepcopy(model))


def peft_targets(model: nn.Module, **kwargs) -> set[str]:
    from peft.tuners.lora import LoraLayer

    adapted = peft_model(model, **kwargs)
    return {path for path, module in adapted.named_modules() if isinstance(module, LoraLayer)}


def funcpeft_targets(model: nn.Module, **kwargs) -> set[str]:
    _, fwd = fp.adapt(model, fp.LoraConfig(**kwargs))
    assert len(set(fwd.targets)) == len(fwd.targets), fwd.targets
    return set(fwd.targets)


def peft_shapes(adapted: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """PEFT's trainable adapter tensors as ``{module_path: {name: shape}}`` in funcpeft's naming."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, p in adapted.named_parameters():
        if "lora_" not in name:
            continue
        path, _, rest = name.partition(".lora_")
        rest = ("lora_" + rest).replace(".default", "")
        rest = rest.removesuffix(".weight")
        out.setdefault(path, {})[rest] = tuple(p.shape)
    return out


def shapes(params) -> dict[str, dict[str, tuple[int, ...]]]:
    return {path: {k: tuple(v.shape) for k, v in entry.items()} for path, entry in params.items()}


class Named(nn.Module):
    """Module names that are substrings / suffixes of each other."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.q_proj = nn.Linear(4, 4)
        self.block = nn.Module()
        self.block.proj = nn.Linear(4, 4)
        self.block.q_proj = nn.Linear(4, 4)
        self.block.q_proj_out = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        return b.q_proj_out(b.q_proj(b.proj(self.q_proj(self.proj(x)))))


class Stacked(nn.Module):
    """Two numbered stacks (``encoder.layers`` and ``decoder.blocks``) with MoE-like nested indices."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()

        def block() -> nn.Module:
            m = nn.Module()
            m.fc = nn.Linear(4, 4)
            m.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            return m

        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(block() for _ in range(n))
        self.decoder = nn.Module()
        self.decoder.blocks = nn.ModuleList(block() for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in [*self.encoder.layers, *self.decoder.blocks]:
            x = m.fc(x) + sum(e(x) for e in m.experts)
        return x


class WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x))


class Parallel(nn.Module):
    """Two linears on the same input, returned separately, so each adapted layer's output is visible."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def tiny_bert_cls(seed: int = 0) -> nn.Module:
    transformers = oracle("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


# --------------------------------------------------------------------------------------------------------------
# list entries: exact path or `.`-suffix, never a substring
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (["proj"], {"proj", "block.proj"}),
        (["q_proj"], {"q_proj", "block.q_proj"}),
        (["block.proj"], {"block.proj"}),
        (["block.q_proj", "proj"], {"block.q_proj", "proj", "block.proj"}),
        (["q_proj_out"], {"block.q_proj_out"}),
    ],
)
def test_list_entries_match_path_or_dot_suffix(entries, expected):
    model = Named()
    assert funcpeft_targets(model, target_modules=entries) == expected
    assert peft_targets(model, target_modules=entries) == expected


@pytest.mark.parametrize("entry", ["roj", "lock.proj", "q_pro", "_proj"])
def test_list_entry_matching_only_a_substring_matches_nothing(entry):
    with pytest.raises(ValueError, match=repr(entry)):
        fp.adapt(Named(), fp.LoraConfig(target_modules=[entry]))


def test_substring_entry_on_llama_is_an_error():
    # "proj" is a substring of every q_proj/k_proj/..., but no module path ends in ".proj"
    with pytest.raises(ValueError, match="'proj'"):
        fp.adapt(tiny_llama(), fp.LoraConfig(target_modules=["proj"]))


# --------------------------------------------------------------------------------------------------------------
# regex: full match
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "regex"),
    [
        (MLP, r"lin\d"),
        (Named, r"block\..*proj"),
        (Named, r".*q_proj"),
        (tiny_llama, r".*\.(q|v)_proj"),
        (tiny_llama, r"model\.layers\.1\..*_proj"),
    ],
)
def test_regex_is_a_full_match_as_in_peft(factory, regex):
    model = factory()
    ours = funcpeft_targets(model, target_modules=regex)
    assert ours == peft_targets(model, target_modules=regex)
    assert ours == {p for p, _ in model.named_modules() if p and re.fullmatch(regex, p)}


def test_regex_partial_match_is_not_a_match():
    assert funcpeft_targets(MLP(), target_modules=r"lin\d") == {"lin0", "lin1"}
    with pytest.raises(ValueError, match="'lin'"):  # matches the start of lin0/lin1, but not the whole path
        fp.adapt(MLP(), fp.LoraConfig(target_modules="lin"))
    with pytest.raises(ValueError, match="q_proj_out"):  # suffixes of block.q_proj_out / block.proj only
        fp.adapt(Named(), fp.LoraConfig(target_modules=r"q_proj_out|lock\.proj"))
    assert funcpeft_targets(Named(), target_modules=r"block\.proj|q_proj") == {"block.proj", "q_proj"}


# --------------------------------------------------------------------------------------------------------------
# "all-linear" and default targets, against PEFT
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama, tiny_bert, MLP, Named])
def test_all_linear_matches_peft(factory):
    model = factory()
    ours = funcpeft_targets(model, target_modules="all-linear")
    assert ours == peft_targets(model, target_modules="all-linear")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head_path = next(p for p, m in model.named_modules() if m is head)
        assert head_path not in ours


def test_all_linear_keeps_gpt2_conv1d_and_skips_the_tied_head():
    ours = funcpeft_targets(tiny_gpt2(), target_modules="all-linear")
    assert "transformer.h.0.attn.c_attn" in ours and "transformer.h.1.mlp.c_proj" in ours
    assert "lm_head" not in ours


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_all_linear_on_a_classifier_matches_peft(task_type):
    # BertForSequenceClassification has no output embeddings; PEFT leaves its classifier out for SEQ_CLS only
    model = tiny_bert_cls()
    kw = {"target_modules": "all-linear", "task_type": task_type}
    ours = funcpeft_targets(model, **kw)
    assert ours == peft_targets(model, **kw)
    assert ("classifier" in ours) == (task_type is None)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama, tiny_bert])
def test_default_targets_match_peft(factory):
    model = factory()
    ours = funcpeft_targets(model)
    assert ours and ours == peft_targets(model)


def test_default_targets_on_a_plain_module_ask_for_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        fp.adapt(MLP(), fp.LoraConfig())


# --------------------------------------------------------------------------------------------------------------
# exclude_modules, layers_to_transform / layers_pattern, modules_to_save
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": "all-linear", "exclude_modules": ["q_proj", "model.layers.0.mlp.up_proj"]},
        {"target_modules": "all-linear", "exclude_modules": r".*layers\.0\..*"},
        {"target_modules": ["q_proj", "v_proj", "o_proj"], "exclude_modules": ["o_proj"]},
        {"target_modules": r".*_proj", "exclude_modules": r".*mlp\..*"},
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r"model\.layers\.1\.self_attn\.q_proj"},
        {"target_modules": ["q_proj"], "exclude_modules": r"q_proj"},  # regex: full match, so nothing is excluded
    ],
)
def test_exclude_modules_matches_peft(kwargs):
    model = tiny_llama()
    excludes_nothing = kwargs["exclude_modules"] == r"q_proj"
    with pytest.warns(fp.FuncpeftWarning, match="excludes nothing") if excludes_nothing else contextlib.nullcontext():
        ours = funcpeft_targets(model, **kwargs)
    assert ours == peft_targets(model, **kwargs)
    excluded = kwargs["exclude_modules"]
    if isinstance(excluded, list):
        assert not any(p == e or p.endswith("." + e) for p in ours for e in excluded)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"layers_to_transform": [1], "layers_pattern": "layers"}, {1}),
        ({"layers_to_transform": [1]}, {1}),
        ({"layers_to_transform": 0}, {0}),
        ({"layers_to_transform": [0, 2], "layers_pattern": ["layers"]}, {0, 2}),
        ({"layers_to_transform": [2]}, {2}),
    ],
)
def test_layers_to_transform_matches_peft_on_llama(kwargs, expected):
    model = tiny_llama(n_layer=3)
    kw = {"target_modules": ["q_proj", "v_proj"], **kwargs}
    ours = funcpeft_targets(model, **kw)
    assert ours == peft_targets(model, **kw)
    assert ours == {f"model.layers.{i}.self_attn.{n}" for i in expected for n in ("q_proj", "v_proj")}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["fc"], "layers_to_transform": [1], "layers_pattern": "blocks"},
        {"target_modules": ["fc"], "layers_to_transform": [1], "layers_pattern": "layers"},
        {"target_modules": ["fc"], "layers_to_transform": [0, 2]},
        {"target_modules": ["0", "1"], "layers_to_transform": [1]},  # the expert index is not the layer index
        {"target_modules": ["fc", "1"], "layers_to_transform": [2], "layers_pattern": ["blocks", "layers"]},
    ],
)
def test_layers_pattern_selects_the_named_stack_as_peft(kwargs):
    model = Stacked()
    ours = funcpeft_targets(model, **kwargs)
    assert ours == peft_targets(model, **kwargs)


def test_modules_to_save_are_not_adapted():
    model = MLP()
    _, fwd = fp.adapt(model, fp.LoraConfig(target_modules="all-linear", modules_to_save=["head"]))
    assert set(fwd.targets) == {"lin0", "lin1"}
    assert set(fwd.targets) == peft_targets(model, target_modules="all-linear", modules_to_save=["head"])


# --------------------------------------------------------------------------------------------------------------
# rank_pattern / alpha_pattern
# --------------------------------------------------------------------------------------------------------------


RANK_ALPHA = [
    {
        "target_modules": ["q_proj", "v_proj"],
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"model.layers.0.self_attn.q_proj": 2, "v_proj": 6},
        "alpha_pattern": {"q_proj": 3, r"layers\.1\.self_attn\.v_proj": 20},
    },
    {
        "target_modules": "all-linear",
        "r": 2,
        "lora_alpha": 4,
        "use_rslora": True,
        "rank_pattern": {"mlp.*": 5, "proj": 7},
        "alpha_pattern": {r".*\.o_proj": 1.5},
    },
]


@pytest.mark.parametrize("kwargs", RANK_ALPHA)
def test_rank_and_alpha_pattern_match_peft_shapes_and_outputs(kwargs):
    model = tiny_llama()
    unused = kwargs["rank_pattern"].get("proj")  # 'proj' matches no path end ('q_proj' is not '.proj'): PEFT warns
    with pytest.warns(fp.FuncpeftWarning, match="'proj'") if unused else contextlib.nullcontext():
        params, fwd = fp.adapt(
            model, fp.LoraConfig(init_lora_weights=False, **kwargs), generator=torch.Generator().manual_seed(0)
        )
    theirs = peft_model(model, init_lora_weights=False, **kwargs)
    assert shapes(params) == peft_shapes(theirs)
    # the same tensors in PEFT's model give the same output only if every module's scaling agrees
    modules = dict(theirs.named_modules())
    with torch.no_grad():
        for path, entry in params.items():
            modules[path].lora_A["default"].weight.copy_(entry["lora_A"])
            modules[path].lora_B["default"].weight.copy_(entry["lora_B"])
    ids = token_ids()
    with torch.no_grad():
        expected = theirs(ids).logits
        base = model(ids).logits
        got = fwd(params, ids).logits
    assert not torch.allclose(expected, base, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_rank_pattern_keys_match_a_dotted_suffix_not_a_substring():
    model = Named()
    kw = {"target_modules": ["proj", "q_proj"], "r": 4, "rank_pattern": {"proj": 2}}
    params, _ = fp.adapt(model, fp.LoraConfig(**kw))
    ranks = {path: entry["lora_A"].shape[0] for path, entry in params.items()}
    assert ranks == {"proj": 2, "block.proj": 2, "q_proj": 4, "block.q_proj": 4}
    assert shapes(params) == peft_shapes(peft_model(model, **kw))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_per_module_scaling_is_alpha_over_r(use_rslora):
    model = Parallel().double()
    config = fp.LoraConfig(
        target_modules=["a", "b"],
        r=4,
        lora_alpha=8,
        rank_pattern={"a": 2},
        alpha_pattern={"a": 6, "b": 3},
        use_rslora=use_rslora,
        init_lora_weights=False,
    )
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(0))
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outputs = dict(zip("ab", fwd(params, x), strict=True))
    for name, r, alpha in (("a", 2, 6), ("b", 4, 3)):
        layer, entry = getattr(model, name), params[name]
        assert entry["lora_A"].shape == (r, 5) and entry["lora_B"].shape == (3, r)
        scaling = alpha / r**0.5 if use_rslora else alpha / r
        weight = layer.weight + scaling * entry["lora_B"] @ entry["lora_A"]
        torch.testing.assert_close(outputs[name], x @ weight.T + layer.bias)


def test_rank_pattern_can_fix_a_grouped_conv_rank():
    model = ConvNet(channels=4, groups=2)
    kw = {"target_modules": ["c1", "c2", "c3"], "r": 3, "rank_pattern": {"c[123]": 4}}
    params, _ = fp.adapt(model, fp.LoraConfig(**kw))
    assert shapes(params) == peft_shapes(peft_model(model, **kw))
    assert params["c2"]["lora_B"].shape == (8, 2, 1, 1)


# --------------------------------------------------------------------------------------------------------------
# errors: a clear message, and the model untouched
# --------------------------------------------------------------------------------------------------------------


def _gpt2_attn_type() -> str:
    return type(tiny_gpt2().transformer.h[0].attn).__name__


ERRORS = [
    ("misspelled", tiny_llama, {"target_modules": ["q_prj", "v_proj"]}, ["'q_prj'", "q_proj"]),
    ("substring", tiny_llama, {"target_modules": ["proj"]}, ["'proj'"]),
    ("gpt2-attn", tiny_gpt2, {"target_modules": ["attn"]}, ["transformer.h.0.attn", _gpt2_attn_type]),
    ("layernorm", WithNorm, {"target_modules": ["lin", "norm"]}, ["'norm'", "LayerNorm"]),
    ("layernorm-regex", tiny_llama, {"target_modules": r".*norm"}, ["input_layernorm", "LlamaRMSNorm"]),
    (
        "grouped-odd-r",
        lambda: ConvNet(channels=4, groups=2),
        {"target_modules": ["c2"], "r": 3},
        ["'c2'", "groups=2", "3"],
    ),
    (
        "grouped-rank-pattern",
        lambda: ConvNet(channels=4, groups=2),
        {"target_modules": ["c1", "c3"], "r": 2, "rank_pattern": {"c3": 5}},
        ["'c3'", "groups=2", "5"],
    ),
    ("empty-target-modules", MLP, {"target_modules": []}, ["`target_modules` is empty ([])", "nothing to adapt"]),
    ("embedding-lora-bias", EmbNet, {"target_modules": ["emb"], "lora_bias": True}, ["'emb'", "lora_bias"]),
    ("modules-to-save", MLP, {"target_modules": ["lin0"], "modules_to_save": ["haed"]}, ["'haed'", "head"]),
    ("no-default", MLP, {}, ["target_modules"]),
    ("regex-nothing", MLP, {"target_modules": "lin"}, ["'lin'"]),
    ("all-excluded", MLP, {"target_modules": ["lin0"], "exclude_modules": ["lin0"]}, ["exclude_modules"]),
]


def _snapshot(model: nn.Module):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        repr(model),
        {n: p.requires_grad for n, p in model.named_parameters()},
        [id(p) for p in model.parameters()],
        [id(m) for m in model.modules()],
    )


@pytest.mark.parametrize(("factory", "kwargs", "fragments"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_the_culprit_and_leave_the_model_untouched(factory, kwargs, fragments):
    model = factory()
    first = next(model.parameters())
    first.requires_grad_(False)  # a mixed state, so neither "freeze all" nor "unfreeze all" would go unnoticed
    before = _snapshot(model)
    config = fp.LoraConfig(**kwargs)
    with pytest.raises(ValueError) as info:
        fp.adapt(model, config)
    message = str(info.value)
    for fragment in fragments:
        text = fragment() if callable(fragment) else fragment
        assert text in message, f"{text!r} not in: {message}"
    state, text, flags, param_ids, module_ids = _snapshot(model)
    assert text == before[1]
    assert flags == before[2]
    assert param_ids == before[3] and module_ids == before[4]
    assert state.keys() == before[0].keys()
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), key
    assert config == fp.LoraConfig(**kwargs)  # the config is not rewritten either


def test_empty_target_modules_is_not_reported_as_excluded():
    for empty in ([], set(), ()):
        with pytest.raises(ValueError, match="`target_modules` is empty") as info:
            fp.adapt(MLP(), fp.LoraConfig(target_modules=empty))
        assert "exclude_modules" not in str(info.value)
    with pytest.raises(ValueError, match="`target_modules` is empty"):
        fp.inject_adapter_in_model(fp.LoraConfig(target_modules=[]), MLP())
    peft = oracle("peft")
    with pytest.raises(ValueError, match="No `target_modules` passed"):  # PEFT refuses it at injection too
        peft.inject_adapter_in_model(peft.LoraConfig(target_modules=[]), MLP())


# --------------------------------------------------------------------------------------------------------------
# entries that match nothing: a FuncpeftWarning naming the entry (PEFT warns for most of them)
# --------------------------------------------------------------------------------------------------------------


def _peft_warnings(model: nn.Module, **kwargs) -> list[str]:
    peft = oracle("peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), copy.deepcopy(model))
    return [str(w.message) for w in caught]


def _our_warnings(model: nn.Module, config) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fp.adapt(model, config)
    ours = [w for w in caught if issubclass(w.category, fp.FuncpeftWarning)]
    assert all(w.filename == __file__ for w in ours), [w.filename for w in ours]  # the user's line, not ours
    return [str(w.message) for w in ours]


UNMATCHED = [
    ({"target_modules": ["lin0"], "exclude_modules": ["lin_1"]}, ["`exclude_modules` entry 'lin_1'", "lin1"],
     "no modules were excluded"),
    ({"target_modules": ["lin0"], "exclude_modules": r"lin\d\.x"}, [r"`exclude_modules` regex 'lin\\d\\.x'"],
     "no modules were excluded"),
    ({"target_modules": ["lin0", "lin1"], "rank_pattern": {"lin1": 2, "lin9": 4}}, ["`rank_pattern` key 'lin9'"],
     "rank_pattern keys did not match any targeted module and were ignored: ['lin9']"),
    ({"target_modules": ["lin0"], "alpha_pattern": {"head": 2}}, ["`alpha_pattern` key 'head'"],
     "alpha_pattern keys did not match any targeted module and were ignored: ['head']"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "fragments", "peft_says"), UNMATCHED)
def test_an_entry_that_matches_nothing_warns_as_peft_does(kwargs, fragments, peft_says):
    ours = _our_warnings(MLP(), fp.LoraConfig(**kwargs))
    assert len(ours) == 1, ours
    for fragment in fragments:
        assert fragment in ours[0], ours[0]
    assert any(peft_says in w for w in _peft_warnings(MLP(), **kwargs))


def test_a_pattern_key_shadowed_by_an_earlier_key_warns():
    # the first matching key wins (PEFT's get_pattern_key): 'q_proj' never applies after '.*proj'
    config = fp.LoraConfig(target_modules=["q_proj", "v_proj"], rank_pattern={".*proj": 2, "q_proj": 4})
    [message] = _our_warnings(tiny_llama(), config)
    assert "`rank_pattern` key 'q_proj' has no effect" in message and "'.*proj'" in message


def test_layers_to_transform_index_out_of_range_warns():
    config = fp.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1, 7])
    [message] = _our_warnings(tiny_llama(), config)
    assert "`layers_to_transform` index 7" in message and "[0, 1]" in message
    _our_warnings(tiny_llama(), fp.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, 1]))  # none


def test_entries_that_match_warn_nothing_and_only_once_per_adapt():
    config = fp.LoraConfig(
        target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"],
        rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4}, layers_to_transform=[0, 1],
    )  # fmt: skip
    assert _our_warnings(tiny_llama(), config) == []
    ada = fp.AdaLoraConfig(target_modules=["lin0"], exclude_modules=["nope"], total_step=10)
    assert len(_our_warnings(MLP(), ada)) == 1  # AdaLoRA's own target check does not warn a second time


def test_lora_bias_on_a_layer_without_bias_warns_as_peft():
    config = fp.LoraConfig(target_modules=["lin0"], lora_bias=True)
    [message] = _our_warnings(MLP(bias=False), config)
    assert "`lora_bias=True`" in message and "'lin0'" in message and "no bias" in message
    assert any("has no bias" in w for w in _peft_warnings(MLP(bias=False), target_modules=["lin0"], lora_bias=True))
    assert _our_warnings(MLP(bias=True), config) == []


def test_dora_on_a_grouped_conv_is_supported_by_peft():
    # PEFT runs it (funcpeft too, with the true norm: tests/test_dora_grouped.py)
    model = peft_model(ConvNet(channels=4, groups=2), target_modules=["c2"], r=2, use_dora=True)
    x = torch.randn(1, 4, 5, 5)
    assert model.c2(x).shape == (1, 8, 5, 5)
