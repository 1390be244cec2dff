"""Every stage benchmark runs one iteration on tiny CPU inputs, so the scripts cannot rot.

No speed is asserted (DESIGN: never assert speed in tests): only that each benchmark runs in both
modes and returns a well-formed record, that the sparse and dense random walks (IRNet's and
AffinityNet's) agree on the benchmark's inputs, and that run_all plans every benchmark and tabulates
records.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from experiments.bench import BENCHMARKS, common, run_all

# Smallest sizes that still exercise each stage (IRN's pair radius 5 needs a >= 9 px wide stride-4 map,
# AffinityNet's a >= 9 px wide stride-8 map).
SIZES = {"irn_train": 40, "random_walk": 10, "ir_labels": 32, "data_loader": 32, "affinity_train": 72}


def run_bench(name: str, *extra: str) -> dict:
    module = importlib.import_module(f"experiments.bench.{name}")
    argv = ["--device", "cpu", "--iters", "1", "--warmup", "0", "--batch", "2", "--size", str(SIZES.get(name, 32)),
            *extra]
    return module.run(module.parser().parse_args(argv))


def check_record(record: dict, name: str, mode: str) -> None:
    assert record["bench"] == name and record["mode"] == mode
    assert record["images_per_s"] > 0
    assert record["peak_mem_mib"] >= 0 and record["mem_kind"] == "cpu_maxrss_delta"
    assert record["device"] == "cpu" and record["torch"] == torch.__version__
    assert record["settings"]["batch"] == 2 and record["settings"]["iters"] == 1
    common.human_line(record)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_in_both_modes(name: str) -> None:
    check_record(run_bench(name), name, "ours")
    ref = run_bench(name, "--reference-mode", "--precision", "bf16")
    check_record(ref, name, "reference")
    assert ref["settings"]["precision"] == "32"  # reference mode is always fp32


def test_training_benchmark_with_bf16_and_channels_last_counts_flops() -> None:
    record = run_bench("classification_train", "--precision", "bf16", "--channels-last")
    assert record["settings"]["precision"] == "bf16" and record["settings"]["channels_last"]
    assert record["gflop_per_image"] > 0 and record["achieved_tflops"] > 0
    assert record["fraction_of_bf16_peak"] is None  # no known peak for a CPU


@pytest.mark.parametrize("name", ["seam_classification_train", "affinity_train"])
def test_resnet38d_training_refuses_channels_last_on_cpu(name: str) -> None:
    # tiny ResNet-38d + NHWC backward aborts the process in oneDNN (see seam_classification_train)
    with pytest.raises(SystemExit, match="channels-last"):
        run_bench(name, "--channels-last")


def test_random_walk_sparse_equals_dense_on_benchmark_inputs(tmp_path) -> None:
    from experiments.bench import random_walk

    run_bench("random_walk", "--save-output", str(tmp_path / "ours.pt"))
    run_bench("random_walk", "--reference-mode", "--save-output", str(tmp_path / "reference.pt"))
    diff = random_walk.compare_extra(tmp_path)
    assert diff["max_abs_diff"] < 1e-4, diff


def test_random_walk_steps_follow_exp_times_and_run_all_pins_irnets() -> None:
    # the quick profile's 2^2 steps are not the reference's 2^8: run_all's figures must not drift with it
    assert run_bench("random_walk")["steps"] == 2 ** 2
    assert run_bench("random_walk", "--exp-times", "3")["steps"] == 8
    for device in ("cpu", "cuda"):
        argv = run_all.plan(device, ["random_walk"], None, None, False, 1)["random_walk"]
        assert argv[argv.index("--exp-times") + 1] == "8"


def test_affinity_walk_sparse_equals_dense_on_benchmark_inputs(tmp_path) -> None:
    from experiments.bench import affinity_walk

    run_bench("affinity_walk", "--save-output", str(tmp_path / "ours.pt"))
    run_bench("affinity_walk", "--reference-mode", "--save-output", str(tmp_path / "reference.pt"))
    diff = affinity_walk.compare_extra(tmp_path)
    assert diff["max_abs_diff"] < 1e-4 and diff["mask_pixels_differ"] == 0.0, diff


def test_compare_record_and_run_all_table() -> None:
    ours = run_bench("segmentation_eval")
    ref = dict(ours, mode="reference", images_per_s=ours["images_per_s"] / 2, peak_mem_mib=10.0)
    record = common.compare_record(ours, ref)
    assert record["speedup"] == pytest.approx(2.0, rel=1e-3)
    text = run_all.table({"segmentation_eval": record, "random_walk": {"error": "boom\ndetails"}})
    assert "| segmentation_eval |" in text and "2.00x" in text and "failed: boom" in text
    for device in ("cpu", "cuda"):
        plans = run_all.plan(device, BENCHMARKS, None, None, False, 1)
        assert list(plans) == list(BENCHMARKS)
        for name, argv in plans.items():
            module = importlib.import_module(f"experiments.bench.{name}")
            module.parser().parse_args(argv)  # every planned option exists
