"""Run every stage benchmark (ours vs reference mode, each mode in a fresh process) and print a
markdown table. ``make bench`` calls this.

Why a runner: the figures in experiments/BENCHMARKS.md come from one command with fixed settings per
device, so they can be re-measured on another machine and compared row by row. Without a GPU the
settings are small CPU ones (tiny backbones, small sizes, fp32 as the pipeline runs on a CPU); with
CUDA they are the paper profile's networks and crops, bf16 autocast and channels_last.

    python -m experiments.bench.run_all                       # CPU, or GPU when CUDA is available
    python -m experiments.bench.run_all --device cuda --json bench.json
    python -m experiments.bench.run_all --only random_walk,cam_inference --channels-last --precision bf16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.bench import BENCHMARKS, common

# Per benchmark: its options on a CPU (tiny networks, sizes that run in seconds) ...
CPU_PLAN: dict[str, list[str]] = {
    "classification_train": ["--batch", "8", "--size", "64", "--iters", "10"],
    "cam_inference": ["--batch", "4", "--size", "64", "--iters", "5"],
    "ir_labels": ["--batch", "4", "--size", "96", "--iters", "2"],
    "irn_train": ["--batch", "8", "--size", "64", "--iters", "10"],
    "random_walk": ["--batch", "2", "--size", "48", "--iters", "1", "--warmup", "0", "--exp-times", "8"],
    "segmentation_train": ["--batch", "8", "--size", "64", "--iters", "10"],
    "segmentation_eval": ["--batch", "8", "--size", "64", "--iters", "10"],
    "data_loader": ["--batch", "16", "--iters", "8", "--workers", "0"],
    "seam_classification_train": ["--batch", "8", "--size", "64", "--iters", "10"],
    "affinity_train": ["--batch", "8", "--size", "96", "--iters", "10"],
    "affinity_walk": ["--batch", "2", "--size", "256", "--iters", "2"],
}
# ... and on a GPU (the paper profile's networks and crops; VOC-like image and map sizes).
GPU_PLAN: dict[str, list[str]] = {
    "classification_train": ["--backbone", "paper", "--iters", "20", "--warmup", "3"],
    "cam_inference": ["--backbone", "paper", "--batch", "16", "--iters", "5", "--warmup", "2"],
    "ir_labels": ["--backbone", "paper", "--batch", "4", "--iters", "1", "--workers", "8"],
    "irn_train": ["--backbone", "paper", "--iters", "10", "--warmup", "3"],
    "random_walk": ["--batch", "8", "--size", "128", "--iters", "3", "--warmup", "1", "--exp-times", "8"],
    "segmentation_train": ["--backbone", "paper", "--iters", "10", "--warmup", "3"],
    "segmentation_eval": ["--backbone", "paper", "--batch", "16", "--iters", "10", "--warmup", "2"],
    "data_loader": ["--backbone", "paper", "--batch", "16", "--iters", "20", "--warmup", "2", "--workers", "8"],
    "seam_classification_train": ["--backbone", "paper", "--iters", "10", "--warmup", "3"],
    "affinity_train": ["--backbone", "paper", "--iters", "10", "--warmup", "3"],
    "affinity_walk": ["--backbone", "paper", "--batch", "8", "--size", "448", "--iters", "3", "--warmup", "1"],
}
GPU_OURS = ["--precision", "bf16", "--channels-last"]
# Benchmarks where --precision / --channels-last / --compile mean nothing (CPU numpy work, the loader).
NO_NET = {"ir_labels", "data_loader"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.run_all", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    p.add_argument("--precision", choices=tuple(common.PRECISIONS), default=None,
                   help="ours' autocast dtype (default: 32 on cpu, bf16 on cuda)")
    p.add_argument("--channels-last", action="store_true", default=None, help="ours: channels_last (cuda default)")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per mode; the median is reported and "
                                                          "the fastest block kept (default 3)")
    p.add_argument("--no-compare", action="store_true", help="ours only (no reference-mode runs)")
    p.add_argument("--json", default=None, help="also write every record to this file")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark process")
    return p


def plan(device: str, names: Sequence[str], precision: str | None, channels_last: bool | None, compile_: bool,
         repeats: int) -> dict[str, list[str]]:
    """The command-line options of each benchmark for this device and these overrides."""
    cuda = device.startswith("cuda")
    base = GPU_PLAN if cuda else CPU_PLAN
    out = {}
    for name in names:
        argv = ["--device", device, *base[name], "--repeats", str(repeats)]
        if name not in NO_NET:
            argv += ["--precision", precision or ("bf16" if cuda else "32")]
            if channels_last or (channels_last is None and cuda):
                argv.append("--channels-last")
            if compile_:
                argv.append("--compile")
        out[name] = argv
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
    return str(value)


def _ratio(value: float | None) -> str:
    return "-" if not value else f"{value:.2f}x"


def notes(record: dict[str, Any]) -> str:
    ours = record.get("ours", record)
    parts = []
    if ours.get("achieved_tflops") is not None:
        part = f"{ours['gflop_per_image']} GFLOP/img, {ours['achieved_tflops']} TFLOP/s"
        if ours.get("fraction_of_bf16_peak") is not None:
            part += f" ({100 * ours['fraction_of_bf16_peak']:.1f}% of bf16 peak)"
        parts.append(part)
    if record.get("max_abs_diff") is not None:
        parts.append(f"max abs diff vs dense {record['max_abs_diff']:.2e}")
    if ours.get("workers") is not None:
        parts.append(f"{ours['workers']} workers")
    return "; ".join(parts)


def table(records: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per benchmark (ours, reference, ratio, peak memory, settings)."""
    lines = ["| stage | settings (ours) | ours img/s | reference img/s | speed-up | speed-up, best blocks | "
             "ours peak MiB | reference peak MiB | notes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, rec in records.items():
        if "error" in rec:
            lines.append(f"| {name} | - | - | - | - | - | - | - | failed: {rec['error'].splitlines()[0][:80]} |")
            continue
        ours, ref = rec.get("ours", rec), rec.get("reference")
        st = ours["settings"]
        settings = (f"{st['backbone']}, B={st['batch']}, {st['size']}px, {st['precision']}"
                    + (", NHWC" if st["channels_last"] else "") + (", compiled" if st["compile"] else ""))
        cells = [name, settings, _fmt(ours["images_per_s"]), _fmt(ref["images_per_s"]) if ref else "-",
                 _ratio(rec.get("speedup")), _ratio(rec.get("speedup_best")), _fmt(ours["peak_mem_mib"]),
                 _fmt(ref["peak_mem_mib"]) if ref else "-", notes(rec)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(device: str) -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')}; {common.device_name(torch.device(device))}; "
            f"torch {torch.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
            f"load average {load}")


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parser().parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    records: dict[str, dict[str, Any]] = {}
    print(header(args.device), flush=True)
    for name, bench_argv in plan(args.device, names, args.precision, args.channels_last, args.compile,
                                 args.repeats).items():
        module = f"experiments.bench.{name}"
        print(f"running {name} {' '.join(bench_argv)}", file=sys.stderr, flush=True)
        try:
            if args.no_compare:
                records[name] = common.run_child(module, bench_argv, args.timeout)
            else:
                records[name] = common.run_child(module, [*bench_argv, "--compare"], args.timeout)
        except Exception as err:  # one failing benchmark must not hide the others' figures
            records[name] = {"error": str(err)}
            print(f"{name} failed: {err}", file=sys.stderr, flush=True)
    print(table(records), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header(args.device), "records": records}, indent=1))
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
