"""The pre-flight checks `fit` runs before the first file is written: the datasets are readable,
a batch collates, and the model computes a loss on a batch as large as the real ones.

A batch size that cannot fit (memory, a model's fixed length), a batch the model cannot take or a
loss that is not a scalar fails here, with the batch described and the fix named, rather than after
an epoch, or with a run directory half written.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from distrib.checkpoint.rundir import SUMMARY_FILE
from distrib.data.accumulate import ItemCounter
from distrib.data.stream import is_stream
from distrib.data.transfer import describe, leading_dim, map_tensors, to_device
from distrib.errors import BatchError, ConfigError, DistribError
from distrib.loop.loss import LossStep
from distrib.parallel.wrap import unwrap_model
from distrib.runtime.console import log

if TYPE_CHECKING:
    from distrib.loop.session import Session


def check_datasets(train_data: Any, eval_data: Any) -> None:
    """A dataset distrib cannot read fails here, naming what it is and what would do."""
    for what, data in (("train_data", train_data), ("eval_data", eval_data)):
        if data is not None and not is_stream(data) and not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            raise ConfigError(
                f"{what} is a {type(data).__name__}, neither a map-style Dataset (len() and indexing) nor an IterableDataset. "
                "HINT: pass a Dataset or a list; for a stream, an IterableDataset whose __iter__ starts a new pass each time "
                "(a generator can be read only once), with __len__ or --train.max_steps."
            )


def probe(model: nn.Module, step: LossStep, items: ItemCounter | None, sample: Any, session: Session, size_key: str) -> None:
    """Run the model on one batch before anything is written, so a call that cannot work fails now.

    No gradient, eval mode (no BatchNorm statistics change) and a forked RNG: training is
    bit-for-bit what it would have been without the probe.
    """
    module = unwrap_model(model).to(session.device)
    batch = to_device(sample, session.device)
    was_training = module.training
    devices = [session.device.index or 0] if session.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), session.autocast():
            module.eval()
            out = step(module, batch, items(batch) if items is not None else None)
    except DistribError:
        raise
    except torch.OutOfMemoryError as exc:
        raise BatchError(
            f"The pre-flight probe ran out of memory on one batch of {leading_dim(batch)} samples ({size_key}), before anything "
            f"was written: {str(exc).strip().splitlines()[0][:300]}\nHINT: lower --{size_key.split('=')[0]} (with train.global_batch_size "
            "set, distrib keeps the optimizer's batch; otherwise raise train.grad_accum to keep batch_size x grad_accum x processes), or use train.precision bf16."
        ) from None
    except Exception as exc:  # the user's model or step: say where it failed, and what distrib called
        how = (
            "step_fn(model, batch)"
            if step.step_fn is not None
            else "model(**batch)"
            if isinstance(batch, dict) and step.loss_fn is None
            else "loss_fn(model(inputs), labels)"
        )
        raise BatchError(
            f"The pre-flight probe ({how} on one batch of {leading_dim(batch)} samples, {size_key}, before anything is written) failed: "
            f"{type(exc).__name__}: {str(exc).strip()[:500]}\nThe batch:\n{describe(batch)}\nHINT: a dict batch is passed as keywords "
            "and the output's .loss is the loss; (inputs, labels) batches use loss_fn (cross-entropy by default); for "
            "anything else pass step_fn=lambda model, batch: loss."
        ) from exc
    finally:
        module.train(was_training)
    if not torch.isfinite(out.loss.detach()).all():
        log.warning(f"the pre-flight probe's loss is {out.loss.item()}: check the model's initialisation and the data")


def share(dataset: Dataset, world_size: int) -> int:
    """A rank's share of `dataset`: the probe's batch is never larger than the rank's real ones."""
    try:
        return max(1, math.ceil(len(dataset) / world_size))  # type: ignore[arg-type]
    except TypeError:  # no len(): the loader says so, with the fix
        return 1


def collate_probe(dataset: Dataset, collate_fn: Callable[[list[Any]], Any] | None, n: int) -> Any:
    """A batch of the first `n` samples, collated as the loader will, so a malformed batch fails before anything is written."""
    if is_stream(dataset):  # its first samples, read in this process (the rank's workers start later)
        samples = list(itertools.islice(iter(dataset), n))
        if not samples:
            raise BatchError(f"The training stream ({type(dataset).__name__}) yielded no sample. HINT: check its __iter__.")
    else:
        samples = [dataset[i] for i in range(min(n, len(dataset)))]  # type: ignore[arg-type]
    try:
        batch = (collate_fn or default_collate)(samples)
    except (TypeError, RuntimeError) as exc:
        raise BatchError(
            f"Cannot collate a sample of type {type(samples[0]).__name__} into a batch ({exc}). HINT: have the "
            "Dataset return tensors (or numbers/arrays default_collate understands), or pass collate_fn."
        ) from None
    map_tensors(batch, lambda t: t)
    return batch


def complete_run(run_dir: Path, step: int, resumed: Path) -> dict[str, Any] | None:
    """The summary of a run found complete at the checkpoint it resumed from (at `step`), or None.

    A rerun of a finished run (the same command again, or the README's next command) trains
    nothing; it says so and leaves every file as it was, rather than rewriting summary.json,
    config.json and the last checkpoint with the records of a run that did nothing.
    """
    path = run_dir / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the run died after its last checkpoint, before its summary: finish it
    if not isinstance(summary, dict) or summary.get("optimizer_steps") != step:
        return None
    log.info(
        f"{run_dir} is a complete run ({step} optimizer steps, its checkpoint {resumed.name} and {path.name}): nothing "
        "to train, no file changed. HINT: raise --train.epochs or --train.max_steps to train on, or pass another --run.dir "
        "(or --ckpt.resume never) to train again."
    )
    return summary
