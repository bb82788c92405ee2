"""Typed config: keyword-only dataclasses, one per section, validated in `__post_init__`.

Reading argv and config files into a Config, and `--help`, live in `parse.py`; keys and values in `keys.py`.

Precedence: field defaults < config file (TOML, YAML or JSON) < `--section.key value` flags.
Unknown keys are an error that names the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from distrib.config.checks import check_report_to, non_negative, one_of, positive
from distrib.config.keys import as_dict, check_key, field_types, flatten, from_flat
from distrib.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
STRATEGIES = ("ddp", "fsdp")
MAX_WORKERS = 256


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/distrib"
    """Directory rank 0 writes metrics, config, model and summary into."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["wandb"])
    """Where rank 0 reports metrics besides metrics.jsonl: any of `wandb`, `tensorboard` (run.dir/tensorboard/),
    `mlflow` (run.dir/mlruns/ unless MLFLOW_TRACKING_URI), `csv` (run.dir/metrics.csv), your own as `module:Class`,
    or `none`. Comma-separated on the command line: --run.report_to tensorboard,csv (docs/trackers.md)."""
    tracker_timeout_s: float = 30.0
    """How long the end of a run waits for the trackers to flush before it ends them (training never waits for them)."""

    def __post_init__(self) -> None:
        if not self.dir:
            raise ConfigError("run.dir is empty. HINT: pass --run.dir runs/my-run.")
        one_of("run", "device", self.device, DEVICES)
        positive("run", tracker_timeout_s=self.tracker_timeout_s)
        if self.tracker_timeout_s > 3600:
            raise ConfigError(
                f"run.tracker_timeout_s={self.tracker_timeout_s:g} would hold a finished job for over an hour. HINT: pass --run.tracker_timeout_s 60 (or up to 3600)."
            )
        check_report_to(self.report_to)


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    num_workers: int = 0
    """DataLoader worker processes per rank (0 loads in the main process)."""
    persistent_workers: bool = False
    """Keep workers alive across epochs (needs num_workers > 0)."""
    prefetch_factor: int | None = None
    """Batches each worker loads ahead (needs num_workers > 0); None keeps PyTorch's default."""
    shuffle: bool = True
    """Shuffle the training set each epoch (seeded by `seed` and the epoch)."""
    drop_last: bool = False
    """Drop the incomplete last global batch of each epoch instead of training on it."""
    prefetch: bool = True
    """On CUDA, copy batch n+1 on a side stream while batch n computes."""

    def __post_init__(self) -> None:
        positive("data", prefetch_factor=self.prefetch_factor)
        non_negative("data", num_workers=self.num_workers)
        if self.num_workers > MAX_WORKERS:  # each is a process with a copy of the dataset object
            raise ConfigError(
                f"data.num_workers={self.num_workers} is more processes than any machine uses well (at most {MAX_WORKERS}). "
                f"HINT: a few per CPU core and rank: pass --data.num_workers {min(os.cpu_count() or 2, 8)}."
            )
        if self.num_workers == 0 and self.persistent_workers:
            raise ConfigError("data.persistent_workers=true needs data.num_workers > 0. HINT: pass --data.num_workers 2 or drop the flag.")
        if self.num_workers == 0 and self.prefetch_factor is not None:
            raise ConfigError("data.prefetch_factor is set but data.num_workers=0. HINT: pass --data.num_workers 2 or unset prefetch_factor.")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    batch_size: int = 64
    """Samples per process per micro-batch (the global batch is batch_size * world_size * grad_accum). With
    train.global_batch_size: the largest micro-batch a process may take."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all processes. Set, distrib derives the micro-batch (at most train.batch_size)
    and train.grad_accum for the world size, so the same command trains the same samples in each step on any number
    of processes, and a resume on another number continues the same run (docs/elastic.md). None: batch_size x
    grad_accum x processes."""
    eval_batch_size: int | None = None
    """Samples per process per evaluation batch; defaults to batch_size."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; gradients are all-reduced once per step."""
    epochs: int = 4
    """Passes over the training set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run all epochs)."""
    log_every: int = 50
    """Optimizer steps between logged (all-reduced) training metrics."""
    precision: str = "fp32"
    """`fp32`, `bf16` (autocast) or `fp16` (autocast + GradScaler)."""
    clip_grad_norm: float | None = None
    """Clip the global gradient norm to this value (after unscaling); None disables."""
    compile: bool = False
    """Wrap the model with torch.compile."""
    debug_steps: int = 10
    """Optimizer-step limit in --debug mode."""
    straggler_threshold: float = 0.3
    """Warn when (slowest - fastest) / slowest rank step time passes this for 3 log intervals in a row,
    by at least 5 ms a step (shorter spreads are a busy machine's noise, not a slow rank)."""
    hang_timeout_s: float | None = 300.0
    """When no rank makes progress for this long, print a verdict naming the rank that holds the others up, keep every
    rank's stacks in run.dir/hang-<time>/ and end the job with exit 1 (docs/guards.md); None disables."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device, for MFU (needs the task's FLOPs per sample); None: no MFU."""
    progress: str = "auto"
    """`auto` (a progress bar when stdout is a terminal, else one line per log interval), `bar`, `lines`."""
    nonfinite: str = "error"
    """An optimizer step with NaN or inf gradients: `error` stops the run (exit 1) before any checkpoint holds it;
    `skip` drops the step on every rank and trains on (docs/guards.md: what each costs)."""
    max_skipped_steps: int = 5
    """Dropped steps in a row (train.nonfinite=skip, or fp16's loss scaler) after which the run stops as with `error`."""
    activation_checkpointing: str = "none"
    """Recompute each block's activations in backward instead of keeping them: `none`, `full` (keep only each block's
    input) or `selective` (keep matmul and attention outputs, recompute the rest). The blocks are FSDP's
    (dist.fsdp_blocks, or found automatically) under any strategy; RNG state is restored for the recompute, so
    results do not change (docs/memory.md)."""
    profile: str | None = None
    """A window of optimizer steps to trace with torch.profiler, as FIRST:LAST (`20:25`: steps 20 to 25, as metrics.jsonl
    numbers them) or one step: a trace per rank in run.dir/profile/ and, on CUDA, a memory snapshot (docs/profiling.md)."""

    @property
    def profile_window(self) -> tuple[int, int] | None:
        """train.profile as (first, last) optimizer step, both included; None when off."""
        if self.profile is None:
            return None
        first, _, last = self.profile.partition(":")
        return int(first), int(last or first)

    def __post_init__(self) -> None:
        if self.profile is not None:
            window = re.fullmatch(r"\s*(\d{1,9})\s*(?::\s*(\d{1,9})\s*)?", self.profile, flags=re.ASCII)
            first, last = (window.group(1), window.group(2) or window.group(1)) if window else ("0", "0")
            if not 1 <= int(first) <= int(last):
                raise ConfigError(
                    f"train.profile={self.profile!r} is not a window of optimizer steps FIRST:LAST (1 <= FIRST <= LAST). "
                    "HINT: pass --train.profile 20:25 to trace steps 20 to 25 (a few steps after the first, which includes warm-up)."
                )
            self.profile = f"{int(first)}:{int(last)}"
        one_of("train", "progress", self.progress, ("auto", "bar", "lines"))
        one_of("train", "nonfinite", self.nonfinite, ("error", "skip"))
        one_of("train", "activation_checkpointing", self.activation_checkpointing, ("none", "full", "selective"))
        positive("train", max_skipped_steps=self.max_skipped_steps)
        positive("train", straggler_threshold=self.straggler_threshold, hang_timeout_s=self.hang_timeout_s, peak_flops=self.peak_flops)
        positive(
            "train",
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            grad_accum=self.grad_accum,
            global_batch_size=self.global_batch_size,
            epochs=self.epochs,
            max_steps=self.max_steps,
            log_every=self.log_every,
            clip_grad_norm=self.clip_grad_norm,
            debug_steps=self.debug_steps,
        )
        one_of("train", "precision", self.precision, PRECISIONS)
        if self.global_batch_size is not None and self.grad_accum != 1:
            raise ConfigError(
                f"train.grad_accum={self.grad_accum} with train.global_batch_size={self.global_batch_size}: with a global "
                "batch, distrib derives the accumulation for the world size. HINT: drop --train.grad_accum (train.batch_size "
                "caps the micro-batch)."
            )


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """`sgd` or `adamw`."""
    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    momentum: float = 0.0
    """SGD momentum."""
    schedule: str = "cosine"
    """`constant`, `cosine` or `linear` decay over the run's optimizer steps."""
    warmup_steps: int = 0
    """Linear warm-up optimizer steps before the schedule."""

    def __post_init__(self) -> None:
        one_of("optim", "name", self.name, OPTIMIZERS)
        one_of("optim", "schedule", self.schedule, SCHEDULES)
        positive("optim", lr=self.lr)
        non_negative("optim", weight_decay=self.weight_decay, momentum=self.momentum, warmup_steps=self.warmup_steps)


