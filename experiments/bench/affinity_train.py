"""Benchmark: one AffinityNet training step (SEAM's refinement): stride-8 labels, pair affinities, loss, SGD step.

Why: AffinityNet trains on every pixel pair within the radius on the stride-8 grid, so besides the
ResNet-38d the pair labels (``affinity_labels_in_radius``) and the pair affinities (``pair_affinity``,
exp(-mean |f_i - f_j|) over 448 channels for each of the 34 offsets) cost real time and memory. Ours is
AffinityModule's step: the full-resolution label maps (B, S, S) go to the device, are pooled to the
stride-8 grid there (``stride_labels``) and turned into pair labels there, the affinities are computed
in fp32 and ``affinity_loss`` taken over the batch; with the requested precision, memory format and
compile. Reference mode: what PSA/SEAM's train_aff does: fp32, NCHW, eager, and the pair labels come
from the data loader, made per image on the CPU (ExtractAffinityLabelInRadius on the pooled label) and
copied to the device every step. The loader's work overlaps the step in the reference, so it is
precomputed here and only the copy is timed (the reference is not charged for it); both modes use the
project's ``pair_affinity`` (the reference gathers the pairs with index tensors instead).
Inputs: random images and synthetic-set label maps in the affinity labels' format (0 confident
background, classes, 255 unknown on a wide band along boundaries).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import instantiate

from experiments.bench import common
from experiments.bench.irn_train import ir_label_maps
from experiments.bench.seam_classification_train import refuse_cpu_channels_last

NAME = "affinity_train"


def parser() -> argparse.ArgumentParser:
    return common.build_parser(NAME, __doc__.splitlines()[0],
                               "training crop side (default: the profile's affinity crop; >= 72 for radius 5)",
                               "images per step (default: the profile's batch)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import src.data.synthetic  # noqa: F401  (imported outside the memory measurement)
    from src.models.affinity import pair_affinity
    from src.ops.labels import stride_labels
    from src.ops.losses import affinity_loss
    from src.ops.pairs import affinity_labels_in_radius, half_plane_offsets, to_label_layout
    from src.stages.affinity import AffinityModule
    from src.utils.dist import global_mean_count

    cfg = common.compose_config(args.backbone, baseline="seam")
    spec = cfg.baseline.refinement.affinity
    num_classes, radius = int(cfg.data.num_classes), int(spec.radius)
    s = common.settings_from(NAME, args, int(spec.batch_size), int(cfg.profile.affinity.crop))
    refuse_cpu_channels_last(s)
    gen = torch.Generator().manual_seed(s.seed)
    with common.PeakMemory(s.device) as mem:
        net = common.prepare_net(instantiate(spec.net), s, train=True)
        module = AffinityModule(net, radius, num_classes, common.to_container(spec.optim), max_steps=100_000)
        x = torch.randn(s.batch, 3, s.size, s.size, generator=gen).to(s.device)
        x = x.contiguous(memory_format=s.memory_format())
        labels_host = ir_label_maps(s.batch, s.size, s.seed)
        with torch.no_grad():
            h, w = net(x[:1]).shape[-2:]
        stride = net.output_stride
        labels = labels_host.to(s.device)
        if s.reference:  # the reference loader's per-image pair labels, ready on the host
            small = stride_labels(labels_host, stride, num_classes)[:, :h, :w]
            per_image = [affinity_labels_in_radius(small[i], radius) for i in range(s.batch)]
            host_pairs = [torch.stack(t) for t in zip(*per_image)]
            if s.device.type == "cuda":  # the reference's loader pins its batches
                host_pairs = [t.pin_memory() for t in host_pairs]

        def pair_labels() -> tuple[torch.Tensor, ...]:
            if s.reference:
                return tuple(t.to(s.device, non_blocking=True) for t in host_pairs)
            return affinity_labels_in_radius(stride_labels(labels, stride, num_classes)[:, :h, :w], radius)

        def loss_of(net_fn) -> torch.Tensor:
            features = net_fn(x)
            bg_pos, fg_pos, neg = pair_labels()
            aff = to_label_layout(pair_affinity(features.float(), radius), radius)  # fp32, as AffinityModule
            return affinity_loss(aff, bg_pos, fg_pos, neg, count=global_mean_count)["loss"]

        seconds, flops = common.time_training(module, net, loss_of, s)
    images = s.batch * s.iters
    n_src = (h - radius + 1) * (w - 2 * (radius - 1))  # source pixels of the label region (label_region)
    return common.make_result(s, images, seconds, mem, radius=radius, grid=[int(h), int(w)],
                              pairs_per_image=int(len(half_plane_offsets(radius)) * n_src),
                              **common.flops_fields(flops // s.batch, images / seconds, s))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.main(f"experiments.bench.{NAME}", parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
