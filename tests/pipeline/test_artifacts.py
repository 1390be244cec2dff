"""The artifact store (src/pipeline/artifacts.py): fingerprints, run-once-and-reuse, resume after a
failure, atomic manifests, user overrides (artifacts.reuse) and the run directory's links."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from src.pipeline.artifacts import ArtifactStore, fingerprint
from src.stages.core import MANIFEST, Artifact


class Runner:
    """A stage's run function that records its calls and writes one file."""

    def __init__(self, metrics: dict | None = None, fail: bool = False) -> None:
        self.calls: list[Path] = []
        self.seen_before: list[list[str]] = []
        self.metrics = metrics if metrics is not None else {"summary": {"x": 1.5}}
        self.fail = fail

    def __call__(self, out_dir: Path) -> dict:
        self.calls.append(out_dir)
        self.seen_before.append(sorted(p.name for p in out_dir.iterdir()))
        (out_dir / f"part_{len(self.calls)}.txt").write_text("data")
        if self.fail:
            raise RuntimeError("killed halfway")
        return self.metrics


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "cache", tmp_path / "run")


def test_fingerprint_is_canonical():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint({"a": [1, 2]}) != fingerprint({"a": [2, 1]})
    assert len(fingerprint({})) == 64


def test_produce_runs_once_then_reuses(store, tmp_path):
    run = Runner()
    first = store.produce("seeds", 0, {"lr": 0.1}, {}, run)
    assert len(run.calls) == 1 and not first.reused
    assert first.path == run.calls[0]
    assert first.path.parent == tmp_path / "cache" / "artifacts" / "seeds"
    assert first.path.name == first.fingerprint[:16]
    assert first.metrics == {"summary": {"x": 1.5}}
    assert (first.path / MANIFEST).is_file()

    second = store.produce("seeds", 0, {"lr": 0.1}, {}, run)
    assert len(run.calls) == 1  # not run again
    assert second.reused and second.path == first.path and second.fingerprint == first.fingerprint
    assert second.metrics == {"summary": {"x": 1.5}}
    # another run directory sharing the cache (a sweep's other job) reuses it too
    other = ArtifactStore(tmp_path / "cache", tmp_path / "run2").produce("seeds", 0, {"lr": 0.1}, {}, run)
    assert other.reused and len(run.calls) == 1


def test_changed_spec_is_recomputed(store):
    run = Runner()
    a = store.produce("seeds", 0, {"lr": 0.1, "epochs": 2}, {}, run)
    b = store.produce("seeds", 0, {"lr": 0.2, "epochs": 2}, {}, run)
    assert len(run.calls) == 2 and not b.reused
    assert a.fingerprint != b.fingerprint and a.path != b.path
    # the stage name is part of the fingerprint: same spec, other stage -> other entry
    c = store.produce("irn", 0, {"lr": 0.1, "epochs": 2}, {}, run)
    assert len(run.calls) == 3 and c.fingerprint != a.fingerprint
    # the round is not: the same stage and spec in round 1 reuses round 0's output
    d = store.produce("seeds", 1, {"epochs": 2, "lr": 0.1}, {}, run)
    assert d.reused and d.path == a.path and len(run.calls) == 3


def test_input_fingerprints_propagate(store):
    upstream, downstream = Runner(), Runner()
    a1 = store.produce("classification", 0, {"lr": 0.1}, {}, upstream)
    b1 = store.produce("seeds", 0, {"t": 0.15}, {"model": a1}, downstream)
    b1_again = store.produce("seeds", 0, {"t": 0.15}, {"model": a1}, downstream)
    assert b1_again.reused and len(downstream.calls) == 1
    a2 = store.produce("classification", 0, {"lr": 0.2}, {}, upstream)
    b2 = store.produce("seeds", 0, {"t": 0.15}, {"model": a2}, downstream)  # same spec, new input
    assert len(downstream.calls) == 2 and not b2.reused
    assert b2.fingerprint != b1.fingerprint
    manifest = json.loads((b2.path / MANIFEST).read_text())
    assert manifest["inputs"] == {"model": {"stage": "classification", "fingerprint": a2.fingerprint,
                                            "path": str(a2.path)}}
    assert manifest["stage"] == "seeds" and manifest["round"] == 0 and manifest["spec"] == {"t": 0.15}
    assert manifest["fingerprint"] == b2.fingerprint
    # the role name of an input counts too
    b3 = store.produce("seeds", 0, {"t": 0.15}, {"cams": a2}, downstream)
    assert b3.fingerprint != b2.fingerprint


def test_failed_run_leaves_no_manifest_and_resumes(store):
    failing = Runner(fail=True)
    with pytest.raises(RuntimeError, match="killed halfway"):
        store.produce("irn", 0, {"lr": 0.1}, {}, failing)
    out_dir = failing.calls[0]
    assert not (out_dir / MANIFEST).exists()
    assert ArtifactStore.read(out_dir) is None
    assert (out_dir / "part_1.txt").is_file()  # the partial output stays for the resume
    assert not (store.run_dir / "round_0" / "irn").exists()

    resumed = Runner()
    artifact = store.produce("irn", 0, {"lr": 0.1}, {}, resumed)
    assert len(resumed.calls) == 1 and not artifact.reused
    assert resumed.calls[0] == out_dir  # the same directory...
    assert resumed.seen_before[0] == ["part_1.txt"]  # ...holding what the killed run wrote
    assert (out_dir / MANIFEST).is_file()


