"""What every stage benchmark shares: options, the stage configs, timing, memory, result lines.

Why one place: every benchmark must time the same way (warm-up, device sync), measure memory the same
way, build its networks from the same configs as the pipeline (conf/profile/{quick,paper}.yaml through
the real Hydra composition) and print the same one-line JSON, so run_all can tabulate them and ours vs
the reference mode compares like with like.

Modes. *Ours* runs the stage as the pipeline does, with the requested precision, memory format and
compilation. ``--reference-mode`` runs it the way the public reference code does (fp32, NCHW, eager,
the reference's per-image loops and dense random walk; each benchmark says what that means for it).
``--compare`` runs both, each in a fresh process (so CPU peak RSS is not inherited from the other), and
prints the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}

# Dense bf16 tensor-core peaks (NVIDIA data sheets, without sparsity), TFLOP/s; the first match wins.
BF16_PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989.0),
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),
    (("A100",), 312.0),
    (("L40S",), 362.0),
    (("L4",), 121.0),
)


# ------------------------------------------------------------------------------------------ options


def build_parser(name: str, description: str, size_help: str, batch_help: str) -> argparse.ArgumentParser:
    """The options every benchmark takes; a benchmark adds its own with ``parser.add_argument``."""
    p = argparse.ArgumentParser(prog=f"python -m experiments.bench.{name}", description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--backbone", choices=("tiny", "paper"), default="tiny",
                   help="tiny = profile=quick's networks; paper = profile=paper's ResNet-50/101 at its crop "
                        "sizes (random weights; sensible on a GPU only)")
    p.add_argument("--batch", type=int, default=None, help=batch_help)
    p.add_argument("--size", type=int, default=None, help=size_help)
    p.add_argument("--iters", type=int, default=5, help="timed iterations (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1; compile needs >= 1)")
    p.add_argument("--repeats", type=int, default=1,
                   help="time --iters iterations this many times and report the median (noisy, shared machines)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="32",
                   help="autocast dtype of ours: 32 (off), bf16 or 16 (default 32)")
    p.add_argument("--channels-last", action="store_true", help="ours: NHWC memory format for nets and inputs")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile the network")
    p.add_argument("--reference-mode", action="store_true",
                   help="run the stage as the reference code does (fp32, NCHW, eager, per-image loops)")
    p.add_argument("--compare", action="store_true",
                   help="run ours and the reference mode, each in a fresh process, and print the ratio")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, i.e. "
                                                              "OMP_NUM_THREADS or all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    p.add_argument("--json-only", action="store_true", help="print only the JSON line (used by --compare)")
    return p


@dataclass
class Settings:
    """The effective settings of one run (reference mode forces fp32 / NCHW / eager)."""

    name: str
    device: torch.device
    backbone: str
    batch: int
    size: int
    iters: int
    warmup: int
    repeats: int
    precision: str
    channels_last: bool
    compile: bool
    reference: bool
    seed: int

    @property
    def dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        """torch.autocast at the requested dtype (a no-op for fp32), as Lightning's mixed precision does."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def as_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "batch": self.batch, "size": self.size, "iters": self.iters,
                "warmup": self.warmup, "repeats": self.repeats, "precision": self.precision,
                "channels_last": self.channels_last,
                "compile": self.compile, "threads": torch.get_num_threads(),
                "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if self.device.type == "cuda" else None}


def settings_from(name: str, args: argparse.Namespace, batch: int, size: int) -> Settings:
    """Resolve the options: defaults for batch and size come from the stage config (``batch``, ``size``)."""
    if args.threads:
        torch.set_num_threads(int(args.threads))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    reference = bool(args.reference_mode)
    s = Settings(
        name=name, device=device, backbone=args.backbone,
        batch=int(args.batch or batch), size=int(args.size or size),
        iters=max(1, int(args.iters)), warmup=max(0, int(args.warmup)), repeats=max(1, int(args.repeats)),
        precision="32" if reference else args.precision,
        channels_last=False if reference else bool(args.channels_last),
        compile=False if reference else bool(args.compile),
        reference=reference, seed=int(args.seed),
    )
    if device.type == "cuda":
        # Ours as the pipeline's GPU trainer runs (conf/trainer/gpu.yaml: benchmark: true); the reference
        # mode keeps PyTorch's defaults, as the reference scripts do.
        torch.backends.cudnn.benchmark = not reference
    if s.precision == "16" and device.type == "cpu":
        print("note: fp16 autocast on a CPU is slow and of little use; bf16 is the CPU's fast dtype", file=sys.stderr)
    return s


# ------------------------------------------------------------------------------------------ configs


