"""``task_type`` as in PEFT: its values, and the task heads PEFT's task models train in full.

PEFT's ``PeftModelForSequenceClassification`` / ``...TokenClassification`` append ``["classifier", "score"]`` and
``PeftModelForQuestionAnswering`` ``["qa_outputs"]`` to ``modules_to_save``. funcpeft resolves the same list at
``adapt`` time without rewriting the user's config. The oracle is ``peft.get_peft_model`` on tiny transformers
models built from configs, with the same weights: the same trainable tensors, outputs and gradients, the same
checkpoint keys and ``modules_to_save`` on disk, and each side loads the other's folders.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _models import MLP, oracle
from safetensors.torch import load_file
from torch import Tensor, nn

import funcpeft as fp
from funcpeft._targeting import find_targets
from funcpeft._validate import TASK_TYPES
from funcpeft.config import TASK_HEADS

VOCAB, BATCH, LENGTH, LABELS = 60, 2, 8, 3


def _bert_config(num_labels: int = LABELS):
    return oracle("transformers").BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_labels,
    )  # fmt: skip


def bert_seq() -> nn.Module:
    torch.manual_seed(0)
    return oracle("transformers").BertForSequenceClassification(_bert_config()).eval()


def bert_tok() -> nn.Module:
    torch.manual_seed(0)
    return oracle("transformers").BertForTokenClassification(_bert_config()).eval()


def bert_qa() -> nn.Module:
    torch.manual_seed(0)
    return oracle("transformers").BertForQuestionAnswering(_bert_config(num_labels=2)).eval()


def llama_seq() -> nn.Module:
    transformers = oracle("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, num_labels=LABELS, pad_token_id=VOCAB - 1,
    )  # fmt: skip
    return transformers.LlamaForSequenceClassification(config).eval()


def distilbert_seq() -> nn.Module:
    # DistilBERT's head is `pre_classifier` + `classifier`: PEFT's plain string-suffix match trains both.
    transformers = oracle("transformers")
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=LABELS,
    )  # fmt: skip
    return transformers.DistilBertForSequenceClassification(config).eval()


def inputs(model: nn.Module, task_type: str, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 1, (BATCH, LENGTH), generator=g)  # never Llama's pad token
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task_type == "SEQ_CLS":
        out["labels"] = torch.randint(0, LABELS, (BATCH,), generator=g)
    elif task_type == "TOKEN_CLS":
        out["labels"] = torch.randint(0, LABELS, (BATCH, LENGTH), generator=g)
    else:
        out["start_positions"] = torch.randint(0, LENGTH, (BATCH,), generator=g)
        out["end_positions"] = torch.randint(0, LENGTH, (BATCH,), generator=g)
    return out


def logits(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else torch.cat([out.start_logits, out.end_logits], -1)


# (model factory, task_type, config kwargs shared by PEFT and funcpeft, method)
LORA = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
CASES: list[tuple[Callable[[], nn.Module], str, dict, str]] = [
    (bert_seq, "SEQ_CLS", {**LORA, "target_modules": ["query", "value"]}, "lora"),
    (llama_seq, "SEQ_CLS", {**LORA, "target_modules": ["q_proj", "v_proj"]}, "lora"),
    (bert_tok, "TOKEN_CLS", {**LORA, "target_modules": ["query", "value"]}, "lora"),
    (bert_qa, "QUESTION_ANS", {**LORA, "target_modules": ["query", "value"]}, "lora"),
    (distilbert_seq, "SEQ_CLS", {**LORA, "target_modules": ["q_lin", "v_lin"]}, "lora"),
    # a head that is also targeted is trained in full, not adapted (PEFT guards targets with modules_to_save)
    (bert_seq, "SEQ_CLS", {**LORA, "target_modules": ["query", "classifier"]}, "lora"),
    # the user's own modules_to_save come first; PEFT appends the heads
    (bert_seq, "SEQ_CLS", {**LORA, "target_modules": ["query"], "modules_to_save": ["pooler"]}, "lora"),
    (bert_seq, "SEQ_CLS", {"r": 4, "target_modules": "all-linear", "init_lora_weights": False}, "lora"),
    (
        bert_seq,
        "SEQ_CLS",
        {"target_modules": ["key", "value", "intermediate.dense"], "feedforward_modules": ["intermediate.dense"]},
        "ia3",
    ),
]
IDS = [f"{f.__name__}-{t}-{m}-{i}" for i, (f, t, _, m) in enumerate(CASES)]


def configs(task_type: str, kw: dict, method: str):
    peft = oracle("peft")
    if method == "ia3":
        return peft.IA3Config(task_type=task_type, **copy.deepcopy(kw)), fp.IA3Config(task_type=task_type, **kw)
    return peft.LoraConfig(task_type=task_type, **copy.deepcopy(kw)), fp.LoraConfig(task_type=task_type, **kw)


def peft_trainable(peft_model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """PEFT's trainable parameters as a funcpeft tree ``{module_path: {name: the parameter itself}}``."""
    tree: dict[str, dict[str, Tensor]] = {}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("base_model.model.")
        if ".modules_to_save.default." in name:
            path, _, tensor = name.partition(".modules_to_save.default.")
        else:
            match = re.fullmatch(r"(.*)\.(lora_A|lora_B|ia3_l)\.default(?:\.weight)?", name)
            assert match is not None, name
            path, tensor = match.groups()
        tree.setdefault(path, {})[tensor] = p
    return tree


