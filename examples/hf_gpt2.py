"""A Hugging Face `GPT2LMHeadModel`, built from a config (no weights download), trained with no glue code.

    python examples/hf_gpt2.py --train.max_steps 100
    torchrun --nproc_per_node=2 examples/hf_gpt2.py

Fine-tune a pretrained one, larger than a rank should hold whole, and hand it back to Hugging Face:

    distrib export runs/hf_gpt2 --format hf --out pretrained      # (any save_pretrained directory will do)
    torchrun --nproc_per_node=2 examples/hf_gpt2.py --gpt2.meta true --dist.strategy fsdp \
        --ckpt.init_from pretrained --run.dir runs/finetuned
    distrib export runs/finetuned --format hf --out finetuned     # GPT2LMHeadModel.from_pretrained("finetuned")

`--gpt2.meta true` builds the model on the meta device: under FSDP each rank allocates only its
shards, and `ckpt.init_from` reads only their bytes from the safetensors (docs/large-models.md).
`--gpt2.pretrained DIR` instead loads the whole model with `from_pretrained` on every rank.

The data is examples/gpt.py's: byte windows of the Python standard library's source, so the
vocabulary is the 256 byte values. The batch is the dict the model takes (`input_ids`, `labels`);
`fit` calls `model(**batch)`, reads `.loss`, and, as for any Hugging Face causal LM with labels,
counts the shifted label tokens so the loss is token-exact over micro-batches and ranks.
`run.dir/model.pt` loads into `GPT2LMHeadModel(config)` as it is.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from gpt import ByteWindows, split, stdlib_bytes  # the sibling example's data

import distrib


@dataclasses.dataclass(kw_only=True)
class HFGPT2Config:
    """This script's own keys: `--gpt2.n_layer 4`."""

    context: int = 64
    """Bytes per window (GPT-2's n_positions)."""
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    corpus_mb: float = 1.0
    """Megabytes of standard-library source to read."""
    eval_fraction: float = 0.05
    meta: bool = False
    """Build the model on the meta device (allocated, and under FSDP sharded, by setup; weights from ckpt.init_from)."""
    pretrained: str | None = None
    """A save_pretrained directory to start from with from_pretrained (the whole model on every rank)."""


SECTIONS = {"gpt2": HFGPT2Config, "optim": distrib.OptimConfig}
DEFAULTS: dict[str, Any] = {
    "train.batch_size": 16,
    "train.max_steps": 100,
    "train.log_every": 25,
    "run.dir": "runs/hf_gpt2",
    "optim.name": "adamw",
    "optim.lr": 1e-3,
    "optim.schedule": "cosine",
    "optim.warmup_steps": 10,
}


def gpt2_config(cfg: HFGPT2Config) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=256, n_positions=cfg.context, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=0, eos_token_id=0)


class CausalWindows(ByteWindows):
    """GPT-2 shifts labels itself: `labels` are the input bytes."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[i * self.context : (i + 1) * self.context].long()
        return {"input_ids": ids, "labels": ids}

    def __len__(self) -> int:
        return len(self.data) // self.context


def train(cfg: distrib.Config) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    train, held_out = split(stdlib_bytes(cfg.gpt2.corpus_mb), cfg.gpt2.eval_fraction)
    torch.manual_seed(cfg.seed)
    if cfg.gpt2.pretrained is not None:
        model = GPT2LMHeadModel.from_pretrained(cfg.gpt2.pretrained)
    else:
        config = GPT2Config.from_pretrained(cfg.ckpt.init_from) if cfg.ckpt.init_from else gpt2_config(cfg.gpt2)
        with torch.device("meta" if cfg.gpt2.meta else "cpu"):
            model = GPT2LMHeadModel(config)
    return distrib.fit(cfg, model=model, train_data=CausalWindows(train, cfg.gpt2.context), eval_data=CausalWindows(held_out, cfg.gpt2.context))


if __name__ == "__main__":
    sys.exit(distrib.main(train, sections=SECTIONS, defaults=DEFAULTS))
