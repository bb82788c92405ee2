"""The logic behind the sbatch files and `distrib doctor`, from environment dicts (no cluster needed)."""

from __future__ import annotations

import json
import os

import pytest

from distrib.cli import slurm
from distrib.cli.doctor import Probes, diagnose
from distrib.runtime.stop import EXIT_STOPPED, STOPPED_FILE
from tests.helpers import REPO

ALLOC = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2"}


def test_plan_reads_the_allocation_and_keeps_a_given_run_dir():
    p = slurm.plan(["--train.epochs", "2"], {**ALLOC, "SLURM_GPUS_ON_NODE": "8"})
    assert (p.run_dir, p.nnodes, p.nproc_per_node, p.master_addr, p.master_port) == ("runs/slurm-4242", 2, 8, "gpu07", 15000 + 4242)
    assert slurm.plan(["--run.dir", "/scratch/x"], ALLOC).run_dir == "/scratch/x"
    assert slurm.plan(["--run.dir=/scratch/y"], {**ALLOC, "NPROC_PER_NODE": "3"}).run_dir == "/scratch/y"
    assert slurm.plan([], {**ALLOC, "NPROC_PER_NODE": "3"}).nproc_per_node == 3
    assert slurm.plan([], ALLOC).nproc_per_node == 1
    assert "export DISTRIB_RUN_DIR='runs/slurm-4242'" not in p.exports() and "export DISTRIB_RUN_DIR=runs/slurm-4242" in p.exports()
    with pytest.raises(slurm.ConfigError, match="inside an sbatch job"):
        slurm.plan([], {})


