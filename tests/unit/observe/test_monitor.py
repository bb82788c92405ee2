"""Interval metrics and stragglers (the hang watchdog: test_hang.py)."""

from __future__ import annotations

import pytest

from distrib.observe.interval import Stragglers


@pytest.mark.parametrize(
    "own, threshold, expected",
    [
        ([[0.010, 0.020]] * 3, 0.3, [None, None, 1]),  # sustained and 10 ms a step: named at the third
        ([[0.010, 0.020]] * 2 + [[0.020, 0.010]], 0.3, [None, None, None]),  # the slow rank changes: noise
        ([[0.010, 0.020], [0.020, 0.020], [0.010, 0.020]], 0.3, [None] * 3),  # one even interval resets the count
        ([[0.001, 0.002]] * 5, 0.3, [None] * 5),  # 1 ms a step: too short to matter
        ([[0.010, 0.012]] * 5, 0.3, [None] * 5),  # 17% spread: under the threshold
    ],
)
def test_a_straggler_is_named_only_when_sustained_and_long_enough(own, threshold, expected):
    watch = Stragglers(threshold)
    assert [watch.check(o) for o in own] == expected
