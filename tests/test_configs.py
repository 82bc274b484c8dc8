"""Every config composes, and every group option instantiates, before any training is attempted."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import get_object
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from arvision import pipeline
from arvision.cli.common import config_dir
from arvision.data.tokens import step_loader
from arvision.tasks import GeneratorTask, TokenizerTask
from arvision.utils.instantiate import instantiate
from tests.conftest import REPO, compose_train, needs_fashion_mnist

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
    if data in ("imagefolder", "imagenet", "webdataset"):  # ImageNet's layout in miniature: class folders of RGB images
        from PIL import Image
        for cls in ("a", "b"):
            (tmp_path / "imgs" / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
        overrides += [f"data.root={tmp_path / 'imgs'}", "data.num_classes=2", "data.num_workers=0",
                      "data.train_size=null", "data.test_size=null"]
    if data == "webdataset":  # the same images as tar shards (arvision-shards)
        pytest.importorskip("webdataset")
        from arvision.data.streaming import write_shards
        write_shards(tmp_path / "imgs", tmp_path / "shards")
        overrides.append(f"data.root={tmp_path / 'shards'}")
    if data == "fashion_mnist":
        needs_fashion_mnist()
    cfg = compose_train(overrides, tmp_path)
    dm = pipeline.build_datamodule(cfg)
    image, label = dm.train_set[0]
    assert image.shape == (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    assert -1.0 <= image.min() and image.max() <= 1.0 and 0 <= label < cfg.data.num_classes


# Which generator models which tokenizer's tokens (DESIGN.md's matrix); "--" = rejected with IncompatibleTokenizer
# at construction, before any training. FlexVAR is next_scale with residual=false.
PAIRS = {  # tokenizer: raster, next_scale (VAR), next_scale (FlexVAR), flowar, acdit, mar
    "fsq": ("ok", "--", "--", "--", "--", "ok"),
    "kl16": ("--", "--", "--", "ok", "ok", "ok"),
    "lfq": ("ok", "--", "--", "--", "--", "ok"),
    "msvq": ("--", "ok", "--", "--", "--", "--"),
    "rvq": ("ok", "--", "--", "--", "--", "--"),
    "sd_vae": ("--", "--", "--", "ok", "ok", "ok"),
    "vae": ("--", "--", "--", "ok", "ok", "ok"),
    "vq": ("ok", "--", "ok", "--", "--", "ok"),
}
GENERATORS = [("raster",), ("next_scale",), ("next_scale", "generator.residual=false"), ("flowar",), ("acdit",),
              ("mar",)]


def test_the_pair_matrix_lists_every_tokenizer_and_generator():
    assert sorted(PAIRS) == OPTIONS["tokenizer"]
    assert sorted({g[0] for g in GENERATORS}) == OPTIONS["generator"]


@pytest.mark.parametrize("tokenizer", sorted(PAIRS))
def test_every_tokenizer_generator_pair_is_built_or_rejected_before_training(tokenizer, tmp_path):
    if tokenizer == "sd_vae":  # the only tokenizer behind an extra CI may lack
        pytest.importorskip("diffusers", reason="optional extra: pip install 'arvision[diffusers]'")
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


def test_tokenizer_budget_scales_stage_one_alone(tmp_path):
    full = pipeline.finalize_config(compose_train([], tmp_path))
    demo = pipeline.finalize_config(compose_train(["budget=0.4", "tokenizer_budget=1.0"], tmp_path))
    assert demo.tokenizer.train == full.tokenizer.train
    assert demo.generator.train.max_steps == round(full.generator.train.max_steps * 0.4)
    half = pipeline.finalize_config(compose_train(["tokenizer_budget=0.5"], tmp_path))
    assert half.tokenizer.train.max_steps == round(full.tokenizer.train.max_steps * 0.5)
    assert half.generator.train == full.generator.train
    with pytest.raises(pipeline.ConfigError, match="tokenizer_budget × trainer.steps_scale must be positive"):
        pipeline.finalize_config(compose_train(["tokenizer_budget=-1"], tmp_path))


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_each_experiment_composes_and_builds_its_pair_before_training(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}", "debug=tiny", "data=shapes"], tmp_path)
    assert cfg.task_name == experiment and len(cfg.tags) == 1
    dm = pipeline.build_datamodule(cfg)
    generator = pipeline.build_generator(cfg, pipeline.build_tokenizer(cfg, dm), dm.num_classes)
    assert generator.spec.name == cfg.tokenizer.name


# --------------------------------------------------------------------------------------------- no unread keys
# Blocks that are not instantiated from their own `_target_`: the callables their keys are passed to (a key must be
# one of their arguments). `generator.sample` goes to the generator's `sample`; `trainer` to Lightning's Trainer,
# except `steps_scale`, which `pipeline.finalize_config` reads.
ARGUMENT_READERS: dict[str, tuple[Callable, ...]] = {
    "tokenizer.train": (TokenizerTask, step_loader),
    "generator.train": (GeneratorTask, step_loader, pipeline.make_trainer),
    "trainer": (L.Trainer,),
}
READ_BY_NAME = {"trainer": {"steps_scale", "fsdp", "tf32"}}
SOURCE = "\n".join(p.read_text() for p in (REPO / "src" / "arvision").rglob("*.py"))
CONF_TEXT = "\n".join(p.read_text() for p in CONF.rglob("*.yaml"))


def _arguments(target: Callable) -> set[str] | None:
    """Keyword arguments `target` takes; None when it takes any (**kwargs). An arvision class whose constructor
    passes **kwargs on to its base class (the tokenizers: the network keys) takes the base's arguments too."""
    chain = [c.__init__ for c in target.__mro__ if c.__module__.startswith("arvision.")] \
        if inspect.isclass(target) and target.__module__.startswith("arvision.") else [target]
    names: set[str] = set()
    for function in chain:
        params = inspect.signature(function).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def _read_in_code(key: str) -> bool:
    """`key` is read somewhere: as an attribute or item in src/arvision, or through an interpolation in conf/."""
    k = re.escape(key)
    return bool(re.search(rf"\.{k}\b|\[[\"']{k}[\"']\]|get\([\"']{k}[\"']", SOURCE)
                or re.search(rf"\$\{{[^}}]*\b{k}\}}", CONF_TEXT))


