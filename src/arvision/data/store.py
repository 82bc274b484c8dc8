"""A sharded, memory-mapped store of the dataset's tokens or latents (stage 2's input at any dataset size).

Layout of a store folder:

    00000.labels.npy  00000.tokens.npy (or 00000.tokens.0.npy, .1, … for multi-scale tokens)  00000.json
    00001.…                                                                                       index.json

Each array is a plain `.npy` file (numpy's header + raw bytes, no pickle), so it is opened as a memory map and a
file from elsewhere never runs code. Shard `i` holds items `[i·shard_size, (i+1)·shard_size)` of the dataset in
order. Every file is written under a temporary name and renamed into place; a shard's manifest (`00000.json`) is
written after its arrays, so a shard is complete exactly when its manifest exists. An encode that is killed is
rerun from the first missing shard, and since each shard is encoded in the same batches whoever writes it, the
shards of a resumed or multi-process encode are byte for byte those of an uninterrupted single-process one.
`index.json`, written last, gathers the manifests with the store's identity (tokenizer, data, augmentation).

Pre-encoded augmentations (`data.encode_augment`) store several views per image (an extra axis after the
batch): `flip` the image and its mirror, `ten_crop` LlamaGen's ten crops of a 1.1× larger image (corners and
centre, then their mirrors). Training draws one view per image from (seed, step, item), so a resumed run and any
number of processes see the same views.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from arvision.data.tokens import Tokens, compact, widen
from arvision.utils.files import UnreadableFile
from arvision.utils.progress import note, phase

INDEX = "index.json"
FORMAT = 1
# Items per shard (rounded up to whole encode batches): ~5 MB of VQ codes, ~80 MB of kl16 fp32 latents.
SHARD_ITEMS = 10_000
# Views stored per image for each `data.encode_augment`.
AUGMENTS = {"none": 1, "flip": 2, "ten_crop": 10}
# LlamaGen's extract_codes_c2i.py --crop-range: ten crops of the image resized to 1.1× the training size.
TEN_CROP_RANGE = 1.1
# How often a process waiting on other ranks' shards says what it waits for.
WAIT_NOTE_SECONDS = 60.0


class StoreError(ValueError):
    """A store request that cannot be met (bad option, a folder that is not a complete store); one line."""


# --------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class StorePlan:
    """What a store holds and how it is cut into shards; saved with a partial encode so a rerun can check it."""

    num_items: int
    shard_size: int
    batch_size: int
    augment: str = "none"

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shard_size)

    @property
    def variants(self) -> int:
        return AUGMENTS[self.augment]

    def items(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items))

    def shards_of(self, rank: int, world: int) -> list[int]:
        return list(range(rank, self.num_shards, world))


def make_plan(num_items: int, *, batch_size: int, augment: str = "none",
              shard_items: int = SHARD_ITEMS) -> StorePlan:
    if augment not in AUGMENTS:
        raise StoreError(f"data.encode_augment={augment!r} is not an option; use one of {', '.join(AUGMENTS)}")
    if batch_size < 1 or shard_items < 1:
        raise StoreError(f"encode batch size and shard size must be positive (got {batch_size}, {shard_items})")
    # Whole batches per shard: the batches (hence every float) are those of one pass over the dataset.
    shard_size = -(-shard_items // batch_size) * batch_size
    return StorePlan(num_items=num_items, shard_size=shard_size, batch_size=batch_size, augment=augment)


def shard_stem(shard: int) -> str:
    return f"{shard:05d}"


# --------------------------------------------------------------------------------------------- writing
def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    """`array` as a `.npy` file (no pickle), atomically; returns its entry for the manifest."""
    array = np.ascontiguousarray(array)
    _write_atomic(path, lambda handle: np.lib.format.write_array(handle, array, allow_pickle=False))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"file": path.name, "shape": list(array.shape), "dtype": array.dtype.str, "sha256": digest}


def write_json(path: Path, value: Any) -> None:
    _write_atomic(path, lambda handle: handle.write(json.dumps(value, indent=1, sort_keys=True).encode()))


def _parts(tokens: Tokens) -> list[torch.Tensor]:
    return list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]


def write_shard(folder: Path, shard: int, tokens: Tokens, labels: torch.Tensor) -> dict[str, Any]:
    """One complete shard: its arrays, then its manifest (the mark that the shard is complete)."""
    stem = shard_stem(shard)
    multi = isinstance(tokens, (list, tuple))
    files = {"labels": write_array(folder / f"{stem}.labels.npy", labels.numpy())}
    for k, part in enumerate(_parts(tokens)):
        name = f"tokens.{k}" if multi else "tokens"
        files[name] = write_array(folder / f"{stem}.{name}.npy", part.numpy())
    manifest = {"shard": shard, "count": len(labels), "structure": "list" if multi else "tensor", "files": files}
    write_json(folder / f"{stem}.json", manifest)
    return manifest


def shard_manifest(folder: Path, shard: int) -> dict[str, Any] | None:
    path = folder / f"{shard_stem(shard)}.json"
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------------------------- encoding
def augment_views(images: torch.Tensor, augment: str) -> torch.Tensor:
    """(B, C, H, W) images → (B, V, C, H, W): the views `augment` stores of each image."""
    if augment == "none":
        return images[:, None]
    if augment == "flip":
        return torch.stack([images, images.flip(-1)], dim=1)
    height, width = images.shape[-2:]
    # LlamaGen crops the source image to 1.1× the size (ADM's centre crop) before its TenCrop; images here are
    # already at the training size, so they are resized up to 1.1× instead (bicubic, kept in [-1, 1]).
    larger = F.interpolate(images, size=(int(height * TEN_CROP_RANGE), int(width * TEN_CROP_RANGE)),
                           mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    top, left = larger.shape[-2] - height, larger.shape[-1] - width
    centre_top, centre_left = int(round(top / 2.0)), int(round(left / 2.0))  # torchvision's centre_crop

    def five(image: torch.Tensor) -> list[torch.Tensor]:
        return [image[..., :height, :width], image[..., :height, left:], image[..., top:, :width],
                image[..., top:, left:], image[..., centre_top:centre_top + height, centre_left:centre_left + width]]
    # torchvision's TenCrop (LlamaGen's): the corners and centre of the image, then those of its mirror image.
    return torch.stack(five(larger) + five(larger.flip(-1)), dim=1)


def _split_views(tokens: Tokens, batch: int, variants: int) -> Tokens:
    """Encoder output for B·V images → (B, V, …), or (B, …) when there is one view (the store's shape)."""
    def one(t: torch.Tensor) -> torch.Tensor:
        return t if variants == 1 else t.reshape(batch, variants, *t.shape[1:])
    return [one(t) for t in tokens] if isinstance(tokens, (list, tuple)) else one(tokens)


@torch.no_grad()
def encode_shard(plan: StorePlan, shard: int, dataset: Dataset, encode: Callable[[torch.Tensor], Tokens], *,
                 vocab_size: int | None, seed: int = 0, num_workers: int = 0,
                 on_batch: Callable[[int], None] | None = None) -> tuple[Tokens, torch.Tensor]:
    """The tokens and labels of one shard, encoded in the plan's batches.

    An encoder that draws (a posterior sample, `encode_posterior: sample`) draws from a generator seeded by
    (seed, shard), so a shard's bytes do not depend on which process writes it or what ran before.
    """
    loader = DataLoader(Subset(dataset, plan.items(shard)), batch_size=plan.batch_size, shuffle=False,
                        num_workers=num_workers)
    chunks, labels = [], []
    with torch.random.fork_rng():
        torch.manual_seed(seed * 1_000_003 + shard)
        for images, y in loader:
            views = augment_views(images, plan.augment)
            tokens = encode(views.flatten(0, 1))
            chunks.append(_split_views(compact(tokens, vocab_size), len(y), plan.variants))
            labels.append(torch.as_tensor(y, dtype=torch.long))
            if on_batch is not None:
                on_batch(len(y))
    if isinstance(chunks[0], (list, tuple)):
        return [torch.cat(parts) for parts in zip(*chunks)], torch.cat(labels)
    return torch.cat(chunks), torch.cat(labels)


def start_work(folder: Path, plan: StorePlan) -> None:
    """Claim `folder` for `plan`: a partial encode of another plan (other data size, batch or shard size) is
    discarded, since its shards would not be the ones this plan writes."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.json"
    if path.exists() and json.loads(path.read_text()) != asdict(plan):
        note("discarding a partial token store of another plan in %s", folder)
        for stale in folder.iterdir():
            if stale.name != "plan.json":
                stale.unlink()
    if not path.exists():
        write_json(path, asdict(plan))


def encode_shards(folder: Path, plan: StorePlan, dataset: Dataset, encode: Callable[[torch.Tensor], Tokens], *,
                  vocab_size: int | None, seed: int = 0, rank: int = 0, world: int = 1,
                  num_workers: int = 0) -> list[int]:
    """Write this rank's missing shards (shard i belongs to rank i % world); returns the shards it wrote."""
    start_work(folder, plan)
    todo = [s for s in plan.shards_of(rank, world) if shard_manifest(folder, s) is None]
    done = len(plan.shards_of(rank, world)) - len(todo)
    if done:
        note("token store: %d of this process's shards already complete in %s, encoding the other %d", done,
             folder, len(todo))
    with phase("encoding the token store", total=sum(len(plan.items(s)) for s in todo)) as bar:
        for shard in todo:
            tokens, labels = encode_shard(plan, shard, dataset, encode, vocab_size=vocab_size, seed=seed,
                                          num_workers=num_workers, on_batch=bar.advance)
            write_shard(folder, shard, tokens, labels)
    return todo


def wait_for(ready: Callable[[], list[str]], *, what: str, poll_seconds: float = 0.5) -> None:
    """Poll until `ready()` returns nothing left to wait for, saying now and then what is missing."""
    waited, last_note = time.perf_counter(), time.perf_counter()
    while missing := ready():
        if time.perf_counter() - last_note > WAIT_NOTE_SECONDS:
            note("still waiting for %s after %.0f s: %s", what, time.perf_counter() - waited, ", ".join(missing[:5]))
            last_note = time.perf_counter()
        time.sleep(poll_seconds)


def missing_shards(folder: Path, plan: StorePlan) -> list[str]:
    return [shard_stem(s) for s in range(plan.num_shards) if not (folder / f"{shard_stem(s)}.json").exists()]


def finish_store(work: Path, out: Path, plan: StorePlan, identity: dict[str, Any]) -> dict[str, Any]:
    """Move a complete encode's shards from `work` into `out` and write the index last."""
    manifests = []
    for shard in range(plan.num_shards):
        manifest = shard_manifest(work, shard)
        if manifest is None:
            raise StoreError(f"shard {shard_stem(shard)} is missing from {work}; rerun the encode to write it")
        for entry in manifest["files"].values():
            os.replace(work / entry["file"], out / entry["file"])
        os.replace(work / f"{shard_stem(shard)}.json", out / f"{shard_stem(shard)}.json")
        manifests.append(manifest)
    first = manifests[0]
    index = {"format": FORMAT, **asdict(plan), "variants": plan.variants, "structure": first["structure"],
             "arrays": {name: {"shape": entry["shape"][1:], "dtype": entry["dtype"]}
                        for name, entry in first["files"].items()},
             "shards": [{"count": m["count"], "files": m["files"]} for m in manifests], **identity}
    write_json(out / INDEX, index)
    return index


# --------------------------------------------------------------------------------------------- reading
def map_npy(path: Path) -> tuple[mmap.mmap, np.ndarray]:
    """A `.npy` file as a read-only array over a memory map of it (and the map). The header is parsed as numpy's
    format defines it; object arrays (which need pickle) and Fortran order are refused."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        if dtype.hasobject or fortran_order:
            raise ValueError("an object or Fortran-order array, which a token store never holds")
        offset = handle.tell()
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    count = int(np.prod(shape))
    if len(mapped) < offset + count * dtype.itemsize:
        raise ValueError(f"{len(mapped)} bytes, the header says {offset + count * dtype.itemsize}")
    return mapped, np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)


def view_choice(seed: int, step: int, items: torch.Tensor, variants: int) -> torch.Tensor:
    """The stored view each item is trained on at `step`: a hash of (seed, step, item), so it is the same on
    any number of processes and after resumption, and changes from step to step."""
    mask = 0xFFFFFFFF
    x = (items.long() * 0x9E3779B1 + step * 0x85EBCA77 + seed * 0xC2B2AE3D) & mask
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & mask
    x = ((x ^ (x >> 15)) * 0x846CA68B) & mask
    return (x ^ (x >> 16)) % variants


class TokenStore(Dataset):
    """A store's items by index tensor, gathered from the memory-mapped shards (nothing is loaded up front).

    `store[idx]` returns what `TokenDataset` returns for the same tokens: (tokens, int64 labels), integer codes
    widened to int64. With pre-encoded augmentations `store[(step, idx)]` picks each item's view for that step
    (`step_loader(..., with_steps=True)` yields these).
    """

    def __init__(self, folder: str | os.PathLike, *, seed: int = 0) -> None:
        self.folder, self.seed = Path(folder), seed
        path = self.folder / INDEX
        if not path.is_file():
            raise UnreadableFile(f"{self.folder} is not a complete token store (no {INDEX}); delete it to "
                                 f"re-encode it")
        self.index = json.loads(path.read_text())
        if self.index.get("format") != FORMAT:
            raise UnreadableFile(f"{path}: token store format {self.index.get('format')!r}, this arvision reads "
                                 f"{FORMAT}; delete the store to re-encode it")
        self.variants = int(self.index["variants"])
        self.names = [n for n in self.index["arrays"] if n != "labels"]
        counts = [s["count"] for s in self.index["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.maps = self._open_all()

    def _open_all(self) -> dict[str, list[tuple[mmap.mmap, np.ndarray]]]:
        return {name: [self._open(s["files"][name]) for s in self.index["shards"]] for name in ["labels", *self.names]}

    def __getstate__(self) -> dict[str, Any]:
        # trainer=ddp_sim (ddp_spawn) pickles the loader into each rank: the shards are mapped again there
        return {key: value for key, value in self.__dict__.items() if key != "maps"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.maps = self._open_all()

    def _open(self, entry: dict[str, Any]) -> tuple[mmap.mmap, np.ndarray]:
        path = self.folder / entry["file"]
        try:
            mapped, array = map_npy(path)
        except (OSError, ValueError, EOFError) as err:
            raise UnreadableFile(f"{path} cannot be read ({str(err)[:100]}): the token store is truncated or "
                                 f"corrupt; delete {self.folder} to re-encode it") from None
        if list(array.shape) != entry["shape"] or array.dtype.str != entry["dtype"]:
            raise UnreadableFile(f"{path} holds {array.dtype.str} {list(array.shape)}, its index says "
                                 f"{entry['dtype']} {entry['shape']}; delete {self.folder} to re-encode it")
        return mapped, array

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _gather(self, name: str, idx: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        maps = self.maps[name]
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((len(idx), *self.index["arrays"][name]["shape"][1 if views is not None else 0:]),
                       dtype=maps[0][1].dtype)
        for shard in np.unique(shard_of):
            rows = np.nonzero(shard_of == shard)[0]
            local = idx[rows] - self.offsets[shard]
            mapped, array = maps[shard]
            out[rows] = array[local] if views is None else array[local, views[rows]]
            # Unmap the pages just read: they stay in the page cache, but not in this process's resident memory,
            # which the kernel's fault-around (16 pages a fault) would otherwise grow towards the store's size.
            mapped.madvise(mmap.MADV_DONTNEED)
        return torch.from_numpy(out)

    def __getitem__(self, key: torch.Tensor | tuple[int, torch.Tensor]) -> tuple[Tokens, torch.Tensor]:
        step, idx = key if isinstance(key, tuple) else (None, key)
        views = None
        if self.variants > 1:
            if step is None:
                raise StoreError(f"{self.folder} holds {self.variants} views per image: index it by (step, "
                                 f"indices), as step_loader(..., with_steps=True) does")
            views = view_choice(self.seed, step, idx, self.variants).numpy()
        positions = idx.numpy().astype(np.int64)
        parts = [self._gather(name, positions, views) for name in self.names]
        tokens = parts if self.index["structure"] == "list" else parts[0]
        return widen(tokens), self._gather("labels", positions, None).long()

    def load(self) -> tuple[Tokens, torch.Tensor]:
        """Every item in memory, as `encode_dataset` returns them (small stores, tests)."""
        def whole(name: str) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([array for _, array in self.maps[name]]))
        parts = [whole(name) for name in self.names]
        return (parts if self.index["structure"] == "list" else parts[0]), whole("labels")
