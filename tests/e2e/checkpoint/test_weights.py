"""Pretrained weights at 2 FSDP ranks: each rank reads only its shards of a sharded Hugging Face
directory (counted), and the model is bitwise the one from_pretrained builds."""

from __future__ import annotations

import json
import subprocess
import sys

from distrib.parallel.wrap import params_sha256
from tests.helpers import REPO, child_env
from tests.unit.checkpoint.test_weights import saved_gpt2


def test_each_fsdp_rank_reads_only_its_shards_and_the_model_is_from_pretrained_bitwise(tmp_path):
    sizes = {"n_layer": 4, "n_embd": 64, "vocab_size": 512}
    source = saved_gpt2(tmp_path / "hf", **sizes)
    file_bytes = sum(t.numel() * t.element_size() for n, t in source.state_dict().items() if n != "lm_head.weight")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "tests/weights_job.py")]
    cmd += ["--run.dir", str(tmp_path / "run"), "--dist.strategy", "fsdp", "--wandb.mode", "disabled", "--ckpt.init_from", str(tmp_path / "hf")]
    env = child_env(PYTHONPATH=str(REPO), OUT=str(tmp_path / "out"), GPT2=json.dumps(sizes))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["params"] == params_sha256(source)
        assert r["bytes_read"] <= 0.6 * file_bytes, r["bytes_read"] / file_bytes  # its shard of each tensor, ~0.5x
    assert sum(r["bytes_read"] for r in ranks) >= file_bytes  # between them, every byte (rows split unevenly round up)
