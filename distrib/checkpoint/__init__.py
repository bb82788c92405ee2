"""Checkpoints and the run directory: what is saved per rank and for the job (`checkpointer.py`,
used by `Session`), step directories with a manifest (`store.py`), the FSDP-sharded format
(`sharded.py`), saves in the background (`background.py`), what a resume may change (`resume.py`),
files written atomically that never follow a link distrib did not make (`fileio.py`) and the run
directory's lock (`rundir.py`). The per-rank state protocols are in `protocols.py`.

Imports: `errors`, `config`, `runtime`, `parallel`, `data`. Never `observe`, `loop` or `cli`.
"""