@dataclasses.dataclass(kw_only=True)
class DistConfig:
    strategy: str = "ddp"
    """`ddp`: every rank holds the whole model, gradients and optimizer state. `fsdp`: FSDP2 shards
    them across ranks (each holds about 1/world_size), at the cost of gathering parameters in each
    forward and backward: pick it when the model and its optimizer state do not fit one device."""
    fsdp_blocks: list[str] = dataclasses.field(default_factory=list)
    """FSDP: class names of the blocks to shard one by one (e.g. `GPT2Block`); empty: found automatically
    (the repeated children of an `nn.ModuleList`/`nn.Sequential`, e.g. a transformer's layers)."""
    reshard_after_forward: bool = True
    """FSDP: free each block's gathered parameters after its forward (less memory) and gather them again
    for backward (one more all-gather per block)."""
    replicate: int = 1
    """FSDP: replicas of the model (HSDP). The world of R x S ranks shards within each group of S consecutive ranks
    and replicates across the R groups: pass the number of nodes to keep the per-block reduce-scatter inside a node
    (gradients are then all-reduced across nodes once per step). 1: shard over every rank."""
    fsdp_offload: bool = False
    """FSDP: keep the sharded parameters, gradients and optimizer state in (pinned) host memory and step the
    optimizer on the CPU (FSDP2's CPUOffloadPolicy), for a model that does not fit the GPUs at all."""
    backend: str = "auto"
    """`auto` (NCCL on CUDA, gloo on CPU), `gloo` or `nccl`."""
    timeout_s: float = 600.0
    """Collective timeout: a rank waiting longer than this on a dead peer fails instead of hanging."""
    find_unused_parameters: bool = False
    """DDP: tolerate parameters that get no gradient in a step (costs a graph traversal)."""
    static_graph: bool = False
    """DDP: the set of used parameters never changes between steps."""
    gradient_as_bucket_view: bool = False
    """DDP: gradients alias the all-reduce buckets (saves one copy of the gradients)."""
    bucket_cap_mb: float | None = None
    """DDP: all-reduce bucket size in MiB. `none`: DDP's own default (25 MiB, with a small 1 MiB first
    bucket so the all-reduce starts early in backward; passing 25 explicitly loses that first bucket)."""
    sync_batchnorm: bool = False
    """Convert BatchNorm layers to SyncBatchNorm when there is more than one process."""

    def __post_init__(self) -> None:
        one_of("dist", "backend", self.backend, BACKENDS)
        one_of("dist", "strategy", self.strategy, STRATEGIES)
        positive("dist", timeout_s=self.timeout_s, bucket_cap_mb=self.bucket_cap_mb, replicate=self.replicate)
        if self.strategy != "fsdp" and (self.replicate > 1 or self.fsdp_offload):
            key = f"dist.replicate={self.replicate}" if self.replicate > 1 else "dist.fsdp_offload=true"
            raise ConfigError(
                f"{key} applies to sharded training, but dist.strategy={self.strategy} keeps the whole model on every rank. "
                f"HINT: pass --dist.strategy fsdp, or drop --{key.split('=')[0]}."
            )


