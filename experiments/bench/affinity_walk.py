"""Benchmark: AffinityNet's random walk (SEAM's pseudo-masks): images + seeds -> walked scores -> label maps.

Why: the reference (PSA/SEAM infer_aff.py) runs the AffinityNet on one image at a time, builds the dense
(hw x hw) affinity matrix of the stride-8 grid, raises it to the power beta, column-normalises it and
squares it ``exp_times`` (SEAM: 6) times: at a 448 px image (56 x 56 grid) a 38 MiB matrix and ~0.37 TFLOP
per image. Ours is the pseudo-mask stage's path (``src.stages.pseudo_masks.AffinityRandomWalk.walk``):
the net on a batch of B same-size images (padded to a multiple of the stride), ``pair_affinity`` in fp32,
the alpha-power seed scores pooled to the grid, and IRNet's sparse CSR ``random_walk`` applied
2 ** exp_times times over the batch; then per image the bilinear upsampling, crop and argmax to the label
map (``walk_labels``); with the requested precision, memory format and compile of the net. Reference
mode: the same pieces one image at a time, fp32, NCHW, eager, with the dense walk
(``src.ops.random_walk.random_walk_dense``). Seeds are in memory in both modes (the stage reads
them from .npz files). ``--size`` is the image side (the grid is size / 8). With ``--compare`` both run
on the same inputs and net weights and the max abs difference of their walked scores (and the fraction
of label-map pixels that differ) is printed. Inputs: synthetic-set images and, as seeds, blurred object
masks of up to ``--classes`` of their classes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from experiments.bench import common, random_walk

NAME = "affinity_walk"


def parser() -> argparse.ArgumentParser:
    p = common.build_parser(NAME, __doc__.splitlines()[0],
                            "image side in px, the grid is size / 8 (default: 448 on cuda, 256 on cpu)",
                            "images per batch (default: the pseudo-mask stage's batch_size on cuda, 2 on cpu)")
    p.add_argument("--classes", type=int, default=3, help="seed classes per image, at most (default 3)")
    p.add_argument("--save-output", default=None,
                   help="save the walked scores and label maps of the first batch (torch.save)")
    return p


def make_inputs(batch: int, size: int, classes: int, seed: int, mean: Sequence[float], std: Sequence[float]
                ) -> tuple[torch.Tensor, list[dict[str, np.ndarray]]]:
    """(normalised images (B, 3, size, size), seeds [{keys, high_res (n, size, size)}]) of synthetic images."""
    images, seeds = [], []
    for image, label in common.synthetic_samples(batch, size, seed):
        present = sorted(int(v) for v in np.unique(label) if 0 < v < 255)[:classes]
        high_res = common.soft_maps(label, present, sigma=max(1.0, size / 32))
        images.append((image.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
        seeds.append({"keys": np.asarray(present, np.int64), "high_res": high_res})
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), seeds


def run(args: argparse.Namespace) -> dict[str, Any]:
    import src.data.synthetic  # noqa: F401  (imported outside the memory measurement)
    from src.models.affinity import pair_affinity
    from src.ops.pairs import half_plane_offsets
    from src.ops.random_walk import pooled_scores, random_walk_dense, walk_labels
    from src.stages.pseudo_masks import AffinityRandomWalk

    cfg = common.compose_config(args.backbone, baseline="seam")
    spec = cfg.baseline.refinement.pseudo_masks
    cuda = str(args.device).startswith("cuda")
    s = common.settings_from(NAME, args, int(spec.batch_size) if cuda else 2, 448 if cuda else 256)
    radius, beta, exp_times = int(spec.radius), float(spec.beta), int(spec.exp_times)
    alpha = 6.0 if spec.alpha == "auto" else float(spec.alpha)  # `auto` comes from a run's seeds: SEAM's value
    images_host, seeds = make_inputs(s.batch, s.size, int(args.classes), s.seed, cfg.data.mean, cfg.data.std)
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    with common.PeakMemory(s.device) as mem:
        torch.manual_seed(s.seed)  # the same random net weights in both modes (--compare)
        net = common.prepare_net(instantiate(cfg.baseline.refinement.affinity.net), s, train=False)
        stride = net.output_stride
        module = AffinityRandomWalk(net, None, radius, beta, exp_times, alpha).to(s.device)
        module.net = common.maybe_compile(net, s)
        offsets = half_plane_offsets(radius)
        images = images_host.to(s.device).contiguous(memory_format=s.memory_format())
        size = tuple(images.shape[-2:])
        padded = (-(-size[0] // stride) * stride, -(-size[1] // stride) * stride)
        n_max = max(len(sd["keys"]) for sd in seeds)

        def walk_dense(i: int) -> torch.Tensor:
            """One image as the reference: net, pair affinities, pooled scores, dense walk: (1 + n_max, h, w)."""
            x = F.pad(images[i:i + 1], (0, padded[1] - size[1], 0, padded[0] - size[0]))
            affinity = pair_affinity(net(x).float(), radius)
            scores = pooled_scores(seeds[i:i + 1], alpha, padded, stride, s.device)
            walked = random_walk_dense(scores, affinity, offsets, beta, exp_times)[0]
            return F.pad(walked, (0, 0, 0, 0, 0, n_max + 1 - walked.shape[0]))

        @torch.no_grad()
        def step() -> None:
            with s.autocast():
                if s.reference:
                    walked = torch.stack([walk_dense(i) for i in range(s.batch)])
                else:
                    walked = module.walk(images, seeds)
            masks = [walk_labels(wk, sd["keys"], size, stride) for wk, sd in zip(walked, seeds)]
            if not outputs:
                outputs.append((walked.float().cpu(), torch.from_numpy(np.stack(masks))))

        seconds = common.timed(step, s)
    if args.save_output:
        torch.save({"walked": outputs[0][0], "masks": outputs[0][1]}, Path(args.save_output))
    grid = (padded[0] // stride, padded[1] // stride)
    dense_bytes = (grid[0] * grid[1]) ** 2 * 4
    return common.make_result(s, s.batch * s.iters, seconds, mem, classes=int(args.classes), radius=radius,
                              beta=beta, steps=2 ** exp_times, alpha=alpha, grid=list(grid),
                              dense_matrix_mib=round(dense_bytes / 2**20, 1))


def compare_extra(folder: Path) -> dict[str, Any]:
    """Max abs (and relative) difference of the walked scores; fraction of label-map pixels that differ."""
    ours, ref = torch.load(folder / "ours.pt"), torch.load(folder / "reference.pt")
    out = random_walk.difference(ours["walked"], ref["walked"])
    out["mask_pixels_differ"] = float((ours["masks"] != ref["masks"]).float().mean())
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.main(f"experiments.bench.{NAME}", parser(), run, argv, compare_extra=compare_extra)


if __name__ == "__main__":
    main(sys.argv[1:])
