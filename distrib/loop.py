"""The training loop users know, run data-parallel: epochs, micro-batches, steps, eval, logs.

Hot path per micro-batch: copy, forward, loss, backward, device-side metric sums. No `.item()`,
no host sync and no collective but DDP's own; the one metric all-reduce happens at the log interval.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from distrib import checkpoint, tracking
from distrib.config import Config
from distrib.data import LoaderOptions, TrainLoader, eval_loader, mix_seed, steps_per_epoch
from distrib.dist import Runtime, broadcast_object
from distrib.errors import BatchError, ConfigError
from distrib.logs import STOPPED_FILE, log, writer_for
from distrib.metrics import MeanMetrics, count_correct
from distrib.monitor import IntervalTimes, Progress, Watchdog, interval_fields
from distrib.model import params_sha256, set_grad_sync, unwrap_model, wrap_model
from distrib.precision import Precision
from distrib.stop import EXIT_STOPPED, StopRequest
from distrib.transfer import describe, device_batches, leading_dim, map_tensors

LossFn = Callable[[Any, Any], torch.Tensor]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """`(inputs, labels)` from a 2-sequence or a mapping with `inputs` and `labels` keys."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and not hasattr(batch, "_fields"):
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and "inputs" in batch and "labels" in batch:
        return batch["inputs"], batch["labels"]
    raise BatchError(
        f"Cannot split a {type(batch).__name__} batch into (inputs, labels). HINT: have the Dataset "
        "return (inputs, labels) or {'inputs': ..., 'labels': ...}, or pass split_batch= to Trainer."
    )


