"""`hqclip-train`: train CLIP with the HQ-CLIP loss. One process, or one per GPU / CPU rank under torchrun.

    hqclip-train --config configs/demo.yaml steps=200 optim.lr=1e-3
    torchrun --nproc_per_node=8 -m hqclip_fast.train --config configs/vitb16-large.yaml

The trainer wires the parts together and holds no math: model (hqclip_fast.model) -> parallelize (FSDP2, bf16,
activation checkpointing, compile) -> loss (hqclip_fast.loss) -> AdamW + warmup and schedule; data from
hqclip_fast.data; checkpoints (DCP, atomic, auto-resume), metrics (jsonl, TensorBoard) and evaluation beside it.
SIGTERM / SIGUSR1 (preemption) stop the run after the current step with a checkpoint at that step and
exit status 128 + signal (see hqclip_fast.preemption); running the same command resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from hqclip_fast.checkpoint import Checkpointer, latest_checkpoint
from hqclip_fast.config import (
    TrainConfig,
    checkpoint_folder,
    load_config,
    model_kwargs,
    num_tags,
    save_run_config,
)
from hqclip_fast.data import ClipTokenizer, TagVocab, build_train_loader, normalize_images
from hqclip_fast.eval import EvalSuite
from hqclip_fast.eval_ranks import EvalRanks
from hqclip_fast.loss import HQCLIPLoss
from hqclip_fast.metrics import MetricsLogger
from hqclip_fast.model import create_model
from hqclip_fast.optim import build_optimizer
from hqclip_fast.parallelize import data_parallel_dims, data_parallel_mesh, parallelize_model
from hqclip_fast.preemption import PreemptionWatcher, TrainingPreempted
from hqclip_fast.pretrained import load_pretrained
from hqclip_fast.runtime import Runtime, init_runtime, seed_everything, shutdown_runtime
from hqclip_fast.schedule import build_lr_scheduler

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: the temperature never goes below 1/100


def build_model(cfg: TrainConfig, runtime: Runtime) -> torch.nn.Module:
    model = create_model(cfg.model.name, num_tags=num_tags(cfg), tag_bias_prior=cfg.model.tag_bias_prior,
                         **model_kwargs(cfg))
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained, cfg.model.name, cache_dir=cfg.model.cache_dir)
    if cfg.model.lock_image:
        model.lock_image_tower(cfg.model.lock_image_unlocked_groups, cfg.model.lock_image_freeze_bn_stats)
    if cfg.model.lock_text:
        model.lock_text_tower(cfg.model.lock_text_unlocked_layers)
    model.to(runtime.device)
    param_dtype = torch.bfloat16 if cfg.parallel.param_dtype == "bf16" else None
    mesh = None
    if runtime.world_size > 1:  # HSDP by default: shard within a node, replicate across nodes
        dims = data_parallel_dims(runtime.world_size, runtime.local_world_size, cfg.parallel.dp_replicate,
                                  cfg.parallel.dp_shard)
        mesh = data_parallel_mesh(runtime.device.type, *dims)
    return parallelize_model(model, mesh=mesh, param_dtype=param_dtype, reduce_dtype=torch.float32,
                             activation_checkpointing=cfg.parallel.activation_checkpointing,
                             compile=cfg.parallel.compile, sync_batchnorm=cfg.parallel.sync_batchnorm)


def infinite(loader):
    """Batches forever: a new pass over the data whenever one ends (the loader counts its epochs)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("data.train_data: the loader produced no batches (no valid samples?)")


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= dist.get_world_size()
    return dict(zip(values, stacked.tolist()))


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 parameter or norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# Model outputs that are per-sample features (concatenated over micro-batches under accumulation), and those that
# are parameters the loss reads directly (the temperature, the tag head).
FEATURE_OUTPUTS = ("image_features", "text_features", "neg_text_features", "tag_features")
PARAMETER_OUTPUTS = ("logit_scale", "tag_weight", "tag_bias")


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _cat_tag_ids(parts: list[torch.Tensor]) -> torch.Tensor:
    """Tag id rows of several batches in one tensor: each batch is -1 padded to its own widest row."""
    width = max(part.shape[1] for part in parts)
    return torch.cat([torch.nn.functional.pad(part, (0, width - part.shape[1]), value=-1) for part in parts])


