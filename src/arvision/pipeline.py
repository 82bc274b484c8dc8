"""One run, end to end: data → tokenizer artifact (stage 1) → token cache → generator (stage 2) → evaluation.

`run(cfg, run_dir)` is arvision-train: it owns the run, times each stage and writes results.json (through
`arvision.results`). `load_run` opens a finished run for arvision-eval and arvision-sample, with the sampling
settings a command overrides checked against the run's own. The CLI entry points are thin wrappers over these
functions; tests and notebooks call them directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf, open_dict

from arvision.data.store import (AUGMENTS, SHARD_ITEMS, StoreError, TokenStore, encode_shards, finish_store, make_plan,
                                 missing_shards, wait_for)
from arvision.data.tokens import ImageBatches, TokenDataset, cat_tokens, compact, step_loader
from arvision.evaluation import evaluate_generator, evaluate_tokenizer, get_extractor, reference_metrics
from arvision.generators.base import Generator
from arvision.recipes import recipe_notes
from arvision.results import (RESULTS_FILE, RunRecord, git_sha, now, read_results, versions, write_json_atomic,
                              write_results)
from arvision.tasks import GeneratorTask, NonFiniteLoss, TokenizerTask
from arvision.tasks.optim import SCHEDULES
from arvision.tasks.resume import completed_steps, full_checkpoint, latest_checkpoint, roll_back
from arvision.tasks.sharding import DTYPES, ShardSettings, unsharded
from arvision.tasks.tokenizer_task import stage1_trainer_steps
from arvision.tokenizers.base import Tokenizer
from arvision.utils.artifacts import ArtifactCache, config_hash
from arvision.utils.files import UnreadableFile, load_state, load_weights
from arvision.utils.instantiate import RefusedTarget, check_target, instantiate
from arvision.utils.progress import phase, world_rank  # noqa: F401  (pipeline.world_rank: the CLI's rank check)
from arvision.utils.validate import SettingError, check_model_keys, check_range

log = logging.getLogger("arvision")

# Lightning notices that do not apply here: the EMA copy is in eval mode on purpose, stage 1 checkpoints after
# its manual optimisation step on purpose, and one long "epoch" of seeded steps is how resumption stays exact.
for pattern in (".*module\\(s\\) in eval mode.*", ".*manual optimization and every_n_train_steps.*",
                ".*resuming from a checkpoint that ended before the epoch ended.*", ".*does not have many workers.*",
                ".*litlogger.*"):
    warnings.filterwarnings("ignore", message=pattern)

# Continuous tokenizers measure their latent scaling factor on this many training images after stage 1.
SCALING_CALIBRATION_IMAGES = 1024

# Data settings that change only how data is served, not which images a model sees.
DATA_LOADING_KEYS = {"eval_batch_size", "num_workers", "download", "download_dir"}
# Data settings of stage 2 only (the views pre-encoded into the token store): not part of the tokenizer's or the
# classifier's key.
STAGE2_DATA_KEYS = {"encode_augment"}

# What a stage-2 checkpoint in a run directory was trained with (see `check_run_dir`).
RUN_IDENTITY_FILE = "run_identity.json"
# Trainer settings that change only what is shown, not the weights.
DISPLAY_TRAINER_KEYS = {"enable_progress_bar", "log_every_n_steps", "enable_model_summary"}
# Trainer settings that spread the work over processes, not decide the weights: each stage's `train.batch_size` is
# the global batch of a step, whatever the number of processes, so a run resumes on another number of them.
# (accumulate_grad_batches is not one: Lightning's saved loop counters count micro-batches.)
LAYOUT_TRAINER_KEYS = {"devices", "num_nodes", "strategy"}
# Keys of the trainer block that are not Trainer arguments: steps_scale (`finalize_config`) and trainer=fsdp's
# sharding settings (`shard_settings`).
OWN_TRAINER_KEYS = ("steps_scale", "fsdp", "tf32")


# --------------------------------------------------------------------------------------------- configuration
def finalize_config(cfg: DictConfig) -> DictConfig:
    """Scale each stage's step budget (and warm-up) by the trainer's `steps_scale` times the run's `budget` (stage 2)
    or `tokenizer_budget` (stage 1, `budget` unless set)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        budget = cfg.get("budget", 1.0)
        for group, key, value in (("generator", "budget", budget),
                                  ("tokenizer", "tokenizer_budget", cfg.get("tokenizer_budget", budget))):
            scale = float(cfg.trainer.get("steps_scale", 1.0)) * float(value)
            if scale <= 0:
                raise ConfigError(f"{key} × trainer.steps_scale must be positive, got {scale}")
            if cfg.get(group) is not None and scale != 1.0:
                train = cfg[group].train
                train.max_steps = max(1, int(round(train.max_steps * scale)))
                train.warmup_steps = min(int(round(train.warmup_steps * scale)), train.max_steps - 1)
    return cfg


class ConfigError(ValueError):
    """A request that cannot run on this machine or with these settings; raised before any training."""


# Keyword arguments a model config does not hold: the pipeline fills them at run time.
SUPPLIED_AT_RUN_TIME = {"tokenizer": ("image_size", "image_channels"), "generator": ("spec", "num_classes")}


