"""Apply parallelism to a plain hqclip_fast.model.CLIP from the outside, in a fixed order:

0. with ``sync_batchnorm`` and a process group, BatchNorm layers become torch's SyncBatchNorm (GPU only);
1. the logit scale becomes a 1-D parameter (FSDP2 shards dim 0, so it cannot hold 0-d parameters; the model
   reshapes it back to 0-d for its output and for open_clip state dicts);
2. activation checkpointing of each residual block (optional);
3. ``torch.compile`` of each residual block (optional; ``nn.Module.compile`` keeps parameter names);
4. FSDP2: ``fully_shard`` on every residual block of both towers, then on each tower (its stem, embeddings,
   final norm and projection), all with the ``MixedPrecisionPolicy``; last on the root, which holds only the
   logit scale and the short-tag head and always keeps them in fp32 (below). ``encode_image`` /
   ``encode_text`` are registered as FSDP forward methods so calling them directly (evaluation) gathers the
   root's parameters too.

Why the root stays fp32: the model returns ``exp(logit_scale)``, and near ln 100 a bf16 step of the parameter
is 2^-5, so a bf16 cast would move the temperature in ~3% jumps (14.25 instead of 14.29 at init) and quantize
its gradient. The tag head's logits are computed in fp32 by the loss in any case. FSDP still shards these
parameters and reduces their gradients like any other (in ``reduce_dtype``).

Step 4 runs when a process group is initialized (torchrun: NCCL on GPUs, gloo on CPU processes) or a mesh is
given. The mesh is 1-D (plain FSDP: every rank holds 1/n of each parameter) or, for HSDP, 2-D
``(dp_replicate, dp_shard)`` as torchtitan names it: parameters sharded over the ``dp_shard`` ranks of a node,
replicated across the ``dp_replicate`` nodes, so all-gathers and reduce-scatters stay on the fast intra-node
links and only one gradient all-reduce per shard crosses nodes (``data_parallel_mesh``). A single process without a group gets steps 1-3 only; mixed precision there is the caller's
``torch.autocast``.

The residual blocks are the transformer blocks of a ViT or text tower, and the bottleneck blocks of a ResNet
image tower (its stem and attention pool stay with the root). BatchNorm under FSDP2: parameters are sharded like
any other, but the running statistics are buffers, which FSDP leaves alone: each rank normalizes by its own
batch and keeps its own running statistics (as open_clip trains ResNets without SyncBatchNorm); checkpoints and
exports hold rank 0's. With ``sync_batchnorm`` (open_clip's --use-bn-sync) the statistics are over all ranks'
batches instead.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.modules.batchnorm import _BatchNorm

from hqclip_fast.model import to_open_clip_state_dict
from hqclip_fast.model.resnet import ModifiedResNet

log = logging.getLogger(__name__)

FORWARD_METHODS = ("encode_image", "encode_text")


def residual_blocks(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """(container, index) of every residual block of both towers, vision first."""
    containers = []
    for tower in (model.visual, model.text):
        containers += tower.stages if isinstance(tower, ModifiedResNet) else [tower.transformer.resblocks]
    return [(blocks, i) for blocks in containers for i in range(len(blocks))]


def checkpoint_block(block: nn.Module, *, compiled: bool) -> nn.Module:
    """``block`` with activation checkpointing (non-reentrant).

    Eager recomputation would run BatchNorm's forward a second time and update its running statistics twice, so
    a block holding BatchNorm recomputes with those updates switched off. Compiled blocks need nothing: the
    compiled graph applies buffer updates once, in the forward, and recomputes only the pure part (and
    torch.compile does not accept such a ``context_fn``). That holds while a block compiles whole: a graph break
    inside a ResNet block would bring the eager recomputation back (tests/test_parallelize.py checks the
    running statistics in both modes)."""
    norms = [m for m in block.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if compiled or not norms:
        return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                              context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(norms)))


@contextlib.contextmanager
def _running_stats_kept(norms: list[_BatchNorm]):
    """BatchNorm layers still normalize by the batch statistics (the recomputation must save the same tensors as
    the first forward) but leave their running statistics as they are: momentum 0 keeps the running mean and
    variance, and the batch counter is put back."""
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def data_parallel_dims(world_size: int, local_world_size: int, dp_replicate: int = 0,
                       dp_shard: int = 0) -> tuple[int, int]:
    """(dp_replicate, dp_shard) with dp_replicate * dp_shard == world_size. 0 means "default": shard within a
    node (dp_shard = local_world_size, the ranks per node) and replicate across nodes; one given, the other
    follows from the world size."""
    if dp_replicate < 0 or dp_shard < 0:
        raise ValueError(f"parallel.dp_replicate / dp_shard must be >= 0 (0 = default), got {dp_replicate}, "
                         f"{dp_shard}")
    if dp_shard == 0:
        dp_shard = world_size // dp_replicate if dp_replicate else min(local_world_size, world_size)
    if dp_replicate == 0:
        dp_replicate = world_size // dp_shard if dp_shard and world_size % dp_shard == 0 else 0
    if dp_replicate * dp_shard != world_size:
        raise ValueError(f"parallel.dp_replicate x parallel.dp_shard must equal the {world_size} ranks, got "
                         f"{dp_replicate} x {dp_shard} (ranks per node: {local_world_size})")
    return dp_replicate, dp_shard


def data_parallel_mesh(device_type: str, dp_replicate: int, dp_shard: int):
    """The device mesh for fully_shard: 1-D ("dp_shard") for plain FSDP, 2-D ("dp_replicate", "dp_shard") for
    HSDP. Ranks are laid out replica-major, so with torchrun's and SLURM's rank order a replica is a node."""
    from torch.distributed.device_mesh import init_device_mesh

    if dp_replicate == 1:
        return init_device_mesh(device_type, (dp_shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device_type, (dp_replicate, dp_shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def sync_batch_norm_(model: nn.Module) -> None:
    """Replace every BatchNorm that follows its batches by torch's SyncBatchNorm (statistics over all ranks'
    batches, open_clip's --use-bn-sync); frozen ones (lock_image_freeze_bn_stats) stay, as open_clip converts after
    freezing. torch's SyncBatchNorm synchronizes CUDA (and XPU/HPU) tensors only."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d) and not getattr(child, "frozen_stats", False):
                setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))


