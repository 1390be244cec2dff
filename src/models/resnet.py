"""ResNet backbones in plain torch with torchvision's module and state-dict key names.

Key names match ``torchvision.models.resnet`` (conv1, bn1, layer1..layer4, downsample.0/1, fc), so a
user loads torchvision's ImageNet weight files (``resnet50-0676ba61.pth``, the older
``resnet50-19c8e357.pth``, ``resnet101-63fe2227.pth``...) from a local path with :func:`load_weights`.
No download ever happens here.

Options the WSSS baselines need:
* ``strides`` = (conv1, layer2, layer3, layer4) strides; IRNet uses (2, 2, 2, 1) -> output stride 16,
  DeepLab uses (2, 2, 1, 1) with ``dilations`` (1, 1, 2, 4) -> output stride 8.
* ``norm``: ``batch`` (trained BN), ``fixed`` (running statistics always, affine still trainable: IRNet),
  ``frozen`` (running statistics and affine frozen: DeepLab).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.models.weights import load_state_strict, read_state_dict
from src.utils.logging import get_logger

log = get_logger(__name__)


class FixedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics (never updates them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


NORMS = {"batch": nn.BatchNorm2d, "fixed": FixedBatchNorm2d, "frozen": FixedBatchNorm2d}


def norm_layer(kind: str) -> type[nn.BatchNorm2d]:
    if kind not in NORMS:
        raise ValueError(f"unknown norm '{kind}'; choose one of {sorted(NORMS)}")
    return NORMS[kind]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, norm: type[nn.BatchNorm2d] = nn.BatchNorm2d, stride_in_1x1: bool = False
                 ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's "V1.5" bottleneck: the stride sits on the 3x3 conv (as in IRNet's ResNet-50);
    ``stride_in_1x1`` puts it on the first 1x1 conv instead (the original MSRA/Caffe ResNet of DeepLab)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, norm: type[nn.BatchNorm2d] = nn.BatchNorm2d, stride_in_1x1: bool = False
                 ) -> None:
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, s1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet trunk (no fc): ``forward`` returns the last feature map, ``forward_stages`` all five.

    Stage outputs: 0 = stem (conv1-bn1-relu-maxpool), 1..4 = layer1..layer4.

    The DeepLab (MSRA/Caffe) variant, for weights converted from DeepLab's own init
    (experiments/tools/convert_deeplab_init.py): ``stride_in_1x1=True``, ``ceil_pool=True`` (max pooling
    with ceil mode) and ``dilate_first_block=True`` (every block of a dilated layer uses its dilation; the
    torchvision convention keeps the previous dilation in the first block).
    """

    def __init__(
        self,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        strides: Sequence[int] = (2, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1),
        norm: str = "batch",
        in_channels: int = 3,
        stride_in_1x1: bool = False,
        ceil_pool: bool = False,
        dilate_first_block: bool = False,
    ) -> None:
        super().__init__()
        self.stride_in_1x1, self.dilate_first_block = stride_in_1x1, dilate_first_block
        if len(layers) != 4 or len(widths) != 4 or len(strides) != 4 or len(dilations) != 4:
            raise ValueError("ResNet needs 4 entries in layers, widths, strides (conv1, layer2-4) and dilations")
        block_cls = BLOCKS[block]
        norm_cls = norm_layer(norm)
        self.norm = norm
        self.conv1 = nn.Conv2d(in_channels, stem_width, 7, strides[0], padding=3, bias=False)
        self.bn1 = norm_cls(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=ceil_pool)
        self.inplanes, self.dilation = stem_width, 1
        layer_strides = (1, strides[1], strides[2], strides[3])
        for i in range(4):
            layer = self._make_layer(block_cls, widths[i], layers[i], layer_strides[i], dilations[i], norm_cls)
            setattr(self, f"layer{i + 1}", layer)
        self.stage_channels = [stem_width] + [w * block_cls.expansion for w in widths]
        self.out_channels = self.stage_channels[-1]
        self.output_stride = strides[0] * 2 * strides[1] * strides[2] * strides[3]
        if norm == "frozen":
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    for p in module.parameters():
                        p.requires_grad_(False)

    def _make_layer(self, block, planes, blocks, stride, dilation, norm_cls) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                norm_cls(planes * block.expansion),
            )
        # torchvision convention: the first block keeps the previous dilation, the others use the new one
        first = dilation if self.dilate_first_block else self.dilation
        layers = [block(self.inplanes, planes, stride, downsample, first, norm_cls, self.stride_in_1x1)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, dilation, norm_cls, self.stride_in_1x1)
                   for _ in range(1, blocks)]
        self.dilation = dilation
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [self.stem(x)]
        for i in range(1, 5):
            outs.append(getattr(self, f"layer{i}")(outs[-1]))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]

    def expand_input_channels(self, extra: int) -> None:
        """Add ``extra`` zero-initialised input channels to conv1 (e.g. CONTA's context prior as an
        input channel): the network's output is unchanged until those weights train."""
        old = self.conv1
        new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding,
                        bias=False).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, : old.in_channels] = old.weight
        new.weight.requires_grad_(old.weight.requires_grad)
        self.conv1 = new


