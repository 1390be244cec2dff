"""The training losses that are functions, not modules: IRN's affinity + displacement loss, AffinityNet's
pair loss, SEAM's siamese terms and DeepLab's multi-scale cross-entropy.

Each reproduces its reference term for term (the docstrings say where); the networks that feed them live
in src/models/, the stages that call them in src/stages/.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from src.ops.path_index import PathIndex
from src.utils.config import check_choice
from src.utils.labels import IGNORE

# IRN (spec stage 4): every mean is sum / (count + 1e-5); logs use -log(a + 1e-5), -log(1 + 1e-5 - a).
LOSS_EPS = 1e-5
# AffinityNet / SEAM: the reference's epsilon in counts, logs and normalisations.
EPS = 1e-5


# ------------------------------------------------------------------------------------------------ IRN
def _flat_map(x: torch.Tensor, channels: int, path_index: PathIndex) -> torch.Tensor:
    """(B, channels, H, W) or, for one channel, (B, H, W) -> (B, channels, H*W) after a size check."""
    if x.dim() == 3 and channels == 1:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"expected a (B, {channels}, H, W) map, got shape {tuple(x.shape)}")
    path_index.check_size(x.shape[2], x.shape[3])
    return x.reshape(x.shape[0], channels, -1)


def affinity_from_edge(edge_prob: torch.Tensor, path_index: PathIndex) -> torch.Tensor:
    """Pair affinities 1 - max(boundary along the pair's path): (B, 1 | -, H, W) -> (B, n_offsets, n_src)
    in the PathIndex order (reference ``to_affinity``)."""
    flat = _flat_map(edge_prob, 1, path_index)[:, 0]
    out = []
    for ind in path_index.tensors(flat.device).paths:
        along = flat[:, ind.reshape(-1)].reshape(flat.shape[0], *ind.shape)
        out.append(1 - along.amax(dim=2))
    return torch.cat(out, dim=1)


def pair_displacement(displacement: torch.Tensor, path_index: PathIndex) -> torch.Tensor:
    """dp[src] - dp[dst] for every pair: (B, 2, H, W) -> (B, 2, n_offsets, n_src)
    (reference ``to_pair_displacement``)."""
    flat = _flat_map(displacement, 2, path_index)
    idx = path_index.tensors(flat.device)
    src = flat[..., idx.src].unsqueeze(2)
    dst = flat[..., idx.dst.reshape(-1)].reshape(*flat.shape[:2], *idx.dst.shape)
    return src - dst


def irn_loss_maps(edge_logits: torch.Tensor, displacement: torch.Tensor, path_index: PathIndex,
                  eps: float = LOSS_EPS) -> dict[str, torch.Tensor]:
    """Per-pair losses of the reference ``AffinityDisplacementLoss.forward``: ``pos_aff`` = -log(a + eps),
    ``neg_aff`` = -log(1 + eps - a) (B, n_off, n_src); ``dp_fg`` = |pair_disp - offset|, ``dp_bg`` =
    |pair_disp| (B, 2, n_off, n_src), where the offset (dy, dx) is what a foreground pair's displacement
    difference should equal."""
    # fp32 under a bf16/fp16 autocast too: in bf16, 1 + eps rounds to 1 and a ~ 1 - 2^-9 to 1, so
    # -log(1 + eps - a) is inf (and 0 * inf = NaN in the masked sums) wherever the boundary is ~0.
    aff = affinity_from_edge(torch.sigmoid(edge_logits.float()), path_index)
    pair_disp = pair_displacement(displacement.float(), path_index)
    target = path_index.tensors(pair_disp.device).search_dst.t().to(pair_disp.dtype)[None, :, :, None]
    return {
        "pos_aff": -torch.log(aff + eps),
        "neg_aff": -torch.log(1.0 + eps - aff),
        "dp_fg": (pair_disp - target).abs(),
        "dp_bg": pair_disp.abs(),
    }


def irn_loss_terms(
    edge_logits: torch.Tensor,
    displacement: torch.Tensor,
    bg_pos: torch.Tensor,
    fg_pos: torch.Tensor,
    neg: torch.Tensor,
    path_index: PathIndex,
    eps: float = LOSS_EPS,
    count: Callable[[torch.Tensor], torch.Tensor] = lambda c: c,
) -> dict[str, torch.Tensor]:
    """IRN training loss as in the reference ``step/train_irn.py``: every term is a batch-global mean
    (sum over all labelled pairs of the batch / (count + eps)), not a mean of per-image means.
    ``count`` maps a local pair count to the normaliser (multi-process training passes
    ``src.utils.dist.global_mean_count`` so the global batch's count is used).

    Keys: ``bg_pos_aff``, ``fg_pos_aff``, ``pos_aff`` = their average, ``neg_aff``, ``dp_fg`` and ``dp_bg``
    (divided by 2 * count: two displacement components), ``total`` = (pos + neg)/2 + (dp_fg + dp_bg)/2.
    """
    maps = irn_loss_maps(edge_logits, displacement, path_index, eps)
    n_bg, n_fg, n_neg = count(bg_pos.sum()), count(fg_pos.sum()), count(neg.sum())
    bg_pos_aff = (bg_pos * maps["pos_aff"]).sum() / (n_bg + eps)
    fg_pos_aff = (fg_pos * maps["pos_aff"]).sum() / (n_fg + eps)
    pos_aff = bg_pos_aff / 2 + fg_pos_aff / 2
    neg_aff = (neg * maps["neg_aff"]).sum() / (n_neg + eps)
    dp_fg = (maps["dp_fg"] * fg_pos.unsqueeze(1)).sum() / (2 * n_fg + eps)
    dp_bg = (maps["dp_bg"] * bg_pos.unsqueeze(1)).sum() / (2 * n_bg + eps)
    total = (pos_aff + neg_aff) / 2 + (dp_fg + dp_bg) / 2
    return {"bg_pos_aff": bg_pos_aff, "fg_pos_aff": fg_pos_aff, "pos_aff": pos_aff, "neg_aff": neg_aff,
            "dp_fg": dp_fg, "dp_bg": dp_bg, "total": total}


# ---------------------------------------------------------------------------------------- AffinityNet

def affinity_loss(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor,
                  count: Callable[[torch.Tensor], torch.Tensor] = lambda c: c) -> dict[str, torch.Tensor]:
    """AffinityNet loss (``train_aff.py``): bg/4 + fg/4 + neg/2, each term a sum over the whole batch
    divided by the batch's pair count + 1e-5; ``aff`` in the labels' layout (:func:`to_label_layout`).
    ``count`` maps a local pair count to the normaliser (multi-process training passes
    ``src.utils.dist.global_mean_count`` so the global batch's count is used, as IRN's loss)."""
    bg_count = count(bg_pos.sum()) + EPS
    fg_count = count(fg_pos.sum()) + EPS
    neg_count = count(neg.sum()) + EPS
    bg_loss = (-bg_pos * torch.log(aff + EPS)).sum() / bg_count
    fg_loss = (-fg_pos * torch.log(aff + EPS)).sum() / fg_count
    neg_loss = (-neg * torch.log(1.0 + EPS - aff)).sum() / neg_count
    return {
        "loss": bg_loss / 4 + fg_loss / 4 + neg_loss / 2,
        "bg_loss": bg_loss, "fg_loss": fg_loss, "neg_loss": neg_loss,
        "bg_count": bg_count, "fg_count": fg_count, "neg_count": neg_count,
    }


# ----------------------------------------------------------------------------------------------- SEAM

# The weighted terms of SEAM's total besides the classification term (train_SEAM.py: each counts once).
SEAM_LOSS_TERMS = ("min_pool", "er", "ecr")


def max_norm(cam: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-(image, channel) max-min normalisation of (C, H, W) or (N, C, H, W) maps (reference
    ``visualization.max_norm``, torch branch): p = ReLU(p); ReLU(p - min - e) / (max - min + e)."""
    if cam.dim() not in (3, 4):
        raise ValueError(f"max_norm expects a 3-D or 4-D tensor, got shape {tuple(cam.shape)}")
    p = F.relu(cam)
    flat = p.flatten(-2)
    hi = flat.max(-1)[0][..., None, None]
    lo = flat.min(-1)[0][..., None, None]
    return F.relu(p - lo - eps) / (hi - lo + eps)


def with_background(cam: torch.Tensor) -> torch.Tensor:
    """Channel 0 replaced by 1 - max over the foreground channels."""
    return torch.cat([1 - cam[:, 1:].max(1, keepdim=True)[0], cam[:, 1:]], 1)


def max_onehot(cam: torch.Tensor) -> torch.Tensor:
    """Foreground channels zeroed where they are not the maximal foreground score (ties kept); channel 0
    unchanged (reference ``train_SEAM.max_onehot``, without its in-place write)."""
    fg = cam[:, 1:]
    fg_max = fg.max(1, keepdim=True)[0]
    return torch.cat([cam[:, :1], torch.where(fg != fg_max, torch.zeros_like(fg), fg)], 1)


def rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The siamese transform A: bilinear rescale (align_corners=True) by ``scale``, to floor(H * scale)."""
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)


def classification_loss(cam: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin of the global average of the foreground CAMs (B, K+1, H, W) against the
    (B, K) image labels; channel 0 (background) takes no part."""
    scores = cam[:, 1:].mean(dim=(2, 3))
    return F.multilabel_soft_margin_loss(scores, labels.to(scores.dtype))


def equivariant_loss(cam_a: torch.Tensor, cam_b: torch.Tensor) -> torch.Tensor:
    """L_ER: mean |cam_a - cam_b| over the foreground channels (all K, absent classes included) of two
    normalised, label-masked CAMs of the same size: A(CAM(x)) and CAM(A(x))."""
    return (cam_a[:, 1:] - cam_b[:, 1:]).abs().mean()


def ecr_loss(cam_rv: torch.Tensor, cam_other: torch.Tensor, topk: float) -> torch.Tensor:
    """L_ECR (one direction): |max_onehot(cam_other with background = 1 - max fg) - cam_rv|, the other
    branch detached, averaged over the top k = int(C * h * w * topk) errors per image over all C channels."""
    target = max_onehot(with_background(cam_other.detach()))
    n, c, h, w = cam_rv.shape
    if target.shape != cam_rv.shape:
        raise ValueError(f"ECR needs equal shapes, got {tuple(cam_rv.shape)} and {tuple(target.shape)}")
    k = int(c * h * w * topk)
    return torch.topk((target - cam_rv).abs().reshape(n, -1), k=k, dim=-1)[0].mean()


def min_pool_loss(cam_fg: torch.Tensor, fraction: float) -> torch.Tensor:
    """Background min-pooling term: per pixel the max over the given (foreground, label-masked) channels;
    the mean of ReLU of the k = int(h * w * fraction) smallest per image (reference h*w//4)."""
    n, _, h, w = cam_fg.shape
    k = int(h * w * fraction)
    lowest = torch.topk(cam_fg.max(1)[0].reshape(n, -1), k=k, dim=-1, largest=False)[0]
    return F.relu(lowest).sum() / (k * n)


def seam_step_losses(
    cam1: torch.Tensor,
    cam_rv1: torch.Tensor,
    cam2: torch.Tensor,
    cam_rv2: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    topk: float,
    min_pool_fraction: float,
    weights: Mapping[str, float],
) -> dict[str, torch.Tensor]:
    """All SEAM loss terms of one siamese step, composed as ``train_SEAM.py``.

    ``cam1, cam_rv1 = net(img)`` and ``cam2, cam_rv2 = net(rescale(img, scale))`` (each upsampled to its
    input size by the net); ``labels`` (B, K) multi-hot foreground labels. Returns ``loss`` (the total to
    back-propagate) and its terms: ``cls`` = (cls1 + cls2) / 2, ``min_pool`` = (min_pool1 + min_pool2) / 2,
    ``er``, ``ecr`` = ecr1 + ecr2 (the reference logs ``cls + min_pool`` as its ``loss_cls``).
    ``weights`` scales ``min_pool``, ``er`` and ``ecr`` in the total (all 1 in the reference; for ablations).
    The reference's values (specs/seam.md): scale 0.3, topk 0.2, min_pool_fraction 0.25, weights all 1.
    """
    weights = dict(weights)
    if set(weights) != set(SEAM_LOSS_TERMS):
        raise ValueError(f"SEAM loss weights are {sorted(SEAM_LOSS_TERMS)}, got {sorted(weights)}")
    n = labels.shape[0]
    mask = torch.cat([labels.new_ones(n, 1), labels], 1).to(cam1.dtype)[..., None, None]

    cls1 = classification_loss(cam1, labels)
    cls2 = classification_loss(cam2, labels)
    min_pool1 = min_pool_loss((cam_rv1 * mask)[:, 1:], min_pool_fraction)
    min_pool2 = min_pool_loss((cam_rv2 * mask)[:, 1:], min_pool_fraction)

    norm1 = rescale(max_norm(cam1), scale) * mask
    norm_rv1 = rescale(max_norm(cam_rv1), scale) * mask
    norm2 = max_norm(cam2) * mask
    norm_rv2 = max_norm(cam_rv2) * mask
    if norm1.shape != norm2.shape:
        raise ValueError(f"the rescaled branch's CAM is {tuple(cam2.shape)}, but the first branch rescaled "
                         f"by {scale} is {tuple(norm1.shape)}: feed the net rescale(img, {scale})")

    er = equivariant_loss(norm1, norm2)
    ecr1 = ecr_loss(norm_rv1, norm2, topk)
    ecr2 = ecr_loss(norm_rv2, norm1, topk)
    terms = {
        "cls": (cls1 + cls2) / 2, "min_pool": (min_pool1 + min_pool2) / 2, "er": er, "ecr": ecr1 + ecr2,
        "cls1": cls1, "cls2": cls2, "min_pool1": min_pool1, "min_pool2": min_pool2,
        "ecr1": ecr1, "ecr2": ecr2,
    }
    terms["loss"] = terms["cls"] + sum(w * terms[key] for key, w in weights.items())
    return terms


# --------------------------------------------------------------------------------------------- DeepLab

def msc_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor,
             count: Callable[[torch.Tensor], torch.Tensor] = lambda c: c, at: str = "logits") -> torch.Tensor:
    """Sum of cross-entropies (ignore 255), one per output. Each is the mean over the labelled pixels of the
    batch; ``count`` maps the local pixel count to the normaliser (``src.utils.dist.global_mean_count`` in
    multi-process training). An output with no labelled pixel adds 0 (not the NaN of an empty mean).

    ``at``: ``logits`` (DeepLab's reference): the labels shrunk to each output's size with nearest-neighbour;
    ``input``: each output upsampled (bilinear) to the labels' size, so objects smaller than the output
    stride still shape the loss (the quick profile's 96 px images give 12 x 12 logits at stride 8)."""
    check_choice("loss_at", at, LOSS_RESOLUTIONS)
    total = outputs[0].new_zeros(())
    for out in outputs:
        if at == "logits":
            labels = F.interpolate(target[:, None].float(), size=out.shape[-2:], mode="nearest")[:, 0].long()
        else:
            labels = target.long()
            out = F.interpolate(out, size=target.shape[-2:], mode="bilinear", align_corners=False)
        n = count((labels != IGNORE).sum())
        ce = F.cross_entropy(out, labels, ignore_index=IGNORE, reduction="sum")
        total = total + ce / n.clamp(min=1)
    return total


LOSS_RESOLUTIONS = ("logits", "input")


# ------------------------------------------------------------------------------------------------ ESOL
AREA_NORMALISATIONS = ("max", "none")


def area_loss(cam: torch.Tensor, labels: torch.Tensor, normalise: str = "max", eps: float = EPS) -> torch.Tensor:
    """ESOL's shrinkage area term (specs/esol.md section 5, ours): the mean over images and present classes
    of mean_hw A, with A = ReLU(cam) / (max_hw ReLU(cam) + eps) (``max``; the max is not detached, so the
    term is scale-invariant and rewards compact maps) or A = ReLU(cam) (``none``). cam (B, K, h, w), labels
    (B, K) in {0, 1}; 0 when no class is present."""
    check_choice("area normalise", normalise, AREA_NORMALISATIONS)
    act = F.relu(cam.float())
    if normalise == "max":
        act = act / (act.amax(dim=(2, 3), keepdim=True) + eps)
    present = (labels > 0).to(act.dtype)
    return (act.mean(dim=(2, 3)) * present).sum() / present.sum().clamp(min=1)


def positive_soft_margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The present-class terms of ``F.multilabel_soft_margin_loss`` (same 1 / K and batch mean), so that
    ascending it pushes only the true classes' scores down (ESOL's ``inverse_classes=positive``)."""
    y = labels.to(logits.dtype)
    return -(y * F.logsigmoid(logits)).sum(1).mean() / logits.shape[1]