def check_settings(cfg: DictConfig) -> None:
    """Every model key against the constructor it fills, and every training and evaluation number against its
    range, before any work: one line naming the key, the value and what is allowed."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(f"{key} is not set; give {key}=<value> on the command line")
    if encode_augment(cfg) not in AUGMENTS:
        raise ConfigError(f"data.encode_augment={encode_augment(cfg)!r} is not an option; use one of "
                          f"{', '.join(AUGMENTS)}")
    try:
        for group in ("tokenizer", "generator") if cfg.train_generator else ("tokenizer",):
            node = cfg[group]
            check_model_keys(check_target(node.model._target_), OmegaConf.to_container(node.model, resolve=True),
                             where=f"{group}.model", supplied=SUPPLIED_AT_RUN_TIME[group])
            train, where = node.train, f"{group}.train"
            for key in ("batch_size", "max_steps"):
                check_range(f"{where}.{key}", train[key], minimum=1, integer=True)
            check_range(f"{where}.warmup_steps", train.warmup_steps, minimum=0, integer=True)
            check_range(f"{where}.lr", train.lr, above=0)
            check_range(f"{where}.weight_decay", train.weight_decay, minimum=0)
            check_range(f"{where}.grad_clip", train.get("grad_clip"), minimum=0, optional=True)
        if cfg.train_generator:
            train = cfg.generator.train
            check_range("generator.train.ema_decay", train.ema_decay, minimum=0, below=1, optional=True)
            if train.get("lr_schedule", "cosine") not in SCHEDULES:
                raise SettingError(f"generator.train.lr_schedule={train.lr_schedule!r}: must be one of "
                                   f"{', '.join(SCHEDULES)}")
            check_range("generator.train.min_lr_ratio", train.get("min_lr_ratio", 0.1), minimum=0)
            check_range("generator.train.decay_fraction", train.get("decay_fraction", 0.15), above=0)
            check_range("generator.train.warmup_start", train.get("warmup_start"), minimum=0, below=1, optional=True)
            check_range("generator.train.weight_decay_end", train.get("weight_decay_end"), minimum=0, optional=True)
        check_range("checkpoint_every", cfg.checkpoint_every, minimum=1, integer=True)
        if cfg.evaluate:
            for key in ("num_samples", "num_reference", "batch_size"):
                check_range(f"metrics.{key}", cfg.metrics[key], minimum=1, integer=True)
    except (SettingError, RefusedTarget) as err:
        raise ConfigError(str(err)) from None


def check_machine(cfg: DictConfig) -> None:
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError(f"trainer={cfg.trainer.accelerator} needs a CUDA GPU and none is visible; "
                          f"use trainer=cpu (or trainer=ddp_sim for 2 CPU processes)")


def world_size(cfg: DictConfig) -> int:
    """The run's processes: devices per node × nodes (what each stage's global batch is split over)."""
    devices = cfg.trainer.devices
    try:
        per_node = (len(CUDAAccelerator.parse_devices(devices) or []) if cfg.trainer.accelerator == "gpu"
                    else CPUAccelerator.parse_devices(devices))
    except MisconfigurationException as err:
        raise ConfigError(f"trainer.devices={devices}: {err}") from None
    return per_node * int(cfg.trainer.num_nodes)


def shard_settings(cfg: DictConfig) -> ShardSettings | None:
    """trainer=fsdp's `fsdp` block; None for the other strategies."""
    if cfg.trainer.strategy != "fsdp":
        return None
    if cfg.trainer.get("fsdp") is None:
        raise ConfigError("trainer.strategy=fsdp needs the sharding settings of trainer=fsdp (its fsdp block): use "
                          "trainer=fsdp")
    try:
        return ShardSettings(**OmegaConf.to_container(cfg.trainer.fsdp, resolve=True))
    except TypeError as err:
        raise ConfigError(f"trainer.fsdp: {err}; its keys: activation_checkpointing, param_dtype, reduce_dtype, "
                          f"state_dict") from None