def resnet(depth: int | str = 50, weights: str | Path | None = None, **kwargs) -> ResNet:
    """A ResNet by depth (18, 34, 50, 101, 152, or ``"tiny"`` for CPU runs), optionally loading
    torchvision ImageNet weights from a local file."""
    presets = {
        18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
        101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3)),
    }
    if depth == "tiny":
        kwargs.setdefault("widths", (16, 32, 64, 128))
        kwargs.setdefault("stem_width", 16)
        model = ResNet(block="basic", layers=kwargs.pop("layers", (1, 1, 1, 1)), **kwargs)
    else:
        depth = int(depth)
        if depth not in presets:
            raise ValueError(f"unknown ResNet depth {depth}; choose one of {sorted(presets)} or 'tiny'")
        block, layers = presets[depth]
        model = ResNet(block=block, layers=layers, **kwargs)
    if weights:
        load_weights(model, weights)
    return model


# Keys of torchvision's classification head; a backbone has no use for them.
HEAD_KEYS = ("fc.weight", "fc.bias")


def load_weights(model: nn.Module, path: str | Path, ignore: Sequence[str] = HEAD_KEYS) -> None:
    """Load a local state dict (torchvision file, or a Lightning/our checkpoint's ``state_dict``) into
    ``model`` strictly: any missing or unexpected key (besides ``ignore``) or shape mismatch stops
    with the keys listed."""
    state = read_state_dict(path)
    load_state_strict(model, {k: v for k, v in state.items() if k not in set(ignore)}, source=f"weight file {path}")


class TappedResNet(nn.Module):
    """A ResNet presenting ResNet-38d's trunk interface (``forward_features`` -> conv4, conv5, conv6,
    ``feature_channels``, ``freeze``...), so SEAM's net and AffinityNet run on it.

    Why: the quick profile trains from scratch on a few hundred images, where the 19-block tiny ResNet-38d
    does not fit the synthetic classes (experiments/miniature/RESULTS.md) and the 4-block tiny ResNet does.
    conv4 / conv5 / conv6 are the outputs of layer2 / layer3 / layer4 (the taps SEAM's PCM and AffinityNet
    read at the output stride); the reference's conv3 (stride 4) is layer1's output."""

    TAPS = {"conv3": 1, "conv4": 2, "conv5": 3, "conv6": 4}  # tap -> index into forward_stages

    def __init__(self, backbone: ResNet) -> None:
        super().__init__()
        self.net = backbone
        channels = backbone.stage_channels
        self.feature_channels = {name: channels[i] for name, i in self.TAPS.items()}
        self.out_channels = self.feature_channels["conv6"]
        self.output_stride = backbone.output_stride
        self.image_channels = backbone.conv1.in_channels
        self.norm = "batch"

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        stages = self.net.forward_stages(x)
        return {name: stages[i] for name, i in self.TAPS.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def freeze(self, blocks: Sequence[str]) -> None:
        """Stop training the named ResNet modules (``conv1``, ``layer1``...)."""
        for name in blocks:
            getattr(self.net, name).requires_grad_(False)

    def expand_input_channels(self, extra: int) -> None:
        """CONTA's prior as an extra input channel; ``image_channels`` stays the image's (SEAM's PCM reads it)."""
        self.net.expand_input_channels(extra)


def tapped_resnet(**kwargs) -> TappedResNet:
    """:func:`resnet` wrapped in :class:`TappedResNet` (config: ``_target_: src.models.resnet.tapped_resnet``)."""
    return TappedResNet(resnet(**kwargs))
