"""The trainer's small parts on their own: schedule, optimizer groups, checkpoints, metrics files."""

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from hqclip_fast.checkpoint import Checkpointer, latest_checkpoint, list_checkpoints
from hqclip_fast.metrics import MetricsLogger, read_metrics
from hqclip_fast.optim import build_optimizer, decays
from hqclip_fast.schedule import WarmupConstant, WarmupConstantCooldown, WarmupCosine, build_lr_scheduler

# ---------------------------------------------------------------- schedule


def test_warmup_is_linear_and_never_zero():
    f = WarmupCosine(warmup_steps=4, total_steps=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_reaches_floor_and_is_monotone():
    f = WarmupCosine(warmup_steps=3, total_steps=13, min_lr_ratio=0.1)
    values = [f(s) for s in range(3, 14)]
    assert values[0] == pytest.approx(1.0)
    assert values[5] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert f(1000) == pytest.approx(0.1)  # past the end it stays at the floor


def test_scheduler_drives_optimizer_and_round_trips():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = build_lr_scheduler(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2.0 * WarmupCosine(2, 6)(s) for s in range(6)]
    assert lrs == pytest.approx(expected)
    # Resume half way (optimizer and schedule restored together, as checkpoints do): the same lrs follow.
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = build_lr_scheduler(opt, warmup_steps=2, total_steps=6)
    for _ in range(3):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched2 = build_lr_scheduler(opt2, warmup_steps=2, total_steps=6)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    resumed = []
    for _ in range(3):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(expected[3:])


def test_const_and_const_cooldown_by_hand():
    const = WarmupConstant(warmup_steps=3, total_steps=8)
    assert [const(s) for s in range(8)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1])
    # base lr 1, warmup 2, 10 steps, the last 4 cool down to 0.1 with power 2: 1 - e/4 = 1, .75, .5, .25
    cool = WarmupConstantCooldown(2, 10, cooldown_steps=4, cooldown_power=2.0, cooldown_end_ratio=0.1)
    assert [cool(s) for s in range(10)] == pytest.approx(
        [0.5, 1, 1, 1, 1, 1, 1.0, 0.1 + 0.9 * 0.5625, 0.1 + 0.9 * 0.25, 0.1 + 0.9 * 0.0625])
    assert cool(50) == pytest.approx(0.1)  # past the end it stays at the end value
    linear = WarmupConstantCooldown(0, 4, cooldown_steps=4)
    assert [linear(s) for s in range(4)] == pytest.approx([1, 0.75, 0.5, 0.25])


@pytest.mark.parametrize("schedule,kwargs", [
    ("cosine", {}), ("const", {}),
    ("const-cooldown", dict(cooldown_steps=7)),
    ("const-cooldown", dict(cooldown_steps=12, cooldown_power=1.5, cooldown_end_lr=0.3)),
    ("const-cooldown", dict(cooldown_steps=20, cooldown_power=0.5, cooldown_end_lr=0.1)),  # overlaps the warmup
])
def test_schedules_give_open_clip_train_learning_rates(schedule, kwargs):
    """The learning rate of every step equals the one open_clip_train's own scheduler assigns (base lr 2)."""
    from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

    warmup, steps, base = 5, 20, 2.0
    param = nn.Parameter(torch.zeros(1))
    theirs = torch.optim.SGD([param], lr=base)
    if schedule == "cosine":
        adjust = cosine_lr(theirs, base, warmup, steps)
    elif schedule == "const":
        adjust = const_lr(theirs, base, warmup, steps)
    else:
        adjust = const_lr_cooldown(theirs, base, warmup, steps, kwargs["cooldown_steps"],
                                   kwargs.get("cooldown_power", 1.0), kwargs.get("cooldown_end_lr", 0.0))
    want = [adjust(s) for s in range(steps)]
    opt = torch.optim.SGD([param], lr=base)
    ours = build_lr_scheduler(opt, schedule=schedule, warmup_steps=warmup, total_steps=steps,
                              cooldown_steps=kwargs.get("cooldown_steps", 0),
                              cooldown_power=kwargs.get("cooldown_power", 1.0),
                              cooldown_end_ratio=kwargs.get("cooldown_end_lr", 0.0) / base)
    got = []
    for _ in range(steps):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        ours.step()
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("kwargs", [dict(warmup_steps=5, total_steps=4), dict(warmup_steps=0, total_steps=0),
                                    dict(warmup_steps=1, total_steps=4, min_lr_ratio=1.5)])
