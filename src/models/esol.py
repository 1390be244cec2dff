"""ESOL's classifier (Li et al., NeurIPS 2022; specs/esol.md): IRNet's CAM net with two deformable heads.

    F = backbone(x)                                             (IRNet's CAM net trunk)
    expansion:  F'  = DCN(F, offsets_e(F.detach()); W1),  F'_clip = Clip(F')
    shrinkage:  F2  = DCN(F'_clip, offsets_s(F'_clip); W2)        (everything up to the clip frozen)
    logits = classifier(GAP(feature)), CAM = classifier(feature)   per stage, feature = F'_clip or F2

The offset convs (the *samplers*) start at zero and the kernels at the identity (``kernel_init``), so with
``clip.mode=none`` each stage starts exactly where the previous one ended (the CAM net, then the expansion).
Only the figure and the abstract of the paper were available: the clip's form, the kernels' init and
training, the classifier sharing are ours, each a constructor argument (conf/baseline/esol.yaml ``esol``).

One class for both stages (``stage``): the shrinkage net holds the expansion net (same keys) plus the
shrinkage head, so it loads an expansion checkpoint and the seeds stage rebuilds either from its config.
The loss routing (gradient reversal, detached paths) is the training modules' (src/stages/expansion.py,
src/stages/shrinkage.py); this module gives the pieces. CONTA's prior joins like the CAM net's
(:class:`~src.models.conta.ContextInjection`): as an extra channel of the feature each classifier reads
(after the heads, so the heads stay C -> C), or as an extra image channel.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.models.cam_net import CAMNet, trunk
from src.models.conta import ContextInjection
from src.ops.deform_conv import DeformConv2d, deform_conv2d
from src.ops.optim import ParamGroup
from src.utils.config import check_choice

STAGES = ("expansion", "shrinkage")
KERNEL_INITS = ("identity", "kaiming")
CLIP_MODES = ("relative", "absolute", "none")
KERNEL_TRAINING = ("frozen", "cls_only")
BACKBONE_TRAINING = ("frozen", "train")
SHRINK_CLASSIFIERS = ("copy", "shared")


def check_options(stage: str, kernel_size: int, offset_groups: int, kernel_init: str, clip: Mapping[str, Any],
                  backbone: str, expansion_kernel: str, shrink_kernel: str, shrink_classifier: str,
                  head_lr_mult: float, offset_lr_mult: float, offset_bound: float | None = None) -> None:
    """The ESOL net's options (:class:`ESOLNet`), checked without building it (the stages check their config)."""
    check_choice("stage", stage, STAGES)
    check_choice("kernel_init", kernel_init, KERNEL_INITS)
    check_choice("backbone", backbone, BACKBONE_TRAINING)
    check_choice("expansion_kernel", expansion_kernel, KERNEL_TRAINING)
    check_choice("shrink_kernel", shrink_kernel, KERNEL_TRAINING)
    check_choice("shrink_classifier", shrink_classifier, SHRINK_CLASSIFIERS)
    check_choice("clip.mode", clip["mode"], CLIP_MODES)
    for name, value in (("kernel_size", kernel_size), ("offset_groups", offset_groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (the identity init needs a centre tap), got {kernel_size}")
    for name, value in (("clip.kappa", clip["kappa"]), ("clip.tau", clip["tau"]), ("head_lr_mult", head_lr_mult),
                        ("offset_lr_mult", offset_lr_mult)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if offset_bound is not None and (isinstance(offset_bound, bool) or not isinstance(offset_bound, int | float)
                                     or not offset_bound > 0):
        raise ValueError(f"offset_bound must be null (unbounded) or a number of cells > 0, got {offset_bound!r}")


class GradientReversal(torch.autograd.Function):
    """Identity forward, ``-weight`` x the gradient backward (Ganin & Lempitsky 2015): the layers before it
    ascend what the layers after it descend."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = float(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad, None


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    return GradientReversal.apply(x, weight)


class Clip(nn.Module):
    """ESOL's feature clipping (ours: the paper's form was not available): clamp(F', 0, tau) with
    ``relative``: tau = kappa x max_hw F' per image and channel (max detached), ``absolute``: tau fixed,
    ``none``: a plain ReLU. The cap makes a class score rise only by activating more positions."""

    def __init__(self, mode: str, kappa: float, tau: float) -> None:
        super().__init__()
        self.mode = check_choice("clip.mode", mode, CLIP_MODES)
        if not kappa > 0 or not tau > 0:
            raise ValueError(f"clip.kappa and clip.tau must be > 0, got kappa={kappa}, tau={tau}")
        self.kappa, self.tau = float(kappa), float(tau)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = F.relu(f)
        if self.mode == "none":
            return f
        if self.mode == "absolute":
            return f.clamp(max=self.tau)
        cap = self.kappa * f.detach().amax(dim=(2, 3), keepdim=True)
        return torch.minimum(f, cap)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, kappa={self.kappa}, tau={self.tau}"


class DeformableHead(nn.Module):
    """One ESOL layer: a sampler (``offset``: plain conv to 2 G K offset channels, zero-initialised as mmcv's
    DeformConv2dPack, so training starts on the regular grid) and a C -> C deformable kernel without bias
    (``dcn``), identity-initialised (centre tap = identity) or kaiming. ``offset_bound`` (ours, in feature
    cells): offsets = bound x tanh(raw / bound), so an ascending sampler cannot leave a small map (where it
    reads zeros); near zero it is the raw offset, so training starts as without it."""

    def __init__(self, channels: int, kernel_size: int, offset_groups: int, kernel_init: str,
                 offset_bound: float | None = None) -> None:
        super().__init__()
        if offset_bound is not None and not offset_bound > 0:
            raise ValueError(f"offset_bound must be null or > 0 feature cells, got {offset_bound}")
        self.offset_bound = None if offset_bound is None else float(offset_bound)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        if offset_groups < 1 or channels % offset_groups:
            raise ValueError(f"offset_groups must divide the {channels} feature channels, got {offset_groups}")
        pad = kernel_size // 2
        self.offset = nn.Conv2d(channels, 2 * offset_groups * kernel_size ** 2, kernel_size, padding=pad)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.dcn = DeformConv2d(channels, channels, kernel_size, padding=pad, bias=False)
        with torch.no_grad():
            if check_choice("kernel_init", kernel_init, KERNEL_INITS) == "identity":
                self.dcn.weight.zero_()
                self.dcn.weight[:, :, pad, pad] = torch.eye(channels)
            else:  # mmcv's kaiming_init of a conv followed by ReLU
                nn.init.kaiming_uniform_(self.dcn.weight, nonlinearity="relu")

    def offsets(self, f: torch.Tensor) -> torch.Tensor:
        raw = self.offset(f)
        if self.offset_bound is None:
            return raw
        return self.offset_bound * torch.tanh(raw / self.offset_bound)

    def forward(self, f: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The deformable conv of ``f`` at ``offsets`` (``weight``: the kernel, e.g. detached; default own)."""
        dcn = self.dcn
        return deform_conv2d(f, offsets, dcn.weight if weight is None else weight, None, dcn.stride, dcn.padding,
                             dcn.dilation)


class ESOLNet(ContextInjection, nn.Module):
    """The ESOL classifier of one stage (module docstring). Arguments: ``cam_net`` (IRNet's CAM net config:
    its backbone and classifier are taken over, same keys), ``stage`` (expansion | shrinkage), the heads'
    ``kernel_size`` / ``offset_groups`` / ``kernel_init``, ``clip`` ({mode, kappa, tau}), what trains:
    ``backbone`` (frozen | train, expansion), ``expansion_kernel`` / ``shrink_kernel`` (W1 / W2: frozen |
    cls_only), ``shrink_classifier`` (copy: a copy of the expansion classifier | shared: the same one), and
    the lr multipliers ``head_lr_mult`` (classifiers and kernels) and ``offset_lr_mult`` (samplers, x head),
    and ``offset_bound`` (both samplers' offsets bounded to that many feature cells; null: unbounded)."""

    def __init__(self, cam_net: CAMNet, stage: str, kernel_size: int, offset_groups: int, kernel_init: str,
                 clip: Mapping[str, Any], backbone: str, expansion_kernel: str, shrink_kernel: str,
                 shrink_classifier: str, head_lr_mult: float, offset_lr_mult: float,
                 offset_bound: float | None = None) -> None:
        super().__init__()
        check_options(stage, kernel_size, offset_groups, kernel_init, clip, backbone, expansion_kernel, shrink_kernel,
                      shrink_classifier, head_lr_mult, offset_lr_mult, offset_bound)
        self.stage, self.backbone_mode = stage, backbone
        self.expansion_kernel, self.shrink_kernel = expansion_kernel, shrink_kernel
        self.shrink_classifier_mode = shrink_classifier
        if cam_net.context_inject is not None:
            raise ValueError("ESOLNet takes an untrained CAM net config; CONTA's context is enabled on the ESOL net")
        self.head_lr_mult, self.offset_lr_mult = float(head_lr_mult), float(offset_lr_mult)
        self.backbone = cam_net.backbone
        self.classifier = cam_net.classifier
        self.detach_stage = cam_net.detach_stage
        self.num_classes = cam_net.num_classes
        self.output_stride = cam_net.output_stride
        self.feature_channels = cam_net.feature_channels
        channels = self.backbone.out_channels
        self.expansion = DeformableHead(channels, kernel_size, offset_groups, kernel_init, offset_bound)
        self.clip = Clip(str(clip["mode"]), float(clip["kappa"]), float(clip["tau"]))
        if self.stage == "shrinkage":
            self.shrinkage = DeformableHead(channels, kernel_size, offset_groups, kernel_init, offset_bound)
            if self.shrink_classifier_mode == "copy":
                self.shrink_classifier = copy.deepcopy(self.classifier)
        self._freeze()

    # ------------------------------------------------------------------------------ what trains
    @property
    def trains_backbone(self) -> bool:
        return self.stage == "expansion" and self.backbone_mode == "train"

    @property
    def trains_w1(self) -> bool:
        return self.stage == "expansion" and self.expansion_kernel == "cls_only"

    @property
    def trains_w2(self) -> bool:
        return self.stage == "shrinkage" and self.shrink_kernel == "cls_only"

    @property
    def head_classifier(self) -> nn.Conv2d:
        """The classifier of this stage's CAM (the shrinkage's copy, or the shared expansion classifier)."""
        return self.shrink_classifier if hasattr(self, "shrink_classifier") else self.classifier

    def _freeze(self) -> None:
        """requires_grad off for everything this stage does not train (the CAM net's own frozen stem stays
        frozen when the backbone trains)."""
        if not self.trains_backbone:
            self.backbone.requires_grad_(False)
        self.expansion.dcn.weight.requires_grad_(self.trains_w1)
        self.expansion.offset.requires_grad_(self.stage == "expansion")
        if self.stage == "shrinkage":
            self.shrinkage.dcn.weight.requires_grad_(self.trains_w2)
            if hasattr(self, "shrink_classifier"):
                self.classifier.requires_grad_(False)

    def train(self, mode: bool = True) -> ESOLNet:
        """A frozen backbone keeps its BN statistics (eval mode) while the heads train."""
        super().train(mode)
        if not self.trains_backbone:
            self.backbone.eval()
        return self

    def expand_classifier_input(self, extra: int) -> None:
        """CONTA (``inject=feature``): every classifier gets the prior's channel (zero-initialised)."""
        if hasattr(self, "shrink_classifier"):
            own, self.classifier = self.classifier, self.shrink_classifier
            super().expand_classifier_input(extra)
            self.shrink_classifier, self.classifier = self.classifier, own
        super().expand_classifier_input(extra)
        self._freeze()

    # ----------------------------------------------------------------------------------- pieces
    def features(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's last feature map F (no graph unless the backbone trains)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_backbone):
            return trunk(self.backbone, self.inject_input(x, context), self.detach_stage)

    def expansion_offsets(self, f: torch.Tensor) -> torch.Tensor:
        """The expansion sampler's offsets; it reads F detached (the figure's loss-detach mark)."""
        return self.expansion.offsets(f.detach())

    def expand(self, f: torch.Tensor, offsets: torch.Tensor, frozen_kernel: bool = False) -> torch.Tensor:
        """F'_clip = Clip(DCN(F, offsets; W1)); W1 is detached unless it trains here and not ``frozen_kernel``."""
        w1 = self.expansion.dcn.weight
        return self.clip(self.expansion(f, offsets, w1 if self.trains_w1 and not frozen_kernel else w1.detach()))

    def clipped(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """F'_clip of the frozen expansion (shrinkage stage: no gradient reaches anything up to the clip)."""
        with torch.no_grad():
            f = self.features(x, context)
            return self.expand(f, self.expansion_offsets(f), frozen_kernel=True)

    def shrink_offsets(self, g: torch.Tensor) -> torch.Tensor:
        return self.shrinkage.offsets(g)

    def shrink(self, g: torch.Tensor, offsets: torch.Tensor, frozen_kernel: bool = False) -> torch.Tensor:
        """F2 = DCN(F'_clip, offsets; W2); W2 is detached unless it trains here and not ``frozen_kernel``."""
        w2 = self.shrinkage.dcn.weight
        return self.shrinkage(g, offsets, w2 if self.trains_w2 and not frozen_kernel else w2.detach())

    def logits(self, feature: torch.Tensor, context: torch.Tensor | None, classifier: nn.Conv2d,
               frozen: bool = False) -> torch.Tensor:
        """classifier(GAP(feature [+ the prior's channel])) (B, K); ``frozen``: the classifier's weights detached."""
        pooled = F.adaptive_avg_pool2d(self.inject_feature(feature, context), 1)
        return self._classify(pooled, classifier, frozen).flatten(1)

    def class_maps(self, feature: torch.Tensor, context: torch.Tensor | None, classifier: nn.Conv2d,
                   frozen: bool = False) -> torch.Tensor:
        """The classifier at every position (B, K, h, w), no ReLU (the CAM net's convention)."""
        return self._classify(self.inject_feature(feature, context), classifier, frozen)

    @staticmethod
    def _classify(x: torch.Tensor, classifier: nn.Conv2d, frozen: bool) -> torch.Tensor:
        if not frozen:
            return classifier(x)
        bias = None if classifier.bias is None else classifier.bias.detach()
        return F.conv2d(x, classifier.weight.detach(), bias)

    # ------------------------------------------------------------------------------ the network
    def stage_feature(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The feature this stage's classifier reads: F'_clip (expansion) or F2 (shrinkage)."""
        if self.stage == "expansion":
            f = self.features(x, context)
            return self.expand(f, self.expansion_offsets(f))
        g = self.clipped(x, context)
        return self.shrink(g, self.shrink_offsets(g))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's image-level logits (B, K)."""
        return self.logits(self.stage_feature(x, context), context, self.head_classifier)

    def cams(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's raw CAMs (B, K, h, w)."""
        return self.class_maps(self.stage_feature(x, context), context, self.head_classifier)

    def expansion_cams(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The expansion CAM (of a shrinkage net too: its frozen expansion, through the expansion classifier)."""
        f = self.features(x, context)
        return self.class_maps(self.expand(f, self.expansion_offsets(f)), context, self.classifier)

    def seed_cams(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The seeds' maps: the expansion CAM of an expansion net, the shrinkage CAM of a shrinkage net."""
        return self.cams(x, context)

    def load_cam_net(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Take over a trained CAM net's weights (its ``backbone.*`` and ``classifier.*``, nothing else)."""
        self._load_part(state, ("backbone.", "classifier."), source)

    def load_expansion(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """A shrinkage net starts from a trained expansion net (backbone, classifier, expansion head); the
        shrinkage classifier (``copy``) starts as the expansion's."""
        if self.stage != "shrinkage":
            raise ValueError("load_expansion is for the shrinkage net")
        self._load_part(state, ("backbone.", "classifier.", "expansion."), source)
        if hasattr(self, "shrink_classifier"):
            self.shrink_classifier.load_state_dict(self.classifier.state_dict())

    def _load_part(self, state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], source: str) -> None:
        own = self.state_dict()
        keys = {k for k in own if k.startswith(prefixes)}
        given = dict(state)
        for k in keys - set(given):
            if k.endswith("num_batches_tracked"):
                given[k] = torch.zeros_like(own[k])
        missing, unexpected = sorted(keys - set(given)), sorted(set(given) - keys)
        shapes = sorted(f"{k}: {tuple(given[k].shape)} vs {tuple(own[k].shape)}" for k in keys & set(given)
                        if given[k].shape != own[k].shape)
        if missing or unexpected or shapes:
            raise ValueError(f"{source} does not fit the ESOL {self.stage} net (another backbone, class count or "
                             f"CONTA setting?): missing {missing[:6]}, unexpected {unexpected[:6]}, "
                             f"shape mismatches {shapes[:6]}")
        self.load_state_dict({**own, **given})

    def param_groups(self) -> list[ParamGroup]:
        """What this stage trains: expansion = its sampler, classifier (and W1 / the backbone when they
        train); shrinkage = its sampler and classifier (and W2). Frozen parameters are left out."""
        head, sampler = self.head_lr_mult, self.head_lr_mult * self.offset_lr_mult
        if self.stage == "expansion":
            groups = [ParamGroup(self.expansion.offset.parameters(), sampler, name="expansion_sampler"),
                      ParamGroup(self.classifier.parameters(), head, name="classifier")]
            if self.trains_w1:
                groups.append(ParamGroup([self.expansion.dcn.weight], head, name="expansion_kernel"))
            if self.trains_backbone:
                groups.append(ParamGroup(self.backbone.parameters(), 1.0, name="backbone"))
            return groups
        groups = [ParamGroup(self.shrinkage.offset.parameters(), sampler, name="shrinkage_sampler"),
                  ParamGroup(self.head_classifier.parameters(), head, name="classifier")]
        if self.trains_w2:
            groups.append(ParamGroup([self.shrinkage.dcn.weight], head, name="shrinkage_kernel"))
        return groups
