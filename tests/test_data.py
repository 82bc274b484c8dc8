"""arvision.data: Fashion-MNIST loading, procedural shapes, image folders and the data module."""

from __future__ import annotations

import gzip
import logging
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from arvision.data import (
    DatasetNotFound,
    ImageDataModule,
    ImageFolderDataset,
    ShapesDataset,
    TensorImageDataset,
    load_fashion_mnist,
)
from arvision.data import datasets as datasets_module
from arvision.data.datasets import CorruptDataset
from arvision.data.tokens import ImageBatches, step_loader
from tests.conftest import FASHION_MNIST, needs_fashion_mnist

SYSTEM_FASHION = FASHION_MNIST


@pytest.fixture
def needs_fashion() -> None:
    needs_fashion_mnist()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """These tensors are tiny: intra-op threads only add overhead, and stall badly on busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte idx file, gzipped when the name ends in .gz."""
    payload = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_fake_fashion(folder: Path, *, n_train: int = 7, n_test: int = 5, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10)


# --------------------------------------------------------------------------------------------- Fashion-MNIST


def test_missing_demo_data_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path) -> None:
    import tests.conftest as conftest

    monkeypatch.setattr(conftest, "FASHION_MNIST", tmp_path / "absent")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI runs the tests on the data the demo uses"):
        conftest.needs_fashion_mnist()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="make data"):
        conftest.needs_fashion_mnist()


