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
at every step. Later reductions do what DDP's built-in one does (scale by 1/world size, all-reduce
the bucket, no host sync): DDP cannot unregister a hook, so a resumed run keeps this one. A fresh run
gets no hook, so it stays bitwise the plain DDP loop a user would write.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distrib.parallel.wrap import ddp_of
from distrib.runtime.console import log


def _will_rebuild(ddp: DDP) -> bool:
    # DDP rebuilds its buckets once, after the first backward that reduces, unless it looks for unused
    # parameters (then it keeps its first, already sized buckets and a resume sums alike).
    return bool(getattr(ddp, "static_graph", False)) or not ddp.find_unused_parameters


class _ReplayHook:
    """The communication hook: reductions in the rebuilt layout until DDP has rebuilt, then DDP's plain all-reduce."""

    def __init__(self, ddp: DDP) -> None:
        self.group = ddp.process_group
        self.scale = 1.0 / self.group.size()  # DDP multiplies by the reciprocal as it copies into the bucket
        config = getattr(ddp, "_bucket_config", None)
        first = config.first_bucket_bytes_cap if config is not None else dist._DEFAULT_FIRST_BUCKET_BYTES
        self.limits = [int(first), int(ddp.bucket_bytes_cap)]
        self.arrived: list[torch.Tensor] = []  # this backward's parameters, in the order their gradients arrived
        self._arrived_ids: set[int] = set()
        self.layout: list[list[int]] | None = None  # the buckets DDP will build: parameter ids, in bucket order
        self.rebuilt = False  # DDP's own buckets are the layout now (or replaying was given up): plain all-reduce
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
        if not self.rebuilt:
            if self.layout is None:
                self._plan(bucket)
            ids = [id(p) for p in bucket.parameters()]
            if self.layout is not None and ids in self.layout:
                self.rebuilt = True  # DDP has rebuilt (a default DDP after one backward, static_graph after two)
            elif self.layout is not None and self._whole(bucket):
                self._replay(bucket)
                done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
                done.set_result(bucket.buffer())
                return done
            else:
                self._give_up("DDP's buckets are neither its first one nor the ones distrib expected it to build")
        buffer = bucket.buffer().mul_(self.scale)
        return dist.all_reduce(buffer, group=self.group, async_op=True).get_future().then(lambda f: f.value()[0])

    def _whole(self, bucket: dist.GradBucket) -> bool:
        """Whether `bucket` is DDP's first: one bucket of every parameter."""
        return bucket.index() == 0 and bucket.is_last() and len(bucket.parameters()) == sum(map(len, self.layout or []))

    def _plan(self, bucket: dist.GradBucket) -> None:
        """The buckets DDP builds from the order this first backward's gradients arrived in (DDP's own function)."""
        for handle in self.handles:
            handle.remove()
        params = bucket.parameters()
        index = {id(p): i for i, p in enumerate(params)}
        order = [index[id(p)] for p in self.arrived if id(p) in index]
        self.arrived.clear()
        self._arrived_ids.clear()
        if bucket.index() != 0 or not bucket.is_last() or sorted(order) != list(range(len(params))):
            return
        layout, _ = dist._compute_bucket_assignment_by_size([params[i] for i in order], self.limits, [], order)
        self.layout = [[id(params[i]) for i in indices] for indices in layout]

    def _replay(self, bucket: dist.GradBucket) -> None:
        """All-reduce each planned bucket alone, as DDP will once it has rebuilt (scaled as DDP scales)."""
        assert self.layout is not None  # _whole() checked it
        grads = {id(p): g for p, g in zip(bucket.parameters(), bucket.gradients())}
        for ids in self.layout:
            flat = torch.cat([grads[i].reshape(-1) for i in ids]).mul_(self.scale)
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for i in ids:
                n = grads[i].numel()
                grads[i].copy_(flat[offset : offset + n].view_as(grads[i]))
                offset += n

    def _give_up(self, why: str) -> None:
        self.rebuilt = True
        log.warning(f"{why}; the resumed run may differ in the last bits from an uninterrupted one at 3+ ranks")


def replay_rebuilt_buckets(model: DDP) -> None:
    """Register the hook on a resumed DDP model, before its first backward (a no-op where DDP keeps its buckets)."""
    if _will_rebuild(model) and model.process_group.size() > 2 and not getattr(model, "_distrib_replay", False):
        setattr(model, "_distrib_replay", True)  # noqa: B010 (DDP declares no such attribute)
        model.register_comm_hook(None, _ReplayHook(model).hook)


def continue_reductions(models: list[nn.Module]) -> None:
    """Each resumed DDP model among `models` adds its ranks' gradients in the order the run it continues did."""
    for model in models:
        ddp = ddp_of(model)
        if ddp is not None:
            replay_rebuilt_buckets(ddp)
