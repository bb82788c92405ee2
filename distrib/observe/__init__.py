"""What a run shows: run.dir's files written by rank 0 (`run_files.py`), exact all-reduced metrics
(`metrics.py`), the log interval's record (`interval.py`), throughput, stragglers and the hang
watchdog (`monitor.py`), wandb in its own process (`tracking.py`, `wandb_worker.py`) and the
report plot (`report.py`).

Imports: `errors`, `config`, `runtime`, `parallel`, `data`, `checkpoint` (atomic files). Never
`loop` or `cli`.
"""
