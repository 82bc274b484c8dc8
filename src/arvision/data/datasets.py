"""Image datasets: Fashion-MNIST from idx files, procedural shapes, and a folder of images.

Every dataset yields `(float32 image in [-1, 1] of shape (C, H, W), int label)` and exposes `num_classes`,
`channels` and `image_size` (images are square), so the data module and the models never special-case a source.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

# Where Debian's `dataset-fashion-mnist` package puts the files; a module constant so tests can point it elsewhere.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_FASHION_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08


class DatasetNotFound(FileNotFoundError):
    """The data is not where we looked; the message says how to get it."""


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] → uint8 in [0, 255] (the inverse of the datasets' scaling)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------- Fashion-MNIST


class CorruptDataset(DatasetNotFound):
    """A data file is there but cannot be read (a truncated download); the message names it."""


def _read_idx(path: Path) -> np.ndarray:
    """Parse an unsigned-byte idx file (optionally gzipped): big-endian header, then the raw array."""
    opener = gzip.open if path.suffix == ".gz" else open
    fix = "delete it and fetch the dataset again"
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as err:
        raise CorruptDataset(f"{path} cannot be read ({err}): {fix}") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != _IDX_UBYTE:
        raise CorruptDataset(f"{path} is not an unsigned-byte idx file: {fix}")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise CorruptDataset(f"{path}: its header says shape {shape} but it holds {len(data) - header} bytes "
                             f"(truncated?): {fix}")
    # bytearray makes the array writable, so torch.from_numpy shares it without a warning.
    return np.frombuffer(bytearray(data[header:]), dtype=np.uint8).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    """`<folder>/<stem>[.gz]` or torchvision's `<folder>/FashionMNIST/raw/<stem>[.gz]`, whichever exists first."""
    for directory in (folder, folder / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


def _load_split_from(folder: Path, split: str) -> tuple[Tensor, Tensor] | None:
    prefix = _FASHION_PREFIX[split]
    images_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        return None
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_path} {images.shape} and {labels_path} {labels.shape} do not match")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(
    *, root: str | None, split: str, download: bool = False, download_dir: str = "data"
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as uint8 images (N, 1, 28, 28) and int64 labels; train has 60k images, test 10k.

    Looks in `root` only when it is given (an explicit choice: never another copy instead), else in the Debian
    package's folder, then (only if `download`) fetches it with torchvision into `download_dir`.
    """
    if split not in _FASHION_PREFIX:
        raise ValueError(f"split must be one of {sorted(_FASHION_PREFIX)}, got {split!r}")
    if root is not None:
        found = _load_split_from(Path(root), split)
        if found is None:
            raise DatasetNotFound(f"no Fashion-MNIST {split} files ({_FASHION_PREFIX[split]}-images-idx3-ubyte[.gz] "
                                  f"and -labels-idx1-ubyte[.gz]) in data.root={root}; point data.root at the folder "
                                  f"that holds them, or drop data.root to use the installed dataset")
        return found
    folders = [SYSTEM_FASHION_MNIST_DIR] + ([Path(download_dir)] if download else [])  # earlier downloads too
    for folder in folders:
        if (found := _load_split_from(folder, split)) is not None:
            return found
    if download and (found := _download_fashion_mnist(Path(download_dir), split)) is not None:
        return found
    looked = ", ".join(str(f) for f in folders)
    raise DatasetNotFound(
        f"Fashion-MNIST {split} split not found (looked in {looked}); get it one of three ways: "
        "`apt-get install dataset-fashion-mnist` (Debian), `data.root=<folder with the *-ubyte[.gz] files>`, "
        "or `data.download=true` where the internet is reachable"
    )


def _download_fashion_mnist(download_dir: Path, split: str) -> tuple[Tensor, Tensor] | None:
    """Fetch with torchvision (imported here: the offline paths must not need it); None when that fails."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(download_dir), train=split == "train", download=True)
    except (OSError, RuntimeError) as err:  # no network, server error, bad checksum
        log.warning("Fashion-MNIST download failed: %s", " ".join(str(err).split()))
        return None
    return _load_split_from(download_dir, split)


