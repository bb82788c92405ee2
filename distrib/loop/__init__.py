"""Training: `Session`, the blocks of a loop and the public facade (`session.py`); `Trainer`,
the loop `fit` runs (`trainer.py`, `fit.py`); the loss step (`loss.py`), callbacks and optimizers.

Imports any layer below. Only `cli` and `distrib/__init__.py` import this one.
"""
