"""Hostile checkpoints and saves: folders whose config and weights disagree, PEFT features funcpeft would misread,
tensors that cannot be written, paths that are files, concurrent saves from threads, and PEFT's file layout for
named, bf16 and trainable-token adapters (funcpeft.io, funcpeft._io_state_dict)."""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from _models import MLP, oracle, tiny_gpt2, tiny_llama, token_ids
from safetensors import safe_open
from safetensors.torch import save_file

import funcpeft as fp

peft = oracle("peft")

# PEFT's save_pretrained calls a transformers method that transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

FILES = ["adapter_config.json", "adapter_model.safetensors"]


def _adapter(seed: int = 0, **kw: Any) -> tuple[fp.Params, fp.LoraConfig]:
    config = fp.LoraConfig(**{"target_modules": ["lin0", "lin1"], "init_lora_weights": False, **kw})
    params, _ = fp.adapt(MLP(), config, generator=torch.Generator().manual_seed(seed))
    return params, config


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _perturbed(model: torch.nn.Module, config: Any, adapter_name: str = "default") -> Any:
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return peft_model.eval()


# ----- a config and weights that disagree ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peft_type", "extra"),
    [
        ("IA3", {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}),
        ("ADALORA", {"target_modules": ["lin0"], "total_step": 10}),
    ],
    ids=["ia3", "adalora"],
)
def test_lora_weights_under_another_methods_config_are_refused_naming_both(
    tmp_path: Path, peft_type: str, extra: dict[str, Any]
) -> None:
    # The LoRA tensors used to be taken for base-model embedding weights: load returned an empty adapter.
    params, config = _adapter()
    fp.save(tmp_path, params, config)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, **extra}))
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors.*lora_[AB]\.weight.*LORA tensor.*{peft_type}"):
        fp.load(tmp_path)


def test_peft_in_memory_keys_with_the_adapter_name_are_refused_saying_so() -> None:
    torch.manual_seed(0)
    model = MLP()
    peft_model = _perturbed(copy.deepcopy(model), peft.LoraConfig(target_modules=["lin0", "lin1"]))
    state = {k: v for k, v in peft_model.state_dict().items() if ".lora_" in k}  # lin0.lora_A.default.weight
    config = fp.LoraConfig(target_modules=["lin0", "lin1"])
    with pytest.raises(ValueError, match=r"lin0\.lora_A\.default\.weight.*adapter name \('default'\)"):
        fp.from_peft_state_dict(state, config)
    # the saved keys (no adapter name) are what it reads
    params = fp.from_peft_state_dict(peft.get_peft_model_state_dict(peft_model), config)
    x = torch.randn(3, 10)
    torch.testing.assert_close(fp.adapt(model, config)[1](params, x), peft_model(x), rtol=1e-6, atol=1e-6)


def test_an_empty_weights_file_and_a_bin_of_non_names_are_refused_naming_the_file(tmp_path: Path) -> None:
    params, config = _adapter()
    fp.save(tmp_path, params, config)
    save_file({}, tmp_path / "adapter_model.safetensors")  # used to load as {} and fail later, in fwd
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors' holds no adapter tensors"):
        fp.load(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({0: torch.zeros(8, 10)}, tmp_path / "adapter_model.bin")  # used to be an AttributeError
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*dict of tensors by name"):
        fp.load(tmp_path)
    with pytest.raises(ValueError, match="keys must be str"):
        fp.from_peft_state_dict({0: torch.zeros(8, 10)}, config)  # type: ignore[dict-item]


# ----- PEFT's ensure_weight_tying ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [{"modules_to_save": ["lm_head"]}, {"target_modules": ["q_proj", "embed_tokens"]}],
    ids=["tied-head-copy", "tied-embedding-lora"],
)
def test_checkpoints_that_tie_adapters_with_ensure_weight_tying_are_refused(tmp_path: Path, kw: dict[str, Any]) -> None:
    # PEFT shares the trained copy / LoRA of the tied embedding with the head; funcpeft silently did not.
    transformers = oracle("transformers")
    config = tiny_llama(n_layer=1).config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    lora = peft.LoraConfig(**{"target_modules": ["q_proj"], **kw, "ensure_weight_tying": True})
    _perturbed(copy.deepcopy(model), lora).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"adapter_config\.json.*ensure_weight_tying.*cannot be loaded faithfully"):
        fp.load(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match=r"mine\.json sets `ensure_weight_tying`=True"):  # the config class too
        fp.LoraConfig.from_peft_dict(data, source="mine.json")


def test_ensure_weight_tying_without_tied_adapter_layers_still_loads_as_peft(tmp_path: Path) -> None:
    model = tiny_gpt2(n_layer=1)
    lora = peft.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, ensure_weight_tying=True)
    with pytest.warns(UserWarning, match="ensure_weight_tying"):  # PEFT: nothing to tie
        peft_model = _perturbed(copy.deepcopy(model), lora)
    peft_model.save_pretrained(tmp_path)
    params, config = fp.load(tmp_path)
    ids = token_ids()
    torch.testing.assert_close(fp.adapt(model, config)[1](params, ids).logits, peft_model(ids).logits)


