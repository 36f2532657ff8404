"""End to end on 2 CPU ranks (torchrun, gloo, FSDP2): train with the full HQ-CLIP loss, evaluate, write a sharded
checkpoint, resume it on 2 ranks with a longer schedule, and export it from a single process to open_clip; and
resume elastically on other numbers of ranks (DCP reshards model and optimizer, the loader its unread data)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from hqclip_fast.checkpoint import latest_checkpoint
from hqclip_fast.data.synthetic import write_synthetic
from hqclip_fast.export import export_open_clip, load_trained_model
from hqclip_fast.metrics import read_metrics


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic(str(out), num_samples=64, shard_size=16, seed=3, image_size=32, num_zeroshot=12,
                           num_hardneg=8)


def _torchrun(synthetic: dict, run_dir, steps: int, ranks: int = 2, *overrides: str) -> subprocess.CompletedProcess:
    manifest = os.path.join(os.path.dirname(synthetic["tags"]), "manifest.json")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
        "-m", "hqclip_fast.train",
        f"run_dir={run_dir}", f"steps={steps}", "batch_size=4", "device=cpu", "cpu_threads=1",
        "model.name=hqclip-micro", f"model.tag_vocab={synthetic['tags']}",
        f"data.train_data={synthetic['train']}", "data.image_size=32", "data.context_length=36",
        "data.workers=0", "data.shuffle_buffer=8",
        "loss.hni_weight=1.0", "loss.stc_weight=0.5",
        "optim.warmup_steps=1", "checkpoint.every_steps=2",
        f"eval.synthetic_manifest={manifest}", "eval.batch_size=8",
        "log.every_steps=1", "log.progress_bar=false", "log.tensorboard=false", *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.distributed
def test_two_cpu_ranks_train_resume_and_export(synthetic, tmp_path):
    run = tmp_path / "run"
    _torchrun(synthetic, run, steps=4)
    checkpoint = latest_checkpoint(run / "checkpoints")
    assert checkpoint.name == "step_00000004"
    assert {"rank0.json", "rank1.json"} <= {p.name for p in checkpoint.iterdir()}  # each rank's loader and RNG
    saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    assert any(key.startswith("optim.state.") for key in saved)

    result = _torchrun(synthetic, run, steps=6)  # a longer schedule resumes from step 4 on both ranks
    assert f"resumed from {checkpoint}" in result.stdout
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["hni"] > 0 and r["stc"] > 0 for r in train)
    assert train[-1]["samples_ok"] == 6 * 4  # rank 0's loader count, carried across the restart
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 6]
    assert {"zeroshot_top1", "hard_negative_acc", "image_to_text_R@1"} <= set(evals[-1])

    # The 2-rank sharded checkpoint loads into a plain model on one process and exports to open_clip.
    model, cfg = load_trained_model(run)
    assert cfg.steps == 6 and model.tag_head is not None
    assert 0 < float(model.logit_scale.detach()) <= torch.log(torch.tensor(100.0))
    weights = export_open_clip(model, cfg.model.name, tmp_path / "export")
    exported = torch.load(weights, weights_only=True)
    for key, value in model.open_clip_state_dict().items():
        assert torch.equal(exported[key], value), key


def _model_and_optimizer_state(checkpoint):
    """The saved tensors of a checkpoint, gathered on one process (whatever the world size that wrote it)."""
    reader = dcp.FileSystemReader(str(checkpoint))
    metadata = reader.read_metadata().state_dict_metadata
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in metadata.items()
             if hasattr(meta, "size") and (key.startswith("model.") or key.startswith("optim.state."))}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


@pytest.mark.distributed
def test_elastic_resume_on_four_then_two_then_three_ranks(synthetic, tmp_path):
    run = tmp_path / "run"
    _torchrun(synthetic, run, 2, 4)
    result = _torchrun(synthetic, run, 3, 2, "batch_size=6")  # step 3 on 2 ranks, from the 4-rank checkpoint
    assert "elastic: saved by 4 ranks, 0 workers, batch 4" in result.stdout
    optimizer = _model_and_optimizer_state(latest_checkpoint(run / "checkpoints"))
    steps = [key for key in optimizer if key.endswith(".step")]
    assert steps and all(optimizer[k].item() == 3 for k in steps)  # Adam went on counting from the 4 ranks' 2
    result = _torchrun(synthetic, run, 3, 3)  # 3 ranks load the 2-rank checkpoint and only evaluate it
    assert "elastic: saved by 2 ranks, 0 workers, batch 6" in result.stdout
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    evals = [r for r in records if r["kind"] == "eval" and r["step"] == 3]
    assert len(evals) == 2  # at the end of the 2-rank run, and of the 3-rank one after resharding its weights
    for name in ("zeroshot_top1", "hard_negative_acc", "image_to_text_R@1"):
        assert evals[0][name] == pytest.approx(evals[1][name], abs=1e-6), name
