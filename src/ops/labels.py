"""Label maps from seeds: the refiners' training labels and the seeds' own label maps.

* IRNet's inter-pixel relation labels (specs/irnet.md stage 3, ``cam_to_ir_label``): confident
  foreground = a background plane at ``conf_fg``, argmax, dense CRF; confident background = the same at
  ``conf_bg``; foreground classes from the first map, background where BOTH say background, every other
  pixel unknown (255). Full resolution.
* AffinityNet's labels (specs/seam.md; PSA/SEAM ``infer_SEAM.py --out_crf``): scores [bg, fg...] with
  bg = (1 - max fg) ** alpha refined by a dense CRF, at a low alpha (strong background: pixels still
  foreground are confident foreground) and a high alpha (weak background: pixels still background are
  confident background); the high-alpha background wins, as in the reference's ``VOC12AffDataset``.
  The reference keeps both CRF score maps and takes the argmax after pooling the crop 8x8; here the labels
  are full-resolution PNGs and :func:`stride_labels` pools the label map with the same argmax rule.
  The reference pads its crops' scores with zeros, so padding does not vote; a crop padded with
  :data:`NO_VOTE` and ``padding="no_vote"`` reproduces that (``unknown``: padding counts as 255).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from src.ops.crf import crf_refine_labels, crf_refine_probs
from src.utils.config import check_choice
from src.utils.labels import IGNORE

NO_VOTE = 254
"""Label of the padding of a training crop (conf/refinement/affinity.yaml ``fill_mask``): with
``padding="no_vote"`` :func:`stride_labels` leaves it out of the vote; otherwise it is unknown like 255."""
PADDINGS = ("unknown", "no_vote")


def seed_labels(scores: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """Class ids (H, W) uint8 of seeds at a constant background ``threshold``: argmax over
    [threshold plane, class scores], ties to the background."""
    if scores.shape[0] == 0:
        return np.zeros(scores.shape[1:], np.uint8)
    pred = np.concatenate([np.full((1, *scores.shape[1:]), threshold, np.float32),
                           scores.astype(np.float32)]).argmax(0)
    return np.concatenate([[0], keys]).astype(np.uint8)[pred]


def confident_labels(scores: np.ndarray, keys: np.ndarray, threshold: float, image: np.ndarray | None,
                     crf: Mapping[str, Any] | None) -> np.ndarray:
    """Class ids (H, W): argmax over [threshold plane, class scores], CRF-refined when ``crf`` is set."""
    padded = np.concatenate([np.full((1, *scores.shape[1:]), threshold, np.float32), scores.astype(np.float32)])
    pred = padded.argmax(0)
    if crf is not None and image is not None:
        pred = crf_refine_labels(image, pred, len(keys) + 1, crf)
    return np.concatenate([[0], np.asarray(keys, np.int64)])[pred]


def ir_label(scores: np.ndarray, keys: np.ndarray, image: np.ndarray | None, conf_fg: float, conf_bg: float,
             crf: Mapping[str, Any] | None) -> np.ndarray:
    """The IR label map (H, W) uint8: classes, 0 = confident background, 255 = unknown."""
    fg = confident_labels(scores, keys, conf_fg, image, crf)
    bg = confident_labels(scores, keys, conf_bg, image, crf)
    out = fg.copy()
    out[fg == 0] = IGNORE
    out[(fg == 0) & (bg == 0)] = 0
    return out.astype(np.uint8)


def alpha_scores(fg: np.ndarray, alpha: float) -> np.ndarray:
    """[bg, fg...] (n + 1, H, W) float32 with bg = (1 - max fg) ** alpha (all background when n = 0)."""
    fg = np.asarray(fg, np.float32)
    peak = fg.max(0) if len(fg) else np.zeros(fg.shape[1:], np.float32)
    bg = np.power(np.clip(1.0 - peak, 0.0, None), alpha)[None]
    return np.concatenate([bg, fg]).astype(np.float32)


def alpha_argmax(fg: np.ndarray, alpha: float, image: np.ndarray | None,
                 crf: Mapping[str, Any] | None) -> np.ndarray:
    """Index (H, W) into [bg, fg...] of the (CRF-refined when ``crf`` is set) alpha-power scores."""
    scores = alpha_scores(fg, alpha)
    if crf is not None and image is not None and len(scores) > 1:
        scores = crf_refine_probs(image, scores, crf)
    return scores.argmax(0)


def affinity_label(fg: np.ndarray, keys: np.ndarray, image: np.ndarray | None, alpha_low: float,
                   alpha_high: float, crf: Mapping[str, Any] | None) -> np.ndarray:
    """AffinityNet's label map (H, W) uint8 (module docstring): class ids, 0 = confident background,
    255 unknown."""
    ids = np.concatenate([[0], np.asarray(keys, np.int64)])
    low = alpha_argmax(fg, alpha_low, image, crf)
    high = alpha_argmax(fg, alpha_high, image, crf)
    out = ids[low]
    out[low == 0] = IGNORE
    out[high == 0] = 0
    return out.astype(np.uint8)


def stride_labels(mask: torch.Tensor, stride: int, num_classes: int, padding: str = "unknown") -> torch.Tensor:
    """Full-resolution label maps (B, H, W) -> labels (B, ceil(H/stride), ceil(W/stride)) on the net's grid.

    The reference pools the two CRF score maps (low / high alpha) of the crop ``stride`` x ``stride`` and
    takes their argmax: a cell is class c when c beats the low-alpha background, background when the
    high-alpha background beats every class, unknown otherwise. From the stored labels, per cell with
    fractions bg (0), fg_c (class c) and unk (255, padding included): the low-alpha map gives the
    unknown pixels to the background, so the cell is c if fg_c > bg + unk; the high-alpha map gives them
    to a class, so the cell is background if bg >= max_c fg_c + unk (ties go to the background, as the
    reference's argmax); else 255. Exact for hard (one-hot) CRF scores and cells holding one class.

    ``padding="no_vote"``: pixels labelled :data:`NO_VOTE` (and the bottom/right padding to a stride
    multiple) are left out of the fractions, as the reference's zero scores, and a cell of padding only is
    255 (the reference's ``no_score_region``). ``unknown``: they count as unknown.
    """
    check_choice("padding", padding, PADDINGS)
    b, h, w = mask.shape
    pad_h, pad_w = -h % stride, -w % stride
    unknown_id, no_vote_id = num_classes + 1, num_classes + 2
    values = torch.where((mask < 0) | (mask > num_classes), torch.full_like(mask, unknown_id), mask)
    if padding == "no_vote":
        values = torch.where(mask == NO_VOTE, torch.full_like(mask, no_vote_id), values)
    values = F.pad(values, (0, pad_w, 0, pad_h), value=no_vote_id if padding == "no_vote" else unknown_id)
    onehot = F.one_hot(values.long(), num_classes + 3).permute(0, 3, 1, 2).float()
    frac = F.avg_pool2d(onehot, stride, stride)
    bg, fg, unknown = frac[:, 0], frac[:, 1:num_classes + 1], frac[:, unknown_id]
    fg_max, fg_arg = fg.max(1)
    out = torch.where(fg_max > bg + unknown, fg_arg + 1, torch.full_like(fg_arg, IGNORE))
    out = torch.where(bg >= fg_max + unknown, torch.zeros_like(out), out)
    return torch.where(frac[:, no_vote_id] == 1.0, torch.full_like(out, IGNORE), out)
