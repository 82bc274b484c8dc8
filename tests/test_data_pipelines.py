"""Image pipelines at ImageNet's shape, in small: the papers' pre-processing (ADM centre crop, random crop, flip),
worker processes, and WebDataset shards (arvision-shards → data=webdataset) from a folder and through a pipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arvision import pipeline
from arvision.data.datamodule import ImageDataModule
from arvision.data.datasets import ImageFolderDataset, PaperCrop, center_crop_arr, image_to_tensor
from arvision.data.tokens import ImageBatches, step_loader
from tests.conftest import compose_train

CLASSES = ("n01440764", "n01443537", "n01484850")


def image_folder(root: Path, *, train: int = 8, val: int = 3) -> Path:
    """ImageNet's layout in small: train/ and val/ with class folders of JPEGs and PNGs of uneven sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(36, 70, 2)
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / (f"{i}.JPEG" if i % 2 else f"{i}.png"))
    return root


def picture(w: int = 64, h: int = 48) -> Image.Image:
    """A left-to-right ramp: crops and flips are visible in the pixel values."""
    ramp = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
    return Image.fromarray(np.stack([ramp, ramp[::-1], np.full_like(ramp, 7)], axis=-1))


def test_center_adm_is_adms_center_crop_and_draws_nothing():
    crop = PaperCrop(image_size=32)
    assert np.array_equal(np.asarray(crop(picture(), 0)), np.asarray(center_crop_arr(picture(), 32)))
    assert np.array_equal(np.asarray(crop(picture(), 0)), np.asarray(crop(picture(), 5)))


def test_random_crop_and_flip_are_a_pure_function_of_seed_and_index():
    crop = PaperCrop(image_size=32, crop="random", crop_range=1.5, flip=True, seed=3)
    views = [np.asarray(crop(picture(), i)) for i in range(12)]
    assert all(v.shape == (32, 32, 3) for v in views)
    assert np.array_equal(views[4], np.asarray(crop(picture(), 4)))  # the same image for the same index
    assert len({v.tobytes() for v in views}) > 6  # different crops (and flips) for different indices
    other_seed = PaperCrop(image_size=32, crop="random", crop_range=1.5, flip=True, seed=4)
    assert not all(np.array_equal(v, np.asarray(other_seed(picture(), i))) for i, v in enumerate(views))
    # The ramp rises left to right; a flipped view falls. Both occur.
    slopes = {bool(v[0, -1, 0] > v[0, 0, 0]) for v in views}
    assert slopes == {True, False}


def test_flip_mirrors_the_same_crop():
    plain = PaperCrop(image_size=32, flip=False)
    flipped = PaperCrop(image_size=32, flip=True, seed=0)
    index = next(i for i in range(20) if not np.array_equal(np.asarray(flipped(picture(), i)),
                                                            np.asarray(plain(picture(), i))))
    assert np.array_equal(np.asarray(flipped(picture(), index)), np.asarray(plain(picture(), index))[:, ::-1])


@pytest.mark.parametrize("setting, message", [({"crop": "ten"}, "data.crop='ten': choose one of center_adm, random"),
                                              ({"crop_range": 0.9}, "data.crop_range=0.9: must be ≥ 1")])
