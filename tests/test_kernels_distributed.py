"""Distributed impl="triton" on 2 gloo CPU processes (Triton interpreter) against impl="reference".

Both paths are checked per rank: the overlapped ring (impl="triton", exchange="ring"; `contrastive_sums_ring`
on local features) and the plain path (`contrastive_sums` on features from the
autograd all-gather). Each rank's values and
gradients must equal the reference's for the same rank, i.e. open_clip's local_loss + gather_with_grad
semantics of issue 2.

gloo ranks hold CPU tensors, so the ranks run the kernels through Triton's interpreter also on a GPU machine:
the `interpreter_env` fixture (tests/conftest.py) hands TRITON_INTERPRET=1 to the spawned processes.
"""

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from dist_helpers import gloo_group

BATCH, DIM = 7, 40  # local batch; global 14: tiles of 16 straddle the rank boundary
CASES = [  # (dtype, negatives, negatives_in_softmax, hni_weight)
    (torch.float32, False, True, 0.0),
    (torch.float32, True, False, 0.5),
    (torch.float32, True, True, 0.5),
    (torch.bfloat16, True, True, 0.5),
]


def _global_inputs(world, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    feats = [F.normalize(torch.randn(world * BATCH, DIM, generator=g), dim=1).to(dtype) for _ in range(3)]
    return feats, torch.tensor(23.7)


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _check(name, got, want, dtype):
    if dtype == torch.float32:
        tol = dict(rtol=2e-4, atol=2e-5)
    else:
        tol = dict(rtol=2e-2, atol=max(2e-3, 2e-2 * want.float().abs().max().item()))
    torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{name}: {m}")


def _worker(rank, world, init_file, cases):
    torch.set_num_threads(1)
    from hqclip_kernels._common import interpreting

    assert interpreting(), "gloo ranks launch Triton kernels on CPU tensors: they need TRITON_INTERPRET=1"
    with gloo_group(init_file, rank, world):
        from hqclip_fast.loss import hqclip_loss
        from hqclip_fast.loss.fused import contrastive_sums
        from hqclip_fast.loss.gather import all_gather_with_grad

        for seed, (dtype, negatives, in_softmax, hni_weight) in enumerate(cases):
            (image, text, neg), scale = _global_inputs(world, dtype, seed)
            rows = slice(rank * BATCH, rank * BATCH + BATCH)
            local = [image[rows], text[rows], neg[rows]]

            results = {}
            for impl in ("reference", "triton"):
                leaves = [_leaf(x) for x in local] + [_leaf(scale)]
                out = hqclip_loss(leaves[0], leaves[1], leaves[3],
                                  neg_text_features=leaves[2] if negatives else None,
                                  negatives_in_softmax=in_softmax, hni_weight=hni_weight, impl=impl,
                                  exchange="ring" if impl == "triton" else "all_gather")
                out.total.backward()
                results[impl] = (out.total, out.hni, [x.grad for x in leaves])

            leaves = [_leaf(x) for x in local] + [_leaf(scale)]
            image_all, text_all, neg_all = (all_gather_with_grad(x) for x in leaves[:3])
            i2t, t2i, hni = contrastive_sums(
                image_all, text_all, leaves[3], rows=(rows.start, rows.stop),
                softmax_negatives=neg_all if negatives and in_softmax else None,
                pair_negatives=neg_all[rows] if negatives and hni_weight > 0 else None)
            total = (i2t + t2i) / (2 * BATCH) + hni_weight * hni / BATCH
            total.backward()
            results["gathered"] = (total, hni / BATCH, [x.grad for x in leaves])

            ref_total, ref_hni, ref_grads = results["reference"]
            for impl in ("triton", "gathered"):
                got_total, got_hni, got_grads = results[impl]
                where = f"rank {rank} case {seed} {impl}"
                _check(f"{where} total", got_total, ref_total, torch.float32)
                _check(f"{where} hni", got_hni, ref_hni, torch.float32)
                names = ("image", "text", "neg", "scale")
                for name, got, want in zip(names, got_grads, ref_grads):
                    if want is None:
                        assert got is None or not got.any(), f"{where} {name}: unexpected gradient"
                        continue
                    assert got is not None, f"{where} {name}: missing gradient"
                    _check(f"{where} grad {name}", got, want, dtype)


def _spawn(world, cases):
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(world, init_file, cases), nprocs=world, join=True)


@pytest.mark.distributed
def test_two_ranks_match_reference_per_rank(interpreter_env):
    _spawn(2, CASES)


@pytest.mark.distributed
def test_three_ranks_match_reference_per_rank(interpreter_env):
    """Odd ring: gradient accumulators pass through a rank that owns neither end of the chunk."""
    _spawn(3, [(torch.float32, True, True, 0.5)])
