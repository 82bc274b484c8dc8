"""The sharded token store: the batches stage 2 trains on, resumable and multi-process encoding byte for byte,
pre-encoded views, and stores that cannot be read."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from arvision import pipeline
from arvision.data import store as store_module
from arvision.data.store import (TokenStore, augment_views, encode_shards, finish_store, make_plan, missing_shards,
                                 view_choice)
from arvision.data.tokens import TokenDataset, step_loader
from arvision.utils.artifacts import ArtifactCache
from arvision.utils.files import UnreadableFile
from tests.conftest import cli_env

# A deterministic stand-in tokenizer: a fixed random projection of 4×4 patches to 37 codes (or to latents).
_ENCODER = """
import torch
from torch.utils.data import TensorDataset
_w = torch.randn(37, 16, generator=torch.Generator().manual_seed(7))

def encode(images):
    patches = torch.nn.functional.unfold(images, 4, stride=4).transpose(1, 2)  # (B, 16 patches, 16)
    return (patches @ _w.T).argmax(-1).reshape(-1, 4, 4)

def dataset(n):
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 5, (n,), generator=g))
"""
_scope: dict = {}
exec(_ENCODER, _scope)
encode, make_dataset = _scope["encode"], _scope["dataset"]


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def build_store(folder: Path, n: int = 70, *, augment: str = "none", shard_items: int = 20, batch: int = 10,
                world: int = 1) -> TokenStore:
    plan = make_plan(n, batch_size=batch, augment=augment, shard_items=shard_items)
    work = folder / "work"
    for rank in range(world):
        encode_shards(work, plan, make_dataset(n), encode, vocab_size=37, rank=rank, world=world)
    (folder / "store").mkdir()
    finish_store(work, folder / "store", plan, {"tokenizer": "t"})
    return TokenStore(folder / "store", seed=3)


def test_store_serves_the_batches_of_the_in_memory_cache(tmp_path) -> None:
    store = build_store(tmp_path)
    images, labels = make_dataset(70).tensors
    tokens = encode(images).to(torch.int16)
    assert len(store) == 70 and len(store.index["shards"]) == 4  # 20, 20, 20, 10 items
    kept, kept_labels = store.load()
    assert kept.dtype == torch.int16 and torch.equal(kept, tokens) and torch.equal(kept_labels, labels)
    old = step_loader(TokenDataset(tokens, labels), batch_size=16, num_steps=12, seed=5)
    new = step_loader(store, batch_size=16, num_steps=12, seed=5)
    for (x_old, y_old), (x_new, y_new) in zip(old, new, strict=True):  # three epochs, batches across shards
        assert x_new.dtype == x_old.dtype == torch.long and torch.equal(x_new, x_old) and torch.equal(y_new, y_old)


def test_multi_scale_tokens_are_one_file_per_scale(tmp_path) -> None:
    def pyramid(images: torch.Tensor) -> list[torch.Tensor]:
        grid = encode(images)
        return [grid[:, :1, :1], grid[:, :2, :2], grid]
    plan = make_plan(30, batch_size=10, shard_items=10)
    encode_shards(tmp_path / "w", plan, make_dataset(30), pyramid, vocab_size=37)
    (tmp_path / "s").mkdir()
    finish_store(tmp_path / "w", tmp_path / "s", plan, {})
    store = TokenStore(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").glob("00001.*")) == [
        "00001.json", "00001.labels.npy", "00001.tokens.0.npy", "00001.tokens.1.npy", "00001.tokens.2.npy"]
    idx = torch.tensor([29, 0, 15])
    expected = [t[idx].long() for t in pyramid(make_dataset(30).tensors[0])]
    got, _ = store[idx]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_killed_encode_resumes_to_byte_identical_shards(tmp_path, monkeypatch) -> None:
    """SIGKILL while shard 2's arrays are being written; the rerun keeps shards 0–1 and writes the same bytes."""
    killed = tmp_path / "killed"
    plan = make_plan(70, batch_size=10, shard_items=20)
    real = store_module.write_array

    def dying(path: Path, array: np.ndarray) -> dict:
        if path.name.startswith("00002.tokens"):
            path.with_name(path.name + ".tmp-99999").write_bytes(b"half")  # a torn temporary file
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, array)

    pid = os.fork()  # a copy of this process, killed half-way through its encode
    if pid == 0:
        try:
            monkeypatch.setattr(store_module, "write_array", dying)
            encode_shards(killed, plan, make_dataset(70), encode, vocab_size=37)
        finally:
            os._exit(0)  # not reached when the kill lands
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    monkeypatch.undo()
    assert missing_shards(killed, plan) == ["00002", "00003"] and (killed / "00002.labels.npy").exists()
    written = encode_shards(killed, plan, make_dataset(70), encode, vocab_size=37)
    assert written == [2, 3]  # the complete shards were kept
    (tmp_path / "a").mkdir()
    finish_store(killed, tmp_path / "a", plan, {"tokenizer": "t"})  # moves only the manifests' files
    build_store(tmp_path / "b", 70)
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b" / "store")


