"""Benchmark: seeds, i.e. multi-scale + flip CAMs of a classifier (IRNet's make_cam), per image.

Why: stage 2 runs the classifier at 4 scales x 2 flips over every training image. Ours is the seed
stage's path: ``src.ops.cams.multiscale_cams`` of the net's ``seed_cams`` over a batch of B same-size
images (each scale one batch of 2B: the images and their mirror images), then per image the kept classes
normalised (the seed config's ``normalise``) and copied to the host, as
``src.stages.seeds.CAMInference.predict_step`` does; with the requested precision, channels_last
and compile. Reference mode: what IRNet's make_cam does, one image at a time, each scale one batch
[image, flipped image], fp32, NCHW, eager (its image pyramid is built on the CPU by PIL in the data
loader; here both modes resize on the device, which favours the reference slightly).
Inputs: random images of ``--size`` px (square; VOC images are ~500 x 375) and 1-3 classes each.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import instantiate

from experiments.bench import common

NAME = "cam_inference"
# Image side of the VOC-like default of the paper backbone (VOC images are ~500 x 375 px).
PAPER_IMAGE = 448


def parser() -> argparse.ArgumentParser:
    return common.build_parser(NAME, __doc__.splitlines()[0],
                               "image side in px (default: 96 tiny, 448 paper)",
                               "images per batch (default: the seed stage's batch_size)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from src.ops.cams import NORMALISATIONS, multiscale_cams

    cfg = common.compose_config(args.backbone)
    seeds = cfg.baseline.seeds
    s = common.settings_from(NAME, args, int(seeds.batch_size),
                             PAPER_IMAGE if args.backbone == "paper" else int(cfg.data.layout.spec.image_size))
    scales, flip, cam_stride = list(seeds.scales), bool(seeds.flip), int(seeds.cam_stride)
    normalise = NORMALISATIONS[str(seeds.normalise)]
    gen = torch.Generator().manual_seed(s.seed)
    with common.PeakMemory(s.device) as mem:
        net = common.prepare_net(instantiate(cfg.baseline.classification.net), s, train=False)
        images = torch.randn(s.batch, 3, s.size, s.size, generator=gen).to(s.device)
        images = images.contiguous(memory_format=s.memory_format())
        k = net.num_classes
        keys = [torch.randperm(k, generator=gen)[: 1 + i % 3].sort().values.to(s.device) for i in range(s.batch)]
        cam_fn = common.maybe_compile(lambda x, prior: net.seed_cams(x, prior), s)

        def seeds_of(batch: torch.Tensor, batch_keys: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
            with s.autocast():
                cams, highs = multiscale_cams(cam_fn, batch, scales, flip, cam_stride, net.output_stride)
            return [(normalise(c, kk).cpu(), normalise(h, kk).cpu())
                    for c, h, kk in zip(cams, highs, batch_keys)]

        @torch.no_grad()
        def step() -> None:
            if s.reference:
                for i in range(s.batch):
                    seeds_of(images[i:i + 1], keys[i:i + 1])
            else:
                seeds_of(images, keys)

        seconds = common.timed(step, s)
    return common.make_result(s, s.batch * s.iters, seconds, mem, scales=scales, flip=flip)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.main(f"experiments.bench.{NAME}", parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