def test_the_prologue_outside_an_allocation_exits_2_with_the_fix(monkeypatch, capsys):
    for name in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    assert slurm.main(["prologue", "--", "--run.dir", "x"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("distrib: error: SLURM_JOB_ID/SLURM_JOB_NODELIST are not set") and "HINT: sbatch" in out.err


def _stopped(tmp_path, exit_status=EXIT_STOPPED):
    (tmp_path / STOPPED_FILE).write_text(json.dumps({"step": 8, "signal": "SIGUSR1", "exit_status": exit_status}))


def test_a_rewritten_stopped_json_is_a_new_mark(tmp_path):
    assert slurm.stop_mark(str(tmp_path)) == "none"
    _stopped(tmp_path)
    first = slurm.stop_mark(str(tmp_path))
    tmp = tmp_path / "x.tmp"
    tmp.write_text("{}")
    os.replace(tmp, tmp_path / STOPPED_FILE)  # how the run writes it: a new inode
    assert slurm.stop_mark(str(tmp_path)) not in ("none", first)


def test_a_bad_requeue_cap_is_an_error_with_the_fix(tmp_path, capfd, monkeypatch):
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "DISTRIB_MAX_REQUEUES": "abc"}
    with pytest.raises(slurm.ConfigError, match="DISTRIB_MAX_REQUEUES='abc' is not a whole number. HINT: export DISTRIB_MAX_REQUEUES=20"):
        slurm.plan([], env)
    _stopped(tmp_path)
    assert slurm.epilogue(str(tmp_path), 1, {**env, "DISTRIB_STOP_MARK": "none"}, requeue=("true",)) == 2
    assert "distrib: error: DISTRIB_MAX_REQUEUES='abc'" in capfd.readouterr().err


def test_render_puts_options_after_the_template_header_and_bakes_the_arguments():
    text = slurm.render(slurm.SubmitOptions(nodes=4, gpus_per_node=8, partition="gpu"), ["--run.dir", "a b"], python="/opt/py")
    lines = text.splitlines()
    sbatch = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(sbatch) < first_command  # sbatch stops reading #SBATCH at the first command
    assert {"#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu"} <= set(lines)
    assert "set -- --run.dir 'a b' \"$@\"" in lines and "export PYTHON=${PYTHON:-/opt/py}" in lines
    with pytest.raises(slurm.ConfigError, match="--nodes=0 must be >= 1"):
        slurm.SubmitOptions(nodes=0)


def test_sbatch_files_never_repeat_a_count():
    for name in ("train", "srun"):
        text = (REPO / "slurm" / f"{name}.sbatch").read_text()
        header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
        assert not [h for h in header if any(k in h for k in ("--nodes", "--ntasks=", "--gpus", "--nnodes"))], header
        assert "--requeue" in text and "--signal=USR1@" in text


def _diag(env, **probes):
    return diagnose(env, Probes(**probes))


def test_doctor_flags_ntasks_meant_per_node():
    env = {
        **ALLOC,
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_NTASKS": "8",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_PROCID": "0",
        "SLURM_STEP_ID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    _, found = _diag(env, gpus=8)
    msgs = " ".join(f.message + f.fix for f in found)
    assert "SLURM_NTASKS=8 is the whole job's task count" in msgs and "--ntasks-per-node=8" in msgs
    assert "world size 8 does not match the allocation: 2 node(s) x 8 GPU(s) = 16" in msgs
    ok = {**env, "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x2)"}
    assert _diag(ok, gpus=8)[1] == []


def test_doctor_flags_a_double_launch_and_too_many_local_processes():
    env = {
        **ALLOC,
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "16",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
        "TORCHELASTIC_RUN_ID": "x",
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "8",
    }
    _, found = _diag(env, gpus=4)
    msgs = " ".join(f.message for f in found)
    assert "a double launch" in msgs and "8 processes on this node but only 4 GPU(s)" in msgs


def test_doctor_says_when_fsdp_is_the_strategy_to_pick():
    facts, _ = _diag(
        {
            "WORLD_SIZE": "8",
            "RANK": "0",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "8",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
            "TORCHELASTIC_RUN_ID": "x",
        },
        gpus=8,
        gpu_names=("H100",) * 8,
        device_memory=80 * 10**9,
    )
    advice = dict(facts)["strategy"]
    assert "up to ~5B parameters in this GPU" in advice and "fsdp splits them over 8 ranks: up to ~40B" in advice
    assert "ddp (default) while the model" in dict(_diag({})[0])["strategy"]  # no memory figure: the rule in words


def test_doctor_says_which_mesh_a_launch_builds_and_when_hsdp_keeps_sharding_in_a_node():
    from distrib.config import DistConfig

    # torchrun on 2 nodes of 4: the ranks of one node are numbered together.
    env = {
        "WORLD_SIZE": "8",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "x",
    }
    facts, found = diagnose(env, Probes(), DistConfig(strategy="fsdp", replicate=2))
    mesh = dict(facts)["mesh"]
    assert "HSDP 2 x 4" in mesh and "ranks 0-3, 4-7 each hold one sharded copy (each within one node)" in mesh and not found
    facts, found = diagnose(env, Probes(), DistConfig(strategy="fsdp"))
    assert dict(facts)["mesh"].startswith("FSDP over all 8 ranks")
    assert [f.fix for f in found] == ["pass --dist.replicate 2 (HSDP: shard within each node, all-reduce across nodes once per step)"]
    _, found = diagnose(env, Probes(), DistConfig(strategy="fsdp", replicate=3))
    assert found[0].level == "error" and "dist.replicate=3 does not divide the world size 8" in found[0].message
    assert dict(diagnose(env, Probes())[0])["mesh"] == "DDP: all 8 ranks hold the whole model"
    # Run plainly (1 process), HSDP or offload cannot be built: the error training would give.
    _, found = diagnose({}, Probes(), DistConfig(strategy="fsdp", replicate=2))
    assert [f.level for f in found] == ["error"] and "dist.replicate=2 needs several ranks" in found[0].message
    assert "torchrun ... -m distrib.doctor" in found[0].fix


def test_doctor_takes_the_mesh_keys_and_refuses_hsdp_without_fsdp(capsys):
    from distrib.cli.doctor import main

    with pytest.raises(SystemExit) as exit_:
        main(["--dist.replicate", "2"])
    assert exit_.value.code == 2
    assert "dist.replicate=2 applies to sharded training, but dist.strategy=ddp" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--dist.strategy", "fdsp"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["--dist.replicat", "2"])  # no abbreviations: the training command takes none either
    assert exit_.value.code == 2


def test_doctor_explains_an_elastic_launch_and_the_global_batch_at_each_world_size():
    from distrib.cli.doctor import Elastic

    env = {"NNODES": "1:4", "NPROC_PER_NODE": "2", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    facts, found = diagnose(env, Probes(), elastic=Elastic(global_batch_size=64, batch_size=16))
    assert dict(facts)["elastic"].startswith("1 to 4 nodes x 2 processes (world sizes 2, 4, 6, 8), max restarts 3")
    assert dict(facts)["global batch"] == "64 at 2: 16 x 2, 4: 16 x 1, 8: 8 x 1 (processes: micro-batch x grad_accum)"
    assert [(f.level, f.message.split(":")[0]) for f in found] == [("error", "train.global_batch_size=64 does not split evenly over 6 processes")]
    assert found[0].fix == "pass --train.global_batch_size 48 or 72 (a multiple of 24, which each of the world sizes 2, 4, 6, 8 divides)"
    # No global batch, and torch's shared store: two warnings, each with its fix.
    facts, found = diagnose({"NNODES": "1:2"}, Probes(), elastic=Elastic())
    assert [f.level for f in found] == ["warning", "warning"]
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in found[0].fix and "--train.global_batch_size 64" in found[1].fix
    # On GPU nodes the processes per node are the GPUs; a range too wide for any global batch says to narrow it.
    facts, found = diagnose({"NNODES": "1:16"}, Probes(gpus=8), elastic=Elastic(global_batch_size=512))
    assert "(world sizes 8, 16, 24," in dict(facts)["elastic"] and found[-1].fix.startswith("narrow the node range")
    # A fixed node count is not elastic: nothing said.
    facts, found = diagnose({"NNODES": "2"}, Probes(), elastic=Elastic(global_batch_size=60))
    assert "elastic" not in dict(facts) and not found
