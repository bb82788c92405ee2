"""A resumed DDP model sums its gradients in the same order as the run it continues.

DDP reduces gradients in buckets. A freshly built `DistributedDataParallel` (default settings) holds
every parameter in one bucket for its first backward, records the order in which gradients become
ready, and then rebuilds its buckets (1 MiB first, then `bucket_cap_mb`) in that order. The ring
all-reduce splits each bucket into one chunk per rank, and where an element falls decides the order
in which the ranks' values are added. So the first reduction after a resume, in one big bucket, adds
in another order than the uninterrupted run, which is long past its rebuild: the parameters differ
in the last bit from then on. At 2 ranks the order does not matter (`a + b == b + a`); at 3 or more
it does.

`replay_rebuilt_buckets` registers a communication hook on a resumed model: its first reduction
splits the one bucket into the buckets DDP is about to build (DDP's own assignment function, on the
order the gradients arrived in) and all-reduces each alone, which is what the uninterrupted run does
at every step. Later reductions are DDP's: scale by 1/world size, all-reduce the bucket. A fresh run
gets no hook, so it stays bitwise the plain DDP loop a user would write.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from distrib.logs import log


def _will_rebuild(ddp: DDP) -> bool:
    # DDP rebuilds its buckets once, after the first backward that reduces, unless it looks for unused
    # parameters (then it keeps its first, already sized buckets and a resume sums alike).
    return bool(getattr(ddp, "static_graph", False)) or not ddp.find_unused_parameters


class _ReplayHook:
    """The communication hook: the first reduction in the rebuilt layout, then DDP's plain all-reduce."""

    def __init__(self, ddp: DDP) -> None:
        self.group = ddp.process_group
        self.scale = 1.0 / self.group.size()  # DDP multiplies by the reciprocal as it copies into the bucket
        config = getattr(ddp, "_bucket_config", None)
        first = config.first_bucket_bytes_cap if config is not None else dist._DEFAULT_FIRST_BUCKET_BYTES
        self.limits = [int(first), int(ddp.bucket_bytes_cap)]
        self.arrived: list[torch.Tensor] = []  # this backward's parameters, in the order their gradients arrived
        self._arrived_ids: set[int] = set()
        self.expected: dict[int, list[int]] | None = None  # the replayed layout, checked against DDP's rebuild
        self.replayed = False
        params = [p for p in ddp.module.parameters() if p.requires_grad]
        self.handles = [p.register_post_accumulate_grad_hook(self._arrived) for p in params]

    def _arrived(self, param: torch.Tensor) -> None:
        # A parameter that arrives twice starts another backward (micro-batches that accumulate).
        if id(param) in self._arrived_ids:
            self.arrived.clear()
            self._arrived_ids.clear()
        self.arrived.append(param)
        self._arrived_ids.add(id(param))

    # DDP checks a hook's annotations against the real classes, and this module's are strings
    # (`from __future__ import annotations`), so the signature carries none.
    def hook(self, state, bucket):  # type: ignore[no-untyped-def]
        """(state, bucket) -> a future of the reduced bucket, as DDP's register_comm_hook expects."""
        if not self.replayed:
            self.replayed = True
            for handle in self.handles:
                handle.remove()
            if self._replay(bucket):
                done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
                done.set_result(bucket.buffer())
                return done
        elif self.expected is not None:
            self._check(bucket)
        buffer = bucket.buffer().mul_(self.scale)
        return dist.all_reduce(buffer, group=self.group, async_op=True).get_future().then(lambda f: f.value()[0])

    def _replay(self, bucket: dist.GradBucket) -> bool:
        params, grads = bucket.parameters(), bucket.gradients()
        index = {id(p): i for i, p in enumerate(params)}
        order = [index[id(p)] for p in self.arrived if id(p) in index]
        if bucket.index() != 0 or not bucket.is_last() or sorted(order) != list(range(len(params))):
            log.warning("DDP's first reduction after the resume is not one bucket of every gradient; the resumed run may "
                        "differ in the last bits from an uninterrupted one")
            return False
        layout, _ = dist._compute_bucket_assignment_by_size([params[i] for i in order], self.limits, [], order)
        for indices in layout:
            flat = torch.cat([grads[i].reshape(-1) for i in indices]).mul_(self.scale)
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for i in indices:
                n = grads[i].numel()
                grads[i].copy_(flat[offset:offset + n].view_as(grads[i]))
                offset += n
        self.expected = {id(params[indices[0]]): [id(params[i]) for i in indices] for indices in layout}
        self.arrived.clear()
        self._arrived_ids.clear()
        return True

    def _check(self, bucket: dist.GradBucket) -> None:
        """DDP's rebuilt bucket must be the one replayed; say so once if a future torch builds them otherwise."""
        if self.expected is None:
            return
        ids = [id(p) for p in bucket.parameters()]
        if self.expected.pop(ids[0], None) != ids:
            log.warning("DDP rebuilt its buckets otherwise than distrib replayed them after the resume; the resumed run "
                        "may differ in the last bits from an uninterrupted one")
            self.expected = None
        elif not self.expected:
            self.expected = None


def replay_rebuilt_buckets(model: DDP) -> None:
    """Register the hook on a resumed DDP model, before its first backward (a no-op where DDP keeps its buckets)."""
    if _will_rebuild(model) and model.process_group.size() > 2 and not getattr(model, "_distrib_replay", False):
        model._distrib_replay = True  # type: ignore[attr-defined]
        model.register_comm_hook(None, _ReplayHook(model).hook)
