"""Benchmark: DeepLab-v2 evaluation: class probabilities (``src.models.deeplab.predict_probs``) and the
label map of each image, as SegmentationModule.predict_step computes them.

Why: every evaluation split is predicted once per round (and the confounder set predicts the train
split), so inference throughput matters too. Ours: a batch of B same-size images per call, with the
requested precision, memory format and compile; the probabilities are copied to the host in fp32
and argmax'ed per image. Reference mode: one image per call, fp32, NCHW, eager (deeplab-pytorch's
evaluation runs a batch of 1). ``--msc`` adds the stage config's test-time scales (max-fused),
``--flip`` the mirror image. Inputs: random images of ``--size`` px.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import instantiate

from experiments.bench import common

NAME = "segmentation_eval"
PAPER_IMAGE = 448


def parser() -> argparse.ArgumentParser:
    p = common.build_parser(NAME, __doc__.splitlines()[0], "image side in px (default: 96 tiny, 448 paper)",
                            "images per call (default: the stage's eval batch_size)")
    p.add_argument("--msc", action="store_true", help="test-time multi-scale (segmentation.eval.scales)")
    p.add_argument("--flip", action="store_true", help="average with the mirror image's prediction")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    from src.models.deeplab import predict_probs

    cfg = common.compose_config(args.backbone)
    spec = cfg.segmentation
    s = common.settings_from(NAME, args, int(spec.eval.batch_size),
                             PAPER_IMAGE if args.backbone == "paper" else int(cfg.data.layout.spec.image_size))
    scales = [float(v) for v in spec.eval.scales] if args.msc else [1.0]
    gen = torch.Generator().manual_seed(s.seed)
    with common.PeakMemory(s.device) as mem:
        net = common.prepare_net(instantiate(spec.net), s, train=False)
        images = torch.randn(s.batch, 3, s.size, s.size, generator=gen).to(s.device)
        images = images.contiguous(memory_format=s.memory_format())
        forward = common.maybe_compile(net, s)

        def predict(batch: torch.Tensor) -> None:
            with s.autocast():
                probs = predict_probs(forward, batch, scales, bool(args.flip))
            for p in probs:
                p.float().cpu().numpy().argmax(0)

        @torch.no_grad()
        def step() -> None:
            if s.reference:
                for i in range(s.batch):
                    predict(images[i:i + 1])
            else:
                predict(images)

        seconds = common.timed(step, s)
    return common.make_result(s, s.batch * s.iters, seconds, mem, scales=scales, flip=bool(args.flip))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.main(f"experiments.bench.{NAME}", parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
