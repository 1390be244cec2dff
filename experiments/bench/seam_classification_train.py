"""Benchmark: one SEAM training step (siamese forward on crop + rescaled crop, SEAM losses, backward, SGD, poly).

Why: SEAM's stage 1 runs its ResNet-38d net twice per step (the crop and the crop rescaled by ``scale``)
and its loss terms (L_cls, min-pool, L_ER, L_ECR) add normalisations, resizes and top-k selections on
top, so it is heavier than IRNet's classifier step. The step is SEAMClassificationModule's (same net,
``seam_step_losses`` computed in fp32, parameter groups and optimiser, built from the composed config
``+baseline=seam``), minus Lightning's bookkeeping. FLOPs per image (both branches, forward +
backward; the PCM's affinity matmuls included) are counted once with FlopCounterMode, so the achieved
TFLOP/s and, on a known GPU, the fraction of its bf16 peak are printed. Reference mode: the same step
in fp32, NCHW, eager (SEAM's train_SEAM.py). Inputs are random images and multi-hot labels at the
training crop size.

    python -m experiments.bench.seam_classification_train --device cuda --backbone paper --precision bf16 \
        --channels-last --compare
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import instantiate

from experiments.bench import common
from experiments.bench.classification_train import random_labels

NAME = "seam_classification_train"


def parser() -> argparse.ArgumentParser:
    return common.build_parser(NAME, __doc__.splitlines()[0],
                               "training crop side (default: the profile's SEAM crop)",
                               "images per step (default: the profile's SEAM batch)")


def refuse_cpu_channels_last(s: common.Settings) -> None:
    """Stop with a clear message where the run would crash: channels_last *training* of the tiny ResNet-38d
    on a CPU aborts the process (``double free or corruption``) in oneDNN's 1x1 stride-2 convolution weight
    gradient with NHWC tensors and few input channels (the tiny preset's 8-channel downsampling shortcut;
    torch 2.13.0+cpu, measured: 8 -> 16 channels at 48 px crashes, NCHW or 16 input channels do not)."""
    if s.channels_last and s.device.type == "cpu" and s.backbone == "tiny":
        raise SystemExit(f"{s.name}: --channels-last training of the tiny ResNet-38d crashes on a CPU (oneDNN "
                         "1x1 stride-2 conv weight gradient with NHWC and 8 input channels); run it in NCHW")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from src.ops.losses import rescale, seam_step_losses
    from src.stages.classification import SEAMClassificationModule

    cfg = common.compose_config(args.backbone, baseline="seam")
    spec = cfg.baseline.classification
    s = common.settings_from(NAME, args, int(spec.batch_size), int(spec.crop_size))
    refuse_cpu_channels_last(s)
    step = spec.module  # the SEAM step's hyper-parameters (conf/classification/seam.yaml module)
    scale, topk, min_pool = float(step.scale), float(step.ecr_topk), float(step.min_pool_fraction)
    weights = common.to_container(step.loss_weights)
    gen = torch.Generator().manual_seed(s.seed)
    with common.PeakMemory(s.device) as mem:
        net = common.prepare_net(instantiate(spec.net), s, train=True)
        module = SEAMClassificationModule(net, common.to_container(spec.optim), max_steps=100_000, scale=scale,
                                          ecr_topk=topk, min_pool_fraction=min_pool, loss_weights=weights)
        x = torch.randn(s.batch, 3, s.size, s.size, generator=gen).to(s.device)
        x = x.contiguous(memory_format=s.memory_format())
        y = random_labels(s.batch, net.num_classes, gen).to(s.device)

        def loss_of(net_fn) -> torch.Tensor:
            cam1, cam_rv1 = net_fn(x)
            cam2, cam_rv2 = net_fn(rescale(x, scale))
            # fp32 loss terms under autocast too, as SEAMClassificationModule.training_step
            return seam_step_losses(cam1.float(), cam_rv1.float(), cam2.float(), cam_rv2.float(), y, scale,
                                    topk, min_pool, weights)["loss"]

        seconds, flops = common.time_training(module, net, loss_of, s)
    images = s.batch * s.iters
    return common.make_result(s, images, seconds, mem, scale=scale,
                              **common.flops_fields(flops // s.batch, images / seconds, s))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.main(f"experiments.bench.{NAME}", parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
