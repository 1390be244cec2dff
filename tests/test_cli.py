"""The command line (src/run.py): a mistake stops the run before any work, with a message that says
what to type. Each case is one `python -m src.run` process (seconds of imports), so the few cases
start together and the tests read their results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.pipeline.validate import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "no_baseline": [],
    "unknown_baseline": ["+baseline=nope"],
    "voc_without_root": ["+baseline=irnet", "data=voc12"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    tmp = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, WSSS_CACHE_DIR=str(tmp / "cache"), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    procs = {}
    for name, args in CASES.items():
        run_dir = tmp / name
        procs[name] = (subprocess.Popen([sys.executable, "-m", "src.run", *args, f"hydra.run.dir={run_dir}"],
                                        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True), run_dir)
    out = {}
    for name, (proc, run_dir) in procs.items():
        text, _ = proc.communicate(timeout=180)
        out[name] = (proc.returncode, text, run_dir)
    assert not (tmp / "cache").exists()  # nothing was computed or cached
    return out


def test_no_baseline_exits_2_listing_the_choices(runs):
    code, text, run_dir = runs["no_baseline"]
    assert code == 2, text
    assert "no baseline chosen" in text and "+baseline=<name>" in text
    choices = sorted(p.stem for p in (CONF_DIR / "baseline").glob("*.yaml"))
    assert "irnet" in choices
    for name in choices:
        assert name in text
    assert "Traceback" not in text
    assert "no baseline chosen" in (run_dir / "run.log").read_text()  # also in the run's log


def test_unknown_baseline_is_hydras_error(runs):
    code, text, _ = runs["unknown_baseline"]
    assert code == 1, text
    assert "Could not find 'baseline/nope'" in text
    assert "Available options in 'baseline'" in text and "irnet" in text


def test_voc_without_root_exits_2_naming_data_root(runs):
    code, text, _ = runs["voc_without_root"]
    assert code == 2, text
    assert "config error" in text and "data.root" in text and "data=voc12" in text
    assert "Traceback" not in text
