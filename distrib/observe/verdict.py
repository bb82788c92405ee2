"""The hang verdict: from every rank's position (`distrib/runtime/ledger.py`), which rank holds the others up.

A pure function of the ranks' reports, so each rule is tested without a hang. The rules, in order:

1. A rank waits in a collective distrib numbered, and another rank has called that line fewer times:
   that rank never entered it (it is behind, or it skipped it and went on).
2. Otherwise the ranks are at different positions (micro-batch, then phase, then collectives issued):
   those furthest back are behind, and the others wait for them.
3. Otherwise every rank is at the same place: none is behind, the collective there does not complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distrib.runtime.ledger import BACKWARD, COMPUTING, EVALUATING, FETCHING, PHASES, STARTING, STEPPING


def place(r: dict[str, Any]) -> str:
    """Where a rank is, in words."""
    step = r["step"] + 1
    inside = r.get("inside")
    where = ""
    if inside:
        where = f"in {collective(inside)}, "
    phase = r["phase"]
    if phase == FETCHING:
        what = f"fetching a batch of step {step}"
    elif phase == STEPPING:
        what = f"at or after the optimizer step of step {r['step']}"
    elif phase in (COMPUTING, BACKWARD):
        what = f"{PHASES[phase]} of step {step}"
    elif phase == EVALUATING:
        what = f"evaluating (eval batch {r['sub']}) after step {r['step']}"
    elif phase == STARTING:
        what = "before the first batch"
    else:
        what = f"{PHASES[phase]} after step {r['step']}"
    return where + what


def collective(inside: dict[str, Any]) -> str:
    """`all_reduce #12 (shapes 4x1; train.py:40 main)`: a numbered collective, in words."""
    shapes = f"shapes {inside['shapes']}; " if inside["shapes"] != "object" else ""
    return f"{inside['op']} #{inside['seq']} ({shapes}{inside['site']})"


def frame_of(r: dict[str, Any]) -> str:
    """The rank's innermost frame in user code (a DataLoader worker's where the rank waits for one)."""
    if r.get("worker_frame"):
        return f"{r['worker_frame']} (DataLoader worker pid {r['worker_pid']})"
    return r.get("frame") or "an unknown frame"


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _is(ranks: Sequence[int]) -> str:
    return "is" if len(ranks) == 1 else "are"


def verdict(reports: Sequence[dict[str, Any]]) -> tuple[str, list[int]]:
    """One paragraph (which rank is behind and where it is, then one line per rank) and the ranks it names."""
    reports = sorted(reports, key=lambda r: r["rank"])
    head, names = _skipped(reports) or _behind(reports) or _same_place(reports)
    lines = [head] + [f"  rank {r['rank']}: {frame_of(r)}: {place(r)}" for r in reports]
    return "\n".join(lines), names


def _waiting_in_numbered(reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in reports if r.get("inside") and not r["inside"]["op"].endswith("(async)")]


def _missing(reports: Sequence[dict[str, Any]], waiting: dict[str, Any]) -> list[dict[str, Any]]:
    """The ranks that called `waiting`'s collective line fewer times than it has."""
    site = waiting["inside"]["site"]
    count = waiting["sites"].get(site, 0)
    return [r for r in reports if r["sites"].get(site, 0) < count]


def _skipped(reports: Sequence[dict[str, Any]]) -> tuple[str, list[int]] | None:
    for waiting in _waiting_in_numbered(reports):
        missing = _missing(reports, waiting)
        if not missing:
            continue
        site = waiting["inside"]["site"]
        there = [r["rank"] for r in reports if r.get("inside") and r["inside"]["site"] == site]
        names, culprit = [r["rank"] for r in missing], missing[0]
        how = "skipped" if _key(culprit) > _key(waiting) else "is behind: it never entered"
        return (
            f"{_ranks(names)} {how} {collective(waiting['inside'])}, which {_ranks(there)} {_is(there)} waiting in "
            f"(rank {culprit['rank']} called that line {culprit['sites'].get(site, 0)} times, rank {waiting['rank']} {waiting['sites'][site]}). "
            f"Rank {culprit['rank']} is in {frame_of(culprit)}, {place(culprit)}."
        ), names
    return None


def _key(r: dict[str, Any]) -> tuple[int, int, int, int]:
    """Positions compare by micro-batch, then phase, then the eval batch, then collectives issued."""
    return (r["micro"], r["phase"], r["sub"], r["seq"])


def _behind(reports: Sequence[dict[str, Any]]) -> tuple[str, list[int]] | None:
    keys = {r["rank"]: _key(r) for r in reports}
    if len(set(keys.values())) < 2:
        return None
    low = min(keys.values())
    behind = [r for r in reports if keys[r["rank"]] == low]
    others = [r for r in reports if keys[r["rank"]] != low]
    names, waiting = [r["rank"] for r in behind], [r["rank"] for r in others]
    first = behind[0]
    return (
        f"{_ranks(names)} {_is(names)} behind: {_ranks(waiting)} went further ({place(others[0])}) and wait{'s' if len(waiting) == 1 else ''} for it. "
        f"Rank {first['rank']} is in {frame_of(first)}, {place(first)}."
    ), names


def _same_place(reports: Sequence[dict[str, Any]]) -> tuple[str, list[int]]:
    if len(reports) == 1:
        r = reports[0]
        return f"rank {r['rank']} made no progress: it is in {frame_of(r)}, {place(r)}.", [r["rank"]]
    return (
        f"no rank is behind: every rank is at the same place ({place(reports[0])}) and it does not complete "
        "(a collective that never finishes: the network, or a device that stopped)."
    ), []
