"""`Checkpointer`: what `Session.save` and `Session.load` do with a state mapping.

It sorts each object of the state into the job's file, the rank's file or the DCP shards (see
`protocols.py`), writes them in the background when `ckpt.async` is on, picks the checkpoint a run
resumes from (rank 0 decides, every rank follows), and compares a checkpoint against the run's
state before it loads anything, so a refused resume changes nothing.

`Session` owns the rest of a resume: its run files, the tracker's run id and the loss scaler come
back to it in a `Restored` record.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distrib.checkpoint import sharded
from distrib.checkpoint import store as checkpoint
from distrib.checkpoint.background import Saver, snapshot
from distrib.checkpoint.protocols import RankStateful, Stateful, is_per_rank
from distrib.checkpoint.resume import apply_hparams, config_diff, describe_diff, hparams, incompatibilities, trajectory_changes
from distrib.checkpoint.rundir import RunLock, set_aside
from distrib.checkpoint.weights import load_weights
from distrib.config import Config
from distrib.data.loaders import TrainLoader
from distrib.data.sampling import mix_seed, seed_all
from distrib.errors import ConfigError, FaultError
from distrib.parallel.wrap import unwrap_model
from distrib.runtime.collectives import broadcast_object
from distrib.runtime.console import log
from distrib.runtime.ledger import LEDGER


@dataclasses.dataclass(frozen=True, kw_only=True)
class Restored:
    """What a resume hands back to the session: the job-wide state it keeps itself."""

    path: Path
    step: int
    scaler: dict[str, Any]
    logger_run_id: str | None
    metrics_lines: int | None


class Checkpointer:
    """Saves and restores a loop's state under `<run.dir>/checkpoints`, the same on every rank."""

    def __init__(self, cfg: Config, *, rank: int, world_size: int, sharded: bool) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.sharded = sharded
        """Whether this run's models are FSDP-sharded (a DDP checkpoint's whole state is loaded shard by shard)."""
        self.root = Path(cfg.run.dir) / "checkpoints"
        self._group: Any = None
        if cfg.ckpt.async_ and world_size > 1:
            # The background save's barriers get a group of their own, made now (the session makes its
            # Checkpointer right after the process group): making one needs the rendezvous store, which
            # may be gone by the time a stop signal asks for the first save (torchrun's agent closes
            # its store as it handles the signal).
            self._group = torch.distributed.new_group(backend="gloo")
        self._saver = Saver()

    # ------------------------------------------------------------------ save

    @LEDGER.busy_with("saving a checkpoint")  # progress however long it takes (the hang watchdog's)
    def save(self, state: Mapping[str, Any], *, step: int, models: list[nn.Module], job: Mapping[str, Any]) -> Path:
        """Checkpoint `state` at `step`; `job` is the session's own replicated state (run id, scaler, ...).

        With ckpt.async it returns once the state is copied to host memory; the write and commit
        finish in the background (`wait`).
        """
        shared: dict[str, Any] = {"objects": {}, "world_size": self.world_size, "config": self.cfg.to_dict(), **job}
        per_rank: dict[str, Any] = {"objects": {}, "rng": checkpoint.capture_rng()}
        # dist.strategy=fsdp: models and optimizers go through DCP, each rank writing its shard.
        to_shard = {k: _unwrapped(v) for k, v in state.items() if self.cfg.dist.strategy == "fsdp" and sharded.is_sharded_state(v)}
        shards = sharded.sharded_state(to_shard, models)
        shared["sharded"] = {k: sharded.layout(v) for k, v in to_shard.items()}
        for key, value in state.items():
            if key not in to_shard:
                target = per_rank if is_per_rank(value) else shared
                target["objects"][key] = _state_of(value)
            if isinstance(value, RankStateful):
                part = value.rank_state_dict()
                if part is not None:
                    per_rank.setdefault("rank_parts", {})[key] = part
        write = functools.partial(checkpoint.save, self.root, step, rank=self.rank, world_size=self.world_size, keep=self.cfg.ckpt.keep)
        if not self.cfg.ckpt.async_:
            self._saver.wait()
            write(shared=shared, per_rank=per_rank, sharded=shards)
            return checkpoint.step_dir(self.root, step)
        # state_dicts alias the live tensors: copy them now, before the next step changes them. Only
        # rank 0 writes the replicated state, so only rank 0 pays for its copy.
        copied = snapshot(shared) if self.rank == 0 else None
        self._saver.submit(functools.partial(write, shared=copied, per_rank=snapshot(per_rank), sharded=snapshot(shards), group=self._group))
        return checkpoint.step_dir(self.root, step)

    @LEDGER.busy_with("waiting for a checkpoint save")
    def wait(self, timeout: float | None = None) -> None:
        """Block until the checkpoint in flight is committed (raises its error, if it failed)."""
        self._saver.wait(timeout=timeout)

    def name_last_good(self, error: FaultError) -> None:
        """A failure's message ends with the checkpoint a rerun resumes from (none: it starts afresh)."""
        if error.last_good is None:
            error.last_good = self.last_good()

    def last_good(self) -> str | None:
        """The newest good checkpoint ("" when there is none; None when checkpoints/ cannot be read)."""
        try:
            found = checkpoint.newest_good(self.root)
        except OSError:  # a failure may have taken the checkpoints with it (unreadable): say nothing rather than mask it
            return None
        return str(found[0]) if found else ""

    # ------------------------------------------------------------------ resume

    @LEDGER.busy_with("choosing a checkpoint to resume")
    def choose(self, lock: RunLock) -> Path | None:
        """Rank 0 takes the run directory's lock and picks the checkpoint (so all ranks agree); errors reach every rank."""
        choice: Any = None
        if self.rank == 0:
            try:
                lock.acquire()
                resume = self.cfg.ckpt.resume
                if resume != "auto":
                    # `never` and an explicit checkpoint both start a new line of checkpoints here: the
                    # previous run's files go aside, so the two never mix (and its checkpoints never win).
                    resume = _moved(resume, self.cfg.run.dir, set_aside(self.cfg.run.dir, f"ckpt.resume={resume}"))
                path = checkpoint.resolve_resume(resume, self.root)
                choice = str(path) if path is not None else None
            except ConfigError as exc:
                choice = exc
        choice = broadcast_object(choice)
        if isinstance(choice, ConfigError):
            raise choice
        return Path(choice) if choice is not None else None

    @LEDGER.busy_with("loading pretrained weights")
    def init_from(self, models: list[nn.Module]) -> None:
        """`ckpt.init_from`, when there is no checkpoint to resume: the pretrained weights into the session's one model."""
        source = self.cfg.ckpt.init_from
        if source is None:
            return
        if len(models) != 1:
            raise ConfigError(
                f"ckpt.init_from={source!r} needs exactly one model set up before load(), and there are {len(models)}. "
                "HINT: call session.setup(model) first, or use session.load_weights(model, path) for each model."
            )
        done = load_weights(models[0], source, strict=self.cfg.ckpt.init_strict)
        if self.rank == 0:
            log.info(f"initialised from {source}: {len(done.loaded)} tensors ({done.bytes_read / 2**20:.1f} MiB read by rank 0)")

    @LEDGER.busy_with("loading a checkpoint")
    def restore(self, path: Path, state: dict[str, Any], *, models: list[nn.Module], started: Mapping[str, Any]) -> Restored:
        """Load `path` into `state` in place (modules and `Stateful` objects loaded, plain values replaced).

        `started` is `hparams_of(state)` as this run's config set the optimizers: a resume with a
        changed learning rate or weight decay applies the new values.
        """
        shared = checkpoint.load_file(path / "state.pt")
        same_world = shared["world_size"] == self.world_size
        per_rank = checkpoint.load_file(path / checkpoint.rank_file(self.rank)) if same_world else {"objects": {}}
        layouts = shared.get("sharded", {})  # keys stored as DCP shards (dist.strategy=fsdp)
        saved = {**shared["objects"], **{k: sharded.saved_stub(v) for k, v in layouts.items()}, **per_rank["objects"]}
        wanted = {k for k, v in state.items() if same_world or not is_per_rank(v)}
        self._check(path, state, saved, wanted, layouts, shared.get("config", {}))
        self._check_trajectory(path, state, saved, shared)
        if layouts:  # every rank reads what it needs from every shard: DCP reshards to this world size
            sharded.load_sharded(path / sharded.SHARDED_DIR, {k: _unwrapped(state[k]) for k in layouts if k in wanted}, models)
        for key, value in state.items():
            if key not in wanted or key in layouts:
                continue  # this rank's share of a different world (start it fresh), or loaded from the shards
            loaded = saved[key]
            if self.sharded and sharded.is_sharded_state(value):  # saved whole (DDP), resumed sharded: each rank takes its shards
                sharded.load_whole(_unwrapped(value), loaded)
            elif isinstance(value, nn.Module):
                unwrap_model(value).load_state_dict(loaded)
            elif isinstance(value, Stateful):
                value.load_state_dict(loaded)
            else:
                state[key] = loaded
        for key, part in per_rank.get("rank_parts", {}).items():  # empty at another world size
            if key in state and isinstance(state[key], RankStateful):
                state[key].load_rank_state_dict(part)
        self._apply_changes(path, state, wanted, shared, started)
        step = int(checkpoint.verify(path)["step"])
        if same_world:
            checkpoint.restore_rng(per_rank["rng"])
        else:  # another layout: each rank's generators start from (seed, rank, step), never replaying step 0's draws
            seed_all(mix_seed(self.cfg.seed, self.rank, step))
        return Restored(
            path=path,
            step=step,
            scaler=shared["scaler"],
            logger_run_id=shared.get("logger_run_id"),
            metrics_lines=shared.get("metrics_lines"),
        )

    def _check(
        self, path: Path, state: Mapping[str, Any], saved: Mapping[str, Any], wanted: set[str], layouts: Mapping[str, Any], config: Mapping[str, Any]
    ) -> None:
        """Everything is compared before anything is loaded: a refused resume changes nothing."""
        missing = sorted(wanted - set(saved))
        if missing:
            raise ConfigError(
                f"checkpoint {path} holds no {', '.join(missing)} (it has {', '.join(sorted(saved))}). HINT: resume with the "
                "same state keys, or start fresh with --ckpt.resume never."
            )
        problems = [p for key in sorted(wanted) for p in incompatibilities(key, _unwrapped(state[key]), saved[key])]
        if problems:
            diff = config_diff(dict(config), self.cfg.to_dict())
            raise ConfigError(
                f"cannot resume from {path}: this run's state does not match the checkpoint's: {'; '.join(problems)}. "
                f"{'The config changed since: ' + describe_diff(diff) + '. ' if diff else ''}HINT: to train this config, "
                "pass another --run.dir, or --ckpt.resume never (the previous run's files are moved to run.dir/previous/)."
            )

    def _apply_changes(self, path: Path, state: dict[str, Any], wanted: set[str], shared: Mapping[str, Any], started: Mapping[str, Any]) -> None:
        """A resume with a changed config: the optimizers take its hyperparameters, and the log says what changed."""
        diff = config_diff(shared.get("config", {}), self.cfg.to_dict())
        changed = []
        for key, value in state.items():
            saved_hparams = shared.get("hparams", {}).get(key)
            if isinstance(value, torch.optim.Optimizer) and key in wanted and saved_hparams:
                schedulers = [v for v in state.values() if hasattr(v, "base_lrs")]
                changed += [f"{key} {c}" for c in apply_hparams(value, saved_hparams, started[key], schedulers)]
        if diff:
            log.info(f"resuming with a changed config: {describe_diff(diff)} (applied{'; ' + ', '.join(changed) if changed else ''})")

    def _check_trajectory(self, path: Path, state: Mapping[str, Any], saved: Mapping[str, Any], shared: Mapping[str, Any]) -> None:
        """A resume that leaves the trajectory of the run it continues says what changes (`ckpt.elastic`)."""
        key = next((k for k, v in state.items() if isinstance(v, TrainLoader) and isinstance(saved.get(k), Mapping)), None)
        if key is None:
            return
        loader, old = state[key], saved[key]
        found = trajectory_changes(old, shared.get("config", {}), loader, self.cfg.to_dict())
        changes, fixes = "; ".join(c for c, _ in found), "; ".join(dict.fromkeys(f for _, f in found))
        moved = f"a {old['world_size']}-process checkpoint ({path}) on {self.world_size} process{'es' if self.world_size > 1 else ''}"
        if found and self.cfg.ckpt.elastic == "strict":
            raise ConfigError(
                f"cannot resume {moved} on the same trajectory (ckpt.elastic=strict): {changes}. HINT: {fixes}; or pass --ckpt.elastic warn to train on anyway."
            )
        if found:
            log.warning(
                f"resuming {moved}: {changes}. Training continues at the same samples seen, but will not end where the "
                f"uninterrupted run would. HINT: {fixes}; --ckpt.elastic strict refuses such a resume."
            )
        elif old["world_size"] != self.world_size:
            log.info(
                f"resuming {moved} with the same global batch of {loader.global_batch}: every later step trains on the samples it "
                "would have, so the run continues its trajectory (to float tolerance: the sums run in another order)"
            )


def _state_of(value: Any) -> Any:
    if isinstance(value, nn.Module):
        return unwrap_model(value).state_dict()
    if isinstance(value, Stateful):
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


def hparams_of(state: Mapping[str, Any]) -> dict[str, Any]:
    """Each optimizer's hyperparameters in `state`, as this run's config set them."""
    return {k: hparams(v) for k, v in state.items() if isinstance(v, torch.optim.Optimizer)}


def step_of(state: Mapping[str, Any]) -> int:
    """The step of the `TrainLoader` in `state` (what `save` defaults to)."""
    for value in state.values():
        if isinstance(value, TrainLoader):
            return value.step
    raise ConfigError("Session.save(state) found no TrainLoader in state to take the step from. HINT: pass step=N.")
