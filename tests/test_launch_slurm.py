"""SLURM launch without torchrun: srun's variables become torch.distributed's environment, and two gloo
processes started with SLURM's variables set by hand train together."""

import json
import os
import subprocess
import sys

import pytest
from dist_helpers import free_port

from hqclip_fast.checkpoint import latest_checkpoint
from hqclip_fast.data.synthetic import write_synthetic
from hqclip_fast.metrics import read_metrics
from hqclip_fast.runtime import first_host, slurm_launch_env

SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NODELIST": "gpu-a[017-018,031],gpu-b007", "SLURM_TASKS_PER_NODE": "4(x4)"}


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[012-015,020],cpu1", "gpu012"), ("node7,node2", "node7"), ("a[3]", "a3"), ("x[1-2]-ib", "x1-ib"),
    ("rack[2-3]-n[07,09]", "rack2-n07"), ("localhost", "localhost")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_srun_variables_become_torch_distributed_environment():
    assert slurm_launch_env(SRUN) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                      "MASTER_ADDR": "gpu-a017", "MASTER_PORT": str(20000 + 123456 % 20000)}
    given = slurm_launch_env({**SRUN, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.0.0.1", "29400")
    # torchrun inside an allocation: its variables win; no SLURM task: nothing to do.
    assert slurm_launch_env({**SRUN, "WORLD_SIZE": "8", "RANK": "0"}) == {}
    assert slurm_launch_env({"SLURM_JOB_ID": "1"}) == {}
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        slurm_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})



@pytest.mark.distributed
def test_two_processes_with_slurm_variables_train_without_torchrun(tmp_path):
    data = write_synthetic(str(tmp_path / "data"), num_samples=32, shard_size=16, seed=5, image_size=32,
                           num_zeroshot=4, num_hardneg=4)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "hqclip_fast.train",
               f"run_dir={run}", "steps=2", "batch_size=4", "device=cpu", "cpu_threads=1",
               "model.name=hqclip-micro", f"data.train_data={data['train']}", "data.image_size=32",
               "data.context_length=36", "data.workers=0", "data.shuffle_buffer=8", "checkpoint.every_steps=0",
               "log.every_steps=1", "log.progress_bar=false", "log.tensorboard=false"]
    # What srun sets for 2 tasks on one node; no RANK / WORLD_SIZE / MASTER_ADDR (no torchrun). A free port
    # rather than the one the job id would give (tests may run side by side).
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    base.update({"OMP_NUM_THREADS": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost",
                 "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_ID": "77", "MASTER_PORT": str(free_port())})
    procs = [subprocess.Popen(command, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    checkpoint = latest_checkpoint(run / "checkpoints")
    assert checkpoint.name == "step_00000002"
    states = [json.loads((checkpoint / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["world_size"] for s in states] == [2, 2]
    train = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
