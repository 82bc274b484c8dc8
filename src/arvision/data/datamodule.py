"""One LightningDataModule for every image source; its keyword arguments are what `configs/data/*.yaml` sets."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from arvision.data.datasets import (
    CROPS,
    ImageFolderDataset,
    PaperCrop,
    ShapesDataset,
    TensorImageDataset,
    load_fashion_mnist,
    to_uint8,
)
from arvision.data.store import AUGMENTS

DATASET_NAMES = ("fashion_mnist", "shapes", "imagefolder", "webdataset")
_FASHION_PAD = 2  # 28 → 32: the tokenizers downsample by powers of two
# Shapes test images use their own seeds, so they never repeat the train images of any nearby seed.
_SHAPES_TEST_SEED_OFFSET = 1_000_000


class ImageDataModule(L.LightningDataModule):
    """Train and test splits of one image dataset, as (images in [-1, 1], int64 labels).

    Training batches come from `arvision.data.tokens.step_loader` (seeded and resumable at any step), sized by
    each stage's `train.batch_size`, with `num_workers` worker processes building them. The validation and
    test loaders serve the test split in `eval_batch_size` batches: these datasets have no separate validation
    split.
    """

    def __init__(
        self,
        *,
        name: str,
        root: str | None = None,
        image_size: int = 32,
        channels: int = 1,
        num_classes: int = 10,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        download: bool = False,
        download_dir: str = "data",
        train_size: int | None = None,
        test_size: int | None = None,
        shapes_train_size: int = 4096,
        shapes_test_size: int = 1024,
        seed: int = 0,
        crop: str = "center_adm",
        crop_range: float = 1.125,
        flip: bool = False,
        cache_dir: str | None = None,
        encode_augment: str = "none",
    ) -> None:
        super().__init__()
        if name not in DATASET_NAMES:
            raise ValueError(f"unknown data.name={name!r}; valid names: {', '.join(DATASET_NAMES)}")
        if name == "fashion_mnist" and (image_size, channels, num_classes) != (32, 1, 10):
            raise ValueError(
                "fashion_mnist is 1-channel, 10 classes, padded 28→32: it needs data.image_size=32 data.channels=1 "
                f"data.num_classes=10 (got {image_size}, {channels}, {num_classes})"
            )
        if name == "imagefolder" and root is None:
            raise ValueError("data.name=imagefolder needs data.root=<folder with one sub-folder per class>")
        if name == "webdataset" and root is None:
            raise ValueError("data.name=webdataset needs data.root=<shard set: a folder, URL or pipe: prefix>")
        if encode_augment not in AUGMENTS:
            raise ValueError(f"data.encode_augment={encode_augment!r}: choose one of {', '.join(AUGMENTS)}")
        if crop not in CROPS:
            raise ValueError(f"data.crop={crop!r}: choose one of {', '.join(CROPS)}")
        if crop_range < 1:
            raise ValueError(f"data.crop_range={crop_range}: must be ≥ 1 (the resized short side over image_size)")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 (load in this process) or a worker count, got {num_workers}")
        self.name = name
        self.root = root
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.download = download
        self.download_dir = download_dir
        self.train_size = train_size
        self.test_size = test_size
        self.shapes_train_size = shapes_train_size
        self.shapes_test_size = shapes_test_size
        self.seed = seed
        self.crop, self.crop_range, self.flip = crop, crop_range, flip
        self.cache_dir = cache_dir  # data=webdataset: where shards from a URL or pipe are fetched to
        self.encode_augment = encode_augment  # views pre-encoded into stage 2's token store (arvision.data.store)
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def prepare_data(self) -> None:
        """Download Fashion-MNIST when asked (Lightning calls this on one process only)."""
        if self.name == "fashion_mnist" and self.download:
            for split in ("train", "test"):
                load_fashion_mnist(root=self.root, split=split, download=True, download_dir=self.download_dir)

    def setup(self, stage: str | None = None) -> None:
        """Build both splits once; later calls return at once."""
        if self.train_set is not None:
            return
        self.train_set = self._build("train", self.train_size)
        self.test_set = self._build("test", self.test_size)

    def _build(self, split: str, size: int | None) -> Dataset:
        if self.name == "fashion_mnist":
            images, labels = load_fashion_mnist(
                root=self.root, split=split, download=self.download, download_dir=self.download_dir
            )
            return TensorImageDataset(images[:size], labels[:size], pad=_FASHION_PAD, num_classes=10)
        if self.name == "shapes":
            full = self.shapes_train_size if split == "train" else self.shapes_test_size
            # Samples depend only on (seed, index), so a smaller dataset is exactly the first `size` samples.
            return ShapesDataset(
                num_samples=min(full, size) if size is not None else full,
                image_size=self.image_size,
                channels=self.channels,
                num_classes=self.num_classes,
                seed=self.seed if split == "train" else self.seed + _SHAPES_TEST_SEED_OFFSET,
            )
        if self.name == "webdataset":
            return self._build_shards(split, size)
        return self._build_imagefolder(split, size)

    def _transform(self, split: str) -> PaperCrop | None:
        """The papers' augmentation on the training split only: the test split (metric references) is ADM's crop."""
        if split != "train":
            return None
        return PaperCrop(image_size=self.image_size, crop=self.crop, crop_range=self.crop_range, flip=self.flip,
                         seed=self.seed)

    def _build_shards(self, split: str, size: int | None) -> Dataset:
        """`<root>/train` and `<root>/val` (or `test`) of a shard set written by arvision-shards."""
        from arvision.data.streaming import ShardedImages  # the optional extra only when asked for

        assert self.root is not None  # checked in __init__
        subs = ["train"] if split == "train" else ["val", "test", "train"]
        local = "://" not in self.root and not self.root.startswith("pipe:")
        sub = next((s for s in subs if not local or Path(self.root, s, "index.json").is_file()), subs[0])
        cache = None if self.cache_dir is None else str(Path(self.cache_dir, sub))
        dataset = ShardedImages(url=f"{self.root.rstrip('/')}/{sub}", image_size=self.image_size,
                                channels=self.channels, cache_dir=cache, transform=self._transform(split))
        return self._checked_subset(dataset, f"{self.root}/{sub}", size)

    def _checked_subset(self, dataset, where: str, size: int | None) -> Dataset:
        if dataset.num_classes != self.num_classes:
            raise ValueError(f"{where} has {dataset.num_classes} classes but data.num_classes={self.num_classes}")
        if size is None or size >= len(dataset):
            return dataset
        # Files are ordered class by class, so "the first N" would be one class: take a fixed random N instead.
        generator = torch.Generator().manual_seed(self.seed)
        return Subset(dataset, torch.randperm(len(dataset), generator=generator)[:size].tolist())

    def _build_imagefolder(self, split: str, size: int | None) -> Dataset:
        """`<root>/train` and `<root>/val` (or `test`) when present (ImageNet layout), else `<root>` for both.

        Without a val/test folder the test split is the train images (metrics then compare against those).
        """
        assert self.root is not None  # checked in __init__
        subs = ["train"] if split == "train" else ["val", "test", "train"]
        folder = next((Path(self.root, sub) for sub in subs if Path(self.root, sub).is_dir()), Path(self.root))
        dataset = ImageFolderDataset(root=str(folder), image_size=self.image_size, channels=self.channels,
                                     transform=self._transform(split))
        return self._checked_subset(dataset, str(folder), size)

    def _eval_loader(self) -> DataLoader:
        if self.test_set is None:
            raise RuntimeError("call setup() before asking ImageDataModule for a dataloader")
        return DataLoader(self.test_set, batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def reference_images(self, n: int) -> tuple[Tensor, Tensor]:
        """The first `n` test images as uint8 (n, C, H, W) at the final size, with their labels (metric references)."""
        self.setup()
        assert self.test_set is not None
        if not 1 <= n <= len(self.test_set):
            raise ValueError(f"asked for {n} reference images; the test split has {len(self.test_set)}")
        if isinstance(self.test_set, TensorImageDataset):
            return self.test_set.images_uint8[:n].clone(), self.test_set.labels[:n].clone()  # callers may edit them
        loader = DataLoader(
            Subset(self.test_set, range(n)), batch_size=self.eval_batch_size, num_workers=self.num_workers
        )
        images, labels = zip(*loader)
        return to_uint8(torch.cat(images)), torch.cat(labels)