def peft_setup(factory, task_type: str, kw: dict, method: str):
    """The base model, PEFT's task model on a copy (its heads moved off the base), and the funcpeft config."""
    peft = oracle("peft")
    model = factory()
    peft_config, config = configs(task_type, kw, method)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking tensors: a head copy that is not applied changes the outputs
        for entry in peft_trainable(peft_model).values():
            for t in entry.values():
                t.add_(0.3 * torch.randn(t.shape, generator=g))
    return model, peft_model, config


def same_tensors(peft_model: nn.Module) -> dict[str, dict[str, Tensor]]:
    return {
        path: {n: t.detach().clone().requires_grad_(True) for n, t in entry.items()}
        for path, entry in peft_trainable(peft_model).items()
    }


@pytest.mark.parametrize(("factory", "task_type", "kw", "method"), CASES, ids=IDS)
def test_trains_the_same_tensors_as_peft_with_the_same_outputs_and_gradients(factory, task_type, kw, method):
    model, peft_model, config = peft_setup(factory, task_type, kw, method)
    theirs = peft_trainable(peft_model)
    params, fwd = fp.adapt(model, config)
    # the same trainable tensors: the head as a full copy, in PEFT's shapes
    assert {p: {n: t.shape for n, t in e.items()} for p, e in params.items()} == {
        p: {n: t.shape for n, t in e.items()} for p, e in theirs.items()
    }
    heads = [p for p in params if any(p.endswith(h) for h in TASK_HEADS[task_type])]
    assert heads and all("weight" in params[h] and "lora_A" not in params[h] for h in heads), params.keys()
    assert config.modules_to_save == kw.get("modules_to_save")  # the user's config is kept as written
    assert fwd.config is config

    ours = same_tensors(peft_model)
    batch = inputs(model, task_type)
    out, expected = fwd(ours, **batch), peft_model(**batch)
    torch.testing.assert_close(logits(out), logits(expected))
    assert not torch.allclose(logits(out), logits(fwd(None, **batch)))
    out.loss.backward()
    expected.loss.backward()
    for path, entry in ours.items():
        for name, t in entry.items():
            torch.testing.assert_close(t.grad, theirs[path][name].grad, msg=f"{path}.{name}")


@pytest.mark.parametrize(("factory", "task_type", "kw", "method"), CASES, ids=IDS)
def test_checkpoints_match_peft_s_and_load_both_ways(tmp_path: Path, factory, task_type, kw, method):
    peft = oracle("peft")
    model, peft_model, config = peft_setup(factory, task_type, kw, method)
    ours = same_tensors(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    fp.save(tmp_path / "ours", ours, config)

    theirs_sd = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key, value in theirs_sd.items():
        torch.testing.assert_close(ours_sd[key], value, rtol=0, atol=0, msg=key)
    recorded = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft")]
    assert recorded[0]["modules_to_save"] == recorded[1]["modules_to_save"]
    assert recorded[0]["task_type"] == recorded[1]["task_type"] == task_type
    assert config.modules_to_save == kw.get("modules_to_save")  # saving did not rewrite it either

    batch = inputs(model, task_type, seed=3)
    expected = logits(peft_model(**batch))
    # PEFT's folder (its modules_to_save lists head names the model lacks, e.g. "score" on BERT) loads in funcpeft
    loaded, loaded_config = fp.load(tmp_path / "peft")
    assert loaded_config.task_type == task_type
    _, fwd = fp.adapt(factory(), loaded_config)
    torch.testing.assert_close(logits(fwd(loaded, **batch)), expected)
    # and funcpeft's loads in PEFT
    reloaded = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(reloaded(**batch)), expected)


