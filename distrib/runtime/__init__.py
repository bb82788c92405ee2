"""The process and its place in the job: where it runs (`env.py`: one immutable `DistEnv` from
torchrun, Slurm or nothing), the process group and device (`group.py`), collectives that are no-ops
in one process (`collectives.py`), the rank's position and numbered collectives for the hang
verdict (`ledger.py`), graceful stop signals (`stop.py`), the quick exit (`shutdown.py`)
and the rank-aware console (`console.py`).

Imports: `distrib.errors`, `distrib.config`. Never `data`, `parallel`, `checkpoint`, `observe`,
`loop` or `cli`.
"""
