"""A model built on the meta device, set up by a Session (the meta-init tests, under torchrun or alone).

Writes OUT (JSON): params_sha256 after setup and after one optimizer step, rank 0's bytes of parameters,
the model's whole bytes, and rank 0's peak host memory from before the model is built to after setup.
WIDTH / DEPTH size the model; EAGER=1 builds it on the CPU instead of the meta device.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed.fsdp  # noqa: F401 (imported before the memory is measured: its code is not the model's)
import torch.distributed.tensor  # noqa: F401
import torch.nn.functional as F
from torch import nn

import distrib
from distrib.parallel.wrap import params_sha256, state_bytes


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class Net(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 50)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _rss(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def main() -> int:
    torch.set_num_threads(1)
    cfg = distrib.parse_config(sys.argv[1:])
    width, depth = int(os.environ.get("WIDTH", "64")), int(os.environ.get("DEPTH", "4"))
    with distrib.Session(cfg) as session:
        # FSDP's first use costs ~33 MB of its own (code, the mesh), whatever the model: paid before measuring.
        session.setup(Net(8, 2))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
        before = _rss("VmRSS")
        with torch.device("cpu" if os.environ.get("EAGER") == "1" else "meta"):
            model = Net(width, depth)
        whole = sum(p.numel() * p.element_size() for p in model.parameters())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built on the meta parameters: setup re-points it
        model, optimizer = session.setup(model, optimizer)
        peak = _rss("VmHWM") - before  # before the hash below gathers the whole model
        out = {"setup": params_sha256(model), "bytes": state_bytes(model)["params"], "whole": whole, "setup_peak": peak}
        idx = torch.arange(16).reshape(2, 8) % 50  # the same batch on every rank: one step's result is the same at any world size
        session.backward(F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()))
        session.step(optimizer)
        out["stepped"] = params_sha256(model)
        if session.rank == 0:
            with open(os.environ["OUT"], "w") as f:
                json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
