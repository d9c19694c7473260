"""Data-parallel LoRA training, JAX-style: ``torchrun --nproc_per_node=2 examples/ddp_train.py``.

Every rank holds the same frozen model and starts from rank 0's adapter; each computes the loss and gradients on
its own shard of the batch with ``torch.func.grad_and_value``, the gradients are averaged across ranks, and every
rank applies the same optimizer update, so the adapters stay identical without wrapping the model in DDP.
Gloo on CPU, NCCL when CUDA is available. Rank 0 prints the losses and saves the adapter in PEFT's format.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

import funcpeft
from funcpeft import optim
from funcpeft.distributed import average_gradients, broadcast_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (default: 10)")
    parser.add_argument("--batch", type=int, default=8, help="global batch size, split across ranks (default: 8)")
    parser.add_argument("--out", default="ddp_adapter", help="folder for the trained adapter (default: ddp_adapter)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        parser.error(f"--batch {args.batch} must be divisible by the number of processes ({world}).")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    # The same base model on every rank: a real run loads pretrained weights; here a seeded tiny GPT-2.
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).to(device).eval()
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(r=4, lora_alpha=8))  # PEFT's GPT-2 default: c_attn
    params = broadcast_params(params, src=0)  # every rank starts from rank 0's adapter

    # One global batch of counting sequences (next token = this one + 1), the same on every rank; each rank trains
    # on its equal share (a DistributedSampler in real use).
    starts = torch.randint(0, config.vocab_size, (args.batch, 1), generator=torch.Generator().manual_seed(1))
    batch = (starts + torch.arange(16)) % config.vocab_size
    shard = batch.chunk(world)[rank].to(device)

    def loss_fn(params: funcpeft.Params, ids: torch.Tensor) -> torch.Tensor:
        return fwd(params, ids, labels=ids, use_cache=False).loss  # the mean over the shard's tokens

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

    if rank == 0:
        funcpeft.save(args.out, params, fwd.config)
        print(f"saved the adapter to {args.out}/")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
