"""Convert the MXNet ImageNet weights of ResNet-38d (Wu et al., model A1) into a torch state dict whose
keys are those of :class:`src.models.resnet38d.ResNet38d` (= the reference PSA/SEAM names).

Usage, from the repository root (needs ``pip install mxnet``; nothing is downloaded, fetch the file yourself
from the PSA/SEAM README links)::

    python -m experiments.tools.convert_resnet38d ilsvrc-cls_rna-a1_cls1000_ep-0001.params \\
        resnet38d_imagenet.pth

then point the config at the output (e.g. ``model.backbone.weights=/path/resnet38d_imagenet.pth``).

Name mapping (MXNet -> torch), ``arg:``/``aux:`` prefixes dropped:
``conv1a_weight`` -> ``conv1a.weight``; ``res4b5_branch2b1_weight`` -> ``b4_5.conv_branch2b1.weight``;
``bn2a_branch2a_{gamma,beta,moving_mean,moving_var}`` ->
``b2.bn_branch2a.{weight,bias,running_mean,running_var}``;
``bn7_*`` -> ``bn7.*``; the ImageNet classifier ``linear1000_*`` is dropped. The result is checked
strictly against the model (every key and shape) before it is written (atomically).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from src.models.resnet38d import ResNet38d, load_state_strict

BN_PARAMS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var",
             "mean": "running_mean", "var": "running_var"}
BLOCK_KEY = re.compile(r"^(res|bn)(\d)(a|b(\d+))_(branch[0-9a-z]+)_(\w+)$")
FINAL_BN_KEY = re.compile(r"^bn7_(\w+)$")


def torch_key(mx_name: str) -> str | None:
    """Our key for an MXNet parameter name; None for the ImageNet classifier. Unknown names raise."""
    name = mx_name.split(":", 1)[1] if mx_name.startswith(("arg:", "aux:")) else mx_name
    if name.startswith("linear1000"):
        return None
    if name == "conv1a_weight":
        return "conv1a.weight"
    m = BLOCK_KEY.match(name)
    if m:
        kind, stage, letter, index, branch, param = m.groups()
        block = f"b{stage}" if letter == "a" else f"b{stage}_{index}"
        if kind == "res" and param == "weight":
            return f"{block}.conv_{branch}.weight"
        if kind == "bn" and param in BN_PARAMS:
            return f"{block}.bn_{branch}.{BN_PARAMS[param]}"
    m = FINAL_BN_KEY.match(name)
    if m and m.group(1) in BN_PARAMS:
        return f"bn7.{BN_PARAMS[m.group(1)]}"
    raise ValueError(f"unexpected MXNet parameter name '{mx_name}' (not a ResNet-38d A1 file?)")


def rename(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """MXNet name -> array mapping into our state dict (float32 tensors)."""
    state = {}
    for mx_name, array in arrays.items():
        key = torch_key(mx_name)
        if key is None:
            continue
        if key in state:
            raise ValueError(f"two MXNet parameters map to {key}")
        state[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return state


def read_mxnet_params(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"MXNet weight file not found: {path} (this tool never downloads; get "
                                "ilsvrc-cls_rna-a1_cls1000_ep-0001.params from the PSA/SEAM README)")
    try:
        import mxnet
    except ImportError as err:
        raise ImportError("reading MXNet .params files needs mxnet: `pip install mxnet` (only for this "
                          "one-off conversion; training never needs it)") from err
    return {k: v.asnumpy() for k, v in mxnet.nd.load(str(path)).items()}


def convert(src: Path, dst: Path) -> None:
    state = rename(read_mxnet_params(src))
    model = ResNet38d()
    load_state_strict(model, state, source=str(src))  # every key and shape, BN counters filled in
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {len(state)} tensors to {dst}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("params", type=Path, help="ilsvrc-cls_rna-a1_cls1000_ep-0001.params (MXNet)")
    parser.add_argument("output", type=Path, help="torch state dict to write (.pth)")
    args = parser.parse_args(argv)
    try:
        convert(args.params, args.output)
    except (FileNotFoundError, ImportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