def compose_config(backbone: str, overrides: Sequence[str] = (), baseline: str = "irnet") -> Any:
    """The pipeline's composed config for ``baseline`` (conf/baseline/: irnet, seam, ...) with the quick
    (tiny) or paper profile, weight files off.

    The paper profile reads VOC's class count (20) but no data: nothing here touches ``data.root``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import src  # noqa: F401  (registers the config resolvers)

    profile = {"tiny": "quick", "paper": "paper"}[backbone]
    ov = [f"+baseline={baseline}", f"profile={profile}", "print_config=false"]
    if backbone == "paper":
        ov += ["data=voc12", "data.root=/nonexistent"]
        ov += [f"profile.{c}.backbone.weights=null" for c in ("cam", "irn", "deeplab", "seam", "affinity")]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*ov, *overrides])


def to_container(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def prepare_net(net: torch.nn.Module, s: Settings, train: bool) -> torch.nn.Module:
    """Move to the device, set the mode and memory format."""
    net = net.to(s.device).train(train)
    if s.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def maybe_compile(fn: Callable, s: Settings) -> Callable:
    return torch.compile(fn) if s.compile else fn


def grad_scaler(s: Settings) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (what Lightning's 16-mixed does); a pass-through otherwise."""
    return torch.amp.GradScaler(s.device.type, enabled=s.precision == "16" and s.device.type == "cuda")


# ------------------------------------------------------------------------------------ timing, memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing(float):
    """Seconds of one timed block of ``iters`` iterations: the median over the repeated blocks (a float),
    with ``best`` the fastest block (closest to an unloaded machine when other work competes)."""

    def __new__(cls, blocks: Sequence[float]) -> Timing:
        self = super().__new__(cls, float(np.median(blocks)))
        self.blocks, self.best = [float(b) for b in blocks], float(min(blocks))
        return self


def timed(step: Callable[[], Any], s: Settings) -> Timing:
    """Seconds for ``s.iters`` calls of ``step`` after ``s.warmup`` untimed ones (device synchronised);
    with ``s.repeats`` > 1 the median of that many such blocks (robust to other load on the machine)."""
    for _ in range(s.warmup):
        step()
    synchronize(s.device)
    blocks = []
    for _ in range(s.repeats):
        start = time.perf_counter()
        for _ in range(s.iters):
            step()
        synchronize(s.device)
        blocks.append(time.perf_counter() - start)
    return Timing(blocks)


def time_training(module: Any, net: torch.nn.Module, loss_of: Callable[[Callable], torch.Tensor],
                  s: Settings) -> tuple[Timing, int]:
    """Time the training steps of a stage as Lightning runs them: ``loss_of(forward)`` under autocast, the
    grad scaler (fp16), the stage module's optimizer and lr schedule. Returns the timing and the FLOPs of one
    eager forward + backward (counted first, on ``net`` itself, not the compiled one)."""
    opt = module.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    flops = count_flops(lambda: loss_of(net).backward())
    optimizer.zero_grad(set_to_none=True)
    forward = maybe_compile(net, s)
    scaler = grad_scaler(s)

    def step() -> None:
        with s.autocast():  # Lightning's mixed precision: the loss is computed under autocast too
            loss = loss_of(forward)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    return timed(step, s), flops


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of what runs inside (set-up included: networks, inputs, optimiser state).

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensors of this process on the device).
    CPU: the growth of the process's peak RSS (``ru_maxrss``) over its value at entry, which is exact in a
    fresh process (``--compare`` and run_all use one per mode) but under-reports when an earlier step of
    the same process already went higher; a sampled RSS peak (every 5 ms) above the entry RSS is kept as
    a floor for that case.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_maxrss_delta"
        self._stop = threading.Event()
        self._sampled = 0

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss0 = _rss_bytes()
            self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self._sampled = self._rss0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(maxrss - self._maxrss0, self._sampled - self._rss0, 0)

    @property
    def mib(self) -> float:
        return self.peak_bytes / 2**20


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} logical cores)"


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak (TFLOP/s) when known (GPUs of the table above), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for keys, peak in BF16_PEAK_TFLOPS:
        if all(k in name for k in keys):
            return peak
    return None


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (forward and backward if it calls backward), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; element-wise ops not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def flops_fields(flops_per_image: int, images_per_s: float, s: Settings) -> dict[str, Any]:
    """GFLOP per image, achieved TFLOP/s and, on a known GPU, the fraction of its bf16 peak."""
    achieved = flops_per_image * images_per_s / 1e12
    peak = bf16_peak_tflops(s.device)
    return {"gflop_per_image": round(flops_per_image / 1e9, 3), "achieved_tflops": round(achieved, 4),
            "bf16_peak_tflops": peak, "fraction_of_bf16_peak": None if peak is None else round(achieved / peak, 4)}


# ------------------------------------------------------------------------------------------- inputs