def check_trainer(cfg: DictConfig) -> None:
    """The processes, nodes and accumulation against each stage's global batch, and trainer=fsdp's settings, before
    any work: a batch that does not split evenly would change what a step means."""
    trainer = cfg.trainer
    try:
        check_range("trainer.num_nodes", trainer.num_nodes, minimum=1, integer=True)
        check_range("trainer.accumulate_grad_batches", trainer.accumulate_grad_batches, minimum=1, integer=True)
    except SettingError as err:
        raise ConfigError(str(err)) from None
    world, accumulate = world_size(cfg), trainer.accumulate_grad_batches
    batch = world if cfg.tokenizer.get("artifact") else cfg.tokenizer.train.batch_size  # a released one: no stage 1
    if batch % world:
        raise ConfigError(f"tokenizer.train.batch_size={batch} is the global batch of a step and does not split over "
                          f"{world} processes; choose a multiple of {world}")
    batch = cfg.generator.train.batch_size if cfg.train_generator else world * accumulate
    if batch % (world * accumulate):
        raise ConfigError(f"generator.train.batch_size={batch} is the global batch of a step and does not split over "
                          f"{world} processes × {accumulate} micro-batches (trainer.accumulate_grad_batches); "
                          f"choose a multiple of {world * accumulate}")
    settings = shard_settings(cfg)
    if settings is None:
        return
    for key, value in (("param_dtype", settings.param_dtype), ("reduce_dtype", settings.reduce_dtype)):
        if value is not None and value not in DTYPES:
            raise ConfigError(f"trainer.fsdp.{key}={value} is not a dtype FSDP casts to; choose one of "
                              f"{', '.join(DTYPES)} or null")
    if settings.param_dtype not in (None, "float32") and not str(trainer.precision).endswith("-mixed"):
        raise ConfigError(f"trainer.fsdp.param_dtype={settings.param_dtype} needs autocast to keep the generators' "
                          f"float32 buffers and noise in step: trainer.precision=bf16-mixed (or 16-mixed), or "
                          f"trainer.fsdp.param_dtype=null with trainer.precision={trainer.precision}")
    if settings.activation_checkpointing and cfg.train_generator and cfg.generator.train.get("compile", False):
        raise ConfigError("generator.train.compile=true with trainer.fsdp.activation_checkpointing=true: the compiled "
                          "blocks' recomputation does not match their forward (torch.utils.checkpoint refuses it); "
                          "set one of them to false")
    if settings.state_dict not in ("sharded", "full"):
        raise ConfigError(f"trainer.fsdp.state_dict={settings.state_dict}: checkpoints are sharded (a directory of "
                          f"per-process files) or full (one file); choose one of them")


def data_identity(cfg: DictConfig) -> dict[str, Any]:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {k: v for k, v in data.items() if k not in DATA_LOADING_KEYS | STAGE2_DATA_KEYS}


def encode_augment(cfg: DictConfig) -> str:
    return str(cfg.data.get("encode_augment", "none"))


def stage2_data_identity(cfg: DictConfig) -> dict[str, Any]:
    """The data a generator is trained on: the images, and the views of them pre-encoded (when not just one)."""
    augment = encode_augment(cfg)
    return {**data_identity(cfg), **({"encode_augment": augment} if augment != "none" else {})}


def tokenizer_key(cfg: DictConfig) -> str:
    if cfg.tokenizer.get("artifact"):  # a released tokenizer (arvision-import): its artifact is its identity
        return Path(cfg.tokenizer.artifact).name
    return config_hash("tokenizer", cfg.tokenizer.model, cfg.tokenizer.train, data_identity(cfg), cfg.seed)


