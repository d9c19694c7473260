"""LoRA on an FSDP2-sharded base: ``torchrun --nproc_per_node=2 examples/fsdp_train.py``.

The frozen base is sharded with ``torch.distributed.fsdp.fully_shard`` (each decoder layer, then the root), so
every rank holds 1/N of its weights; FSDP gathers a layer's weights just before it runs and frees them after. The
adapter is small and replicated: every rank starts from rank 0's (``broadcast_params``), computes gradients on
its own shard of the batch with ``torch.func.grad_and_value``, averages them (``average_gradients``) and applies
the same update. funcpeft never modifies the model; ``adapt`` is given the sharded model as it is. Optionally the
base computes in bfloat16 (``--bf16``, FSDP's ``MixedPrecisionPolicy``) while the adapter stays in float32.
Gloo on CPU, NCCL when CUDA is available. Rank 0 prints the losses and saves the adapter in PEFT's format.

The module route works too: ``DistributedDataParallel(fwd.bind(params))`` with any torch optimizer averages the
adapter's gradients in ``backward()``. (``torch.func`` does not run under activation checkpointing; with
checkpointing, take gradients with ``loss.backward()`` on ``fwd.bind(params)`` and average them the same way.)
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import funcpeft
from funcpeft import optim
from funcpeft.distributed import average_gradients, broadcast_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (default: 10)")
    parser.add_argument("--batch", type=int, default=8, help="global batch size, split across ranks (default: 8)")
    parser.add_argument("--bf16", action="store_true", help="compute the base in bfloat16 (MixedPrecisionPolicy)")
    parser.add_argument("--out", default="fsdp_adapter", help="folder for the trained adapter (default: fsdp_adapter)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        parser.error(f"--batch {args.batch} must be divisible by the number of processes ({world}).")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    # The same base on every rank (a real run loads pretrained weights, e.g. on rank 0 and broadcasts them with
    # torch.distributed.checkpoint, or builds on the meta device); here a seeded tiny Llama. Freeze it before
    # sharding, so FSDP computes and reduce-scatters no gradients for the base.
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(config).to(device).requires_grad_(False)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if args.bf16 else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the root: embeddings, final norm, lm_head

    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    params = broadcast_params(params, src=0)  # every rank starts from rank 0's adapter

    # One global batch of counting sequences (next token = this one + 1), the same on every rank; each rank trains
    # on its equal share (a DistributedSampler in real use).
    starts = torch.randint(0, config.vocab_size, (args.batch, 1), generator=torch.Generator().manual_seed(1))
    batch = (starts + torch.arange(16)) % config.vocab_size
    shard = batch.chunk(world)[rank].to(device)

    def loss_fn(params: funcpeft.Params, ids: torch.Tensor) -> torch.Tensor:
        return fwd(params, ids, labels=ids, use_cache=False).loss.float()  # the mean over the shard's tokens

    grad_and_loss = torch.func.grad_and_value(loss_fn)
    opt = optim.adamw(3e-2)
    state = opt.init(params)
    for step in range(args.steps):
        grads, loss = grad_and_loss(params, shard)
        grads = average_gradients(grads)  # equal shards: the mean of the shard means is the full batch's mean
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        loss = loss.detach()
        dist.all_reduce(loss)  # only for printing the full batch's loss
        if rank == 0:
            print(f"step {step}: loss {loss.item() / world:.4f}")

    # The adapter is replicated, so rank 0's copy is the adapter; the other ranks wait until it is on disk.
    if rank == 0:
        funcpeft.save(args.out, params, fwd.config)
        print(f"saved the adapter to {args.out}/")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