def _leaves(node: DictConfig, path: str = "") -> Iterator[tuple[DictConfig, str, str]]:
    for key in node:
        child = node._get_node(key)
        full = f"{path}.{key}" if path else str(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            yield from _leaves(child, full)
        else:
            yield node, full, str(key)


def unread_keys(cfg: DictConfig) -> list[str]:
    """Keys of a composed train config that no code reads (see ARGUMENT_READERS for how each block is read)."""
    unread = []
    for parent, path, key in _leaves(cfg):
        block = path.rsplit(".", 1)[0] if "." in path else ""
        if "_target_" in parent and not key.startswith("_"):
            target = get_object(parent._target_)
            accepted = _arguments(target)
            if accepted is not None and key not in accepted:
                unread.append(f"{path} ({parent._target_} takes no {key})")
        elif block == "generator.sample":
            accepted = _arguments(get_object(cfg.generator.model._target_).sample)
            if accepted is not None and key not in accepted:
                unread.append(f"{path} ({cfg.generator.model._target_}.sample takes no {key})")
        elif block in ARGUMENT_READERS:
            accepted = set().union(*(_arguments(f) or set() for f in ARGUMENT_READERS[block]))
            if key not in accepted | READ_BY_NAME.get(block, set()):
                unread.append(f"{path} (not an argument of {', '.join(f.__name__ for f in ARGUMENT_READERS[block])})")
        elif not key.startswith("_") and not _read_in_code(key):
            unread.append(f"{path} (read nowhere in src/arvision or conf/)")
    return unread


COMPOSITIONS = ([[f"tokenizer={t}"] for t in OPTIONS["tokenizer"]] + [[f"generator={g}"] for g in OPTIONS["generator"]]
                + [[f"{group}={option}"] for group in ("data", "trainer", "logger", "callbacks", "metrics")
                   for option in OPTIONS[group]]
                + [[f"experiment={p.stem}"] for p in sorted((CONF / "experiment").glob("*.yaml"))])


@pytest.mark.parametrize("overrides", COMPOSITIONS, ids=lambda o: o[0])
def test_every_config_key_is_read_by_some_code(overrides, tmp_path):
    extra = ["data.root=/data", "data.num_classes=2"] if overrides == ["data=imagefolder"] else []
    cfg = compose_train([*overrides, *extra], tmp_path)
    assert unread_keys(cfg) == []


def test_the_unread_key_check_finds_a_stray_key_in_every_kind_of_block(tmp_path):
    cfg = compose_train(["generator=next_scale"], tmp_path)
    for block in ("data", "tokenizer.model", "tokenizer.train", "generator.model", "generator.train",
                  "generator.sample", "trainer", "metrics", ""):
        path = f"{block}.stray_knob" if block else "stray_knob"
        stray = cfg.copy()
        OmegaConf.update(stray, path, 1, force_add=True)
        assert [entry.split(" ")[0] for entry in unread_keys(stray)] == [path]
    OmegaConf.update(cfg, "data.batch_size", 128, force_add=True)  # training batches are each stage's train.batch_size
    assert [entry.split(" ")[0] for entry in unread_keys(cfg)] == ["data.batch_size"]


def test_stage1_loads_images_in_data_num_workers_processes_and_trains_the_same_tokenizer(tmp_path, monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_workers", 0))
        return step_loader(*args, **kwargs)

    monkeypatch.setattr(pipeline, "step_loader", spy)
    weights = {}
    for workers in (0, 2):
        cfg = compose_train(["debug=tiny", "data=shapes", "logger=none", f"data.num_workers={workers}"],
                            tmp_path / str(workers))
        out = tmp_path / str(workers) / "tokenizer"
        out.mkdir(parents=True)
        pipeline.train_tokenizer(cfg, pipeline.build_datamodule(cfg), out, tmp_path / str(workers) / "work")
        weights[workers] = torch.load(out / "tokenizer.pt", weights_only=True)["state_dict"]
    assert seen == [0, 2]
    assert weights[0].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
