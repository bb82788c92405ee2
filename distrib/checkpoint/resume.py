"""Resume only what matches: what a checkpoint can restore into this run, and what the config changed.

A resume must not half-load a model of another shape, nor silently keep a learning rate the user
changed. So before anything is loaded, `incompatibilities` compares the checkpoint's model and
optimizer state with this run's (parameter names and shapes; optimizer kinds and groups), and
refusals name the config keys that changed. After loading, `apply_hparams` re-applies the
optimizer hyperparameters the config changed (the checkpoint stores those the run started with),
keeping the schedule's position, and leaves alone what training itself changed (e.g. a
`ReduceLROnPlateau` cut).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distrib.config.keys import flatten
from distrib.data.loaders import TrainLoader

IGNORED_KEYS = ("ckpt.resume", "run.dir")
"""Config keys that say where a run is, not what it trains."""


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{key: (checkpoint's, now)}` for every config key that differs (gone now: None).

    A key the checkpoint's config does not have (it predates the key) is not a change: the run that
    wrote it had no such setting to differ from.
    """
    a, b = flatten(dict(old)), flatten(dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(a) if a.get(k) != b.get(k) and k not in IGNORED_KEYS}


def describe_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in diff.items())


def hparams(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """An optimizer's hyperparameters per group (what its config set), as plain data."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def incompatibilities(name: str, current: Any, saved: Any) -> list[str]:
    """Why `saved` (a state_dict) cannot be loaded into `current`; empty when it can."""
    if isinstance(current, nn.Module):
        return _module_mismatch(name, current.state_dict(), saved)
    if isinstance(current, torch.optim.Optimizer):
        return _optimizer_mismatch(name, current.state_dict(), saved)
    return []


def _module_mismatch(name: str, now: Mapping[str, Any], saved: Any) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"{name}: the checkpoint holds a {type(saved).__name__}, not a state_dict"]
    out = []
    missing, extra = [k for k in now if k not in saved], [k for k in saved if k not in now]
    if missing:
        out.append(f"{name}: {len(missing)} parameter(s) not in the checkpoint ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    if extra:
        out.append(f"{name}: {len(extra)} checkpoint parameter(s) this model lacks ({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''})")
    shapes = [
        f"{k} {list(saved[k].shape)} -> {list(v.shape)}"
        for k, v in now.items()
        if k in saved and hasattr(v, "shape") and hasattr(saved[k], "shape") and saved[k].shape != v.shape
    ]
    if shapes:
        out.append(f"{name}: shapes differ: {', '.join(shapes[:4])}{', ...' if len(shapes) > 4 else ''}")
    return out


def _optimizer_mismatch(name: str, now: Mapping[str, Any], saved: Any) -> list[str]:
    if not isinstance(saved, Mapping) or "param_groups" not in saved:
        return [f"{name}: the checkpoint holds no optimizer state_dict"]
    a, b = saved["param_groups"], now["param_groups"]
    if len(a) != len(b):
        return [f"{name}: {len(a)} parameter group(s) in the checkpoint, {len(b)} now"]
    out = []
    for i, (ga, gb) in enumerate(zip(a, b)):
        if len(ga["params"]) != len(gb["params"]):
            out.append(f"{name}: group {i} has {len(ga['params'])} parameters in the checkpoint, {len(gb['params'])} now")
        ka, kb = set(ga) - {"params", "initial_lr"}, set(gb) - {"params", "initial_lr"}
        if ka != kb:
            out.append(f"{name}: another kind of optimizer (the checkpoint's has {', '.join(sorted(ka - kb))}; this one {', '.join(sorted(kb - ka))})")
    return out


def apply_hparams(optimizer: torch.optim.Optimizer, started: list[dict[str, Any]], fresh: list[dict[str, Any]], schedulers: list[Any]) -> list[str]:
    """After loading: re-apply what the config changed since the checkpoint's run started. Returns what changed.

    `started`: the checkpoint run's hyperparameters at its start; `fresh`: this run's, from its
    config, before loading. A changed base learning rate scales the current one (the schedule's
    position is kept) and every scheduler's `base_lrs`.
    """
    changes = []
    for i, (group, old, new) in enumerate(zip(optimizer.param_groups, started, fresh)):
        for k, v in new.items():
            if k not in old or old[k] == v or k == "lr" and "initial_lr" in new:
                continue
            if k == "initial_lr":  # a scheduler's base rate: scale the rate it has reached
                group["lr"] = group["lr"] * v / old[k] if old[k] else v
            group[k] = v
            changes.append(f"group {i} {'lr' if k == 'initial_lr' else k} {old[k]!r} -> {v!r}")
    for sched in schedulers:
        if getattr(sched, "optimizer", None) is optimizer and hasattr(sched, "base_lrs"):
            sched.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    return changes


ORDER_KEYS = ("seed", "data.shuffle", "data.drop_last")
"""Config keys that decide which samples each step of an epoch reads."""


def trajectory_changes(saved: Mapping[str, Any], config: Mapping[str, Any], loader: TrainLoader, current: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Why resuming the loader state `saved` (written under `config`; this run's is `current`) leaves the trajectory
    of the run it continues, each with its fix; empty when every later step trains on the samples it would have
    (`docs/elastic.md`)."""
    old_world, world, flat, now = saved["world_size"], loader.world_size, flatten(dict(config)), flatten(dict(current))
    # A checkpoint from before the loader kept its global batch: its config says it (unless a script passed
    # batch_size= or grad_accum= to train_loader, so only a change of world size is judged by it).
    old_global = saved.get("global_batch") or (
        flat.get("train.batch_size", 0) * flat.get("train.grad_accum", 1) * old_world if old_world != world else loader.global_batch
    )
    changes = []
    if old_global != loader.global_batch:
        changes.append(
            (
                f"the global batch changes from {old_global} to {loader.global_batch} samples per optimizer step ({loader.batch_size} x "
                f"{loader.grad_accum} micro-batches x {world} process{'es' if world > 1 else ''} now), so every later step trains on other "
                "samples and an epoch takes another number of steps",
                f"keep --train.global_batch_size {old_global} (distrib splits it over any number of processes)",
            )
        )
    for key in ORDER_KEYS:
        if key in flat and key in now and flat[key] != now[key]:
            changes.append((f"{key} changes from {flat[key]!r} to {now[key]!r}, so later epochs read other samples in each step", f"keep {key}"))
    n, size = saved.get("dataset_size"), loader.dataset_size
    if n is not None and size is not None and n != size:
        changes.append((f"the training set changes from {n} to {size} samples", "train on the same training set"))
    elif size is not None and old_world != world:
        even = f"a training set size that both {old_world} and {world} processes divide (a multiple of {math.lcm(old_world, world)})"
        for w in sorted({old_world, world}):
            if size % w:
                what = f"drops {size % w}" if loader.drop_last else f"repeats {w - size % w}"
                changes.append((f"the training set's {size} samples do not split evenly over {w} processes (each epoch's last step {what} of them)", even))
        if loader.drop_last:
            old_micro = (saved.get("splits") or [{}])[-1].get("micro_batch", flat.get("train.batch_size", loader.batch_size))
            before, after = _kept(size, old_world, old_micro), _kept(size, world, loader.batch_size)
            if before != after:
                changes.append(
                    (
                        f"data.drop_last drops each rank's partial last micro-batch: an epoch trains {before} samples on {old_world} "
                        f"process{'es' if old_world > 1 else ''} and {after} on {world}",
                        "pass --data.drop_last false (each epoch's last step is then short, the same at every world size)",
                    )
                )
    return changes


def _kept(size: int, world: int, micro: int) -> int:
    """Samples an epoch trains with data.drop_last: `DistributedSampler` drops size % world, each rank its partial micro-batch."""
    return world * (size // world // micro * micro)
