"""The language-model examples at their CI size on 2 gloo ranks under torchrun: they learn, and their
files are what a user loads without distrib."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, child_env, read_metrics, read_summary


def _torchrun(script: str, run_dir, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "examples" / script),
        "--run.dir",
        str(run_dir),
        "--wandb.mode",
        "disabled",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_gpt_on_the_standard_library_beats_a_byte_unigram_model_by_far(tmp_path):
    out = _torchrun("gpt.py", tmp_path / "gpt")
    s = read_summary(tmp_path / "gpt")
    assert s["world_size"] == 2 and s["optimizer_steps"] == 300
    baseline = float(out.stdout.split("a byte-unigram model: ")[1].split()[0])
    assert 2.8 < baseline < 3.4, baseline  # Python source: about 3 nats per byte without context
    assert s["eval"]["loss"] < baseline - 0.45, (s["eval"], baseline)  # 2.60 vs 3.15 here: perplexity 13.5 vs 23
    assert s["eval"]["perplexity"] == pytest.approx(torch.tensor(s["eval"]["loss"]).exp().item(), rel=1e-6)
    train = [r for r in read_metrics(tmp_path / "gpt") if r["kind"] == "train"]
    assert train[-1]["tokens"] == 25 * 2 * 16 * 64  # every byte of the interval counted once: steps x ranks x batch x context
    lrs = [r["lr"] for r in train]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1] / 10  # warm-up, then the cosine decay
    config = json.loads((tmp_path / "gpt" / "config.json").read_text())
    assert config["optim"]["schedule"] == "cosine" and config["gpt"]["context"] == 64


def test_gpt_streamed_or_with_activation_checkpointing_is_the_same_run(tmp_path):
    """--gpt.stream: an IterableDataset over the files, read by 2 DataLoader workers per rank; in corpus
    order it is the same run as the map-style windows in corpus order. With dropout on, bf16 and
    accumulation, train.activation_checkpointing full (with the stream) and selective recompute the
    blocks in backward with the same dropout masks: the same parameters, bitwise."""
    args = ["--data.shuffle", "false", "--train.max_steps", "8", "--train.log_every", "4", "--gpt.corpus_mb", "0.2"]
    args += ["--gpt.dropout", "0.1", "--train.precision", "bf16", "--train.grad_accum", "2"]
    _torchrun("gpt.py", tmp_path / "windows", *args)
    _torchrun("gpt.py", tmp_path / "stream", *args, "--gpt.stream", "true", "--data.num_workers", "2", "--train.activation_checkpointing", "full")
    _torchrun("gpt.py", tmp_path / "selective", *args, "--train.activation_checkpointing", "selective")
    windows, stream, selective = (read_summary(tmp_path / d) for d in ("windows", "stream", "selective"))
    assert stream["optimizer_steps"] == 8 and stream["samples_seen"] == 8 * 2 * 2 * 16
    assert stream["params_sha256"] == windows["params_sha256"] == selective["params_sha256"]
    config = json.loads((tmp_path / "selective" / "config.json").read_text())
    assert config["train"]["activation_checkpointing"] == "selective" and config["gpt"]["dropout"] == 0.1


def test_hf_gpt2_trains_with_no_glue_and_its_model_pt_loads_into_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    _torchrun("hf_gpt2.py", tmp_path / "hf", "--train.max_steps", "60", "--train.log_every", "20")
    s = read_summary(tmp_path / "hf")
    # An untrained model scores ln 256 = 5.55 nats per byte; 60 steps take it to about 3.2.
    assert s["optimizer_steps"] == 60 and s["eval"]["loss"] < 4.0, s["eval"]
    train = [r for r in read_metrics(tmp_path / "hf") if r["kind"] == "train"]
    assert train[0]["loss"] > train[-1]["loss"] and train[-1]["tokens"] == 20 * 2 * 16 * 63  # shifted labels: 63 a row
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from hf_gpt2 import HFGPT2Config, gpt2_config
    finally:
        sys.path.pop(0)
    model = transformers.GPT2LMHeadModel(gpt2_config(HFGPT2Config()))
    state = torch.load(tmp_path / "hf" / "model.pt", weights_only=True)
    model.load_state_dict(state)  # strict: every key, every shape
    ids = torch.arange(64).unsqueeze(0)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)

    # The run as a Hugging Face model, then fine-tuned for 6 steps two ways: meta-built under FSDP from ckpt.init_from
    # (each rank reading its shards), and from_pretrained under DDP. They end alike.
    from distrib.cli.export import main as export

    assert export([str(tmp_path / "hf"), "--format", "hf", "--out", str(tmp_path / "pretrained"), "--max-shard-size", "100KB"]) == 0
    pretrained = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "pretrained")
    assert all(torch.equal(pretrained.state_dict()[k], v) for k, v in state.items())
    more = ["--train.max_steps", "6", "--train.log_every", "3", "--gpt2.corpus_mb", "0.2"]
    _torchrun("hf_gpt2.py", tmp_path / "fsdp", *more, "--gpt2.meta", "true", "--dist.strategy", "fsdp", "--ckpt.init_from", str(tmp_path / "pretrained"))
    _torchrun("hf_gpt2.py", tmp_path / "ddp", *more, "--gpt2.pretrained", str(tmp_path / "pretrained"))
    fsdp, ddp = (torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("fsdp", "ddp"))
    assert max((fsdp[k] - v).abs().max().item() for k, v in ddp.items()) <= 1e-5
    assert any(not torch.equal(ddp[k], v) for k, v in state.items())  # they did train on from the pretrained weights
    # The FSDP run's own checkpoint (2 ranks' shards) exported as a Hugging Face model: from_pretrained gives
    # bitwise the logits of its model.pt.
    assert export([str(tmp_path / "fsdp"), "--format", "hf", "--out", str(tmp_path / "finetuned")]) == 0
    finetuned = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "finetuned").eval()
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_pretrained(tmp_path / "finetuned")).eval()
    reference.load_state_dict(fsdp)
    with torch.no_grad():
        assert torch.equal(finetuned(ids).logits, reference(ids).logits)
