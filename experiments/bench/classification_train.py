"""Benchmark: one training step of IRNet's CAM classifier (forward + backward + SGD + poly lr step).

Why: stage 1 is the most compute-bound stage and the first thing mixed precision and channels_last
should speed up. The step is ClassificationModule's (same net, loss, parameter groups and optimiser,
built from the stage config), minus Lightning's bookkeeping. FLOPs per image are counted once with
FlopCounterMode (convolutions and matmuls of forward + backward), so the achieved TFLOP/s and, on a
known GPU, the fraction of its bf16 peak are printed. Reference mode: the same step in fp32, NCHW,
eager (IRNet's train_cam). Inputs are random images and multi-hot labels at the training crop size.

    python -m experiments.bench.classification_train --device cuda --backbone paper --precision bf16 \
        --channels-last --compare
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from experiments.bench import common

NAME = "classification_train"


def parser() -> argparse.ArgumentParser:
    return common.build_parser(NAME, __doc__.splitlines()[0],
                               "training crop side (default: the profile's crop)",
                               "images per step (default: the profile's batch)")


def random_labels(batch: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    """Multi-hot labels with at least one class per image."""
    y = (torch.rand(batch, classes, generator=gen) < 1.5 / classes).float()
    y[torch.arange(batch), torch.randint(0, classes, (batch,), generator=gen)] = 1.0
    return y


def run(args: argparse.Namespace) -> dict[str, Any]:
    from src.stages.classification import ClassificationModule

    cfg = common.compose_config(args.backbone)
    spec = cfg.baseline.classification
    s = common.settings_from(NAME, args, int(spec.batch_size), int(spec.crop_size))
    gen = torch.Generator().manual_seed(s.seed)
    with common.PeakMemory(s.device) as mem:
        net = common.prepare_net(instantiate(spec.net), s, train=True)
        module = ClassificationModule(net, common.to_container(spec.optim), max_steps=100_000)
        x = torch.randn(s.batch, 3, s.size, s.size, generator=gen).to(s.device)
        x = x.contiguous(memory_format=s.memory_format())
        y = random_labels(s.batch, net.num_classes, gen).to(s.device)

        seconds, flops = common.time_training(module, net, lambda f: F.multilabel_soft_margin_loss(f(x), y), s)
    images = s.batch * s.iters
    return common.make_result(s, images, seconds, mem,
                              **common.flops_fields(flops // s.batch, images / seconds, s))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.main(f"experiments.bench.{NAME}", parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
