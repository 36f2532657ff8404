"""hqclip_kernels ops on their own: statistics and gradients against plain PyTorch on materialized logits,
multi-panel backward, the forward's multi-group sweep and its O(M + N) statistics buffers, custom-op
registration (opcheck), torch.compile without graph breaks, bad input.

Kernels run on the `device` fixture (tests/conftest.py): the GPU when there is one, else the CPU through
Triton's interpreter, so shapes are small and odd. References are fp64 on materialized logits, rounded to
fp32 at the end.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hqclip_kernels import contrastive_lse, tag_bce_sum
from hqclip_kernels._common import Tiles
from hqclip_kernels.contrastive import lse_forward, sweep_grid

# fp32 outputs (also from bf16 inputs): the kernels' tile products are exact in fp32 (ieee for fp32 inputs,
# bf16 x bf16 products on the GPU's tensor cores or upcast in the interpreter), so what remains is fp32
# accumulation over D <= 40 and the GPU's exp2/log2 approximations (a few fp32 ulps): far below 2e-4
# relative on values up to |s| = 100, 2e-5 absolute near 0.
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5)}


def assert_grad_close(got, want, dtype):
    """bf16 gradients are rounded once at the end: allow about two bf16 ulps of the largest entry."""
    want = want.float()
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2 * want.abs().max().item())
    torch.testing.assert_close(got.float(), want, **tol)


def _unit(rows, dim, dtype, g, device):
    """Unit rows drawn on the CPU (the same values on every device), leaves on `device`."""
    return F.normalize(torch.randn(rows, dim, generator=g), dim=1).to(device, dtype).requires_grad_()


def _reference_stats(q, k1, k2, scale, offset):
    """(row lse, column lse over k1, positives) of s * q @ [k1; k2].T in fp64, as fp32."""
    keys = k1 if k2 is None else torch.cat([k1, k2])
    logits = scale.double() * q.double() @ keys.double().T
    rows = torch.arange(q.shape[0], device=q.device)
    stats = logits.logsumexp(1), logits[:, :k1.shape[0]].logsumexp(0), logits[rows, rows + offset]
    return tuple(x.float() for x in stats)


def _grads(outputs, weights, leaves):
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, [x for x in leaves if x is not None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_k2", [False, True], ids=["k1", "k1+k2"])
def test_contrastive_lse_multi_panel_matches_materialized(with_k2, dtype, device):
    g = torch.Generator().manual_seed(1)
    q, k1 = _unit(37, 40, dtype, g, device), _unit(37, 40, dtype, g, device)
    k2 = _unit(21, 40, dtype, g, device) if with_k2 else None
    scale = torch.tensor(31.0, device=device, requires_grad=True)
    weights = [torch.randn(37, generator=g).to(device) for _ in range(3)]
    leaves = [q, k1, k2, scale]

    got = contrastive_lse(q, k1, k2, scale, col_stats=True, diag_offset=0, panel_size=16)
    want = _reference_stats(q, k1, k2, scale, 0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    grad_leaves = [x for x in leaves if x is not None]
    for leaf, a, b in zip(grad_leaves, _grads(got, weights, leaves), _grads(want, weights, leaves)):
        assert a.dtype == leaf.dtype
        assert_grad_close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("panel_axis", ["rows", "cols", "two_pass"])
def test_pairwise_negative_logits_from_the_sweep(panel_axis, dtype, device):
    """neg_diag[i] = s <q_i, k2_{i + offset}> (HNI's pairwise logits) comes out of the same sweep, and its
    gradient joins the logit gradient: values and every gradient against the materialized reference."""
    from hqclip_kernels.contrastive import lse_backward

    g = torch.Generator().manual_seed(13)
    q, k1, k2 = _unit(23, 24, dtype, g, device), _unit(23, 24, dtype, g, device), _unit(31, 24, dtype, g, device)
    scale = torch.tensor(37.0, device=device, requires_grad=True)
    row_lse, col_lse, diag, neg_diag = contrastive_lse(q, k1, k2, scale, col_stats=True, diag_offset=0,
                                                       neg_diag_offset=5, panel_size=16)
    ref = _reference_stats(q, k1, k2, scale, 0)
    ref_neg = (scale.double() * (q.double() * k2[5:28].double()).sum(1)).float()
    for got, want in zip((row_lse, col_lse, diag, neg_diag), (*ref, ref_neg)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    weights = [torch.randn(n, generator=g).to(device) for n in (23, 23, 23, 23)]
    leaves = [q, k1, k2, scale]
    want = _grads([*ref, ref_neg], weights, leaves)
    for leaf, a, b in zip(leaves, _grads([row_lse, col_lse, diag, neg_diag], weights, leaves), want):
        assert_grad_close(a, b, dtype if leaf is not scale else torch.float32)
    # The same through lse_backward on each panel layout.
    got = lse_backward(q.detach(), k1.detach(), k2.detach(), scale.detach(), row_lse.detach(), col_lse.detach(),
                       *weights[:3], 0, grad_neg_diag=weights[3], neg_diag_offset=5, panel_size=16,
                       panel_axis=panel_axis, tiles=Tiles(16, 16, 16))
    for leaf, a, b in zip(leaves, [*got[:3], got[3] + got[4]], want):
        assert_grad_close(a, b, dtype if leaf is not scale else torch.float32)


def test_contrastive_lse_rows_only_with_offset(device):
    """A rank's rows against gathered columns: positives sit at column i + offset."""
    g = torch.Generator().manual_seed(2)
    q, k1 = _unit(7, 16, torch.float32, g, device), _unit(23, 16, torch.float32, g, device)
    scale = torch.tensor(100.0, device=device, requires_grad=True)
    row_lse, col_lse, diag, _ = contrastive_lse(q, k1, None, scale, diag_offset=9)
    assert col_lse.numel() == 0
    ref_row, _, ref_diag = _reference_stats(q, k1, None, scale, 9)
    torch.testing.assert_close(row_lse, ref_row, **TOL[torch.float32])
    torch.testing.assert_close(diag, ref_diag, **TOL[torch.float32])
    weights = [torch.randn(7, generator=g).to(device), None, torch.randn(7, generator=g).to(device)]
    got = _grads([row_lse, diag], [weights[0], weights[2]], [q, k1, scale])
    want = _grads([ref_row, ref_diag], [weights[0], weights[2]], [q, k1, scale])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# (M, N1, N2, col_stats, diag_offset, panel_axis, panel_size): 16 x 16 tiles. Row panels of 20 rows (not a
# block multiple: the last panel is short); column panels of 2 tiles, one of them straddling k1 and k2 (k1's
# last tile is short); a single panel; rows-only statistics with offset positives; both in two passes.
BACKWARD_PANELS = [
    (37, 37, 21, True, 0, "rows", 20),
    (37, 37, 21, True, 0, "cols", 32),
    (29, 45, None, True, 11, "cols", 16),
    (13, 31, 9, False, 5, "rows", 13),
    (23, 23, 19, True, 0, "cols", 1 << 10),  # one panel: every gradient complete at once
    (37, 37, 21, True, 0, "two_pass", 20),  # row panels for dq, then column panels for dk
    (29, 45, None, False, 11, "two_pass", 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M, N1, N2, col_stats, offset, axis, size", BACKWARD_PANELS)
def test_backward_panels_on_either_axis_match_materialized(M, N1, N2, col_stats, offset, axis, size, dtype, device):
    """Row panels (q's gradient complete per panel, the keys' summed in fp32), column panels (the reverse)
    and two passes (both complete per panel) give the reference gradients, in the inputs' dtype, and
    bit-identical results when run twice."""
    from hqclip_kernels.contrastive import lse_backward

    g = torch.Generator().manual_seed(11)
    q, k1 = _unit(M, 24, dtype, g, device), _unit(N1, 24, dtype, g, device)
    k2 = _unit(N2, 24, dtype, g, device) if N2 else None
    scale = torch.tensor(47.0, device=device, requires_grad=True)
    leaves = [x for x in (q, k1, k2, scale) if x is not None]
    weights = [torch.randn(n, generator=g).to(device) for n in (M, N1, M)]
    stats = _reference_stats(q, k1, k2, scale, offset)
    outputs = [stats[0], stats[1], stats[2]] if col_stats else [stats[0], stats[2]]
    used = weights if col_stats else [weights[0], weights[2]]
    want = _grads(outputs, used, leaves)

    row_lse, col_lse, _ = (x.detach() for x in stats)
    col_lse = col_lse if col_stats else col_lse[:0]
    grad_col = weights[1] if col_stats else weights[1][:0]
    tiles = Tiles(16, 16, 16)

    def run():
        dq, dk1, dk2, ds_row, ds_col = lse_backward(
            q.detach(), k1.detach(), None if k2 is None else k2.detach(), scale.detach(), row_lse, col_lse,
            weights[0], grad_col, weights[2], offset, panel_size=size, panel_axis=axis, tiles=tiles)
        return [x for x in (dq, dk1, dk2) if x is not None] + [ds_row + ds_col]

    got = run()
    for leaf, a, b in zip(leaves, got, want):
        assert a.dtype == (leaf.dtype if leaf is not scale else torch.float32)
        assert_grad_close(a, b, dtype if leaf is not scale else torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(got, run()))


@pytest.mark.parametrize("axis", ["rows", "cols", "two_pass"])
def test_backward_adds_into_caller_buffers(axis, device):
    """The ring's form: gradients added into the caller's fp32 buffers, which already hold something."""
    from hqclip_kernels.contrastive import lse_backward

    g = torch.Generator().manual_seed(12)
    q, k1, k2 = (_unit(n, 24, torch.bfloat16, g, device).detach() for n in (19, 27, 10))
    scale = torch.tensor(23.0, device=device)
    row_lse, col_lse, _ = (x.detach() for x in _reference_stats(q, k1, k2, scale, 0))
    grads = [torch.randn(n, generator=g).to(device) for n in (19, 27, 19)]
    args = (q, k1, k2, scale, row_lse, col_lse, *grads, 0)
    want = lse_backward(*args, panel_size=1 << 10, tiles=Tiles(16, 16, 16))
    start = [torch.randn(x.shape, generator=g).to(device) for x in (q, k1, k2)]
    buffers = [x.clone() for x in start]
    got = lse_backward(*args, panel_size=16, panel_axis=axis, tiles=Tiles(16, 16, 16), accumulate=buffers)
    for buffer, before, total, grad in zip(buffers, start, got, want):
        assert total is buffer and total.dtype == torch.float32
        assert_grad_close(total - before, grad.float(), torch.bfloat16)


# (M, N1, N2, col_stats, diag_offset, scale, programs): 16 x 16 tiles, ragged last groups on both axes,
# K1 and K2 tiles sharing a column group, rows-only sweeps with an offset diagonal.
SWEEPS = [
    (75, 75, 35, True, 0, 100.0, 9),   # 5 row blocks in groups 2+2+1; 8 tiles in groups 3+3+2
    (75, 91, None, True, 9, 31.0, 9),  # 6 tiles in groups 2+2+2 (with a short last tile), offset positives
    (40, 70, 20, False, 13, 100.0, 6),  # rows only: 3 row groups of 1 block; 7 tiles in groups 4+3
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M, N1, N2, col_stats, offset, scale, programs", SWEEPS)
def test_forward_sweep_across_groups_matches_materialized(M, N1, N2, col_stats, offset, scale, programs, dtype,
                                                          device):
    """Several row and column groups: column statistics merged across a group's row blocks, partials reduced
    across groups; bit-identical when run twice."""
    tiles = Tiles(16, 16, 16)
    row_blocks, col_tiles = math.ceil(M / 16), math.ceil(N1 / 16) + math.ceil((N2 or 0) / 16)
    grid = sweep_grid(row_blocks, col_tiles, col_stats, programs)
    assert grid.row_groups > 1 and grid.col_groups > 1, grid
    assert grid.blocks_per_group > 1 or grid.tiles_per_group > 1, grid  # the in-program merges run

    g = torch.Generator().manual_seed(6)
    q, k1 = _unit(M, 24, dtype, g, device).detach(), _unit(N1, 24, dtype, g, device).detach()
    k2 = _unit(N2, 24, dtype, g, device).detach() if N2 else None
    scale = torch.tensor(scale, device=device)
    got = lse_forward(q, k1, k2, scale, col_stats, offset, tiles=tiles, programs=programs)
    ref_row, ref_col, ref_diag = _reference_stats(q, k1, k2, scale, offset)
    torch.testing.assert_close(got[0], ref_row, **TOL[torch.float32])
    torch.testing.assert_close(got[2], ref_diag, **TOL[torch.float32])
    if col_stats:
        torch.testing.assert_close(got[1], ref_col, **TOL[torch.float32])
    else:
        assert got[1].numel() == 0
    again = lse_forward(q, k1, k2, scale, col_stats, offset, tiles=tiles, programs=programs)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.parametrize("programs", [4, 528, 1056], ids=["interpreter", "h100", "2xh100"])
@pytest.mark.parametrize("col_stats", [True, False], ids=["rows+cols", "rows"])
def test_forward_statistics_buffers_are_linear_in_batch(col_stats, programs):
    """The forward's partial statistics grow like M + N, not M x N / BLOCK_M (at B = 32768 and 128-row blocks
    one partial per row block and column would be 256 x 32768 floats). Checked on the grid arithmetic alone,
    at sizes the interpreter could never run; the grid still fills the device and covers every tile."""
    block = 128
    for batch in (4096, 32768, 1 << 20):
        M = N1 = N2 = batch  # negatives as extra columns: twice the column tiles
        row_blocks, col_tiles = math.ceil(M / block), math.ceil(N1 / block) + math.ceil(N2 / block)
        grid = sweep_grid(row_blocks, col_tiles, col_stats, programs)
        row_shape, col_shape = grid.partial_shapes(M, N1, col_stats)
        floats = math.prod(row_shape) + math.prod(col_shape)
        if batch >= 32768:
            assert floats < row_blocks * N1 / 2  # one partial per row block and column: the O(B^2) design
        assert (grid.row_groups - 1) * grid.blocks_per_group < row_blocks <= grid.row_groups * grid.blocks_per_group
        assert (grid.col_groups - 1) * grid.tiles_per_group < col_tiles <= grid.col_groups * grid.tiles_per_group
        assert programs // 4 <= grid.row_groups * grid.col_groups <= 2 * programs
        # A bound on floats / (M + N1) that does not depend on the batch.
        if col_stats:
            assert floats <= 2 * (math.isqrt(programs) + 2) * (M + N1)
        else:  # rows only: row groups first, so one partial per row once there are enough row blocks
            assert col_shape[0] == 0
            assert floats <= math.ceil(programs / min(row_blocks, programs)) * M


def _reference_bce(features, weight, bias, targets):
    """Summed BCE-with-logits over the materialized multi-hot labels, in fp64, as fp32."""
    logits = features.double() @ weight.double().T + (0 if bias is None else bias.double())
    labels = torch.zeros(logits.shape[0], logits.shape[1] + 1, dtype=torch.float64, device=logits.device)
    labels.scatter_(1, torch.where(targets < 0, logits.shape[1], targets), 1.0)
    return F.binary_cross_entropy_with_logits(logits, labels[:, :-1], reduction="sum").float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_tag_bce_multi_panel_matches_materialized(with_bias, dtype, device):
    g = torch.Generator().manual_seed(3)
    features = _unit(37, 40, dtype, g, device)
    weight = (0.5 * torch.randn(13, 40, generator=g)).to(device, dtype).requires_grad_()
    bias = torch.randn(13, generator=g).to(device).requires_grad_() if with_bias else None
    targets = torch.randint(-1, 13, (37, 6), generator=g)
    targets[1] = torch.tensor([5, 5, 5, -1, 2, 2])  # repeated ids count once
    targets[2] = -1
    targets = targets.to(device)
    leaves = [x for x in (features, weight, bias) if x is not None]
    got = tag_bce_sum(features, weight, bias, targets, panel_rows=16)
    want = _reference_bce(features, weight, bias, targets)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    for leaf, a, b in zip(leaves, torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        assert a.dtype == leaf.dtype
        assert_grad_close(a, b, dtype)


def test_custom_ops_pass_opcheck(device):
    g = torch.Generator().manual_seed(4)
    q, k1, k2 = (_unit(n, 16, torch.float32, g, device) for n in (7, 7, 9))
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.hqclip.contrastive_lse.default, (q, k1, k2, scale, True, 0, 2, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    targets = torch.tensor([[0, 3, -1]] * 7, device=device)
    weight = torch.randn(5, 16, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.hqclip.tag_bce_sum.default, (q, weight, bias, targets, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_ops_compile_without_graph_breaks(device):
    g = torch.Generator().manual_seed(5)
    q, k1 = _unit(7, 16, torch.float32, g, device), _unit(7, 16, torch.float32, g, device)
    weight = torch.randn(5, 16, generator=g).to(device).requires_grad_()
    targets = torch.tensor([[0, 3, -1]] * 7, device=device)
    scale = torch.tensor(20.0, device=device, requires_grad=True)

    def loss_fn(q, k1, weight, scale):
        row_lse, col_lse, diag, _ = contrastive_lse(q, k1, None, scale, col_stats=True, diag_offset=0)
        return (row_lse + col_lse - 2 * diag).mean() + tag_bce_sum(q, weight, None, targets) / 35

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    leaves = [q, k1, weight, scale]
    got = compiled(*leaves)
    want = loss_fn(*leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, b)


def test_bad_input_names_the_argument(device):
    def randn(*shape, **kwargs):
        return torch.randn(*shape, device=device, **kwargs)

    q, one = randn(4, 8), torch.tensor(1.0, device=device)
    with pytest.raises(ValueError, match="k1"):
        contrastive_lse(q, randn(4, 6), None, one)
    with pytest.raises(ValueError, match="dtype"):
        contrastive_lse(q, randn(4, 8, dtype=torch.bfloat16), None, one)
    with pytest.raises(ValueError, match="diag_offset"):
        contrastive_lse(q, randn(5, 8), None, one, diag_offset=2)
    with pytest.raises(ValueError, match="neg_diag_offset"):
        contrastive_lse(q, q, randn(5, 8), one, neg_diag_offset=2)
    with pytest.raises(ValueError, match="neg_diag_offset"):
        contrastive_lse(q, q, None, one, neg_diag_offset=0)
    with pytest.raises(ValueError, match="scale"):
        contrastive_lse(q, q, None, torch.ones(2, device=device))
    with pytest.raises(ValueError, match="targets"):
        tag_bce_sum(q, randn(3, 8), None, torch.zeros(5, 2, dtype=torch.int64, device=device))
    targets = torch.zeros(4, 2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="bias"):
        tag_bce_sum(q, randn(3, 8), torch.zeros(4, device=device), targets)
