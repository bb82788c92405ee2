"""`run.report_to csv`: run.dir/metrics.csv, one row per metrics.jsonl record, for a spreadsheet or pandas.

Columns are `kind`, `step`, then each key in the order it first appeared; a record with a new key
rewrites the file with the wider header (as Lightning's CSVLogger does). A resumed run rewrites the rows
from the records metrics.jsonl kept at its checkpoint, and appends from there.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from records import kept_records

FILE = "metrics.csv"
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class CsvTracker:
    def start(self, run: Any) -> None:
        self.path = Path(run.dir) / FILE
        self.columns: list[str] = ["kind", "step"]
        self.rows: list[dict[str, Any]] = []
        # A resume rebuilds the rows from the records metrics.jsonl kept: the killed attempt's CSV may lag behind them.
        for record in kept_records(run):
            row = _row(record)
            self.columns += [k for k in row if k not in self.columns]
            self.rows.append(row)
        self._rewrite()

    def log(self, record: dict[str, Any]) -> None:
        row = _row(record)
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            self._write(self._lines([row]), append=True)

    def finish(self, summary: Any, outcome: str) -> None:
        pass

    def _lines(self, rows: list[dict[str, Any]], header: bool = False) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    def _rewrite(self) -> None:
        """The whole file, written beside it and renamed over it: a reader never sees half a header."""
        tmp = self.path.with_name(f".{FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, _FLAGS | os.O_TRUNC, 0o644)
        with open(fd, "w", newline="") as f:
            f.write(self._lines(self.rows, header=True))
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            tmp.unlink()
            raise RuntimeError(f"{self.path} is a link or not a file; distrib never writes over what it did not create")
        os.replace(tmp, self.path)

    def _write(self, text: str, *, append: bool) -> None:
        fd = os.open(self.path, _FLAGS | (os.O_APPEND if append else os.O_TRUNC), 0o644)
        with open(fd, "w", newline="") as f:
            f.write(text)


def _row(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in record.items()}
