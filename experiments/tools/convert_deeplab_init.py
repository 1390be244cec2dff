"""Convert a DeepLab init from the deeplab-pytorch naming into our ResNet backbone's (torchvision) names.

The DeepLab-v2 recipe starts from Caffe DeepLab weights (e.g. the COCO-pretrained DeepLab-v1 ResNet-101
``init.caffemodel``), which kazuto1011/deeplab-pytorch's ``convert.py`` turns into a torch state dict with
keys like ``base.layer2.block1.reduce.conv.weight``. This script renames them to our backbone's keys
(``layer1.0.conv1.weight``...), drops the classifier head (its class count is not ours), and writes a file
that ``profile=paper`` loads as the DeepLab backbone:

    python -m experiments.tools.convert_deeplab_init deeplabv1_resnet101_init.pth weights/resnet101_deeplab.pth
    python -m src.run +baseline=irnet profile=paper paths.weights.resnet101=weights/resnet101_deeplab.pth \\
        +profile.deeplab.backbone.stride_in_1x1=true +profile.deeplab.backbone.ceil_pool=true \\
        +profile.deeplab.backbone.dilate_first_block=true

The three flags give the Caffe ResNet those weights were trained in (stride on the first 1x1 conv, ceil-mode
max pooling, every block of a dilated layer dilated). Nothing is downloaded.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

CONV_NAMES = {"reduce": "1", "conv3x3": "2", "increase": "3"}
HEAD_PREFIXES = ("aspp.", "fc.")


def our_key(key: str) -> str | None:
    """Our backbone key of a deeplab-pytorch key, or None for the head (ASPP / fc)."""
    key = re.sub(r"^(module\.)?(base\.)?", "", key)
    if key.startswith(HEAD_PREFIXES):
        return None
    m = re.fullmatch(r"layer1\.conv1\.(conv|bn)\.(.+)", key)
    if m:
        return ("conv1." if m.group(1) == "conv" else "bn1.") + m.group(2)
    m = re.fullmatch(r"layer(\d)\.block(\d+)\.(reduce|conv3x3|increase|shortcut)\.(conv|bn)\.(.+)", key)
    if not m:
        raise ValueError(f"unexpected key in a deeplab-pytorch state dict: {key}")
    layer, block, part, kind, rest = int(m.group(1)) - 1, int(m.group(2)) - 1, m.group(3), m.group(4), m.group(5)
    if part == "shortcut":
        return f"layer{layer}.{block}.downsample.{0 if kind == 'conv' else 1}.{rest}"
    return f"layer{layer}.{block}.{'conv' if kind == 'conv' else 'bn'}{CONV_NAMES[part]}.{rest}"


def convert(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = our_key(key)
        if new is not None:
            out[new] = value
    return out


def main(src: str, dst: str) -> None:
    state = torch.load(src, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    converted = convert(state)
    from src.models.resnet import resnet
    from src.models.weights import load_state_strict

    model = resnet(101, strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4), stride_in_1x1=True, ceil_pool=True,
                   dilate_first_block=True)
    load_state_strict(model, converted, source=f"converted {src}")  # every backbone key present, right shapes
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted, dst)
    print(f"wrote {len(converted)} tensors to {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m experiments.tools.convert_deeplab_init SRC.pth DST.pth")
    main(sys.argv[1], sys.argv[2])
