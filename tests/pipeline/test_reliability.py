"""Reliability: a run killed at any moment resumes to the same output; seeded runs are reproducible;
bad inputs stop with an error naming the file or setting, and nothing half-written is left."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, TINY_SCHEDULE, env_without_gpu

import src.utils.io as io_module
from src.callbacks.guards import NonFiniteLossError
from src.pipeline.pipeline import prepare_data, run_pipeline
from src.pipeline.validate import finalize
from src.utils.io import ArtifactWriteError, load_npz, read_label

pytestmark = pytest.mark.slow

KILL_RUN = ["+baseline=irnet", *TINY, "data.layout.spec.num_train=40", "profile.cam.epochs=2", "progress=none"]


def launch(cache: Path, run_dir: Path) -> subprocess.Popen:
    env = env_without_gpu()
    env["WSSS_CACHE_DIR"] = str(cache)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "src.run", *KILL_RUN, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; False if it finished first."""
    start = time.time()
    while proc.poll() is None and time.time() - start < timeout:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    return False


def stage_dir(cache: Path, stage: str) -> Path | None:
    folder = cache / "artifacts" / stage
    found = [p for p in folder.glob("*") if p.is_dir()] if folder.is_dir() else []
    return found[0] if found else None


def unfinished_with(cache: Path, stage: str, pattern: str, at_least: int):
    def check() -> bool:
        d = stage_dir(cache, stage)
        return d is not None and not (d / "manifest.json").exists() and len(list(d.glob(pattern))) >= at_least
    return check


