"""The hang verdict's rules on made-up positions, and what a rank reports about itself (no launches:
the real hangs are in tests/e2e/observe/test_hang.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.data._utils import fetch

from distrib import Config, Session
from distrib.data.workers import _innermost_user_frame
from distrib.observe.hang import Watchdog, report
from distrib.observe.verdict import verdict
from distrib.runtime import stop
from distrib.runtime.ledger import BACKWARD, COMPUTING, EVALUATING, FETCHING, LEDGER, STEPPING, Ledger


def _rank(rank: int, *, micro: int = 3, phase: int = BACKWARD, sub: int = 0, step: int = 2, frame: str = "train.py:10 main", **extra: Any) -> dict[str, Any]:
    return {"rank": rank, "micro": micro, "phase": phase, "sub": sub, "step": step, "seq": 4, "inside": None, "sites": {}, "frame": frame, **extra}


def _inside(seq: int, site: str = "train.py:40 main", op: str = "all_reduce") -> dict[str, Any]:
    return {"seq": seq, "op": op, "shapes": "1", "site": site}


def test_a_rank_still_fetching_its_batch_is_behind_those_in_the_backward():
    text, names = verdict([_rank(0), _rank(1, phase=FETCHING, frame="data.py:41 __getitem__")])
    assert names == [1]
    head = text.splitlines()[0]
    assert head.startswith("rank 1 is behind: rank 0 went further (backward of step 3)"), head
    assert "Rank 1 is in data.py:41 __getitem__, fetching a batch of step 3." in head


def test_a_rank_that_called_a_collective_line_fewer_times_skipped_it():
    site = "train.py:40 main"
    waiting = [_rank(r, phase=STEPPING, inside=_inside(9, site), sites={site: 5}) for r in (0, 2, 3)]
    went_on = _rank(1, micro=4, phase=BACKWARD, sites={site: 4}, frame="train.py:31 main")
    text, names = verdict([*waiting, went_on])
    assert names == [1]
    head = text.splitlines()[0]
    assert head.startswith("rank 1 skipped all_reduce #9 (shapes 1; train.py:40 main), which ranks 0, 2, 3 are waiting in"), head
    assert "rank 1 called that line 4 times, rank 0 5" in head and "Rank 1 is in train.py:31 main" in head
    # Behind rather than past it: the same line, not reached yet.
    _, names = verdict([waiting[0], _rank(1, micro=3, phase=COMPUTING, sites={site: 4})])
    assert names == [1]
    assert "is behind: it never entered all_reduce #9" in verdict([waiting[0], _rank(1, micro=3, phase=COMPUTING, sites={site: 4})])[0]


def test_the_eval_batch_and_then_the_collectives_issued_order_ranks_at_one_phase():
    _, names = verdict([_rank(0, phase=EVALUATING, sub=7), _rank(1, phase=EVALUATING, sub=6), _rank(2, phase=EVALUATING, sub=7)])
    assert names == [1]
    a, b = _rank(0, phase=STEPPING), _rank(1, phase=STEPPING)
    a["seq"] = 5
    assert verdict([a, b])[1] == [1]


def test_ranks_all_in_the_same_collective_name_no_culprit():
    site = "train.py:40 main"
    text, names = verdict([_rank(r, inside=_inside(9, site), sites={site: 5}) for r in range(3)])
    assert names == [] and text.startswith("no rank is behind: every rank is at the same place (in all_reduce #9"), text


def test_a_worker_frame_is_named_with_its_pid_and_one_rank_names_itself():
    r = _rank(0, phase=FETCHING, worker_frame="data.py:41 __getitem__", worker_pid=77)
    text, names = verdict([r])
    assert names == [0]
    assert text.startswith("rank 0 made no progress: it is in data.py:41 __getitem__ (DataLoader worker pid 77), fetching a batch of step 3."), text


def test_collectives_are_numbered_with_their_op_shapes_and_the_callers_line():
    ledger = Ledger()
    for _ in range(2):
        with ledger.collective("all_reduce", torch.zeros(4, 1)):
            inside = ledger.inside
    assert inside is not None and inside.seq == 2 and inside.shapes == "4x1" and inside.op == "all_reduce"
    assert inside.site.startswith("test_hang.py:") and inside.site.endswith(" test_collectives_are_numbered_with_their_op_shapes_and_the_callers_line")
    assert ledger.inside is None and ledger.sites == {inside.site: 2}


def test_busy_phases_nest_and_decorate():
    ledger = Ledger()

    @ledger.busy_with("saving a checkpoint")
    def save() -> str | None:
        with ledger.busy_with("inner"):
            return ledger.busy

    assert save() == "saving a checkpoint" and ledger.busy is None


def test_the_loop_moves_the_ledger_through_its_phases(tmp_path):
    cfg = Config().replace(**{"run.dir": str(tmp_path / "run"), "run.device": "cpu", "train.batch_size": 4, "train.grad_accum": 2})
    model = nn.Linear(3, 2)
    seen = []
    with Session(cfg) as session:
        model, optimizer = session.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
        train = session.train_loader(TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,))))
        for mb in train:
            seen.append((LEDGER.micro, LEDGER.phase))
            session.backward(F.cross_entropy(model(mb.batch[0]), mb.batch[1]) * mb.weight)
            seen.append((LEDGER.micro, LEDGER.phase))
            if mb.last:
                session.step(optimizer)
                seen.append((LEDGER.step, LEDGER.phase))
    assert seen[:5] == [(1, COMPUTING), (1, COMPUTING), (2, COMPUTING), (2, COMPUTING), (1, STEPPING)], seen
    assert LEDGER.step == 2 and LEDGER.micro == 4


def _stuck_here(release: threading.Event) -> None:
    release.wait(10)


def test_a_rank_reports_its_main_threads_innermost_frame_of_user_code():
    release, got = threading.Event(), {}

    def watch() -> None:
        time.sleep(0.2)  # the main thread is in _stuck_here by now
        got.update(report(0, 12.0))
        release.set()

    thread = threading.Thread(target=watch)
    thread.start()
    _stuck_here(release)
    thread.join()
    assert got["frame"].startswith("test_hang.py:") and got["frame"].endswith(" _stuck_here"), got["frame"]
    assert any("_stuck_here" in line for line in got["threads"]) and got["stalled_s"] == 12.0


def test_a_workers_faulthandler_dump_names_its_innermost_user_frame():
    dump = f"""Thread 0x00007f (most recent call first):
  File "{threading.__file__}", line 320 in wait
  File "{stop.__file__}", line 130 in _obey

