"""Where ESOL's samplers read: the centre tap's sampling point of the expansion and shrinkage heads.

    python -m experiments.esol_synthetic.sampled_points RUN_DIR OUT.png [N_IMAGES]

RUN_DIR: a finished `+baseline=esol` run (its round_0/expansion and round_0/shrinkage). Per val image, one
panel per head: the image, the feature grid's cell centres, and for every cell an arrow to where the
head's centre tap samples (cell + learned offset). Offsets are drawn at their true length in image pixels
(stride x cells), so tiny offsets stay tiny; the panel title gives the mean |offset| over all taps (cells)
and the share of taps sampled outside the map, where the deformable convolution reads zeros, beside that
share on the regular grid (its padding: 21% of a 3 x 3 kernel's taps on a 6 x 6 map).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from omegaconf import OmegaConf

from src.data.datasets import WSSSDataset
from src.data.voc import VOCLayout
from src.pipeline.artifacts import ArtifactStore
from src.stages.classification import load_classifier
from src.utils.io import write_bytes_atomic


def head_offsets(run: Path, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The offsets (B, 2 K, h, w) of each head: the expansion net's sampler on F, the shrinkage net's on
    F'_clip."""
    out = {}
    for stage in ("expansion", "shrinkage"):
        artifact = ArtifactStore.read((run / "round_0" / stage).resolve())
        if artifact is None:
            raise SystemExit(f"{run}: no finished {stage} stage in round_0")
        net, _, _ = load_classifier(artifact, None)
        with torch.no_grad():
            if stage == "expansion":
                out[stage] = net.expansion_offsets(net.features(images))
            else:
                out[stage] = net.shrink_offsets(net.clipped(images))
    return out


def outside_share(offsets: torch.Tensor, kernel_size: int = 3) -> float:
    """Share of all taps whose sampled position lies outside the map (by more than half a cell)."""
    b, c, h, w = offsets.shape
    taps = offsets.view(b, c // 2, 2, h, w)
    k = torch.arange(kernel_size) - kernel_size // 2
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    ys = torch.arange(h).view(1, 1, h, 1) + ky.reshape(1, -1, 1, 1).repeat(1, c // 2 // kernel_size ** 2, 1, 1)
    xs = torch.arange(w).view(1, 1, 1, w) + kx.reshape(1, -1, 1, 1).repeat(1, c // 2 // kernel_size ** 2, 1, 1)
    y, x = ys + taps[:, :, 0], xs + taps[:, :, 1]
    out = (y < -0.5) | (y > h - 0.5) | (x < -0.5) | (x > w - 0.5)
    return float(out.float().mean())


def draw(path: Path, raw: list[np.ndarray], offsets: dict[str, torch.Tensor], stride: int) -> None:
    from matplotlib.figure import Figure

    n = len(raw)
    fig = Figure(figsize=(3.2 * len(offsets), 3.2 * n))
    for i, image in enumerate(raw):
        for j, (stage, off) in enumerate(offsets.items()):
            ax = fig.add_subplot(n, len(offsets), i * len(offsets) + j + 1)
            ax.imshow(image)
            _, c, h, w = off.shape
            centre = (c // 2) // 2  # the centre tap of a 3 x 3 kernel, offset group 0
            dy, dx = off[i, 2 * centre].numpy(), off[i, 2 * centre + 1].numpy()
            gy, gx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            cy, cx = (gy + 0.5) * stride, (gx + 0.5) * stride
            ax.scatter(cx, cy, s=6, c="white")
            ax.quiver(cx, cy, dx * stride, dy * stride, angles="xy", scale_units="xy", scale=1, color="red",
                      width=0.008)
            ax.set_title(f"{stage}: mean |offset| {off[i].abs().mean():.3f} cells,\n"
                         f"{100 * outside_share(off[i:i + 1]):.1f}% of taps off the map "
                         f"(regular grid {100 * outside_share(torch.zeros_like(off[i:i + 1])):.1f}%)", fontsize=7)
            ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def main(run_dir: str, out: str, n_images: str = "4") -> None:
    run = Path(run_dir)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    root = Path(json.loads((run / "results.json").read_text())["data_root"])
    layout = VOCLayout(root, list(cfg.data.layout.spec.class_names))
    norm = A.Compose([A.Normalize(mean=list(cfg.data.mean), std=list(cfg.data.std))])
    ds, raw_ds = WSSSDataset(layout, "val", norm), WSSSDataset(layout, "val", A.Compose([]))
    n = int(n_images)
    images = torch.stack([ds[i]["image"] for i in range(n)])
    raw = [raw_ds[i]["image"].permute(1, 2, 0).numpy().astype(np.uint8) for i in range(n)]
    offsets = head_offsets(run, images)
    stride = images.shape[-1] // next(iter(offsets.values())).shape[-1]
    draw(Path(out), raw, offsets, stride)
    for stage, off in offsets.items():
        print(f"{stage}: mean |offset| {off.abs().mean():.4f} cells, max {off.abs().max():.3f}, "
              f"{100 * outside_share(off):.2f}% of taps off the map (the regular grid's padding: "
              f"{100 * outside_share(torch.zeros_like(off)):.2f}%; {n} val images)")


if __name__ == "__main__":
    main(*sys.argv[1:4])
