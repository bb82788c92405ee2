"""Activation checkpointing (`train.activation_checkpointing`): each block's activations recomputed in backward.

A block's forward runs under `torch.utils.checkpoint` (non-reentrant): `full` keeps only the block's
inputs and recomputes the rest in backward; `selective` also keeps the outputs of the expensive ops
(matmuls, attention: `SAVED_OPS`) and recomputes the cheap ones (norms, activations, dropout),
torch's selective activation checkpointing. The blocks are FSDP's (`dist.fsdp_blocks`, or found
automatically), so FSDP's gather and free hooks sit outside the recomputed region.

The RNG state is saved at each block's forward and restored for its recompute, so dropout draws the
same masks twice: a run with checkpointing computes the same numbers as one without (bitwise on CPU).
Accelerate turns this off (`preserve_rng_state=True`), and its dropout runs differ.

The block's `forward` is replaced by a bound method on the instance (no wrapper module): parameter
names, state dicts and checkpoints are those of the model as written, and `copy.deepcopy` rebinds it.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from distrib.errors import ConfigError

MODES = ("none", "full", "selective")


def _saved_ops() -> frozenset[Any]:
    """The ops whose outputs `selective` keeps: matmuls and attention, the FLOPs a recompute would repeat."""
    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


SAVED_OPS = _saved_ops()


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    forward = type(self).forward  # the class's own (FSDP's subclass inherits it)
    if not torch.is_grad_enabled():  # eval: nothing is saved, nothing to recompute
        return forward(self, *args, **kwargs)
    if self._distrib_checkpointing == "selective":
        return checkpoint(forward, self, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_selective_contexts, **kwargs)
    # `full` passes no context_fn: torch.compile traces checkpoint's default, not an explicitly given no-op one.
    return checkpoint(forward, self, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def apply(blocks: Sequence[nn.Module], mode: str) -> None:
    """Checkpoint each of `blocks` (`mode`: `full` or `selective`; `none` leaves them as they are)."""
    if mode not in MODES:
        raise ConfigError(f"activation checkpointing mode {mode!r} is not one of {', '.join(MODES)}. HINT: pass --train.activation_checkpointing full.")
    if mode == "none":
        return
    if not blocks:
        raise ConfigError(
            f"train.activation_checkpointing={mode} found no blocks to checkpoint in this model (no nn.ModuleList or nn.Sequential "
            "with repeated children). HINT: name its block classes with --dist.fsdp_blocks (e.g. GPT2Block), or pass "
            "--train.activation_checkpointing none."
        )
    for block in blocks:
        if "forward" in vars(block) and getattr(block, "_distrib_checkpointing", None) is None:
            raise ConfigError(
                f"{type(block).__name__} has a forward of its own set on the instance, which activation checkpointing would replace. "
                "HINT: define forward on the class, or pass --train.activation_checkpointing none."
            )
        block._distrib_checkpointing = mode  # type: ignore[assignment]
        block.forward = types.MethodType(_checkpointed_forward, block)


def mode_of(module: nn.Module) -> str:
    """The checkpointing a module's blocks run under: `none`, `full` or `selective`."""
    for m in module.modules():
        mode = getattr(m, "_distrib_checkpointing", None)
        if mode is not None:
            return str(mode)
    return "none"
