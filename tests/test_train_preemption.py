"""Graceful preemption in the trainer: a signal during a step stops the run after that step with a checkpoint at
it, raises TrainingPreempted (exit status 128 + signal), restores the caller's signal handlers, and on 2 ranks
the ranks agree to stop together even when only one of them got the signal.

The SIGTERM kill/resume trajectory test (a real `hqclip-train` process) is in test_train_resume.py."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from dist_helpers import free_port

from hqclip_fast.checkpoint import checkpoint_step, list_checkpoints
from hqclip_fast.config import load_config
from hqclip_fast.data.synthetic import write_synthetic
from hqclip_fast.metrics import read_metrics
from hqclip_fast.preemption import PreemptionWatcher, TrainingPreempted
from hqclip_fast.train import TrainStep, train


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic(str(out), num_samples=32, shard_size=16, seed=4, image_size=32, num_zeroshot=4,
                           num_hardneg=4)


def _config(synthetic: dict, run_dir, steps: int, *extra: str):
    return load_config(None, [*extra,
        f"run_dir={run_dir}", f"steps={steps}", "batch_size=4", "device=cpu", "cpu_threads=1",
        "model.name=hqclip-micro", f"model.tag_vocab={synthetic['tags']}",
        f"data.train_data={synthetic['train']}", "data.image_size=32", "data.context_length=36",
        "data.workers=0", "data.shuffle_buffer=8", "loss.hni_weight=1.0", "loss.stc_weight=0.5",
        "checkpoint.every_steps=0", "log.every_steps=5", "log.progress_bar=false", "log.tensorboard=false",
    ])


def _signal_self_after_step(monkeypatch, signum: int, after_step: int) -> None:
    """Make the process send itself `signum` while its training step `after_step` is running."""
    original = TrainStep.__call__
    calls = []

    def step_then_signal(self, batch):
        calls.append(batch)
        if len(calls) == after_step:
            os.kill(os.getpid(), signum)  # arrives mid-step: the step must still finish
        return original(self, batch)

    monkeypatch.setattr(TrainStep, "__call__", step_then_signal)


def _ignore(signum, frame):
    pass


def test_signal_stops_after_the_step_with_a_checkpoint_and_restores_handlers(synthetic, tmp_path, monkeypatch):
    previous = {s: signal.signal(s, _ignore) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        _signal_self_after_step(monkeypatch, signal.SIGUSR1, after_step=3)
        cfg = _config(synthetic, tmp_path, steps=6)
        with pytest.raises(TrainingPreempted) as stopped:
            train(cfg)
        assert stopped.value.step == 3 and stopped.value.signal == signal.SIGUSR1
        assert stopped.value.exit_status == 128 + signal.SIGUSR1
        assert [checkpoint_step(p) for p in list_checkpoints(tmp_path / "checkpoints")] == [3]
        assert stopped.value.checkpoint == tmp_path / "checkpoints" / "step_00000003"
        records = read_metrics(tmp_path / "metrics.jsonl")
        # The logging window (every 5 steps) is flushed at the stop, then the event itself.
        assert [(r["kind"], r["step"]) for r in records] == [("train", 3), ("preempted", 3)]
        assert records[-1]["signal"] == "SIGUSR1"
        assert all(signal.getsignal(s) is _ignore for s in previous)

        summary = train(cfg)  # resumes at step 3 and finishes; handlers restored on a normal return too
        assert summary["steps"] == 6 and summary["steps_this_run"] == 3
        assert [checkpoint_step(p) for p in list_checkpoints(tmp_path / "checkpoints")] == [3, 6]
        assert all(signal.getsignal(s) is _ignore for s in previous)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_watcher_records_only_while_open():
    previous = signal.signal(signal.SIGTERM, _ignore)
    try:
        with PreemptionWatcher() as watcher:
            assert watcher.requested(1) == 0
            os.kill(os.getpid(), signal.SIGTERM)
            assert watcher.requested(2) == signal.SIGTERM  # one process: at once, no vote
        assert signal.getsignal(signal.SIGTERM) is _ignore
    finally:
        signal.signal(signal.SIGTERM, previous)



def _rank_worker(rank: int, world_size: int, port: int, synthetic: dict, run_dir: str, out_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if rank == 1:  # only rank 1 is signalled; rank 0 must stop at the same step all the same
        monkeypatch = pytest.MonkeyPatch()
        _signal_self_after_step(monkeypatch, signal.SIGTERM, after_step=1)
    result = {"rank": rank, "finished": True}
    try:
        # The ranks vote after steps 2, 4, ... and read each vote one step later: the signal of step 1 stops
        # both after step 3.
        train(_config(synthetic, run_dir, 5, "checkpoint.preemption_vote_every=2"))
    except TrainingPreempted as stopped:
        result = {"rank": rank, "step": stopped.step, "signal": stopped.signal.name,
                  "checkpoint": str(stopped.checkpoint)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.distributed
def test_ranks_agree_to_stop_when_only_one_is_signalled(synthetic, tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_rank_worker, args=(2, free_port(), synthetic, str(run_dir), str(out_dir)), nprocs=2, join=True)
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    checkpoint = str(run_dir / "checkpoints" / "step_00000003")
    for rank, result in enumerate(results):
        assert result == {"rank": rank, "step": 3, "signal": "SIGTERM", "checkpoint": checkpoint}
    assert [checkpoint_step(p) for p in list_checkpoints(run_dir / "checkpoints")] == [3]
    assert {"rank0.json", "rank1.json"} <= {p.name for p in Path(checkpoint).iterdir()}
    events = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "preempted"]
    assert [(e["step"], e["signal"]) for e in events] == [(3, "SIGTERM")]
