"""Training: `Session`, the blocks of a loop and the public facade (`session.py`), which delegates
checkpoints to `checkpoint/checkpointer.py`, run files to `observe/run_files.py`, a graceful stop
to `stopping.py` and `--debug` to `debug.py`; `Trainer`, the loop `fit` runs (`trainer.py`,
`fit.py`), with its pre-flight checks (`preflight.py`); the loss step (`loss.py`), callbacks and
optimizers.

Imports: any layer below. Only `cli` and `distrib/__init__.py` import this one.
"""
