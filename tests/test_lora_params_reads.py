"""LoRA ``target_parameters``: how the view reads an adapted parameter (``W + delta`` on every read of the attribute,
once per call and grad mode), also where a parent reads a child's weight, under activation checkpointing, inside a
model's own ``no_grad`` block and under autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import oracle
from test_lora_params import Experts, Net, _net_in, _perturbed
from torch import nn

import funcpeft as fp

peft = oracle("peft")


def test_mixed_batch_refused_where_a_parent_reads_the_parameter() -> None:
    class Reader(nn.Module):  # reads the experts' stack without calling the module (PEFT: AttributeError there)
        def __init__(self) -> None:
            super().__init__()
            self.experts = Experts()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.bmm(x, self.experts.w3)

    model = Reader()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=[], target_parameters=["w3"], init_lora_weights=False))
    merged = copy.deepcopy(model)
    merged.load_state_dict(fwd.merge(params))
    torch.testing.assert_close(fwd(params, *_net_in()), merged(*_net_in()))
    with pytest.raises(ValueError, match=r"Mixed batches.*experts\.w3"):
        fwd(fp.stack([params]), *_net_in(), adapter_ids=torch.zeros(4, dtype=torch.long))


def test_activation_checkpointing_keeps_the_adapter() -> None:
    class Checkpointed(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.utils.checkpoint.checkpoint(self.experts, self.fc(x), use_reentrant=False)

    params, fwd = fp.adapt(Checkpointed(), fp.LoraConfig(target_modules=[], target_parameters=["w3", "w2"]))
    params = _perturbed(params, 6)
    fwd(params, *_net_in()).square().sum().backward()
    grads = {(p, n): t.grad.clone() for p, e in params.items() for n, t in e.items()}
    # (recomputed in backward, after fwd returned: the view reads W + delta again); the same model without it:
    _, plain = fp.adapt(Net(), fwd.config)
    plain.model.load_state_dict(fwd.model.state_dict())
    reference = torch.func.grad(lambda p: plain(p, *_net_in()).square().sum())(params)
    for (path, name), grad in grads.items():
        torch.testing.assert_close(grad, reference[path][name])


def test_a_parameter_read_many_times_is_adapted_once_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager MoE loops index the stack once per expert; W + delta is computed once per call (PEFT caches its
    parametrization too), and anew in the next call (an optimizer step in between is seen)."""

    class Looping(Experts):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x[e] @ self.w3[e] for e in range(self.w3.shape[0])])

    model = Net()
    model.experts = Looping()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=[], target_parameters=["w3"], init_lora_weights=False))
    from funcpeft.methods.lora_params import ParamTarget

    calls = []
    read = ParamTarget.read
    monkeypatch.setattr(ParamTarget, "read", lambda self, *a: calls.append(1) or read(self, *a))
    first = fwd(params, *_net_in())
    assert len(calls) == 1
    with torch.no_grad():
        params["experts"]["lora_B"].add_(1.0)
    second = fwd(params, *_net_in())
    assert len(calls) == 2 and not torch.allclose(first, second)
    merged = copy.deepcopy(model)
    merged.load_state_dict(fwd.merge(params))
    torch.testing.assert_close(second, merged(*_net_in()))


def test_reads_under_no_grad_and_autocast_keep_gradients_and_dtype() -> None:
    class Peeking(Experts):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # e.g. routing statistics read from the weight
                scale = self.w3.abs().mean()
            return torch.bmm(x, self.w3) * scale

    model = Net()
    model.experts = Peeking()
    params, fwd = fp.adapt(model, fp.LoraConfig(target_modules=[], target_parameters=["w3"], init_lora_weights=False))
    fwd(params, *_net_in()).sum().backward()
    assert params["experts"]["lora_B"].grad.abs().sum() > 0
    kw = {"target_modules": [], "target_parameters": ["w3"], "init_lora_weights": False}
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    peft.set_peft_model_state_dict(peft_model, fp.to_peft_state_dict(params, fwd.config))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the update is folded in float32 (PEFT's too), bmm in bf16
        torch.testing.assert_close(fwd(params, *_net_in()), peft_model(*_net_in()), rtol=0, atol=0)
