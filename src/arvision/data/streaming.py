"""Image datasets that do not sit on local disk: WebDataset tar shards, read from a folder, a URL or a shell pipe.

Why WebDataset and not LitData: its shards are plain POSIX tar files (one `<key>.jpg` + `<key>.cls` pair per image,
the JPEG bytes as they were), which `tar`, any object store and any other loader read without a conversion step or a
library-specific chunk format, and `webdataset.gopen` opens them from a path, `http(s)://…` or `pipe:<command>`
(`pipe:aws s3 cp s3://bucket/train/shard-000000.tar -`), so no storage SDK comes in with it (its dependencies:
braceexpand, numpy, pyyaml). LitData streams its own binary chunks written by its `optimize` step and brings
lightning-sdk and boto3 along.

Layout of a shard set, written by `write_shards` (`arvision-shards <image folder> <out>`):

    <out>/<split>/shard-000000.tar …      # ImageNet's order: classes sorted, files sorted within a class
    <out>/<split>/index.json              # classes, and each shard's name and image count (written last, atomically)

`ShardedImages` serves a split by index, like `ImageFolderDataset` (same pre-processing, same (image, label)
pairs), so the step sampler, resumption and the token store work unchanged. A shard is fetched whole into
`cache_dir` the first time one of its images is asked for (atomically: a kill never leaves half a shard), and its
member offsets are read once; a pass in index order (the token store's encoding, evaluation) therefore streams the
shards one after another, while random-order training (stage 1) ends up with every shard in the cache.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from arvision.data.datasets import DatasetNotFound, ImageFolderDataset, PaperCrop, image_to_tensor
from arvision.tokenizers.base import MissingExtra

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SHARD_PATTERN = "shard-%06d.tar"
INSTALL = "pip install 'arvision[webdataset]' (webdataset==1.0.2)"


def webdataset():
    """The webdataset module; a missing extra is named in one line."""
    try:
        import webdataset as wds
    except ImportError:
        raise MissingExtra(f"data=webdataset needs the optional extra: {INSTALL}") from None
    return wds


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


# --------------------------------------------------------------------------------------------- writing
def write_shards(root: str | Path, out: str | Path, *, shard_size: int = 1000) -> dict[str, int]:
    """Every split of an image folder (`<root>/train`, `<root>/val` or `test`, else `<root>` as `train`) as WebDataset
    shards of `shard_size` images under `<out>/<split>/`; returns the image count per split. The files' bytes are
    stored unchanged (decoding and the papers' crops happen when read)."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be ≥ 1")
    root, out = Path(root), Path(out)
    splits = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()} or {"train": root}
    return {split: _write_split(folder, out / split, shard_size) for split, folder in splits.items()}


def _write_split(folder: Path, out: Path, shard_size: int) -> int:
    wds = webdataset()
    listing = ImageFolderDataset(root=str(folder), image_size=1)  # the class folders and files, in their order
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_FILE).exists():
        raise FileExistsError(f"{out / INDEX_FILE} exists: these shards are written; remove {out} to write them again")
    with wds.ShardWriter(str(out / SHARD_PATTERN), maxcount=shard_size, verbose=0) as writer:
        for i, (path, label) in enumerate(listing.samples):
            writer.write({"__key__": f"{i:09d}", _extension(path): path.read_bytes(), "cls": str(label).encode()})
    counts = [min(shard_size, len(listing.samples) - start) for start in range(0, len(listing.samples), shard_size)]
    index = {"format": "arvision-webdataset-1", "classes": listing.classes, "num_items": len(listing.samples),
             "shards": [{"name": SHARD_PATTERN % k, "count": n} for k, n in enumerate(counts)]}
    tmp = out / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX_FILE)  # the index last: a set without one is unfinished
    return len(listing.samples)


def _extension(path: Path) -> str:
    """WebDataset's field name for an image file: its suffix, jpeg spelled jpg."""
    suffix = path.suffix.lower().lstrip(".")
    return "jpg" if suffix == "jpeg" else suffix


# --------------------------------------------------------------------------------------------- reading
class ShardedImages(Dataset):
    """One split of a shard set, by index: `(float image in [-1, 1] (C, H, W), label)` as `ImageFolderDataset`."""

    def __init__(self, *, url: str, image_size: int, channels: int = 3, cache_dir: str | None = None,
                 transform: PaperCrop | None = None) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.url = url.rstrip("/")
        self.image_size, self.channels = image_size, channels
        self.transform = transform or PaperCrop(image_size=image_size)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if not _is_local(self.url) and self.cache_dir is None:
            raise ValueError(f"data.root={url} is not a local folder: set data.cache_dir=<local folder> for its shards")
        index = self._read_index()
        self.classes: list[str] = index["classes"]
        self.num_classes = len(self.classes)
        self.shards: list[str] = [shard["name"] for shard in index["shards"]]
        self.starts = np.cumsum([0] + [shard["count"] for shard in index["shards"]]).tolist()
        self._members: dict[int, dict[str, tuple[str, int, int]]] = {}  # shard → key → (field, offset, size)

    def _read_index(self) -> dict:
        hint = f"write one with arvision-shards <image folder> <out> and set data.root=<out> (root={self.url!r})"
        location = _join(self.url, INDEX_FILE)
        if _is_local(self.url):
            if not Path(location).is_file():
                raise DatasetNotFound(f"no {INDEX_FILE} in {self.url}: not a finished shard set; {hint}")
            return json.loads(Path(location).read_text())
        try:
            with webdataset().gopen(location) as stream:
                return json.loads(stream.read())
        except (OSError, ValueError) as err:
            raise DatasetNotFound(f"cannot read {location} ({err}); {hint}") from None

    def __len__(self) -> int:
        return self.starts[-1]

    def shard_path(self, shard: int) -> Path:
        """The shard's local file: the set's own when it is local, else fetched whole into the cache once."""
        name = self.shards[shard]
        if _is_local(self.url):
            return Path(self.url) / name
        assert self.cache_dir is not None  # checked in __init__
        local = self.cache_dir / name
        if not local.exists():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{name}.")
            with os.fdopen(fd, "wb") as handle, webdataset().gopen(_join(self.url, name)) as stream:
                shutil.copyfileobj(stream, handle)
            os.replace(tmp, local)  # whole or absent: another worker may have fetched it too, the same bytes
            log.info("fetched %s into %s", _join(self.url, name), self.cache_dir)
        return local

    def _index_shard(self, shard: int) -> dict[str, tuple[str, int, int]]:
        if shard not in self._members:
            members = {}
            with tarfile.open(self.shard_path(shard)) as tar:
                for info in tar.getmembers():  # <key>.cls and <key>.<image extension>
                    key, _, field = info.name.partition(".")
                    members[f"{key}.{'cls' if field == 'cls' else 'img'}"] = (field, info.offset_data, info.size)
            self._members[shard] = members
        return self._members[shard]

    def _read(self, shard: int, name: str) -> bytes:
        _, offset, size = self._index_shard(shard)[name]
        with open(self.shard_path(shard), "rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        shard = bisect.bisect_right(self.starts, index) - 1
        key = f"{index:09d}"
        with Image.open(io.BytesIO(self._read(shard, f"{key}.img"))) as file:
            image = file.convert("RGB" if self.channels == 3 else "L")
        label = int(self._read(shard, f"{key}.cls"))
        return image_to_tensor(self.transform(image, index), self.channels), label

