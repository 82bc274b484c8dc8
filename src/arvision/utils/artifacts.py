"""Content-addressed artifact cache (trained tokenizers, classifiers, token caches).

An artifact lives at `<root>/<kind>/<key>/`, where `key` is the hash of everything that determines it. It is
built in a private temporary directory and renamed into place, so readers never see half-written artifacts,
and a per-key file lock makes concurrent sweep jobs build it once: the others wait and reuse it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from arvision.utils.progress import note


def config_hash(*parts: Any, length: int = 16) -> str:
    """Stable hash of configs and plain values (key order does not matter)."""
    def plain(x: Any) -> Any:
        return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else x
    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@contextmanager
def _locked(path: Path, *, what: str) -> Iterator[None]:
    """Hold the file lock at `path`; when another job holds it, say so (a build can take hours) and wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            note("waiting for %s, being built by another job (lock %s)", what, path)
            waited = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_EX)
            note("lock on %s acquired after %.0f s", what, time.perf_counter() - waited)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ArtifactCache:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()  # absolute: results.json records artifact paths

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def work_dir(self, kind: str, key: str) -> Path:
        """A persistent scratch dir for a build in progress (checkpoints there let a crashed build resume)."""
        path = self.root / kind / f"{key}.partial"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def exists(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / "meta.json").exists()

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], dict[str, Any]]) -> Path:
        """Return the artifact dir, calling `build(tmp_dir) -> meta` to make it when missing."""
        final = self.path(kind, key)
        if self.exists(kind, key):
            return final
        with _locked(self.root / kind / f"{key}.lock", what=f"{kind} {key}"):
            if self.exists(kind, key):  # built by another job while we waited
                return final
            for stale in (self.root / kind).glob(f"{key}.tmp-*"):  # left by a build that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=self.root / kind))
            try:
                meta = build(tmp)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
                if final.exists():
                    shutil.rmtree(final)  # an incomplete earlier copy without meta.json
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(self.root / kind / f"{key}.partial", ignore_errors=True)
        return final

    @staticmethod
    def meta(path: Path) -> dict[str, Any]:
        return json.loads((path / "meta.json").read_text())