class TrainStep:
    """One optimizer step: forward, HQ-CLIP loss, backward, clipping, AdamW, schedule, logit-scale clamp.

    Called with a list of k micro-batches (gradient accumulation, open_clip's --accum-freq k), the loss is the one
    over all k x b samples, computed by open_clip's feature-cache method: every micro-batch's features first,
    without a graph; then per micro-batch a forward with a graph whose features replace its cached ones in the
    full-batch loss, and a backward. The summed gradients are those of one step on the k x b batch, every HQ-CLIP
    term included. Two differences from open_clip's loop, both for exactness: the temperature and the tag head
    take their gradient once, not k times (the loss reads them directly, not through a micro-batch's features);
    and each recomputation replays its micro-batch's random state, so patch dropout keeps the same patches."""

    def __init__(self, model, loss_fn: HQCLIPLoss, optimizer, scheduler, *, device: torch.device,
                 grad_clip: float, bf16_autocast: bool, use_negatives: bool, use_tags: bool):
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        self.device, self.use_negatives, self.use_tags = device, use_negatives, use_tags
        self.max_norm = grad_clip if grad_clip > 0 else math.inf
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16_autocast \
            else contextlib.nullcontext

    def _inputs(self, batch: dict) -> tuple:
        device = self.device
        images = batch["images"].to(device, non_blocking=True)
        if images.dtype == torch.uint8:  # a loader with normalize_on_device
            images = normalize_images(images)
        texts = batch["pos_tokens"].to(device, non_blocking=True)
        neg_texts = batch["neg_tokens"].to(device, non_blocking=True) if self.use_negatives else None
        tag_ids = batch["tag_ids"].to(device, non_blocking=True) if self.use_tags else None
        return images, texts, neg_texts, tag_ids

    def _loss(self, features: dict, parameters: dict, tag_ids: torch.Tensor | None):
        return self.loss_fn(features["image_features"], features["text_features"], parameters["logit_scale"],
                            neg_text_features=features.get("neg_text_features"),
                            tag_features=features.get("tag_features"), tag_weight=parameters.get("tag_weight"),
                            tag_bias=parameters.get("tag_bias"), tag_targets=tag_ids)

    def backward(self, batch: dict | list[dict]):
        """Gradients of the loss over `batch` (or over all of a list of micro-batches) into .grad; returns the
        loss terms and the model's temperature output."""
        micro = [self._inputs(b) for b in (batch if isinstance(batch, list) else [batch])]
        if len(micro) == 1:
            images, texts, neg_texts, tag_ids = micro[0]
            with self.autocast():
                out = self.model(images, texts, neg_texts=neg_texts)
                loss = self._loss(out, out, tag_ids)
            loss.total.backward()
            return loss, out["logit_scale"]
        tag_ids = _cat_tag_ids([m[3] for m in micro]) if self.use_tags else None
        rng_states, cached = [], []
        with torch.no_grad(), self.autocast():
            for images, texts, neg_texts, _ in micro:
                rng_states.append(_rng_state(self.device))
                out = self.model(images, texts, neg_texts=neg_texts)
                cached.append({k: out[k] for k in FEATURE_OUTPUTS if out.get(k) is not None})
        rng_after = _rng_state(self.device)
        for j, (images, texts, neg_texts, _) in enumerate(micro):
            _set_rng_state(rng_states[j], self.device)
            with self.autocast():
                out = self.model(images, texts, neg_texts=neg_texts)
                features = {k: torch.cat([c[k] for c in cached[:j]] + [out[k]] + [c[k] for c in cached[j + 1:]])
                            for k in cached[0]}
                parameters = {k: out[k] if j == 0 else out[k].detach() for k in PARAMETER_OUTPUTS if k in out}
                loss = self._loss(features, parameters, tag_ids)
            loss.total.backward()
        _set_rng_state(rng_after, self.device)
        return loss, out["logit_scale"]

    def __call__(self, batch: dict | list[dict]) -> dict[str, torch.Tensor]:
        loss, logit_scale = self.backward(batch)
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return {"loss": loss.total, "clip": loss.clip, "hni": loss.hni, "stc": loss.stc, "grad_norm": grad_norm,
                "logit_scale": _full(logit_scale).detach()}


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.runtime = init_runtime(cfg.device, cfg.cpu_threads)
        self.device = self.runtime.device
        self.run_dir = Path(cfg.run_dir)
        seed_everything(cfg.seed)
        if self.runtime.is_main:
            save_run_config(cfg, self.run_dir)

        self.tokenizer = ClipTokenizer(context_length=cfg.data.context_length)
        self.tag_vocab = TagVocab.load(cfg.model.tag_vocab) if cfg.data.use_tags and cfg.model.tag_vocab else None
        self.model = build_model(cfg, self.runtime)
        self.optimizer = build_optimizer(self.model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                         weight_decay_rule=cfg.optim.weight_decay_rule,
                                         betas=cfg.optim.betas, eps=cfg.optim.eps, device=self.device)
        self.scheduler = build_lr_scheduler(
            self.optimizer, schedule=cfg.optim.schedule, warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.steps,
            min_lr_ratio=cfg.optim.min_lr_ratio, cooldown_steps=cfg.optim.cooldown_steps,
            cooldown_power=cfg.optim.cooldown_power, cooldown_end_ratio=cfg.optim.cooldown_end_lr / cfg.optim.lr)
        self.loss_fn = HQCLIPLoss(hni_weight=cfg.loss.hni_weight, stc_weight=cfg.loss.stc_weight,
                                  stc_reduction=cfg.loss.stc_reduction,
                                  negatives_in_softmax=cfg.loss.negatives_in_softmax, impl=cfg.loss.impl,
                                  exchange=cfg.loss.exchange)
        # bf16: FSDP2's mixed-precision policy when there is a process group, else autocast on this process.
        single_process_bf16 = cfg.parallel.param_dtype == "bf16" and not dist.is_initialized()
        self.train_step = TrainStep(
            self.model, self.loss_fn, self.optimizer, self.scheduler, device=self.device,
            grad_clip=cfg.optim.grad_clip, bf16_autocast=single_process_bf16,
            use_negatives=cfg.data.use_negatives and (cfg.loss.hni_weight > 0 or cfg.loss.negatives_in_softmax),
            use_tags=cfg.loss.stc_weight > 0)
        self.loader = build_train_loader(cfg.data, batch_size=cfg.batch_size, rank=self.runtime.rank,
                                         world_size=self.runtime.world_size, seed=cfg.seed,
                                         tokenizer=self.tokenizer, tag_vocab=self.tag_vocab)
        self.eval_suite = EvalSuite.from_config(cfg.eval, image_size=cfg.data.image_size)
        self.checkpointer = Checkpointer(checkpoint_folder(cfg), keep_last=cfg.checkpoint.keep_last,
                                         asynchronous=cfg.checkpoint.async_save)
        self.step = 0
        if cfg.checkpoint.resume:
            self._resume()
        wandb = dict(project=cfg.log.wandb_project, name=cfg.log.wandb_name, notes=cfg.log.wandb_notes,
                     config=OmegaConf.to_container(OmegaConf.structured(cfg))) if cfg.log.wandb else None
        self.metrics = MetricsLogger(self.run_dir, enabled=self.runtime.is_main, resume_step=self.step,
                                     tensorboard=cfg.log.tensorboard, wandb=wandb)

    def _resume(self) -> None:
        path = latest_checkpoint(self.checkpointer.directory)
        if path is None:
            return
        state = self.checkpointer.load(path, self.model, self.optimizer)
        # The schedule's shape (warmup, total steps) comes from this run's config, so a run can be extended
        # with a larger `steps`; only the position is restored. Same config: the very same learning rates.
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(self.scheduler.lr_lambdas)})
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                          self.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        elastic = hasattr(self.loader, "load_elastic") and not self.loader.resumes_exactly(state["loader"])
        if elastic:  # another number of ranks, workers or batch size: every saved rank's loader state is needed
            self.loader.load_elastic(s["loader"] for s in self.checkpointer.saved_states(path))
        else:  # same layout (the DALI loader resumes only so, and says why not otherwise)
            self.loader.load_state_dict(state["loader"])
        self.step = state["step"]
        if self.runtime.is_main:
            how = f" (elastic: saved by {state['world_size']} ranks, {state['loader']['workers']} workers, batch " \
                  f"{state['loader']['batch_size']})" if elastic else ""
            tqdm.write(f"resumed from {path} at step {self.step}{how}")

    def _save(self):
        return self.checkpointer.save(self.step, self.model, self.optimizer,
                                      {"scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict()})

    def _stop_for_preemption(self, signum: int, checkpoint) -> None:
        self.checkpointer.wait()  # the checkpoint must be whole before the process goes
        stopped = TrainingPreempted(signum, self.step, checkpoint)
        self.metrics.log(self.step, "preempted", {"signal": stopped.signal.name, "checkpoint": str(checkpoint)})
        self.metrics.close()
        if self.runtime.is_main:
            tqdm.write(f"{stopped} (exit status {stopped.exit_status})")
        raise stopped

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            with self.train_step.autocast():
                results = self.eval_suite.run(self.model, self.tokenizer, self.device,
                                              ranks=EvalRanks.current(self.device))
        finally:
            self.model.train()
        self.metrics.log(self.step, "eval", results)
        return results

    def fit(self, preemption: PreemptionWatcher | None = None) -> dict:
        """Train to `cfg.steps`. With a `preemption` watcher, a signal it records stops the run at the end of
        the current step, after a checkpoint at that step: TrainingPreempted is raised."""
        cfg, runtime = self.cfg, self.runtime
        global_batch = cfg.batch_size * runtime.world_size * cfg.optim.accum_freq
        batches = infinite(self.loader)
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (runtime.is_main and cfg.log.progress_bar))
        start_step, start_time = self.step, time.perf_counter()
        window_start, window_steps, window_sums = start_time, 0, {}
        last_eval: dict[str, float] = {}
        self.model.train()
        while self.step < cfg.steps:
            lr = self.optimizer.param_groups[0]["lr"]
            accum = cfg.optim.accum_freq
            stats = self.train_step([next(batches) for _ in range(accum)] if accum > 1 else next(batches))
            for name, value in stats.items():  # logged as means over the logging window
                window_sums[name] = window_sums.get(name, 0.0) + value.detach().float()
            self.step += 1
            window_steps += 1
            bar.update(1)
            last = self.step == cfg.steps
            stop_signal = preemption.requested(self.step) if preemption is not None else 0  # ranks agree
            if self.step % cfg.log.every_steps == 0 or last or stop_signal:
                values = mean_over_ranks({name: total / window_steps for name, total in window_sums.items()})
                now = time.perf_counter()
                samples_per_s = window_steps * global_batch / (now - window_start)
                window_start, window_steps, window_sums = now, 0, {}
                data = self.loader.stats()
                self.metrics.log(self.step, "train", {
                    **values, "lr": lr, "samples_per_s": samples_per_s,
                    "samples_skipped": data["samples_skipped"], "samples_ok": data["samples_ok"],
                    **({"samples_unannotated": data["samples_unannotated"]} if "samples_unannotated" in data else {})})
                bar.set_postfix(loss=f"{values['loss']:.3f}", samples_s=f"{samples_per_s:.0f}", refresh=False)
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and not (last or stop_signal):
                self.evaluate()
            if last or stop_signal or (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0):
                checkpoint = self._save()
            if stop_signal:
                bar.close()
                self._stop_for_preemption(stop_signal, checkpoint)
            self.checkpointer.poll()  # commits a finished background save
        self.checkpointer.wait()
        bar.close()
        train_seconds = time.perf_counter() - start_time
        if self.eval_suite.enabled:
            last_eval = self.evaluate()
        steps_run = self.step - start_step
        summary = {
            "steps": self.step,
            "steps_this_run": steps_run,
            "global_batch_size": global_batch,
            "train_s": train_seconds,
            "samples_per_s": steps_run * global_batch / train_seconds if steps_run else 0.0,
            "data": self.loader.stats(),
            **last_eval,
        }
        self.metrics.close()
        return summary


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the training described by `cfg`; returns a summary with the final evaluation.

    SIGTERM / SIGUSR1 while it runs: the current step finishes (on several ranks: the step at which the ranks'
    next vote says so, see hqclip_fast.preemption), a checkpoint is written at that step and
    TrainingPreempted is raised (hqclip-train then exits with 128 + the signal number). The previous signal
    handlers are restored when train() returns or raises."""
    try:
        with PreemptionWatcher(vote_every=cfg.checkpoint.preemption_vote_every) as preemption:
            return Trainer(cfg).fit(preemption)
    finally:
        shutdown_runtime()


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hqclip-train", description="Train CLIP with the HQ-CLIP loss.")
    parser.add_argument("--config", default=None, help="YAML preset (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as err:
        parser.error(str(err))
    try:
        train(cfg)
    except TrainingPreempted as stopped:  # the trainer has logged it; the status tells the scheduler to requeue
        raise SystemExit(stopped.exit_status) from None


if __name__ == "__main__":
    cli()
