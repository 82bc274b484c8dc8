"""Every config composes, and every group option instantiates, before any training is attempted."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import OmegaConf

from arvision import pipeline
from arvision.cli.common import config_dir
from arvision.utils.instantiate import instantiate
from tests.conftest import compose_train

CONF = Path(config_dir())
OPTIONS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
           for group in ("data", "tokenizer", "generator", "trainer", "logger", "callbacks", "metrics")}


def test_the_demo_default_is_vq_raster_on_fashion_mnist(tmp_path):
    cfg = compose_train([], tmp_path)
    assert (cfg.data.name, cfg.tokenizer.name, cfg.generator.name) == ("fashion_mnist", "vq", "raster")
    assert cfg.tiny is False and cfg.trainer.accelerator == "cpu"


def test_debug_tiny_shrinks_models_but_explicit_overrides_win(tmp_path):
    demo = compose_train([], tmp_path)
    tiny = compose_train(["debug=tiny", "generator.model.dim=48"], tmp_path)
    assert tiny.tokenizer.model.ch < demo.tokenizer.model.ch
    assert tiny.generator.train.max_steps < demo.generator.train.max_steps
    assert tiny.generator.model.dim == 48 and tiny.generator.model.depth == 2


@pytest.mark.parametrize("trainer", OPTIONS["trainer"])
def test_trainer_presets_compose_to_valid_trainer_arguments(trainer, tmp_path):
    cfg = pipeline.finalize_config(compose_train([f"trainer={trainer}"], tmp_path))
    kwargs = pipeline.trainer_kwargs(cfg)
    assert "steps_scale" not in kwargs and kwargs["accelerator"] in ("cpu", "gpu")
    if trainer == "gpu":
        assert kwargs["precision"] == "bf16-mixed" and cfg.generator.train.max_steps == 8 * 700
    if trainer == "ddp_sim":
        assert kwargs["devices"] == 2 and kwargs["strategy"] == "ddp_spawn"


@pytest.mark.parametrize("logger", OPTIONS["logger"])
def test_loggers_instantiate_offline(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train([f"logger={logger}"], tmp_path)
    loggers = pipeline.instantiate_dict(cfg.logger)
    assert len(loggers) == (0 if logger == "none" else 1)
    if logger == "wandb":
        assert cfg.logger.wandb.offline is True


@pytest.mark.parametrize("data", OPTIONS["data"])
def test_data_configs_build_a_datamodule_with_its_declared_shape(data, tmp_path):
    overrides = [f"data={data}", "debug=tiny"]
    if data == "imagefolder":
        from PIL import Image
        for cls in ("a", "b"):
            (tmp_path / "imgs" / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
        overrides += [f"data.root={tmp_path / 'imgs'}", "data.num_classes=2", "data.num_workers=0",
                      "data.train_size=null", "data.test_size=null"]
    if data == "fashion_mnist" and not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Fashion-MNIST is not installed (make data)")
    cfg = compose_train(overrides, tmp_path)
    dm = pipeline.build_datamodule(cfg)
    image, label = dm.train_set[0]
    assert image.shape == (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    assert -1.0 <= image.min() and image.max() <= 1.0 and 0 <= label < cfg.data.num_classes


# Which generator models which tokenizer's tokens (DESIGN.md's matrix); "--" = rejected with IncompatibleTokenizer
# at construction, before any training. FlexVAR is next_scale with residual=false.
PAIRS = {  # tokenizer: raster, next_scale (VAR), next_scale (FlexVAR), flowar, acdit
    "fsq": ("ok", "--", "--", "--", "--"),
    "lfq": ("ok", "--", "--", "--", "--"),
    "msvq": ("--", "ok", "--", "--", "--"),
    "rvq": ("ok", "--", "--", "--", "--"),
    "vae": ("--", "--", "--", "ok", "ok"),
    "vq": ("ok", "--", "ok", "--", "--"),
}
GENERATORS = [("raster",), ("next_scale",), ("next_scale", "generator.residual=false"), ("flowar",), ("acdit",)]


def test_the_pair_matrix_lists_every_tokenizer_and_generator():
    assert sorted(PAIRS) == OPTIONS["tokenizer"]
    assert sorted({g[0] for g in GENERATORS}) == OPTIONS["generator"]


@pytest.mark.parametrize("tokenizer", sorted(PAIRS))
def test_every_tokenizer_generator_pair_is_built_or_rejected_before_training(tokenizer, tmp_path):
    from arvision.generators.base import IncompatibleTokenizer
    built = []
    for generator, *extra in GENERATORS:
        cfg = compose_train([f"tokenizer={tokenizer}", f"generator={generator}", *extra, "debug=tiny", "data=shapes"],
                            tmp_path)
        dm = pipeline.build_datamodule(cfg)
        tok = pipeline.build_tokenizer(cfg, dm)
        try:
            model = pipeline.build_generator(cfg, tok, dm.num_classes)
        except IncompatibleTokenizer as err:
            message = str(err)
            assert message.startswith(f"{generator} needs ") and message.endswith(f"got tokenizer={tokenizer}")
            assert "\n" not in message and "tokenizer=" in message.split(";")[0]  # names a tokenizer that fits
            built.append("--")
        else:
            assert model.spec == tok.spec and model.name == generator
            built.append("ok")
    assert tuple(built) == PAIRS[tokenizer]


def test_instantiate_refuses_targets_outside_the_allow_list():
    with pytest.raises(ValueError, match="refusing to instantiate"):
        instantiate({"_target_": "os.system", "command": "true"})
    assert hydra_instantiate(OmegaConf.create({"_target_": "builtins.dict"})) == {}  # hydra itself would allow it


def test_gpu_trainer_on_a_machine_without_cuda_fails_before_training(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pipeline.ConfigError, match="trainer=gpu needs a CUDA GPU"):
        pipeline.check_machine(compose_train(["trainer=gpu"], tmp_path))
    pipeline.check_machine(compose_train(["trainer=cpu"], tmp_path))  # fine


@pytest.mark.parametrize("paradigm", sorted(p.stem for p in (CONF / "paradigm").glob("*.yaml")))
def test_each_paradigm_pairs_its_generator_with_a_tokenizer_it_accepts(paradigm, tmp_path):
    cfg = compose_train([f"paradigm={paradigm}", "experiment=paradigms", "debug=tiny", "data=shapes"], tmp_path)
    assert cfg.generator.name == paradigm
    dm = pipeline.build_datamodule(cfg)
    generator = pipeline.build_generator(cfg, pipeline.build_tokenizer(cfg, dm), dm.num_classes)
    assert generator.spec.name == cfg.tokenizer.name


def test_budget_scales_both_stages_and_their_warmups(tmp_path):
    full = pipeline.finalize_config(compose_train([], tmp_path))
    demo = pipeline.finalize_config(compose_train(["budget=0.4"], tmp_path))
    for group in ("tokenizer", "generator"):
        assert demo[group].train.max_steps == round(full[group].train.max_steps * 0.4)
        assert demo[group].train.warmup_steps == round(full[group].train.warmup_steps * 0.4)
    with pytest.raises(pipeline.ConfigError, match="must be positive"):
        pipeline.finalize_config(compose_train(["budget=0"], tmp_path))


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_each_experiment_composes_and_builds_its_pair_before_training(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}", "debug=tiny", "data=shapes"], tmp_path)
    assert cfg.task_name == experiment and len(cfg.tags) == 1
    dm = pipeline.build_datamodule(cfg)
    generator = pipeline.build_generator(cfg, pipeline.build_tokenizer(cfg, dm), dm.num_classes)
    assert generator.spec.name == cfg.tokenizer.name
