"""An own loop in which one rank takes another branch and skips a collective (the hang tests, under torchrun).

Every rank trains 4 steps; then every rank but SKIP_RANK sums a total over the ranks, and SKIP_RANK
goes straight on to the session's end, where it waits in the closing barrier.
"""

from __future__ import annotations

import os
import sys

import torch

import distrib


def own_loop(cfg: distrib.Config) -> None:
    skip_rank = int(os.environ.get("SKIP_RANK", "1"))
    with distrib.Session(cfg) as session:
        torch.manual_seed(0)
        model, optimizer = session.setup(torch.nn.Linear(4, 1), torch.optim.SGD(torch.nn.Linear(4, 1).parameters(), lr=0.1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        data = torch.utils.data.TensorDataset(torch.randn(256, 4), torch.randn(256, 1))
        train = session.train_loader(data, batch_size=8)
        for mb in train:
            x, y = mb.batch
            session.backward(torch.nn.functional.mse_loss(model(x), y) * mb.weight)
            if mb.last:
                session.step(optimizer)
            if train.step == 4:
                break
        total = torch.ones(1)
        if session.rank != skip_rank:  # the bug under test: one rank skips the sum
            session.all_reduce(total)


def main() -> int:
    torch.set_num_threads(1)
    own_loop(distrib.parse_config(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
