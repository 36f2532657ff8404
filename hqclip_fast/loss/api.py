"""The HQ-CLIP loss: one public entry point, input validation, distributed semantics, impl dispatch.

Every implementation behind `impl` is a module that provides two functions. They see plain tensors only:
no process groups, no weights, no normalization; api.py gathers, validates, normalizes and combines.

    contrastive_sums(image, text, logit_scale, *, rows, softmax_negatives, pair_negatives)
        -> (i2t_sum, t2i_sum, hni_sum)

        image, text        (B, D) features of the whole group in rank order (B = n * b). They come out of an
                           autograd all-gather, so gradients w.r.t. any row reach that row's owner.
        logit_scale        0-d tensor s (already exp'd); it needs a gradient.
        rows               (start, stop): this rank's rows, stop - start = b.
        softmax_negatives  (B, D) gathered negative texts, extra image->text columns; or None.
        pair_negatives     (b, D) this rank's negative texts for the pairwise HNI term; or None.
                           When both are given, pair_negatives is softmax_negatives[start:stop].
        Returns fp32 0-d tensors (fp64 for fp64 inputs), sums (not means) over this rank's rows / columns:
          i2t_sum = sum_{i in rows} [ -s<I_i,T_i> + log( sum_j e^{s<I_i,T_j>} + sum_k e^{s<I_i,N_k>} ) ]
                    (the N_k sum only when softmax_negatives is given, k over all B of them)
          t2i_sum = sum_{j in rows} [ -s<T_j,I_j> + log sum_i e^{s<T_j,I_i>} ]      (i over all B)
          hni_sum = sum_{i in rows} softplus(s<I_i,N_i> - s<I_i,T_i>)   (zero when pair_negatives is None)

    tag_bce_sum(tag_features, tag_weight, tag_bias, tag_targets) -> stc_sum
        tag_features (b, D), tag_weight (V, D), tag_bias (V,) or None,
        tag_targets (b, T) int64 ids in [0, V), -1 is padding, a repeated id in a row counts once.
        Returns the fp32 (fp64 for fp64 inputs) 0-d sum over the b x V entries of BCE-with-logits(tag_features @ tag_weight.T
        + tag_bias, multi-hot(tag_targets)).

Both must accept fp32 and bf16 features (fp32 accumulation) and give gradients to every tensor input,
logit_scale, tag_weight and tag_bias included. Inputs arrive validated (see `_validate`).

    contrastive_sums_ring(image, text, logit_scale, *, group, negatives, negatives_in_softmax,
                          pair_negatives: bool) -> (i2t_sum, t2i_sum, hni_sum)      (optional)
        Same sums from this rank's LOCAL (b, D) features; used instead of the all-gather + contrastive_sums
        when there are several ranks and `exchange` says "ring" (or "auto" and the cost model in exchange.py
        predicts the ring cheaper), so a backend can overlap its own chunked feature exchange with compute.

Registry: `_IMPLS` maps an impl name to its module path; a module is imported only when asked for.
"triton" is `hqclip_fast.loss.fused` (kernels side). It may define `is_available() -> bool`; when the module
is missing or reports False, impl="triton" raises and impl="auto" uses "chunked" (auto picks triton only for
CUDA tensors).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from .exchange import EXCHANGES, ExchangeProblem, choose_exchange
from .gather import all_gather_with_grad, group_rank_and_size

__all__ = ["LossOutput", "hqclip_loss", "HQCLIPLoss", "IMPLS", "STC_REDUCTIONS"]

log = logging.getLogger(__name__)

_IMPLS = {
    "reference": "hqclip_fast.loss.reference",
    "chunked": "hqclip_fast.loss.chunked",
    "triton": "hqclip_fast.loss.fused",
}
IMPLS = ("auto", *_IMPLS)

# How the tag BCE over a (b, V) logit matrix becomes the stc term; both average over the b samples.
# "sum_over_tags" (default) sums a sample's V entries: an image with k true tags gets k positive terms and V - k
# negative ones whose probabilities, once the head's bias has learned how rare tags are, add up to about k, so
# the term and its gradient follow the tags an image has, not the vocabulary size, and stc_weight means the same
# strength for 1,000 or 50,000 tags. "mean_over_tags" divides that by V as well (BCEWithLogitsLoss's "mean"):
# the per-tag signal shrinks as 1/V, so stc_weight must grow with the vocabulary.
STC_REDUCTIONS = ("sum_over_tags", "mean_over_tags")


@dataclass
class LossOutput:
    """Scalar fp32 tensors; `total = clip + hni_weight * hni + stc_weight * stc`."""

    total: torch.Tensor
    clip: torch.Tensor
    hni: torch.Tensor
    stc: torch.Tensor


def _import(name: str) -> ModuleType:
    # An imported module comes from sys.modules: torch.compile reads that without a graph break, while it
    # cannot trace importlib (so only a step traced before the first import breaks there).
    return sys.modules.get(name) or importlib.import_module(name)


def _load_triton() -> tuple[ModuleType | None, str]:
    """(the fused module, "") or (None, why it cannot be used here)."""
    try:
        module = _import(_IMPLS["triton"])
    except ImportError as err:
        return None, f"importing {_IMPLS['triton']} failed: {err}"
    is_available = getattr(module, "is_available", None)
    if is_available is not None and not is_available():
        return None, f"{_IMPLS['triton']}.is_available() is False (it needs triton and a CUDA device)"
    return module, ""


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def get_impl(impl: str, device: torch.device) -> ModuleType:
    """The implementation module for `impl` on `device` (imported lazily)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        module, why = _load_triton()
        if module is None:
            raise ValueError(f"impl='triton' is unavailable: {why}; use impl='chunked'")
        return module
    if impl == "auto":
        if device.type == "cuda":
            module, why = _load_triton()
            if module is not None:
                return module
            _warn_once(f"hqclip_loss(impl='auto') on {device} uses 'chunked': {why}")
        impl = "chunked"
    return _import(_IMPLS[impl])


