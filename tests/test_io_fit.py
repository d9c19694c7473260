"""``save`` refuses trees that do not fit their config, ``to_peft_state_dict`` names every method's tensors without a
config, ``load`` reads PEFT folders holding base embedding weights, and oversized or deeply nested configs are
refused by name (funcpeft._fit, funcpeft.io)."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import MLP, ConvNet, EmbNet, oracle, tiny_llama, token_ids
from safetensors import safe_open

import funcpeft as fp
from funcpeft import adalora

peft = oracle("peft")

ADALORA = {"total_step": 10, "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "target_modules": ["lin0", "lin1"]}


def _lora(**kw: Any) -> tuple[fp.Params, fp.LoraConfig]:
    config = fp.LoraConfig(**{"target_modules": ["lin0", "lin1"], **kw})
    return fp.adapt(MLP(), config)[0], config


# ----- the method of a tree without its config -------------------------------------------------------------------


def test_to_peft_state_dict_without_config_names_adalora_and_ia3_tensors_as_peft() -> None:
    for config in (fp.AdaLoraConfig(**ADALORA), fp.IA3Config(target_modules=["lin0", "lin1"])):
        params, _ = fp.adapt(MLP(), config)
        state = fp.to_peft_state_dict(params)
        assert state.keys() == fp.to_peft_state_dict(params, config).keys()
        assert all(k.endswith(("lora_A", "lora_B", "lora_E", "ia3_l")) for k in state), sorted(state)
        back = fp.from_peft_state_dict(state, config)
        assert all(torch.equal(back[p][n], t) for p, e in params.items() for n, t in e.items())


def test_a_tree_mixing_methods_is_refused_and_copies_alone_use_lora_names() -> None:
    lora, _ = _lora()
    ia3_config = fp.IA3Config(target_modules=["lin1"])
    ia3, _ = fp.adapt(MLP(), ia3_config)
    mixed = {"lin0": lora["lin0"], "lin1": ia3["lin1"]}
    with pytest.raises(ValueError, match=r"mixes.*'lin0'.*'lora_A'.*'lin1'.*'ia3_l'|mixes.*'lin1'.*'ia3_l'.*'lin0'"):
        fp.to_peft_state_dict(mixed)
    with pytest.raises(ValueError, match=r"`params\['lin0'\]\['lora_A'\]` is a tensor of .*lora.*IA3Config"):
        fp.to_peft_state_dict(mixed, ia3_config)
    copies = {"head": {"weight": torch.zeros(4, 20), "bias": torch.zeros(4)}}
    assert set(fp.to_peft_state_dict(copies)) == {"base_model.model.head.weight", "base_model.model.head.bias"}


# ----- save refuses trees that do not fit the config, and leaves the old checkpoint -------------------------------


def _edit(params: fp.Params, path: str, **tensors: torch.Tensor | None) -> fp.Params:
    out = {p: dict(e) for p, e in params.items()}
    for name, value in tensors.items():
        name = name.replace("__", ".")
        if value is None:
            del out[path][name]
        else:
            out[path][name] = value
    return out


def _adalora_pruned(full: bool = False) -> tuple[fp.Params, fp.AdaLoraConfig]:
    config = fp.AdaLoraConfig(**ADALORA)
    params, _ = fp.adapt(MLP(), config, generator=torch.Generator().manual_seed(0))
    config = config.replace(
        rank_pattern={"lin0.lora_E": [True, False, True, False], "lin1.lora_E": [True] * 3 + [False]}
    )
    return (params if full else adalora.prune(params, config)), config


Case = Callable[[], tuple[fp.Params, Any]]
BAD: list[tuple[str, Case, type[Exception], str]] = [
    ("rank-8-r-4", lambda: (_lora(r=8)[0], _lora(r=4)[1]), ValueError,
     r"'lin0'.*'lora_A' has shape \(8, 10\), so rank 8, but the config gives this module rank 4 \(`r=4`\)"),
    ("rank_pattern", lambda: (_lora(r=4)[0], _lora(r=4, rank_pattern={"lin1": 2})[1]), ValueError,
     r"'lin1'.*\(4, 20\).*rank 2 \(`rank_pattern` gives 2\)"),
    ("B-rank", lambda: (_edit(_lora()[0], "lin1", lora_B=torch.zeros(20, 3)), _lora()[1]), ValueError,
     r"'lin1'.*'lora_B' has shape \(20, 3\), which does not fit 'lora_A' \(8, 20\)"),
    ("no-lora_B", lambda: (_edit(_lora()[0], "lin0", lora_B=None), _lora()[1]), ValueError,
     r"'lin0'.*lacks \['lora_B'\]"),
    ("dora-missing", lambda: (_lora()[0], _lora(use_dora=True)[1]), ValueError,
     r"'lin0'.*lacks \['lora_magnitude_vector'\]"),
    ("dora-unused", lambda: (_lora(use_dora=True)[0], _lora()[1]), ValueError,
     r"'lin0'.*holds \['lora_magnitude_vector'\], which the config does not use"),
    ("dora-shape", lambda: (_edit(_lora(use_dora=True)[0], "lin0", lora_magnitude_vector=torch.ones(21)),
                            _lora(use_dora=True)[1]), ValueError,
     r"'lin0'.*'lora_magnitude_vector' has shape \(21,\), but 'lora_B' \(20, 8\) makes it \(20,\)"),
    ("lora_bias", lambda: (_edit(_lora(lora_bias=True)[0], "lin1", lora_B__bias=torch.zeros(3)),
                           _lora(lora_bias=True)[1]), ValueError,
     r"'lin1'.*'lora_B.bias' has shape \(3,\).*makes it \(20,\)"),
    ("bias-none", lambda: (_lora(bias="lora_only")[0], _lora()[1]), ValueError,
     r"'lin0'.*holds \['bias'\] beside its adapter tensors.*bias='none'"),
    ("not-a-copy", lambda: (_lora(modules_to_save=["head"])[0], _lora()[1]), ValueError,
     r"'head'.*no lora tensor, and the config trains no copy of it.*modules_to_save"),
    ("embedding", lambda: (fp.adapt(EmbNet(), fp.LoraConfig(target_modules=["emb"], r=6))[0],
                           fp.LoraConfig(target_modules=["emb"], r=4)), ValueError,
     r"'emb'.*'lora_embedding_A' has shape \(6, 20\).*rank 4"),
    ("conv-B", lambda: (_edit(fp.adapt(ConvNet(), fp.LoraConfig(target_modules=["c2"]))[0], "c2",
                              lora_B=torch.zeros(8, 8, 3, 3)), fp.LoraConfig(target_modules=["c2"])), ValueError,
     r"'c2'.*'lora_B' has shape \(8, 8, 3, 3\), which does not fit 'lora_A' \(8, 4, 3, 3\)"),
    ("conv-dora", lambda: (_edit(fp.adapt(ConvNet(), c := fp.LoraConfig(target_modules=["c2"], use_dora=True))[0],
                                 "c2", lora_magnitude_vector=torch.ones(8)), c), ValueError,
     r"'c2'.*'lora_magnitude_vector' has shape \(8,\).*makes it \(1, 8, 1, 1\)"),
    ("adalora-E", lambda: (_edit(fp.adapt(MLP(), c := fp.AdaLoraConfig(**ADALORA))[0], "lin0",
                                 lora_E=torch.zeros(4, 2)), c), ValueError,
     r"'lin0'.*'lora_E' has shape \(4, 2\), but 'lora_A' \(4, 10\) makes it \(4, 1\)"),
    ("adalora-init_r", lambda: (fp.adapt(MLP(), fp.AdaLoraConfig(**ADALORA))[0],
                                fp.AdaLoraConfig(**{**ADALORA, "init_r": 6})), ValueError,
     r"'lin0'.*\(4, 10\), so rank 4, but the config gives this module rank 6 \(`init_r=6`\)"),
    ("adalora-pruned", lambda: (_adalora_pruned()[0], _adalora_pruned()[1].replace(
        rank_pattern={"lin0.lora_E": [True] * 3 + [False], "lin1.lora_E": [True] * 3 + [False]})), ValueError,
     r"'lin0'.*\(2, 10\), so rank 2, but the config gives this module rank 3 or 4 \(its `rank_pattern` mask keeps 3"),
    ("ia3-with-lora-config", lambda: (fp.adapt(MLP(), fp.IA3Config(target_modules=["lin0"]))[0], _lora()[1]),
     ValueError, r"`params\['lin0'\]\['ia3_l'\]` is a tensor of ia3, but `config` is a LoraConfig"),
    ("ia3-orientation", lambda: (fp.adapt(MLP(), fp.IA3Config(target_modules=["lin0", "lin1"]))[0],
                                 fp.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])),
     ValueError, r"'lin1'.*'ia3_l' has shape \(20, 1\), but the config's `feedforward_modules` say .* \(1, in\)"),
    ("int-tensor", lambda: (_edit(_lora()[0], "lin0", lora_A=torch.zeros(8, 10, dtype=torch.int64)), _lora()[1]),
     TypeError, r"`params\['lin0'\]\['lora_A'\]` is a torch.int64 tensor"),
    ("empty-entry", lambda: ({**_lora()[0], "lin2": {}}, _lora()[1]), ValueError, r"'lin2'.*holds no tensors"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "case", "error", "match"), BAD, ids=[c[0] for c in BAD])
def test_save_refuses_params_that_do_not_fit_the_config(
    tmp_path: Path, name: str, case: Case, error: type[Exception], match: str
) -> None:
    good, good_config = _lora()
    fp.save(tmp_path, good, good_config)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    params, config = case()
    with pytest.raises(error, match=match):
        fp.save(tmp_path, params, config)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before
    with pytest.raises(error, match=match):
        fp.save(tmp_path / "new", params, config)
    assert not (tmp_path / "new").exists()


def test_save_accepts_every_shape_its_config_allows(tmp_path: Path) -> None:
    pruned, config = _adalora_pruned()
    full, _ = _adalora_pruned(full=True)
    for params in (pruned, full):  # the kept ranks, or full rank (cut to them on saving, as PEFT)
        fp.save(tmp_path, params, config)
        loaded, _ = fp.load(tmp_path)
        assert all(torch.equal(loaded[p][n], t) for p, e in pruned.items() for n, t in e.items())
    for model, config in (
        (ConvNet(groups=2), fp.LoraConfig(target_modules=["c1", "c2", "c3"], r=4)),  # lora_B (out, r/groups, 1..)
        (MLP(), fp.LoraConfig(target_modules=["lin0"], bias="all", modules_to_save=["head"])),
        (MLP(), fp.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])),
    ):
        fp.save(tmp_path, fp.adapt(model, config)[0], config)


# ----- PEFT folders with base embedding weights (save_embedding_layers="auto") --------------------------------


def _peft_saved(tmp_path: Path, model: torch.nn.Module, **kw: Any) -> Any:
    peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **kw))
    if "base_model_name_or_path" in kw:  # get_peft_model resets it for a model built from a config
        peft_model.peft_config["default"].base_model_name_or_path = kw["base_model_name_or_path"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Setting `save_embedding_layers` to `True`")
        peft_model.save_pretrained(tmp_path / "peft")
    return peft_model.eval()


def test_load_reads_peft_folders_with_the_targeted_embedding_base_weight(tmp_path: Path) -> None:
    model = tiny_llama()
    peft_model = _peft_saved(tmp_path, copy.deepcopy(model), target_modules=["embed_tokens", "q_proj"])
    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.model.embed_tokens.base_layer.weight" in f.keys()  # noqa: SIM118
    params, config = fp.load(tmp_path / "peft")
    assert set(params["model.embed_tokens"]) == {"lora_embedding_A", "lora_embedding_B"}
    _, fwd = fp.adapt(model, config)
    ids = token_ids()
    torch.testing.assert_close(fwd(params, ids).logits, peft_model(ids).logits)
    base = fp.io.read_base_weights(tmp_path / "peft")
    assert base.keys() == {"model.embed_tokens.weight"}
    assert torch.equal(base["model.embed_tokens.weight"], model.model.embed_tokens.weight)


def test_load_reads_peft_folders_with_a_resized_vocabulary_and_says_what_to_load(tmp_path: Path) -> None:
    tiny_llama().config.save_pretrained(tmp_path / "base")  # the base model's vocabulary: 100
    model = tiny_llama()
    model.resize_token_embeddings(110, mean_resizing=False)
    peft_model = _peft_saved(
        tmp_path, copy.deepcopy(model), target_modules=["q_proj"], base_model_name_or_path=str(tmp_path / "base")
    )
    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as f:
        assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(f.keys())
    with pytest.warns(fp.FuncpeftWarning, match=r"'lm_head.weight', 'model.embed_tokens.weight'.*read_base_weights"):
        params, config = fp.load(tmp_path / "peft")
    base = fp.io.read_base_weights(tmp_path / "peft")
    fresh = tiny_llama()
    fresh.resize_token_embeddings(110, mean_resizing=False)  # other random rows than the trained model's
    fresh.load_state_dict(base, strict=False)
    _, fwd = fp.adapt(fresh, config)
    ids = token_ids(vocab=110, seed=3)
    torch.testing.assert_close(fwd(params, ids).logits, peft_model(ids).logits)


# ----- adapter_config.json that is too large or too deeply nested -------------------------------------------------


def test_oversized_or_deeply_nested_configs_are_refused_naming_the_file(tmp_path: Path) -> None:
    params, config = _lora()
    fp.save(tmp_path, params, config)
    config_file = tmp_path / "adapter_config.json"
    data = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**data, "base_model_name_or_path": "x" * (17 << 20)}))
    with pytest.raises(ValueError, match=r"adapter_config\.json' is larger than 16777216 bytes"):
        fp.load(tmp_path)
    for depth in (40, 100_000):
        config_file.write_text('{"peft_type": "LORA", "runtime_config": ' + "[" * depth + "]" * depth + "}")
        with pytest.raises(ValueError, match=r"adapter_config\.json' nests deeper than 32 levels"):
            fp.load(tmp_path)
