"""Asynchronous checkpoints: a snapshot later steps cannot change, the same bytes as a synchronous
save, an in-flight save that a SIGKILL interrupts is never a checkpoint, and the end waits for it."""

from __future__ import annotations

import sys

import torch

from distrib.checkpoint.background import Saver, snapshot


def test_a_snapshot_is_a_copy_that_later_steps_cannot_change():
    live = {"w": torch.ones(3), "state": {1: {"momentum": torch.zeros(2)}}, "steps": [torch.tensor(5)], "lr": 0.1}
    snap = snapshot(live)
    live["w"].add_(1)
    live["state"][1]["momentum"].add_(1)
    live["steps"][0].add_(1)
    assert snap["w"].tolist() == [1, 1, 1] and snap["state"][1]["momentum"].tolist() == [0, 0]
    assert snap["steps"][0].item() == 5 and snap["lr"] == 0.1


def test_the_save_thread_runs_at_the_lowest_cpu_priority_and_training_keeps_its_own():
    # A save's CPU (serialising, checksumming) must not take cores from the ranks: the save thread is
    # niced to 19 (per thread on Linux), the training thread is left as it was.
    import os
    import threading

    import pytest

    if sys.platform != "linux":
        pytest.skip("per-thread nice is Linux's")
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[int] = []
    saver = Saver()
    saver.submit(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    saver.wait()
    assert seen == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
