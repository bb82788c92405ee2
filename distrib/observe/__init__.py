"""What a run shows: run.dir's files written by rank 0 (`run_files.py`), exact all-reduced metrics
(`metrics.py`), the log interval's record, throughput and stragglers (`interval.py`), peak memory
and the progress bar (`monitor.py`), the hang watchdog (`hang.py`) and its verdict (`verdict.py`), the trackers in their own process (`trackers/`), train.profile's traces (`profile.py`) and the report plot
(`report.py`).

Imports: `errors`, `config`, `runtime`, `parallel`, `data`, `checkpoint` (atomic files, the run
directory's lock). Never `loop` or `cli`.
"""
