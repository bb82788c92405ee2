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

`fit` is a loop written on these very blocks (`distrib.loop.Trainer`). Nothing is written and no
tracker starts until the first `log`, `save` or `write_json`; `load` must come before those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import random
import secrets
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from distrib import checkpoint, fsdp, tracking
from distrib.buckets import replay_rebuilt_buckets
from distrib.config import Config, RunConfig
from distrib.data import EvalLoader, ItemCounter, LoaderOptions, TrainLoader, mix_seed
from distrib.dist import Runtime, all_reduce_sum, broadcast_object, distributed
from distrib.errors import ConfigError, StorageError
from distrib.logs import STOPPED_FILE, RunWriter, log, setup_console, writer_for
from distrib.model import ddp_of, set_grad_sync, unwrap_model, wrap_model
from distrib.precision import Precision
from distrib.resume import apply_hparams, config_diff, describe_diff, hparams, incompatibilities
from distrib.rundir import RunLock, check_run_dir, set_aside
from distrib.saving import Saver, snapshot
from distrib.stop import EXIT_STOPPED, SignalRoute, StopRequest


DEBUG_SUFFIX = "-debug"


def prepare(cfg: Config) -> Config:
    """Apply --debug: a small step limit, in-process data loading (so breakpoint() works), and a run
    directory of its own, so a debug run never rewrites a real run's summary, config or checkpoints."""
    if not cfg.debug:
        return cfg
    run_dir = cfg.run.dir
    if run_dir == RunConfig().dir:
        run_dir += DEBUG_SUFFIX  # runs/distrib-debug
    recorded = _recorded_config(Path(run_dir))
    if recorded is not None and not recorded.get("debug", False):
        raise ConfigError(
            f"--debug with run.dir={run_dir!r}, which holds a run that was not a debug run: a 10-step debug run would "
            f"rewrite its summary, config and checkpoints. HINT: pass --run.dir {run_dir.rstrip('/')}{DEBUG_SUFFIX} "
            "(or any new directory), or drop --debug to continue that run."
        )
    limit = min(cfg.train.max_steps or cfg.train.debug_steps, cfg.train.debug_steps)
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, dir=run_dir),
        data=dataclasses.replace(cfg.data, num_workers=0, persistent_workers=False, prefetch_factor=None),
        train=dataclasses.replace(cfg.train, max_steps=limit),
    )


