"""ResNet-38d (Wu et al.'s wide ResNet-38, model A1) as used by PSA/AffinityNet and SEAM, in plain torch.

Module and state-dict key names are those of the reference ``network/resnet38d.py`` (``conv1a``,
``b2`` .. ``b7``, ``bn7``; inside a block ``bn_branch2a``, ``conv_branch2a``, ``bn_branch2b1``,
``conv_branch2b1``, ``bn_branch2b2``, ``conv_branch2b2``, ``conv_branch1``), so the ImageNet weights,
converted once from MXNet by ``experiments/tools/convert_resnet38d.py``, load strictly.

Topology (specs/seam.md): conv1a 3x3 -> pre-activation blocks b2 x3 (stride 2), b3 x3 (stride 2),
b4 x6 (stride 2), b5 x3 (dilation 2, first conv dilation 1), bottlenecks b6 (dilation 4, Dropout2d 0.3)
and b7 (dilation 4, Dropout2d 0.5), final BN + ReLU: output stride 8.

``width`` scales every channel count (``tiny`` preset: width 1/16, i.e. 4 .. 256 channels, same 19
blocks, strides and dilations) so the quick CPU profile runs the same code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.models.resnet import norm_layer
from src.models.weights import load_state_strict, read_state_dict
from src.ops.optim import ParamGroup
from src.utils.logging import get_logger

log = get_logger(__name__)

CONVERT_HINT = "convert the MXNet ImageNet file with experiments/tools/convert_resnet38d.py"
__all__ = ["load_state_strict", "read_state_dict"]

# Blocks in forward order: (name, kind, in, mid, out, stride, first dilation, dilation, dropout).
# "basic" blocks use mid as the width of their first 3x3 conv; bottlenecks derive out/4 and out/2.
ARCH: tuple[tuple[str, str, int, int, int, int, int, int, float], ...] = (
    ("b2", "basic", 64, 128, 128, 2, 1, 1, 0.0),
    ("b2_1", "basic", 128, 128, 128, 1, 1, 1, 0.0),
    ("b2_2", "basic", 128, 128, 128, 1, 1, 1, 0.0),
    ("b3", "basic", 128, 256, 256, 2, 1, 1, 0.0),
    ("b3_1", "basic", 256, 256, 256, 1, 1, 1, 0.0),
    ("b3_2", "basic", 256, 256, 256, 1, 1, 1, 0.0),
    ("b4", "basic", 256, 512, 512, 2, 1, 1, 0.0),
    ("b4_1", "basic", 512, 512, 512, 1, 1, 1, 0.0),
    ("b4_2", "basic", 512, 512, 512, 1, 1, 1, 0.0),
    ("b4_3", "basic", 512, 512, 512, 1, 1, 1, 0.0),
    ("b4_4", "basic", 512, 512, 512, 1, 1, 1, 0.0),
    ("b4_5", "basic", 512, 512, 512, 1, 1, 1, 0.0),
    ("b5", "basic", 512, 512, 1024, 1, 1, 2, 0.0),
    ("b5_1", "basic", 1024, 512, 1024, 1, 2, 2, 0.0),
    ("b5_2", "basic", 1024, 512, 1024, 1, 2, 2, 0.0),
    ("b6", "bottleneck", 1024, 0, 2048, 1, 4, 4, 0.3),
    ("b7", "bottleneck", 2048, 0, 4096, 1, 4, 4, 0.5),
)
STEM_WIDTH = 64
BLOCK_NAMES: tuple[str, ...] = ("conv1a", *(a[0] for a in ARCH))
# Top-level modules holding the backbone's state (keys "<name>.<...>").
STATE_MODULES: tuple[str, ...] = (*BLOCK_NAMES, "bn7")
# Pre-activations exposed as features: name -> block whose BN-ReLU'd input it is (reference forward_as_dict).
FEATURE_TAPS = {"conv3": "b4", "conv4": "b5", "conv5": "b6"}
# Frozen in the reference SEAM / AffinityNet nets besides every BN layer (specs/seam.md).
PAPER_FROZEN_BLOCKS: tuple[str, ...] = ("conv1a", "b2", "b2_1", "b2_2")
PRESETS = {"full": 1.0, "tiny": 1.0 / 16}


class PreActBlock(nn.Module):
    """Two 3x3 convs with BN-ReLU before each; 1x1 projection shortcut (taken from the BN-ReLU'd input)
    when the shape changes. Returns (output, BN-ReLU'd input) since the latter is a feature tap."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1, first_dilation: int = 1,
                 dilation: int = 1, norm: type[nn.BatchNorm2d] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.same_shape = in_ch == out_ch and stride == 1
        self.bn_branch2a = norm(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, mid_ch, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = norm(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(pre)
        out = self.conv_branch2a(pre)
        out = self.conv_branch2b1(F.relu(self.bn_branch2b1(out)))
        return shortcut + out, pre


class PreActBottleneck(nn.Module):
    """1x1 (out/4) -> 3x3 dilated (out/2) -> 1x1 (out), pre-activated, Dropout2d before the last two
    convs (b6: 0.3, b7: 0.5 in the reference); always a 1x1 projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0,
                 norm: type[nn.BatchNorm2d] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.bn_branch2a = norm(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, stride, bias=False)
        self.bn_branch2b1 = norm(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_ch // 4, out_ch // 2, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        self.bn_branch2b2 = norm(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(pre)
        out = self.conv_branch2a(pre)
        out = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(out))))
        out = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(out))))
        return shortcut + out, pre


class ResNet38d(nn.Module):
    """ResNet-38d trunk. ``forward`` returns conv6 (B, out_channels, H/8, W/8); ``forward_features``
    returns conv3..conv6 as the reference ``forward_as_dict``.

    ``norm``: ``frozen`` (reference: every BN uses its running statistics and its affine is not trained),
    ``fixed`` (running statistics, affine trained) or ``batch`` (plain BN, for training from scratch).
    ``frozen_blocks``: top-level blocks whose parameters get ``requires_grad=False``.
    ``dropouts``: Dropout2d rates of the bottlenecks b6, b7 (None = the reference's 0.3, 0.5; the quick profile
    trains from scratch on a few hundred images, where they keep the tiny net from fitting).
    """

    def __init__(
        self,
        width: float = 1.0,
        norm: str = "frozen",  # specs/seam.md: the reference freezes every BN layer
        frozen_blocks: Sequence[str] = (),
        in_channels: int = 3,
        dropouts: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"ResNet-38d width must be > 0, got {width}")
        norm_cls = norm_layer(norm)
        self.norm = norm
        self.width = width
        self.image_channels = in_channels

        def ch(c: int) -> int:
            return max(1, int(round(c * width)))

        bottlenecks = [a[0] for a in ARCH if a[1] == "bottleneck"]
        if dropouts is not None and len(dropouts) != len(bottlenecks):
            raise ValueError(f"ResNet-38d dropouts needs one rate per bottleneck {bottlenecks}, got {list(dropouts)}")
        rates = dict(zip(bottlenecks, dropouts)) if dropouts is not None else {}
        self.conv1a = nn.Conv2d(in_channels, ch(STEM_WIDTH), 3, padding=1, bias=False)
        for name, kind, cin, mid, cout, stride, first_dil, dil, dropout in ARCH:
            dropout = float(rates.get(name, dropout))
            if kind == "basic":
                block = PreActBlock(ch(cin), ch(mid), ch(cout), stride, first_dil, dil, norm_cls)
            else:
                block = PreActBottleneck(ch(cin), ch(cout), stride, dil, dropout, norm_cls)
            setattr(self, name, block)
        self.bn7 = norm_cls(ch(ARCH[-1][4]))
        self.feature_channels = {"conv3": ch(256), "conv4": ch(512), "conv5": ch(1024), "conv6": ch(4096)}
        self.out_channels = self.feature_channels["conv6"]
        self.output_stride = 8
        if norm == "frozen":
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)
        self.freeze(frozen_blocks)

    def freeze(self, blocks: Iterable[str]) -> None:
        """Stop training the named top-level blocks (e.g. :data:`PAPER_FROZEN_BLOCKS`)."""
        for name in blocks:
            if name not in STATE_MODULES:
                raise ValueError(f"unknown ResNet-38d block '{name}'; choose from {list(STATE_MODULES)}")
            getattr(self, name).requires_grad_(False)

    def forward_features(self, x: torch.Tensor, return_blocks: bool = False) -> dict[str, torch.Tensor]:
        """conv3 (stride 4), conv4, conv5 (stride 8): BN-ReLU'd inputs of b4, b5, b6; conv6 = ReLU(bn7(b7)).
        With ``return_blocks`` the output of every block is added under its name (for checks)."""
        out: dict[str, torch.Tensor] = {}
        x = self.conv1a(x)
        if return_blocks:
            out["conv1a"] = x
        taps = {block: feat for feat, block in FEATURE_TAPS.items()}
        for name in BLOCK_NAMES[1:]:
            x, pre = getattr(self, name)(x)
            if name in taps:
                out[taps[name]] = pre
            if return_blocks:
                out[name] = x
        out["conv6"] = F.relu(self.bn7(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["conv6"]

    def expand_input_channels(self, extra: int) -> None:
        """Add ``extra`` zero-initialised input channels to conv1a (CONTA's prior as an input channel): the
        output is unchanged until they train. The new weight keeps conv1a's ``requires_grad`` (it stays
        frozen when conv1a is, as in the paper setting)."""
        old = self.conv1a
        new = nn.Conv2d(old.in_channels + extra, old.out_channels, 3, padding=1, bias=False)
        new = new.to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, : old.in_channels] = old.weight
        new.weight.requires_grad_(old.weight.requires_grad)
        self.conv1a = new

    def load_weights(self, path: str | Path) -> None:
        """Load a converted ImageNet file (or any ResNet-38d state dict with the reference names) strictly."""
        load_state_strict(self, read_state_dict(path, CONVERT_HINT), source=f"weight file {path}")


def resnet38d(preset: str = "full", weights: str | Path | None = None, **kwargs) -> ResNet38d:
    """ResNet-38d by preset: ``full`` (the paper's widths) or ``tiny`` (all widths / 16, for CPU runs),
    optionally loading converted ImageNet weights from a local file (never downloaded)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown ResNet-38d preset '{preset}'; choose one of {sorted(PRESETS)}")
    kwargs.setdefault("width", PRESETS[preset])
    model = ResNet38d(**kwargs)
    if weights:
        model.load_weights(weights)
    return model


# Learning-rate multipliers of the reference get_parameter_groups + train_SEAM.py / train_aff.py:
# pretrained weights, pretrained biases, new-layer weights, new-layer biases.
LR_MULTS = (1.0, 2.0, 10.0, 20.0)


def split_param_groups(backbone: nn.Module, new_layers: Iterable[nn.Module],
                       lr_mults: Sequence[float] = LR_MULTS) -> list[ParamGroup]:
    """The reference's four SGD groups: weights (1x, weight decay) and biases (2x, no weight decay) of the
    pretrained backbone, weights (10x, weight decay) and biases (20x, no weight decay) of the new layers.

    The reference collects Conv2d weights/biases only, since its BN layers never train; when BN trains
    here (``norm`` batch or fixed) its weight joins the weight group and its bias the bias group.
    Frozen parameters are listed too: ``build_sgd`` leaves them out.
    """
    def split(modules: Iterable[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        weights, biases = [], []
        for module in modules:
            for name, p in module.named_parameters():
                (biases if name.endswith("bias") else weights).append(p)
        return weights, biases

    new_layers = list(new_layers)
    bb_w, bb_b = split([backbone])
    new_w, new_b = split(new_layers)
    return [
        ParamGroup(bb_w, lr_mults[0], None, "backbone_weight"),
        ParamGroup(bb_b, lr_mults[1], 0.0, "backbone_bias"),
        ParamGroup(new_w, lr_mults[2], None, "new_weight"),
        ParamGroup(new_b, lr_mults[3], 0.0, "new_bias"),
    ]


def from_reference_keys(state: Mapping[str, torch.Tensor], renames: Mapping[str, str] | None = None,
                        ) -> dict[str, torch.Tensor]:
    """Map a reference SEAM/AffinityNet checkpoint (backbone keys at the top level, e.g. ``b4_1.*``) to our
    composed nets (``backbone.b4_1.*``); ``renames`` maps other top-level modules (``fc8`` -> ``classifier``).
    States already in our layout pass through unchanged."""
    renames = dict(renames or {})
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in STATE_MODULES:
            key = f"backbone.{key}"
        elif head in renames:
            key = f"{renames[head]}.{rest}"
        out[key] = value
    return out