def synthetic_samples(n: int, size: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(RGB uint8 image, label map uint8 with 255 borders) pairs drawn by the synthetic dataset's rules at
    ``size`` px: realistic shapes and boundaries for the CRF and the random walk (drawn at 32 px and
    resized when smaller, the generator's minimum)."""
    import cv2

    from src.data.synthetic import SyntheticSpec, draw_image

    spec = SyntheticSpec(image_size=max(32, int(size)))
    for i in range(n):
        image, label, _ = draw_image(spec, True, np.random.default_rng([seed, i]))
        if size < spec.image_size:
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            label = cv2.resize(label, (size, size), interpolation=cv2.INTER_NEAREST)
        yield image, label


def soft_maps(label: np.ndarray, classes: Sequence[int], sigma: float) -> np.ndarray:
    """Blurred one-hot maps (len(classes), H, W) of ``label``, each scaled to max 1: CAM-like scores."""
    import cv2

    out = []
    for c in classes:
        m = cv2.GaussianBlur((label == c).astype(np.float32), (0, 0), sigma)
        out.append(m / max(float(m.max()), 1e-6))
    return np.stack(out) if out else np.zeros((0, *label.shape), np.float32)


# ------------------------------------------------------------------------------------------- output


def make_result(s: Settings, images: int, seconds: float, memory: PeakMemory, **extra: Any) -> dict[str, Any]:
    """The one-line JSON record of a run."""
    return {
        "bench": s.name,
        "mode": "reference" if s.reference else "ours",
        "images_per_s": round(images / seconds, 3) if seconds > 0 else None,
        "best_images_per_s": round(images / seconds.best, 3) if isinstance(seconds, Timing) else None,
        "seconds_per_iter": round(seconds / s.iters, 6),
        "peak_mem_mib": round(memory.mib, 1),
        "mem_kind": memory.kind,
        "settings": s.as_dict(),
        "device": str(s.device),
        "device_name": device_name(s.device),
        "torch": torch.__version__,
        **extra,
    }


def human_line(r: dict[str, Any]) -> str:
    st = r["settings"]
    extras = []
    if r.get("achieved_tflops") is not None:
        extras.append(f"{r['gflop_per_image']} GFLOP/img, {r['achieved_tflops']} TFLOP/s"
                      + (f" ({100 * r['fraction_of_bf16_peak']:.1f}% of bf16 peak)"
                         if r.get("fraction_of_bf16_peak") is not None else ""))
    for key in ("note",):
        if r.get(key):
            extras.append(str(r[key]))
    best = f" (best block {r['best_images_per_s']})" if r.get("best_images_per_s") else ""
    return (f"{r['bench']} [{r['mode']}]: {r['images_per_s']} images/s{best}, peak {r['peak_mem_mib']} MiB "
            f"({r['mem_kind']}); backbone={st['backbone']} batch={st['batch']} size={st['size']} "
            f"precision={st['precision']} channels_last={st['channels_last']} compile={st['compile']} "
            f"threads={st['threads']}; {r['device_name']}; torch {r['torch']}"
            + ("; " + "; ".join(extras) if extras else ""))


def compare_record(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Ours / reference: throughput ratio (speed-up) and peak-memory ratio."""
    speedup = (ours["images_per_s"] / ref["images_per_s"]) if ours.get("images_per_s") and ref.get(
        "images_per_s") else None
    best = (ours["best_images_per_s"] / ref["best_images_per_s"]) if ours.get("best_images_per_s") and ref.get(
        "best_images_per_s") else None
    mem = (ours["peak_mem_mib"] / ref["peak_mem_mib"]) if ref.get("peak_mem_mib") else None
    return {"bench": ours["bench"], "compare": True, "speedup": None if speedup is None else round(speedup, 3),
            "speedup_best": None if best is None else round(best, 3),
            "memory_ratio": None if mem is None else round(mem, 3), "ours": ours, "reference": ref}


def _child_argv(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if a not in ("--compare", "--json-only", "--reference-mode")]


def run_child(module: str, argv: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run a benchmark in a fresh process and return its JSON record."""
    cmd = [sys.executable, "-m", module, *argv, "--json-only"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def main(module: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], dict[str, Any]],
         argv: Sequence[str] | None = None,
         compare_extra: Callable[[Path], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Command-line entry of a benchmark: one mode, or ``--compare`` (both modes in fresh processes;
    ``compare_extra`` gets the folder where the children saved their outputs, see ``--save-output``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not args.compare:
        record = run(args)
        print(json.dumps(record), flush=True)
        if not args.json_only:
            print(human_line(record), flush=True)
        return record
    base = _child_argv(argv)
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        save = (lambda mode: ["--save-output", str(Path(tmp) / f"{mode}.pt")]) if compare_extra else (lambda m: [])
        ours = run_child(module, [*base, *save("ours")])
        ref = run_child(module, [*base, "--reference-mode", *save("reference")])
        record = compare_record(ours, ref)
        if compare_extra is not None:
            record.update(compare_extra(Path(tmp)))
    print(json.dumps(record), flush=True)
    if not args.json_only:
        print(human_line(ours))
        print(human_line(ref))
        extra = "".join(f", {k} {v}" for k, v in record.items()
                        if k not in ("bench", "compare", "speedup", "speedup_best", "memory_ratio", "ours",
                                     "reference"))
        print(f"{record['bench']}: ours / reference = {record['speedup']}x images/s (best blocks "
              f"{record['speedup_best']}x), "
              f"{record['memory_ratio']}x peak memory{extra}", flush=True)
    return record