def _check_features(name: str, x, like: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if like is not None:
        if x.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(like.shape)} "
                             "(the shape of image_features)")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device}, image_features on {like.device}")


def _check_weight(name: str, w: float) -> float:
    w = float(w)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {w}")
    return w


def _validate(image_features, text_features, logit_scale, neg_text_features, hni_weight,
              tag_features, tag_weight, tag_bias, tag_targets, stc_weight):
    """Raise ValueError naming the argument for any bad input; returns (logit_scale as 0-d tensor, weights)."""
    _check_features("image_features", image_features)
    if image_features.shape[0] == 0:
        raise ValueError("image_features has an empty batch")
    _check_features("text_features", text_features, image_features)
    if neg_text_features is not None:
        _check_features("neg_text_features", neg_text_features, image_features)

    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), device=image_features.device)
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar tensor, got shape {tuple(logit_scale.shape)}")
    if not logit_scale.is_floating_point():
        raise ValueError(f"logit_scale must be floating point, got {logit_scale.dtype}")
    logit_scale = logit_scale.reshape(())

    hni_weight = _check_weight("hni_weight", hni_weight)
    if hni_weight > 0 and neg_text_features is None:
        raise ValueError("hni_weight > 0 needs neg_text_features")

    stc_weight = _check_weight("stc_weight", stc_weight)
    if stc_weight > 0:
        for name, value in (("tag_features", tag_features), ("tag_weight", tag_weight),
                            ("tag_targets", tag_targets)):
            if value is None:
                raise ValueError(f"stc_weight > 0 needs {name}")
        _check_features("tag_features", tag_features)
        if tag_features.shape[0] != image_features.shape[0]:
            raise ValueError(f"tag_features has batch {tag_features.shape[0]}, image_features has "
                             f"{image_features.shape[0]}")
        _check_features("tag_weight", tag_weight)
        num_tags, dim = tag_weight.shape
        if dim != tag_features.shape[1]:
            raise ValueError(f"tag_weight has feature size {dim}, tag_features has {tag_features.shape[1]}")
        if num_tags == 0:
            raise ValueError("tag_weight has no rows (empty tag vocabulary)")
        if tag_bias is not None:
            if not isinstance(tag_bias, torch.Tensor) or tag_bias.shape != (num_tags,):
                shape = tuple(tag_bias.shape) if isinstance(tag_bias, torch.Tensor) else type(tag_bias)
                raise ValueError(f"tag_bias must have shape ({num_tags},), got {shape}")
        if not isinstance(tag_targets, torch.Tensor) or tag_targets.dim() != 2:
            raise ValueError("tag_targets must be a 2-D integer tensor (batch, max_tags), -1 padded")
        if tag_targets.dtype.is_floating_point or tag_targets.dtype == torch.bool:
            raise ValueError(f"tag_targets must hold integer ids, got {tag_targets.dtype}")
        if tag_targets.shape[0] != tag_features.shape[0]:
            raise ValueError(f"tag_targets has batch {tag_targets.shape[0]}, tag_features has "
                             f"{tag_features.shape[0]}")
        if tag_targets.numel() > 0:
            _check_tag_ids_on_device(tag_targets, num_tags)
        devices = {tag_features.device, tag_weight.device, tag_targets.device}
        if tag_bias is not None:
            devices.add(tag_bias.device)
        if len(devices) != 1:
            raise ValueError(f"tag_features, tag_weight, tag_bias and tag_targets must share a device, "
                             f"got {sorted(map(str, devices))}")
    return logit_scale, hni_weight, stc_weight


