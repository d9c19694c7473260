"""Hostile cases for configs and targeting, with PEFT's ``get_peft_model`` as the oracle.

For each config class, the adapted modules, their ranks and the fully trained copies must be the ones PEFT
builds from the same keywords on the same model; PEFT's ``adapter_config.json`` must load into the config it
describes, and a field funcpeft does not model must be refused unless its value leaves the feature off.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from torch import nn

import funcpeft as fp
from funcpeft.methods.loha import LoHaConfig
from funcpeft.methods.lokr import LoKrConfig
from funcpeft.methods.oft import OFTConfig
from funcpeft.methods.trainable_tokens import TrainableTokensConfig
from funcpeft.methods.vera import VeraConfig
from tests._models import oracle, tiny_gpt2, tiny_llama

peft = oracle("peft")
transformers = oracle("transformers")

# --------------------------------------------------------------------------------------------------------------
# models and the two sides
# --------------------------------------------------------------------------------------------------------------


def tiny_t5() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2
    )
    return transformers.T5ForConditionalGeneration(config).eval()


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8,
        patch_size=4, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config).eval()


def tiny_clip() -> nn.Module:
    torch.manual_seed(0)
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = transformers.CLIPConfig(
        text_config={**tower, "vocab_size": 50, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={**tower, "image_size": 8, "patch_size": 4},
        projection_dim=8,
    )
    return transformers.CLIPModel(config).eval()


def tiny_distilbert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, num_labels=2)
    return transformers.DistilBertForSequenceClassification(config).eval()


class Dicts(nn.Module):
    """Linears inside ``nn.ModuleDict``s, in a numbered stack and under a named dict."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
        self.layers = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(4, 4), "v": nn.Linear(4, 4)}) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5, "vit": tiny_vit, "clip": tiny_clip, "dicts": Dicts}
CLASSES = {
    "lora": (fp.LoraConfig, peft.LoraConfig),
    "ia3": (fp.IA3Config, peft.IA3Config),
    "loha": (LoHaConfig, peft.LoHaConfig),
    "lokr": (LoKrConfig, peft.LoKrConfig),
    "vera": (VeraConfig, peft.VeraConfig),
    "oft": (OFTConfig, peft.OFTConfig),
}


