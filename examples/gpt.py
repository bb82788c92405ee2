"""A small GPT trained on the Python standard library's own source code, byte by byte (no download).

    python examples/gpt.py --train.max_steps 300
    torchrun --nproc_per_node=2 examples/gpt.py --train.max_steps 300
    srun --ntasks=2 python examples/gpt.py --gpt.layers 6 --gpt.dim 384

The corpus is every `.py` file of this Python's standard library, read in sorted order (the same on
every rank), cut into windows of `gpt.context + 1` bytes; the last `gpt.eval_fraction` is held out.
Bytes are the tokens, so the eval loss is in nats per byte (a byte-unigram model scores about 3).
The loss is token-exact: the model takes `num_items_in_batch` and divides its summed loss by it, as
Hugging Face models do; distrib passes the step's count and weights the loss so every byte of the
step, over micro-batches and ranks, weighs the same. AdamW with a cosine schedule and warm-up comes
from `--optim.*`; on a GPU the defaults add bf16 autocast and `torch.compile`.
`--gpt.stream true` reads the training corpus as a stream (an IterableDataset, one file at a time).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset

import distrib
from distrib.runtime.console import log


@dataclasses.dataclass(kw_only=True)
class GPTConfig:
    """This script's own keys: `--gpt.layers 6 --gpt.dim 384`."""

    context: int = 64
    """Bytes a window predicts from (the model's maximum length)."""
    layers: int = 2
    """Transformer blocks."""
    dim: int = 64
    """Width of the residual stream."""
    heads: int = 4
    """Attention heads (dim must divide by it)."""
    dropout: float = 0.0
    """Dropout after attention and MLP."""
    corpus_mb: float = 2.0
    """Megabytes of standard-library source to read."""
    eval_fraction: float = 0.05
    """Share of the windows held out for evaluation (the end of the corpus)."""
    stream: bool = False
    """Read the training corpus as a stream (an IterableDataset reading one file at a time), the way large
    corpora are read; the same windows, in corpus order (so with --data.shuffle false, the same run)."""

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise distrib.ConfigError(f"gpt.dim={self.dim} does not divide by gpt.heads={self.heads}. HINT: pass --gpt.heads 4 or a dim that is a multiple.")


SECTIONS = {"gpt": GPTConfig, "optim": distrib.OptimConfig}
DEFAULTS: dict[str, Any] = {
    "train.batch_size": 16,
    "train.max_steps": 300,
    "train.log_every": 25,
    "train.eval_batch_size": 64,
    "run.dir": "runs/gpt",
    "optim.name": "adamw",
    "optim.lr": 3e-3,
    "optim.weight_decay": 0.1,
    "optim.schedule": "cosine",
    "optim.warmup_steps": 30,
}
if torch.cuda.is_available():
    DEFAULTS |= {"train.precision": "bf16", "train.compile": True}


# --------------------------------------------------------------------------- data


def stdlib_files(megabytes: float) -> Iterator[bytes]:
    """The first `megabytes` of the standard library's .py files, in sorted path order, a file at a time."""
    root = Path(sysconfig.get_paths()["stdlib"])
    limit, size = int(megabytes * 2**20), 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()[: limit - size]
        size += len(data)
        yield data
        if size >= limit:
            return


def stdlib_bytes(megabytes: float) -> torch.Tensor:
    """The first `megabytes` of the standard library's .py files, in sorted path order, as uint8."""
    return torch.frombuffer(bytearray(b"".join(stdlib_files(megabytes))), dtype=torch.uint8)


class ByteWindows(Dataset):
    """Non-overlapping windows: `input_ids` are bytes t..t+n-1, `labels` the bytes one further."""

    def __init__(self, data: torch.Tensor, context: int) -> None:
        self.data, self.context = data, context

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.context

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chunk = self.data[i * self.context : (i + 1) * self.context + 1].long()
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