def _check_stc_reduction(stc_reduction: str) -> str:
    if stc_reduction not in STC_REDUCTIONS:
        raise ValueError(f"stc_reduction must be one of {STC_REDUCTIONS}, got {stc_reduction!r}")
    return stc_reduction


def _check_tag_ids_on_device(tag_targets: torch.Tensor, num_tags: int) -> None:
    """Ids in [0, num_tags) or -1, checked without a host read: on a GPU the assertion runs on the device and
    fails the step asynchronously (a device-side assert); CPU tensors fail at once, as a ValueError."""
    message = f"tag_targets must hold ids in [0, {num_tags}) or -1 for padding"
    in_range = ((tag_targets >= -1) & (tag_targets < num_tags)).all()
    if torch.compiler.is_compiling():
        torch._assert_async(in_range, message)
        return
    try:
        torch._assert_async(in_range, message)
    except RuntimeError:
        raise ValueError(message) from None


# (group, local shape) pairs already found equal on every rank of the group.
_checked_shapes: set[tuple[object, tuple[int, ...]]] = set()


def _check_same_batch_across_ranks(image_features: torch.Tensor, group, world_size: int) -> None:
    """Every rank's local (batch, dim) must be equal: checked once per shape (an all-gather and a host read),
    not every step. Every rank checks a shape it has not seen, so a change of shape on every rank at once is
    checked; a change on only some ranks (the trainer's batches never change shape) is caught only with the
    debug flag HQCLIP_CHECK_SHAPES=1, which checks every call (otherwise the feature exchange itself fails or,
    on NCCL, may hang)."""
    import torch.distributed as dist

    key = (group, tuple(image_features.shape))
    if key in _checked_shapes and os.environ.get("HQCLIP_CHECK_SHAPES") != "1":
        return
    local = torch.tensor(image_features.shape, dtype=torch.int64, device=image_features.device)
    sizes = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(sizes, local, group=group)
    sizes = [tuple(size) for size in torch.stack(sizes).tolist()]
    if len(set(sizes)) != 1:
        raise ValueError(f"image_features: local (batch, dim) must be equal on every rank, got {sizes}")
    _checked_shapes.add(key)


def hqclip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, *,
                neg_text_features: torch.Tensor | None = None, negatives_in_softmax: bool = True,
                hni_weight: float = 0.0,
                tag_features: torch.Tensor | None = None, tag_weight: torch.Tensor | None = None,
                tag_bias: torch.Tensor | None = None, tag_targets: torch.Tensor | None = None,
                stc_weight: float = 0.0, stc_reduction: str = "sum_over_tags", group=None,
                impl: str = "auto", exchange: str = "auto") -> LossOutput:
    """HQ-CLIP loss of this rank: total = clip + hni_weight * hni + stc_weight * stc.

    clip: symmetric InfoNCE over the gathered batch (negative texts as extra image->text columns when
    given and `negatives_in_softmax`); hni: -log(e^{s<I,T>} / (e^{s<I,T>} + e^{s<I,N>})) per sample;
    stc: multi-label BCE of tag_features @ tag_weight.T + tag_bias against multi-hot(tag_targets), summed
    over the V tags and averaged over the samples (stc_reduction="sum_over_tags"), or averaged over both
    ("mean_over_tags"); see STC_REDUCTIONS.
    A term whose weight is 0 is a zero tensor and its inputs are not needed.

    Each rank returns its own rows (image->text, hni, stc) and columns (text->image), normalized by the
    local batch b: the mean of `total` over ranks is the global loss, and DDP/FSDP gradient averaging gives
    the global gradient (open_clip's local_loss + gather_with_grad convention).

    exchange (several ranks): "all_gather" gathers the features and runs the local kernel; "ring" passes them
    around a ring overlapped with compute (impl="triton" only); "auto" picks by the cost model of
    hqclip_fast.loss.exchange. Both give the same values and gradients.
    """
    logit_scale, hni_weight, stc_weight = _validate(
        image_features, text_features, logit_scale, neg_text_features, hni_weight,
        tag_features, tag_weight, tag_bias, tag_targets, stc_weight)
    _check_stc_reduction(stc_reduction)
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    backend = get_impl(impl, image_features.device)

    group, rank, world_size = group_rank_and_size(group)
    if world_size > 1:
        _check_same_batch_across_ranks(image_features, group, world_size)
    b = image_features.shape[0]
    rows = (rank * b, rank * b + b)

    ring = None
    if world_size > 1:
        ring = _ring_if_chosen(backend, exchange, world_size, image_features,
                               neg_text_features is not None and negatives_in_softmax)
    if ring is not None:  # the backend overlaps its own chunked exchange of features with compute
        i2t_sum, t2i_sum, hni_sum = ring(
            image_features, text_features, logit_scale, group=group, negatives=neg_text_features,
            negatives_in_softmax=negatives_in_softmax, pair_negatives=hni_weight > 0)
    else:
        use_softmax_negatives = neg_text_features is not None and negatives_in_softmax
        all_image = all_gather_with_grad(image_features, group)
        all_text = all_gather_with_grad(text_features, group)
        softmax_negatives = all_gather_with_grad(neg_text_features, group) if use_softmax_negatives else None
        pair_negatives = None
        if hni_weight > 0:
            # (No slice on one process: the backward of a slice allocates a zero-filled full-size gradient.)
            local = use_softmax_negatives and world_size > 1
            pair_negatives = softmax_negatives[rows[0]:rows[1]] if local else neg_text_features

        i2t_sum, t2i_sum, hni_sum = backend.contrastive_sums(
            all_image, all_text, logit_scale, rows=rows,
            softmax_negatives=softmax_negatives, pair_negatives=pair_negatives)
    clip = (i2t_sum + t2i_sum) / (2 * b)
    zero = clip.new_zeros(())
    hni = hni_sum / b if hni_weight > 0 else zero
    total = clip + hni_weight * hni if hni_weight > 0 else clip

    stc = zero
    if stc_weight > 0:
        targets = tag_targets.to(torch.int64)
        entries = b if stc_reduction == "sum_over_tags" else b * tag_weight.shape[0]
        stc = backend.tag_bce_sum(tag_features, tag_weight, tag_bias, targets) / entries
        total = total + stc_weight * stc
    return LossOutput(total=total, clip=clip, hni=hni, stc=stc)


