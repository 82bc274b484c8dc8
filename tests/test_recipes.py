"""The papers' ImageNet recipes (conf/experiment/imagenet/*): each composes to its published numbers, and runs end to
end at debug=tiny on a small local image folder (two here, every one under -m slow)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from arvision import pipeline
from arvision.cli.common import config_dir
from arvision.recipes import recipe_notes
from tests.conftest import compose_train
from tests.test_configs import unread_keys

RECIPES = sorted(p.stem for p in (Path(config_dir()) / "experiment" / "imagenet").glob("*.yaml"))
IMAGENET_TRAIN = 1_281_167


def test_every_paper_recipe_is_there():
    assert RECIPES == ["acdit_b", "flowar_s", "llamagen_gpt_b", "llamagen_gpt_l", "llamagen_gpt_xl", "mar_b",
                       "var_d16", "var_d20", "var_d24", "var_d30"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_to_its_published_batch_schedule_and_steps(recipe, tmp_path):
    cfg = pipeline.finalize_config(compose_train([f"experiment=imagenet/{recipe}", "data.root=/data"], tmp_path))
    pipeline.check_settings(cfg)
    paper, train, trainer = cfg.recipe, cfg.generator.train, cfg.trainer
    assert cfg.task_name == f"imagenet_{recipe}" and paper.name == recipe
    assert (cfg.data.name, cfg.data.image_size, cfg.data.num_classes) == ("imagefolder", 256, 1000)
    # train.batch_size is the global batch of a step; the GPUs split it (devices × nodes, the count the paper used).
    assert train.batch_size == paper.global_batch and train.batch_size % (trainer.devices * trainer.num_nodes) == 0
    assert trainer.devices * trainer.num_nodes == paper.gpus and trainer.accelerator == "gpu"
    blocks = {"recipe", "data", "trainer", "tokenizer", "generator", "metrics", "official", "checkpoint_every"}
    assert [key for key in unread_keys(cfg) if key.split(" ")[0].split(".")[0] in blocks] == []  # what it sets
    # The run logs where it departs from the paper: nowhere (schedules, weight decay, EMA and TF32 included).
    assert recipe_notes(cfg, world=trainer.devices * trainer.num_nodes) == []
    # Epochs → steps: whole global batches per epoch (the step sampler's), the GPU preset's 8× scale undone.
    assert paper.images == IMAGENET_TRAIN and paper.steps_per_epoch == IMAGENET_TRAIN // paper.global_batch
    if recipe != "acdit_b":  # ACDiT's paper states 1.2M iterations; its epochs are derived from them
        assert train.max_steps == paper.epochs * paper.steps_per_epoch
    assert train.warmup_steps == paper.warmup_epochs * paper.steps_per_epoch
    assert train.lr == paper.peak_lr and train.ema_decay == paper.ema_decay
    assert cfg.tokenizer.artifact is None and cfg.metrics.num_samples == 50_000


def test_recipe_values_are_the_papers():
    """A few values straight from the sources, so an edit that breaks the arithmetic above in both places fails."""
    def compose(recipe: str):
        return compose_train([f"experiment=imagenet/{recipe}", "data.root=/data"], Path("/nonexistent"))
    d16, d30 = compose("var_d16"), compose("var_d30")
    assert (d16.recipe.global_batch, d16.recipe.epochs, d16.generator.train.lr) == (768, 200, 3e-4)
    assert (d30.recipe.global_batch, d30.recipe.epochs, d30.generator.train.lr) == (1024, 350, 3.2e-4)
    assert (d16.generator.model.depth, d16.generator.model.init_adaln_gamma, d16.generator.train.grad_clip) == \
        (16, 1e-3, 2.0)
    assert (d16.data.crop, d16.data.crop_range, d16.data.flip, d16.trainer.precision) == \
        ("random", 1.125, False, "16-mixed")
    assert compose("llamagen_gpt_b").data.encode_augment == "ten_crop"
    gpt_xl = compose("llamagen_gpt_xl")
    assert (gpt_xl.generator.model.depth, gpt_xl.generator.model.dim, gpt_xl.generator.train.lr) == (36, 1280, 1e-4)
    mar = compose("mar_b")
    assert (mar.recipe.epochs, mar.generator.train.lr, mar.generator.train.weight_decay) == (800, 8e-4, 0.02)
    assert (mar.data.crop, mar.data.encode_augment, mar.generator.model.head_depth) == ("center_adm", "flip", 6)


def test_a_recipe_keeps_the_strategy_of_the_trainer_group_it_is_given(tmp_path):
    fsdp = compose_train(["experiment=imagenet/var_d30", "trainer=fsdp", "data.root=/data"], tmp_path)
    assert (fsdp.trainer.strategy, fsdp.trainer.fsdp.activation_checkpointing) == ("fsdp", True)
    assert (fsdp.trainer.devices, fsdp.trainer.num_nodes, fsdp.generator.train.batch_size) == (8, 4, 1024)
    assert compose_train(["experiment=imagenet/var_d30", "data.root=/data"], tmp_path).trainer.strategy == "ddp"


def test_a_run_that_departs_from_its_recipe_says_how(tmp_path):
    cfg = pipeline.finalize_config(compose_train(["experiment=imagenet/mar_b", "data.root=/data", "trainer.devices=4",
                                                  "trainer.num_nodes=1", "trainer.accumulate_grad_batches=8",
                                                  "generator.train.lr=1e-4", "generator.train.max_steps=1000"],
                                                 tmp_path))
    notes = "\n".join(recipe_notes(cfg, world=4))
    assert "generator.train.lr=0.0001 is not the published peak 0.0008" in notes
    assert "generator.train.max_steps=1000 is 1.6 epochs, not the published 800" in notes
    assert "4 processes instead of the published 32 GPUs: the global batch stays 2048, 64 images per process" in notes
    assert "generator.train.batch_size" not in notes  # the global batch is the paper's: no learning-rate rule
    assert recipe_notes(compose_train(["experiment=imagenet/mar_b", "debug=tiny", "data.root=/d"], tmp_path),
                        world=1) == []


def image_folder(root: Path, *, train: int = 24, val: int = 8) -> Path:
    """ImageNet's layout in small: train/ and val/ with two class folders of JPEGs of uneven sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for name in ("n01440764", "n01443537"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(36, 60, 2)
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    return root