class ByteStream(IterableDataset):
    """ByteWindows(train part) as a stream: the files are read one at a time, never held whole.

    It declares its length (windows in the training part), so distrib knows where an epoch ends.
    """

    def __init__(self, cfg: GPTConfig, train_bytes: int) -> None:
        self.cfg, self.train_bytes = cfg, train_bytes

    def __len__(self) -> int:
        return (self.train_bytes - 1) // self.cfg.context

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n, buf, read = self.cfg.context, b"", 0
        for data in stdlib_files(self.cfg.corpus_mb):
            data = data[: self.train_bytes - read]
            read += len(data)
            buf += data
            at = 0
            while len(buf) - at >= n + 1:  # a window and the byte after it (which starts the next window)
                chunk = torch.frombuffer(bytearray(buf[at : at + n + 1]), dtype=torch.uint8).long()
                yield {"input_ids": chunk[:-1], "labels": chunk[1:]}
                at += n
            buf = buf[at:]
            if read >= self.train_bytes:
                return


def split(data: torch.Tensor, eval_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Train on the start of the corpus, evaluate on its end (other files than the training ones)."""
    cut = int(len(data) * (1 - eval_fraction))
    return data[:cut], data[cut:]


def datasets(cfg: GPTConfig) -> tuple[ByteWindows | ByteStream, ByteWindows]:
    train, held_out = split(stdlib_bytes(cfg.corpus_mb), cfg.eval_fraction)
    if cfg.stream:
        return ByteStream(cfg, len(train)), ByteWindows(held_out, cfg.context)
    return ByteWindows(train, cfg.context), ByteWindows(held_out, cfg.context)


def unigram_nats(data: torch.Tensor) -> float:
    """The loss of the best model that ignores context: the entropy of the byte frequencies."""
    p = torch.bincount(data.long(), minlength=256).double() / len(data)
    return float(-(p[p > 0] * p[p > 0].log()).sum())


# --------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.qkv, self.proj = nn.Linear(cfg.dim, 3 * cfg.dim), nn.Linear(cfg.dim, cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, cfg.dim), nn.Embedding(cfg.context, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, 256, bias=False)
        self.head.weight = self.tok.weight  # tied input and output embeddings
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2's initialisation; residual projections scaled down by depth.
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, num_items_in_batch: Any = None) -> dict[str, Any]:
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        if labels is None:
            return {"logits": logits}
        # Summed over tokens and divided by the count distrib passes (the step's, over micro-batches;
        # distrib weights it across ranks): every byte weighs the same however the step is split.
        # Without a count: this batch's mean.
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
        return {"loss": loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel()), "logits": logits}

    def flops_per_token(self) -> int:
        """6 FLOPs per parameter per token (forward and backward), plus attention's, for MFU."""
        n = sum(p.numel() for p in self.parameters()) - self.pos.weight.numel()
        layers, dim, context = len(self.blocks), self.tok.weight.shape[1], self.pos.weight.shape[0]
        return 6 * n + 12 * layers * dim * context


def train(cfg: distrib.Config) -> dict[str, Any]:
    train_set, eval_set = datasets(cfg.gpt)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.gpt)
    summary = distrib.fit(
        cfg,
        model=model,
        train_data=train_set,
        eval_data=eval_set,
        items=distrib.label_tokens(shift=False),
        tokens_per_sample=cfg.gpt.context,
        flops_per_sample=model.flops_per_token() * cfg.gpt.context,
    )
    if not summary.get("stopped") and summary["eval"]:
        baseline = unigram_nats(split(stdlib_bytes(cfg.gpt.corpus_mb), cfg.gpt.eval_fraction)[0])
        log.info(
            f"eval loss {summary['eval']['loss']:.3f} nats/byte ({summary['eval']['loss'] / math.log(2):.3f} bits/byte); "
            f"a byte-unigram model: {baseline:.3f} nats/byte"
        )
    return summary


if __name__ == "__main__":
    sys.exit(distrib.main(train, sections=SECTIONS, defaults=DEFAULTS))