@dataclasses.dataclass(kw_only=True)
class TrainState:
    """Where training stands; everything here is a plain int, identical on every rank."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    epoch_samples: int = 0
    """Samples *this rank* consumed in the current epoch (at the last step boundary)."""
    samples_seen: int = 0
    """Global samples trained on so far (all ranks)."""


class Trainer:
    """Wraps a model, optimizer and datasets for the current `Runtime`, and runs `fit()`.

    Everything that can be wrong with the input is checked here, before rank 0 creates `run.dir`.
    """

    def __init__(
        self,
        cfg: Config,
        rt: Runtime,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_data: Dataset,
        eval_data: Dataset | None = None,
        loss_fn: LossFn = F.cross_entropy,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        split_batch: Callable[[Any], tuple[Any, Any]] = split_batch,
        tokens_per_sample: float | None = None,
        flops_per_sample: float | None = None,
    ) -> None:
        self.cfg, self.rt = cfg, rt
        self.optimizer, self.scheduler, self.loss_fn, self.split = optimizer, scheduler, loss_fn, split_batch
        # Declared by the task, for tokens/s and MFU in the log (a model's FLOPs are not measurable cheaply).
        self.tokens_per_sample, self.flops_per_sample = tokens_per_sample, flops_per_sample
        tc, dc = cfg.train, cfg.data
        self.precision = Precision(tc.precision, rt.device)
        opts = LoaderOptions(
            batch_size=tc.batch_size,
            num_workers=dc.num_workers,
            persistent_workers=dc.persistent_workers,
            prefetch_factor=dc.prefetch_factor,
            pin_memory=rt.device.type == "cuda",  # pinned host memory only helps a CUDA copy
            collate_fn=collate_fn,
        )
        self.train_loader = TrainLoader(
            train_data, world_size=rt.world_size, rank=rt.rank, seed=cfg.seed, shuffle=dc.shuffle, drop_last=dc.drop_last, opts=opts
        )
        self.eval_loader = (
            eval_loader(eval_data, world_size=rt.world_size, rank=rt.rank, opts=dataclasses.replace(opts, batch_size=tc.eval_batch_size or tc.batch_size))
            if eval_data is not None
            else None
        )
        self._probe_batch(train_data, collate_fn)
        self.model = wrap_model(model, rt, cfg.dist, compile=tc.compile)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.state = TrainState()
        self.metrics = MeanMetrics(rt.device)
        self.steps_per_epoch = steps_per_epoch(self.train_loader.num_batches(), tc.grad_accum)
        self.total_steps = min(tc.max_steps or 2**62, tc.epochs * self.steps_per_epoch)
        self.times = IntervalTimes()
        self._interval_steps = 0
        self._logger_run_id: str | None = None
        self.last_eval: dict[str, float] = {}
        self.stop = StopRequest()
        """Set it (a signal handler does) and every rank stops at the next log interval, checkpointed."""
        self._stopping = False
        self._saved_step = -1
        # Distinct per rank (dropout masks differ across ranks), reproducible from `seed`.
        _seed_everything(mix_seed(cfg.seed, rt.rank))
        self.ckpt_root = Path(cfg.run.dir) / "checkpoints"
        resume = self._resume_path()
        if resume is not None:
            self._restore(resume)
        # All checks passed: only now does rank 0 touch the file system (and wandb).
        tracker = tracking.start(cfg.wandb, run_dir=cfg.run.dir, config=cfg.to_dict(), run_id=self._logger_run_id) if rt.is_rank_zero else None
        self.writer = writer_for(rt.rank, cfg.run.dir, fresh=resume is None, tracker=tracker)
        self.watchdog = Watchdog(tc.hang_timeout_s, rt.rank)
        want_bar = tc.progress == "bar" or (tc.progress == "auto" and sys.stdout.isatty())
        self.progress = Progress(rt.is_rank_zero and want_bar, total=self.total_steps, initial=self.state.step)
        if resume is not None:
            self.writer.rewind(step=self.state.step, epoch=self.state.epoch)
        self.writer.json("config.json", cfg.to_dict())

    def _probe_batch(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        """Collate one sample and split it, so a malformed batch fails before anything is written."""
        sample = dataset[0]
        try:
            batch = (collate_fn or default_collate)([sample])
        except TypeError as exc:
            raise BatchError(
                f"Cannot collate a sample of type {type(sample).__name__} into a batch ({exc}). HINT: have the "
                "Dataset return tensors (or numbers/arrays default_collate understands), or pass collate_fn."
            ) from None
        map_tensors(batch, lambda t: t)
        self.split(batch)

    # ------------------------------------------------------------------ public

    def fit(self) -> dict[str, Any]:
        """Train for `train.epochs` (or `train.max_steps`), evaluating after each epoch.

        Returns the summary, or `{"stopped": True, ...}` when a stop was agreed (see `self.stop`).
        """
        started = time.perf_counter()
        while not self._done():
            self._train_epoch()
            if self._stopping and not self._epoch_finished and not self._done():
                return self._stopped()  # mid-epoch: no eval; the resumed run evaluates at the epoch end
            self.evaluate()
            if self._epoch_finished:
                self.state.epoch += 1
                self.state.epoch_samples = 0
                self.save_checkpoint()
            if self._stopping and not self._done():
                return self._stopped()
        return self._finish(time.perf_counter() - started)

    def _done(self) -> bool:
        return self.state.epoch >= self.cfg.train.epochs or self.state.step >= self.total_steps

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Exact global metrics over every eval sample once (no sampler padding); logs an eval line."""
        if self.eval_loader is None:
            return {}
        module = unwrap_model(self.model)
        module.eval()
        em = MeanMetrics(self.rt.device)
        for batch in device_batches(self.eval_loader, self.rt.device, prefetch=self.cfg.data.prefetch):
            self.watchdog.beat()
            inputs, labels = self.split(batch)
            with self.precision.autocast():
                outputs = module(inputs)
                loss = self.loss_fn(outputs, labels)
            em.add(loss, count_correct(outputs, labels), leading_dim(inputs))
        module.train()
        result = em.reduce()
        self.last_eval = result
        self.writer.metrics({"kind": "eval", "step": self.state.step, "epoch": self.state.epoch, **result})
        log.info(f"eval  step {self.state.step} | epoch {self.state.epoch} | loss {result['loss']:.4f} | acc {result['accuracy']:.4f} | count {result['count']}")
        return result

    def save_checkpoint(self) -> None:
        """Checkpoint at the current optimizer-step boundary (a few barriers; not on the per-step path)."""
        if self._saved_step == self.state.step:
            return  # e.g. a stop agreed on a step that ckpt.every already saved
        self._saved_step = self.state.step
        module = unwrap_model(self.model)
        shared = {
            "model": module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.precision.scaler.state_dict(),
            "train": dataclasses.asdict(self.state),
            "world_size": self.rt.world_size,
            "last_eval": self.last_eval,
            "config": self.cfg.to_dict(),
            "logger_run_id": self.writer.tracker.run_id if self.writer.tracker is not None else None,
        }
        per_rank = {"rng": checkpoint.capture_rng(), "metrics": self.metrics.state().cpu(), "interval_steps": self._interval_steps}
        checkpoint.save(self.ckpt_root, self.state.step, rank=self.rt.rank, world_size=self.rt.world_size,
                        keep=self.cfg.ckpt.keep, shared=shared, per_rank=per_rank)

    def _resume_path(self) -> Path | None:
        """Rank 0 picks the checkpoint (so all ranks agree even if one is written meanwhile)."""
        choice: Any = None
        if self.rt.is_rank_zero:
            try:
                path = checkpoint.resolve_resume(self.cfg.ckpt.resume, self.ckpt_root)
                choice = str(path) if path is not None else None
            except ConfigError as exc:
                choice = exc
        choice = broadcast_object(choice)
        if isinstance(choice, ConfigError):
            raise choice
        return Path(choice) if choice is not None else None

    def _restore(self, path: Path) -> None:
        shared = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        unwrap_model(self.model).load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        if self.scheduler is not None and shared["scheduler"] is not None:
            self.scheduler.load_state_dict(shared["scheduler"])
        self.precision.scaler.load_state_dict(shared["scaler"])
        self.state = TrainState(**shared["train"])
        self.last_eval = shared["last_eval"]
        self._logger_run_id = shared.get("logger_run_id")
        old_world = shared["world_size"]
        if old_world == self.rt.world_size:
            per_rank = torch.load(path / checkpoint.rank_file(self.rt.rank), map_location="cpu", weights_only=False)
            checkpoint.restore_rng(per_rank["rng"])
            self.metrics.load(per_rank["metrics"].to(self.rt.device))
            self._interval_steps = per_rank["interval_steps"]
            log.info(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, {self.state.samples_seen} samples seen)")
        else:
            # Same global position in the epoch, new shards: training continues, but not bit-for-bit.
            consumed = self.state.epoch_samples * old_world
            self.state.epoch_samples = consumed // self.rt.world_size
            log.warning(
                f"resuming a {old_world}-process checkpoint ({path}) on {self.rt.world_size} processes: continuing "
                f"at step {self.state.step}, {self.state.samples_seen} samples seen; the result will not be "
                "bit-identical to an uninterrupted run"
            )

    def close(self) -> None:
        """Close rank 0's files and drop the DDP wrapper. Call it before the process group goes.

        If the DDP reducer outlives the process group, it becomes the group's last owner and its
        destructor joins gloo's worker threads while holding the GIL, which can deadlock.
        """
        self.progress.close()
        self.watchdog.close()
        self.writer.close()
        self.model = unwrap_model(self.model)

    # ------------------------------------------------------------------ internals

    def _train_epoch(self) -> None:
        tc, st = self.cfg.train, self.state
        skip = st.epoch_samples
        sizes = self.train_loader.micro_batch_sizes(skip)
        self.train_loader.set_epoch(st.epoch, skip)
        accum = tc.grad_accum
        if self._interval_steps == 0:
            self.times = IntervalTimes()  # the first interval of an epoch does not count the eval before it
        self.model.train()
        self._epoch_finished = False
        batches = iter(device_batches(self.train_loader, self.rt.device, prefetch=self.cfg.data.prefetch))
        consumed = 0
        for i in range(len(sizes)):
            waited = time.perf_counter()
            batch = next(batches)
            self.times.data_wait += time.perf_counter() - waited
            if self.cfg.debug and st.step == 0 and i == 0:
                log.info("first batch:\n" + describe(batch))
            group = sizes[i - i % accum : i - i % accum + accum]
            last_micro = i % accum == len(group) - 1
            self._micro_step(batch, expected=sizes[i], step_samples=sum(group), sync=last_micro)
            consumed = i + 1
            if last_micro:
                self._optimizer_step(sum(group))
                if st.step >= self.total_steps or self._stopping:
                    break
        self._epoch_finished = consumed == len(sizes)
        if self._interval_steps:
            self._log_train()  # the tail interval (epoch end or max_steps), so every sample is logged once

    def _micro_step(self, batch: Any, *, expected: int, step_samples: int, sync: bool) -> None:
        inputs, labels = self.split(batch)
        n = leading_dim(inputs)
        if n != expected:
            raise BatchError(
                f"A micro-batch has {n} samples where the sampler arithmetic expects {expected}. distrib "
                "scales losses by the known step size; HINT: do not change batch sizes in collate_fn or the Dataset."
            )
        set_grad_sync(self.model, sync)
        with self.precision.autocast():
            outputs = self.model(inputs)
            loss = self.loss_fn(outputs, labels)
        # Mean loss of the micro-batch weighted by its share of the step's samples on this rank: the
        # accumulated gradient is that of the mean over the step (short last step included), and
        # DDP's average over ranks (all hold the same count) makes it the global mean.
        started = time.perf_counter() if sync else 0.0
        self.precision.backward(loss * (n / step_samples))
        if sync:  # DDP's all-reduce runs in this backward: a fast rank waits here for the slowest
            self.times.sync += time.perf_counter() - started
        self.metrics.add(loss, count_correct(outputs, labels), n)

    def _optimizer_step(self, local_samples: int) -> None:
        st = self.state
        self.precision.step(self.optimizer, self.params, self.cfg.train.clip_grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        st.step += 1
        st.epoch_samples += local_samples
        st.samples_seen += local_samples * self.rt.world_size
        self._interval_steps += 1
        self.watchdog.beat()
        self.progress.step()
        if st.step % self.cfg.train.log_every == 0:
            self._log_train()
        if self.cfg.ckpt.every and st.step % self.cfg.ckpt.every == 0:
            self.save_checkpoint()

    def _log_train(self) -> None:
        """All-reduce the interval's sums (the only extra collective), write one line, reset."""
        st, world = self.state, self.rt.world_size
        extras = [float(self.stop.requested), *self.times.extras(self.rt.rank, world, self.rt.device, self._interval_steps)]
        r = self.metrics.reduce(extras)
        self.metrics.reset()
        votes, reduced = int(r["extra"][0]), r["extra"][1:]
        if votes and not self._stopping:
            self._stopping = True
            log.info(f"{self.stop.reason} received by {votes} of {world} ranks: stopping at step {st.step} with a checkpoint")
        elapsed = reduced[1] / world  # the interval's wall time, averaged over ranks
        samples_per_s = r["count"] / elapsed if elapsed > 0 else 0.0
        record = {
            "kind": "train",
            "step": st.step,
            "epoch": st.epoch,
            "loss": r["loss"],
            "accuracy": r["accuracy"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples": st.samples_seen,
            "interval_samples": r["count"],
            "samples_per_s": samples_per_s,
            "step_time_s": elapsed / max(self._interval_steps, 1),
            **interval_fields(reduced, world, self.cfg.train.straggler_threshold, warn=self.rt.is_rank_zero),
        }
        if self.tokens_per_sample:
            record["tokens_per_s"] = samples_per_s * self.tokens_per_sample
        if self.flops_per_sample and self.cfg.train.peak_flops:
            record["mfu"] = samples_per_s * self.flops_per_sample / (self.cfg.train.peak_flops * world)
        self.writer.metrics(record)
        if self.progress.active:
            self.progress.show(epoch=st.epoch, loss=f"{r['loss']:.4f}", samples_s=f"{samples_per_s:.0f}")
        else:
            log.info(
                f"train step {st.step}/{self.total_steps} | epoch {st.epoch} | loss {r['loss']:.4f} | "
                f"acc {r['accuracy']:.4f} | lr {record['lr']:.3g} | {samples_per_s:.0f} samples/s | "
                f"data wait {record['data_wait_frac']:.0%}"
            )
        self.times, self._interval_steps = IntervalTimes(), 0

    def _stopped(self) -> dict[str, Any]:
        """Checkpoint where every rank agreed to stop; the caller exits with EXIT_STOPPED."""
        self.save_checkpoint()
        self.writer.json(STOPPED_FILE, {"step": self.state.step, "signal": self.stop.reason, "exit_status": EXIT_STOPPED})
        log.info(
            f"stopped at step {self.state.step}/{self.total_steps} (epoch {self.state.epoch}); checkpoint saved in "
            f"{self.ckpt_root}. Exit status {EXIT_STOPPED}: run the same command again to continue."
        )
        return {"stopped": True, "optimizer_steps": self.state.step, "samples_seen": self.state.samples_seen}

    def _finish(self, wall_s: float) -> dict[str, Any]:
        module = unwrap_model(self.model)
        summary = {
            "stopped": False,
            "world_size": self.rt.world_size,
            "launcher": self.rt.env.launcher,
            "device": str(self.rt.device),
            "optimizer_steps": self.state.step,
            "epochs_completed": self.state.epoch,
            "samples_seen": self.state.samples_seen,
            "eval": self.last_eval,
            "params_sha256": params_sha256(module),
            "wall_time_s": wall_s,
        }
        self.writer.save_model(module.state_dict())
        self.writer.json("summary.json", summary)
        return summary


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
