"""Benchmark: one DeepLab-v2 training step with multi-scale inputs (MSC): forward at every scale, the
max-fused output, one cross-entropy per output, backward, SGD with DeepLab's parameter groups.

Why: the last stage trains the largest network (ResNet-101 at output stride 8 in the paper profile)
for 20k steps; MSC triples the forward. The step is SegmentationModule's (``msc_forward`` +
``msc_loss``, the stage config's scales, optimiser and parameter groups) minus Lightning's
bookkeeping, with the requested precision, memory format and compile. Reference mode: the same step in
fp32, NCHW, eager (deeplab-pytorch's train loop; its gradient accumulation of 2 x 5 images is one
batch of 10 here). Inputs: random images and pseudo-mask-like label maps (synthetic-set shapes).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate

from experiments.bench import common

NAME = "segmentation_train"


def parser() -> argparse.ArgumentParser:
    return common.build_parser(NAME, __doc__.splitlines()[0], "training crop side (default: the profile's crop)",
                               "images per step (default: the profile's batch)")


def label_maps(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, size, size) long label maps with classes, 0 and 255 borders, like pseudo-masks."""
    return torch.from_numpy(np.stack([lab for _, lab in common.synthetic_samples(n, size, seed)]).astype(np.int64))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import src.data.synthetic  # noqa: F401  (imported outside the memory measurement)
    from src.models.deeplab import msc_forward
    from src.ops.losses import msc_loss
    from src.stages.segmentation import SegmentationModule

    cfg = common.compose_config(args.backbone)
    spec = cfg.segmentation
    s = common.settings_from(NAME, args, int(spec.batch_size), int(cfg.profile.deeplab.crop))
    scales = [float(v) for v in spec.msc_scales]
    gen = torch.Generator().manual_seed(s.seed)
    with common.PeakMemory(s.device) as mem:
        net = common.prepare_net(instantiate(spec.net), s, train=True)
        module = SegmentationModule(net, scales, common.to_container(spec.optim), max_steps=100_000,
                                    eval_cfg=common.to_container(spec.eval))
        x = torch.randn(s.batch, 3, s.size, s.size, generator=gen).to(s.device)
        x = x.contiguous(memory_format=s.memory_format())
        target = label_maps(s.batch, s.size, s.seed).to(s.device)

        seconds, flops = common.time_training(module, net, lambda f: msc_loss(msc_forward(f, x, scales), target), s)
    images = s.batch * s.iters
    return common.make_result(s, images, seconds, mem, msc_scales=scales,
                              **common.flops_fields(flops // s.batch, images / seconds, s))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.main(f"experiments.bench.{NAME}", parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