def parallelize_model(model: nn.Module, *, mesh=None, param_dtype: torch.dtype | None = None,
                      reduce_dtype: torch.dtype | None = torch.float32, activation_checkpointing: bool = False,
                      compile: bool = False, compile_backend: str = "inductor",
                      sync_batchnorm: bool = False) -> nn.Module:
    """Parallelize ``model`` in place and return it (see the module docstring for the order).

    mesh: a 1-D mesh (FSDP) or a 2-D (dp_replicate, dp_shard) one (HSDP, see ``data_parallel_mesh``); None
    with a process group: 1-D over all ranks.
    param_dtype: dtype of the gathered parameters in forward/backward (e.g. torch.bfloat16); None keeps the
    parameters' dtype. reduce_dtype: dtype of the gradient reduce-scatter. Both need FSDP (a process group).
    Build the optimizer after this call: the logit scale is a new parameter, and FSDP2 makes every parameter
    a DTensor shard. compile_backend: torch.compile backend ("inductor"; tests use "aot_eager").
    """
    one_dim_logit_scale_(model)
    distributed = mesh is not None or (dist.is_available() and dist.is_initialized())
    if sync_batchnorm and distributed:
        if next(model.parameters()).device.type == "cpu":
            raise ValueError("sync_batchnorm: torch's SyncBatchNorm synchronizes GPU tensors only; CPU ranks keep "
                             "per-rank BatchNorm statistics (leave sync_batchnorm off)")
        sync_batch_norm_(model)
    if activation_checkpointing:
        for blocks, i in residual_blocks(model):
            blocks[i] = checkpoint_block(blocks[i], compiled=compile)
    if compile:
        # The blocks share one forward code object, and dynamo keeps at most recompile_limit graphs per code
        # object (8 by default) before running the rest eagerly. ResNet blocks differ in shape, each needing its
        # own graph: allow one (plus a dynamic-shape variant) per block.
        blocks = residual_blocks(model)
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 2 * len(blocks))
        for container, i in blocks:
            container[i].compile(backend=compile_backend)

    if not distributed:
        if param_dtype is not None:
            log.warning("parallelize_model: no process group, so no FSDP and param_dtype=%s is not applied; "
                        "use torch.autocast for mixed precision on a single process", param_dtype)
        return model

    if mesh is None:
        mesh = data_parallel_mesh(next(model.parameters()).device.type, 1, dist.get_world_size())
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for blocks, i in residual_blocks(model):
        fully_shard(blocks[i], mesh=mesh, mp_policy=policy)
    for tower in (model.visual, model.text):
        fully_shard(tower, mesh=mesh, mp_policy=policy)
    # No param_dtype: the root's own parameters (logit scale, tag head) are used in their fp32.
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=reduce_dtype))
    for method in FORWARD_METHODS:
        register_fsdp_forward_method(model, method)
    return model


def one_dim_logit_scale_(model: nn.Module) -> None:
    """Replace a 0-d ``model.logit_scale`` by a (1,) parameter with the same value."""
    scale = model.logit_scale
    if scale.ndim == 0:
        model.logit_scale = nn.Parameter(scale.detach().reshape(1).clone(), requires_grad=scale.requires_grad)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (FSDP or plain model; parameter names as in the plain model).

    Collective on every rank of the group; with FSDP only rank 0 receives the tensors (others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_open_clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.open_clip_state_dict()`` for a parallelized model (see ``full_state_dict`` for who receives it)."""
    return to_open_clip_state_dict(full_state_dict(model))
