"""Mixed precision: autocast for the forward pass, GradScaler for fp16, clipping after unscaling.

Under FSDP (`sharded=True`) bf16 is FSDP2's own policy instead (parameters gathered in bf16,
gradients reduced in fp32; `param_dtype` hands it to `fully_shard`), so there is no autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager as ContextManager

import torch

from distrib.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Owns the autocast context and the GradScaler (enabled only for fp16)."""

    def __init__(self, precision: str, device: torch.device, *, sharded: bool = False) -> None:
        self.precision, self.device, self.sharded = precision, device, sharded
        if precision not in ("fp32", *_DTYPES):
            raise ConfigError(f"train.precision={precision!r} is unknown. HINT: use fp32, bf16 or fp16.")
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support. "
                "HINT: pass --train.precision fp16 (with loss scaling) or fp32."
            )
        if precision != "fp32" and not torch.amp.is_autocast_available(device.type):
            raise ConfigError(f"train.precision={precision} needs autocast on {device.type}, which this torch build lacks. HINT: pass --train.precision fp32.")
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    @property
    def param_dtype(self) -> torch.dtype | None:
        """FSDP's compute dtype for gathered parameters (None: fp32, or not sharded)."""
        return _DTYPES[self.precision] if self.sharded and self.precision != "fp32" else None

    def autocast(self) -> ContextManager[None]:
        if self.precision == "fp32" or self.sharded:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        params: Iterable[torch.Tensor],
        clip_norm: float | None,
        apply: Callable[[torch.optim.Optimizer, torch.Tensor], None],
        dropped: Callable[[torch.Tensor], None],
    ) -> None:
        """Unscale, clip (on true gradients), then `apply(optimizer, grad_norm)` (the guard steps it or not).

        fp16: GradScaler finds inf/NaN itself and drops the step; `dropped(found_inf)` hears of it.
        No norm is read on the host: that would be a device sync every step.
        """
        if self.scaler.is_enabled():
            if clip_norm is not None:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(list(params), clip_norm)
            self.scaler.step(optimizer)
            found = self.scaler._found_inf_per_device(optimizer)  # what the scaler skipped on (device tensors)
            dropped(sum(found.values()) if found else torch.zeros(()))
            self.scaler.update()
            return
        if clip_norm is not None:  # its norm is the one the guard checks: no second pass over the gradients
            norm = _whole(torch.nn.utils.clip_grad_norm_(params, clip_norm))
        else:
            norm = total_norm([p.grad for p in params if p.grad is not None])
        apply(optimizer, norm)


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of `grads` on the device; a sharded (DTensor) norm is all-reduced to the whole."""
    return _whole(torch.nn.utils.get_total_norm(grads, norm_type=2.0)) if grads else torch.zeros(())


def _whole(norm: torch.Tensor) -> torch.Tensor:
    """A norm over sharded (DTensor) gradients is partial on each rank: all-reduce it to the whole."""
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) else norm