Current thread 0x00007e (most recent call first):
  File "/home/me/project/my_dataset.py", line 41 in __getitem__
  File "{fetch.__file__}", line 52 in fetch
"""
    assert _innermost_user_frame(dump) == "my_dataset.py:41 __getitem__"


def _watchdog(tmp_path, ledger: Ledger) -> tuple[Watchdog, list[int]]:
    exits: list[int] = []
    dog = Watchdog(2.0, ledger, exit=exits.append)
    hang = tmp_path / "hang-x"
    hang.mkdir()
    # One process: no store, no thread (ticks are driven by hand); exit is recorded, not taken.
    dog.rank, dog.world_size, dog._hang_dir, dog._last_good = 0, 1, lambda: hang, lambda: "/ckpt/step-000000008"
    return dog, exits


def test_a_stalled_single_process_says_where_it_is_once_and_keeps_waiting(tmp_path, caplog):
    ledger = Ledger()
    dog, exits = _watchdog(tmp_path, ledger)
    ledger.at(FETCHING)
    ledger.moved -= 3.0  # no progress for 3 s > hang_timeout_s 2
    dog._tick()
    dog._tick()
    assert exits == []  # no peer waits for it; a debugger's breakpoint looks the same
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[watchdog] rank 0 made no progress")]
    assert len(said) == 1 and f"Its stacks are in {tmp_path / 'hang-x'}/" in said[0], caplog.text
    assert said[0].startswith("[watchdog] rank 0 made no progress: it is in test_hang.py:")
    assert (tmp_path / "hang-x" / "verdict.txt").read_text().startswith("rank 0 made no progress")
    assert (tmp_path / "hang-x" / "rank-00000.txt").read_text().startswith("rank 0: test_hang.py:")  # then the other threads' stacks
    ledger.beat()
    dog._tick()  # it moved: the next stall is said again
    assert not dog._published and not dog._complete_once


def test_a_busy_phase_or_recent_progress_is_no_stall(tmp_path):
    ledger = Ledger()
    dog, exits = _watchdog(tmp_path, ledger)
    ledger.moved -= 1.0
    dog._tick()  # 1 s < 2 s
    with ledger.busy_with("saving a checkpoint"):
        ledger.moved -= 10.0
        dog._tick()  # a save that takes long is progress
    assert exits == [] and not list((tmp_path / "hang-x").iterdir())


def test_a_torch_compile_in_progress_is_a_busy_phase():
    seen: list[str | None] = []

    def backend(gm: torch.fx.GraphModule, _: Any) -> Any:
        seen.append(LEDGER.busy)  # dynamo is compiling now
        return gm.forward

    LEDGER.reset()
    LEDGER.track_compiles()
    torch.compile(lambda x: torch.sin(x) + 1, backend=backend)(torch.ones(3))
    assert seen == ["compiling (torch.compile)"] and LEDGER.busy is None


def test_setting_up_a_model_is_a_busy_phase(tmp_path):
    seen: list[str | None] = []

    def init_fn(module: nn.Module) -> None:  # called by setup while it initialises a meta-built model
        seen.append(LEDGER.busy)
        if isinstance(module, nn.Linear):
            module.reset_parameters()

    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with Session(Config().replace(**{"run.dir": str(tmp_path / "run"), "run.device": "cpu"})) as session:
        session.setup(model, init_fn=init_fn)
        assert LEDGER.busy is None
    assert seen == ["setting up the model"]
