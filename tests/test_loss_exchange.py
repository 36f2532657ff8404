"""loss.exchange: the cost model that `auto` follows, and both exchanges (ring, all-gather) exact against the
fp64 reference on 2, 3, 5 and 8 gloo ranks, every loss term and every gradient.

The ring exists in the Triton backend only, so the ranks run impl="triton" through Triton's CPU interpreter
(tests/conftest.py's `interpreter_env`), fp32 inputs, at tiny shapes to stay fast."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import gloo_group
from test_loss_distributed import OPTIONS, PER_SAMPLE, REPLICATED, global_inputs, run_loss

from hqclip_fast.loss import HQCLIPLoss, hqclip_loss
from hqclip_fast.loss.exchange import (
    ExchangeCosts,
    ExchangeProblem,
    all_gather_seconds,
    choose_exchange,
    ring_seconds,
)

ROOT = Path(__file__).resolve().parent.parent


def test_auto_follows_the_cost_model():
    # Small per-rank batches across nodes: 2n latency-bound hops lose to one all-gather.
    xlarge = ExchangeProblem(ranks=512, local_batch=176, dim=768)
    assert ring_seconds(xlarge) > all_gather_seconds(xlarge)
    assert choose_exchange(xlarge) == "all_gather"
    # Large per-rank batches on one node: the ring hides its hops under one sweep per chunk, where the
    # all-gather path sweeps twice.
    compute_bound = ExchangeProblem(ranks=8, local_batch=8192, dim=512)
    assert ring_seconds(compute_bound) < all_gather_seconds(compute_bound)
    assert choose_exchange(compute_bound) == "ring"
    assert choose_exchange(compute_bound, ring_available=False) == "all_gather"
    # Gathered features over the memory budget: the ring, whatever the time.
    assert choose_exchange(xlarge, ExchangeCosts(gather_memory_budget=xlarge.gathered_bytes - 1)) == "ring"
    # Crossing nodes switches to the slower links.
    one_node, two_nodes = ExchangeProblem(8, 256, 512), ExchangeProblem(16, 256, 512)
    assert all_gather_seconds(two_nodes) > 2 * all_gather_seconds(one_node)


def test_committed_cost_table_is_the_scripts_output():
    import importlib.util

    spec = importlib.util.spec_from_file_location("loss_exchange_model", ROOT / "benchmarks" / "loss_exchange_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    committed = json.loads((ROOT / "benchmarks" / "results" / "loss_exchange_model.json").read_text())
    assert committed["rows"] == script.rows()
    assert {r["ranks"] for r in committed["rows"]} == {8, 64, 512}


def test_bad_exchange_is_refused():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="exchange"):
        hqclip_loss(x, x, 1.0, exchange="tree")
    with pytest.raises(ValueError, match="exchange"):
        HQCLIPLoss(exchange="tree")


WORLD_SIZES = (2, 3, 5, 8)


def _worker(rank, world_size, out_dir):
    """One set of 8 processes serves every group size: the first n ranks form the group of size n."""
    torch.set_num_threads(1)
    with gloo_group(Path(out_dir) / "init", rank, world_size):
        for n in WORLD_SIZES:
            group = dist.new_group(list(range(n)))  # collective over all ranks, members or not
            if rank >= n:
                continue
            full = global_inputs(n, torch.float32)
            b = len(full["image_features"]) // n
            local = {k: v if k in REPLICATED else v[rank * b:(rank + 1) * b] for k, v in full.items()}
            results = {exchange: run_loss(local, "triton", **OPTIONS, exchange=exchange, group=group)
                       for exchange in ("ring", "all_gather")}
            if n == 2:  # chunked has no ring: asking for one is an error, on every rank alike
                try:
                    run_loss(local, "chunked", **OPTIONS, exchange="ring", group=group)
                except ValueError as err:
                    results["chunked_ring_error"] = str(err)
            torch.save(results, Path(out_dir) / f"n{n}_rank{rank}.pt")



@pytest.mark.distributed
def test_ring_and_all_gather_equal_the_fp64_reference_on_2_3_5_8_ranks(tmp_path, interpreter_env):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(max(WORLD_SIZES), str(tmp_path)), nprocs=max(WORLD_SIZES), join=True)
    tol = dict(rtol=2e-5, atol=2e-6)
    for n in WORLD_SIZES:
        results = [torch.load(tmp_path / f"n{n}_rank{r}.pt", weights_only=True) for r in range(n)]
        expected_terms, expected_grads = run_loss(global_inputs(n, torch.float64), "reference", **OPTIONS)
        for exchange in ("ring", "all_gather"):
            for term, expected in expected_terms.items():
                mean = sum(r[exchange][0][term].double() for r in results) / n
                torch.testing.assert_close(mean, expected, **tol, msg=f"n={n} {exchange} {term}")
            for name in PER_SAMPLE:  # the concatenated local gradients / n (DDP averaging)
                got = torch.cat([r[exchange][1][name] for r in results]).double() / n
                torch.testing.assert_close(got, expected_grads[name], **tol, msg=f"n={n} {exchange} {name}")
            for name in REPLICATED:
                got = sum(r[exchange][1][name].double() for r in results) / n
                torch.testing.assert_close(got, expected_grads[name], **tol, msg=f"n={n} {exchange} {name}")
        if n == 2:
            assert all("impl='triton'" in r["chunked_ring_error"] for r in results)
