"""Process-level set-up for a training run: process group, device, threads, seeds.

Two launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or SLURM's
srun with one task per GPU and no torchrun, as open_clip runs it: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
the tasks per node, and the first host of the step's node list as the master. torchrun's variables win when
both are present (torchrun inside an allocation).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE, or SLURM's tasks per node)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: "gpu[012-015,020],cpu1" -> "gpu012"."""
    item = re.match(r"(?:[^,\[]|\[[^\]]*\])*", nodelist.strip()).group()  # up to the first comma outside [...]
    host = re.sub(r"\[([^,\]-]+)[^\]]*\]", r"\1", item)  # each [range] -> its first value
    if not host:
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return host


def _tasks_on_first_node(tasks_per_node: str) -> int:
    """SLURM_TASKS_PER_NODE, e.g. "8(x4)" or "8,7": the count of the first node."""
    return int(re.match(r"\d+", tasks_per_node).group())


def slurm_launch_env(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) for a process that srun started, or {} when torchrun's variables are set or there is no SLURM
    task. MASTER_ADDR / MASTER_PORT already in `env` are kept; the port otherwise follows the job id, so two
    jobs sharing a node do not collide."""
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in env and not nodelist:
        raise ValueError("SLURM launch: no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST to find the master in; "
                         "set MASTER_ADDR")
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(_tasks_on_first_node(tasks_per_node)) if tasks_per_node else env["SLURM_NTASKS"],
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


def pick_device(requested: str, local_rank: int) -> torch.device:
    """The local rank's GPU; when the launcher bound one GPU per task (srun --gpus-per-task=1, or
    CUDA_VISIBLE_DEVICES per task) the process sees only that one, which is its device 0."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA device")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_runtime(requested_device: str = "auto", cpu_threads: int = 0) -> Runtime:
    """Join the process group that torchrun or srun describes in the environment (world size > 1): nccl on
    CUDA, gloo on the CPU. A single process runs without a group."""
    os.environ.update(slurm_launch_env(dict(os.environ)))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cpu" and cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    if dist.is_initialized():
        world_size = dist.get_world_size()
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        return Runtime(dist.get_rank(), world_size, local_rank, device, local_world_size)
    return Runtime(0, 1, 0, device)


def shutdown_runtime() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Same seed on every rank: the model initializes identically everywhere before it is sharded."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
