"""Benchmark: IR labels (IRNet's cam_to_ir_label): two dense CRFs per image on the CPU.

Why: stage 3 has no network; its cost is two 10-iteration dense CRFs (pydensecrf2) per image at full
resolution, so it scales with pixels and CPU cores, not with the GPU. Ours and the reference mode run
the same per-image function ``src.ops.labels.ir_label`` (the CRF *is* the reference's), so
their ratio is ~1 by construction; what differs is parallelism: the reference spreads images over
``num_workers`` processes, the pipeline's stage runs them in its predict loop (one process per device).
``--workers N`` runs the images on a pool of N processes in both modes, to show what that is worth.
Inputs: synthetic-set images of ``--size`` px with CAM-like scores (blurred object masks).
``--device``, ``--precision``, ``--channels-last`` and ``--compile`` do not apply (CPU, numpy, fp32).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from experiments.bench import common

NAME = "ir_labels"
PAPER_IMAGE = 448


def parser() -> argparse.ArgumentParser:
    p = common.build_parser(NAME, __doc__.splitlines()[0], "image side in px (default: 96 tiny, 448 paper)",
                            "images per iteration (default 4)")
    p.add_argument("--workers", type=int, default=1, help="processes the images are spread over (default 1)")
    return p


def make_inputs(n: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(scores (k, H, W) float32, keys (k,) 1-based, image (H, W, 3) uint8) per image."""
    out = []
    for image, label in common.synthetic_samples(n, size, seed):
        keys = np.array(sorted(int(v) for v in np.unique(label) if 0 < v < 255), np.int64)
        scores = common.soft_maps(label, keys.tolist(), sigma=size / 24) * 0.9
        out.append((scores.astype(np.float32), keys, image))
    return out


def _one(item: tuple[np.ndarray, np.ndarray, np.ndarray, float, float, dict]) -> int:
    from src.ops.labels import ir_label

    scores, keys, image, conf_fg, conf_bg, crf = item
    return int(ir_label(scores, keys, image, conf_fg, conf_bg, crf).sum())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import src.data.synthetic  # noqa: F401  (imports outside the memory measurement)
    import src.ops.labels  # noqa: F401
    from src.ops.crf import _densecrf

    _densecrf()
    cfg = common.compose_config(args.backbone)
    spec = cfg.baseline.refinement.ir_labels
    args.device = "cpu"
    s = common.settings_from(NAME, args, 4, PAPER_IMAGE if args.backbone == "paper"
                             else int(cfg.data.layout.spec.image_size))
    # `auto` thresholds come from a run's seeds; a speed benchmark takes IRNet's values instead
    conf_fg, conf_bg = (0.30 if spec.conf_fg == "auto" else float(spec.conf_fg),
                        0.05 if spec.conf_bg == "auto" else float(spec.conf_bg))
    crf = common.to_container(spec.crf)
    workers = max(1, int(args.workers))
    with common.PeakMemory(s.device) as mem:
        items = [(*x, conf_fg, conf_bg, crf) for x in make_inputs(s.batch, s.size, s.seed)]
        pool = ProcessPoolExecutor(workers) if workers > 1 else None
        try:
            def step() -> None:
                if pool is None:
                    for item in items:
                        _one(item)
                else:
                    list(pool.map(_one, items))

            seconds = common.timed(step, s)
        finally:
            if pool is not None:
                pool.shutdown()
    return common.make_result(s, s.batch * s.iters, seconds, mem, workers=workers,
                              note="CPU-only stage (pydensecrf2); same function in both modes")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.main(f"experiments.bench.{NAME}", parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
