"""CONTA's context adjustment (Zhang et al., NeurIPS 2020), see ../shared/specs/conta.md.

The confounder set C = {c_1..c_n} holds one class-average mask per foreground class (h x w). For an
image with mask X_m (from the previous round's segmentation model) the context prior is

    M = sum_i alpha_i * c_i * P(c_i),   P(c_i) = 1/n,
    alpha = softmax_i( (W1 X_m)^T (W2 c_i) / sqrt(n) ),   W1, W2 learnable (n x hw),

an h x w map that joins the classifier (as an extra channel of its last feature map by default, or as
an extra image channel). W1 and W2 train with the classification loss. ``image_mask`` says what X_m
holds: ``foreground`` (binary any-class mask, the default), ``label_map`` (class index / n) or
``per_class`` (the n x hw stack; W1 then acts on each class channel and pairs it with c_i).
``normalize="max"`` (an option, not in the paper) divides M by its maximum: with P(c_i) = 1/n the
paper's M is ~1/n of a class-average mask, far smaller than the features it joins (see
experiments/conta_synthetic/RESULTS.md for what that does to training).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.utils.config import check_choice

IMAGE_MASK_MODES = ("foreground", "label_map", "per_class")
INJECT_MODES = ("feature", "input")
NORMALIZE_MODES = ("none", "max")


def image_mask_vector(label_map: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor:
    """X_m from an (B, h, w) label map (0 = background, 1..n classes, 255 = unknown -> background).

    Returns (B, h*w) for ``foreground`` / ``label_map`` and (B, n, h*w) for ``per_class``.
    Soft inputs (B, n + 1, h, w) class probabilities are accepted too (background channel first).
    """
    if label_map.dim() == 4:  # probabilities
        probs = label_map.float()
        fg = probs[:, 1:]
        if mode == "foreground":
            return fg.sum(1).flatten(1)
        if mode == "label_map":
            idx = torch.arange(1, num_classes + 1, device=probs.device, dtype=probs.dtype).view(1, -1, 1, 1)
            return (fg * idx).sum(1).flatten(1) / num_classes
        if mode == "per_class":
            return fg.flatten(2)
    else:
        labels = label_map.long()
        labels = torch.where(labels > num_classes, torch.zeros_like(labels), labels)
        if mode == "foreground":
            return (labels > 0).float().flatten(1)
        if mode == "label_map":
            return labels.float().flatten(1) / num_classes
        if mode == "per_class":
            onehot = F.one_hot(labels, num_classes + 1)[..., 1:]
            return onehot.permute(0, 3, 1, 2).float().flatten(2)
    check_choice("conta.image_mask", mode, IMAGE_MASK_MODES)
    raise AssertionError(f"image_mask {mode!r} has no rule")


class ContextAdjustment(nn.Module):
    """Builds the context prior M from the confounder set and an image's mask (module docstring)."""

    def __init__(self, confounder_set: torch.Tensor, image_mask: str = "foreground", normalize: str = "none"
                 ) -> None:
        super().__init__()
        check_choice("conta.context.normalize", normalize, NORMALIZE_MODES)
        self.normalize = normalize
        check_choice("conta.image_mask", image_mask, IMAGE_MASK_MODES)
        if confounder_set.dim() != 3:
            raise ValueError(f"the confounder set must be (n, h, w), got shape {tuple(confounder_set.shape)}")
        n, h, w = confounder_set.shape
        self.num_classes, self.size, self.image_mask = n, (h, w), image_mask
        self.register_buffer("confounders", confounder_set.float().clone())
        self.w1 = nn.Linear(h * w, n, bias=False)  # W1: n x hw
        self.w2 = nn.Linear(h * w, n, bias=False)  # W2: n x hw

    def attention(self, x_m: torch.Tensor) -> torch.Tensor:
        """alpha (B, n): softmax over the n confounders."""
        n = self.num_classes
        keys = self.w2(self.confounders.flatten(1))  # (n, n): row i = W2 c_i
        if self.image_mask == "per_class":
            queries = self.w1(x_m)  # (B, n, n): row i = W1 X_m^(i)
            logits = (queries * keys.unsqueeze(0)).sum(-1)
        else:
            logits = self.w1(x_m) @ keys.t()  # (B, n)
        return torch.softmax(logits / math.sqrt(n), dim=-1)

    def forward(self, x_m: torch.Tensor) -> torch.Tensor:
        """M (B, 1, h, w) for image masks X_m (see :func:`image_mask_vector` for the layout)."""
        alpha = self.attention(x_m)
        prior = alpha @ self.confounders.flatten(1) / self.num_classes  # P(c_i) = 1/n
        if self.normalize == "max":  # same spatial pattern, values up to 1 like the (ReLU'd) features
            prior = prior / prior.amax(1, keepdim=True).clamp_min(1e-6)
        return prior.view(-1, 1, *self.size)


class ContextInjection:
    """Mixin for classifier nets: where the context prior M joins (``feature`` or ``input``).

    The net calls :meth:`inject_input` on its image and :meth:`inject_feature` on its last feature map;
    both are the identity until :meth:`enable_context` is called (conta off, and round 0).
    """

    context_inject: str | None = None

    def enable_context(self, inject: str = "feature") -> None:
        """Widen the layer that receives M by one zero-initialised input channel."""
        check_choice("conta.inject", inject, INJECT_MODES)
        if self.context_inject is not None:
            return
        if inject == "feature":
            self.expand_classifier_input(1)
        else:
            self.backbone.expand_input_channels(1)
        self.context_inject = inject

    def expand_classifier_input(self, extra: int) -> None:
        old: nn.Conv2d = self.classifier
        new = nn.Conv2d(old.in_channels + extra, old.out_channels, 1, bias=old.bias is not None)
        new = new.to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, : old.in_channels] = old.weight
            if old.bias is not None:
                new.bias.copy_(old.bias)
        self.classifier = new
        self.feature_channels = old.in_channels + extra

    def _check(self, context: torch.Tensor | None) -> bool:
        if context is None:
            if self.context_inject is not None:
                raise ValueError("this classifier was built with CONTA's context prior; pass `context`")
            return False
        if self.context_inject is None:
            raise ValueError("got a context prior but CONTA is not enabled on this classifier")
        return True

    def inject_input(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if not self._check(context) or self.context_inject != "input":
            return x
        m = F.interpolate(context.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([x, m], 1)

    def inject_feature(self, f: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if not self._check(context) or self.context_inject != "feature":
            return f
        m = F.interpolate(context.to(f.dtype), size=f.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([f, m], 1)


class ContextPrior(nn.Module):
    """X_m (label map or probabilities) -> M, with CONTA's image-mask convention (``image_mask``)."""

    def __init__(self, confounders: torch.Tensor, image_mask: str, normalize: str) -> None:
        super().__init__()
        self.adjust = ContextAdjustment(confounders, image_mask, normalize)
        self.image_mask = image_mask

    def forward(self, context_mask: torch.Tensor) -> torch.Tensor:
        x_m = image_mask_vector(context_mask, self.adjust.num_classes, self.image_mask)
        return self.adjust(x_m)