@dataclasses.dataclass(kw_only=True)
class CkptConfig:
    every: int | None = 100
    """Checkpoint every this many optimizer steps (and at each epoch end); None: epoch ends only."""
    keep: int = 3
    """How many of the newest checkpoints to keep."""
    resume: str = "auto"
    """`auto` (newest good checkpoint in run.dir, else fresh), `never`, or a checkpoint directory."""
    async_: bool = True
    """`--ckpt.async`: the step waits only for a host copy of the state; writing, fsync and the commit
    run in the background (one save in flight). `false`: every rank waits for the whole save."""
    init_from: str | None = None
    """Pretrained weights for a run that starts fresh (no checkpoint to resume): a Hugging Face model directory,
    a .safetensors file, a model.pt or a distrib run directory. Under FSDP each rank reads only its shards."""
    init_strict: bool = True
    """With ckpt.init_from: every tensor must match by name, shape and dtype. `false`: load what matches, keep the
    rest at its initialisation (a new head) and list it."""
    elastic: str = "warn"
    """A resume that cannot continue the trajectory of the run it resumes (another global batch or training set
    size, or another world size over which the training set does not split evenly): `warn` names what changes and
    trains on; `strict` refuses it (exit 2) before anything is loaded."""

    def __post_init__(self) -> None:
        positive("ckpt", every=self.every, keep=self.keep)
        one_of("ckpt", "elastic", self.elastic, ("warn", "strict"))
        if not self.resume:
            raise ConfigError("ckpt.resume is empty. HINT: pass --ckpt.resume auto, never, or a checkpoint directory.")
        if self.init_from == "":
            raise ConfigError("ckpt.init_from is empty. HINT: pass a Hugging Face model directory, a .safetensors file or a model.pt, or leave it unset.")


WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclasses.dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases on rank 0. A key left unset defers to wandb's own environment variables."""

    mode: str | None = None
    """`auto`: online when credentials are configured (WANDB_API_KEY or netrc), else offline; never a prompt.
    `online`, `offline`, `disabled`. None: WANDB_MODE, or `disabled` under WANDB_DISABLED=true, else `auto`."""
    project: str | None = None
    """None: WANDB_PROJECT, else `distrib`."""
    name: str | None = None
    """Run name; None: WANDB_NAME, else wandb picks one."""
    tags: list[str] = dataclasses.field(default_factory=list)
    """Comma-separated on the command line: --wandb.tags a,b. Empty: WANDB_TAGS."""
    group: str | None = None
    """None: WANDB_RUN_GROUP, else the Slurm job id when there is one."""
    init_timeout_s: float = 60.0
    """How long wandb.init may take (in the background: training does not wait) before distrib gives up on wandb."""

    def __post_init__(self) -> None:
        if self.mode is not None:
            one_of("wandb", "mode", self.mode, WANDB_MODES)
        positive("wandb", init_timeout_s=self.init_timeout_s)


@dataclasses.dataclass(kw_only=True)
class Config:
    """distrib's own keys. A script adds its sections with `config_class(sections)` (or `sections=` to
    `parse_config`/`main`); the built-in task is such a script (`distrib.cli.task.SECTIONS`)."""

    seed: int = 0
    """Seeds shuffling, dropout and whatever the script seeds from it."""
    debug: bool = False
    """Single process, no process group, num_workers=0, anomaly detection, deterministic kernels."""
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    dist: DistConfig = dataclasses.field(default_factory=DistConfig)
    ckpt: CkptConfig = dataclasses.field(default_factory=CkptConfig)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        """Settings of different sections that cannot go together (each section checks its own)."""
        if self.dist.strategy == "fsdp" and self.train.precision == "fp16":
            raise ConfigError(
                "train.precision=fp16 with dist.strategy=fsdp: fp16 needs loss scaling of sharded gradients, "
                "which distrib does not do. HINT: pass --train.precision bf16 (no scaling needed) or fp32."
            )
        if self.dist.static_graph and self.dist.strategy == "ddp" and self.train.grad_accum > 1:
            # DDP's static graph records its first backward, which must reduce: torch asserts inside the
            # reducer (expect_autograd_hooks_) when that backward is an accumulating one.
            raise ConfigError(
                f"dist.static_graph=true with train.grad_accum={self.train.grad_accum}: DDP's static graph cannot skip "
                "the all-reduce of an accumulating micro-batch in its first step. HINT: drop --dist.static_graph "
                "(the default DDP works with accumulation), or pass --train.grad_accum 1."
            )

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts, keyed as on the command line (`ckpt.async`, not the attribute `async_`)."""
        return as_dict(self)

    def replace(self, **dotted: Any) -> Config:
        """A copy with dotted keys replaced (`cfg.replace(**{"train.epochs": 1})`), re-validated."""
        cls = type(self)
        flat = flatten(self.to_dict())
        for key, value in dotted.items():
            check_key(key, cls)
            flat[key] = value
        return from_flat(flat, cls)


# --------------------------------------------------------------------------- a script's own sections

_CLASSES: dict[tuple[tuple[str, type], ...], type] = {}


def config_class(sections: Mapping[str, type] | None = None) -> type[Config]:
    """`Config` plus a script's own sections: `{"model": ModelConfig}` adds `--model.*` keys.

    A section named like one of distrib's (`data`, `train`, ...) must subclass distrib's dataclass
    for it and so extends it (the built-in task adds `data.train_size` this way). The same sections
    give the same class, so configs built from them compare equal.
    """
    if not sections:
        return Config
    key = tuple(sorted(sections.items(), key=lambda kv: kv[0]))
    if key in _CLASSES:
        return _CLASSES[key]
    core = field_types(Config)
    fields: list[tuple[str, type, Any]] = []
    for name, cls in key:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ConfigError(f"section {name!r} must be a dataclass type, got {cls!r}. HINT: decorate it with @dataclasses.dataclass(kw_only=True).")
        if not name.isidentifier():
            raise ConfigError(f"section name {name!r} is not an identifier. HINT: use a name like 'model'.")
        if name in core and not dataclasses.is_dataclass(core[name]):
            raise ConfigError(f"section {name!r} would replace distrib's top-level key {name!r}. HINT: choose another section name.")
        if name in core and not issubclass(cls, core[name]):
            raise ConfigError(
                f"section {name!r} is distrib's own; {cls.__name__} must subclass distrib's {core[name].__name__} to "
                f"extend it. HINT: class {cls.__name__}(distrib.config.{core[name].__name__}): ... or choose another section name."
            )
        fields.append((name, cls, dataclasses.field(default_factory=cls)))
    made = dataclasses.make_dataclass("ScriptConfig", fields, bases=(Config,), kw_only=True)
    made.__module__ = __name__
    _CLASSES[key] = made
    return made
