"""LoraConfig: validation on construction, immutability, and PEFT-compatible field names and defaults."""

from __future__ import annotations

import dataclasses
import json
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

import funcpeft as fp
from tests._models import MLP, oracle

# --------------------------------------------------------------------------------------------------------------
# Validation: every bad value is a ValueError/TypeError that names the field and shows the value.
# --------------------------------------------------------------------------------------------------------------

# (kwargs, field the message must name, text of the bad value the message must show)
BAD_VALUES = [
    ({"r": 0}, "r", "0"),
    ({"r": -4}, "r", "-4"),
    ({"r": 2.5}, "r", "2.5"),
    ({"r": True}, "r", "True"),
    ({"r": "8"}, "r", "'8'"),
    ({"lora_alpha": "16"}, "lora_alpha", "'16'"),
    ({"lora_alpha": None}, "lora_alpha", "None"),
    ({"lora_dropout": 1.0}, "lora_dropout", "1.0"),
    ({"lora_dropout": -0.1}, "lora_dropout", "-0.1"),
    ({"lora_dropout": "0.1"}, "lora_dropout", "'0.1'"),
    ({"bias": "some"}, "bias", "'some'"),
    ({"bias": None}, "bias", "None"),
    ({"fan_in_fan_out": "yes"}, "fan_in_fan_out", "'yes'"),
    ({"use_rslora": 1}, "use_rslora", "1"),
    ({"use_dora": "True"}, "use_dora", "'True'"),
    ({"lora_bias": None}, "lora_bias", "None"),
    ({"init_lora_weights": "kaiming"}, "init_lora_weights", "'kaiming'"),
    ({"init_lora_weights": 1}, "init_lora_weights", "1"),
    ({"init_lora_weights": None}, "init_lora_weights", "None"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern", "2.5"),
    ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern", "'4'"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern", "0"),
    ({"rank_pattern": [("q_proj", 4)]}, "rank_pattern", "[('q_proj', 4)]"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern", "'x'"),
    ({"target_modules": 5}, "target_modules", "5"),
    ({"target_modules": ["q_proj", 3]}, "target_modules", "3"),
    ({"exclude_modules": 7}, "exclude_modules", "7"),
    ({"modules_to_save": "head"}, "modules_to_save", "'head'"),
    ({"modules_to_save": 3}, "modules_to_save", "3"),
    ({"target_modules": ["q_proj"], "layers_to_transform": "1"}, "layers_to_transform", "'1'"),
    ({"target_modules": ["q_proj"], "layers_to_transform": [1.0]}, "layers_to_transform", "[1.0]"),
    ({"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": 3}, "layers_pattern", "3"),
    ({"task_type": 3}, "task_type", "3"),
    ({"task_type": "causal_lm"}, "task_type", "'causal_lm'"),
    ({"task_type": "CLASSIFICATION"}, "task_type", "'CLASSIFICATION'"),
    ({"lora_alpha": float("nan")}, "lora_alpha", "nan"),
    ({"lora_alpha": float("inf")}, "lora_alpha", "inf"),
    ({"lora_alpha": -float("inf")}, "lora_alpha", "-inf"),
    ({"lora_dropout": float("nan")}, "lora_dropout", "nan"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern", "nan"),
    ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern", "inf"),
    ({"lora_alpha": Fraction(1, 3)}, "lora_alpha", "Fraction(1, 3)"),
    ({"lora_bias": True, "init_lora_weights": "gaussian"}, "lora_bias", "'gaussian'"),
]


@pytest.mark.parametrize(("kwargs", "field", "shown"), BAD_VALUES, ids=[repr(kw) for kw, _, _ in BAD_VALUES])
def test_bad_value_names_field_and_value(kwargs, field, shown):
    with pytest.raises((ValueError, TypeError)) as info:
        fp.LoraConfig(**kwargs)
    message = str(info.value)
    assert re.search(rf"`{field}\b", message), f"the message does not name `{field}`: {message}"
    assert shown in message, message


@pytest.mark.parametrize("init", ["corda", "loftq", "eva"])
def test_unsupported_init_says_not_supported_yet(init):
    with pytest.raises(ValueError, match="not supported") as info:
        fp.LoraConfig(init_lora_weights=init)
    assert "init_lora_weights" in str(info.value)
    assert repr(init) in str(info.value)


def test_layers_pattern_without_layers_to_transform():
    with pytest.raises(ValueError) as info:
        fp.LoraConfig(target_modules=["q_proj"], layers_pattern="blocks")
    message = str(info.value)
    assert "layers_pattern" in message and "layers_to_transform" in message
    assert "'blocks'" in message, f"the message does not show the bad value 'blocks': {message}"


@pytest.mark.parametrize("layers", [[0, 1], 2])
def test_layers_to_transform_with_regex_target_modules(layers):
    regex = r".*\.q_proj"
    with pytest.raises(ValueError) as info:
        fp.LoraConfig(target_modules=regex, layers_to_transform=layers)
    message = str(info.value)
    assert "layers_to_transform" in message and "target_modules" in message
    assert repr(regex) in message


def test_lora_bias_with_dora():
    with pytest.raises(ValueError) as info:
        fp.LoraConfig(lora_bias=True, use_dora=True)
    message = str(info.value)
    assert "lora_bias" in message and "use_dora" in message and "True" in message


def test_valid_edge_values_are_accepted():
    # the boundaries of each check are valid values, not errors
    cfg = fp.LoraConfig(r=1, lora_alpha=0.5, lora_dropout=0.0, rank_pattern={"a": 1}, alpha_pattern={"a": 0})
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (1, 0.5, 0.0)
    assert fp.LoraConfig(lora_dropout=0.999).lora_dropout == 0.999
    for init in (True, False, "gaussian"):
        assert fp.LoraConfig(init_lora_weights=init).init_lora_weights == init


# --------------------------------------------------------------------------------------------------------------
# Immutability
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("r", 16), ("target_modules", ["q"]), ("use_dora", True)])
def test_config_is_frozen(field, value):
    cfg = fp.LoraConfig(target_modules=["q_proj"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, value)
    assert cfg == fp.LoraConfig(target_modules=["q_proj"])


def test_replace_validates_and_leaves_the_original():
    cfg = fp.LoraConfig(r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="r"):
        dataclasses.replace(cfg, r=0)
    bigger = dataclasses.replace(cfg, r=16)
    assert (bigger.r, cfg.r) == (16, 4)
    assert bigger.target_modules == ["q_proj"]


def test_values_are_not_rewritten():
    kw = {
        "r": 4,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "exclude_modules": ["lm_head"],
        "rank_pattern": {"q_proj": 2},
        "alpha_pattern": {"v_proj": 4.0},
        "layers_to_transform": [1, 0],
        "layers_pattern": "layers",
        "modules_to_save": ["score"],
        "init_lora_weights": "gaussian",
    }
    cfg = fp.LoraConfig(**kw)
    for name, value in kw.items():
        assert getattr(cfg, name) == value, name
        assert type(getattr(cfg, name)) is type(value), name
    assert fp.LoraConfig(target_modules="ALL-LINEAR").target_modules == "ALL-LINEAR"


# --------------------------------------------------------------------------------------------------------------
# PEFT compatibility: names, defaults and accepted keyword sets
# --------------------------------------------------------------------------------------------------------------


def _loosely_equal(ours, theirs) -> bool:
    """PEFT turns target lists into sets; compare containers by their contents."""
    if isinstance(theirs, (set, frozenset)) and isinstance(ours, (list, tuple, set, frozenset)):
        return set(ours) == set(theirs)
    return ours == theirs


def test_every_field_exists_in_peft_with_the_same_default():
    peft = oracle("peft")
    ours, theirs = fp.LoraConfig(), peft.LoraConfig()
    names = [f.name for f in dataclasses.fields(fp.LoraConfig)]
    assert {"r", "lora_alpha", "target_modules", "rank_pattern", "lora_bias"} <= set(names)
    for name in names:
        assert hasattr(theirs, name), f"funcpeft field {name!r} is not a peft.LoraConfig field"
        assert _loosely_equal(getattr(ours, name), getattr(theirs, name)), (
            name,
            getattr(ours, name),
            getattr(theirs, name),
        )


def test_mutable_defaults_are_not_shared():
    a, b = fp.LoraConfig(), fp.LoraConfig()
    assert a.rank_pattern == {} and a.alpha_pattern == {}
    assert a.rank_pattern is not b.rank_pattern


PEFT_KWARGS = [
    {},
    {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    {"target_modules": "all-linear"},
    {"target_modules": r".*\.(q|v)_proj", "exclude_modules": ["lm_head"]},
    {"target_modules": ["c_attn"], "bias": "lora_only", "fan_in_fan_out": True},
    {"target_modules": ["q_proj"], "bias": "all", "lora_alpha": 16.0},
    {"target_modules": ["q_proj"], "use_rslora": True, "use_dora": True},
    {"target_modules": ["q_proj"], "init_lora_weights": False},
    {"target_modules": ["q_proj"], "init_lora_weights": "gaussian"},
    {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 16}},
    {"target_modules": ["q_proj"], "layers_to_transform": [0, 1], "layers_pattern": "layers"},
    {"target_modules": ["q_proj"], "layers_to_transform": 0},
    {"target_modules": ["query"], "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"},
    {"target_modules": ["q_proj"], "lora_bias": True},
    {"target_modules": ["q_proj"], "exclude_modules": r".*layers\.0\..*"},
    {"task_type": "CAUSAL_LM"},
]


@pytest.mark.parametrize("kwargs", PEFT_KWARGS, ids=[repr(kw) for kw in PEFT_KWARGS])
def test_accepts_the_kwargs_peft_accepts(kwargs):
    peft = oracle("peft")
    theirs = peft.LoraConfig(**kwargs)
    ours = fp.LoraConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(ours, name) == value, name
    for f in dataclasses.fields(fp.LoraConfig):
        assert _loosely_equal(getattr(ours, f.name), getattr(theirs, f.name)), (
            f.name,
            getattr(ours, f.name),
            getattr(theirs, f.name),
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layers_pattern": "layers"},
        {"target_modules": r".*q_proj", "layers_to_transform": [0]},
        {"lora_bias": True, "use_dora": True},
        {"lora_bias": True, "init_lora_weights": "gaussian"},
        {"task_type": "causal_lm"},
        {"task_type": "CLASSIFICATION"},
    ],
)
def test_rejects_what_peft_rejects(kwargs):
    peft = oracle("peft")
    with pytest.raises(ValueError):
        peft.LoraConfig(**kwargs)
    with pytest.raises(ValueError):
        fp.LoraConfig(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# numpy scalars, task types, non-finite numbers, regexes
# --------------------------------------------------------------------------------------------------------------


def test_numpy_scalars_are_stored_as_the_python_numbers_they_equal(tmp_path):
    numpy_kw = {
        "r": np.int64(4),
        "lora_alpha": np.float32(8),
        "lora_dropout": np.float64(0.25),
        "rank_pattern": {"lin0": np.int32(2)},
        "alpha_pattern": {"lin1": np.float16(3.5)},
        "layers_to_transform": [np.int64(0)],
    }
    plain_kw = {
        "r": 4,
        "lora_alpha": 8.0,
        "lora_dropout": 0.25,
        "rank_pattern": {"lin0": 2},
        "alpha_pattern": {"lin1": 3.5},
        "layers_to_transform": [0],
    }
    ours = fp.LoraConfig(target_modules=["lin0", "lin1"], **numpy_kw)
    for name, value in plain_kw.items():
        got = getattr(ours, name)
        assert got == value and type(got) is type(value), (name, got)
        if isinstance(value, dict):
            assert all(type(got[k]) is type(v) for k, v in value.items()), (name, got)
        if isinstance(value, list):
            assert all(type(g) is type(v) for g, v in zip(got, value, strict=True)), (name, got)
    assert ours == fp.LoraConfig(target_modules=["lin0", "lin1"], **plain_kw)
    assert "np." not in repr(ours)
    json.dumps(ours.to_peft_dict())
    # the whole save path: a config with numpy scalars saves and loads like one with Python numbers
    cfg = fp.LoraConfig(target_modules=["lin0"], r=np.int64(4), lora_alpha=np.float32(8))
    params, _ = fp.adapt(MLP(), cfg)
    fp.save(tmp_path, params, cfg)
    _, loaded = fp.load(tmp_path)
    assert (loaded.r, loaded.lora_alpha) == (4, 8.0)


def test_numpy_scalars_in_adalora_fields_are_plain_numbers():
    cfg = fp.AdaLoraConfig(
        total_step=np.int64(100), init_r=np.int64(6), target_r=np.int32(4), beta1=np.float32(0.5),
        orth_reg_weight=np.float64(0.1), tinit=np.int64(1), tfinal=np.int64(2), deltaT=np.int64(3),
    )  # fmt: skip
    for name in ("total_step", "init_r", "target_r", "tinit", "tfinal", "deltaT"):
        assert type(getattr(cfg, name)) is int, name
    for name in ("beta1", "orth_reg_weight"):
        assert type(getattr(cfg, name)) is float, name
    assert cfg.beta1 == 0.5
    json.dumps(cfg.to_peft_dict())


def test_a_number_no_float_holds_exactly_is_refused_not_rounded():
    with pytest.raises(TypeError, match=r"`lora_alpha`.*Fraction\(1, 3\)"):
        fp.LoraConfig(lora_alpha=Fraction(1, 3))
    with pytest.raises(TypeError, match=r"`alpha_pattern\['a'\]`"):
        fp.LoraConfig(alpha_pattern={"a": Fraction(1, 3)})
    assert fp.LoraConfig(lora_alpha=Fraction(1, 2)).lora_alpha == 0.5  # exactly representable: kept as 0.5


def test_task_types_are_peft_s():
    peft = oracle("peft")
    for task_type in list(peft.TaskType):
        assert fp.LoraConfig(task_type=task_type).task_type == task_type
        assert fp.LoraConfig(task_type=task_type.value).task_type == task_type.value
        assert fp.IA3Config(task_type=task_type.value).task_type == task_type.value
    with pytest.raises(ValueError, match=r"`task_type`.*'causal'.*did you mean 'CAUSAL_LM'"):
        fp.LoraConfig(task_type="causal")
    with pytest.raises(ValueError, match="`task_type`"):
        fp.IA3Config(task_type="causal_lm")
    with pytest.raises(ValueError):
        peft.IA3Config(task_type="causal_lm")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beta1": float("nan")}, "beta1"),
        ({"beta2": float("inf")}, "beta2"),
        ({"orth_reg_weight": float("inf")}, "orth_reg_weight"),
        ({"orth_reg_weight": float("nan")}, "orth_reg_weight"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
    ],
)
def test_adalora_non_finite_numbers_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=rf"`{field}`.*(nan|inf)"):
        fp.AdaLoraConfig(total_step=10, **kwargs)


