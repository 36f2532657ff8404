"""Apply parallelism to a plain hqclip_fast.model.CLIP from the outside, in a fixed order:

1. the logit scale becomes a 1-D parameter (FSDP2 shards dim 0, so it cannot hold 0-d parameters; the model
   reshapes it back to 0-d for its output and for open_clip state dicts);
2. activation checkpointing of each residual block (optional);
3. ``torch.compile`` of each residual block (optional; ``nn.Module.compile`` keeps parameter names);
4. FSDP2: ``fully_shard`` on every residual block of both towers, then on the root, with a
   ``MixedPrecisionPolicy``; ``encode_image`` / ``encode_text`` registered as FSDP forward methods so calling
   them directly (evaluation) gathers the root's parameters too.

Step 4 runs when a process group is initialized (torchrun: NCCL on GPUs, gloo on CPU processes) or a mesh is
given. A single process without a group gets steps 1-3 only; mixed precision there is the caller's
``torch.autocast``.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from hqclip_fast.model import to_open_clip_state_dict

log = logging.getLogger(__name__)

FORWARD_METHODS = ("encode_image", "encode_text")


def residual_blocks(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every residual block of both towers, vision first."""
    return [(tower.transformer.resblocks, i)
            for tower in (model.visual, model.text)
            for i in range(len(tower.transformer.resblocks))]


def parallelize_model(model: nn.Module, *, mesh=None, param_dtype: torch.dtype | None = None,
                      reduce_dtype: torch.dtype | None = torch.float32, activation_checkpointing: bool = False,
                      compile: bool = False, compile_backend: str = "inductor") -> nn.Module:
    """Parallelize ``model`` in place and return it (see the module docstring for the order).

    param_dtype: dtype of the gathered parameters in forward/backward (e.g. torch.bfloat16); None keeps the
    parameters' dtype. reduce_dtype: dtype of the gradient reduce-scatter. Both need FSDP (a process group).
    Build the optimizer after this call: the logit scale is a new parameter, and FSDP2 makes every parameter
    a DTensor shard. compile_backend: torch.compile backend ("inductor"; tests use "aot_eager").
    """
    one_dim_logit_scale_(model)
    if activation_checkpointing:
        for blocks, i in residual_blocks(model):
            blocks[i] = checkpoint_wrapper(blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if compile:
        for blocks, i in residual_blocks(model):
            blocks[i].compile(backend=compile_backend)

    if mesh is None and not (dist.is_available() and dist.is_initialized()):
        if param_dtype is not None:
            log.warning("parallelize_model: no process group, so no FSDP and param_dtype=%s is not applied; "
                        "use torch.autocast for mixed precision on a single process", param_dtype)
        return model

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for blocks, i in residual_blocks(model):
        fully_shard(blocks[i], mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
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