def peft_side(model: nn.Module, peft_config) -> tuple[dict[str, int | None], list[str]]:
    """``{adapted path: rank}`` and the ``ModulesToSaveWrapper`` paths of ``get_peft_model`` on a copy."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(copy.deepcopy(model), peft_config).base_model.model
    ranks = {
        path: getattr(module, "r", {}).get("default") if isinstance(getattr(module, "r", None), dict) else None
        for path, module in adapted.named_modules()
        if isinstance(module, BaseTunerLayer)
    }
    saved = [path for path, module in adapted.named_modules() if type(module).__name__ == "ModulesToSaveWrapper"]
    return ranks, sorted(saved)


def funcpeft_side(model: nn.Module, config: fp.AdapterConfig) -> tuple[dict[str, int | None], list[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fp.FuncpeftWarning)
        params, fwd = fp.adapt(model, config)
    ranks = {}
    for path in fwd.targets:
        a = params[path].get("lora_A", params[path].get("lora_embedding_A"))
        ranks[path] = None if a is None else a.shape[0]
    return ranks, sorted(k for k in params if k and k not in fwd.targets)  # "": VeRA's shared projections


def assert_same_as_peft(model_name: str, method: str, kwargs: dict) -> None:
    model = MODELS[model_name]()
    ours, theirs = CLASSES[method]
    want_ranks, want_saved = peft_side(model, theirs(**copy.deepcopy(kwargs)))  # PEFT extends modules_to_save
    got_ranks, got_saved = funcpeft_side(model, ours(**kwargs))
    assert set(got_ranks) == set(want_ranks)
    if method == "lora":
        assert got_ranks == want_ranks
    assert got_saved == want_saved


# --------------------------------------------------------------------------------------------------------------
# bugs: layers_to_transform and modules_to_save followed funcpeft's own rules, not PEFT's
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "loha"])
def test_a_full_path_entry_is_adapted_whatever_layers_to_transform_says_as_in_peft(method):
    # PEFT's check_target_module_exists: `key in target_modules` adapts the module before any layer filter.
    kwargs = {"target_modules": ["model.layers.1.self_attn.q_proj", "v_proj"], "layers_to_transform": [0]}
    assert_same_as_peft("llama", method, kwargs)


@pytest.mark.parametrize("layers", [[], 1])
def test_an_empty_layers_to_transform_restricts_nothing_as_in_peft(layers):
    assert_same_as_peft("llama", "lora", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": layers})


def test_modules_to_save_matches_a_plain_suffix_as_peft_and_loads_its_checkpoint(tmp_path):
    # PEFT's _set_trainable: `key.endswith(name)`, so "classifier" trains DistilBERT's pre_classifier too, and
    # PEFT's checkpoint holds its copy (funcpeft refused the file as having unexpected keys).
    model = tiny_distilbert()
    kwargs = {"target_modules": ["q_lin"], "modules_to_save": ["classifier"]}
    want_ranks, want_saved = peft_side(model, peft.LoraConfig(**copy.deepcopy(kwargs)))
    got_ranks, got_saved = funcpeft_side(model, fp.LoraConfig(**kwargs))
    assert got_saved == want_saved == ["classifier", "pre_classifier"]
    assert got_ranks == want_ranks

    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **copy.deepcopy(kwargs)))
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        twin.save_pretrained(tmp_path)
    params, config = fp.load(tmp_path)
    _, fwd = fp.adapt(model, config)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(fwd(params, input_ids=ids).logits, twin(input_ids=ids).logits)


def test_modules_to_save_that_only_ends_a_module_name_trains_it_as_peft():
    assert_same_as_peft("llama", "lora", {"target_modules": ["q_proj"], "modules_to_save": ["head"]})


# --------------------------------------------------------------------------------------------------------------
# bug: an unmodelled field set to 0 passed as "off" (0 == False)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.0, 1])
def test_an_unknown_field_set_to_a_number_is_refused_not_taken_for_false(value):
    data = {"peft_type": "LORA", "target_modules": ["q_proj"], "future_feature_steps": value}
    with pytest.raises(ValueError, match="future_feature_steps"):
        fp.LoraConfig.from_peft_dict(data)


@pytest.mark.parametrize("value", [None, False, [], {}])
def test_an_unknown_field_that_leaves_its_feature_off_is_accepted(value):
    data = {"peft_type": "LORA", "target_modules": ["q_proj"], "use_bdlora": value}
    assert fp.LoraConfig.from_peft_dict(data) == fp.LoraConfig(target_modules=["q_proj"])


# --------------------------------------------------------------------------------------------------------------
# checked and already right: a matrix of targeting cases against get_peft_model
# --------------------------------------------------------------------------------------------------------------

MATRIX = [
    ("t5", "lora", {"target_modules": "all-linear"}),
    ("t5", "lora", {"target_modules": None}),
    ("t5", "lora", {"target_modules": ["q", "v"], "layers_to_transform": [1], "layers_pattern": "block"}),
    ("t5", "lora", {"target_modules": ["q", "v"], "exclude_modules": ["decoder"]}),
    ("vit", "lora", {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
    ("clip", "lora", {"target_modules": "all-linear"}),
    ("clip", "lora", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0], "layers_pattern": "layers"}),
    ("gpt2", "lora", {"target_modules": ["c_attn"], "modules_to_save": ["h.0.mlp"]}),
    ("gpt2", "lora", {"target_modules": "all-linear", "modules_to_save": ["0.attn"]}),
    ("dicts", "lora", {"target_modules": ["a", "q"], "rank_pattern": {"q": 2, r"layers\.1\.q": 5}}),
    ("dicts", "lora", {"target_modules": r"heads\..*", "alpha_pattern": {"a": 3}}),
    ("llama", "lora", {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"model.layers.0.self_attn.q_proj": 3}}),
    ("llama", "lora", {"target_modules": ["q_proj"], "exclude_modules": r".*layers\.1.*", "layers_to_transform": [0]}),
    ("llama", "ia3", {"target_modules": r".*proj", "feedforward_modules": r".*down_proj"}),
    ("llama", "loha", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 0, "rank_pattern": {"q": 2}}),
    ("llama", "lokr", {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*1.*"}),
    ("llama", "vera", {"target_modules": ["q_proj", "o_proj"]}),
    ("llama", "oft", {"target_modules": ["q_proj", "v_proj"], "r": 4, "oft_block_size": 0, "layers_to_transform": 1}),
]


@pytest.mark.parametrize(("model_name", "method", "kwargs"), MATRIX)
def test_targets_ranks_and_copies_match_get_peft_model(model_name, method, kwargs):
    assert_same_as_peft(model_name, method, kwargs)


# --------------------------------------------------------------------------------------------------------------
# checked and already right: PEFT's adapter_config.json loads into the config it describes, for every class
# --------------------------------------------------------------------------------------------------------------

ROUND_TRIPS = [
    (fp.LoraConfig, peft.LoraConfig, {
        "r": 4, "lora_alpha": 16.5, "lora_dropout": 0.1, "target_modules": {"q_proj", "v_proj"},
        "exclude_modules": ["x"], "bias": "lora_only", "use_rslora": True, "init_lora_weights": "gaussian",
        "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}, "layers_to_transform": [0, 1],
        "layers_pattern": "layers", "modules_to_save": ["lm_head"], "task_type": "CAUSAL_LM",
        "trainable_token_indices": {"embed_tokens": [1, 2]}, "fan_in_fan_out": True,
    }),
    (fp.LoraConfig, peft.LoraConfig, {
        "target_modules": ("q_proj",), "layers_to_transform": 3, "layers_pattern": ["layers", "h"], "use_dora": True,
        "init_lora_weights": "pissa_niter_4", "exclude_modules": r".*0.*",
    }),
    (fp.IA3Config, peft.IA3Config, {
        "target_modules": ["k", "down"], "feedforward_modules": {"down"}, "init_ia3_weights": False,
    }),
    (fp.AdaLoraConfig, peft.AdaLoraConfig, {
        "target_modules": ["q"], "init_r": 6, "target_r": 3, "tinit": 2, "tfinal": 3, "deltaT": 2, "beta1": 0.5,
        "beta2": 0.6, "orth_reg_weight": 0.1, "total_step": 20, "rank_pattern": {"a.q.lora_E": [True, False]},
    }),
    (LoHaConfig, peft.LoHaConfig, {
        "target_modules": ["q"], "r": 3, "alpha": 5, "rank_dropout": 0.1, "module_dropout": 0.2,
        "use_effective_conv2d": True, "rank_pattern": {"q": 2}, "alpha_pattern": {"q": 1}, "init_weights": False,
    }),
    (LoKrConfig, peft.LoKrConfig, {
        "target_modules": ["q"], "r": 3, "alpha": 5, "decompose_both": True, "decompose_factor": 2,
        "rank_dropout_scale": True,
    }),
    (VeraConfig, peft.VeraConfig, {
        "target_modules": ["q"], "r": 16, "projection_prng_key": 7, "vera_dropout": 0.1, "d_initial": 0.3,
    }),
    (OFTConfig, peft.OFTConfig, {
        "target_modules": ["q"], "r": 0, "oft_block_size": 4, "coft": True, "eps": 1e-4, "block_share": True,
        "use_cayley_neumann": False, "module_dropout": 0.1,
    }),
    (TrainableTokensConfig, peft.TrainableTokensConfig, {
        "target_modules": ["embed"], "token_indices": [1, 5], "init_weights": False,
    }),
]  # fmt: skip

_NAME_LISTS = ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save")


def _comparable(name: str, value: object) -> object:
    return sorted(value) if name in _NAME_LISTS and isinstance(value, (set, frozenset, tuple, list)) else value


@pytest.mark.parametrize(("ours", "theirs", "kwargs"), ROUND_TRIPS, ids=lambda v: getattr(v, "__name__", ""))
def test_peft_s_saved_config_loads_field_by_field(tmp_path, ours, theirs, kwargs):
    theirs(**kwargs).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = ours.from_peft_dict(data)
    original = theirs(**kwargs)
    for f in dataclasses.fields(loaded):
        assert _comparable(f.name, getattr(loaded, f.name)) == _comparable(f.name, getattr(original, f.name)), f.name
    # and what funcpeft writes reads back in PEFT as the same config
    (tmp_path / "adapter_config.json").write_text(json.dumps(ours(**kwargs).to_peft_dict()))
    back = theirs.from_pretrained(tmp_path).to_dict()
    for key, value in original.to_dict().items():
        if key not in ("inference_mode", "peft_version", "runtime_config", "modules_to_save"):
            assert _comparable(key, back[key]) == _comparable(key, value), key