def test_state_dict_round_trip_with_the_user_s_config() -> None:
    # the config says task_type="SEQ_CLS" and no modules_to_save, and the tree holds the classifier copy
    config = fp.LoraConfig(task_type="SEQ_CLS", target_modules=["query"])
    params, _ = fp.adapt(bert_seq(), config)
    back = fp.from_peft_state_dict(fp.to_peft_state_dict(params, config), config)
    assert back.keys() == params.keys() and set(back["classifier"]) == {"weight", "bias"}
    for path, entry in params.items():
        for name, t in entry.items():
            torch.testing.assert_close(back[path][name], t, rtol=0, atol=0)
    # without the task type the classifier's tensors are not part of such an adapter
    with pytest.raises(ValueError, match="classifier"):
        fp.from_peft_state_dict(fp.to_peft_state_dict(params, config), config.replace(task_type=None))


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM", "FEATURE_EXTRACTION", "SEQ_2_SEQ_LM"])
def test_other_task_types_train_no_head(task_type) -> None:
    params, _ = fp.adapt(bert_seq(), fp.LoraConfig(task_type=task_type, target_modules=["query"]))
    assert list(params) == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]


def test_task_types_are_exactly_peft_s() -> None:
    peft = oracle("peft")
    assert set(TASK_TYPES) == {t.value for t in peft.TaskType}
    assert set(TASK_HEADS) <= set(TASK_TYPES)
    for config_type in (fp.LoraConfig, fp.IA3Config):
        with pytest.raises(ValueError, match=r"`task_type`.*'seq_cls'.*did you mean 'SEQ_CLS'"):
            config_type(task_type="seq_cls")
    with pytest.raises(ValueError, match="`task_type`"):
        fp.AdaLoraConfig(task_type="CLASSIFICATION", total_step=10)


def test_modules_to_save_entries_other_than_head_names_must_match() -> None:
    model = bert_seq()
    # a head name the model lacks is fine for a task type, as in PEFT: BERT has no `score`
    params, _ = fp.adapt(model, fp.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["score"]))
    assert "classifier" in params and not any(p.endswith("score") for p in params)
    # any other entry must match, as without a task type
    with pytest.raises(ValueError, match=r"`modules_to_save` entry 'classifer' matched no module.*classifier"):
        fp.adapt(model, fp.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["classifer"]))
    with pytest.raises(ValueError, match="`modules_to_save` entry 'score'"):
        fp.adapt(model, fp.LoraConfig(target_modules=["query"], modules_to_save=["classifier", "score"]))


def test_a_task_type_whose_head_the_model_lacks_warns() -> None:
    model = MLP()  # its head is `head`, not `classifier`/`score`: PEFT would train no head, silently
    with pytest.warns(fp.FuncpeftWarning, match=r"`task_type='SEQ_CLS'`.*\['classifier', 'score'\].*MLP"):
        params, _ = fp.adapt(model, fp.LoraConfig(task_type="SEQ_CLS", target_modules=["lin0"]))
    assert list(params) == ["lin0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = fp.LoraConfig(task_type="SEQ_CLS", target_modules=["lin0"], modules_to_save=["head"])
        params, _ = fp.adapt(model, config)
    assert set(params) == {"lin0", "head"}


def test_token_cls_all_linear_trains_the_classifier_in_full() -> None:
    # PEFT 0.21 adapts the classifier first and then fails to wrap it for modules_to_save (TypeError); funcpeft
    # trains it in full, as PEFT's task model means to.
    params, fwd = fp.adapt(bert_tok(), fp.LoraConfig(task_type="TOKEN_CLS", target_modules="all-linear"))
    assert set(params["classifier"]) == {"weight", "bias"} and "classifier" not in fwd.targets
    assert "bert.encoder.layer.0.attention.self.query" in fwd.targets


def test_find_targets_can_leave_the_heads_to_the_caller() -> None:
    # PEFT's inject_adapter_in_model has no task model: a targeted head is adapted there
    model = bert_seq()
    config = fp.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "classifier"])
    assert "classifier" not in find_targets(model, config, {})
    assert "classifier" in find_targets(model, config, {}, task_heads=False)