# ----- what save cannot write ------------------------------------------------------------------------------------


def test_meta_tensors_are_refused_before_the_folder_is_touched(tmp_path: Path) -> None:
    params, config = _adapter()
    fp.save(tmp_path / "ckpt", params, config)
    before = _snapshot(tmp_path / "ckpt")
    meta = optree.tree_map(lambda t: torch.empty_like(t, device="meta"), params)
    for folder in (tmp_path / "ckpt", tmp_path / "new"):
        with pytest.raises(ValueError, match=r"params\['lin0'\]\['lora_A'\].*meta device"):
            fp.save(folder, meta, config)
    assert _snapshot(tmp_path / "ckpt") == before
    assert not (tmp_path / "new").exists()


def test_a_path_that_is_or_lies_under_a_file_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    params, config = _adapter()
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt' is a file, not a folder"):
        fp.save(file, params, config)
    with pytest.raises(ValueError, match=r"notes\.txt/sub' lies under .*notes\.txt', which is a file"):
        fp.save(file / "sub", params, config)
    assert file.read_text() == "mine" and os.listdir(tmp_path) == ["notes.txt"]


def test_views_shared_storage_and_one_tensor_twice_are_saved_as_their_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    config = fp.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False)
    block = torch.randn(8, 40)
    b = torch.randn(20, 8)
    params = {
        "lin0": {"lora_A": block[:, 30:], "lora_B": b},  # a non-contiguous view ...
        "lin1": {"lora_A": block[:, 5:25], "lora_B": b},  # ... overlapping storage, and the same B twice
    }
    fp.save(tmp_path, params, config)
    loaded, _ = fp.load(tmp_path)
    optree.tree_map(lambda a, c: torch.testing.assert_close(a, c, rtol=0, atol=0), loaded, params)
    x = torch.randn(3, 10)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    torch.testing.assert_close(peft_model(x), fp.adapt(model, config)[1](params, x))


def test_saves_from_two_threads_to_one_folder_never_tear_it(tmp_path: Path) -> None:
    adapters = [_adapter(0, r=2, lora_alpha=4), _adapter(1, r=4, lora_alpha=16, target_modules=["lin0"])]
    fp.save(tmp_path, *adapters[0])
    errors: list[BaseException] = []
    reads: list[int] = []

    def saver(k: int) -> None:
        try:
            for _ in range(15):
                fp.save(tmp_path, *adapters[k])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=saver, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        params, config = fp.load(tmp_path)
        k = [c for _, c in adapters].index(config)  # the config is one of the two ...
        reads.append(k)
        for path, entry in adapters[k][0].items():  # ... and the tensors are the ones saved with it
            assert params.keys() == adapters[k][0].keys()
            assert all(torch.equal(params[path][n], v) for n, v in entry.items())
    for t in threads:
        t.join()
    assert not errors and reads and sorted(os.listdir(tmp_path)) == FILES


# ----- PEFT's files, key for key ---------------------------------------------------------------------------------


def test_a_named_bf16_adapter_with_patterns_dora_and_tokens_round_trips_peft_files_key_for_key(tmp_path: Path) -> None:
    # PEFT writes a non-default adapter to <path>/<name>/, without the name in its keys
    torch.manual_seed(0)
    model = tiny_llama(n_layer=1).to(torch.bfloat16)
    kw = {
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "r": 4,
        "rank_pattern": {"v_proj": 2},
        "alpha_pattern": {"down_proj": 3},
        "use_dora": True,
        "modules_to_save": ["lm_head"],
        "trainable_token_indices": [3, 7],
        "init_lora_weights": False,
    }
    peft_model = _perturbed(copy.deepcopy(model), peft.LoraConfig(**kw), adapter_name="mine")
    peft_model.to(torch.bfloat16)
    peft_model.save_pretrained(tmp_path / "peft")
    folder = tmp_path / "peft" / "mine"
    params, config = fp.load(folder)
    fp.save(tmp_path / "fp", params, config)
    with safe_open(folder / FILES[1], "pt") as a, safe_open(tmp_path / "fp" / FILES[1], "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():  # noqa: SIM118 - safe_open is not a dict
            ta, tb = a.get_tensor(key), b.get_tensor(key)
            assert ta.dtype == tb.dtype == torch.bfloat16 and torch.equal(ta, tb), key
    theirs = json.loads((folder / FILES[0]).read_text())
    ours = json.loads((tmp_path / "fp" / FILES[0]).read_text())
    for key in set(theirs) - {"peft_version", "auto_mapping"}:
        assert ours[key] == theirs[key], key
    ids = token_ids()
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder, autocast_adapter_dtype=False).eval()
    expected = reloaded(ids).logits
    torch.testing.assert_close(fp.adapt(model, config)[1](params, ids).logits, expected, rtol=1.6e-2, atol=1e-2)
    ours_in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fp", autocast_adapter_dtype=False)
    torch.testing.assert_close(ours_in_peft.eval()(ids).logits, expected, rtol=0, atol=0)
