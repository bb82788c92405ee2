"""Environment detection: env-var parsing only, no process group."""

from __future__ import annotations

import dataclasses

import pytest

from distrib.errors import EnvironmentConfigError
from distrib.runtime.env import DistEnv, check_visible_gpus, detect, expand_hostlist, slurm_port

TORCHRUN = {
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "8",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "node7",
    "MASTER_PORT": "29511",
    "TORCHELASTIC_RUN_ID": "abc",
}
SRUN = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "6",
    "SLURM_NODEID": "2",
    "SLURM_JOB_NODELIST": "gpu[07-09]",
    "SLURM_TASKS_PER_NODE": "2(x3)",
}


def test_single_process_when_no_launcher():
    assert detect({}) == DistEnv()
    assert detect({}).launcher == "single" and not detect({}).distributed


def test_reads_os_environ(monkeypatch):
    for k, v in TORCHRUN.items():
        monkeypatch.setenv(k, v)
    assert detect().rank == 3


def test_torchrun():
    e = detect(TORCHRUN)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == (3, 1, 8, 2, 1)
    assert (e.master_addr, e.master_port, e.launcher) == ("node7", 29511, "torchrun")


def test_srun_without_torchrun():
    e = detect(SRUN)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == (5, 1, 6, 2, 2)
    assert e.launcher == "slurm"
    assert e.master_addr == "gpu07"  # first host of the expanded nodelist
    assert e.master_port == slurm_port("4242") == 15000 + 4242
    assert detect({**SRUN, "MASTER_PORT": "12345"}).master_port == 12345


def test_torchrun_inside_slurm_wins():
    assert detect({**SRUN, **TORCHRUN}).launcher == "torchrun"


def test_sbatch_script_itself_is_single_process():
    # The batch script has SLURM_PROCID but no step id: it is not an srun task.
    batch = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert detect(batch).launcher == "single"


def test_env_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        detect(TORCHRUN).rank = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    "env, needles",
    [
        ({"RANK": "0"}, ["WORLD_SIZE is not set", "torchrun --nproc_per_node"]),
        ({"WORLD_SIZE": "2"}, ["RANK is not set"]),
        ({"RANK": "2", "WORLD_SIZE": "2"}, ["rank 2 is outside 0..1", "RANK must be below WORLD_SIZE"]),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, ["rank -1 is outside"]),
        ({"RANK": "0", "WORLD_SIZE": "0"}, ["world size is 0"]),
        ({"RANK": "x", "WORLD_SIZE": "2"}, ["RANK='x' is not an integer"]),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, ["local rank 3 is outside 0..1"]),
        ({**SRUN, "SLURM_PROCID": "6"}, ["rank 6 is outside 0..5"]),
    ],
)
def test_inconsistent_environment_is_explained(env, needles):
    with pytest.raises(EnvironmentConfigError) as err:
        detect(env)
    for needle in needles:
        assert needle in str(err.value)


def test_local_rank_beyond_visible_gpus():
    e = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(EnvironmentConfigError, match=r"local rank 3 needs cuda:3, but only 2 GPU\(s\).*--nproc_per_node=2"):
        check_visible_gpus(e, 2)
    check_visible_gpus(e, 4)  # enough GPUs: no error


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("n1", ["n1"]),
        ("n[1-2]", ["n1", "n2"]),
        ("gpu[007-009,012]", ["gpu007", "gpu008", "gpu009", "gpu012"]),
        ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("node[9-10]", ["node9", "node10"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_bad_hostlist():
    with pytest.raises(EnvironmentConfigError, match="unbalanced"):
        expand_hostlist("n[1-2")


def test_torchrun_restart_round_and_agent_store():
    e = detect({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert e.restart_count == 2 and e.agent_store
    assert detect(TORCHRUN).restart_count == 0 and not detect(TORCHRUN).agent_store
