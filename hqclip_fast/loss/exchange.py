"""How the loss exchanges features between ranks: a ring (the Triton backend's `contrastive_sums_ring`) or an
all-gather followed by the local kernel, chosen by a cost model (loss.exchange = "auto").

Per training step (forward + backward), n ranks, b local rows, D dims, k key sets (texts, plus negatives when
they are softmax columns), e bytes per feature element, flop rate F of the loss kernels, per-launch cost L:

ring, n steps, each overlapping one hop with the sweep of one chunk (local rows x the chunk's b * k keys):
    forward hop   max(a_p2p + b k D e / beta, 2 b^2 k D / F) + 2 L          (sweep kernel, log-add-exp)
    backward hop  max(a_p2p + b k D (e + 4) / beta, 4 b^2 k D / F) + 3 L    (keys and their fp32 gradient)
    plus 4 small collectives of the O(b) statistics (all-to-all, 2 all-gathers, all-reduce)
all-gather (NCCL's ring algorithm: n - 1 steps inside one collective, no kernel launch per step):
    forward all-gather and backward reduce-scatter of images and keys, each (n - 1) (a_step + b (1 + k) D e / beta)
    compute 6 b^2 n (1 + k) D / F (image->text and text->image sweeps, backward twice the forward), 6 L
    memory: the gathered features and their gradient, 2 n b (1 + k) D e bytes

beta and the latencies are the intra-node ones while the group fits in a node (n <= ranks per node, from
LOCAL_WORLD_SIZE), else the inter-node ones: a ring or a collective over nodes runs at its slowest link.
"auto" takes the ring when the gathered features would exceed the memory budget, else the cheaper of the two.
The defaults below describe H100 nodes (NVLink within, 400 Gb/s InfiniBand per GPU between) from vendor
figures, not measurements; measure your cluster's (nccl-tests' all_gather_perf and sendrecv_perf for latency
and bandwidth, benchmarks/bench_loss.py for F) and pass them as ExchangeCosts.
`benchmarks/loss_exchange_model.py` prints the model's predictions for the presets.
"""

from __future__ import annotations

from dataclasses import dataclass

EXCHANGES = ("auto", "ring", "all_gather")


@dataclass(frozen=True)
class ExchangeCosts:
    p2p_latency_intra_s: float = 10e-6  # one send/recv hop inside a node, launch to arrival
    p2p_latency_inter_s: float = 25e-6  # one send/recv hop between nodes
    step_latency_intra_s: float = 5e-6  # one step of NCCL's ring all-gather / reduce-scatter inside a node
    step_latency_inter_s: float = 10e-6  # the same between nodes
    bandwidth_intra: float = 150e9  # bytes/s per GPU over NVLink, as achieved by NCCL
    bandwidth_inter: float = 40e9  # bytes/s per GPU over 400 Gb/s InfiniBand, as achieved by NCCL
    kernel_launch_s: float = 5e-6  # one kernel launch (or small host-side op) on the step's critical path
    flops: float = 400e12  # bf16 matmul throughput of the loss kernels
    gather_memory_budget: float = 4 * 2**30  # bytes the gathered features and their gradient may take


@dataclass(frozen=True)
class ExchangeProblem:
    ranks: int
    local_batch: int
    dim: int
    key_sets: int = 2  # texts, plus negatives when they are softmax columns
    element_bytes: int = 2  # bf16 features
    ranks_per_node: int = 8

    @property
    def crosses_nodes(self) -> bool:
        return self.ranks > self.ranks_per_node

    @property
    def gathered_bytes(self) -> int:
        """The all-gather path's gathered features (images and keys) and their gradient."""
        return 2 * self.ranks * self.local_batch * (1 + self.key_sets) * self.dim * self.element_bytes


def _link(problem: ExchangeProblem, costs: ExchangeCosts) -> tuple[float, float, float]:
    """(p2p latency, collective step latency, bandwidth) of the slowest link the group uses."""
    if problem.crosses_nodes:
        return costs.p2p_latency_inter_s, costs.step_latency_inter_s, costs.bandwidth_inter
    return costs.p2p_latency_intra_s, costs.step_latency_intra_s, costs.bandwidth_intra


def ring_seconds(problem: ExchangeProblem, costs: ExchangeCosts = ExchangeCosts()) -> float:
    n, b, k, d, e = problem.ranks, problem.local_batch, problem.key_sets, problem.dim, problem.element_bytes
    p2p, step, bandwidth = _link(problem, costs)
    sweep_flops = 2 * b * b * k * d
    forward_hop = max(p2p + b * k * d * e / bandwidth, sweep_flops / costs.flops) + 2 * costs.kernel_launch_s
    backward_hop = (max(p2p + b * k * d * (e + 4) / bandwidth, 2 * sweep_flops / costs.flops)
                    + 3 * costs.kernel_launch_s)
    statistics = 4 * (n - 1) * (step + 4 * b / bandwidth)
    return n * (forward_hop + backward_hop) + statistics


def all_gather_seconds(problem: ExchangeProblem, costs: ExchangeCosts = ExchangeCosts()) -> float:
    n, b, k, d, e = problem.ranks, problem.local_batch, problem.key_sets, problem.dim, problem.element_bytes
    _, step, bandwidth = _link(problem, costs)
    collective = (n - 1) * (step + b * (1 + k) * d * e / bandwidth)
    compute = 6 * b * b * n * (1 + k) * d / costs.flops
    return 2 * collective + compute + 6 * costs.kernel_launch_s


def choose_exchange(problem: ExchangeProblem, costs: ExchangeCosts = ExchangeCosts(), *,
                    ring_available: bool = True) -> str:
    """"ring" or "all_gather" for loss.exchange = "auto" (see the module docstring)."""
    if not ring_available:
        return "all_gather"
    if problem.gathered_bytes > costs.gather_memory_budget:
        return "ring"
    return "ring" if ring_seconds(problem, costs) < all_gather_seconds(problem, costs) else "all_gather"
