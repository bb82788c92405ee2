"""Batches: the seeded samplers (`sampling.py`), DataLoader workers that ignore stop signals
(`workers.py`), micro-batches and exact accumulation counts (`accumulate.py`), the train and eval
loaders (`loaders.py`) and the ones a config asks for (`build.py`), resumable streams (`stream.py`) and host-to-device copies (`transfer.py`).

Imports: `errors`, `config`, `runtime`. Never `parallel`, `checkpoint`, `observe`, `loop` or `cli`.
"""
