"""Progress of the long phases: a live bar on a terminal, two log lines elsewhere, a line when a lock is busy."""

from __future__ import annotations

import fcntl
import io
import logging
import sys
import threading
import time

import pytest
import torch
from omegaconf import OmegaConf

from arvision import pipeline
from arvision.evaluation import sample_images
from arvision.utils.artifacts import ArtifactCache
from arvision.utils.progress import phase, track


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class NotTerminal(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture
def logged(caplog):
    caplog.set_level(logging.INFO, logger="arvision")
    return caplog


def test_on_a_terminal_the_bar_shows_the_phase_and_its_total():
    screen = FakeTerminal()
    with phase("encoding the token cache", total=12, stream=screen) as bar:
        for _ in range(3):
            bar.advance(4)
    shown = screen.getvalue()
    assert "encoding the token cache" in shown
    assert "12/12" in shown and "img/s" in shown


def test_a_phase_started_under_another_adds_a_row_to_the_same_display():
    screen = FakeTerminal()
    with phase("outer", total=2, stream=screen) as outer:
        with phase("inner", total=3, stream=screen) as inner:
            inner.advance(3)
        outer.advance(2)
    shown = screen.getvalue()
    assert "inner" in shown and "3/3" in shown and "2/2" in shown
    with phase("after", total=1, stream=screen) as bar:  # the display was closed: a new one starts
        bar.advance(1)
    assert "after" in screen.getvalue()


def test_off_a_terminal_nothing_is_drawn_and_only_start_and_end_are_logged(logged):
    stream = NotTerminal()
    items = list(track([torch.zeros(2, 1)] * 50, "sample features", total=100, stream=stream))
    assert len(items) == 50
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in logged.records]
    assert lines[0] == "sample features: 100 img"
    assert len(lines) == 2 and lines[1].startswith("sample features: 100 img in ") and "img/s" in lines[1]


def test_ranks_other_than_zero_show_and_log_nothing(monkeypatch, logged):
    monkeypatch.setenv("RANK", "1")
    screen = FakeTerminal()
    for stream in (screen, NotTerminal()):
        with phase("sampling", total=4, stream=stream) as bar:
            bar.advance(4)
    assert screen.getvalue() == "" and not logged.records


def test_progress_changes_no_random_stream():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with phase("sampling", total=4, stream=FakeTerminal()) as bar:
        bar.advance(4)
    assert torch.equal(torch.rand(4), expected)


def test_sampling_and_encoding_give_the_same_tensors_on_a_terminal(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("generator=raster", "tokenizer=vq")
    dm = pipeline.build_datamodule(cfg)
    torch.manual_seed(0)
    tokenizer = pipeline.build_tokenizer(cfg, dm).eval()
    generator = pipeline.build_generator(cfg, tokenizer, dm.num_classes).eval()
    sampling = OmegaConf.to_container(cfg.generator.sample, resolve=True)
    subset = torch.utils.data.Subset(dm.test_set, range(24))
    labels = torch.arange(6) % dm.num_classes

    def outputs():
        images, _ = sample_images(generator, tokenizer, labels, batch_size=4, seed=0, **sampling)
        tokens, y = pipeline.encode_dataset(tokenizer, subset, batch_size=10)
        return images, tokens, y

    plain = outputs()
    screen = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", screen)
    shown = outputs()
    for a, b in zip(plain, shown):
        assert torch.equal(a, b)
    assert "sampling" in screen.getvalue() and "6/6" in screen.getvalue()
    assert "encoding the token cache" in screen.getvalue() and "24/24" in screen.getvalue()


# --------------------------------------------------------------------------------------------- artifact locks
def test_a_lock_held_by_another_job_is_announced_then_waited_for(tmp_path, logged):
    cache = ArtifactCache(tmp_path)
    lock = tmp_path / "tokenizer" / "k1.lock"
    lock.parent.mkdir(parents=True)
    holder = open(lock, "w")  # another open file: flock treats it as another job
    fcntl.flock(holder, fcntl.LOCK_EX)
    built: list[str] = []
    worker = threading.Thread(target=lambda: built.append(str(cache.get_or_build("tokenizer", "k1",
                                                                                  lambda tmp: {"ok": 1}))))
    worker.start()
    deadline = time.monotonic() + 10
    while not any("waiting for" in r.getMessage() for r in logged.records) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not built  # still waiting
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    worker.join(timeout=10)
    assert built and cache.exists("tokenizer", "k1")
    messages = [r.getMessage() for r in logged.records]
    assert messages[0] == f"waiting for tokenizer k1, being built by another job (lock {lock})"
    assert messages[1].startswith("lock on tokenizer k1 acquired after ")


def test_a_free_lock_is_taken_silently(tmp_path, logged):
    cache = ArtifactCache(tmp_path)
    cache.get_or_build("tokens", "k2", lambda tmp: {"ok": 1})
    assert not [r for r in logged.records if "lock" in r.getMessage()]