def test_bad_crop_settings_are_named(setting, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        ImageDataModule(name="imagefolder", root=str(tmp_path), num_classes=3, **setting)


def test_train_split_is_augmented_and_the_test_split_is_adms_crop(tmp_path):
    root = image_folder(tmp_path / "imagenet")
    dm = ImageDataModule(name="imagefolder", root=str(root), image_size=32, channels=3, num_classes=3,
                         crop="random", crop_range=1.25, flip=True)
    dm.setup()
    plain = ImageFolderDataset(root=str(root / "train"), image_size=32)
    assert not all(torch.equal(dm.train_set[i][0], plain[i][0]) for i in range(len(plain)))
    val = ImageFolderDataset(root=str(root / "val"), image_size=32)
    assert all(torch.equal(dm.test_set[i][0], val[i][0]) for i in range(len(val)))


def test_worker_processes_serve_the_same_augmented_batches(tmp_path):
    root = image_folder(tmp_path / "imagenet")
    dm = ImageDataModule(name="imagefolder", root=str(root), image_size=32, channels=3, num_classes=3,
                         crop="random", flip=True)
    dm.setup()
    batches = {workers: list(step_loader(ImageBatches(dm.train_set), batch_size=6, num_steps=5, seed=0,
                                         num_workers=workers)) for workers in (0, 2)}
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


# --------------------------------------------------------------------------------------------- WebDataset shards
def shard_set(tmp_path: Path) -> tuple[Path, Path]:
    pytest.importorskip("webdataset")  # the optional extra (make setup installs it)
    from arvision.data.streaming import write_shards

    root = image_folder(tmp_path / "imagenet")
    out = tmp_path / "shards"
    assert write_shards(root, out, shard_size=5) == {"train": 24, "val": 9}
    return root, out


def test_shards_are_plain_webdataset_tar_files_with_the_original_bytes(tmp_path):
    import webdataset as wds

    root, out = shard_set(tmp_path)
    assert sorted(p.name for p in (out / "train").iterdir()) == \
        ["index.json"] + [f"shard-{k:06d}.tar" for k in range(5)]
    listing = ImageFolderDataset(root=str(root / "train"), image_size=1).samples
    urls = [str(out / "train" / f"shard-{k:06d}.tar") for k in range(5)]
    read = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(read) == len(listing)
    for sample, (path, label) in zip(read, listing):
        field = "jpg" if path.suffix == ".JPEG" else "png"
        assert sample[field] == path.read_bytes() and int(sample["cls"]) == label


@pytest.mark.parametrize("through_pipe", [False, True], ids=["folder", "pipe"])
def test_sharded_images_serve_what_the_image_folder_serves(through_pipe, tmp_path):
    from arvision.data.streaming import ShardedImages

    root, out = shard_set(tmp_path)
    crop = PaperCrop(image_size=32, crop="random", crop_range=1.25, flip=True, seed=1)
    url = f"pipe:cat {out}/train" if through_pipe else str(out / "train")
    cache = tmp_path / "cache"
    shards = ShardedImages(url=url, image_size=32, cache_dir=str(cache) if through_pipe else None, transform=crop)
    folder = ImageFolderDataset(root=str(root / "train"), image_size=32, transform=crop)
    assert (len(shards), shards.classes, shards.num_classes) == (24, list(CLASSES), 3)
    for i in (0, 4, 5, 13, 23):  # first, last of a shard, first of the next, the last image
        image, label = shards[i]
        assert torch.equal(image, folder[i][0]) and label == folder[i][1]
    fetched = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert fetched == (["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000004.tar"]
                       if through_pipe else [])  # whole shards, fetched once, no temporary file left
    with pytest.raises(IndexError):
        shards[24]


@pytest.mark.slow
def test_a_tiny_run_trains_from_shards_through_a_pipe(tmp_path):
    _, out = shard_set(tmp_path)
    cfg = compose_train(["debug=tiny", "data=webdataset", f"data.root=pipe:cat {out}", "data.num_classes=3",
                         "data.image_size=32", "data.crop=random", "data.num_workers=2", "evaluate=false",
                         "logger=none"], tmp_path)
    results = pipeline.run(cfg, tmp_path / "run")
    assert results["data"] == "webdataset" and (tmp_path / "run" / "generator.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "data" / "shards" / "train").iterdir())[0] == "shard-000000.tar"


def test_arvision_shards_writes_once_and_names_bad_input_in_one_line(tmp_path, capsys):
    pytest.importorskip("webdataset")
    from arvision.cli.shards import main

    root = image_folder(tmp_path / "imagenet", train=2, val=1)
    args = [str(root), str(tmp_path / "out"), "--shard-size", "4"]
    main(args)
    assert "images per split: {'train': 6, 'val': 3}" in capsys.readouterr().out
    for argv, message in ((args, "index.json exists"), ([str(tmp_path / "nothing"), str(tmp_path / "o2")],
                                                         "does not exist")):
        with pytest.raises(SystemExit) as exit_status:
            main(argv)
        err = capsys.readouterr().err
        assert exit_status.value.code == 2 and err.startswith("arvision: error: ") and message in err
        assert len(err.strip().splitlines()) == 1


def test_a_shard_root_without_an_index_is_named(tmp_path):
    pytest.importorskip("webdataset")
    from arvision.data import DatasetNotFound
    from arvision.data.streaming import ShardedImages

    with pytest.raises(DatasetNotFound, match="no index.json in .*: not a finished shard set; write one with"):
        ShardedImages(url=str(tmp_path), image_size=32)
    assert image_to_tensor(picture(32, 32), 3).shape == (3, 32, 32)
