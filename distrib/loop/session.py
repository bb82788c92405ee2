"""`Session`: the building blocks of a training loop, the same at one process and many.

    with distrib.Session(cfg) as session:                       # env, process group, device, signals
        model, optimizer = session.setup(model, optimizer)      # device, DDP, compile, SyncBatchNorm
        train = session.train_loader(train_set)                 # DistributedSampler, set_epoch, resume
        session.load({"model": model, "optimizer": optimizer, "train": train})
        while train.epoch < cfg.train.epochs:
            for mb in train:                                    # micro-batches with exact weights
                with session.no_backward_sync(model, enabled=not mb.last):
                    loss = F.cross_entropy(model(mb.batch[0]), mb.batch[1])
                    session.backward(loss * mb.weight)
                if mb.last:
                    session.step(optimizer)

`fit` is a loop written on these very blocks (`distrib.Trainer`, in `trainer.py`). Nothing is written and no
tracker starts until the first `log`, `save` or `write_json`; `load` must come before those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from distrib.checkpoint.checkpointer import Checkpointer, hparams_of, step_of
from distrib.checkpoint.rundir import RunLock, check_run_dir
from distrib.checkpoint.weights import Loaded, load_weights
from distrib.config import Config
from distrib.data.accumulate import ItemCounter
from distrib.data.build import build_eval_loader, build_train_loader
from distrib.data.loaders import EvalLoader, TrainLoader
from distrib.data.sampling import mix_seed, seed_all
from distrib.errors import ConfigError, FaultError, NonFiniteError
from distrib.loop.debug import apply_debug, debug_checks
from distrib.loop.guard import NonfiniteGuard
from distrib.loop.profiling import ProfileHooks
from distrib.loop.stopping import StopAgreement
from distrib.observe.hang import Watchdog
from distrib.observe.metrics import console_line
from distrib.observe.run_files import RunFiles, RunWriter
from distrib.parallel import fsdp
from distrib.parallel.buckets import continue_reductions
from distrib.parallel.precision import Precision
from distrib.parallel.wrap import release_reducers, set_grad_sync, unwrap_model, wrap_model
from distrib.runtime.collectives import all_reduce
from distrib.runtime.console import log, setup_console
from distrib.runtime.group import Runtime, RuntimeView, distributed, side_store
from distrib.runtime.ledger import BACKWARD, COMPUTING, LEDGER
from distrib.runtime.stop import EXIT_STOPPED, STOPPED_FILE, SignalRoute, StopRequest


class Session(RuntimeView):
    """The run's environment and the verbs a loop needs; a context manager torn down on success and error."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = apply_debug(cfg)
        self.stop = StopRequest()  # set by SIGTERM/SIGUSR1/SIGHUP/Ctrl-C (or by you); `should_stop()` agrees on it across ranks
        self.resumed_from: Path | None = None  # the checkpoint `load` restored, if any
        self._stack: contextlib.ExitStack | None = None
        self._error: BaseException | None = None
        self._models: list[nn.Module] = []
        self._params: dict[int, list[torch.Tensor]] = {}
        self._hparams: dict[str, Any] | None = None  # the optimizers' hyperparameters as this run's config set them
        self._lock = RunLock(self.cfg.run.dir)  # rank 0's, from the first touch of run.dir to the end
        self._files = RunFiles(self.cfg, self._lock)
        self._train_loader: TrainLoader | None = None  # the latest: `log` takes its step
        self._stopping = StopAgreement(self.stop)
        self._steps_done = 0  # optimizer steps taken, counted on from a resumed loader's step: what the guard names

    # ------------------------------------------------------------------ lifecycle

    last_exit_status: int | None = None
    """75 (`EXIT_STOPPED`) once this process's latest session ended in a graceful stop (stopped.json written), else None."""

    def __enter__(self) -> Session:
        Session.last_exit_status = None
        cfg, stack = self.cfg, contextlib.ExitStack()
        check_run_dir(cfg.run.dir)  # a file or a read-only path fails now, before anything is started or written
        signals = stack.enter_context(SignalRoute(self.stop))  # before the process group: it outlives the group's teardown
        self.watchdog = Watchdog(cfg.train.hang_timeout_s)
        stack.callback(self.watchdog.close)  # after the group's teardown: a hang in its last barrier is judged too
        self.rt: Runtime = stack.enter_context(distributed(device=cfg.run.device, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s, single=cfg.debug))
        self._stack = stack
        try:
            setup_console(self.rt.rank, self.rt.world_size)
            self._stopping.bind(self.rt.world_size, self.rt.device)
            if cfg.debug:
                stack.enter_context(debug_checks(self.rt.device))
                log.info(f"debug mode: 1 process on {self.rt.device}, no process group, num_workers=0, max_steps={cfg.train.max_steps}")
            self.sharded = fsdp.sharded_layout(cfg.dist, self.rt.world_size)
            """Whether models from `setup` are FSDP2-sharded (dist.strategy=fsdp with more than one process)."""
            self.precision = Precision(cfg.train.precision, self.rt.device, sharded=self.sharded)
            self.guard = NonfiniteGuard(cfg.train.nonfinite, cfg.train.max_skipped_steps, self.rt.device, scaler=self.precision.scaler.is_enabled())
            """The non-finite guard (`train.nonfinite`): `step` goes through it; `check_steps` reads it."""
            self.checkpointer = Checkpointer(cfg, rank=self.rank, world_size=self.world_size, sharded=self.sharded)
            """Saves and restores checkpoints (`save`/`load` delegate to it)."""
            self.watchdog.start(
                rank=self.rank, world_size=self.world_size, store=side_store(), hang_dir=self._files.hang_dir, last_good=self.checkpointer.last_good
            )
            self.profiling = ProfileHooks(cfg, rank=self.rank, device=self.device, steps_done=lambda: self._steps_done)
            stack.callback(lambda: self.profiling.close(self._error))  # the trace of a run that ends inside the window, an OOM's snapshot
            signals.install()
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is None:
            raise RuntimeError("Session.__exit__ without __enter__")
        found: NonFiniteError | None = None
        self._error = exc[1]
        if exc[0] is None:
            try:
                self.check_steps()  # a loop that never saved or polled since its last step still hears of a bad one
            except NonFiniteError as error:
                found, exc = error, (NonFiniteError, error, error.__traceback__)
        stack.callback(self.close, failed=exc[0] is not None)  # runs first (last in, first out), in the process group
        if exc[0] is None and self._stopping.agreed and self.stopped_at is None:
            stack.callback(self._end_stop)  # an own loop's stop: reported and marked as fit's is
        try:
            suppressed = stack.__exit__(*exc)
        except FaultError as error:  # raised here by the save in flight, or passing through
            self.checkpointer.name_last_good(error)
            raise
        finally:
            if isinstance(exc[1], FaultError):
                self.checkpointer.name_last_good(exc[1])
        if found is not None:
            raise found
        return suppressed

    def defer(self, fn: Callable[[], Any]) -> None:
        """Call `fn` when the session ends (success or error), before the process group goes."""
        if self._stack is None:
            raise RuntimeError("Session.defer() outside the `with` block")
        self._stack.callback(fn)

    def close(self, failed: bool = False) -> None:
        """Close rank 0's files and tracker, and release the DDP wrappers before the process group goes
        (`release_reducers`): after the session, use `distrib.unwrap_model(model)`."""
        try:
            # A stop or the end of training waits for the save in flight; after an error, not for long
            # (its peers may be gone): an unfinished save is only a .tmp directory, ignored on resume.
            self.checkpointer.wait(timeout=30.0 if failed else None)
        finally:
            try:
                self._files.close()
            finally:
                self._lock.release()
        release_reducers(self._models)
        self._models.clear()

    # ------------------------------------------------------------------ where we run (device, rank, world_size: `RuntimeView`)

    def seed_everything(self, seed: int | None = None) -> None:
        """Seed python, numpy and torch from (`seed` or cfg.seed, rank): dropout differs per rank, reproducibly."""
        seed_all(mix_seed(self.cfg.seed if seed is None else seed, self.rank))

    # ------------------------------------------------------------------ model and data

    @LEDGER.busy_with("setting up the model")  # a large model's allocation, init and sharding is progress, not a hang
    def setup(self, model: nn.Module, *optimizers: torch.optim.Optimizer, init_fn: Callable[[nn.Module], Any] | None = None) -> Any:
        """Move `model` to the device and wrap it (DDP or FSDP with several processes; train.activation_checkpointing,
        torch.compile). A model built under `with torch.device("meta"):` is allocated here (FSDP: each rank only its shards)
        and initialised by `init_fn(module)`, a Hugging Face model's `_init_weights`, or each module's `reset_parameters`,
        the same at any world size (`distrib/parallel/materialize.py`). Returns the wrapped model, or `(model, *optimizers)`:
        optimizers built on `model.parameters()` before the call stay valid (pointed at FSDP's shards, or the allocated ones).
        """
        cfg, dtype = self.cfg, self.precision.param_dtype
        wrapped = wrap_model(
            model,
            self.rt,
            cfg.dist,
            compile=cfg.train.compile,
            param_dtype=dtype,
            seed=cfg.seed,
            init_fn=init_fn,
            activation_checkpointing=cfg.train.activation_checkpointing,
            optimizers=optimizers,
        )
        self._models.append(wrapped)
        self._files.record_hf_config(unwrap_model(wrapped))  # for `distrib export --format hf`
        if self.resumed_from is not None:  # load() came first
            continue_reductions(self._models)  # a resumed DDP model adds its ranks' gradients in the uninterrupted run's order
        return (wrapped, *optimizers) if optimizers else wrapped

    def train_loader(
        self,
        dataset: Dataset,
        *,
        batch_size: int | None = None,
        grad_accum: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        items: ItemCounter | None = None,
    ) -> TrainLoader:
        """The distributed training loader (train.batch_size and train.grad_accum unless given).

        `items` counts what the loss averages over in a batch (e.g. `distrib.label_tokens(shift=True)`);
        without it, the samples. Micro-batches are then weighted by the step's global count.
        An `IterableDataset` is read as a stream, each rank's workers keeping their share (`distrib.data.stream`):
        its epoch is its `len()`, or train.max_steps of it; it is read in its own order (shuffle it yourself).
        """
        self._train_loader = self.guard.loader = build_train_loader(
            self.cfg, self.rt, dataset, batch_size=batch_size, grad_accum=grad_accum, collate_fn=collate_fn, items=items
        )
        return self._train_loader

    def eval_loader(self, dataset: Dataset, *, batch_size: int | None = None, collate_fn: Callable[[list[Any]], Any] | None = None) -> EvalLoader:
        """Evaluation batches on the device; over all ranks, every sample exactly once (no padding).

        Under FSDP, run `loader.filler_batches` more forward passes after the loop (results unused):
        ranks may hold one batch fewer, and every rank must join each forward's parameter gather.
        """
        return build_eval_loader(self.cfg, self.rt, dataset, even=self.sharded, batch_size=batch_size, collate_fn=collate_fn)

    # ------------------------------------------------------------------ the step

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """train.precision's autocast (a no-op in fp32)."""
        return self.precision.autocast()

    @contextlib.contextmanager
    def no_backward_sync(self, model: nn.Module, enabled: bool = True) -> Iterator[None]:
        """Skip DDP's gradient all-reduce in the backward passes inside (accumulating micro-batches).

        Wrap forward *and* backward: DDP decides at forward time. A no-op in one process.
        """
        set_grad_sync(model, not enabled)
        try:
            yield
        finally:
            set_grad_sync(model, True)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, scaled for fp16 (and its finiteness noted for the guard, on the device)."""
        self.guard.note_loss(loss, self._steps_done + 1)
        LEDGER.at(BACKWARD)  # where DDP all-reduces the gradients (FSDP reduce-scatters them)
        self.precision.backward(loss)
        LEDGER.at(COMPUTING)

    def step(self, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
        """Unscale and clip (train.clip_grad_norm, the global norm), step, zero the gradients, step the schedule."""
        params = self._params.get(id(optimizer))
        if params is None:
            params = self._params[id(optimizer)] = [p for group in optimizer.param_groups for p in group["params"]]
        self._steps_done += 1
        step = self._steps_done
        LEDGER.stepping(step)
        guard, clip = self.guard, self.cfg.train.clip_grad_norm
        self.precision.step(optimizer, params, clip, apply=lambda o, norm: guard.step(o, norm, step), dropped=lambda f: guard.scaler_step(f, step))
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        self.profiling.stepped(step)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or `mean`) `tensor` over ranks in place; unchanged in one process."""
        return all_reduce(tensor, op)

    def check_steps(self) -> list[int]:
        """Read the non-finite guard: the steps dropped since the last call, or NonFiniteError (exit 1). A host sync:
        `save`, `should_stop` and fit's log interval call it, where one happens anyway."""
        return self.guard.check(last_good=self.checkpointer.last_good)

    def should_stop(self) -> bool:
        """Whether any rank got a stop signal (a collective: call it on every rank at the same point). Once it says
        yes, `save` your state and leave the loop: the session writes stopped.json, says where to resume, and `main` exits 75."""
        self.check_steps()
        return self._stopping.poll()

    def stopping(self, votes: int, where: str = "") -> None:
        """Note that `votes` ranks asked to stop (said once, on rank 0); `fit` calls it at its log interval."""
        self._stopping.agree(votes, where)

    def finish_stop(self, step: int, detail: str = "") -> None:
        """After a stop's checkpoint at `step`: wait for it, write stopped.json (the Slurm epilogue's cue), say how to resume."""
        self.wait_for_save()  # stopped.json promises a committed checkpoint at this step
        self.write_json(STOPPED_FILE, self._stopping.record(step))
        self._stopping.finished(step, detail, self.ckpt_root)
        Session.last_exit_status = EXIT_STOPPED  # what distrib.main exits with: the stop is the run's outcome

    @property
    def stop_agreed(self) -> bool:
        """Whether the ranks have agreed to stop (`should_stop()` or fit's log interval found a request)."""
        return self._stopping.agreed

    @property
    def stopped_at(self) -> int | None:
        """The step a graceful stop checkpointed at (stopped.json written), else None."""
        return self._stopping.stopped_at

    def _end_stop(self) -> None:
        step = self._stopping.saved_after_agreement()
        if step is not None:
            self.finish_stop(step)

    # ------------------------------------------------------------------ files (rank 0) and tracker

    def open_run_files(self) -> RunWriter:
        """Open rank 0's run directory (a null writer on other ranks): take its lock, write config.json,
        and get the tracker ready to start with the first metrics line. Idempotent.

        `log`, `save`, `write_json` and `save_model` call it; call it yourself to create the run's
        files before the first of those (`fit` does, once its checks have passed).
        """
        return self._files.open(self.rank, fresh=self.resumed_from is None)

    def log(self, record: Mapping[str, Any], *, step: int | None = None, kind: str = "train", echo: bool = True) -> None:
        """One line of metrics.jsonl (and the tracker) and, with `echo`, of the console, rank 0 only.

        `step` defaults to the step of the session's latest `train_loader`. Every rank may call it
        (the others do nothing), so no `if rank == 0` is needed around it.
        """
        if step is None:
            if self._train_loader is None:
                raise ConfigError("Session.log(record) without step= and no train_loader to take it from. HINT: pass step=N.")
            step = self._train_loader.step
        self.open_run_files().metrics(self.profiling.mark(kind, step, {"kind": kind, "step": step, **record}))
        if echo:
            log.info(console_line(kind, step, record))

    def write_json(self, name: str, obj: Any) -> None:
        """`run.dir/name`, written atomically by rank 0."""
        self.open_run_files().json(name, obj)

    @LEDGER.busy_with("saving the model")  # a gather and a write that may outlast train.hang_timeout_s
    def save_model(self, model: nn.Module) -> None:
        """`run.dir/model.pt`: the plain module's whole state_dict, its own keys, written by rank 0.

        Every rank must call it: an FSDP model's shards are gathered to rank 0 first.
        """
        module = unwrap_model(model)
        self.open_run_files().save_model(fsdp.full_state_dict(module) if fsdp.is_sharded(module) else module.state_dict())

    # ------------------------------------------------------------------ checkpoints

    @property
    def ckpt_root(self) -> Path:
        return self.checkpointer.root

    def save(self, state: Mapping[str, Any], *, step: int | None = None) -> Path:
        """Checkpoint `state` (models, optimizers, schedulers, loaders, anything with a state_dict, plain data).

        Atomic and verified: staging directory, each rank's file, a manifest written last, rename;
        keeps the newest ckpt.keep. Every rank must call it. `step` defaults to a TrainLoader's step.
        With ckpt.async (the default) it returns once the state is copied to host memory; the
        write and commit finish in the background (`wait_for_save`; the session's end waits too).
        What goes where: `distrib/checkpoint/protocols.py`.
        """
        self.check_steps()  # no checkpoint may hold a non-finite step
        step = step_of(state) if step is None else step
        self._stopping.saved(step)
        writer = self.open_run_files()
        job = {
            "logger_run_id": self._files.run_id,
            "scaler": self.precision.scaler.state_dict(),
            "metrics_lines": writer.lines,
            "hparams": self._hparams if self._hparams is not None else hparams_of(state),
        }
        return self.checkpointer.save(state, step=step, models=[unwrap_model(m) for m in self._models], job=job)

    @LEDGER.busy_with("loading pretrained weights")
    def load_weights(self, model: nn.Module, path: str | Path, *, strict: bool = True) -> Loaded:
        """Pretrained weights (a Hugging Face directory, .safetensors, model.pt or run directory) into the model
        `setup` returned; under FSDP each rank reads only its shards. Every rank calls it (`distrib/checkpoint/weights.py`)."""
        return load_weights(model, path, strict=strict)

    def wait_for_save(self) -> None:
        """Block until the checkpoint in flight is committed (raises its error, if it failed)."""
        self.checkpointer.wait()

    def load(self, state: dict[str, Any]) -> Path | None:
        """Restore `state` in place from the checkpoint ckpt.resume picks (`auto`: the newest good one).

        Objects with `load_state_dict` are loaded; plain values are replaced in `state`. Returns the
        checkpoint, or None for a fresh start. Call it before the first `log` or `save`.
        """
        if self._files.opened:
            raise ConfigError("Session.load() after the run's files were opened (a log or save came first). HINT: call load() before training.")
        path = self.checkpointer.choose(self._lock)
        self._hparams = hparams_of(state)
        if path is None:
            self.checkpointer.init_from(self._models)  # ckpt.init_from: pretrained weights for a fresh start
            return None
        restored = self.checkpointer.restore(path, state, models=[unwrap_model(m) for m in self._models], started=self._hparams)
        self.precision.scaler.load_state_dict(restored.scaler)
        self._files.run_id = restored.logger_run_id
        self.resumed_from = path
        continue_reductions(self._models)  # a resumed DDP model adds its ranks' gradients in the uninterrupted run's order
        self._files.rewind = (restored.metrics_lines, restored.step)
        self._steps_done = restored.step
        return path
