"""The artifact store: every stage output lives in a directory keyed by a fingerprint.

Layout::

    <cache_dir>/artifacts/<stage>/<fingerprint16>/   the stage's files + manifest.json (written last)
    <run_dir>/round_<r>/<stage>  ->  symlink to that directory

A stage counts as done only when its manifest exists, so a killed run resumes at the first
unfinished stage (stages that write per-image files also skip the images already written).
The fingerprint hashes the stage's resolved config subtree and the fingerprints of its inputs, so a
changed config is recomputed and an identical one in another run (a sweep's other job, round 0 of
``conta=on`` vs ``conta=off``) is reused. A user can point any stage at an existing directory or
Lightning checkpoint (``artifacts.reuse.round_<r>.<stage>=PATH``) to skip it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from src.stages.core import MANIFEST, Artifact
from src.utils import dist
from src.utils.io import write_json_atomic
from src.utils.logging import get_logger

log = get_logger(__name__)

def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj`` (dict key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files of writers that were killed mid-write (``.<name>.<random>.tmp``, see
    src/utils/io.py); only ever called under the artifact's lock, when no writer is alive."""
    stale = [p for p in Path(folder).rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info(f"removed {len(stale)} half-written temporary file(s) of an interrupted run in {folder}")
    return len(stale)


class ArtifactStore:
    """Finds, runs and records stage outputs; see the module docstring."""

    def __init__(self, cache_dir: Path | str, run_dir: Path | str, reuse: Mapping[str, Any] | None = None):
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.run_dir = Path(run_dir).resolve()
        self.reuse = {str(k): dict(v or {}) for k, v in (reuse or {}).items()}

    def entry_dir(self, stage: str, fp: str) -> Path:
        return self.cache_dir / "artifacts" / stage / fp[:16]

    # ------------------------------------------------------------------ lookup
    @staticmethod
    def read(path: Path) -> Artifact | None:
        """The finished artifact in ``path``, or None if its manifest is absent (not done)."""
        manifest_path = Path(path) / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"unreadable artifact manifest {manifest_path}: {err}") from err
        return Artifact(manifest["stage"], manifest["fingerprint"], Path(path), manifest)

    def _override(self, stage: str, round_index: int, provides: Mapping[str, Any]) -> Artifact | None:
        target = self.reuse.get(f"round_{round_index}", {}).get(stage)
        if target is None:
            return None
        path = Path(str(target)).expanduser().resolve()
        if path.is_file() and path.suffix == ".ckpt":
            stat = path.stat()
            fp = fingerprint({"checkpoint": str(path), "size": stat.st_size, "mtime": stat.st_mtime_ns})
            manifest = {"stage": stage, "fingerprint": fp, "checkpoint": str(path), "override": str(path),
                        "provides": dict(provides)}
            artifact = Artifact(stage, fp, path.parent, manifest, reused=True)
        elif path.is_dir():
            found = self.read(path)
            if found is None:
                raise FileNotFoundError(
                    f"artifacts.reuse.round_{round_index}.{stage}={path}: no {MANIFEST} there; point it at a "
                    f"finished stage directory (one that holds {MANIFEST}) or at a Lightning .ckpt file"
                )
            if found.stage != stage:
                raise ValueError(
                    f"artifacts.reuse.round_{round_index}.{stage}={path} holds a '{found.stage}' artifact, "
                    f"not '{stage}'"
                )
            artifact = Artifact(stage, found.fingerprint, path, found.manifest, reused=True)
        else:
            raise FileNotFoundError(
                f"artifacts.reuse.round_{round_index}.{stage}={path}: no such directory or .ckpt file"
            )
        log.info(f"round {round_index} {stage}: using the given {path} (artifacts.reuse)")
        return artifact

    # --------------------------------------------------------------------- run
    def produce(
        self,
        stage: str,
        round_index: int,
        spec: Mapping[str, Any],
        inputs: Mapping[str, Artifact],
        run: Callable[[Path], dict[str, Any]],
        link: bool = True,
        provides: Mapping[str, Any] | None = None,
    ) -> Artifact:
        """Reuse the finished artifact of this (spec, inputs), or run ``run(out_dir)`` to make it.

        Every rank of a multi-process job calls this; rank 0 decides and records, the others follow.
        ``run`` returns the stage's metrics (rank 0's value is recorded); what it returns under ``provides``
        joins ``provides`` (what the stage's config tells its consumers) in the manifest.
        """
        provides = dict(provides or {})
        given = self._override(stage, round_index, provides)
        if given is not None:
            if link:
                self._link(given, round_index)
            return given

        fp = fingerprint({"stage": stage, "spec": spec, "inputs": {k: v.fingerprint for k, v in inputs.items()}})
        out_dir = self.entry_dir(stage, fp)
        with self._lock(out_dir):
            done = dist.broadcast_object(self.read(out_dir) is not None)
            if done:
                artifact = self.read(out_dir)
                assert artifact is not None
                artifact = Artifact(stage, fp, out_dir, artifact.manifest, reused=True)
                log.info(f"round {round_index} {stage}: reusing {out_dir} (fingerprint {fp[:16]})")
            else:
                out_dir.mkdir(parents=True, exist_ok=True)
                if dist.is_rank_zero():
                    remove_stale_temporaries(out_dir)
                dist.barrier()
                resumed = any(out_dir.iterdir())
                log.info(
                    f"round {round_index} {stage}: {'resuming' if resumed else 'running'} in {out_dir}"
                )
                start = time.time()
                metrics = dict(run(out_dir) or {})
                provides.update(metrics.pop("provides", {}))
                manifest = {
                    "stage": stage,
                    "fingerprint": fp,
                    "round": round_index,
                    "spec": spec,
                    "inputs": {k: {"stage": v.stage, "fingerprint": v.fingerprint, "path": str(v.path)}
                               for k, v in inputs.items()},
                    "metrics": metrics,
                    "provides": provides,
                    "duration_s": round(time.time() - start, 3),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
                if dist.is_rank_zero():
                    write_json_atomic(out_dir / MANIFEST, manifest)
                dist.barrier()
                artifact = Artifact(stage, fp, out_dir, manifest)
        if link:
            self._link(artifact, round_index)
        return artifact

    @contextlib.contextmanager
    def _lock(self, out_dir: Path) -> Iterator[None]:
        """Rank 0 holds an exclusive file lock, so two jobs never build the same artifact at once."""
        if not dist.is_rank_zero():
            yield
            return
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out_dir.parent / f"{out_dir.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info(f"waiting for another job that is building {out_dir}")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def _link(self, artifact: Artifact, round_index: int) -> None:
        if not dist.is_rank_zero():
            return
        link = self.run_dir / f"round_{round_index}" / artifact.stage
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == artifact.path:
                return
            if link.is_symlink() or link.is_file():
                link.unlink()
        tmp = link.with_name(f".{link.name}.tmp")
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(artifact.path, target_is_directory=True)
        os.replace(tmp, link)
