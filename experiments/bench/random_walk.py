"""Benchmark: IRNet's random walk (stage 5): boundary map + stride-4 CAMs -> walked CAMs.

Why: the reference builds a dense (HW x HW) transition matrix and squares it 8 times: at VOC's stride-4
size (~128 x 128) that is a 1 GiB matrix and ~70 TFLOP per image. Ours,
``src.ops.random_walk.propagate_cams``, applies the same transition 2^exp_times times as a sparse CSR
matrix over a batch of B maps (``--exp-times``, default the composed profile's: the quick 2^2 is far from
IRNet's 2^8, so ``run_all`` passes 8, the reference's 256 steps). Reference mode:
``propagate_cams(..., dense=True)`` one image at a time, the reference's dense squaring. ``--size`` is the
side of the stride-4 map (128 ~ a 512 px image; on a CPU use ~48, where the dense matrix, 2304^2, still
fits). With ``--compare`` both run on the same
inputs and the max abs difference of their outputs is printed (both in fp32: the walk always runs in
fp32, also under autocast). Inputs: synthetic-set label maps at the map size: CAMs = blurred object
masks (``--classes`` channels), boundaries = blurred label edges.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.bench import common

NAME = "random_walk"


def parser() -> argparse.ArgumentParser:
    p = common.build_parser(NAME, __doc__.splitlines()[0],
                            "side of the stride-4 map (default: 128 on cuda, 48 on cpu)",
                            "maps per batch (default: the pseudo-mask stage's batch_size on cuda, 2 on cpu)")
    p.add_argument("--classes", type=int, default=3, help="CAM channels per image (default 3)")
    p.add_argument("--exp-times", type=int, default=None,
                   help="2^N walk steps (default: the composed profile's pseudo_masks.exp_times)")
    p.add_argument("--save-output", default=None, help="save the walked CAMs of the first batch (torch.save)")
    return p


def make_inputs(batch: int, size: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cams (B, classes, size, size), edge (B, size, size)) in [0, 1], float32."""
    import cv2

    cams, edges = [], []
    for _, label in common.synthetic_samples(batch, size, seed):
        present = sorted(int(v) for v in np.unique(label) if 0 < v < 255)[:classes]
        maps = np.zeros((classes, size, size), np.float32)
        maps[: len(present)] = common.soft_maps(label, present, sigma=max(1.0, size / 32))
        boundary = (label == 255).astype(np.float32)
        edge = cv2.GaussianBlur(boundary, (0, 0), 1.0)
        cams.append(maps)
        edges.append(np.clip(edge / max(float(edge.max()), 1e-6), 0, 1))
    return torch.from_numpy(np.stack(cams)), torch.from_numpy(np.stack(edges))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import src.data.synthetic  # noqa: F401  (imported outside the memory measurement)
    from src.ops.random_walk import propagate_cams

    cfg = common.compose_config(args.backbone)
    spec = cfg.baseline.refinement.pseudo_masks
    cuda = str(args.device).startswith("cuda")
    s = common.settings_from(NAME, args, int(spec.batch_size) if cuda else 2, 128 if cuda else 48)
    radius, beta = int(spec.radius), float(spec.beta)
    exp_times = int(spec.exp_times if args.exp_times is None else args.exp_times)
    cams_host, edge_host = make_inputs(s.batch, s.size, int(args.classes), s.seed)
    outputs: list[torch.Tensor] = []
    with common.PeakMemory(s.device) as mem:
        cams, edge = cams_host.to(s.device), edge_host.to(s.device)

        @torch.no_grad()
        def step() -> None:
            with s.autocast():
                if s.reference:
                    out = torch.cat([propagate_cams(cams[i:i + 1], edge[i:i + 1], radius, beta, exp_times,
                                                    dense=True) for i in range(s.batch)])
                else:
                    out = propagate_cams(cams, edge, radius, beta, exp_times)
            if not outputs:
                outputs.append(out.float().cpu())

        seconds = common.timed(step, s)
    if args.save_output:
        torch.save(outputs[0], Path(args.save_output))
    dense_bytes = s.size ** 4 * 4
    return common.make_result(s, s.batch * s.iters, seconds, mem, classes=int(args.classes), radius=radius,
                              beta=beta, steps=2 ** exp_times, dense_matrix_mib=round(dense_bytes / 2**20, 1))


def difference(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Max abs difference of the walked CAMs, absolute and relative to the reference's max."""
    diff = float((ours.float() - ref.float()).abs().max())
    scale = float(ref.abs().max())
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale > 0 else None}


def compare_extra(folder: Path) -> dict[str, Any]:
    return difference(torch.load(folder / "ours.pt"), torch.load(folder / "reference.pt"))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.main(f"experiments.bench.{NAME}", parser(), run, argv, compare_extra=compare_extra)


if __name__ == "__main__":
    main(sys.argv[1:])
