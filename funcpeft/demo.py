"""``funcpeft demo``: train one LoRA adapter per task in one mixed batch, JAX-style, then save, reload and generate.

The model ships with funcpeft (:class:`TinyLM`, a small causal pre-norm transformer in plain torch, random weights,
frozen). Each task is a different token-to-token mapping; adapter ``k`` learns task ``k``, and every training step
is a single forward/backward over a batch whose rows belong to different adapters (``adapter_ids``), with
``funcpeft.grad_and_value`` (torch.func's signature, autograd's speed) and ``funcpeft.optim.adamw`` on the
stacked tree. The base model stays untouched, so it is the baseline in the accuracy table. The adapters are saved
in PEFT's format and loaded back, and the demo ends by serving them: ``fwd.generate`` continues one prompt per
adapter, plus one for the base model, in one mixed batch, and reports how often each continuation follows its
task's rule. Runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TASKS", "TinyLM", "add_arguments", "run"]

VOCAB = 16
SEQ = 12

# Each task maps an input sequence of tokens to its target sequence (one target token per position).
TASKS: dict[str, Callable[[Tensor], Tensor]] = {
    "successor": lambda x: (x + 1) % VOCAB,
    "mirror": lambda x: VOCAB - 1 - x,
    "double": lambda x: (2 * x) % VOCAB,
    "previous": lambda x: torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1),
}
# What each task's rule means for generation: the token the task's adapter should append next.
RULES: dict[str, str] = {
    "successor": "next = last + 1",
    "mirror": f"next = {VOCAB - 1} - last",
    "double": "next = 2 * last",
    "previous": "next = token before last",
}
PROMPT = 4  # prompt tokens in the generation step; it appends SEQ - PROMPT tokens


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.up_proj, self.down_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (
            p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.down_proj(F.gelu(self.up_proj(self.norm2(x))))


class TinyLM(nn.Module):
    """A small causal transformer over ``VOCAB`` tokens: the demo's base model (random, frozen weights).

    ``forward(ids)`` maps token ids ``(batch, t)``, ``t <= SEQ``, to next-token logits ``(batch, t, VOCAB)``;
    :meth:`generate` decodes greedily, so ``fwd.generate`` serves adapters of it as it does transformers' models.
    """

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(SEQ, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 1) -> Tensor:
        """Greedy autoregressive decoding: append the most likely next token ``max_new_tokens`` times.

        Returns the prompts followed by the new tokens, ``(batch, prompt + max_new_tokens)`` (transformers'
        ``generate`` layout). Plain torch, no KV cache: every step reruns the whole prefix through ``self``, which
        is what lets ``fwd.generate(params, input_ids, adapter_ids=ids, max_new_tokens=n)`` run it with the
        adapter bound (each row with its own adapter). Runs without gradients, as transformers' ``generate`` does.

        Raises:
            ValueError: the prompts plus the new tokens are longer than ``SEQ`` (the positional table's size).
        """
        if input_ids.shape[1] + max_new_tokens > SEQ:
            raise ValueError(
                f"TinyLM handles at most {SEQ} positions: a {input_ids.shape[1]}-token prompt leaves room for "
                f"{SEQ - input_ids.shape[1]} new tokens, not {max_new_tokens}."
            )
        ids = input_ids
        for _ in range(max_new_tokens):
            next_token = self(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
        return ids


def _batch(tasks: list[str], rows_per_task: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """A mixed batch: ``rows_per_task`` rows of every task; returns inputs, targets and each row's task."""
    ids = torch.randint(0, VOCAB, (rows_per_task * len(tasks), SEQ), generator=generator)
    task = torch.arange(len(tasks)).repeat_interleave(rows_per_task)
    targets = torch.empty_like(ids)
    for k, name in enumerate(tasks):
        fn = TASKS[name]
        targets[task == k] = fn(ids[task == k])
    return ids, targets, task


class _Progress:
    """The training progress bar on stderr: tqdm's when tqdm is installed (an optional dependency; the test extra
    has it), else a plain text bar. Use as a context manager, so the bar is closed even when training fails."""

    def __init__(self, total: int) -> None:
        self.total, self.start = total, time.perf_counter()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            # file=sys.stderr looked up now, not at import: tests and notebooks swap the standard streams
            self.bar = tqdm(total=total, file=sys.stderr, desc="  training", unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float) -> None:
        """Report that ``step`` of ``total`` steps are done, the last with ``loss``."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        out = sys.stderr
        width = 30
        done = int(width * step / self.total)
        rate = step / max(time.perf_counter() - self.start, 1e-9)
        out.write(
            f"\r  [{'#' * done}{'.' * (width - done)}] {step}/{self.total} steps  loss {loss:.3f}  {rate:.0f} it/s "
        )
        if step == self.total:
            out.write("\n")
        out.flush()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=200, help="training steps (default: %(default)s)")
    parser.add_argument(
        "--adapters", type=int, default=len(TASKS), choices=range(1, len(TASKS) + 1), metavar=f"1..{len(TASKS)}",
        help="how many adapters (tasks) to train at once (default: all %(default)s)",
    )  # fmt: skip
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="rows per task per step (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=Path("funcpeft-demo"),
        help="folder for the saved adapters, one PEFT-format folder per task (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def run(args: argparse.Namespace, out=None) -> dict[str, float]:
    """Train, evaluate, save, reload and serve; print the report to ``out`` (default: the current
    ``sys.stdout``). Returns each adapter's accuracy."""
    out = sys.stdout if out is None else out
    import funcpeft
    from funcpeft import optim

    torch.manual_seed(args.seed)
    names = list(TASKS)[: args.adapters]
    model = TinyLM(seed=args.seed).eval()
    config = funcpeft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    _, fwd = funcpeft.adapt(model, config)
    generator = torch.Generator().manual_seed(args.seed)
    adapters = [fwd.init(generator) for _ in names]
    print(
        f"funcpeft demo: {len(names)} LoRA adapters (r={args.rank}) on a {_size(model)} TinyLM, one per task:", file=out
    )
    print("  " + ", ".join(f"{k}={name}" for k, name in enumerate(names)), file=out)
    print(f"  {len(fwd.targets)} adapted layers, trained together: every batch mixes all tasks' rows", file=out)

    def loss_fn(stacked, ids, targets, task):
        logits = fwd(stacked, ids, adapter_ids=task)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    stacked = funcpeft.stack(adapters)
    opt = optim.chain(optim.clip_by_global_norm(1.0, stacked=True), optim.adamw(args.lr, weight_decay=0.0))
    state = opt.init(stacked)
    start = time.perf_counter()
    with _Progress(args.steps) as progress:
        for step in range(1, args.steps + 1):
            ids, targets, task = _batch(names, args.batch, generator)
            grads, loss = funcpeft.grad_and_value(loss_fn)(stacked, ids, targets, task)
            updates, state = opt.update(grads, state, stacked)
            stacked = optim.apply_updates(stacked, updates)
            if step % 10 == 0 or step == args.steps:
                progress.update(step, loss.detach().item())
    elapsed = time.perf_counter() - start

    ids, targets, task = _batch(names, 64, torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        tuned = fwd(stacked, ids, adapter_ids=task).argmax(-1)
        base = fwd(None, ids).argmax(-1)
    print(f"\ntrained in {elapsed:.1f} s; accuracy per token on held-out sequences:\n", file=out)
    print(f"  {'adapter / task':<16}{'base model':>12}{'with adapter':>14}", file=out)
    accuracy = {}
    for k, name in enumerate(names):
        rows = task == k
        acc = (tuned[rows] == targets[rows]).float().mean().item()
        base_acc = (base[rows] == targets[rows]).float().mean().item()
        accuracy[name] = acc
        print(f"  {f'{k} {name}':<16}{base_acc:>11.1%}{acc:>14.1%}", file=out)

    folders = []
    for name, adapter in zip(names, funcpeft.unstack(stacked), strict=True):
        folders.append(args.out / name)
        funcpeft.save(folders[-1], adapter, config)
    reloaded = [funcpeft.load(folder)[0] for folder in folders]
    print(f"\nsaved {len(folders)} adapters in PEFT's format under {args.out}/ and loaded them back", file=out)

    # One prompt per task adapter and one for the base model (the successor's prompt), generated in one batch.
    prompts = torch.randint(0, VOCAB, (len(names), PROMPT), generator=torch.Generator().manual_seed(args.seed + 2))
    prompts = torch.cat([prompts, prompts[:1]])
    prompt_ids = torch.cat([torch.arange(len(names)), torch.tensor([-1])])
    new_tokens = SEQ - PROMPT
    served = fwd.generate(funcpeft.stack(reloaded), prompts, adapter_ids=prompt_ids, max_new_tokens=new_tokens)
    if not torch.equal(served, fwd.generate(stacked, prompts, adapter_ids=prompt_ids, max_new_tokens=new_tokens)):
        raise RuntimeError("the reloaded adapters generate different tokens than the trained ones")
    print(
        f"generated {new_tokens} tokens per prompt in one mixed batch with the reloaded adapters (fwd.generate;\n"
        "row i uses adapter i, the last row the base model), and how many new tokens follow each task's rule:\n",
        file=out,
    )
    widths = 3 * PROMPT + 4, 3 * new_tokens + 1  # _tokens(): 3 characters per token, less one
    print(f"  {'':<12}{'prompt':<{widths[0]}}{'continuation':<{widths[1]}}follows the rule", file=out)
    for i in range(len(prompts)):
        label, rules = (names[i], names[i : i + 1]) if i < len(names) else ("base model", names)
        follows = ", ".join(f"{name} {_follows(served[i], name)}/{new_tokens}" for name in rules)
        if i < len(names):
            follows += f" ({RULES[names[i]]})"
        print(f"  {label:<12}{_tokens(served[i, :PROMPT])}  -> {_tokens(served[i, PROMPT:])}  {follows}", file=out)
    return accuracy


def _follows(row: Tensor, task: str) -> int:
    """How many of ``row``'s generated tokens (after ``PROMPT``) are what ``task``'s rule makes of their prefix."""
    return sum(int(row[p]) == int(TASKS[task](row[None, :p])[0, -1]) for p in range(PROMPT, len(row)))


def _tokens(row: Tensor) -> str:
    return " ".join(f"{int(t):2d}" for t in row)


def _size(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e3:.0f}k-parameter"
