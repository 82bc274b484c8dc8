"""A config read from a file is data: no `_target_` anywhere in it can reach code other than arvision's classes."""

from __future__ import annotations

import pytest
import torch

from arvision import pipeline
from arvision.tokenizers import VQTokenizer
from arvision.utils.instantiate import RefusedTarget, instantiate


def touch(path) -> dict:
    """A config that, if instantiated by plain Hydra, runs a shell command creating `path`."""
    return {"_target_": "os.system", "_args_": [f"touch {path}"]}


@pytest.mark.parametrize("route", [
    "top level", "nested in a list", "nested in a dict in a list", "through an arvision module's import",
    "torch.load with weights_only off", "torch.load reached through arvision",
])
def test_crafted_configs_are_refused_and_run_nothing(route, tmp_path):
    marker = tmp_path / "ran"
    evil = touch(marker)
    cfg = {
        "top level": evil,
        "nested in a list": {"_target_": "arvision.data.ImageDataModule", "name": "x", "extra": [evil]},
        "nested in a dict in a list": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": [{"a": evil}]},
        "through an arvision module's import": {"_target_": "arvision.cli.common.os.system",
                                                "_args_": [f"touch {marker}"]},
        "torch.load with weights_only off": {"_target_": "torch.load", "f": str(tmp_path / "x.pt"),
                                             "weights_only": False},
        "torch.load reached through arvision": {"_target_": "arvision.pipeline.torch.load",
                                                "f": str(tmp_path / "x.pt"), "weights_only": False},
    }[route]
    with pytest.raises(RefusedTarget, match="refusing to instantiate") as err:
        instantiate(cfg)
    assert "\n" not in str(err.value) and not marker.exists()


def test_a_crafted_generator_checkpoint_is_refused_before_anything_runs(tmp_path):
    tokenizer = VQTokenizer(image_size=16, image_channels=1, ch=8, ch_mult=(1, 2), z_channels=8, vocab_size=16)
    marker = tmp_path / "ran"
    torch.save({"config": {"_target_": "arvision.generators.raster.RasterGenerator", "_partial_": True,
                           "depth_mode": [touch(marker)]}, "num_classes": 10, "ema": {}, "generator": {}},
               tmp_path / "generator.pt")
    with pytest.raises(RefusedTarget, match="'os.system'"):
        pipeline.load_generator(tmp_path, tokenizer)
    assert not marker.exists()


def test_the_classes_the_configs_name_are_allowed():
    for target in ("arvision.generators.raster.RasterGenerator", "arvision.tokenizers.VQTokenizer",
                   "arvision.data.ImageDataModule", "lightning.pytorch.loggers.CSVLogger",
                   "lightning.pytorch.callbacks.LearningRateMonitor"):
        instantiate({"_target_": target, "_partial_": True})
