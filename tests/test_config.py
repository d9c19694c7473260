"""LoraConfig: validation on construction, immutability, and PEFT-compatible field names and defaults."""

from __future__ import annotations

import dataclasses
import re

import pytest

import funcpeft as fp
from tests._models import oracle

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
]


@pytest.mark.parametrize(("kwargs", "field", "shown"), BAD_VALUES, ids=[repr(kw) for kw, _, _ in BAD_VALUES])
def test_bad_value_names_field_and_value(kwargs, field, shown):
    with pytest.raises((ValueError, TypeError)) as info:
        fp.LoraConfig(**kwargs)
    message = str(info.value)
    assert re.search(rf"`{field}\b", message), f"the message does not name `{field}`: {message}"
    assert shown in message, message


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
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
    ],
)
def test_rejects_what_peft_rejects(kwargs):
    peft = oracle("peft")
    with pytest.raises(ValueError):
        peft.LoraConfig(**kwargs)
    with pytest.raises(ValueError):
        fp.LoraConfig(**kwargs)
