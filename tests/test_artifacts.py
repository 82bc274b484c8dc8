"""The content-addressed artifact cache and the run-level helpers around it."""

import json
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from arvision.utils.artifacts import ArtifactCache, config_hash


@given(st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), min_size=1, max_size=6))
def test_hash_ignores_key_order_but_not_values(d):
    reordered = dict(reversed(list(d.items())))
    assert config_hash(d) == config_hash(reordered) == config_hash(OmegaConf.create(d))
    key = next(iter(d))
    assert config_hash({**d, key: d[key] + 1}) != config_hash(d)
    assert config_hash({**d, "__extra": 1}) != config_hash(d)


def test_builds_once_then_reuses(tmp_path):
    cache, calls = ArtifactCache(tmp_path), []

    def build(tmp):
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(b"x")
        return {"n": len(calls)}

    first = cache.get_or_build("tok", "abc", build)
    second = cache.get_or_build("tok", "abc", build)
    assert first == second and len(calls) == 1
    assert (first / "weights.bin").read_bytes() == b"x"
    assert json.loads((first / "meta.json").read_text()) == {"n": 1}
    assert not any(p.name.startswith("abc.tmp-") for p in (tmp_path / "tok").iterdir())


def test_failed_build_leaves_nothing_behind_and_can_be_retried(tmp_path):
    cache = ArtifactCache(tmp_path)

    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("crash during build")

    with pytest.raises(RuntimeError, match="crash"):
        cache.get_or_build("tok", "k", broken)
    assert not cache.exists("tok", "k") and not cache.path("tok", "k").exists()
    path = cache.get_or_build("tok", "k", lambda tmp: {"ok": True})
    assert cache.meta(path) == {"ok": True}


def test_a_killed_builds_scratch_folder_is_removed_by_the_next_build(tmp_path):
    """SIGKILL skips the build's clean-up: its `<key>.tmp-*` folder stays until the next build of that key."""
    cache = ArtifactCache(tmp_path)
    stale = tmp_path / "tok" / "k.tmp-killed"
    (stale / "sub").mkdir(parents=True)
    other = tmp_path / "tok" / "other.tmp-running"  # another key's build may still be running: left alone
    other.mkdir()
    cache.get_or_build("tok", "k", lambda tmp: {"ok": True})
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["k", "k.lock", "other.tmp-running"]


def test_concurrent_jobs_build_once(tmp_path):
    cache, calls, results = ArtifactCache(tmp_path), [], []

    def build(tmp):
        calls.append(1)
        time.sleep(0.2)  # long enough for the other jobs to queue on the lock
        return {}

    threads = [threading.Thread(target=lambda: results.append(cache.get_or_build("t", "same", build)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
