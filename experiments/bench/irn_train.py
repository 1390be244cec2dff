"""Benchmark: one IRN training step (IRNet stage 4): pair labels, forward, loss, backward, SGD step.

Why: IRN trains on every pixel pair within the radius at stride 4, so besides the network the pair
labels (``affinity_labels``) and the loss terms (``irn_loss_terms``, gathers over ~ n_offsets x n_src
pairs) cost real time and memory. Ours is IRNModule's step: IR labels (B, S, S) go to the device,
are sampled at stride 4 and turned into pair labels there, with the requested precision, memory format
and compile. Reference mode: what IRNet's train_irn does: fp32, NCHW, eager, and the pair labels come
from the data loader, computed per image on the CPU (GetAffinityLabelFromIndices) and copied to the
device every step. The loader's work overlaps the step in the reference, so it is precomputed here and
only the copy is timed (the reference is not charged for it).
Inputs: random images and synthetic-set label maps (0 background, classes, 255 unknown borders).
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

NAME = "irn_train"


def parser() -> argparse.ArgumentParser:
    return common.build_parser(NAME, __doc__.splitlines()[0], "training crop side (default: the profile's crop)",
                               "images per step (default: the profile's batch)")


def ir_label_maps(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, size, size) long IR-label-like maps: classes, 0, and 255 on a wide band along boundaries."""
    import cv2

    maps = []
    for _, label in common.synthetic_samples(n, size, seed):
        unknown = cv2.dilate((label == 255).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        maps.append(np.where(unknown, 255, label).astype(np.int64))
    return torch.from_numpy(np.stack(maps))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import src.data.synthetic  # noqa: F401  (imported outside the memory measurement)
    from src.ops.losses import irn_loss_terms
    from src.ops.path_index import affinity_labels
    from src.stages.irn import LABEL_OFFSET, LABEL_STRIDE, IRNModule

    cfg = common.compose_config(args.backbone)
    spec = cfg.baseline.refinement.irn
    crop = int(cfg.profile.irn.crop)
    s = common.settings_from(NAME, args, int(spec.batch_size), crop)
    gen = torch.Generator().manual_seed(s.seed)
    with common.PeakMemory(s.device) as mem:
        net = common.prepare_net(instantiate(spec.net), s, train=True)
        module = IRNModule(net, int(spec.radius), common.to_container(spec.optim), max_steps=100_000)
        x = torch.randn(s.batch, 3, s.size, s.size, generator=gen).to(s.device)
        x = x.contiguous(memory_format=s.memory_format())
        labels_host = ir_label_maps(s.batch, s.size, s.seed)
        with torch.no_grad():
            h, w = net(x[:1])[0].shape[-2:]
        index = module.path_index((h, w))
        small_host = labels_host[:, LABEL_OFFSET::LABEL_STRIDE, LABEL_OFFSET::LABEL_STRIDE][:, :h, :w]
        labels = labels_host.to(s.device)
        if s.reference:  # the reference loader's per-image pair labels, ready on the host
            per_image = [affinity_labels(small_host[i:i + 1], index) for i in range(s.batch)]
            host_pairs = [torch.cat(t) for t in zip(*per_image)]
            if s.device.type == "cuda":  # the reference's loader pins its batches
                host_pairs = [t.pin_memory() for t in host_pairs]

        def pair_labels() -> tuple[torch.Tensor, ...]:
            if s.reference:
                return tuple(t.to(s.device, non_blocking=True) for t in host_pairs)
            small = labels[:, LABEL_OFFSET::LABEL_STRIDE, LABEL_OFFSET::LABEL_STRIDE][:, :h, :w]
            return affinity_labels(small, index)

        def loss_of(net_fn) -> torch.Tensor:
            edge_logits, displacement = net_fn(x)
            bg_pos, fg_pos, neg = pair_labels()
            return irn_loss_terms(edge_logits, displacement, bg_pos, fg_pos, neg, index)["total"]

        seconds, flops = common.time_training(module, net, loss_of, s)
    images = s.batch * s.iters
    return common.make_result(s, images, seconds, mem, pairs_per_image=int(index.n_offsets * index.n_src),
                              **common.flops_fields(flops // s.batch, images / seconds, s))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.main(f"experiments.bench.{NAME}", parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
