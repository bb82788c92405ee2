"""A tiny Hugging Face GPT-2 (built from a config, no download) and padded variable-length LM data."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

VOCAB, CONTEXT = 64, 16


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=CONTEXT, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


class Sequences(Dataset):
    """Token sequences of lengths 3..CONTEXT (or all CONTEXT with `fixed`), reproducible from `seed`."""

    def __init__(self, n: int, *, fixed: bool = False, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.full((n,), CONTEXT) if fixed else torch.randint(3, CONTEXT + 1, (n,), generator=g)
        # A learnable stream: each token is the previous plus a small step, mod VOCAB.
        self.rows = []
        for length in lengths.tolist():
            start, step = torch.randint(1, VOCAB, (1,), generator=g).item(), torch.randint(1, 4, (1,), generator=g).item()
            self.rows.append(torch.tensor([(start + i * step) % VOCAB for i in range(length)]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def pad_collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: pads get attention_mask 0 and label -100 (ignored by the loss)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