@pytest.mark.parametrize("damage", ["truncated gzip", "truncated array", "not idx"])
def test_a_damaged_fashion_mnist_file_is_named_in_one_line(damage, tmp_path) -> None:
    write_fake_fashion(tmp_path, n_train=30, n_test=10)
    path = next(tmp_path.glob("train-images-idx3-ubyte*"))
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if damage == "truncated gzip":
        data = gzip.compress(raw)
        data = data[: len(data) // 2]
    elif damage == "truncated array":
        data = gzip.compress(raw[: len(raw) - 100])
    else:
        data = gzip.compress(b"PNG not an idx file")
    path.unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(data)
    with pytest.raises(CorruptDataset, match=r"train-images-idx3-ubyte\.gz.*delete it and fetch the dataset again") \
            as err:
        load_fashion_mnist(root=str(tmp_path), split="train")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """The installed dataset, or else files of the same format (padding and loaders do not need the real pixels)."""
    if SYSTEM_FASHION.is_dir():
        return None
    folder = tmp_path_factory.mktemp("fashion")
    write_fake_fashion(folder, n_train=130, n_test=40)
    return str(folder)


@pytest.fixture(scope="module")
def fashion_raw(fashion_root: str | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {split: load_fashion_mnist(root=fashion_root, split=split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def fashion(fashion_root: str | None) -> ImageDataModule:
    dm = ImageDataModule(name="fashion_mnist", root=fashion_root, eval_batch_size=32)
    dm.setup()
    return dm


def test_fashion_mnist_splits_as_published(needs_fashion: None, fashion_raw: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = fashion_raw[split]
        assert images.shape == (n, 1, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert labels.min() == 0 and labels.max() == 9
        assert torch.bincount(labels).tolist() == [n // 10] * 10  # Fashion-MNIST is exactly balanced


def test_fashion_mnist_padded_to_32_with_background(
    fashion: ImageDataModule, fashion_raw: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    for ds, split in ((fashion.train_set, "train"), (fashion.test_set, "test")):
        assert isinstance(ds, TensorImageDataset)
        assert (ds.num_classes, ds.channels, ds.image_size) == (10, 1, 32)
        raw_images, raw_labels = fashion_raw[split]
        assert ds.images_uint8.shape == (len(raw_images), 1, 32, 32)
        assert torch.equal(ds.images_uint8[:, :, 2:30, 2:30], raw_images) and torch.equal(ds.labels, raw_labels)
    image, label = fashion.train_set[123]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (image[:, border] == -1).all()
    assert image.min() >= -1 and image.max() <= 1 and image.max() > 0  # real content inside the border
    assert fashion.train_set.images_uint8[:, :, border].eq(0).all()


def test_fashion_mnist_loaders_and_reference(fashion: ImageDataModule) -> None:
    x, y = next(iter(step_loader(ImageBatches(fashion.train_set), batch_size=16, num_steps=1, seed=0)))
    assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    x, y = next(iter(fashion.test_dataloader()))
    assert x.shape == (32, 1, 32, 32)
    ref, ref_labels = fashion.reference_images(40)
    assert ref.shape == (40, 1, 32, 32) and ref.dtype == torch.uint8
    # The reference set is the first test images, unshuffled, matching the test loader.
    assert torch.equal(ref[:32].float() / 127.5 - 1, x) and torch.equal(ref_labels[:32], y)


@pytest.mark.parametrize("layout", ["flat_gz", "flat_raw", "torchvision"])
def test_fashion_mnist_from_root(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    write_fake_fashion(folder, gz=layout != "flat_raw")
    images, labels = load_fashion_mnist(root=str(tmp_path), split="train")
    assert images.shape == (7, 1, 28, 28) and labels.tolist() == list(range(7))
    images, labels = load_fashion_mnist(root=str(tmp_path), split="test")
    assert images.shape == (5, 1, 28, 28) and labels.dtype == torch.int64


def test_fashion_mnist_missing_names_three_ways(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_module, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "not_installed")
    with pytest.raises(DatasetNotFound) as info:
        load_fashion_mnist(root=None, split="train")
    message = str(info.value)
    assert "\n" not in message
    for way in ("apt-get install dataset-fashion-mnist", "data.root=", "data.download=true"):
        assert way in message
    assert isinstance(info.value, FileNotFoundError)


def test_fashion_mnist_root_is_searched_before_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "system"
    write_fake_fashion(system, n_train=3)
    write_fake_fashion(tmp_path / "mine", n_train=4)
    monkeypatch.setattr(datasets_module, "SYSTEM_FASHION_MNIST_DIR", system)
    assert len(load_fashion_mnist(root=str(tmp_path / "mine"), split="train")[0]) == 4
    assert len(load_fashion_mnist(root=None, split="train")[0]) == 3


def test_a_data_root_without_the_files_is_an_error_not_a_fallback(tmp_path: Path, monkeypatch) -> None:
    write_fake_fashion(tmp_path / "system", n_train=3)
    monkeypatch.setattr(datasets_module, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "system")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match=r"no Fashion-MNIST train files .* in data\.root=.*empty; point") as err:
        load_fashion_mnist(root=str(tmp_path / "empty"), split="train")
    assert "\n" not in str(err.value)


def test_corrupt_idx_file_is_a_clear_error(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + b"\0" * 20))
    with pytest.raises(CorruptDataset, match="train-images-idx3-ubyte.gz: its header says shape"):
        load_fashion_mnist(root=str(tmp_path), split="train")


def test_fashion_datamodule_sizes_from_root(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path, n_train=20, n_test=9)
    dm = ImageDataModule(name="fashion_mnist", root=str(tmp_path), eval_batch_size=4, train_size=10)
    dm.setup()
    train_set = dm.train_set
    dm.setup()  # idempotent: the same objects, nothing rebuilt
    assert dm.train_set is train_set
    assert (len(dm.train_set), len(dm.test_set)) == (10, 9)
    assert sum(len(y) for _, y in dm.val_dataloader()) == 9
    raw, _ = load_fashion_mnist(root=str(tmp_path), split="train")
    assert torch.equal(dm.train_set.images_uint8[:, :, 2:30, 2:30], raw[:10])  # the first N, in order


def test_tensor_dataset_scaling() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    ds = TensorImageDataset(images, torch.tensor([0, 1]), pad=1)
    assert ds.images_uint8.shape == (2, 1, 4, 4) and ds.image_size == 4 and ds.num_classes == 2
    assert ds[0][0].unique().tolist() == [-1.0]
    white = ds[1][0]
    assert white[0, 1:3, 1:3].eq(1).all() and white[0, 0].eq(-1).all()


# --------------------------------------------------------------------------------------------- shapes


def test_shapes_deterministic_per_seed_and_index() -> None:
    a = ShapesDataset(num_samples=50, seed=3)
    b = ShapesDataset(num_samples=10, seed=3)  # size does not change the samples
    c = ShapesDataset(num_samples=50, seed=4)
    assert torch.equal(a[7][0], b[7][0]) and a[7][1] == b[7][1]
    assert torch.equal(a[7][0], a[7][0])  # rendered twice: nothing carried over between calls
    assert not torch.equal(a[7][0], c[7][0])
    assert not torch.equal(a[7][0], a[11][0])  # same class (7 % 4 == 11 % 4), different sample
    # A DataLoader batch (rendered by __getitems__) equals the samples rendered one at a time.
    images, labels = next(iter(DataLoader(a, batch_size=6)))
    assert torch.equal(images, torch.stack([a[i][0] for i in range(6)])) and labels.tolist() == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize(("image_size", "channels"), [(16, 1), (32, 3), (64, 1), (64, 3)])
def test_shapes_classes_are_distinct(image_size: int, channels: int) -> None:
    ds = ShapesDataset(num_samples=300, image_size=image_size, channels=channels, num_classes=10)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.tensor([ds[i][1] for i in range(len(ds))])
    assert images.shape == (300, channels, image_size, image_size)
    assert torch.equal(labels, torch.arange(300) % 10) and torch.equal(ds.labels, labels)
    assert torch.bincount(labels).tolist() == [30] * 10
    means = torch.stack([images[labels == k].mean(0) for k in range(10)]).flatten(1)
    distances = torch.cdist(means, means) + torch.eye(10) * 1e9
    # Mean images of two classes differ clearly (0.5 on a few pixels would already be ~1 in L2).
    assert distances.min() > 1.0
    # Each sample shows a shape: some foreground, mostly background.
    foreground = (images > -1).any(1).float().mean((1, 2))
    assert foreground.min() > 0.01 and foreground.max() < 0.7


def test_shapes_rgb_colour_depends_on_class() -> None:
    ds = ShapesDataset(num_samples=2, channels=3, num_classes=2)
    colours = [ds[i][0][:, ds[i][0].max(0).values > -1].mean(1) for i in range(2)]
    assert not torch.allclose(colours[0] / colours[0].norm(), colours[1] / colours[1].norm(), atol=0.05)


@settings(max_examples=25, deadline=None)
@given(
    image_size=st.integers(4, 80),
    channels=st.sampled_from([1, 3]),
    num_classes=st.integers(1, 10),
    seed=st.integers(0, 2**31),
    index=st.integers(0, 999),
)
def test_shapes_any_size_in_range(image_size: int, channels: int, num_classes: int, seed: int, index: int) -> None:
    ds = ShapesDataset(num_samples=1000, image_size=image_size, channels=channels, num_classes=num_classes, seed=seed)
    image, label = ds[index]
    assert image.shape == (channels, image_size, image_size) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert label == index % num_classes
    if image_size >= 16:  # below that a thin bar may fall between pixel centres
        assert image.gt(-1).any() and image.eq(-1).any()


def test_shapes_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        ShapesDataset(num_samples=1, num_classes=11)
    with pytest.raises(ValueError, match="channels"):
        ShapesDataset(num_samples=1, channels=2)
    with pytest.raises(IndexError):
        ShapesDataset(num_samples=3)[3]


def test_shapes_datamodule() -> None:
    dm = ImageDataModule(
        name="shapes", image_size=16, channels=3, num_classes=4, eval_batch_size=16,
        shapes_train_size=64, shapes_test_size=20, test_size=12,
    )
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set)) == (64, 12)
    x, y = next(iter(step_loader(ImageBatches(dm.train_set), batch_size=8, num_steps=8, seed=0)))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (12, 3, 16, 16)
    ref, ref_labels = dm.reference_images(12)
    assert ref.dtype == torch.uint8 and ref.shape == (12, 3, 16, 16)
    assert torch.equal(ref_labels, y)
    assert (ref.float() / 127.5 - 1 - x).abs().max() <= 1 / 255  # quantised, otherwise the same images
    # Test images are not copies of the train images.
    assert not any(torch.equal(dm.test_set[i][0], dm.train_set[i][0]) for i in range(12))
    with pytest.raises(ValueError, match="reference images"):
        dm.reference_images(13)


# --------------------------------------------------------------------------------------------- image folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "b_cat").mkdir(parents=True)
    (root / "a_dog").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "a_dog" / "red.png")
    Image.new("L", (20, 20), 255).save(root / "a_dog" / "white.png")
    (root / "a_dog" / "broken.png").write_bytes(b"not a png at all")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(root / "b_cat" / "blue.jpg")
    (root / "b_cat" / "notes.txt").write_text("not an image, ignored")
    return root


def test_imagefolder_skips_corrupt_files(image_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = ImageFolderDataset(root=str(image_folder), image_size=16, channels=3)
    assert ds.classes == ["a_dog", "b_cat"] and ds.num_classes == 2
    assert len(ds) == 4 and ds.skipped == 0  # broken.png is found, not yet read
    with caplog.at_level(logging.WARNING, logger="arvision.data.datasets"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 1
    assert any("broken.png" in record.getMessage() for record in caplog.records)
    names = [path.name for path, _ in ds.samples]
    broken = names.index("broken.png")
    # The broken file is replaced by the next readable sample, with that sample's label.
    assert torch.equal(items[broken][0], items[broken + 1][0]) and items[broken][1] == items[broken + 1][1]
    by_name = dict(zip(names, items))
    assert by_name["red.png"][1] == 0 and by_name["blue.jpg"][1] == 1
    for image, _ in items:
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
    red = by_name["red.png"][0]
    assert torch.allclose(red[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)
    ds[broken]  # a known bad file is not counted twice
    assert ds.skipped == 1


def test_imagefolder_grayscale(image_folder: Path) -> None:
    ds = ImageFolderDataset(root=str(image_folder), image_size=8, channels=1)
    image, _ = ds[[path.name for path, _ in ds.samples].index("white.png")]
    assert image.shape == (1, 8, 8) and torch.allclose(image, torch.ones(1, 8, 8))


def test_imagefolder_missing_or_empty_or_unreadable(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="data.root"):
        ImageFolderDataset(root=str(tmp_path / "nowhere"), image_size=8)
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(DatasetNotFound, match="no images"):
        ImageFolderDataset(root=str(tmp_path / "empty"), image_size=8)
    (tmp_path / "empty" / "class_a" / "x.png").write_bytes(b"garbage")
    ds = ImageFolderDataset(root=str(tmp_path / "empty"), image_size=8)
    with pytest.raises(DatasetNotFound, match="readable"):
        ds[0]


def test_imagefolder_datamodule_with_split_folders(tmp_path: Path) -> None:
    for split, n in (("train", 6), ("val", 2)):
        for name in ("x", "y"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), (i * 20, 0, 0)).save(tmp_path / split / name / f"{i}.png")
    dm = ImageDataModule(
        name="imagefolder", root=str(tmp_path), image_size=8, channels=3, num_classes=2,
        eval_batch_size=3, train_size=8,
    )
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set)) == (8, 4)
    assert {dm.train_set[i][1] for i in range(8)} == {0, 1}  # a subset with both classes, not the first class
    x, y = next(iter(step_loader(ImageBatches(dm.train_set), batch_size=4, num_steps=1, seed=0)))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.int64
    ref, labels = dm.reference_images(4)
    assert ref.shape == (4, 3, 8, 8) and ref.dtype == torch.uint8 and labels.tolist() == [0, 0, 1, 1]
    wrong = ImageDataModule(name="imagefolder", root=str(tmp_path), image_size=8, channels=3, num_classes=5)
    with pytest.raises(ValueError, match="num_classes"):
        wrong.setup()


# --------------------------------------------------------------------------------------------- data module


def test_datamodule_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="fashion_mnist, shapes, imagefolder"):
        ImageDataModule(name="cifar100")
    with pytest.raises(ValueError, match="image_size=32"):
        ImageDataModule(name="fashion_mnist", image_size=64)
    with pytest.raises(ValueError, match="channels=1"):
        ImageDataModule(name="fashion_mnist", channels=3)
    with pytest.raises(ValueError, match="data.root"):
        ImageDataModule(name="imagefolder")
    with pytest.raises(ValueError, match="data.num_workers"):
        ImageDataModule(name="shapes", num_workers=-1)
    dm = ImageDataModule(name="shapes", num_classes=4, shapes_train_size=4096, train_size=32)
    dm.setup()
    with pytest.raises(ValueError, match="smaller than one global batch"):
        next(iter(step_loader(ImageBatches(dm.train_set), batch_size=64, num_steps=1, seed=0)))


def test_stage1_image_batches_in_worker_processes_equal_in_process_and_resume_exactly() -> None:
    """data.num_workers moves batch building into worker processes; the seeded step schedule stays the same, and a
    resumed loader (the sampler's start_step) continues with exactly the batches the full run had there."""
    images = ImageBatches(ShapesDataset(num_samples=24, image_size=8, num_classes=4, seed=5))
    in_process = list(step_loader(images, batch_size=5, num_steps=9, seed=3))  # 4 batches an epoch: 3 epochs
    workers = step_loader(images, batch_size=5, num_steps=9, seed=3, num_workers=2)
    assert workers.num_workers == 2
    for (x, y), (x_ref, y_ref) in zip(list(workers), in_process, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    resumed = step_loader(images, batch_size=5, num_steps=9, seed=3, num_workers=2)
    resumed.sampler.start_step = 6
    for (x, y), (x_ref, y_ref) in zip(list(resumed), in_process[6:], strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert not any(torch.equal(in_process[0][0], x) for x, _ in in_process[1:])  # the batches differ at all


def test_datamodule_eval_loaders_serve_the_test_split_in_order() -> None:
    dm = ImageDataModule(name="shapes", num_classes=4, eval_batch_size=5, num_workers=2, shapes_test_size=12)
    dm.setup()
    loader = dm.test_dataloader()  # not iterated: no worker processes are started
    assert loader.num_workers == 2 and loader.batch_size == 5 and not loader.drop_last
    assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)
