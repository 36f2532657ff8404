"""Checkpoint folders behind fsspec URLs: a round trip through fsspec's in-memory filesystem (synchronous and
asynchronous saves, keep_last, a torn save), and a training run whose checkpoint.folder is a file:// URL
resumes from it."""

import uuid

import fsspec
import pytest
import torch

from hqclip_fast.checkpoint import Checkpointer, latest_checkpoint, list_checkpoints
from hqclip_fast.config import load_config
from hqclip_fast.data.synthetic import write_synthetic
from hqclip_fast.train import train


def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).square().sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("asynchronous", [False, True])
def test_round_trip_through_an_in_memory_fsspec_folder(asynchronous):
    url = f"memory://hqclip-{uuid.uuid4().hex}/checkpoints"
    model, optimizer = _model_and_optimizer(0)
    checkpointer = Checkpointer(url, keep_last=2, asynchronous=asynchronous)
    for step in (1, 2, 3):
        checkpointer.save(step, model, optimizer, {"loader": {"position": step}})
    checkpointer.wait()
    saved = list_checkpoints(url)
    assert saved == [f"{url}/step_00000002", f"{url}/step_00000003"]

    restored, restored_optimizer = _model_and_optimizer(1)
    state = Checkpointer(url).load(latest_checkpoint(url), restored, restored_optimizer)
    assert state["step"] == 3 and state["loader"] == {"position": 3}
    for (name, want), got in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(got, want), name
    assert restored_optimizer.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])

    # A torn save (shards, no .metadata) is never a checkpoint, and the next run deletes it.
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{url}/step_00000004/__0_0.distcp", b"torn")
    assert latest_checkpoint(url) == f"{url}/step_00000003"
    Checkpointer(url)
    assert not fs.exists(f"{url}/step_00000004")


@pytest.mark.distributed
def test_training_resumes_from_a_file_url_checkpoint_folder(tmp_path):
    data = write_synthetic(str(tmp_path / "data"), num_samples=16, shard_size=16, seed=7, image_size=32,
                           num_zeroshot=4, num_hardneg=4)
    folder = f"file://{tmp_path}/elsewhere/checkpoints"

    def config(steps):
        return load_config(None, [
            f"run_dir={tmp_path / 'run'}", f"steps={steps}", "batch_size=4", "device=cpu", "cpu_threads=1",
            "model.name=hqclip-micro", f"data.train_data={data['train']}", "data.image_size=32",
            "data.context_length=36", "data.workers=0", "data.shuffle_buffer=8", f"checkpoint.folder={folder}",
            "log.progress_bar=false", "log.tensorboard=false"])

    assert train(config(2))["steps_this_run"] == 2
    assert [str(p).rsplit("/", 1)[-1] for p in list_checkpoints(folder)] == ["step_00000002"]
    assert not (tmp_path / "run" / "checkpoints").exists()
    summary = train(config(3))
    assert summary["steps"] == 3 and summary["steps_this_run"] == 1  # resumed at step 2
    assert [str(p).rsplit("/", 1)[-1] for p in list_checkpoints(folder)] == ["step_00000002", "step_00000003"]
