"""No host sync in a training step: on 2 gloo ranks, every torch.distributed collective and every host read
(Tensor.item / tolist / numpy / cpu, int() / float() / bool() of a tensor) that hqclip_fast's own code calls is
counted per step of a real training run and must be the documented minimum (README, "Host syncs per step"):

- every step: the loss's feature exchange, 3 all-gathers forward (images, texts, negatives) and their 3
  reduce-scatters backward; no host read (tag ids are range-checked on the device) except, with the chunked
  implementation that CPU ranks use, one per forward tile of local rows x local columns (here 1; the Triton
  kernels have none);
- once per batch shape (the first step): one all-gather of the local shapes and one read of them;
- every checkpoint.preemption_vote_every steps: one background all-reduce of the vote, and one step later one
  int() of its CPU result;
- every log.every_steps steps: one all-reduce of the logged means and one read of them.

Collectives that torch issues itself (FSDP2's all-gathers and reduce-scatters, the gradient norm's all-reduce,
optimizer internals) are not ours to remove and are not counted: only calls made directly from hqclip_fast."""

import collections
import json
import os
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from dist_helpers import free_port

from hqclip_fast.data.synthetic import write_synthetic

STEPS, VOTE_EVERY, LOG_EVERY = 7, 2, 3
HOST_READS = ("item", "tolist", "numpy", "cpu", "__int__", "__float__", "__bool__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single", "broadcast",
               "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv", "gather", "scatter", "reduce",
               "all_gather_object", "broadcast_object_list", "monitored_barrier")


def expected(step: int) -> collections.Counter:
    from hqclip_fast.loss import gather

    counts = collections.Counter({gather._all_gather_single.__name__: 3, gather._reduce_scatter_single.__name__: 3,
                                  "__bool__": 1})
    if step == 1:
        counts.update({"all_gather": 1, "tolist": 1})
    if step % VOTE_EVERY == 0:
        counts["all_reduce"] += 1
    if step % VOTE_EVERY == 1 and step > 1:
        counts["__int__"] += 1
    if step % LOG_EVERY == 0:
        counts.update({"all_reduce": 1, "tolist": 1})
    return counts



def _install_counters(events: list) -> None:
    """Wrap the collectives and host reads; record a call when the calling frame is hqclip_fast's code."""
    import torch
    import torch.distributed as dist

    package = str(Path(sys.modules["hqclip_fast"].__file__).parent)

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                events.append(name)
            return fn(*args, **kwargs)
        return wrapper

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    originals = {}
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None:
            originals[fn] = wrapped = counting(fn.__name__, fn)
            setattr(dist, name, wrapped)
    for module_name, module in list(sys.modules.items()):  # modules that bound a collective at import time
        if module_name.startswith("hqclip_fast"):
            for attr, value in list(vars(module).items()):
                if callable(value) and value in originals:
                    setattr(module, attr, originals[value])


def _worker(rank, world_size, port, synthetic, run_dir, out_dir):
    import torch

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import hqclip_fast.loss.chunked  # noqa: F401  (imported before the counters are installed)
    from hqclip_fast.config import load_config
    from hqclip_fast.train import TrainStep, train

    steps = []  # per training step, the calls from its start to the next step's start
    original = TrainStep.__call__

    def marked(self, batch):
        steps.append([])
        return original(self, batch)

    TrainStep.__call__ = marked
    ignored = []
    events = type("Events", (), {"append": lambda self, name: (steps[-1] if steps else ignored).append(name)})()
    _install_counters(events)
    train(load_config(None, [
        f"run_dir={run_dir}", f"steps={STEPS}", "batch_size=4", "device=cpu", "cpu_threads=1",
        "model.name=hqclip-micro", f"model.tag_vocab={synthetic['tags']}", f"data.train_data={synthetic['train']}",
        "data.image_size=32", "data.context_length=36", "data.workers=0", "data.shuffle_buffer=8",
        "loss.hni_weight=1.0", "loss.stc_weight=0.5", "loss.impl=chunked", "checkpoint.every_steps=0",
        f"checkpoint.preemption_vote_every={VOTE_EVERY}", f"log.every_steps={LOG_EVERY}",
        "log.progress_bar=false", "log.tensorboard=false"]))
    counts = [collections.Counter(step) for step in steps]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(counts))


@pytest.mark.distributed
def test_a_training_step_makes_only_the_documented_collectives_and_no_host_read(tmp_path):
    synthetic = write_synthetic(str(tmp_path / "data"), num_samples=32, shard_size=16, seed=6, image_size=32,
                                num_zeroshot=4, num_hardneg=4)
    out = tmp_path / "out"
    out.mkdir()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, free_port(), synthetic, str(tmp_path / "run"), str(out)), nprocs=2, join=True)
    for rank in range(2):
        counts = json.loads((out / f"rank{rank}.json").read_text())
        assert len(counts) == STEPS
        # The last step also writes the final checkpoint: not a training step's cost.
        for step, got in enumerate(counts[:-1], start=1):
            assert collections.Counter(got) == expected(step), f"rank {rank}, step {step}"
