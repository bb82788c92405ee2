"""`fit`'s loop, written on the public blocks of `Session` (a loop you could write yourself).

Hot path per micro-batch: forward, loss, backward, device-side metric sums. No `.item()`, no
host sync and no collective but DDP's own (and, when losses average over tokens, one small count
all-reduce per optimizer step); the one metric all-reduce happens at the log interval.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from distrib.checkpoint.rundir import SUMMARY_FILE
from distrib.config import OptimConfig
from distrib.data.accumulate import ItemCounter, MicroBatch
from distrib.data.transfer import describe
from distrib.loop.callbacks import Callback
from distrib.loop.evaluation import evaluate_batches
from distrib.loop.loss import LossFn, LossStep, StepFn, default_items
from distrib.loop.optim import build_optimizer_for, build_scheduler
from distrib.loop.preflight import check_datasets, collate_probe, complete_run, probe, share
from distrib.loop.session import Session
from distrib.observe.interval import IntervalSums, IntervalTimes, Stragglers, interval_rates
from distrib.observe.metrics import Metrics, one_line, shown
from distrib.observe.monitor import Progress
from distrib.parallel.materialize import is_meta
from distrib.parallel.wrap import params_sha256, unwrap_model
from distrib.runtime.console import log


class Trainer:
    """Trains a model on a dataset inside a `Session`: epochs, accumulation, eval, logs, checkpoints, callbacks.

    The constructor only stores its arguments; `fit()` checks everything (a pre-flight probe of the
    model on one batch) before the first file is written.
    """

    def __init__(
        self,
        session: Session,
        *,
        model: nn.Module,
        train_data: Dataset,
        eval_data: Dataset | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        loss_fn: LossFn | None = None,
        step_fn: StepFn | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        items: ItemCounter | None = None,
        callbacks: Sequence[Callback] = (),
        tokens_per_sample: float | None = None,
        flops_per_sample: float | None = None,
    ) -> None:
        self.session, self.cfg = session, session.cfg
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_data, self.eval_data, self.collate_fn = train_data, eval_data, collate_fn
        self.step_logic = LossStep(unwrap_model(model), loss_fn=loss_fn, step_fn=step_fn)
        self.items, self.callbacks = items, list(callbacks)
        # Declared by the task, for tokens/s and MFU in the log (a model's FLOPs are not measurable cheaply).
        self.tokens_per_sample, self.flops_per_sample = tokens_per_sample, flops_per_sample
        self.stop = session.stop
        self.stop.when = "at the next log interval"
        """Set it (a signal handler does) and every rank stops at the next log interval, checkpointed."""
        self.last_eval: dict[str, Any] = {}
        self.early_stop_reason: str | None = None
        self._interval_steps = 0
        self._saved_step: tuple[int, int] = (-1, -1)
        self._eval_step = -1  # the training step of the last finished eval
        self._prepared = False
        self._complete: dict[str, Any] | None = None  # the summary of a run found complete on resume
        self._own_scheduler = False  # built from optim.* by fit (not the user's)
        self._optim_cfg: OptimConfig | None = getattr(self.cfg, "optim", None)  # a script's `optim` section, if it has one
        self._lr = 0.0

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> None:
        """Loaders, pre-flight probe, optimizer, model wrapping, resume, then rank 0's files (once; `fit` calls it)."""
        if self._prepared:
            return
        self._prepared = True
        s, cfg = self.session, self.cfg
        world, tc = s.world_size, cfg.train
        check_datasets(self.train_data, self.eval_data)
        # Probe batches as large as the real ones (a rank's share at most): a batch size that cannot fit
        # (memory, a model's fixed length) fails here, before anything is written, not after an epoch.
        sample = collate_probe(self.train_data, self.collate_fn, n=min(tc.batch_size, share(self.train_data, world)))
        eval_sample = (
            collate_probe(self.eval_data, self.collate_fn, n=min(tc.eval_batch_size or tc.batch_size, share(self.eval_data, world)))
            if self.eval_data is not None
            else None
        )
        if self.items is None and self.step_logic.step_fn is None and self.step_logic.loss_fn is None:
            # The Hugging Face convention (dict batch, labels, the model takes num_items_in_batch): token
            # means. A step function says what its loss averages over with items=.
            self.items = default_items(unwrap_model(self.model), sample)
        self.train = s.train_loader(self.train_data, collate_fn=self.collate_fn, items=self.items)
        self.eval_loader = s.eval_loader(self.eval_data, collate_fn=self.collate_fn) if self.eval_data is not None else None
        self.total_steps = min(cfg.train.max_steps or 2**62, cfg.train.epochs * self.train.steps_per_epoch)
        probes = [(sample, f"train.batch_size={tc.batch_size}")] + (
            [(eval_sample, f"train.eval_batch_size={tc.eval_batch_size or tc.batch_size}")] if eval_sample is not None else []
        )
        meta = is_meta(self.model)  # a meta-built model has no values to probe until setup allocates them
        for batch, key in [] if meta else probes:
            probe(self.model, self.step_logic, self.items, batch, self.session, key)
        self.model, self.optimizer = s.setup(self.model, self._build_optimizer())
        for batch, key in probes if meta else []:
            probe(self.model, self.step_logic, self.items, batch, self.session, key)
        s.seed_everything()
        self.metrics = Metrics(s.device)
        self.times = IntervalTimes()
        self.stragglers = Stragglers(cfg.train.straggler_threshold)
        state = self._state()
        resumed = s.load(state)
        if resumed is not None:
            loader = self.train
            # Checkpoint format 1 (before eval_step existed): the last eval is the one it recorded.
            saved = {"last_eval": {}, "early_stop_reason": None, "interval_steps": 0, "world_size": s.world_size, **state["trainer"]}
            saved.setdefault("eval_step", saved["last_eval"].get("step", -1))
            log.info(f"resumed from {resumed} at step {loader.step} (epoch {loader.epoch}, {loader.samples_seen} samples seen)")
            self.last_eval, self.early_stop_reason = saved["last_eval"], saved["early_stop_reason"]
            # The interval's sums are per rank: they carry over only at the same world size.
            self._interval_steps = saved["interval_steps"] if s.world_size == saved["world_size"] else 0
            self._eval_step = saved["eval_step"]
            s.guard.skipped = list(saved.get("skipped_steps", []))  # (checkpoints before the guard have none)
            # Counted from where the checkpoint is: after a change of world size (or batch size) the
            # steps already taken were of another size, and the run still ends at the same epoch.
            total = min(cfg.train.max_steps or 2**62, loader.step + loader.steps_left(cfg.train.epochs))
            if total != self.total_steps and self._own_scheduler:
                # fit's own schedule must end at the run's real last step: same position, new length.
                position, rates = self.scheduler.state_dict(), [g["lr"] for g in self.optimizer.param_groups]
                assert self._optim_cfg is not None  # fit built this schedule from it
                self.scheduler = build_scheduler(self._optim_cfg, self.optimizer, total)  # (construction resets the rates)
                self.scheduler.load_state_dict(position)
                for group, rate in zip(self.optimizer.param_groups, rates):
                    group["lr"] = rate
            self.total_steps = total
            self._complete = self._finished_summary(resumed)
        want_bar = cfg.train.progress == "bar" or (cfg.train.progress == "auto" and sys.stdout.isatty())
        self.progress = Progress(s.is_rank_zero and want_bar, total=self.total_steps, initial=self.train.step)
        s.defer(self.progress.close)
        if self._complete is None:  # a complete run writes nothing (see _finished_summary)
            s.open_run_files()  # all checks passed: only now does rank 0 touch the file system (and wandb)

    def _finished_summary(self, resumed: Any) -> dict[str, Any] | None:
        """The summary of a run already complete at the checkpoint it resumed from (see `preflight.complete_run`), or None."""
        if not self._done() or self._eval_due():
            return None
        return complete_run(self.session.ckpt_root.parent, self.train.step, resumed)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        optimizer, built = build_optimizer_for(self._optim_cfg, self.model, self.optimizer)
        if built and self.scheduler is None and self._optim_cfg is not None:
            self.scheduler = build_scheduler(self._optim_cfg, optimizer, self.total_steps)
            self._own_scheduler = True
        return optimizer

    # ------------------------------------------------------------------ checkpoint state

    def _state(self) -> dict[str, Any]:
        trainer = {
            "last_eval": self.last_eval,
            "interval_steps": self._interval_steps,
            "eval_step": self._eval_step,
            "world_size": self.session.world_size,
            "early_stop_reason": self.early_stop_reason,
            "skipped_steps": self.session.guard.skipped,
        }
        state: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer, "loader": self.train, "metrics": self.metrics, "trainer": trainer}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler
        state.update({f"callback{i}": cb for i, cb in enumerate(self.callbacks) if type(cb).state_dict is not Callback.state_dict})
        return state

    def save_checkpoint(self) -> None:
        """Checkpoint at the current optimizer-step boundary (a few barriers; not on the per-step path)."""
        step = self.train.step
        if self._saved_step == (step, self._eval_step):
            return  # e.g. a stop agreed on a step that ckpt.every already saved
        self._saved_step = (step, self._eval_step)
        self.session.save(self._state())
        for cb in self.callbacks:
            cb.on_checkpoint(self, step)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train for `train.epochs` (or `train.max_steps`), evaluating after each epoch.

        Returns the summary, or `{"stopped": True, ...}` when a stop was agreed (see `self.stop`).
        """
        self.prepare()
        if self._complete is not None:
            return self._complete
        return self._fit()

    def _fit(self) -> dict[str, Any]:
        started = time.perf_counter()
        while True:
            if not self._eval_due():
                if self._done():
                    break
                self._train_epoch()
                if not self._eval_due():  # a stop cut the epoch short; the resumed run evaluates at its end
                    return self._stopped()
            if self._evaluate(yield_to_stop=True) is None:
                return self._stopped()  # the eval gave way to a stop; the resumed run evaluates again
            if self.train.epoch_done:
                for cb in self.callbacks:
                    cb.on_epoch_end(self, self.train.epoch - 1)
                self.save_checkpoint()
            if self.session.stop_agreed and not self._done():
                return self._stopped()
        return self._finish(time.perf_counter() - started)

    def _eval_due(self) -> bool:
        """At an epoch's end (or training's) whose eval has not finished: also right after a resume there."""
        return self.train.step > 0 and (self.train.epoch_done or self._done()) and self._eval_step != self.train.step

    def _done(self) -> bool:
        return self.early_stop_reason is not None or self.train.epoch >= self.cfg.train.epochs or self.train.step >= self.total_steps

    def finish_early(self, reason: str) -> None:
        """End training after the current epoch's checkpoint (call it on every rank, as callbacks do)."""
        if self.early_stop_reason is None:
            self.early_stop_reason = reason
            log.info(f"early stop at step {self.train.step}: {reason}")

    def _train_epoch(self) -> None:
        if self._interval_steps == 0:
            self.times = IntervalTimes()  # the first interval of an epoch does not count the eval before it
            self.train.wait_s = 0.0
        self.model.train()
        self._before_workers_start()
        first = self.cfg.debug and self.train.step == 0
        for mb in self.train:
            if first:
                log.info("first batch:\n" + describe(mb.batch))
                first = False
            self._micro_step(mb)
            if mb.last:
                self._optimizer_step()
                if self.train.step >= self.total_steps or self.session.stop_agreed:
                    break
        if self._interval_steps:
            self._log_train()  # the tail interval (epoch end or max_steps), so every sample is logged once

    def _micro_step(self, mb: MicroBatch) -> None:
        s = self.session
        with s.no_backward_sync(self.model, enabled=not mb.last):
            with s.autocast():
                # This rank's count: the model divides by it at once, the global sum is still being all-reduced.
                out = self.step_logic(self.model, mb.batch, mb.local_step_items if self.items is not None else None)
            # The loss weighted so that the accumulated, DDP-averaged gradient is that of the whole
            # step's mean over its samples (or tokens), the short last step included.
            loss = out.loss * (mb.normalized_weight if out.normalized else mb.weight)
            started = time.perf_counter() if mb.last else 0.0
            s.backward(loss)
            if mb.last:  # DDP's all-reduce runs in this backward: a fast rank waits here for the slowest
                self.times.sync += time.perf_counter() - started
        metrics = out.metrics
        if out.normalized:  # the loss was divided by the step's count: this micro-batch's own mean
            metrics = {**metrics, "loss": out.loss.detach() * mb.local_step_items / torch.clamp(torch.as_tensor(mb.items), min=1)}
        self.metrics.add(metrics, weight=mb.items)
        self.metrics.add_total("samples", mb.size)
        if self.items is not None:
            self.metrics.add_total("items", mb.items)

    def _optimizer_step(self) -> None:
        optimizer = self.optimizer
        assert optimizer is not None  # prepare() set it
        self._lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the schedule moves on after it)
        self.session.step(optimizer, self.scheduler)
        self._interval_steps += 1
        self.progress.step()
        step = self.train.step
        if step % self.cfg.train.log_every == 0:
            self._log_train()
        if self.cfg.ckpt.every and step % self.cfg.ckpt.every == 0:
            self.save_checkpoint()

    def _log_train(self) -> None:
        """All-reduce the interval's sums (the only extra collective), write one line, reset."""
        s, loader, world = self.session, self.train, self.session.world_size
        self.times.data_wait, loader.wait_s = loader.wait_s, 0.0
        ballot = self.stop.ballot()
        r = self.metrics.compute(
            IntervalSums.local(ballot=ballot, times=self.times, rank=s.rank, world_size=world, device=s.device, steps=self._interval_steps)
        )
        self.metrics.reset()
        sums = IntervalSums.unpack(r.pop("extra"), ballot_len=len(ballot), world_size=world)
        votes = self.stop.count(sums.stop_ballot)
        s.stopping(votes, f"at step {loader.step}")  # said once, when the ranks first agree
        s.check_steps()  # the guard's read rides on this interval's sync
        skipped = s.guard.take_unlogged()
        samples = r.pop("samples", 0)
        items = r.pop("items", None)
        record: dict[str, Any] = {
            "epoch": loader.current_epoch,
            **shown(r, per_token=self.items is not None),
            "lr": self._lr,
            "samples": loader.samples_seen,
            **interval_rates(
                sums,
                samples=samples,
                items=items,
                steps=self._interval_steps,
                tokens_per_sample=self.tokens_per_sample,
                flops_per_sample=self.flops_per_sample,
                peak_flops=self.cfg.train.peak_flops,
                stragglers=self.stragglers,
                warn=s.is_rank_zero,
            ),
        }
        if skipped:
            record["skipped_steps"] = skipped
        samples_per_s = record["samples_per_s"]
        s.log(record, step=loader.step, echo=False)  # fit prints its own line (or the progress bar)
        if self.progress.active:
            self.progress.show(epoch=record["epoch"], loss=f"{record.get('loss', float('nan')):.4f}", samples_s=f"{samples_per_s:.0f}")
        else:
            log.info(
                f"train step {loader.step}/{self.total_steps} | epoch {record['epoch']} | {one_line(shown(r, per_token=self.items is not None))} | lr {record['lr']:.3g} | "
                f"{samples_per_s:.0f} samples/s | data wait {record['data_wait_frac']:.0%}"
            )
        for cb in self.callbacks:
            cb.on_log(self, {"kind": "train", "step": loader.step, **record})
        self.times, self._interval_steps = IntervalTimes(), 0

    def evaluate(self) -> dict[str, Any]:
        """Exact global metrics over every eval sample once (no sampler padding); logs an eval line."""
        return self._evaluate(yield_to_stop=False) or {}

    def _evaluate(self, *, yield_to_stop: bool) -> dict[str, Any] | None:
        """The eval (`evaluation.py`); with `yield_to_stop`, None if it gave way to a stop: the stop checkpoint is
        taken at the step the eval was for, and the resumed run evaluates again."""
        if self.eval_loader is None:
            self._eval_step = self.train.step
            return {}
        self._before_workers_start()
        agreed_before = self.session.stop_agreed
        r = evaluate_batches(self.session, unwrap_model(self.model), self.eval_loader, self.step_logic, self.items, yield_to_stop=yield_to_stop)
        if r is None:
            if not agreed_before:
                log.info(f"{self.stop.reason} received during the eval at step {self.train.step}: stopping with a checkpoint, the resumed run evaluates again")
            return None
        result = {**shown(r, per_token=self.items is not None), "count": r.get("samples", 0)}
        self.last_eval, self._eval_step = result, self.train.step
        self.session.log({"epoch": self.train.current_epoch, **result}, step=self.train.step, kind="eval", echo=False)
        log.info(f"eval  step {self.train.step} | epoch {self.train.current_epoch} | {one_line(result)} | count {result['count']}")
        for cb in self.callbacks:
            cb.on_eval(self, result)
        return result

    def _before_workers_start(self) -> None:
        """DataLoader workers are forked: not while the checkpoint thread may hold a lock the children would inherit."""
        if self.cfg.data.num_workers > 0:
            self.session.wait_for_save()

    def _stopped(self) -> dict[str, Any]:
        """Checkpoint where every rank agreed to stop; the caller exits with EXIT_STOPPED."""
        self.save_checkpoint()
        step = self.train.step
        self.session.finish_stop(step, f"/{self.total_steps} (epoch {self.train.epoch})")
        return {"stopped": True, "optimizer_steps": step, "samples_seen": self.train.samples_seen}

    def _finish(self, wall_s: float) -> dict[str, Any]:
        s, module = self.session, unwrap_model(self.model)
        # The last step is checkpointed (a no-op when an epoch end or ckpt.every already did it), so a
        # run ended by train.max_steps mid-epoch is continued, not restarted, by the same command.
        self.save_checkpoint()
        summary = {
            "stopped": False,
            "early_stopped": self.early_stop_reason is not None,
            "world_size": s.world_size,
            "launcher": s.rt.env.launcher,
            "device": str(s.device),
            "optimizer_steps": self.train.step,
            "epochs_completed": self.train.epoch,
            "samples_seen": self.train.samples_seen,
            "batch_splits": self.train.splits,  # the global batch's split at each world size the run used
            "eval": self.last_eval,
            "params_sha256": params_sha256(module),
            "skipped_steps": s.guard.skipped,
            "wall_time_s": wall_s,
        }
        if self.early_stop_reason is not None:
            summary["early_stop_reason"] = self.early_stop_reason
        s.save_model(module)
        s.write_json(SUMMARY_FILE, summary)
        for cb in self.callbacks:
            cb.on_fit_end(self, summary)
        return summary