def test_ranks_write_their_own_shards_and_equal_one_process(tmp_path) -> None:
    plan = make_plan(70, batch_size=10, shard_items=20)
    assert plan.shards_of(0, 2) == [0, 2] and plan.shards_of(1, 2) == [1, 3]
    encode_shards(tmp_path / "w", plan, make_dataset(70), encode, vocab_size=37, rank=1, world=2)
    assert missing_shards(tmp_path / "w", plan) == ["00000", "00002"]
    two = build_store(tmp_path / "two", world=2)
    one = build_store(tmp_path / "one", world=1)
    assert file_digests(two.folder) == file_digests(one.folder)


def test_an_encoder_that_draws_writes_the_same_shards_on_any_rank(tmp_path) -> None:
    """A posterior-sampling encoder draws from (seed, shard): the same bytes by 1 or 2 processes, in any order."""
    def noisy(images: torch.Tensor) -> torch.Tensor:
        return encode(images).float() + torch.randn(len(images), 4, 4)

    plan = make_plan(40, batch_size=10, shard_items=10)
    before = torch.get_rng_state()
    encode_shards(tmp_path / "one", plan, make_dataset(40), noisy, vocab_size=None, seed=2)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is left as it was
    torch.manual_seed(123)  # another state before the other ranks' encodes
    for rank in (1, 0):
        encode_shards(tmp_path / "two", plan, make_dataset(40), noisy, vocab_size=None, seed=2, rank=rank, world=2)
    assert file_digests(tmp_path / "one") == file_digests(tmp_path / "two")
    encode_shards(tmp_path / "seed3", plan, make_dataset(40), noisy, vocab_size=None, seed=3)
    assert file_digests(tmp_path / "seed3")["00000.tokens.npy"] != file_digests(tmp_path / "one")["00000.tokens.npy"]


def test_a_partial_encode_of_another_plan_is_discarded(tmp_path) -> None:
    encode_shards(tmp_path, make_plan(70, batch_size=10, shard_items=20), make_dataset(70), encode, vocab_size=37)
    other = make_plan(70, batch_size=10, shard_items=30)
    assert encode_shards(tmp_path, other, make_dataset(70), encode, vocab_size=37) == [0, 1, 2]
    assert json.loads((tmp_path / "00000.json").read_text())["count"] == 30


def test_views_follow_llamagen_flip_and_ten_crop() -> None:
    images = torch.rand(2, 3, 20, 20) * 2 - 1
    flip = augment_views(images, "flip")
    assert flip.shape == (2, 2, 3, 20, 20) and torch.equal(flip[:, 1], images.flip(-1))
    ten = augment_views(images, "ten_crop")  # 1.1× → 22 px, then 20 px crops
    larger = torch.nn.functional.interpolate(images, size=(22, 22), mode="bicubic", antialias=True).clamp(-1, 1)
    assert ten.shape == (2, 10, 3, 20, 20)
    assert torch.equal(ten[:, 0], larger[..., :20, :20]) and torch.equal(ten[:, 4], larger[..., 1:21, 1:21])
    assert torch.equal(ten[:, 5], larger.flip(-1)[..., :20, :20])  # torchvision: crops of the mirrored image
    assert torch.equal(ten[:, 6], larger[..., :20, :20].flip(-1))  # its top right is the original's top left


def test_one_view_per_item_drawn_by_seed_step_and_item(tmp_path) -> None:
    store = build_store(tmp_path, 40, augment="ten_crop")
    assert store.variants == 10 and tuple(store.load()[0].shape) == (40, 10, 4, 4)
    idx = torch.tensor([3, 17, 39, 0])
    views = view_choice(3, 5, idx, 10)
    x, _ = store[(5, idx)]
    everything = store.load()[0]
    assert torch.equal(x, everything[idx, views].long())
    # The same item's view does not depend on which batch (rank, micro-batch) it is served in.
    assert torch.equal(view_choice(3, 5, idx[2:], 10), views[2:])
    draws = torch.stack([view_choice(3, step, torch.arange(40), 10) for step in range(50)])
    assert set(draws.flatten().tolist()) == set(range(10)) and (draws[0] != draws[1]).any()
    with pytest.raises(ValueError, match="step_loader"):
        store[idx]
    batches = list(step_loader(store, batch_size=8, num_steps=3, seed=3, with_steps=True))
    assert [tuple(b[0].shape) for b in batches] == [(8, 4, 4)] * 3


