"""Every training preset in configs/ starts and trains: 2 steps on 2 CPU ranks (torchrun, gloo) with only the
overrides a CPU needs, keeping the preset's data and loader settings (DALI in its CPU mode where it says dali).

The overrides: device and DALI device, a tiny model of the preset's family (started, where the preset starts from
pretrained weights, from a tiny model's weights in open_clip's layout), a batch of 2, synthetic shards
(and their tag vocabulary), 2 steps (with a warmup that fits them), no torch.compile (inductor would compile
every block on 2 cores for minutes; tests/test_parallelize.py covers compile), no progress bar or TensorBoard.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_helpers import dali_cpu_unavailable_reason
from safetensors.torch import save_file

from hqclip_fast.checkpoint import latest_checkpoint
from hqclip_fast.config import load_config, load_run_config
from hqclip_fast.data.cli import main as data_cli
from hqclip_fast.data.synthetic import write_synthetic
from hqclip_fast.metrics import read_metrics
from hqclip_fast.model import create_model
from hqclip_fast.model.configs import get_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml"))  # configs/eval/ holds eval suites, not presets


def tiny_model_of_family(name: str) -> str:
    """The CPU-sized tower of the same family as model `name` (a ResNet tower has no patch size)."""
    return "hqclip-rn-micro" if get_config(name).vision_cfg.patch_size is None else "hqclip-micro"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    manifest = write_synthetic(str(tmp_path_factory.mktemp("presets")), num_samples=64, shard_size=16, seed=3,
                               image_size=32, num_zeroshot=12, num_hardneg=8)
    return manifest


def test_presets_are_found():
    assert {"demo.yaml", "vitb16-large.yaml", "vitl14-xlarge.yaml"} <= set(PRESETS)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_two_steps_on_two_cpu_ranks(preset, shards, tmp_path):
    path = CONFIGS / preset
    cpu_needs = {"model.tag_vocab": shards["tags"], "data.train_data": shards["train"]}
    as_written = load_config(path, [f"{k}={v}" for k, v in cpu_needs.items()])
    if as_written.data.decoder == "dali":
        reason = dali_cpu_unavailable_reason()
        if reason:
            pytest.skip(reason)
        assert data_cli(["index", shards["train"]]) == 0
    tiny = tiny_model_of_family(as_written.model.name)
    if as_written.model.pretrained:  # the preset fine-tunes: start from weights of the tiny model, a file here
        weights = tmp_path / "pretrained.safetensors"
        save_file(create_model(tiny).open_clip_state_dict(), str(weights))
        cpu_needs["model.pretrained"] = str(weights)
    cpu_needs |= {
        "run_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "device": "cpu", "cpu_threads": 1,
        "model.name": tiny, "data.dali_device": "cpu",
        "optim.warmup_steps": 1, "parallel.compile": False, "log.progress_bar": False, "log.tensorboard": False,
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "hqclip_fast.train", "--config", str(path), *[f"{k}={v}" for k, v in cpu_needs.items()]]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    run = tmp_path / "run"
    ran = load_run_config(run)
    # the data and loader settings are the preset's: only the shards and DALI's device differ
    assert ran.data == dataclasses.replace(as_written.data, dali_device="cpu")
    assert (ran.parallel.param_dtype, ran.parallel.activation_checkpointing) == (
        as_written.parallel.param_dtype, as_written.parallel.activation_checkpointing)
    train = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert train[-1]["step"] == 2 and train[-1]["samples_ok"] == 2 * 2  # rank 0's loader: 2 batches of 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    checkpoint = latest_checkpoint(run / "checkpoints")
    assert checkpoint.name == "step_00000002"
    assert {"rank0.json", "rank1.json"} <= {p.name for p in checkpoint.iterdir()}
