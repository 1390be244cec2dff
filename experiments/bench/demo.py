"""Time `make demo` (``python -m src.run +baseline=irnet +conta=on``) from a cold cache, stage by stage.

Why: the demo is a new user's first contact and CI's sense of the pipeline's cost; its target is <= 5 min
on 2 CPU cores (experiments/BENCHMARKS.md). A fresh cache folder makes every stage (and the synthetic set)
compute; the run folder's results.json gives each stage's time.

    python -m experiments.bench.demo                    # prints wall time and the per-stage table
    python -m experiments.bench.demo --keep /tmp/demo   # keep the run and cache folders there
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMAND = ["-m", "src.run", "+baseline=irnet", "+conta=on", "progress=none", "print_config=false"]


def run_demo(folder: Path, extra: list[str]) -> tuple[float, dict]:
    env = dict(os.environ, WSSS_CACHE_DIR=str(folder / "cache"))
    start = time.perf_counter()
    subprocess.run([sys.executable, *COMMAND, f"hydra.run.dir={folder / 'run'}", *extra], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads((folder / "run" / "results.json").read_text())


def table(results: dict) -> str:
    stages = list(dict.fromkeys(s for r in results["rounds"] for s in r["timings_s"]))
    lines = ["| round | " + " | ".join(stages) + " | sum |", "|---|" + "---|" * (len(stages) + 1)]
    for entry in results["rounds"]:
        t = {s: entry["timings_s"][s]["this_run"] for s in entry["timings_s"]}
        lines.append(f"| {entry['round']} | " + " | ".join(f"{t[s]:.1f}" if s in t else "-" for s in stages)
                     + f" | {sum(t.values()):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="folder for the run and its cache (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="extra overrides of the demo command")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        seconds, results = run_demo(args.keep, args.overrides)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            seconds, results = run_demo(Path(tmp), args.overrides)
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"make demo: {seconds:.0f} s wall ({seconds / 60:.1f} min), threads {threads}, "
          f"cpus {os.cpu_count()}; stage sum {results['total_time_s']:.0f} s")
    print(table(results))


if __name__ == "__main__":
    main()