def _recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The config.json a run left in `run_dir` (None: no run there, or not readable as one)."""
    try:
        recorded = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


@contextlib.contextmanager
def _debug_checks(device: torch.device) -> Iterator[None]:
    """Anomaly detection and deterministic kernels (slow, but a NaN or a race names its source).

    Both are process-global switches, so they are restored afterwards.
    """
    if device.type == "cuda":
        # cuBLAS needs this before its first call to be deterministic; debug mode is single-process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    anomaly, deterministic = torch.is_anomaly_enabled(), torch.are_deterministic_algorithms_enabled()
    torch.autograd.set_detect_anomaly(True)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.autograd.set_detect_anomaly(anomaly)
        torch.use_deterministic_algorithms(deterministic)


class Session:
    """The run's environment and the verbs a loop needs; a context manager torn down on success and error."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = prepare(cfg)
        self.stop = StopRequest()
        """Set by SIGTERM/SIGUSR1/SIGHUP/Ctrl-C (or by you); `should_stop()` agrees on it across ranks."""
        self.resumed_from: Path | None = None
        """The checkpoint `load` restored, if any."""
        self._stack: contextlib.ExitStack | None = None
        self._writer: RunWriter | None = None
        self._models: list[nn.Module] = []
        self._params: dict[int, list[torch.Tensor]] = {}
        self._run_id: str | None = None
        self._rewind: tuple[int | None, int] | None = None
        self._saver = Saver()
        self._ckpt_group: Any = None
        self._hparams: dict[str, Any] | None = None  # the optimizers' hyperparameters as this run's config set them
        self._lock = RunLock(self.cfg.run.dir)  # rank 0's, from the first touch of run.dir to the end
        self._train_loader: TrainLoader | None = None  # the latest: `log` takes its step
        self._stop_agreed = False  # should_stop() (or fit's log interval) found a stop request on some rank
        self._saved: tuple[int, bool] | None = None  # the last save's step, and whether it came after the agreement
        self.stopped_at: int | None = None
        """The step a graceful stop checkpointed at (stopped.json written), else None."""

    # ------------------------------------------------------------------ lifecycle

    last_exit_status: int | None = None
    """75 (`EXIT_STOPPED`) when the latest session in this process ended in a graceful stop, else 0:
    `distrib.main` exits with it when the script's `train` returns nothing."""

    def __enter__(self) -> "Session":
        Session.last_exit_status = None
        cfg, stack = self.cfg, contextlib.ExitStack()
        if cfg.dist.strategy == "fsdp" and cfg.train.precision == "fp16":
            raise ConfigError("train.precision=fp16 with dist.strategy=fsdp: fp16 needs loss scaling of sharded gradients, "
                              "which distrib does not do. HINT: pass --train.precision bf16 (no scaling needed) or fp32.")
        if cfg.dist.static_graph and cfg.dist.strategy == "ddp" and cfg.train.grad_accum > 1:
            # DDP's static graph records its first backward, which must reduce: torch asserts inside the
            # reducer (expect_autograd_hooks_) when that backward is an accumulating one.
            raise ConfigError(f"dist.static_graph=true with train.grad_accum={cfg.train.grad_accum}: DDP's static graph cannot skip "
                              "the all-reduce of an accumulating micro-batch in its first step. HINT: drop --dist.static_graph "
                              "(the default DDP works with accumulation), or pass --train.grad_accum 1.")
        check_run_dir(cfg.run.dir)  # a file or a read-only path fails now, before anything is started or written
        signals = stack.enter_context(SignalRoute(self.stop))  # before the process group: it outlives the group's teardown
        self.rt: Runtime = stack.enter_context(
            distributed(device=cfg.run.device, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s, single=cfg.debug)
        )
        self._stack = stack
        try:
            setup_console(self.rt.rank, self.rt.world_size)
            if cfg.debug:
                stack.enter_context(_debug_checks(self.rt.device))
                log.info(f"debug mode: 1 process on {self.rt.device}, no process group, num_workers=0, max_steps={cfg.train.max_steps}")
            self.sharded = cfg.dist.strategy == "fsdp" and self.rt.env.distributed
            """Whether models from `setup` are FSDP2-sharded (dist.strategy=fsdp with more than one process)."""
            self.precision = Precision(cfg.train.precision, self.rt.device, sharded=self.sharded)
            if cfg.ckpt.async_ and self.world_size > 1:
                # The background save's barriers get a group of their own, made now: making it needs the
                # rendezvous store, which may be gone by the time a stop signal asks for the first save
                # (torchrun's agent closes its store as it handles the signal).
                self._ckpt_group = torch.distributed.new_group(backend="gloo")
            signals.install()
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is None:
            raise RuntimeError("Session.__exit__ without __enter__")
        stack.callback(self.close, failed=exc[0] is not None)  # runs first (last in, first out), in the process group
        if exc[0] is None and self._stop_agreed and self.stopped_at is None:
            stack.callback(self._end_stop)  # an own loop's stop: reported and marked as fit's is
        try:
            return stack.__exit__(*exc)
        except StorageError as error:  # raised here by the save in flight, or passing through
            self._name_last_good(error)
            raise
        finally:
            if isinstance(exc[1], StorageError):
                self._name_last_good(exc[1])

    def _name_last_good(self, error: StorageError) -> None:
        """A failed write's message ends with the checkpoint a rerun resumes from (none: it starts afresh)."""
        if error.last_good is None:
            try:
                found = checkpoint.newest_good(self.ckpt_root)
            except OSError:  # the failure may have taken the checkpoints with it (unreadable): say nothing rather than mask it
                return
            error.last_good = str(found[0]) if found else ""

    def defer(self, fn: Callable[[], Any]) -> None:
        """Call `fn` when the session ends (success or error), before the process group goes."""
        if self._stack is None:
            raise RuntimeError("Session.defer() outside the `with` block")
        self._stack.callback(fn)

    def close(self, failed: bool = False) -> None:
        """Close rank 0's files and tracker, and release the DDP wrappers before the process group goes.

        A DDP reducer that outlives the process group becomes the group's last owner, and its
        destructor joins gloo's threads while holding the GIL, which can deadlock. So a model from
        `setup` is a DDP wrapper only inside the session; afterwards use `distrib.unwrap_model(model)`.
        """
        try:
            # A stop or the end of training waits for the save in flight; after an error, not for long
            # (its peers may be gone): an unfinished save is only a .tmp directory, ignored on resume.
            self._saver.wait(timeout=30.0 if failed else None)
        finally:
            try:
                if self._writer is not None:
                    self._writer.close()
            finally:
                self._lock.release()
        for model in self._models:
            ddp = model if hasattr(model, "reducer") else getattr(model, "_orig_mod", None)
            if ddp is not None and hasattr(ddp, "reducer"):
                del ddp.reducer
        self._models.clear()

    # ------------------------------------------------------------------ where we run

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def rank(self) -> int:
        """This process's rank, 0 to world_size - 1 (0 in one process)."""
        return self.rt.rank

    @property
    def local_rank(self) -> int:
        """This process's rank on its node (its GPU index)."""
        return self.rt.env.local_rank

    @property
    def world_size(self) -> int:
        """How many processes train together (1 in one process)."""
        return self.rt.world_size

    @property
    def is_rank_zero(self) -> bool:
        """Whether this is rank 0, the one that writes files and talks to the tracker."""
        return self.rt.is_rank_zero

    is_main_process = is_rank_zero  # Accelerate's name for it

    def seed_everything(self, seed: int | None = None) -> None:
        """Seed python, numpy and torch from (`seed` or cfg.seed, rank): dropout differs per rank, reproducibly."""
        s = mix_seed(self.cfg.seed if seed is None else seed, self.rank)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)  # also seeds every CUDA device

    # ------------------------------------------------------------------ model and data

    def setup(self, model: nn.Module, *optimizers: torch.optim.Optimizer) -> Any:
        """Move `model` to the device and wrap it (DDP or FSDP with several processes, torch.compile if asked).

        Returns the wrapped model, or `(model, *optimizers)`: optimizers built on `model.parameters()`
        before the call stay valid (DDP moves parameters in place; FSDP replaces them with sharded
        ones, and the optimizers given here are pointed at those).
        """
        names = {id(p): n for n, p in model.named_parameters()}
        wrapped = wrap_model(model, self.rt, self.cfg.dist, compile=self.cfg.train.compile, param_dtype=self.precision.param_dtype)
        if self.sharded:
            fsdp.rebind(optimizers, names, dict(unwrap_model(wrapped).named_parameters()))
        self._models.append(wrapped)
        if self.resumed_from is not None:  # load() came first
            self._continue_reductions()
        return (wrapped, *optimizers) if optimizers else wrapped

    def _continue_reductions(self) -> None:
        """A resumed DDP model adds its ranks' gradients in the order the run it continues did (`distrib.buckets`)."""
        for model in self._models:
            ddp = ddp_of(model)
            if ddp is not None:
                replay_rebuilt_buckets(ddp)

    def _loader_options(self, batch_size: int, collate_fn: Callable[[list[Any]], Any] | None) -> LoaderOptions:
        dc = self.cfg.data
        return LoaderOptions(
            batch_size=batch_size,
            num_workers=dc.num_workers,
            persistent_workers=dc.persistent_workers,
            prefetch_factor=dc.prefetch_factor,
            pin_memory=self.device.type == "cuda",  # pinned host memory only helps a CUDA copy
            collate_fn=collate_fn,
        )

    def train_loader(self, dataset: Dataset, *, batch_size: int | None = None, grad_accum: int | None = None,
                     collate_fn: Callable[[list[Any]], Any] | None = None, items: ItemCounter | None = None) -> TrainLoader:
        """The distributed training loader (train.batch_size and train.grad_accum unless given).

        `items` counts what the loss averages over in a batch (e.g. `distrib.label_tokens(shift=True)`);
        without it, the samples. Micro-batches are then weighted by the step's global count.
        An `IterableDataset` is read as a stream, each rank's workers keeping their share (`distrib.stream`):
        its epoch is its `len()`, or train.max_steps of it; it is read in its own order (shuffle it yourself).
        """
        tc = self.cfg.train
        self._train_loader = TrainLoader(
            dataset, world_size=self.world_size, rank=self.rank, seed=self.cfg.seed, shuffle=self.cfg.data.shuffle,
            drop_last=self.cfg.data.drop_last, opts=self._loader_options(batch_size or tc.batch_size, collate_fn),
            device=self.device, prefetch=self.cfg.data.prefetch, grad_accum=grad_accum or tc.grad_accum, items=items,
            max_steps=tc.max_steps,
        )
        return self._train_loader

    def eval_loader(self, dataset: Dataset, *, batch_size: int | None = None, collate_fn: Callable[[list[Any]], Any] | None = None) -> EvalLoader:
        """Evaluation batches on the device; over all ranks, every sample exactly once (no padding).

        Under FSDP, run `loader.filler_batches` more forward passes after the loop (results unused):
        ranks may hold one batch fewer, and every rank must join each forward's parameter gather.
        """
        tc = self.cfg.train
        opts = self._loader_options(batch_size or tc.eval_batch_size or tc.batch_size, collate_fn)
        return EvalLoader(dataset, world_size=self.world_size, rank=self.rank, opts=opts, device=self.device, prefetch=self.cfg.data.prefetch,
                          even=self.sharded)

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
        """`loss.backward()`, scaled for fp16."""
        self.precision.backward(loss)

    def step(self, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
        """Unscale and clip (train.clip_grad_norm, the global norm), step, zero the gradients, step the schedule."""
        params = self._params.get(id(optimizer))
        if params is None:
            params = self._params[id(optimizer)] = [p for group in optimizer.param_groups for p in group["params"]]
        self.precision.step(optimizer, params, self.cfg.train.clip_grad_norm)
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or `mean`) `tensor` over ranks in place; unchanged in one process."""
        if op not in ("sum", "mean"):
            raise ConfigError(f"all_reduce op={op!r}: use 'sum' or 'mean'.")
        all_reduce_sum(tensor)
        if op == "mean":
            tensor /= self.world_size
        return tensor

    def should_stop(self) -> bool:
        """Whether any rank got a stop signal (a collective: call it on every rank at the same point).

        Once it says yes, `save` your state and leave the loop: the session then writes stopped.json,
        prints where to resume as `fit` does, and `distrib.main` exits 75.
        """
        if self.world_size == 1:
            votes = int(self.stop.requested)
        else:
            votes = self.stop.count(all_reduce_sum(torch.tensor(self.stop.ballot(), device=self.device)).tolist())
        self.stopping(votes)
        return votes > 0

    def stopping(self, votes: int, where: str = "") -> None:
        """Note that `votes` ranks asked to stop (said once, on rank 0); `fit` calls it at its log interval."""
        if votes and not self._stop_agreed:
            self._stop_agreed = True
            log.info(f"{self.stop.reason} received by {votes} of {self.world_size} ranks: stopping{' ' + where if where else ''} "
                     "with a checkpoint")

    def finish_stop(self, step: int, detail: str = "") -> None:
        """After a stop's checkpoint at `step`: wait for it, write stopped.json (the Slurm epilogue's cue), say how to resume."""
        self.wait_for_save()  # stopped.json promises a committed checkpoint at this step
        self.write_json(STOPPED_FILE, {"step": step, "signal": self.stop.reason, "exit_status": EXIT_STOPPED})
        self.stopped_at = step
        log.info(f"stopped at step {step}{detail}; checkpoint saved in {self.ckpt_root}. Exit status {EXIT_STOPPED}: "
                 "run the same command again to continue.")

    def _end_stop(self) -> None:
        if self._saved is not None and self._saved[1]:
            self.finish_stop(self._saved[0])
            Session.last_exit_status = EXIT_STOPPED
        else:
            log.warning(f"{self.stop.reason}: the loop stopped without saving after the stop was agreed; a rerun resumes "
                        "from the newest checkpoint before it. HINT: call session.save(state) when should_stop() says yes.")

    # ------------------------------------------------------------------ files (rank 0) and tracker

    @property
    def writer(self) -> RunWriter:
        """Rank 0's run directory writer (a null writer elsewhere), opened at first use."""
        if self._writer is None:
            cfg = self.cfg
            if self.is_rank_zero:
                self._lock.acquire()  # already held when load() came first
            # The tracker's run id is fixed now and checkpointed, though the tracker itself starts only
            # with the first log line: a resumed run continues the same tracker run either way.
            self._run_id = self._run_id or secrets.token_hex(4)
            run_id = self._run_id
            self._writer = writer_for(self.rank, cfg.run.dir, fresh=self.resumed_from is None,
                                      start_tracker=lambda: tracking.start(cfg.wandb, run_dir=cfg.run.dir, config=cfg.to_dict(), run_id=run_id))
            if self._rewind is not None:
                self._writer.rewind(lines=self._rewind[0], step=self._rewind[1])
            self._writer.json("config.json", cfg.to_dict())
        return self._writer

    def log(self, record: Mapping[str, Any], *, step: int | None = None, kind: str = "train", echo: bool = True) -> None:
        """One line of metrics.jsonl (and the tracker) and, with `echo`, of the console, rank 0 only.

        `step` defaults to the step of the session's latest `train_loader`. Every rank may call it
        (the others do nothing), so no `if rank == 0` is needed around it.
        """
        if step is None:
            if self._train_loader is None:
                raise ConfigError("Session.log(record) without step= and no train_loader to take it from. HINT: pass step=N.")
            step = self._train_loader.step
        self.writer.metrics({"kind": kind, "step": step, **record})
        if echo:
            shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                               if isinstance(v, (int, float, str)) and not isinstance(v, bool))
            log.info(f"{kind} step {step}{' | ' + shown if shown else ''}")

    def write_json(self, name: str, obj: Any) -> None:
        """`run.dir/name`, written atomically by rank 0."""
        self.writer.json(name, obj)

    def save_model(self, model: nn.Module) -> None:
        """`run.dir/model.pt`: the plain module's whole state_dict, its own keys, written by rank 0.

        Every rank must call it: an FSDP model's shards are gathered to rank 0 first.
        """
        module = unwrap_model(model)
        self.writer.save_model(fsdp.full_state_dict(module) if fsdp.is_sharded(module) else module.state_dict())

    # ------------------------------------------------------------------ checkpoints

    @property
    def ckpt_root(self) -> Path:
        return Path(self.cfg.run.dir) / "checkpoints"

    def save(self, state: Mapping[str, Any], *, step: int | None = None) -> Path:
        """Checkpoint `state` (models, optimizers, schedulers, loaders, anything with a state_dict, plain data).

        Atomic and verified: staging directory, each rank's file, a manifest written last, rename;
        keeps the newest ckpt.keep. Every rank must call it. `step` defaults to a TrainLoader's step.
        With ckpt.async (the default) it returns once the state is copied to host memory; the
        write and commit finish in the background (`wait_for_save`; the session's end waits too).
        """
        step = _step_of(state) if step is None else step
        self._saved = (step, self._stop_agreed)
        writer = self.writer  # opens rank 0's files (and the tracker) if this is the first effect
        shared: dict[str, Any] | None = {"objects": {}, "world_size": self.world_size, "config": self.cfg.to_dict(),
                                  "logger_run_id": self._run_id,
                                  "scaler": self.precision.scaler.state_dict(), "metrics_lines": writer.lines,
                                  "hparams": self._hparams if self._hparams is not None else _hparams_of(state)}
        per_rank: dict[str, Any] = {"objects": {}, "rng": checkpoint.capture_rng()}
        # dist.strategy=fsdp: models and optimizers go through DCP, each rank writing its shard.
        to_shard = {k: _unwrapped(v) for k, v in state.items() if self.cfg.dist.strategy == "fsdp" and fsdp.is_sharded_state(v)}
        sharded = fsdp.sharded_state(to_shard, self._unwrapped_models())
        shared["sharded"] = {k: fsdp.layout(v) for k, v in to_shard.items()}
        for key, value in state.items():
            if key not in to_shard:
                target = per_rank if getattr(value, "distrib_per_rank", False) else shared
                target["objects"][key] = _state_of(value)
            # A rank's own part of a replicated object (a TrainLoader's stream position) goes to its file.
            rank_part = value.rank_state_dict() if callable(getattr(value, "rank_state_dict", None)) else None
            if rank_part is not None:
                per_rank.setdefault("rank_parts", {})[key] = rank_part
        save = functools.partial(checkpoint.save, self.ckpt_root, step, rank=self.rank, world_size=self.world_size,
                                 keep=self.cfg.ckpt.keep)
        if not self.cfg.ckpt.async_:
            self._saver.wait()
            save(shared=shared, per_rank=per_rank, sharded=sharded)
            return checkpoint.step_dir(self.ckpt_root, step)
        # state_dicts alias the live tensors: copy them now, before the next step changes them. Only
        # rank 0 writes the replicated state, so only rank 0 pays for its copy.
        shared = snapshot(shared) if self.is_rank_zero else None
        per_rank, sharded = snapshot(per_rank), snapshot(sharded)
        self._saver.submit(functools.partial(save, shared=shared, per_rank=per_rank, sharded=sharded, group=self._ckpt_group))
        return checkpoint.step_dir(self.ckpt_root, step)

    def wait_for_save(self) -> None:
        """Block until the checkpoint in flight is committed (raises its error, if it failed)."""
        self._saver.wait()

    def load(self, state: dict[str, Any]) -> Path | None:
        """Restore `state` in place from the checkpoint ckpt.resume picks (`auto`: the newest good one).

        Objects with `load_state_dict` are loaded; plain values are replaced in `state`. Returns the
        checkpoint, or None for a fresh start. Call it before the first `log` or `save`.
        """
        if self._writer is not None:
            raise ConfigError("Session.load() after the run's files were opened (a log or save came first). HINT: call load() before training.")
        path = self._resume_path()
        self._hparams = _hparams_of(state)
        if path is None:
            return None
        shared = checkpoint.load_file(path / "state.pt")
        same_world = shared["world_size"] == self.world_size
        per_rank = checkpoint.load_file(path / checkpoint.rank_file(self.rank)) if same_world else {"objects": {}}
        layouts = shared.get("sharded", {})  # keys stored as DCP shards (dist.strategy=fsdp)
        saved = {**shared["objects"], **{k: fsdp.saved_stub(v) for k, v in layouts.items()}, **per_rank["objects"]}
        wanted = {k for k, v in state.items() if same_world or not getattr(v, "distrib_per_rank", False)}
        missing = sorted(wanted - set(saved))
        if missing:
            raise ConfigError(f"checkpoint {path} holds no {', '.join(missing)} (it has {', '.join(sorted(saved))}). HINT: resume with the same state keys, or start fresh with --ckpt.resume never.")
        # Everything is compared before anything is loaded: a refused resume changes nothing.
        problems = [p for key in sorted(wanted) for p in incompatibilities(key, _unwrapped(state[key]), saved[key])]
        diff = config_diff(shared.get("config", {}), self.cfg.to_dict())
        whole = [k for k in sorted(wanted) if k not in layouts and self.sharded and fsdp.is_sharded_state(state[k])]
        if whole:
            raise ConfigError(f"cannot resume from {path}: its {', '.join(whole)} were saved whole (dist.strategy=ddp) and this run "
                              "shards them (dist.strategy=fsdp). HINT: finish it with --dist.strategy ddp, or start fresh with --ckpt.resume never.")
        if problems:
            raise ConfigError(
                f"cannot resume from {path}: this run's state does not match the checkpoint's: {'; '.join(problems)}. "
                f"{'The config changed since: ' + describe_diff(diff) + '. ' if diff else ''}HINT: to train this config, "
                "pass another --run.dir, or --ckpt.resume never (the previous run's files are moved to run.dir/previous/)."
            )
        if layouts:  # every rank reads what it needs from every shard: DCP reshards to this world size
            fsdp.load_sharded(path / fsdp.SHARDED_DIR, {k: _unwrapped(state[k]) for k in layouts if k in wanted},
                              self._unwrapped_models())
        for key, value in state.items():
            if key not in wanted or key in layouts:
                continue  # this rank's share of a different world (start it fresh), or loaded from the shards
            loaded = saved[key]
            if isinstance(value, nn.Module):
                unwrap_model(value).load_state_dict(loaded)
            elif hasattr(value, "load_state_dict"):
                value.load_state_dict(loaded)
            else:
                state[key] = loaded
        for key, part in per_rank.get("rank_parts", {}).items():  # empty at another world size
            if key in state and callable(getattr(state[key], "load_rank_state_dict", None)):
                state[key].load_rank_state_dict(part)
        changed = []
        for key, value in state.items():
            started = shared.get("hparams", {}).get(key)
            if isinstance(value, torch.optim.Optimizer) and key in wanted and started:
                schedulers = [v for v in state.values() if hasattr(v, "base_lrs")]
                changed += [f"{key} {c}" for c in apply_hparams(value, started, self._hparams[key], schedulers)]
        if diff:
            log.info(f"resuming with a changed config: {describe_diff(diff)} (applied{'; ' + ', '.join(changed) if changed else ''})")
        regrouped = [k for k in ("train.batch_size", "train.grad_accum") if k in diff]
        if regrouped:
            log.warning(f"resuming with another {' and '.join(regrouped)}: training continues at the same number of samples seen, "
                        "but the result will not be bit-identical to an uninterrupted run")
        self.precision.scaler.load_state_dict(shared["scaler"])
        self._run_id = shared.get("logger_run_id")
        if same_world:
            checkpoint.restore_rng(per_rank["rng"])
        else:
            log.warning(
                f"resuming a {shared['world_size']}-process checkpoint ({path}) on {self.world_size} processes: training "
                "continues at the same number of samples seen, but the result will not be bit-identical to an uninterrupted run"
            )
        self.resumed_from = path
        self._continue_reductions()
        self._rewind = (shared.get("metrics_lines"), _manifest_step(path))
        return path

    def _unwrapped_models(self) -> list[nn.Module]:
        return [unwrap_model(m) for m in self._models]

    def _resume_path(self) -> Path | None:
        """Rank 0 takes the run directory's lock and picks the checkpoint (so all ranks agree); errors reach every rank."""
        choice: Any = None
        if self.is_rank_zero:
            try:
                self._lock.acquire()
                resume = self.cfg.ckpt.resume
                if resume != "auto":
                    # `never` and an explicit checkpoint both start a new line of checkpoints here: the
                    # previous run's files go aside, so the two never mix (and its checkpoints never win).
                    resume = _moved(resume, self.cfg.run.dir, set_aside(self.cfg.run.dir))
                path = checkpoint.resolve_resume(resume, self.ckpt_root)
                choice = str(path) if path is not None else None
            except ConfigError as exc:
                choice = exc
        choice = broadcast_object(choice)
        if isinstance(choice, ConfigError):
            raise choice
        return Path(choice) if choice is not None else None


def _state_of(value: Any) -> Any:
    if isinstance(value, nn.Module):
        return unwrap_model(value).state_dict()
    if hasattr(value, "state_dict"):
        return value.state_dict()
    return value


def _moved(resume: str, run_dir: str, aside: Path | None) -> str:
    """`ckpt.resume` after the run directory's files went `aside`: a checkpoint that was among them moved too."""
    if aside is None or resume == "never":
        return resume
    try:
        inside = Path(resume).resolve().relative_to(Path(run_dir).resolve())
    except ValueError:
        return resume
    return str(aside / inside) if (aside / inside).exists() else resume


def _unwrapped(value: Any) -> Any:
    return unwrap_model(value) if isinstance(value, nn.Module) else value


def _hparams_of(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: hparams(v) for k, v in state.items() if isinstance(v, torch.optim.Optimizer)}


def _step_of(state: Mapping[str, Any]) -> int:
    for value in state.values():
        if isinstance(value, TrainLoader):
            return value.step
    raise ConfigError("Session.save(state) found no TrainLoader in state to take the step from. HINT: pass step=N.")


def _manifest_step(path: Path) -> int:
    return int(checkpoint.verify(path)["step"])

