"""Same numbers as open_clip where the recipe is the same: hqclip-train and open_clip_train's train_one_epoch, from
the same weights on the same batches, with the CLIP loss, open_clip's weight-decay rule, warmup + cosine, gradient
clipping and the logit-scale clamp, find the same per-step losses."""

import math
from types import SimpleNamespace

import open_clip
import pytest
import torch
from test_model_openclip import open_clip_model

import hqclip_fast.train as hqclip_train
from hqclip_fast.config import load_config
from hqclip_fast.metrics import read_metrics
from hqclip_fast.serialization import save_weights

STEPS, BATCH, LR, WD, WARMUP, CLIP_NORM = 8, 8, 2e-3, 0.2, 2, 1.0
BETAS, EPS = (0.9, 0.98), 1e-6


class _Loader:
    """What train_one_epoch reads from a dataloader: iteration, num_batches, num_samples."""

    def __init__(self, batches):
        self.batches, self.num_batches, self.num_samples = batches, len(batches), len(batches) * BATCH

    def __iter__(self):
        return iter(self.batches)


def open_clip_losses(initial, batches):
    """open_clip_train 3.3.0's own recipe: its parameter groups (main.py's exclude rule), AdamW, cosine_lr, ClipLoss
    and train_one_epoch; the loss of each step as its ClipLoss computed it."""
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    model = open_clip_model("hqclip-micro")
    model.load_state_dict(initial)
    model.output_dict = True  # as open_clip_train creates it
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": WD}],
        lr=LR, betas=BETAS, eps=EPS)
    scheduler = cosine_lr(optimizer, LR, WARMUP, STEPS)
    losses = []

    class RecordingClipLoss(open_clip.ClipLoss):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            losses.append(sum(out.values()).item())
            return out

    args = SimpleNamespace(device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=False,
                           horovod=False, grad_clip_norm=CLIP_NORM, batch_size=BATCH, world_size=1, rank=0,
                           local_rank=0, log_every_n_steps=10**9, wandb=False)
    data = {"train": SimpleNamespace(dataloader=_Loader(batches), set_epoch=lambda epoch: None)}
    train_one_epoch(model, data, RecordingClipLoss(), 0, optimizer, None, scheduler, None, args)
    return losses, model


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from hqclip_fast.data.synthetic import write_synthetic

    return write_synthetic(str(tmp_path_factory.mktemp("synthetic")), num_samples=96, shard_size=32, seed=3,
                           image_size=32, num_zeroshot=12, num_hardneg=8)


def test_hqclip_train_and_open_clip_train_give_the_same_per_step_losses(synthetic, tmp_path, monkeypatch):
    torch.manual_seed(0)
    initial = open_clip_model("hqclip-micro").state_dict()
    save_weights(initial, tmp_path / "initial.bin")

    batches = []  # the batches hqclip-train trains on, in order, to give open_clip the same ones
    feed = hqclip_train.infinite

    def recording(loader):
        for batch in feed(loader):
            batches.append((batch["images"].clone(), batch["pos_tokens"].clone()))
            yield batch

    monkeypatch.setattr(hqclip_train, "infinite", recording)
    run_dir = tmp_path / "run"
    hqclip_train.train(load_config(None, [
        f"run_dir={run_dir}", f"steps={STEPS}", f"batch_size={BATCH}", "device=cpu", "cpu_threads=1", "seed=1",
        "model.name=hqclip-micro", f"model.pretrained={tmp_path / 'initial.bin'}",
        f"data.train_data={synthetic['train']}", "data.image_size=32", "data.context_length=77",
        "data.workers=0", "data.shuffle_buffer=16", "data.use_negatives=false", "data.use_tags=false",
        "loss.hni_weight=0", "loss.stc_weight=0", "loss.negatives_in_softmax=false", "loss.impl=reference",
        f"optim.lr={LR}", f"optim.weight_decay={WD}", "optim.weight_decay_rule=open_clip",
        f"optim.betas=[{BETAS[0]},{BETAS[1]}]", f"optim.eps={EPS}", f"optim.warmup_steps={WARMUP}",
        "optim.schedule=cosine", f"optim.grad_clip={CLIP_NORM}",
        "checkpoint.every_steps=0", "log.every_steps=1", "log.progress_bar=false", "log.tensorboard=false"]))
    ours = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert len(batches) == STEPS

    theirs, trained = open_clip_losses(initial, batches)
    assert len(ours) == len(theirs) == STEPS
    assert ours == pytest.approx(theirs, rel=2e-5, abs=1e-6)
    assert theirs[-1] < theirs[0] - 0.05  # it learns: the comparison is not between two flat lines
    # The trained weights agree too, and a token row no batch used has moved by open_clip's weight decay alone
    # (AdamW's decoupled decay, every step): hqclip-fast's earlier rule would have left it as it was.
    from hqclip_fast.export import load_trained_model
    from hqclip_fast.schedule import WarmupCosine

    model, _ = load_trained_model(run_dir)
    want = trained.state_dict()
    for key, value in model.open_clip_state_dict().items():
        torch.testing.assert_close(value, want[key].reshape(value.shape), atol=2e-5, rtol=1e-4, msg=key)
    used = set(torch.cat([tokens.flatten() for _, tokens in batches]).tolist())
    row = next(i for i in range(1, 1000) if i not in used)
    decay = math.prod(1 - LR * WarmupCosine(WARMUP, STEPS)(step) * WD for step in range(STEPS))
    torch.testing.assert_close(model.text.token_embedding.weight[row], initial["token_embedding.weight"][row] * decay)
    assert decay < 0.999