def test_a_damaged_store_is_refused_in_one_line(tmp_path) -> None:
    store = build_store(tmp_path)
    path = store.folder / "00001.tokens.npy"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UnreadableFile, match="00001.tokens.npy.*delete"):
        TokenStore(store.folder)
    (store.folder / "index.json").unlink()
    with pytest.raises(UnreadableFile, match="not a complete token store"):
        TokenStore(store.folder)
    other = build_store(tmp_path / "other")
    np.save(other.folder / "00000.labels.npy", np.array([{"a": 1}] * 20, dtype=object))  # pickled objects
    with pytest.raises(UnreadableFile, match="00000.labels.npy cannot be read"):  # never unpickled
        TokenStore(other.folder)


def test_stage2_store_is_keyed_like_the_cache_and_by_its_views(tiny_cfg, tmp_path) -> None:
    cfg = tiny_cfg("tokenizer=vq", "generator=raster", "data.shapes_train_size=60", "data.eval_batch_size=20")
    flip = tiny_cfg("tokenizer=vq", "generator=raster", "data.shapes_train_size=60", "data.eval_batch_size=20",
                    "data.encode_augment=flip")
    assert pipeline.tokenizer_key(cfg) == pipeline.tokenizer_key(flip)  # stage 1 does not see the views
    assert pipeline.run_identity(cfg) != pipeline.run_identity(flip)
    dm = pipeline.build_datamodule(flip)
    torch.manual_seed(0)
    tokenizer = pipeline.build_tokenizer(cfg, dm).eval()
    cache = ArtifactCache(tmp_path / "artifacts")
    plain = pipeline.get_token_cache(cfg, tokenizer, tmp_path / "tok", dm, cache, shard_items=40)
    viewed = pipeline.get_token_cache(flip, tokenizer, tmp_path / "tok", dm, cache, shard_items=40)
    assert plain.folder != viewed.folder and len(plain.index["shards"]) == 2 and viewed.variants == 2
    tokens, labels = pipeline.encode_dataset(tokenizer, dm.train_set, 20)
    assert torch.equal(plain.load()[0], tokens) and torch.equal(plain.load()[1], labels)
    assert torch.equal(viewed.load()[0][:, 0], tokens)
    again = pipeline.get_token_cache(cfg, tokenizer, tmp_path / "tok", dm, cache, shard_items=40)
    assert again.folder == plain.folder and ArtifactCache.meta(plain.folder)["num_shards"] == 2
    short = flip.copy()
    short.generator.train.max_steps = 2
    assert pipeline.train_generator(short, tokenizer, viewed, dm.num_classes, tmp_path / "run").steps == 2
    with pytest.raises(pipeline.ConfigError, match="data.encode_augment='mirror' is not an option; use one of none"):
        pipeline.check_settings(tiny_cfg("data.encode_augment=mirror"))  # before any work, in one line


@pytest.mark.slow
def test_torchrun_two_processes_write_the_store_of_one(tmp_path) -> None:
    """arvision-encode under torchrun (RANK, WORLD_SIZE): each process writes its shards, rank 0 the index; every
    file equals a one-process encode's. About a minute: three processes start arvision."""
    args = ["debug=tiny", "data=shapes", "data.shapes_train_size=240", "data.eval_batch_size=20", "shard_items=40"]
    one, two = tmp_path / "one", tmp_path / "two"
    first = subprocess.run([sys.executable, "-m", "arvision.cli.encode", *args], env=cli_env(one), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.copytree(one / "artifacts" / "tokenizer", two / "artifacts" / "tokenizer")  # the same stage 1
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    done = subprocess.run([*torchrun, "-m", "arvision.cli.encode", *args], env=cli_env(two), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stores = [next(p for p in (root / "artifacts" / "token_store").iterdir() if p.is_dir()) for root in (one, two)]
    assert stores[0].name == stores[1].name and len(TokenStore(stores[1]).index["shards"]) == 6
    assert ArtifactCache.meta(stores[1])["world"] == 2
    digests = [{k: v for k, v in file_digests(s).items() if k != "meta.json"} for s in stores]
    assert digests[0] == digests[1] and len(digests[0]) == 6 * 3 + 1