def test_schedule_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        WarmupCosine(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(schedule="linear"), "schedule must be one of"),
    (dict(schedule="const-cooldown"), "cooldown_steps"),
    (dict(schedule="const-cooldown", cooldown_steps=11), "cooldown_steps"),
    (dict(schedule="const-cooldown", cooldown_steps=2, cooldown_power=0.0), "cooldown_power"),
])
def test_cooldown_rejects_bad_settings(kwargs, match):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        build_lr_scheduler(opt, warmup_steps=0, total_steps=10, **kwargs)


# ---------------------------------------------------------------- optimizer


class _Towerish(nn.Module):
    def __init__(self):
        super().__init__()
        self.token_embedding = nn.Embedding(10, 4)
        self.positional_embedding = nn.Parameter(torch.zeros(5, 4))
        self.class_embedding = nn.Parameter(torch.zeros(4))
        self.proj = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.conv = nn.Conv2d(3, 4, 2)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def test_skip_embeddings_rule_decays_no_gain_bias_embedding_or_scale():
    model = _Towerish()
    decayed = {name for name, p in model.named_parameters() if decays(name, p, "skip_embeddings")}
    assert decayed == {"proj.weight", "conv.weight"}
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.2, weight_decay_rule="skip_embeddings")
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert by_id[id(model.proj.weight)] == 0.2
    assert by_id[id(model.token_embedding.weight)] == 0.0
    assert by_id[id(model.logit_scale)] == 0.0
    assert len(by_id) == len(list(model.parameters()))


def test_open_clip_rule_is_the_default_and_decays_embeddings():
    model = _Towerish()
    decayed = {name for name, p in model.named_parameters() if decays(name, p)}
    # 2-D embeddings decay as in open_clip_train; the 1-D class embedding, gains, biases and the scale do not.
    assert decayed == {"proj.weight", "conv.weight", "token_embedding.weight", "positional_embedding"}
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.2)
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert by_id[id(model.token_embedding.weight)] == 0.2
    assert by_id[id(model.class_embedding)] == 0.0
    assert by_id[id(model.logit_scale)] == 0.0


