"""`fit()` and `main()`: the two ways in for a script.

Lifecycle: config -> Session (process group, device, signals) -> Trainer.fit -> teardown, which
(writer and tracker close, DDP release, destroy_process_group) happens on success and on error.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

from distrib.config import Config, config_class, config_help, parse_config
from distrib.data.accumulate import ItemCounter
from distrib.errors import ConfigError, DistribError, error_exit
from distrib.loop.callbacks import Callback
from distrib.loop.loss import LossFn, StepFn
from distrib.loop.session import Session
from distrib.loop.trainer import Trainer
from distrib.runtime.stop import EXIT_STOPPED

F = TypeVar("F", bound=Callable[..., Any])


def _names_unknown_arguments(fn: F) -> F:
    """A misspelt keyword (`colate_fn=`) is a ConfigError naming the nearest argument, not a bare TypeError.

    The signature stays `fn`'s (`functools.wraps`), so type checkers and editors see every argument.
    """
    accepted = [name for name in inspect.signature(fn).parameters if name != "cfg"]

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for name in kwargs:
            if name not in accepted:
                close = difflib.get_close_matches(name, accepted, n=1)
                raise ConfigError(
                    f"{fn.__name__}() got an unknown argument {name!r}.{f' Did you mean {close[0]!r}?' if close else ''} "
                    f"HINT: {fn.__name__} takes {', '.join(accepted)}."
                )
        return fn(*args, **kwargs)

    return checked  # type: ignore[return-value]


@_names_unknown_arguments
def fit(
    cfg: Config,
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
) -> dict[str, Any]:
    """Train `model` on `train_data` and return the summary (what summary.json holds).

    Runs unchanged under `python`, `torchrun` and `srun`: the launcher is detected from the
    environment. Without `optimizer`, one is built from the config's `optim` section (with its
    schedule). `loss_fn(outputs, labels)` or `step_fn(model, batch) -> loss | (loss, metrics)`
    replace the default loss (a dict batch's model output `.loss`, else cross-entropy); `items`
    counts what the loss averages over (`distrib.label_tokens`); `tokens_per_sample` and
    `flops_per_sample` add tokens/s and MFU to the log. The arguments are `Trainer`'s.
    """
    with Session(cfg) as session:
        trainer = Trainer(
            session,
            model=model,
            train_data=train_data,
            eval_data=eval_data,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            step_fn=step_fn,
            collate_fn=collate_fn,
            items=items,
            callbacks=callbacks,
            tokens_per_sample=tokens_per_sample,
            flops_per_sample=flops_per_sample,
        )
        return trainer.fit()


def main(
    train: Callable[[Config], Mapping[str, Any] | int | None],
    *,
    sections: Mapping[str, type] | None = None,
    defaults: Mapping[str, Any] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """A script's command line: parse the config (`--help` lists every key), run `train(cfg)`, return the exit status.

    `sys.exit(distrib.main(train, sections={"model": ModelConfig}, defaults={"train.epochs": 10}))`.
    Exit statuses as for `python -m distrib.train`: 0 done, 1 a failure (a peer died), 2 bad input
    (`distrib: error: ...`, nothing written), 75 stopped by a signal with a checkpoint. `train` may
    return an exit status itself (`distrib.EXIT_STOPPED`), or the summary or nothing: then 75 if its
    `Session` ended in a graceful stop (or the summary says `"stopped": True`), else 0.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if "-h" in args or "--help" in args:
            parse_config([], sections=sections, defaults=defaults)  # the script's own sections and defaults must be valid too
            print(config_help(config_class(sections), defaults=defaults))
            return 0
        summary = train(parse_config(args, sections=sections, defaults=defaults))
    except DistribError as exc:
        return error_exit(exc)
    if isinstance(summary, int) and not isinstance(summary, bool):
        return summary
    # The session records a graceful stop as the run's exit status; a script's own loop may also say
    # so in the summary it returns.
    stopped = Session.last_exit_status == EXIT_STOPPED or (isinstance(summary, Mapping) and summary.get("stopped") is True)
    return EXIT_STOPPED if stopped else 0
