"""How many bytes of activations a forward leaves held for its backward, counted two ways.

    with ActivationBytes(model) as counted:
        loss = model(x).sum()
    counted.held, counted.saved          # bytes; then loss.backward()

- `saved`: the tensors autograd saves for backward, seen by saved-tensor hooks (each storage once).
  Activation checkpointing hides what it keeps from these hooks (a checkpointed region saves
  placeholders; selective checkpointing caches op outputs of its own), so this alone undercounts it.
- `held`: every storage an op created during the forward that is still alive when it ends, whoever
  holds it (autograd, a checkpoint's inputs or cache, the output). Parameters and buffers are not
  counted. This is the activation memory a backward starts from, and what the checkpointing modes
  are compared by (`bench/activations.py`).

In one process: under FSDP the gathered parameters a forward keeps would count as held.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Created(TorchDispatchMode):
    """Notes the storage of every tensor an op returns (a weak reference: it keeps nothing alive)."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip, self.storages = skip, dict[int, tuple[StorageWeakRef, int]]()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                s = t.untyped_storage()
                seen = self.storages.get(s.data_ptr())
                # An address seen before may be a freed storage's, reused: the new one is noted.
                if s.data_ptr() not in self.skip and (seen is None or seen[0].expired()):
                    self.storages[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        return out


class ActivationBytes:
    """Counts the activation bytes a forward of `model` leaves for its backward, while the `with` block runs.

    `held`: every storage an op made in the block that is still alive when it ends (what a backward starts
    from, whoever keeps it: autograd, activation checkpointing's inputs or cache); `saved`: what autograd's
    saved-tensor hooks see (blind to checkpointing's cache). In bytes; parameters and buffers excluded.
    """

    def __init__(self, model: nn.Module) -> None:
        """`model`: its parameters and buffers are not activations (the views of them a forward makes neither)."""
        self._weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self._saved: dict[int, int] = {}
        self._mode = _Created(self._weights)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.held = self.saved = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self._weights:
            self._saved[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self) -> ActivationBytes:
        self._hooks.__enter__()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self._hooks.__exit__(*exc)
        self.saved = sum(self._saved.values())
        self.held = sum(n for ref, n in self._mode.storages.values() if not ref.expired())
