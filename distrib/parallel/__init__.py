"""How a model is spread over ranks: DDP or FSDP2 wrapping (`wrap.py`, `fsdp.py`), a meta-built
model allocated and initialised alike at any sharding (`materialize.py`), mixed precision
(`precision.py`), and the DDP communication hook that keeps a resumed run's reductions in the
uninterrupted run's order (`buckets.py`).

Imports: `errors`, `config`, `runtime`. Never `data`, `checkpoint`, `observe`, `loop` or `cli`.
"""
