"""``transformers.Trainer(model=fwd.bind(params))`` with no other glue, against PEFT's ``get_peft_model`` flow.

Tiny transformers models built from configs (float64, dropout 0), a list-of-dicts dataset whose columns Trainer
must sort out: ``input_ids``/``attention_mask``/``labels`` are forward arguments and are kept, ``row_id`` is not
and must be dropped. Checked: train, evaluate (``eval_loss``, which needs Trainer to find the labels), what
``save_model`` writes and loading it back, ``resume_from_checkpoint`` (the adapter and optimizer state resumed are
the saved ones, and the resumed run ends where the uninterrupted one does), and the same losses and final adapter
as PEFT on the same initial weights, seed and data order.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from _models import oracle, tiny_gpt2

import funcpeft as fp

transformers = oracle("transformers")
peft = oracle("peft")

VOCAB, LENGTH, ROWS = 100, 8, 12
BERT_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
GPT2_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True}


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config).double().eval()


def _gpt2() -> torch.nn.Module:
    return tiny_gpt2(vocab=VOCAB).double()


def _rows(causal: bool = False, seed: int = 0) -> list[dict]:
    """Rows of varying length, right-padded: the mask matters, so dropping it would change every loss."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(ROWS):
        n = int(torch.randint(3, LENGTH + 1, (), generator=g))
        ids = torch.zeros(LENGTH, dtype=torch.long)
        ids[:n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask = (torch.arange(LENGTH) < n).long()
        label = torch.where(mask.bool(), ids, -100) if causal else int((ids[:n] > VOCAB // 2).sum() > n // 2)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": label, "row_id": i})
    return rows


def _args(output_dir: Path, **kw) -> transformers.TrainingArguments:
    base = {
        "output_dir": str(output_dir),
        "max_steps": 5,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": 2,
        "seed": 0,
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    return transformers.TrainingArguments(**{**base, **kw})


def _batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def _clone(params):
    return {path: {n: t.detach().clone() for n, t in entry.items()} for path, entry in params.items()}


def _losses(trainer, after: int = 0) -> list[float]:
    """The training losses Trainer logged (every step), from step ``after + 1`` on."""
    return [log["loss"] for log in trainer.state.log_history if "loss" in log and log["step"] > after]


class _Snapshot(transformers.TrainerCallback):
    """The model's and the optimizer's state when training begins (after a resume has loaded them), and the
    model's state after each step."""

    def __init__(self) -> None:
        self.begin: tuple[dict, dict] | None = None
        self.steps: dict[int, dict] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.begin = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))

    def on_step_end(self, args, state, control, model=None, **kw):
        self.steps[state.global_step] = copy.deepcopy(model.state_dict())


def _bert_adapter(seed: int = 0):
    model = _bert()
    config = fp.LoraConfig(init_lora_weights=False, **BERT_LORA)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(seed))
    return model, config, params, fwd


def test_trainer_keeps_the_forward_columns_trains_and_evaluates(tmp_path) -> None:
    model, _, params, fwd = _bert_adapter()
    rows = _rows()
    bound = fwd.bind(params)
    trainer = transformers.Trainer(model=bound, args=_args(tmp_path), train_dataset=rows, eval_dataset=rows)
    assert trainer.label_names == ["labels"]  # read from type(bound).forward: Trainer's find_labels
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # row_id dropped, the forward's columns kept

    initial = _clone(params)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(params[p][n], initial[p][n]) for p in params for n in params[p])  # all trained
    assert bound.training and model.training  # Trainer leaves the model in training mode

    metrics = trainer.evaluate()
    assert not bound.training and not model.training
    batches = [_batch(rows[i : i + 4]) for i in range(0, ROWS, 4)]  # evaluate's batches, in order
    with torch.no_grad():
        masked = [fwd(params, **b).loss for b in batches]
        unmasked = [fwd(params, input_ids=b["input_ids"], labels=b["labels"]).loss for b in batches]
    assert metrics["eval_loss"] == pytest.approx(torch.stack(masked).mean().item(), rel=1e-9)
    assert metrics["eval_loss"] != pytest.approx(torch.stack(unmasked).mean().item(), rel=1e-6)