def test_manifest_written_atomically(store):
    artifact = store.produce("seeds", 0, {"lr": 0.1}, {}, Runner({"summary": {"miou": 0.5}}))
    names = sorted(p.name for p in artifact.path.iterdir())
    assert names == [MANIFEST, "part_1.txt"]  # no temporary file left behind
    leftovers = [p for p in artifact.path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    manifest = json.loads((artifact.path / MANIFEST).read_text())
    assert manifest["metrics"] == {"summary": {"miou": 0.5}}
    assert manifest["duration_s"] >= 0
    assert ArtifactStore.read(artifact.path).manifest == manifest


def test_unreadable_manifest_is_an_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / MANIFEST).write_text("{half")
    with pytest.raises(ValueError, match=r"unreadable artifact manifest .*manifest\.json"):
        ArtifactStore.read(tmp_path / "x")


def test_run_dir_link_points_at_the_cache_entry(store, tmp_path):
    a = store.produce("seeds", 2, {"lr": 0.1}, {}, Runner())
    link = tmp_path / "run" / "round_2" / "seeds"
    assert link.is_symlink()
    assert link.resolve() == a.path.resolve()
    assert (link / "part_1.txt").read_text() == "data"
    # a rerun in the same run dir with another spec re-points the link
    b = store.produce("seeds", 2, {"lr": 0.2}, {}, Runner())
    assert link.resolve() == b.path.resolve()
    assert not any(p.name.endswith(".tmp") for p in link.parent.iterdir())
    store.produce("seeds", 3, {"lr": 0.1}, {}, Runner(), link=False)
    assert not (tmp_path / "run" / "round_3").exists()


# ------------------------------------------------------------------------------------- user overrides
def test_reuse_override_with_a_directory(tmp_path):
    made = ArtifactStore(tmp_path / "elsewhere", tmp_path / "old_run").produce("seeds", 0, {"lr": 9}, {}, Runner())
    store = ArtifactStore(tmp_path / "cache", tmp_path / "run", reuse={"round_0": {"seeds": str(made.path)}})
    run = Runner()
    got = store.produce("seeds", 0, {"lr": 0.1}, {}, run)
    assert run.calls == []  # skipped
    assert got.reused and got.path == made.path and got.fingerprint == made.fingerprint
    assert got.metrics == made.metrics
    assert (tmp_path / "run" / "round_0" / "seeds").resolve() == made.path.resolve()
    # downstream stages take its fingerprint
    down = store.produce("irn", 0, {}, {"cams": got}, Runner())
    assert json.loads((down.path / MANIFEST).read_text())["inputs"]["cams"]["fingerprint"] == made.fingerprint
    # the override is per round: round 1 runs normally
    run1 = Runner()
    store.produce("seeds", 1, {"lr": 0.1}, {}, run1)
    assert len(run1.calls) == 1


def test_reuse_override_must_hold_a_manifest_of_the_same_stage(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    store = ArtifactStore(tmp_path / "cache", tmp_path / "run", reuse={"round_0": {"seeds": str(empty)}})
    with pytest.raises(FileNotFoundError, match=r"artifacts\.reuse\.round_0\.seeds=.*empty: no manifest\.json"):
        store.produce("seeds", 0, {}, {}, Runner())

    cls = ArtifactStore(tmp_path / "c2", tmp_path / "r2").produce("classification", 0, {}, {}, Runner())
    store = ArtifactStore(tmp_path / "cache", tmp_path / "run", reuse={"round_0": {"seeds": str(cls.path)}})
    with pytest.raises(ValueError, match="holds a 'classification' artifact, not 'seeds'"):
        store.produce("seeds", 0, {}, {}, Runner())

    store = ArtifactStore(tmp_path / "cache", tmp_path / "run",
                          reuse={"round_0": {"seeds": str(tmp_path / "missing")}})
    with pytest.raises(FileNotFoundError, match=r"round_0\.seeds=.*missing: no such directory or \.ckpt file"):
        store.produce("seeds", 0, {}, {}, Runner())


def test_reuse_override_with_a_checkpoint_file(tmp_path):
    ckpt = tmp_path / "given" / "model.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights v1")
    store = ArtifactStore(tmp_path / "cache", tmp_path / "run", reuse={"round_1": {"classification": str(ckpt)}})
    run = Runner()
    got = store.produce("classification", 1, {"lr": 0.1}, {}, run)
    assert run.calls == [] and got.reused
    assert isinstance(got, Artifact) and got.stage == "classification"
    assert got.checkpoint == ckpt.resolve()
    assert got.path == ckpt.parent.resolve()
    # the fingerprint follows the file: a new checkpoint invalidates what was built on the old one
    before = got.fingerprint
    ckpt.write_bytes(b"weights v2, longer")
    os.utime(ckpt, ns=(1, 1))
    assert store.produce("classification", 1, {"lr": 0.1}, {}, run).fingerprint != before
    # a normal stage's checkpoint is model.ckpt in its directory
    normal = store.produce("classification", 0, {"lr": 0.1}, {}, Runner())
    assert normal.checkpoint == normal.path / "model.ckpt"