def tiny_recipe(recipe: str, root: Path, *overrides: str):
    return compose_train([f"experiment=imagenet/{recipe}", "debug=tiny", f"data.root={root / 'imagenet'}",
                          "data.num_classes=2", "metrics.num_reference=16", "metrics.num_samples=8",
                          "metrics.batch_size=8", *overrides], root)


def run_tiny(recipe: str, tmp_path: Path, *overrides: str) -> dict:
    if not (tmp_path / "imagenet").exists():
        image_folder(tmp_path / "imagenet")
    cfg = tiny_recipe(recipe, tmp_path, *overrides)
    assert cfg.trainer.accelerator == "cpu" and cfg.data.image_size == 32  # debug=tiny's side of every recipe
    return pipeline.run(cfg, tmp_path / "runs" / recipe)


def check_run(results: dict, recipe: str) -> None:
    stage2 = results["config"]["generator"]["train"]
    assert results["config"]["task_name"] == f"imagenet_{recipe}" and stage2["max_steps"] == 6
    assert results["costs"]["stage2_img_per_s"] > 0
    assert np.isfinite(results["metrics"]["generator"]["test_loss"]["value"])
    assert (Path(results["run_dir"]) / "generator.pt").is_file()


def test_a_recipe_runs_at_debug_tiny_and_again_on_its_tokenizer_artifact_without_stage_1(tmp_path):
    # trainer=cpu: one process without DDP's process group (the slow test below runs the recipes' own DDP)
    first = run_tiny("var_d16", tmp_path, "data.num_workers=2", "trainer=cpu")  # JPEGs decoded in 2 workers
    check_run(first, "var_d16")
    artifact = first["tokenizer_artifact"]
    stamp = (Path(artifact) / "tokenizer.pt").stat().st_mtime_ns
    second = run_tiny("var_d16", tmp_path / "again", "data.num_workers=0", f"tokenizer.artifact={artifact}",
                      "seed=1", "trainer=cpu", "evaluate=false")  # another seed: stage 1 would make another artifact
    assert (Path(second["run_dir"]) / "generator.pt").is_file()
    assert second["tokenizer_artifact"] == artifact
    assert (Path(artifact) / "tokenizer.pt").stat().st_mtime_ns == stamp
    assert not list((tmp_path / "again" / "artifacts" / "tokenizer").glob("*"))  # nothing trained there


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "var_d16"])
def test_every_recipe_runs_at_debug_tiny(recipe, tmp_path):
    check_run(run_tiny(recipe, tmp_path, "data.num_workers=0"), recipe)


def test_a_missing_tokenizer_artifact_fails_in_one_line_before_training(tmp_path):
    image_folder(tmp_path / "imagenet")
    cfg = tiny_recipe("var_d16", tmp_path, f"tokenizer.artifact={tmp_path / 'nothing'}")
    with pytest.raises(pipeline.ConfigError, match=r"tokenizer.artifact=.*nothing: no tokenizer.pt there"):
        pipeline.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_recipe_documents_each_value_with_its_source():
    """Every generator.train value of a base recipe carries a comment (its source), as the brief of a recipe is."""
    for recipe in ("var_d16", "llamagen_gpt_b", "flowar_s", "mar_b", "acdit_b"):
        text = (Path(config_dir()) / "experiment" / "imagenet" / f"{recipe}.yaml").read_text()
        train = text.split("\n  train:\n")[1].split("\n  sample:")[0].split("\nmetrics:")[0]
        for line in train.splitlines():
            assert "#" in line, f"{recipe}: {line.strip()} has no source comment"
        assert OmegaConf.load(Path(config_dir()) / "experiment" / "imagenet" / f"{recipe}.yaml").recipe.source


def test_the_scaling_document_tables_are_what_their_csvs_render():
    """docs/scaling.md's compute and memory tables come from experiments/scaling_plan/*.csv (plan.py writes them)."""
    from arvision.analysis.readme import blocks, update

    doc = Path(config_dir()).parent / "docs" / "scaling.md"
    commands = [block.command for block in blocks(doc.read_text())]
    assert commands == ["csv experiments/scaling_plan/compute.csv", "csv experiments/scaling_plan/memory_data.csv"]
    cwd = Path.cwd()
    try:
        os.chdir(doc.parents[1])  # marker paths are relative to the repository root
        assert not update(doc, check=True), "regenerate with python -m arvision.analysis.readme docs/scaling.md"
    finally:
        os.chdir(cwd)