def _open_clip_train_decayed(model):
    """The decayed parameter names by open_clip_train/main.py's own `exclude` lambda (3.3.0), written out."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    return {n for n, p in model.named_parameters() if not exclude(n, p)}


@pytest.mark.parametrize("name", ["hqclip-micro", "hqclip-rn-micro"])
def test_open_clip_rule_decays_what_open_clip_train_decays(name):
    """Our parameters, under open_clip's names, decay exactly where open_clip_train decays open_clip's model of the
    same architecture (ViT and ResNet towers), and the optimizer groups follow."""
    from test_model_openclip import open_clip_model

    from hqclip_fast.model import create_model

    ours = create_model(name)
    to_open_clip = {k: k[len("text."):] if k.startswith("text.") else k for k, _ in ours.named_parameters()}
    got = {to_open_clip[n] for n, p in ours.named_parameters() if decays(n, p)}
    assert got == _open_clip_train_decayed(open_clip_model(name))
    assert {"token_embedding.weight", "positional_embedding"} <= got
    groups = build_optimizer(ours, lr=1e-3, weight_decay=0.2).param_groups
    decayed_ids = {id(p) for p in groups[0]["params"]}
    assert decayed_ids == {id(p) for n, p in ours.named_parameters() if to_open_clip[n] in got}
    assert groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0


def test_no_weight_decay_on_batch_norm_of_a_resnet_tower():
    from hqclip_fast.model import create_model

    model = create_model("hqclip-rn-micro")
    norms = {f"{m_name}.{p_name}" for m_name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
             for p_name, _ in m.named_parameters()}
    assert len(norms) == 2 * 19  # 3 in the stem, 3 per bottleneck, 1 per downsample shortcut: gains and biases
    for rule in ("open_clip", "skip_embeddings"):
        decayed = {name for name, p in model.named_parameters() if decays(name, p, rule)}
        assert not norms & decayed
        assert {"visual.conv1.weight", "visual.layer2.0.downsample.0.weight",
                "visual.attnpool.q_proj.weight"} <= decayed
        assert ("visual.attnpool.positional_embedding" in decayed) == (rule == "open_clip")


def test_optimizer_rejects_bad_settings():
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(_Towerish(), lr=0.0, weight_decay=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        build_optimizer(_Towerish(), lr=1e-3, weight_decay=-1.0)
    with pytest.raises(ValueError, match="weight-decay rule"):
        build_optimizer(_Towerish(), lr=1e-3, weight_decay=0.1, weight_decay_rule="embeddings")


# ---------------------------------------------------------------- checkpoints


def _train_a_bit(model, opt, steps=2):
    for _ in range(steps):
        tokens = model.token_embedding(torch.tensor([1, 2, 3, 4, 0])) + model.positional_embedding
        pixels = model.conv(torch.ones(1, 3, 3, 3)).flatten() + model.class_embedding.repeat(4)
        loss = model.proj(model.ln(tokens)).pow(2).sum() + pixels.pow(2).sum() + model.logit_scale
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_checkpoint_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = _Towerish()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    _train_a_bit(model, opt)
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=2)
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    ckpt.save(7, model, opt, {"loader": {"position": [1, 2]}, "scheduler": {"last_epoch": 7}})
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())

    model2 = _Towerish()
    opt2 = build_optimizer(model2, lr=1e-2, weight_decay=0.1)
    path = latest_checkpoint(tmp_path / "ckpt")
    assert path.name == "step_00000007"
    state = ckpt.load(path, model2, opt2)
    assert state["step"] == 7 and state["loader"] == {"position": [1, 2]} and state["scheduler"]["last_epoch"] == 7
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    # Optimizer moments came back: one more identical step keeps the two models identical.
    _train_a_bit(model, opt, 1)
    _train_a_bit(model2, opt2, 1)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_keeps_last_k_and_ignores_partial_writes(tmp_path):
    model = _Towerish()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    _train_a_bit(model, opt, 1)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        ckpt.save(step, model, opt, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    # A run killed while writing step 4 leaves only a tmp folder: never picked, and cleaned by the next run.
    partial = tmp_path / ".tmp-step_00000004"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"torn")
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    Checkpointer(tmp_path, keep_last=2)
    assert not partial.exists()


def test_checkpoint_rejects_bad_keep_last(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=0)


# ---------------------------------------------------------------- metrics


def test_metrics_resume_drops_records_after_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 6):
        log.log(step, "train", {"loss": float(step)})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "kind": "tr')  # torn line of a killed writer
    resumed = MetricsLogger(tmp_path, enabled=True, resume_step=3, tensorboard=False)
    resumed.log(4, "train", {"loss": 40.0})
    resumed.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_metrics_disabled_on_other_ranks_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path, enabled=False)
    log.log(1, "train", {"loss": 1.0})
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_async_checkpoint_holds_the_state_of_its_step_while_training_goes_on(tmp_path):
    torch.manual_seed(0)
    model = _Towerish()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    _train_a_bit(model, opt, 1)
    ckpt = Checkpointer(tmp_path, keep_last=3, asynchronous=True)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    final = ckpt.save(1, model, opt, {})
    _train_a_bit(model, opt, 2)  # in place, while the background write may still run
    ckpt.save(2, model, opt, {})  # waits for the first save, then starts its own
    assert [p.name for p in list_checkpoints(tmp_path)][:1] == ["step_00000001"]
    ckpt.wait()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]
    restored = _Towerish()
    ckpt.load(final, restored, build_optimizer(restored, lr=1e-2, weight_decay=0.1))
    for key, value in restored.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert not torch.equal(model.state_dict()[next(iter(saved))], saved[next(iter(saved))])


_KILLED_MID_SAVE = """
import os, signal, sys, torch
from torch.distributed.checkpoint import FileSystemWriter
from hqclip_fast.checkpoint import Checkpointer
model = torch.nn.Linear(64, 64)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 64)).sum().backward()
optimizer.step()
checkpointer = Checkpointer(sys.argv[1], asynchronous=True)
checkpointer.save(1, model, optimizer, {})
checkpointer.wait()
# The second save dies in its background write: shards and rank0.json written, .metadata not yet.
FileSystemWriter.finish = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
checkpointer.save(2, model, optimizer, {})
checkpointer.wait()
"""


def test_async_save_killed_mid_write_never_becomes_the_latest(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == -9, result.stderr[-2000:]
    torn = tmp_path / "step_00000002"
    assert (torn / "rank0.json").is_file() and any(torn.glob("*.distcp")) and not (torn / ".metadata").exists()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    Checkpointer(tmp_path)  # the next run clears it
    assert not torn.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
