"""LoRA training with ``accelerate`` through ``fwd.bind(params)``: ``accelerate launch --cpu --num_processes 2
examples/accelerate_train.py`` (or ``python examples/accelerate_train.py`` for one process).

``fwd.bind(params)`` is an ``nn.Module`` whose parameters are the adapter's leaves, so ``Accelerator.prepare``
wraps it in DDP like any model: rank 0's adapter is broadcast, each rank trains on its share of every batch, the
adapter's gradients are averaged, and the ranks stay identical. The base model is not a submodule of the bound
module: DDP neither copies nor synchronises it. (Do not wrap the *model* in DDP and call ``fwd``: that
synchronises nothing of the adapter; see :mod:`funcpeft.distributed`.) Rank 0 saves the adapter in PEFT's format.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

import funcpeft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (default: 10)")
    parser.add_argument("--batch", type=int, default=8, help="global batch size, split across ranks (default: 8)")
    parser.add_argument("--out", default="accelerate_adapter", help="folder for the adapter (default: %(default)s)")
    args = parser.parse_args()

    # split_batches: every rank gets its share of each global batch (the global batch size is --batch).
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
    if args.batch % accelerator.num_processes:
        parser.error(
            f"--batch {args.batch} must be divisible by the number of processes ({accelerator.num_processes})."
        )

    # The same base model on every rank: a real run loads pretrained weights; here a seeded tiny GPT-2.
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    params, fwd = funcpeft.adapt(model, funcpeft.LoraConfig(r=4, lora_alpha=8))  # PEFT's GPT-2 default: c_attn
    bound = fwd.bind(params)

    # Counting sequences (next token = this one + 1).
    starts = torch.randint(
        0, config.vocab_size, (args.batch * args.steps, 1), generator=torch.Generator().manual_seed(1)
    )
    loader = DataLoader(TensorDataset((starts + torch.arange(16)) % config.vocab_size), batch_size=args.batch)
    optimizer = torch.optim.AdamW(bound.parameters(), lr=3e-2)
    bound, optimizer, loader = accelerator.prepare(bound, optimizer, loader)

    bound.train()
    for step, (ids,) in enumerate(loader):
        loss = bound(input_ids=ids, labels=ids, use_cache=False).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        loss = accelerator.reduce(loss.detach(), reduction="mean")  # only for printing the global batch's loss
        accelerator.print(f"step {step}: loss {loss.item():.4f}")

    if accelerator.is_main_process:
        accelerator.unwrap_model(bound).save_pretrained(args.out)  # `params` itself holds the trained adapter too
        accelerator.print(f"saved the adapter to {args.out}/")
    accelerator.end_training()


if __name__ == "__main__":
    main()
