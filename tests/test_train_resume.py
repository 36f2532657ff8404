"""A training run killed with SIGKILL resumes from its last complete checkpoint and follows the same trajectory:
the per-step losses of killed-and-resumed equal those of an uninterrupted run, exactly (CPU, fixed threads).
A run stopped with SIGTERM (preemption) writes its checkpoint at the step the signal arrived, exits with
128 + SIGTERM, and resumes on the same trajectory too."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hqclip_fast.checkpoint import checkpoint_step, list_checkpoints
from hqclip_fast.data.synthetic import write_synthetic
from hqclip_fast.metrics import read_metrics

STEPS = 16


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic(str(out), num_samples=96, shard_size=32, seed=2, image_size=32, num_zeroshot=12,
                           num_hardneg=8)


def _overrides(synthetic: dict, run_dir: Path) -> list[str]:
    return [
        f"run_dir={run_dir}", f"steps={STEPS}", "batch_size=8", "device=cpu", "cpu_threads=1", "seed=5",
        "model.name=hqclip-micro", f"model.tag_vocab={synthetic['tags']}",
        f"data.train_data={synthetic['train']}", "data.image_size=32", "data.context_length=36",
        "data.workers=0", "data.shuffle_buffer=16",
        "loss.hni_weight=1.0", "loss.stc_weight=0.5", "loss.impl=reference",
        "optim.lr=3e-3", "optim.warmup_steps=3",
        "checkpoint.every_steps=3", "checkpoint.keep_last=2",
        "log.every_steps=1", "log.progress_bar=false", "log.tensorboard=false",
    ]


def _command(synthetic: dict, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "hqclip_fast.train", *_overrides(synthetic, run_dir)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def expected(synthetic, tmp_path_factory):
    """Per-step losses of the uninterrupted run."""
    reference = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_command(synthetic, reference), env=_env(), check=True, timeout=300, capture_output=True)
    losses = _losses(reference)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    return losses


@pytest.mark.distributed
@pytest.mark.parametrize("kill_at", ["past_a_checkpoint", 4, 10])
def test_sigkill_then_resume_follows_the_uninterrupted_trajectory(synthetic, expected, tmp_path, kill_at):
    """Checkpoints are written in the background (checkpoint.async_save, the default) every 3 steps. Killed as
    soon as it has a complete checkpoint and has logged a step past it, or once step 4 / 10 is logged: just
    after the background save of step 3 / 9 started, before or after it was committed."""
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(synthetic, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            saved = list_checkpoints(killed / "checkpoints")
            logged = _losses(killed)
            if kill_at == "past_a_checkpoint":
                due = saved and logged and logged[-1][0] > checkpoint_step(saved[-1])
            else:
                due = logged and logged[-1][0] >= kill_at
            if due:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = list_checkpoints(killed / "checkpoints")
    for folder in saved:  # whatever the moment of the kill, a step_* folder is a whole checkpoint
        assert (folder / ".metadata").is_file() and (folder / "rank0.json").is_file(), folder
    resumed_from = checkpoint_step(saved[-1]) if saved else 0
    logged_before_kill = _losses(killed)[-1][0]
    assert resumed_from < logged_before_kill < STEPS
    if kill_at == "past_a_checkpoint":
        assert resumed_from > 0

    result = subprocess.run(_command(synthetic, killed), env=_env(), check=True, timeout=300, capture_output=True,
                            text=True)
    if resumed_from:
        assert f"resumed from {killed / 'checkpoints'}" in result.stdout
    # The resumed run dropped the killed run's records after its checkpoint and rewrote them: same losses.
    assert _losses(killed) == expected


@pytest.mark.distributed
def test_sigterm_checkpoints_at_that_step_then_resume_follows_the_uninterrupted_trajectory(synthetic, expected,
                                                                                            tmp_path):
    # Periodic checkpoints only at the end: a checkpoint before it can only be the preemption's.
    run_dir = tmp_path / "preempted"
    command = [*_command(synthetic, run_dir), "checkpoint.every_steps=0"]
    output = tmp_path / "preempted.log"  # a file, not a pipe that nobody reads while the run goes on
    with output.open("w") as log:
        proc = subprocess.Popen(command, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                logged = _losses(run_dir)
                if logged and logged[-1][0] >= 3:
                    proc.send_signal(signal.SIGTERM)
                    break
                time.sleep(0.02)
            proc.wait(timeout=120)
        finally:
            proc.kill()
            proc.wait()
    stdout = output.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-3000:]
    saved = list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1
    stopped_at = checkpoint_step(saved[0])
    assert 3 <= stopped_at < STEPS and stopped_at == _losses(run_dir)[-1][0]  # the step it was in, finished
    assert f"preempted by SIGTERM at step {stopped_at}" in stdout
    events = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "preempted"]
    assert [(e["step"], e["signal"]) for e in events] == [(stopped_at, "SIGTERM")]

    result = subprocess.run(command, env=_env(), check=True, timeout=300, capture_output=True, text=True)
    assert f"resumed from {saved[0]} at step {stopped_at}" in result.stdout
    assert _losses(run_dir) == expected
