"""Checkpoint storage: atomic writes, manifest last, corrupted/truncated newest -> previous one."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from distrib.checkpoint import fileio
from distrib.checkpoint import store as ck
from distrib.checkpoint.fileio import save_torch, write_atomic
from distrib.errors import StorageError


def _save(root, step: int, *, world: int = 2, keep: int = 3, value: float = 0.0):
    staging = ck.begin(root, step)
    save_torch(staging / "state.pt", {"step": step, "w": torch.full((256,), value)})
    for r in range(world):
        save_torch(staging / f"rank-{r:05d}.pt", {"rng": torch.get_rng_state(), "rank": r})
    return ck.commit(root, step, world_size=world, keep=keep)


def _state(path) -> dict:
    return torch.load(path / "state.pt", weights_only=False)


def test_save_verify_and_keep_the_last_n(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep=2, value=step)
    assert [p.name for p in ck.candidates(tmp_path)] == ["step-000000040", "step-000000030"]
    path, manifest = ck.newest_good(tmp_path)
    assert manifest["step"] == 40 and manifest["world_size"] == 2
    assert set(manifest["files"]) == {"state.pt", "rank-00000.pt", "rank-00001.pt"}
    assert _state(path)["w"][0].item() == 40.0


def test_the_checksum_taken_while_writing_is_the_files_and_sha256_manifests_still_verify(tmp_path):
    # The manifest takes the CRC-32 computed as the bytes stream to disk (no re-read): it must be the
    # file's own, or every async checkpoint would fail verification on resume.
    staging = ck.begin(tmp_path, 10)
    state = {"w": torch.randn(1000, 300), "opt": {"exp_avg": torch.randn(777)}, "step": 10}
    digests = {"state.pt": save_torch(staging / "state.pt", state), "rank-00000.pt": save_torch(staging / "rank-00000.pt", {"rank": 0})}
    assert digests["state.pt"] == ck._crc32(staging / "state.pt") and digests["state.pt"] != digests["rank-00000.pt"]
    path = ck.commit(tmp_path, 10, world_size=1, keep=3, digests=digests)
    manifest = ck.verify(path)
    assert {k: v["crc32"] for k, v in manifest["files"].items()} == digests
    # A checkpoint from before (sha256 in its manifest) verifies, and a wrong sha256 is caught.
    for entry in manifest["files"].values():
        del entry["crc32"]
    manifest["files"]["state.pt"]["sha256"] = ck._sha256(path / "state.pt")
    manifest["files"]["rank-00000.pt"]["sha256"] = ck._sha256(path / "rank-00000.pt")
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    assert ck.verify(path)["step"] == 10
    manifest["files"]["state.pt"]["sha256"] = "0" * 64
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ck.CheckpointError, match="fails its sha256"):
        ck.verify(path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_file", "delete_manifest"])
def test_broken_newest_falls_back_to_the_previous_and_says_so(tmp_path, caplog, monkeypatch, damage):
    _save(tmp_path, 10, value=1.0)
    newest = _save(tmp_path, 20, value=2.0)
    f = newest / "state.pt"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "delete_file":
        f.unlink()
    else:
        (newest / ck.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="distrib"):
        monkeypatch.setattr(logging.getLogger("distrib"), "propagate", True)
        path, manifest = ck.newest_good(tmp_path)
    assert manifest["step"] == 10 and _state(path)["w"][0].item() == 1.0
    assert "step-000000020 is not usable" in caplog.text


class DiskFull:
    """Fails while being serialised, like a full disk would."""

    def __reduce__(self):
        raise OSError(28, "No space left on device")


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 10, value=1.0)
    staging = ck.begin(tmp_path, 20)
    save_torch(staging / "rank-00000.pt", {"rank": 0})
    with pytest.raises(StorageError, match="the disk is full writing .*state.pt .*No space left"):
        save_torch(staging / "state.pt", {"w": torch.ones(4), "bad": DiskFull()})
    assert not (staging / "state.pt").exists() and not list(staging.glob(".*.part*"))
    path, manifest = ck.newest_good(tmp_path)
    assert manifest["step"] == 10  # the staging directory of step 20 is invisible to loading


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    write_atomic(target, b"old")

    def fail_fsync(fd):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(fileio.os, "fsync", fail_fsync)
    with pytest.raises(StorageError, match="cannot write .*f.bin: I/O error"):
        write_atomic(target, b"new-and-longer")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_crash_before_commit_leaves_only_a_staging_dir(tmp_path):
    _save(tmp_path, 10)
    staging = ck.begin(tmp_path, 20)
    save_torch(staging / "state.pt", {"w": 1})  # no commit: the process "died" here
    assert [p.name for p in ck.candidates(tmp_path)] == ["step-000000010"]
    assert ck.newest_good(tmp_path)[1]["step"] == 10
    _save(tmp_path, 20)  # a later attempt cleans the stale staging directory
    assert ck.newest_good(tmp_path)[1]["step"] == 20


# ----------------------------------------------------------------------------- resume end to end