def test_killed_at_several_points_resumes_to_the_uninterrupted_output(tmp_path: Path) -> None:
    ref_proc = launch(tmp_path / "ref_cache", tmp_path / "ref")
    assert ref_proc.wait(timeout=600) == 0, ref_proc.stderr.read()[-3000:]

    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    points = [
        ("classification", "checkpoints/last.ckpt", 1),   # mid-training, after epoch 1's checkpoint
        ("seeds", "cams/*.npz", 5),                        # mid-inference, some seeds written
        ("ir_labels", "labels/*.png", 5),
        ("pseudo_masks", "masks/*.png", 3),
    ]
    killed = []
    for stage, pattern, n in points:
        proc = launch(cache, run_dir)
        if kill_when(proc, unfinished_with(cache, stage, pattern, n)):
            killed.append(stage)
            assert not (stage_dir(cache, stage) / "manifest.json").exists()
    assert len(killed) >= 3, f"the run finished before the kill points could be hit: killed at {killed}"
    final = launch(cache, run_dir)
    assert final.wait(timeout=600) == 0, final.stderr.read()[-3000:]

    ref = json.loads((tmp_path / "ref" / "results.json").read_text())["rounds"][0]["summary"]
    got = json.loads((run_dir / "results.json").read_text())["rounds"][0]["summary"]
    assert got == pytest.approx(ref, abs=1e-6)
    for stage, sub in (("pseudo_masks", "masks"), ("ir_labels", "labels")):
        ref_files = sorted((tmp_path / "ref" / "round_0" / stage / sub).glob("*.png"))
        assert len(ref_files) == 40
        for f in ref_files:
            np.testing.assert_array_equal(read_label(f), read_label(run_dir / "round_0" / stage / sub / f.name))
    for f in sorted((tmp_path / "ref" / "round_0" / "seeds" / "cams").glob("*.npz")):
        a, b = load_npz(f), load_npz(run_dir / "round_0" / "seeds" / "cams" / f.name)
        np.testing.assert_allclose(a["high_res"], b["high_res"], atol=2e-3)
    leftovers = [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_same_seed_same_metrics(make_cfg, tmp_path: Path) -> None:
    a = run_pipeline(finalize(make_cfg("+baseline=irnet", "progress=none")), tmp_path / "a")
    cfg_b = finalize(make_cfg("+baseline=irnet", "progress=none"))
    cfg_b.paths.cache_dir = str(tmp_path / "cache_b")
    b = run_pipeline(cfg_b, tmp_path / "b")
    assert a.summary(0) == b.summary(0)
    assert a.rounds[0]["stages"]["segmentation"]["fingerprint"] == b.rounds[0]["stages"]["segmentation"]["fingerprint"]


def test_disk_full_during_an_artifact_write_leaves_nothing_half_written(make_cfg, tmp_path: Path,
                                                                       monkeypatch) -> None:
    cfg = finalize(make_cfg("+baseline=irnet", "progress=none"))
    prepare_data(cfg)  # the dataset itself is written before the fault
    calls = {"n": 0}
    real_fsync = os.fsync

    def full_disk(fd):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(io_module.os, "fsync", full_disk)
    with pytest.raises(ArtifactWriteError, match="could not write .*: No space left on device"):
        run_pipeline(cfg, tmp_path / "run")
    monkeypatch.setattr(io_module.os, "fsync", real_fsync)
    cache = Path(cfg.paths.cache_dir)
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    results = run_pipeline(cfg, tmp_path / "run")  # resumes and finishes
    assert "pseudo_masks/train/mask_miou" in results.summary(0)


def test_non_finite_loss_stops_with_the_step_and_a_debug_checkpoint(make_cfg, tmp_path: Path) -> None:
    cfg = finalize(make_cfg("+baseline=irnet", "progress=none", "profile.cam.lr=1.0e+30", "profile.cam.epochs=3"))
    pattern = (r"stage 'round 0/0 · 1/\d+ classification': non-finite training loss .* at step \d+ "
               r".*debug checkpoint: .*debug_step\d+\.ckpt")
    with pytest.raises(NonFiniteLossError, match=pattern) as info:
        run_pipeline(cfg, tmp_path / "run")
    path = Path(str(info.value).split("debug checkpoint: ")[1].split(". ")[0])
    assert path.is_file()


def _voc_copy(make_cfg, tmp_path: Path) -> Path:
    """A VOC-layout root made from the tiny synthetic set, to break on purpose."""
    cfg = finalize(make_cfg("+baseline=irnet"))
    data = prepare_data(cfg)
    root = tmp_path / "voc"
    shutil.copytree(data.layout.root, root, ignore=shutil.ignore_patterns("manifest.json", "summary.json"))
    return root


def voc_overrides(root: Path) -> list[str]:
    return ["data=voc12", f"data.root={root}", "data.train_split=train", "data.val_split=val",
            "data.eval_splits=[val]", "data.num_classes=6", "data.class_names=[rider,horse,boat,ball,box,star]",
            "data.loader.num_workers=0", "data.loader.pin_memory=false", "data.loader.persistent_workers=false"]


def test_bad_inputs_name_the_file(make_cfg, tmp_path: Path) -> None:
    root = _voc_copy(make_cfg, tmp_path)
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()

    # a truncated JPEG stops the first stage that reads it
    jpeg = root / "JPEGImages" / f"{ids[3]}.jpg"
    good = jpeg.read_bytes()
    jpeg.write_bytes(good[: len(good) // 2])
    cfg = finalize(make_cfg("+baseline=irnet", *voc_overrides(root), *TINY_SCHEDULE, tiny=False))
    with pytest.raises(ValueError, match=rf"corrupt or truncated image file .*{ids[3]}\.jpg"):
        run_pipeline(cfg, tmp_path / "run1")
    jpeg.write_bytes(good)

    # a mask whose size differs from its image
    mask_path = root / "SegmentationClass" / f"{ids[1]}.png"
    mask = read_label(mask_path)
    io_module.save_label_png_atomic(mask_path, mask[:-4])
    with pytest.raises(ValueError, match=rf"mask .*{ids[1]}\.png is \d+x\d+ but image .*{ids[1]}\.jpg is"):
        prepare_data(cfg).layout.read_gt(ids[1])
    io_module.save_label_png_atomic(mask_path, mask)

    # a class id above K that is not 255
    bad = mask.copy()
    bad[0, 0] = 9
    io_module.save_label_png_atomic(mask_path, bad)
    with pytest.raises(ValueError, match=rf"{ids[1]}\.png holds class ids \[9\] > 6"):
        prepare_data(cfg)
    io_module.save_label_png_atomic(mask_path, mask)

    # an empty split and a missing split list
    lst = root / "ImageSets" / "Segmentation" / "val.txt"
    saved = lst.read_text()
    lst.write_text("\n")
    with pytest.raises(ValueError, match=r"split list .*val\.txt is empty"):
        prepare_data(cfg)
    lst.unlink()
    with pytest.raises(FileNotFoundError, match=r"split list not found: .*val\.txt"):
        prepare_data(cfg)
    lst.write_text(saved)

    # a labels file that disagrees with the masks
    labels = {i: np.zeros(6, np.float32) for i in ids + saved.split()}
    np.save(tmp_path / "cls_labels.npy", labels)
    cfg_labels = finalize(make_cfg("+baseline=irnet", *voc_overrides(root), *TINY_SCHEDULE,
                                   f"data.labels_file={tmp_path / 'cls_labels.npy'}", tiny=False))
    with pytest.raises(ValueError, match=r"labels file .*cls_labels\.npy disagrees with the masks"):
        prepare_data(cfg_labels)


def test_checkpoint_of_another_class_count_is_refused(make_cfg, tmp_path: Path) -> None:
    other = run_pipeline(finalize(make_cfg("+baseline=irnet", "data.layout.spec.class_names=[rider,horse,boat,ball]",
                                           "data.num_classes=4", "progress=none")), tmp_path / "other")
    ckpt = Path(other.rounds[0]["stages"]["classification"]["artifact"]) / "model.ckpt"
    cfg = finalize(make_cfg("+baseline=irnet", "progress=none", f"+artifacts.reuse.round_0.classification={ckpt}"))
    with pytest.raises(ValueError, match=r"checkpoint .*model\.ckpt \(classification network\) does not fit CAMNet "
                                         r"of this config .*shape mismatches: classifier\.weight"):
        run_pipeline(cfg, tmp_path / "run")


def test_unwritable_cache_dir_is_a_config_error(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    env = env_without_gpu()
    env["WSSS_CACHE_DIR"] = str(blocked / "cache")
    proc = subprocess.run([sys.executable, "-m", "src.run", "+baseline=irnet", f"hydra.run.dir={tmp_path / 'r'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "paths.cache_dir=" in proc.stdout + proc.stderr and "is not writable" in proc.stdout + proc.stderr