class TensorImageDataset(Dataset):
    """A whole dataset held as one uint8 tensor (N, C, H, W), zero-padded by `pad` pixels on every side.

    Padding uses 0, the background of Fashion-MNIST, which becomes -1 after scaling to [-1, 1].
    """

    def __init__(self, images: Tensor, labels: Tensor, *, pad: int = 0, num_classes: int | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be square, got {tuple(images.shape[2:])}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images_uint8 = F.pad(images, (pad, pad, pad, pad), value=0) if pad else images
        self.labels = labels.to(torch.int64)
        self.num_classes = num_classes if num_classes is not None else int(self.labels.max()) + 1
        self.channels = images.shape[1]
        self.image_size = self.images_uint8.shape[-1]

    def __len__(self) -> int:
        return len(self.images_uint8)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images_uint8[index].float() / 127.5 - 1, int(self.labels[index])


# --------------------------------------------------------------------------------------------- procedural shapes

SHAPE_NAMES = (
    "disc", "square", "triangle", "cross", "ring", "horizontal_bar", "vertical_bar", "diamond", "x", "frame"
)


def _shape_mask(name: str, u: Tensor, v: Tensor) -> Tensor:
    """Mask of a shape over coordinates (u, v) relative to its centre, in units of its radius.

    Every shape stays inside the square |u|, |v| <= 1, so a shape placed at least one radius from the border is
    fully in frame.
    """
    au, av = u.abs(), v.abs()
    box = torch.maximum(au, av)  # 1 on the bounding square
    r2 = u**2 + v**2
    match name:
        case "disc":
            return r2 <= 1
        case "square":
            return box <= 0.8
        case "triangle":  # apex up
            return (v <= 0.7) & (au <= (v + 0.9) * 0.6)
        case "cross":
            return (torch.minimum(au, av) <= 0.25) & (box <= 0.9)
        case "ring":
            return (r2 <= 1) & (r2 >= 0.55**2)
        case "horizontal_bar":
            return (av <= 0.3) & (au <= 1)
        case "vertical_bar":
            return (au <= 0.3) & (av <= 1)
        case "diamond":
            return au + av <= 1
        case "x":
            return (torch.minimum((u - v).abs(), (u + v).abs()) <= 0.35) & (box <= 0.8)
        case "frame":
            return (box - 0.7).abs() <= 0.15
    raise ValueError(f"unknown shape {name!r}")


# One colour per class for RGB (each has a bright channel, so no shape vanishes into the black background).
_PALETTE = torch.tensor(
    [
        [1.0, 0.2, 0.2],
        [0.2, 1.0, 0.2],
        [0.25, 0.4, 1.0],
        [1.0, 1.0, 0.2],
        [1.0, 0.2, 1.0],
        [0.2, 1.0, 1.0],
        [1.0, 0.6, 0.1],
        [0.6, 0.3, 1.0],
        [1.0, 1.0, 1.0],
        [1.0, 0.6, 0.7],
    ]
)


class ShapesDataset(Dataset):
    """Procedural class-conditional data: class k is a distinct shape (disc, square, triangle, cross, ...).

    Position, size and intensity are random per sample but fixed by (seed, index), so the dataset needs no files
    and no storage, works at any resolution, and is the same on every machine. Label of index i is i % num_classes.
    Background is -1; with 3 channels each class also has its own colour. DataLoader batches are rendered in one
    vectorised call (`__getitems__`), so shapes cost next to nothing to load.
    """

    def __init__(
        self, *, num_samples: int, image_size: int = 32, channels: int = 1, num_classes: int = 4, seed: int = 0
    ) -> None:
        if not 1 <= num_classes <= len(SHAPE_NAMES):
            raise ValueError(f"num_classes must be in 1..{len(SHAPE_NAMES)}, got {num_classes}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size < 4:
            raise ValueError(f"image_size must be at least 4, got {image_size}")
        self.num_samples = num_samples
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.seed = seed
        self.labels = torch.arange(num_samples) % num_classes
        # numpy fills the array row by row from one stream, so row i depends on (seed, i) only, not on num_samples.
        uniform = torch.from_numpy(np.random.default_rng(seed).random((num_samples, 4), dtype=np.float32))
        self._radius = 0.45 + 0.35 * uniform[:, 0]
        self._centre = (2 * uniform[:, 1:3] - 1) * (1 - self._radius[:, None])  # (x, y), shape fully in frame
        self._intensity = 0.6 + 0.4 * uniform[:, 3]
        self._colours = _PALETTE[:num_classes] if channels == 3 else torch.ones(num_classes, 1)
        centres = (torch.arange(image_size) + 0.5) * (2 / image_size) - 1  # pixel centres in [-1, 1]
        self._y, self._x = torch.meshgrid(centres, centres, indexing="ij")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, int]]:
        """Render several samples at once; DataLoader calls this with a whole batch of indices."""
        if any(not 0 <= i < self.num_samples for i in indices):
            raise IndexError(f"indices out of range for {self.num_samples} samples")
        index = torch.tensor(indices, dtype=torch.int64)
        labels = self.labels[index]
        radius = self._radius[index].view(-1, 1, 1)
        u = (self._x - self._centre[index, 0].view(-1, 1, 1)) / radius
        v = (self._y - self._centre[index, 1].view(-1, 1, 1)) / radius
        mask = torch.zeros(u.shape, dtype=torch.bool)
        for k in labels.unique().tolist():
            rows = (labels == k).nonzero().squeeze(1)  # integer rows: boolean-mask indexing is far slower on CPU
            mask[rows] = _shape_mask(SHAPE_NAMES[k], u[rows], v[rows])
        foreground = 2 * self._intensity[index, None] * self._colours[labels] - 1  # (B, C)
        images = torch.where(mask[:, None], foreground[:, :, None, None], -1.0)
        return list(zip(images.unbind(0), labels.tolist()))