def classifier_key(cfg: DictConfig) -> str:
    return config_hash("classifier", cfg.metrics.classifier, data_identity(cfg), cfg.seed)


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """Everything that decides a run's generator weights: its tokenizer (by artifact key), generator network and
    training settings, data, seed and trainer. Sampling and evaluation settings are not part of it."""
    trainer = {k: v for k, v in trainer_kwargs(cfg).items() if k not in DISPLAY_TRAINER_KEYS | LAYOUT_TRAINER_KEYS}
    settings = shard_settings(cfg)
    if settings is not None:  # the dtypes FSDP computes and reduces in change the numbers; the rest is memory
        trainer.update(param_dtype=settings.param_dtype, reduce_dtype=settings.reduce_dtype)
    if cfg.trainer.get("tf32", False):  # TF32 matmuls change the numbers (only when on: older runs' identity stays)
        trainer["tf32"] = True
    generator = {k: v for k, v in OmegaConf.to_container(cfg.generator, resolve=True).items() if k != "sample"}
    return {"tokenizer": tokenizer_key(cfg), "generator": generator,
            "data": stage2_data_identity(cfg), "seed": cfg.seed, "trainer": trainer}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old → new` for each leaf that differs between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} → {new!r}"]


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """A run directory is trained once, by one config: a finished run is never trained again (its weights and
    evaluation history stay), and an unfinished one resumes only with the settings its checkpoint was trained
    with (`overwrite=true` discards that checkpoint instead). It must be writable before any work starts."""
    try:
        with tempfile.NamedTemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise ConfigError(f"cannot write to the run directory {run_dir} ({err.strerror}); choose a writable "
                          f"hydra.run.dir") from None
    if (run_dir / RESULTS_FILE).exists():
        raise ConfigError(f"{run_dir} holds a finished run (results.json) and is never trained again; evaluate it "
                          f"with arvision-eval run={run_dir}, or train into a new hydra.run.dir")
    stored = run_dir / RUN_IDENTITY_FILE
    if not stored.exists():
        return
    changed = _differences(json.loads(stored.read_text()), json.loads(json.dumps(run_identity(cfg), default=str)))
    if not changed:
        return
    if not cfg.get("overwrite", False):
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ConfigError(f"{run_dir} holds an unfinished run trained with other settings ({shown}): rerun with its "
                          f"settings to resume it, train into a new hydra.run.dir, or add overwrite=true to discard "
                          f"its checkpoints")
    log.warning("overwrite=true: discarding the unfinished run in %s (%s)", run_dir, "; ".join(changed))
    shutil.rmtree(run_dir / "checkpoints" / "generator", ignore_errors=True)
    stored.unlink()


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in OWN_TRAINER_KEYS:
        kwargs.pop(key, None)
    return kwargs


# --------------------------------------------------------------------------------------------- building blocks
def build_datamodule(cfg: DictConfig):
    """The datamodule, set up: a missing dataset fails here, before any model is built."""
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def build_tokenizer(cfg: DictConfig, dm) -> Tokenizer:
    return instantiate(cfg.tokenizer.model, image_size=dm.image_size, image_channels=dm.channels)


def build_generator(cfg: DictConfig, tokenizer: Tokenizer, num_classes: int) -> Generator:
    """Raises `IncompatibleTokenizer` for unsupported pairs (cheap: call it before training anything)."""
    generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=num_classes)
    return generator.attach_tokenizer(tokenizer)


def make_trainer(cfg: DictConfig, *, max_steps: int, ckpt_dir: Path, loggers: list, callbacks: list,
                 grad_clip: float | None = None, stage: int = 2) -> L.Trainer:
    """The Trainer of a stage. Stage 1 optimises by hand (its GAN alternates two optimisers), which Lightning does
    not accumulate for, and its tokenizers are small: it runs one micro-batch per step, and DDP under trainer=fsdp.
    Stage 2 under trainer=fsdp gets Lightning's ModelParallelStrategy: FSDP2 over all processes (one data-parallel
    mesh dimension), applied by `GeneratorTask.configure_model`."""
    kwargs = trainer_kwargs(cfg)
    settings = shard_settings(cfg)
    if cfg.trainer.get("tf32", False):
        # TF32 tensor cores for fp32 matmuls and convolutions (FlowAR trains fp32 this way); false leaves PyTorch's
        # defaults. Set in this process before any training; launchers that start ranks run this too.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if stage == 1:
        kwargs["accumulate_grad_batches"] = 1
        kwargs["strategy"] = "ddp" if settings is not None else kwargs["strategy"]
    elif settings is not None:
        kwargs["strategy"] = ModelParallelStrategy(data_parallel_size=world_size(cfg), tensor_parallel_size=1,
                                                   save_distributed_checkpoint=settings.state_dict == "sharded")
    if "spawn" in str(cfg.trainer.strategy):
        # Spawned ranks receive the model and data by pickling; file-descriptor sharing fails in sandboxes.
        torch.multiprocessing.set_sharing_strategy("file_system")
    if not cfg.trainer.get("enable_progress_bar", True):  # trainer.enable_progress_bar=false wins over callbacks
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ProgressBar)]
    if not loggers:  # nothing to report learning rates to
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    # The two newest checkpoints (step=N.ckpt) and last.ckpt, a link to the newest: when the weights saved at step N
    # give a non-finite loss, `roll_back` (tasks/resume.py) can point last.ckpt at the one before.
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", monitor="step", mode="max",
                                                     save_top_k=2, save_last="link", enable_version_counter=False,
                                                     every_n_train_steps=cfg.checkpoint_every)
    # One "epoch" is the step sampler's whole schedule of seeded batches.
    return L.Trainer(**kwargs, max_steps=max_steps, max_epochs=1, logger=loggers or False,
                     callbacks=[checkpoint, *callbacks], limit_val_batches=0, num_sanity_val_steps=0,
                     use_distributed_sampler=False, enable_model_summary=False, default_root_dir=str(ckpt_dir),
                     gradient_clip_val=grad_clip)


def instantiate_dict(node: DictConfig | None) -> list:
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def fit(trainer: L.Trainer, task: L.LightningModule, loader, ckpt_path: Path | None) -> tuple[float, int]:
    """Fit, resuming from `ckpt_path` when it exists; returns the wall-clock seconds of this call and the training
    steps it ran (fewer than max_steps after a resume, so img/s stays honest)."""
    resume = str(ckpt_path) if ckpt_path is not None and Path(ckpt_path).exists() else None
    done = 0
    gathered = Path(trainer.default_root_dir).parent / f".resume-full-rank{world_rank()}.ckpt"  # not a checkpoint of it
    if resume:
        log.info("resuming from %s", resume)
        done = loader.sampler.start_step = completed_steps(resume)
        if Path(resume).is_dir() and not isinstance(trainer.strategy, ModelParallelStrategy):
            # A sharded checkpoint (trainer=fsdp) resumed by one process or DDP: gathered into one file first.
            resume = str(full_checkpoint(Path(resume), gathered))
    start = time.perf_counter()
    try:
        trainer.fit(task, train_dataloaders=loader, ckpt_path=resume, weights_only=True)
    except NonFiniteLoss as err:
        raise NonFiniteLoss(f"{err}; {roll_back(Path(trainer.default_root_dir), trainer.global_step)}") from None
    finally:
        gathered.unlink(missing_ok=True)
    if trainer.interrupted:  # Lightning swallows Ctrl-C; the run must not carry on as if training had finished
        raise KeyboardInterrupt(f"interrupted at step {trainer.global_step}; rerun into the same run directory "
                                f"to resume from {trainer.default_root_dir}/last.ckpt")
    # A fit that returns ran to the end of the step schedule; counted from the schedule, not from `task`, whose step
    # counter stays at 0 in the launching process when the ranks are spawned (trainer=ddp_sim).
    return time.perf_counter() - start, loader.sampler.num_steps - done


# --------------------------------------------------------------------------------------------- stage 1
def train_tokenizer(cfg: DictConfig, dm, out_dir: Path, work_dir: Path) -> dict[str, Any]:
    """Train the tokenizer into `out_dir` (checkpoints in `work_dir`, so a crashed build resumes)."""
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = build_tokenizer(cfg, dm)
    train = cfg.tokenizer.train
    task = TokenizerTask(tokenizer=tokenizer, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
                         warmup_steps=train.warmup_steps, max_steps=train.max_steps, grad_clip=train.grad_clip,
                         perceptual_weight=train.perceptual_weight, disc_weight=train.disc_weight,
                         disc_start=train.disc_start, disc_width=train.disc_width, disc_layers=train.disc_layers)
    loader = step_loader(ImageBatches(dm.train_set), batch_size=train.batch_size, num_steps=train.max_steps,
                         seed=cfg.seed, num_workers=cfg.data.num_workers)
    trainer = make_trainer(cfg, max_steps=stage1_trainer_steps(train.max_steps, train.disc_weight, train.disc_start),
                           ckpt_dir=work_dir, loggers=instantiate_dict(cfg.get("logger")),
                           callbacks=instantiate_dict(cfg.get("callbacks")), stage=1)
    log.info("stage 1: training tokenizer=%s for %d steps", cfg.tokenizer.name, train.max_steps)
    seconds, steps_run = fit(trainer, task, loader, latest_checkpoint(work_dir))
    calibration: dict[str, float] = {}
    if tokenizer.has_scaling_factor:
        # Continuous tokenizers: unit-variance latents for stage 2 (LDM), measured once on training images.
        n = min(len(dm.train_set), SCALING_CALIBRATION_IMAGES)
        images = torch.utils.data.DataLoader(torch.utils.data.Subset(dm.train_set, range(n)),
                                             batch_size=cfg.data.eval_batch_size, shuffle=False)
        calibration["scaling_factor"] = tokenizer.calibrate_scaling(images)
        log.info("stage 1: scaling factor %.4f from %d training images", calibration["scaling_factor"], n)
    torch.save({"state_dict": tokenizer.state_dict(),
                "config": OmegaConf.to_container(cfg.tokenizer.model, resolve=True),
                "image_size": dm.image_size, "image_channels": dm.channels}, out_dir / "tokenizer.pt")
    return {"kind": "tokenizer", "name": cfg.tokenizer.name, "spec": tokenizer.spec.to_dict(),
            "train_seconds": seconds, "train_steps": train.max_steps,
            "train_steps_timed": steps_run,
            "train_img_per_s": steps_run * train.batch_size / max(seconds, 1e-9),  # the global batch
            "perceptual_loss": task.perceptual_active, "config": OmegaConf.to_container(cfg.tokenizer, resolve=True),
            "data": data_identity(cfg), "seed": cfg.seed, **calibration}


def load_tokenizer(path: Path) -> Tokenizer:
    blob = load_weights(path / "tokenizer.pt")
    try:
        tokenizer = instantiate(blob["config"], image_size=blob["image_size"], image_channels=blob["image_channels"])
    except RefusedTarget as err:
        raise UnreadableFile(f"{path / 'tokenizer.pt'}: {err}; the file was changed or written by other "
                             "code") from None
    load_state(tokenizer, blob["state_dict"], path / "tokenizer.pt")
    return tokenizer.eval().requires_grad_(False)


def get_tokenizer(cfg: DictConfig, dm, cache: ArtifactCache) -> tuple[Tokenizer, Path]:
    if cfg.tokenizer.get("artifact"):
        # The papers train their generators on a released tokenizer: the folder arvision-import wrote, no stage 1.
        path = Path(cfg.tokenizer.artifact)
        if not (path / "tokenizer.pt").is_file():
            raise ConfigError(f"tokenizer.artifact={path}: no tokenizer.pt there; give the tokenizer artifact folder "
                              f"that arvision-import printed, or tokenizer.artifact=null to train one")
        log.info("stage 1: using the tokenizer artifact %s", path)
        return load_tokenizer(path), path
    key = tokenizer_key(cfg)
    if cache.exists("tokenizer", key):
        log.info("stage 1: reusing tokenizer artifact %s", key)
    elif world_rank() != 0:
        # Processes started together (torchrun, SLURM, Lightning's launcher) train the tokenizer together (DDP):
        # rank 0 builds the artifact under its lock, the others train along into scratch space, then read it.
        cache.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.root) as scratch:
            train_tokenizer(cfg, dm, Path(scratch), cache.work_dir("tokenizer", key))
        wait_for(lambda: [] if cache.exists("tokenizer", key) else [key], what="rank 0's tokenizer artifact")
    path = cache.get_or_build("tokenizer", key,
                              lambda tmp: train_tokenizer(cfg, dm, tmp, cache.work_dir("tokenizer", key)))
    return load_tokenizer(path), path


# --------------------------------------------------------------------------------------------- token cache
@torch.no_grad()
def encode_dataset(tokenizer: Tokenizer, dataset, batch_size: int = 500, *,
                   encode: Callable[[torch.Tensor], Any] | None = None) -> tuple[Any, torch.Tensor]:
    """The dataset's tokens by `encode` (the generator's `TokenEncoding`; default the tokenizer's) and labels."""
    encode = encode or tokenizer.encode
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks, labels = [], []
    with phase("encoding the token cache", total=len(dataset)) as bar:
        for images, y in loader:
            chunks.append(compact(encode(images), tokenizer.spec.vocab_size))
            labels.append(y)
            bar.advance(len(y))
    return cat_tokens(chunks), torch.cat(labels)


def token_store_key(cfg: DictConfig, tokenizer_dir: Path, encoding_name: str | None) -> str:
    # A generator's own encoding (FlexVAR's per-side ground truth) is another store: its name joins the key.
    return config_hash("tokens", tokenizer_dir.name, stage2_data_identity(cfg), *([encoding_name] if encoding_name
                                                                                 else []))


def encode_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Who encodes which shards: the given rank and world, else torchrun's (or SLURM's through Lightning's
    environment) RANK and WORLD_SIZE, else one process. Lightning's own launcher starts its other ranks only at
    fit, after rank 0 has encoded the store alone."""
    if rank is not None or world is not None:
        rank, world = rank or 0, world or 1
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = world_rank(), int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"encode rank {rank} of world {world}: give 0 <= rank < world")
    return rank, world


def get_token_cache(cfg: DictConfig, tokenizer: Tokenizer, tokenizer_dir: Path, dm, cache: ArtifactCache, *,
                    shard_items: int = SHARD_ITEMS, rank: int | None = None,
                    world: int | None = None) -> TokenStore:
    """The train split's tokens as a sharded, memory-mapped store (every run, small sets too: one code path,
    and a 60k-image store costs no more to write than tokens.pt did).

    One process encodes every shard under the artifact lock, so concurrent sweep jobs encode it once. With a
    world of several processes each writes its own shards (shard i: rank i % world) into the artifact's work
    folder, and rank 0 gathers them into the artifact once all exist; a killed encode resumes from there.
    """
    model = OmegaConf.to_container(cfg.generator.model, resolve=True)
    encoding = check_target(model["_target_"]).token_encoding(tokenizer, model)
    key = token_store_key(cfg, tokenizer_dir, encoding.name)
    kind = "token_store"
    try:
        plan = make_plan(len(dm.train_set), batch_size=cfg.data.eval_batch_size, augment=encode_augment(cfg),
                         shard_items=shard_items)
    except StoreError as err:
        raise ConfigError(str(err)) from None
    rank, world = encode_world(rank, world)
    identity = {"tokenizer": tokenizer_dir.name, "encoding": encoding.name, "data": stage2_data_identity(cfg)}

    def work() -> Path:  # made when first needed: a run that finds the store leaves no empty work folder
        return cache.work_dir(kind, key)

    def encode(which: int, of: int) -> None:
        encode_shards(work(), plan, dm.train_set, encoding.encode, vocab_size=tokenizer.spec.vocab_size, seed=cfg.seed,
                      rank=which, world=of, num_workers=cfg.data.num_workers)

    start = time.perf_counter()  # with several processes rank 0's encode time spans the others' (it waits for them)

    def build(tmp: Path) -> dict[str, Any]:
        if world == 1:
            encode(0, 1)
        finish_store(work(), tmp, plan, identity)
        return {"kind": "token_store", **identity, "num_items": plan.num_items, "num_shards": plan.num_shards,
                "world": world, "encode_seconds": time.perf_counter() - start}

    if world > 1 and not cache.exists(kind, key):
        encode(rank, world)
        if rank == 0:
            wait_for(lambda: missing_shards(work(), plan), what="the other ranks' token store shards")
        else:
            wait_for(lambda: [] if cache.exists(kind, key) else [key], what="rank 0 to finish the token store")
    path = cache.get_or_build(kind, key, build)
    return TokenStore(path, seed=cfg.seed)


def encode_store(cfg: DictConfig) -> TokenStore:
    """arvision-encode: the token store a stage-2 run of `cfg` trains from (its tokenizer trained first when
    missing), written by this process or, with `rank`/`world` (or torchrun's), by its share of processes."""
    cfg = finalize_config(cfg)
    check_settings(cfg)
    L.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    cache = ArtifactCache(cfg.paths.artifact_dir)
    tokenizer, tokenizer_dir = get_tokenizer(cfg, dm, cache)
    return get_token_cache(cfg, tokenizer, tokenizer_dir, dm, cache, shard_items=cfg.shard_items, rank=cfg.rank,
                           world=cfg.world)


# --------------------------------------------------------------------------------------------- stage 2
@dataclass
class Stage2:
    task: GeneratorTask
    seconds: float
    steps: int       # optimizer steps run in this call (timed)
    batch_size: int  # the global batch of a step (all processes and accumulated micro-batches)


def train_generator(cfg: DictConfig, tokenizer: Tokenizer, tokens: TokenStore | TokenDataset, num_classes: int,
                    run_dir: Path) -> Stage2:
    """Stage 2 on `tokens`: the run's token store, or tokens in memory (`TokenDataset`, a caller's own)."""
    L.seed_everything(cfg.seed, workers=True)
    generator = build_generator(cfg, tokenizer, num_classes)
    train = cfg.generator.train
    task = GeneratorTask(generator=generator, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
                         warmup_steps=train.warmup_steps, max_steps=train.max_steps, ema_decay=train.ema_decay,
                         lr_schedule=train.get("lr_schedule", "cosine"), min_lr_ratio=train.get("min_lr_ratio", 0.1),
                         decay_fraction=train.get("decay_fraction", 0.15), warmup_start=train.get("warmup_start"),
                         weight_decay_end=train.get("weight_decay_end"),
                         compile=train.get("compile", False), shard=shard_settings(cfg))
    views = tokens.variants if isinstance(tokens, TokenStore) else 1
    loader = step_loader(tokens, batch_size=train.batch_size, num_steps=train.max_steps, seed=cfg.seed,
                         accumulate=cfg.trainer.accumulate_grad_batches, with_steps=views > 1)
    ckpt_dir = run_dir / "checkpoints" / "generator"
    write_json_atomic(run_dir / RUN_IDENTITY_FILE, run_identity(cfg))  # what its checkpoints will be trained with
    loggers = instantiate_dict(cfg.get("logger"))
    trainer = make_trainer(cfg, max_steps=train.max_steps, ckpt_dir=ckpt_dir, loggers=loggers,
                           callbacks=instantiate_dict(cfg.get("callbacks")), grad_clip=train.grad_clip)
    ckpt = Path(cfg.ckpt_path) if cfg.get("ckpt_path") else latest_checkpoint(ckpt_dir)
    log.info("stage 2: training generator=%s for %d steps", cfg.generator.name, train.max_steps)
    try:
        seconds, steps_run = fit(trainer, task, loader, ckpt)
    except NonFiniteLoss as err:
        raise NonFiniteLoss(f"{err}; to continue with other settings, train into a new hydra.run.dir with "
                            f"ckpt_path={ckpt_dir / 'last.ckpt'}") from None
    if task.sharded:  # every process gathers the full weights (a collective) into unsharded copies
        task.generator = unsharded(task.generator, build_generator(cfg, tokenizer, num_classes))
        if task.ema is not None:
            task.ema.module = unsharded(task.ema.module, build_generator(cfg, tokenizer, num_classes)).eval()
    blob = {"generator": task.generator.state_dict(),
            "config": OmegaConf.to_container(cfg.generator.model, resolve=True), "num_classes": num_classes}
    if task.ema is not None:  # generator.train.ema_decay=null trains without one: the file has no "ema" weights
        blob["ema"] = task.ema.module.state_dict()
    torch.save(blob, run_dir / "generator.pt")
    return Stage2(task=task, seconds=seconds, steps=steps_run, batch_size=train.batch_size)


def load_generator(run_dir: Path, tokenizer: Tokenizer, *, ema: bool = True) -> Generator:
    path = Path(run_dir) / "generator.pt"
    blob = load_weights(path)
    try:
        generator = instantiate(blob["config"])(spec=tokenizer.spec, num_classes=blob["num_classes"])
    except RefusedTarget as err:
        raise UnreadableFile(f"{path}: {err}; the file was changed or written by other code") from None
    generator.attach_tokenizer(tokenizer)
    if ema and "ema" not in blob:
        log.info("%s has no EMA weights (trained with generator.train.ema_decay=null): using the trained ones", path)
        ema = False
    load_state(generator, blob["ema" if ema else "generator"], path)
    return generator.eval()


# --------------------------------------------------------------------------------------------- the run
def group_choices() -> dict[str, str]:
    """The Hydra group choices of this job (tokenizer=vq, …); empty when composed outside @hydra.main (tests)."""
    try:
        choices = HydraConfig.get().runtime.choices
        return {k: v for k, v in choices.items() if not k.startswith("hydra") and v is not None}
    except ValueError:
        return {}


def task_overrides() -> list[str] | None:
    """This job's command-line overrides (a sweep job's own values included), so a results.json says how to rerun
    it; None when the config was composed outside `@hydra.main` (tests, scripts)."""
    try:
        return [str(item) for item in HydraConfig.get().overrides.task]
    except ValueError:
        return None


@contextlib.contextmanager
def stage(stages: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall-clock seconds of the block to `stages[name]` (a cache hit shows as the time to load it)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - start


def run(cfg: DictConfig, run_dir: Path) -> RunRecord:
    """The whole run; returns the run record (also written to `run_dir/results.json`)."""
    started = time.perf_counter()
    stages: dict[str, float] = {}  # wall-clock per stage of this run → costs.stage_seconds
    cfg = finalize_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = ArtifactCache(cfg.paths.artifact_dir)

    # Everything that can be wrong with the request fails here, before any training.
    with stage(stages, "setup"):
        check_settings(cfg)
        check_machine(cfg)
        check_trainer(cfg)
        for note in recipe_notes(cfg, world=world_size(cfg)):  # where a paper's recipe (experiment=imagenet/*) differs
            log.warning(note)
        check_run_dir(cfg, run_dir)
        L.seed_everything(cfg.seed, workers=True)
        dm = build_datamodule(cfg)
        probe = build_tokenizer(cfg, dm)
        if cfg.train_generator:
            build_generator(cfg, probe, dm.num_classes)
    with stage(stages, "feature_extractor"):
        extractor, extractor_info = (get_extractor(cfg, dm, cache, classifier_key(cfg)) if cfg.evaluate
                                     else (None, {}))

    results = RunRecord(
        run_dir=str(run_dir), started=now(), choices=group_choices(), overrides=task_overrides(),
        tokenizer=cfg.tokenizer.name,
        generator=cfg.generator.name if cfg.train_generator else None, data=cfg.data.name, seed=cfg.seed,
        tags=list(cfg.tags), config=OmegaConf.to_container(cfg, resolve=True), versions=versions(),
        git_sha=git_sha(), feature_extractor=extractor_info, metrics={}, costs={})
    with stage(stages, "tokenizer_train"):
        tokenizer, tokenizer_dir = get_tokenizer(cfg, dm, cache)
    tok_meta = ArtifactCache.meta(tokenizer_dir)
    results["tokenizer_artifact"] = str(tokenizer_dir)
    results["spec"] = tokenizer.spec.to_dict()
    results["costs"]["stage1_img_per_s"] = tok_meta["train_img_per_s"]
    results["costs"]["stage1_seconds"] = tok_meta["train_seconds"]
    if cfg.evaluate:
        with stage(stages, "tokenizer_eval"):
            results["metrics"]["tokenizer"] = evaluate_tokenizer(tokenizer, dm, extractor, cfg, run_dir)

    if cfg.train_generator:
        with stage(stages, "encode"):
            store = get_token_cache(cfg, tokenizer, tokenizer_dir, dm, cache)
        with stage(stages, "generator_train"):
            stage2 = train_generator(cfg, tokenizer, store, dm.num_classes, run_dir)
        results["costs"]["stage2_img_per_s"] = stage2.steps * stage2.batch_size / max(stage2.seconds, 1e-9)
        results["costs"]["stage2_seconds"] = stage2.seconds
        if cfg.evaluate:
            with stage(stages, "reference_stats"):  # real-image features of the test split
                reference = reference_metrics(extractor, dm, min(cfg.metrics.num_reference, len(dm.test_set)), cfg)
            with stage(stages, "generator_eval"):  # what the entries below leave: grids, npz
                generator = stage2.task.sampler().eval()
                metrics, _, _ = evaluate_generator(generator, tokenizer, dm, reference, cfg, run_dir)
            for name, seconds in metrics.pop("stage_seconds").items():  # sampling, metrics, latency, test_loss
                stages[f"generator_{name}"] = seconds
                stages["generator_eval"] -= seconds
            results["metrics"]["generator"] = metrics
    results["costs"]["stage_seconds"] = {name: round(seconds, 3) for name, seconds in stages.items()}
    results["costs"]["total_seconds"] = time.perf_counter() - started
    results["finished"] = now()
    write_results(run_dir, results)
    return results


# --------------------------------------------------------------------------------------------- a finished run
def sample_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The sampling settings a command gives on its command line (`+sample.cfg=1.5`: its `sample` block)."""
    return OmegaConf.to_container(cfg.sample, resolve=True) if cfg.get("sample") else {}


def sampling_settings(run_sample: Mapping[str, Any], overrides: Mapping[str, Any], *,
                      generator: str | None) -> dict[str, Any]:
    """The run's `generator.sample` settings with `overrides` (a command's `+sample.<key>=…`) applied; a key the
    run's generator does not sample with is refused with its list of settings (a typo would otherwise be
    ignored, or reach the generator as an unknown keyword)."""
    unknown = [key for key in overrides if key not in run_sample]
    if unknown:
        names = ", ".join(f"sample.{key}" for key in unknown)
        verb = "is not a sampling setting" if len(unknown) == 1 else "are not sampling settings"
        raise ConfigError(f"{names} {verb} of generator={generator}; its settings: {', '.join(run_sample)}")
    return {**run_sample, **overrides}


@dataclass
class FinishedRun:
    results: RunRecord
    tokenizer: Tokenizer
    generator: Generator
    sampling: dict[str, Any]  # the run's generator.sample settings with the command's overrides


def load_run(run_dir: str | Path, *, ema: bool = True, overrides: Mapping[str, Any] | None = None) -> FinishedRun:
    """A finished run directory's record, tokenizer and generator (EMA weights by default); the sampling
    `overrides` are checked against the run's settings before any weights are read."""
    results = read_results(run_dir)
    if results.get("generator") is None:  # train_generator=false, or an imported tokenizer (official=mar_kl16)
        raise ConfigError(f"{run_dir} holds a tokenizer and no generator (a stage-1 run or an imported tokenizer): "
                          f"sampling and generator metrics need a run with a generator; the tokenizer is "
                          f"{results.get('tokenizer_artifact')}")
    run_sample = results["config"]["generator"]["sample"]
    sampling = sampling_settings(run_sample, overrides or {}, generator=results["config"]["generator"]["name"])
    tokenizer = load_tokenizer(Path(results["tokenizer_artifact"]))
    generator = load_generator(Path(run_dir), tokenizer, ema=ema)
    return FinishedRun(results=results, tokenizer=tokenizer, generator=generator, sampling=sampling)
