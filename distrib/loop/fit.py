"""`fit()` and `main()`: the two ways in for a script.

Lifecycle: config -> Session (process group, device, signals) -> Trainer.fit -> teardown, which
(writer and tracker close, DDP release, destroy_process_group) happens on success and on error.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from distrib.config import Config, config_class, config_help, parse_config
from distrib.errors import ConfigError, DistribError
from distrib.loop.session import Session
from distrib.loop.trainer import Trainer
from distrib.runtime.stop import EXIT_STOPPED


def fit(cfg: Config, **trainer_args: Any) -> dict[str, Any]:
    """Train `model` on `train_data` and return the summary (the keyword arguments are `Trainer`'s).

    model, train_data (required); eval_data, optimizer, scheduler, loss_fn, step_fn, collate_fn,
    items, callbacks, tokens_per_sample, flops_per_sample. Runs unchanged under `python`,
    `torchrun` and `srun`: the launcher is detected from the environment.
    """
    accepted = [p for p in inspect.signature(Trainer.__init__).parameters if p not in ("self", "session")]
    for name in trainer_args:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            raise ConfigError(f"fit() got an unknown argument {name!r}.{f' Did you mean {close[0]!r}?' if close else ''} "
                              f"HINT: fit takes {', '.join(accepted)}.")
    with Session(cfg) as session:
        return Trainer(session, **trainer_args).fit()


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
        print(f"distrib: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if isinstance(summary, int) and not isinstance(summary, bool):
        return summary
    stopped = (isinstance(summary, Mapping) and summary.get("stopped")) or Session.last_exit_status == EXIT_STOPPED
    return EXIT_STOPPED if stopped else 0
