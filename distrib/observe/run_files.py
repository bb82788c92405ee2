"""Rank-0 effects behind one switch: the real writer of run.dir's files on rank 0, a null one elsewhere."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distrib.checkpoint.fileio import check_own, open_own, save_torch, storage_error, write_atomic
from distrib.checkpoint.rundir import CONFIG_FILE, HF_CONFIG_FILE, METRICS_FILE, MODEL_FILE, SUMMARY_FILE, RunLock
from distrib.config import Config
from distrib.observe.trackers import process as trackers
from distrib.runtime.console import log
from distrib.runtime.stop import STOPPED_FILE

_HINT = "HINT: remove it from run.dir, or pass another --run.dir."


class RunWriter:
    """Rank 0's files in run.dir: metrics.jsonl, config.json, summary.json."""

    def __init__(self, run_dir: str | Path, *, fresh: bool, tracker: Any = None, start_tracker: Callable[[], Any] | None = None) -> None:
        self.dir = Path(run_dir)
        self.tracker = tracker  # distrib.observe.trackers.process.Tracker: run.report_to's, on rank 0, or None
        # Started at the first metrics line, so a run that never logs (only checkpoints) starts no tracker.
        self._start_tracker = start_tracker
        check_own(self.dir / STOPPED_FILE, _HINT)  # removed below: only if it is distrib's own file
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / STOPPED_FILE).unlink(missing_ok=True)  # this run is under way again
        except OSError as exc:
            raise storage_error(self.dir / STOPPED_FILE, exc) from None
        # A fresh run starts a new metrics file; a resumed one appends to its own history (after `rewind`).
        self._metrics = open_own(self.dir / METRICS_FILE, append=not fresh, hint=_HINT)
        self.lines = 0
        """Lines in metrics.jsonl: a checkpoint records it, and a resume keeps that many (`rewind`)."""

    def metrics(self, record: dict[str, Any]) -> None:
        # One unbuffered write() of the whole line on an O_APPEND file: a kill leaves whole lines, or
        # at worst one torn last line, which `rewind` and `distrib report` drop.
        try:
            self._metrics.write((json.dumps(record) + "\n").encode())
        except OSError as exc:
            raise storage_error(self.dir / METRICS_FILE, exc) from None
        self.lines += 1
        if self.tracker is None and self._start_tracker is not None:
            self.tracker, self._start_tracker = self._start_tracker(), None
        if self.tracker is not None:
            self.tracker.log(record)

    def rewind(self, *, lines: int | None, step: int) -> None:
        """On resume, keep the lines written before the checkpoint (`lines` of them; or, for a checkpoint
        that did not record it, the lines up to `step`): the resumed run logs the rest again."""
        self._metrics.close()
        path = self.dir / METRICS_FILE
        kept, dropped = [], 0
        for i, line in enumerate(read_lines(path)):
            if line is None:
                dropped += 1
            elif (i < lines) if lines is not None else line.get("step", 0) <= step:
                kept.append(line)
        if dropped:
            log.warning(f"{path}: dropped {dropped} torn or unreadable line(s) (a crash mid-write)")
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._metrics = open_own(path, append=True, hint=_HINT)
        self.lines = len(kept)

    def json(self, name: str, obj: Any) -> None:
        write_atomic(self.dir / name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
        if name == SUMMARY_FILE and self.tracker is not None:
            self.tracker.summary(obj)

    def save_model(self, state_dict: dict[str, Any]) -> None:
        """model.pt: the plain state_dict (no `module.` prefixes), written atomically."""
        save_torch(self.dir / MODEL_FILE, state_dict)

    def close(self, outcome: str = "finished") -> None:
        """Close metrics.jsonl, and end the trackers' run as `finished`, `stopped` or `failed`."""
        self._metrics.close()
        if self.tracker is not None:
            self.tracker.finish(outcome)


class NullWriter(RunWriter):
    """What every rank but 0 gets: the same interface, no effects."""

    def __init__(self) -> None:  # noqa: D107 - deliberately skips the parent's file creation
        self.tracker = None
        self.lines = 0

    def metrics(self, record: dict[str, Any]) -> None:
        pass

    def json(self, name: str, obj: Any) -> None:
        pass

    def rewind(self, *, lines: int | None, step: int) -> None:
        pass

    def save_model(self, state_dict: dict[str, Any]) -> None:
        pass

    def close(self, outcome: str = "finished") -> None:
        pass


def read_lines(path: Path) -> list[dict[str, Any] | None]:
    """metrics.jsonl's records, None for a line that is not a JSON object (torn by a crash, or garbage)."""
    if not path.is_file():
        return []
    out: list[dict[str, Any] | None] = []
    for raw in path.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:  # includes UnicodeDecodeError
            record = None
        out.append(record if isinstance(record, dict) else None)
    return out


def writer_for(rank: int, run_dir: str | Path, *, fresh: bool, start_tracker: Callable[[], Any] | None = None) -> RunWriter:
    return RunWriter(run_dir, fresh=fresh, start_tracker=start_tracker) if rank == 0 else NullWriter()


class RunFiles:
    """A session's run directory: opened at its first effect (`Session.open_run_files`), closed at its end.

    Opening takes rank 0's lock on run.dir, writes config.json, rewinds metrics.jsonl to a resumed
    checkpoint, and fixes the tracker's run id; the tracker itself starts with the first metrics line.
    """

    def __init__(self, cfg: Config, lock: RunLock) -> None:
        trackers.check(cfg)  # on every rank, before anything is written: a tracker that cannot start is exit 2
        self.cfg, self._lock = cfg, lock
        self._writer: RunWriter | None = None
        self.run_id: str | None = None
        """The tracker's run id: fixed at open (or by a resume) and checkpointed, so a resumed run continues it."""
        self.hf_config: dict[str, Any] | None = None
        """A Hugging Face model's config (`record_hf_config`), written as hf_config.json when the files open."""
        self.rewind: tuple[int | None, int] | None = None
        """(metrics lines, step) of the checkpoint a resume restored: metrics.jsonl is cut back to it at open."""

    @property
    def opened(self) -> bool:
        return self._writer is not None

    def open(self, rank: int, *, fresh: bool) -> RunWriter:
        """The writer (a null one on ranks other than 0), opened on the first call."""
        if self._writer is None:
            cfg = self.cfg
            if rank == 0:
                self._lock.acquire()  # already held when a resume came first
            self.run_id = self.run_id or secrets.token_hex(4)
            run_id, resumed = self.run_id, self.rewind
            self._writer = writer_for(rank, cfg.run.dir, fresh=fresh, start_tracker=lambda: trackers.start(cfg, run_id=run_id, resumed=resumed))
            if self.rewind is not None:
                self._writer.rewind(lines=self.rewind[0], step=self.rewind[1])
            self._writer.json(CONFIG_FILE, cfg.to_dict())
            if self.hf_config is not None:
                self._writer.json(HF_CONFIG_FILE, self.hf_config)
        return self._writer

    def record_hf_config(self, model: Any) -> None:
        """Keep `model`'s Hugging Face config, if it has one (written with the run's files, now if they are open)."""
        config = getattr(model, "config", None)
        if config is None or not (hasattr(config, "to_json_string") and hasattr(config, "model_type")):
            return
        self.hf_config = json.loads(config.to_json_string())
        if self._writer is not None:
            self._writer.json(HF_CONFIG_FILE, self.hf_config)

    def hang_dir(self) -> Path:
        """Rank 0: a new `run.dir/hang-<time>/` for the hang watchdog's verdict and stacks."""
        self._lock.acquire()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(100):
            path = Path(self.cfg.run.dir) / (f"hang-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir()  # never an existing directory (or a planted link): one of our own
                return path
            except FileExistsError:
                continue
            except OSError as exc:
                raise storage_error(path, exc) from None
        raise storage_error(path, FileExistsError(17, "every hang directory name of this second is taken"))

    def close(self, outcome: str = "finished") -> None:
        if self._writer is not None:
            self._writer.close(outcome)
