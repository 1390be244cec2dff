"""Shared fixtures: compose the real config (conf/), shrink it for CPU tests, write to tmp_path."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import src  # noqa: F401  (registers the config resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# The team's shared folder (reference oracles, real VOC files): next to the checkout, or $WSSS_SHARED_DIR.
SHARED = Path(os.environ.get("WSSS_SHARED_DIR", ROOT.parent / "shared"))

# A synthetic set and schedules small enough for a few seconds per stage on one CPU core.
TINY_DATA = [
    "data.layout.spec.num_train=16",
    "data.layout.spec.num_val=6",
    "data.layout.spec.num_val_deconfounded=6",
    "data.layout.spec.image_size=48",
]
TINY_SCHEDULE = [
    "profile.cam.epochs=1",
    "profile.cam.batch_size=8",
    "profile.cam.crop=48",
    "profile.cam.long_side=[40,56]",
    "profile.irn.epochs=1",
    "profile.irn.batch_size=8",
    "profile.irn.crop=48",
    "profile.deeplab.epochs=1",
    "profile.deeplab.batch_size=8",
    "profile.deeplab.crop=48",
    "print_config=false",
]
TINY = TINY_DATA + TINY_SCHEDULE


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors run faster on one thread, and parallel test processes do not fight over cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _teardown_process_group():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def compose_config(overrides: Sequence[str], tmp_path: Path) -> DictConfig:
    """The real composed config with test paths (cache and outputs under tmp_path)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.weights_dir = str(tmp_path / "weights")
        del cfg.hydra
    return cfg


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """compose(*overrides) with the test profile, composed once per module and copied (composing is slow)."""
    cache: dict = {}
    tmp = tmp_path_factory.mktemp("cfg")

    def compose(*overrides: str):
        if overrides not in cache:
            cache[overrides] = compose_config([*TINY, *overrides], tmp)
        return copy.deepcopy(cache[overrides])

    return compose


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str, tiny: bool = True) -> DictConfig:
        return compose_config([*(TINY if tiny else []), *overrides], tmp_path)

    return make


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason (a user's clone has no shared folder)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: this test needs the team's shared folder next to the checkout "
                    "(or WSSS_SHARED_DIR=/path/to/shared)")
    return path


def env_without_gpu() -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


# ------------------------------------------------------------------ fidelity: measured deviations
# The reference tests (tests/reference/) compare our outputs with the reference code's. Every comparison
# they make is recorded here (largest absolute and relative deviation per test); with WSSS_FIDELITY_JSON
# set, the session writes them to that file (experiments/FIDELITY.md is built from it).
_DEVIATIONS: dict[str, dict[str, float]] = {}


def _record(node: str, actual, desired) -> None:
    import numpy as np

    try:
        a = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual, dtype=np.float64)
        d = np.asarray(desired.detach().cpu() if hasattr(desired, "detach") else desired, dtype=np.float64)
        diff = np.abs(a - d)
    except (TypeError, ValueError):
        return
    if diff.size == 0:
        return
    entry = _DEVIATIONS.setdefault(node, {"max_abs": 0.0, "max_rel": 0.0, "comparisons": 0, "values": 0})
    entry["max_abs"] = max(entry["max_abs"], float(np.nanmax(diff)))
    rel = diff / np.maximum(np.abs(d), 1e-12)
    entry["max_rel"] = max(entry["max_rel"], float(np.nanmax(np.where(np.abs(d) > 1e-6, rel, 0.0))))
    entry["comparisons"] += 1
    entry["values"] += int(diff.size)


@pytest.fixture(autouse=True)
def _measure_reference_deviations(request, monkeypatch):
    if "reference" not in str(request.node.fspath):
        yield
        return
    import numpy as np

    node = request.node.nodeid
    wrapped = {
        (np.testing, "assert_allclose"), (np.testing, "assert_array_equal"), (torch.testing, "assert_close"),
    }
    for module, name in wrapped:
        original = getattr(module, name)

        def check(actual, desired, *args, _original=original, **kwargs):
            _record(node, actual, desired)
            return _original(actual, desired, *args, **kwargs)

        monkeypatch.setattr(module, name, check)
    yield


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("WSSS_FIDELITY_JSON")
    if out and _DEVIATIONS:
        import json

        Path(out).write_text(json.dumps(_DEVIATIONS, indent=2, sort_keys=True) + "\n")
