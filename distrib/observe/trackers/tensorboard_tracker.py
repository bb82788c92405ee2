"""`run.report_to tensorboard`: event files in run.dir/tensorboard/ (`tensorboard --logdir <run.dir>/tensorboard`).

Written with tensorboard's own event writer, not torch's SummaryWriter: this process never imports torch.
A resumed run first writes TensorBoard's purge marker (a session start at the resumed step + 1, as
SummaryWriter's `purge_step` does): TensorBoard then drops what the interrupted attempt logged past
its checkpoint, and the step axis goes on from there without a fold. Points metrics.jsonl kept that
the interrupted attempt had not written yet are written then. (The worker imports this module only
for `run.report_to tensorboard`, so its imports cost nothing otherwise.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from records import flat_config, kept_records, scalars
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from tensorboard.plugins.text.metadata import create_summary_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter

DIR = "tensorboard"


class TensorBoardTracker:
    def start(self, run: Any) -> None:
        logdir = Path(run.dir) / DIR
        if logdir.is_symlink() or (logdir.exists() and not logdir.is_dir()):
            raise RuntimeError(f"{logdir} is a link or a file that distrib did not create; it writes no events there")
        logdir.mkdir(exist_ok=True)
        # Read before this attempt's own file exists: what earlier attempts wrote.
        earlier = any(logdir.glob("events.out.tfevents.*"))
        logged = _last_steps(logdir, until=run.resumed_step) if run.resumed_step is not None else {}
        # flush_secs: TensorBoard shows a live run with at most this delay; each record is also flushed as it comes.
        self.writer = EventFileWriter(str(logdir), flush_secs=10)
        if run.resumed_step is not None:
            self.writer.add_event(Event(step=run.resumed_step + 1, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))
            for record in kept_records(run):  # what the killed attempt logged to metrics.jsonl but had not written here
                step, values = scalars(record)
                self._scalars(step, {tag: v for tag, v in values.items() if step > logged.get(tag, -1)})
        else:
            if earlier:  # a fresh start over an attempt killed before its first checkpoint: hide all it wrote
                self.writer.add_event(Event(step=0, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))
            self._text("config", "```json\n" + json.dumps(run.config, indent=2, sort_keys=True) + "\n```", step=0)
            self._hparams(run.config)
        self.writer.flush()
        print(f"tensorboard: events in {logdir} (tensorboard --logdir {logdir})", flush=True)

    def log(self, record: dict[str, Any]) -> None:
        self._scalars(*scalars(record))
        self.writer.flush()

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if values:
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
            self.writer.add_event(Event(step=step, wall_time=time.time(), summary=summary))

    def finish(self, summary: Any, outcome: str) -> None:
        if summary is not None:  # on the TEXT tab (its numbers are the last points of the scalars already)
            step = int(summary.get("optimizer_steps", 0)) if isinstance(summary, dict) else 0
            self._text("summary", "```json\n" + json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n```", step=step)
        self.writer.close()

    def _text(self, tag: str, text: str, *, step: int) -> None:
        tensor = TensorProto(dtype=7, string_val=[text.encode()], tensor_shape=TensorShapeProto())  # 7: DT_STRING
        value = Summary.Value(tag=tag, metadata=create_summary_metadata(display_name=tag, description=""), tensor=tensor)
        self.writer.add_event(Event(step=step, wall_time=time.time(), summary=Summary(value=[value])))

    def _hparams(self, config: dict[str, Any]) -> None:
        """The config on the HPARAMS tab: every key whose value is a number, a flag or text (lists as text)."""
        hparams = {k: (v if isinstance(v, (bool, int, float, str)) else json.dumps(v)) for k, v in flat_config(config).items() if v is not None}
        self.writer.add_event(Event(step=0, wall_time=time.time(), summary=hparams_pb(hparams)))


def _last_steps(logdir: Path, *, until: int) -> dict[str, int]:
    """The last step each tag was written at in `logdir`'s event files, as TensorBoard reads them (after its purges), at most `until`."""
    last: dict[str, int] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                last = {tag: min(step, event.step - 1) for tag, step in last.items()}
            for value in event.summary.value:
                last[value.tag] = max(last.get(value.tag, -1), event.step)
    return {tag: min(step, until) for tag, step in last.items()}