def _ring_if_chosen(backend: ModuleType, exchange: str, world_size: int, image_features: torch.Tensor,
                    negatives_are_columns: bool):
    """The backend's contrastive_sums_ring when `exchange` asks for it or "auto" chooses it, else None."""
    ring = getattr(backend, "contrastive_sums_ring", None)
    if exchange == "ring" and ring is None:
        raise ValueError(f"exchange='ring' needs an implementation with a ring (impl='triton'); "
                         f"{backend.__name__} has none: use exchange='all_gather' or 'auto'")
    if exchange == "all_gather" or ring is None:
        return None
    if exchange == "auto":
        b, dim = image_features.shape
        problem = ExchangeProblem(ranks=world_size, local_batch=b, dim=dim, key_sets=1 + negatives_are_columns,
                                  element_bytes=image_features.element_size(),
                                  ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        if _choose(problem) != "ring":
            return None
    return ring


@functools.cache
def _choose(problem: ExchangeProblem) -> str:
    return choose_exchange(problem)


class HQCLIPLoss(nn.Module):
    """`hqclip_loss` with its options held by a module (built from the training config)."""

    def __init__(self, *, hni_weight: float = 0.0, stc_weight: float = 0.0, stc_reduction: str = "sum_over_tags",
                 negatives_in_softmax: bool = True, impl: str = "auto", exchange: str = "auto", group=None):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        self.exchange = exchange
        self.hni_weight = _check_weight("hni_weight", hni_weight)
        self.stc_weight = _check_weight("stc_weight", stc_weight)
        self.stc_reduction = _check_stc_reduction(stc_reduction)
        self.negatives_in_softmax = negatives_in_softmax
        self.impl = impl
        self.group = group

    def forward(self, image_features, text_features, logit_scale, *, neg_text_features=None,
                tag_features=None, tag_weight=None, tag_bias=None, tag_targets=None) -> LossOutput:
        return hqclip_loss(image_features, text_features, logit_scale,
                           neg_text_features=neg_text_features, negatives_in_softmax=self.negatives_in_softmax,
                           hni_weight=self.hni_weight, tag_features=tag_features, tag_weight=tag_weight,
                           tag_bias=tag_bias, tag_targets=tag_targets, stc_weight=self.stc_weight,
                           stc_reduction=self.stc_reduction, group=self.group, impl=self.impl,
                           exchange=self.exchange)

    def extra_repr(self) -> str:
        return (f"hni_weight={self.hni_weight}, stc_weight={self.stc_weight}, stc_reduction={self.stc_reduction!r}, "
                f"negatives_in_softmax={self.negatives_in_softmax}, impl={self.impl!r}, exchange={self.exchange!r}")
