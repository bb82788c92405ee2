"""Training: `Session`, the blocks of a loop and the public facade (`session.py`), which delegates
checkpoints to `checkpoint/checkpointer.py`, run files to `observe/run_files.py`, a graceful stop
to `stopping.py` and `--debug` to `debug.py`; `Trainer`, the loop `fit` runs (`trainer.py`,
`fit.py`), with its pre-flight checks (`preflight.py`) and eval loop (`evaluation.py`); the loss step
(`loss.py`), the non-finite guard every optimizer step goes through (`guard.py`), callbacks and optimizers.

Imports: any layer below. Only `cli` and `distrib/__init__.py` import this one.
"""