# --------------------------------------------------------------------------------------------- image folder

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM's resize: halve with a box filter while the image is ≥ 2× too big, bicubic to size, centre-crop."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


CROPS = ("center_adm", "random")


def resize_short_side(image: Image.Image, side: int) -> Image.Image:
    """ADM's resize without its crop: box-filter halvings while the short side is ≥ 2× `side`, then bicubic."""
    while min(image.size) >= 2 * side:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = side / min(image.size)
    return image.resize(tuple(max(side, round(x * scale)) for x in image.size), resample=Image.Resampling.BICUBIC)


class PaperCrop:
    """The papers' training pre-processing of one PIL image to `image_size`² (the test split always uses ADM's).

    `center_adm`: guided-diffusion's `center_crop_arr` (LlamaGen, MAR, ACDiT, and VAR's evaluation). `random`: the
    short side resized to `crop_range`·size, then a random square crop (VAR: 1.125 with LANCZOS, FlowAR: 288 px
    bilinear; here ADM's box + bicubic resize). `flip`: a horizontal flip with probability ½.

    Each draw is a pure function of (seed, index): a resumed stage 1 and a re-encoded token cache see exactly the
    crops and flips of an uninterrupted run, with any number of loader workers; an image keeps its crop across
    epochs (the token store's multi-crop encoding is the way to several crops per image).
    """

    def __init__(self, *, image_size: int, crop: str = "center_adm", crop_range: float = 1.125, flip: bool = False,
                 seed: int = 0) -> None:
        if crop not in CROPS:
            raise ValueError(f"data.crop={crop!r}: choose one of {', '.join(CROPS)}")
        if crop_range < 1:
            raise ValueError(f"data.crop_range={crop_range}: must be ≥ 1 (the resized short side over image_size)")
        self.image_size, self.crop, self.crop_range, self.flip, self.seed = image_size, crop, crop_range, flip, seed

    def __call__(self, image: Image.Image, index: int) -> Image.Image:
        draws = torch.rand(3, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + index)).tolist()
        if self.crop == "center_adm":
            image = center_crop_arr(image, self.image_size)
        else:
            image = resize_short_side(image, round(self.crop_range * self.image_size))
            left = int(draws[0] * (image.width - self.image_size + 1))
            top = int(draws[1] * (image.height - self.image_size + 1))
            image = image.crop((left, top, left + self.image_size, top + self.image_size))
        if self.flip and draws[2] < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def image_to_tensor(image: Image.Image, channels: int) -> Tensor:
    """A square PIL image → float (C, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.float32)
    tensor = torch.from_numpy(array.reshape(image.height, image.width, channels))
    return tensor.permute(2, 0, 1) / 127.5 - 1


class ImageFolderDataset(Dataset):
    """Images under `<root>/<class name>/...`; sorted class folder names give the label ids.

    A file that cannot be read is logged once, counted in `skipped`, and replaced by the next readable sample, so
    one bad file never kills a long run. (With DataLoader workers each worker counts its own copy.) `transform`
    is the pre-processing (default: ADM's centre crop, no flip).
    """

    def __init__(self, *, root: str, image_size: int, channels: int = 3, transform: PaperCrop | None = None) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.transform = transform or PaperCrop(image_size=image_size)
        folder = Path(root)
        hint = f"expected image files under <root>/<class name>/, set data.root=<that folder> (root={root!r})"
        if not folder.is_dir():
            raise DatasetNotFound(f"image folder {root!r} does not exist; {hint}")
        self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((folder / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        ]
        if not self.samples:
            raise DatasetNotFound(f"no images found in {root!r}; {hint}")
        self.root = folder
        self.image_size = image_size
        self.channels = channels
        self.num_classes = len(self.classes)
        self.labels = torch.tensor([label for _, label in self.samples])
        self._unreadable: set[int] = set()

    @property
    def skipped(self) -> int:
        """How many files failed to load so far."""
        return len(self._unreadable)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            if i in self._unreadable:
                continue
            image = self._load(i)
            if image is not None:
                return image, self.samples[i][1]
        raise DatasetNotFound(f"none of the {len(self.samples)} image files under {str(self.root)!r} is readable")

    def _load(self, i: int) -> Tensor | None:
        path = self.samples[i][0]
        try:
            with Image.open(path) as file:
                image = file.convert("RGB" if self.channels == 3 else "L")
        except Exception as err:  # PIL raises many types for bad files; any of them means "skip this one"
            self._unreadable.add(i)
            log.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
            return None
        return image_to_tensor(self.transform(image, i), self.channels)