def test_save_model_writes_the_adapter_state_dict_which_loads_back(tmp_path) -> None:
    _, _, params, fwd = _bert_adapter()
    bound = fwd.bind(params)
    trainer = transformers.Trainer(model=bound, args=_args(tmp_path / "run", max_steps=2), train_dataset=_rows())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    # Trainer saves a module that is neither a PreTrainedModel nor a PeftModel as its state dict: the adapter's.
    assert {p.name for p in (tmp_path / "final").iterdir()} == {"model.safetensors", "training_args.bin"}
    saved = safetensors.torch.load_file(str(tmp_path / "final" / "model.safetensors"))
    assert saved.keys() == bound.state_dict().keys()
    for key, value in bound.state_dict().items():
        assert torch.equal(saved[key], value), key

    fresh = fwd.bind(fwd.init(torch.Generator().manual_seed(5)))
    fresh.load_state_dict(saved)  # strict: exactly the adapter's keys
    batch = _batch(_rows(seed=1))
    bound.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, bound(**batch).logits, rtol=0, atol=0)

    bound.save_pretrained(tmp_path / "peft")  # the PEFT folder, for PeftModel.from_pretrained / funcpeft.load
    loaded, _ = fp.load(tmp_path / "peft")
    for path, entry in params.items():
        for name, leaf in entry.items():
            assert torch.equal(loaded[path][name], leaf.detach()), (path, name)


def test_resume_from_checkpoint_restores_the_adapter_and_optimizer_and_ends_where_an_uninterrupted_run_does(
    tmp_path,
) -> None:
    _, _, params, fwd = _bert_adapter()
    rows = _rows()
    run = _Snapshot()
    whole = transformers.Trainer(
        model=fwd.bind(params), args=_args(tmp_path / "whole"), train_dataset=rows, callbacks=[run]
    )
    whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"  # mid-epoch: 3 batches per epoch, 5 steps
    saved_model = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    saved_optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved_model.keys() == run.steps[2].keys()
    for key, value in run.steps[2].items():
        assert torch.equal(saved_model[key], value), key  # the checkpoint holds the adapter at step 2

    other = fwd.init(torch.Generator().manual_seed(9))  # different values: the resume must overwrite them
    resumed = _Snapshot()
    again = transformers.Trainer(
        model=fwd.bind(other), args=_args(tmp_path / "again"), train_dataset=rows, callbacks=[resumed]
    )
    again.train(resume_from_checkpoint=str(checkpoint))
    model_state, optimizer_state = resumed.begin
    for key, value in saved_model.items():
        assert torch.equal(model_state[key], value), key
    assert optimizer_state["param_groups"] == saved_optimizer["param_groups"]
    assert optimizer_state["state"].keys() == saved_optimizer["state"].keys() == set(range(len(saved_model)))
    for index, state in saved_optimizer["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(optimizer_state["state"][index][key], value, rtol=0, atol=0)

    assert len(_losses(again, after=2)) == 3 and _losses(again, after=2) == _losses(whole, after=2)
    for path, entry in params.items():
        for name, leaf in entry.items():
            torch.testing.assert_close(other[path][name], leaf, rtol=0, atol=0)


@pytest.mark.parametrize("task", ["bert_seq_cls", "gpt2_lm"])
def test_same_losses_and_adapter_as_peft_get_peft_model(task, tmp_path) -> None:
    model = _bert() if task == "bert_seq_cls" else _gpt2()
    kw = BERT_LORA if task == "bert_seq_cls" else GPT2_LORA
    config = fp.LoraConfig(init_lora_weights=False, **kw)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    result = peft.set_peft_model_state_dict(twin, fp.to_peft_state_dict(params, config))
    assert not result.unexpected_keys
    rows = _rows(causal=task == "gpt2_lm")
    initial = {k: v.clone() for k, v in fp.to_peft_state_dict(params, config).items()}

    ours = transformers.Trainer(model=fwd.bind(params), args=_args(tmp_path / "ours"), train_dataset=rows)
    ours.train()
    theirs = transformers.Trainer(model=twin, args=_args(tmp_path / "theirs"), train_dataset=rows)
    theirs.train()

    assert len(_losses(ours)) == 5
    torch.testing.assert_close(torch.tensor(_losses(ours)), torch.tensor(_losses(theirs)), rtol=1e-9, atol=1e-12)
    mine, peft_state = fp.to_peft_state_dict(params, config), peft.get_peft_model_state_dict(twin)
    assert mine.keys() == peft_state.keys()
    for key, value in mine.items():
        torch.testing.assert_close(value, peft_state[key], rtol=1e-7, atol=1e-9, msg=key)
    assert all(not torch.allclose(value, initial[key]) for key, value in mine.items())  # every tensor trained
    eval_ours, eval_theirs = ours.evaluate(rows), theirs.evaluate(rows)
    assert eval_ours["eval_loss"] == pytest.approx(eval_theirs["eval_loss"], rel=1e-9)
