"""A config read from a file is data: no `_target_` anywhere in it can reach code other than arvision's classes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from arvision import pipeline
from arvision.tokenizers import VQTokenizer
from arvision.utils.files import UnreadableFile
from arvision.utils.instantiate import RefusedTarget, instantiate
from tests.conftest import run_crashing_at


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
    with pytest.raises(UnreadableFile, match=r"generator\.pt: refusing to instantiate 'os\.system'"):
        pipeline.load_generator(tmp_path, tokenizer)
    assert not marker.exists()


def test_the_classes_the_configs_name_are_allowed():
    for target in ("arvision.generators.raster.RasterGenerator", "arvision.tokenizers.VQTokenizer",
                   "arvision.data.ImageDataModule", "lightning.pytorch.loggers.CSVLogger",
                   "lightning.pytorch.callbacks.LearningRateMonitor"):
        instantiate({"_target_": target, "_partial_": True})


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_generator_file_is_named_in_one_line(tiny_cfg, tmp_path, capsys):
    from arvision.cli import sample as sample_cli
    from tests.test_pipeline import sample_config

    pipeline.run(tiny_cfg("evaluate=false"), tmp_path / "run")
    _truncate(tmp_path / "run" / "generator.pt")
    tokenizer = pipeline.load_tokenizer(Path(json.loads((tmp_path / "run" / "results.json").read_text())
                                             ["tokenizer_artifact"]))
    with pytest.raises(UnreadableFile, match=r"generator\.pt cannot be read \(.*\): it is truncated, corrupt or not "):
        pipeline.load_generator(tmp_path / "run", tokenizer)
    with pytest.raises(SystemExit):
        sample_cli.main.__wrapped__(sample_config(tmp_path / "run", "num_samples=4"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("arvision:")]
    assert len(errors) == 1 and "generator.pt cannot be read" in errors[0]


def test_a_truncated_checkpoint_stops_the_resume_in_one_line(tiny_cfg, tmp_path, monkeypatch):
    overrides = ("generator.train.max_steps=8", "checkpoint_every=2", "evaluate=false")
    run_crashing_at(monkeypatch, tiny_cfg(*overrides), tmp_path / "run", 3)
    last = tmp_path / "run" / "checkpoints" / "generator" / "last.ckpt"
    _truncate(last.resolve())
    with pytest.raises(UnreadableFile, match=r"step=2\.ckpt cannot be read|last\.ckpt cannot be read"):
        pipeline.run(tiny_cfg(*overrides), tmp_path / "run")


def test_a_generator_file_whose_weights_do_not_fit_is_named_in_one_line(tiny_cfg, tmp_path):
    pipeline.run(tiny_cfg("evaluate=false"), tmp_path / "run")
    blob = torch.load(tmp_path / "run" / "generator.pt", weights_only=True)
    blob["ema"] = {k: v[..., :1] if v.dim() else v for k, v in blob["ema"].items()}  # wrong shapes
    torch.save(blob, tmp_path / "run" / "generator.pt")
    tokenizer = pipeline.load_tokenizer(Path(json.loads((tmp_path / "run" / "results.json").read_text())
                                             ["tokenizer_artifact"]))
    with pytest.raises(UnreadableFile, match=r"generator\.pt: its weights do not fit the RasterGenerator its config "
                                             r"builds \(.*size mismatch") as err:
        pipeline.load_generator(tmp_path / "run", tokenizer)
    assert "\n" not in str(err.value)


def test_a_read_only_run_directory_is_refused_before_any_work(tiny_cfg, tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root writes anywhere: simulate the refusal the file system gives everyone else
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(pipeline.tempfile, "NamedTemporaryFile", refuse)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    monkeypatch.setattr(pipeline, "build_datamodule", lambda cfg: pytest.fail("did work before checking"))
    with pytest.raises(pipeline.ConfigError, match=r"cannot write to the run directory .*run \(Permission denied\); "
                                                   r"choose a writable hydra\.run\.dir"):
        pipeline.run(tiny_cfg(), run_dir)
    run_dir.chmod(0o755)
    assert list(run_dir.iterdir()) == []