REGEX_FIELDS = [
    (fp.LoraConfig, {"target_modules": "model.(q|v_proj"}, "target_modules", "model.(q|v_proj"),
    (fp.LoraConfig, {"target_modules": ["q"], "exclude_modules": "lin[0"}, "exclude_modules", "lin[0"),
    (fp.LoraConfig, {"rank_pattern": {"q_proj": 2, "*.v_proj": 4}}, "rank_pattern", "*.v_proj"),
    (fp.LoraConfig, {"alpha_pattern": {"(q": 2}}, "alpha_pattern", "(q"),
    (fp.LoraConfig, {"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": "lay(ers"},
     "layers_pattern", "lay(ers"),
    (fp.LoraConfig, {"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": ["h", "h["]},
     "layers_pattern", "h["),
    (fp.IA3Config, {"target_modules": "lin**"}, "target_modules", "lin**"),
    (fp.IA3Config, {"target_modules": ["lin0"], "exclude_modules": "("}, "exclude_modules", "("),
    (fp.IA3Config, {"target_modules": ["lin0"], "feedforward_modules": "lin0)"}, "feedforward_modules", "lin0)"),
    (fp.AdaLoraConfig, {"total_step": 10, "target_modules": "[q"}, "target_modules", "[q"),
]  # fmt: skip


@pytest.mark.parametrize(("cls", "kwargs", "field", "pattern"), REGEX_FIELDS)
def test_an_invalid_regex_is_a_value_error_naming_the_field_and_pattern(cls, kwargs, field, pattern):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert f"`{field}`" in message and repr(pattern) in message and "regular expression" in message, message


def test_list_entries_are_names_not_regexes():
    # as in PEFT, list entries are compared as strings, so regex syntax in them is not an error
    cfg = fp.LoraConfig(target_modules=["q(", "v["], exclude_modules=["*"])
    assert cfg.target_modules == ["q(", "v["]
    fp.IA3Config(target_modules=["q("], feedforward_modules=["q("])


def test_an_invalid_regex_is_refused_by_adapt_and_inject_before_touching_the_model():
    # the config cannot be built, so neither adapt nor inject_adapter_in_model gets to a bare re.error
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="rank_pattern"):
        fp.adapt(model, fp.LoraConfig(target_modules=["lin0"], rank_pattern={"lin(": 2}))
    with pytest.raises(ValueError, match="target_modules"):
        fp.inject_adapter_in_model(fp.LoraConfig(target_modules="lin("), model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
