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
from omegaconf import DictConfig, OmegaConf, open_dict

from arvision.data.tokens import (ImageBatches, TokenDataset, cat_tokens, compact, step_loader)
from arvision.evaluation import evaluate_generator, evaluate_tokenizer, get_extractor, reference_metrics
from arvision.generators.base import Generator
from arvision.results import (RESULTS_FILE, RunRecord, git_sha, now, read_results, versions, write_json_atomic,
                              write_results)
from arvision.tasks import GeneratorTask, NonFiniteLoss, TokenizerTask
from arvision.tasks.resume import completed_steps, latest_checkpoint, roll_back
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

# What a stage-2 checkpoint in a run directory was trained with (see `check_run_dir`).
RUN_IDENTITY_FILE = "run_identity.json"
# Trainer settings that change only what is shown, not the weights.
DISPLAY_TRAINER_KEYS = {"enable_progress_bar", "log_every_n_steps", "enable_model_summary"}


# --------------------------------------------------------------------------------------------- configuration
def finalize_config(cfg: DictConfig) -> DictConfig:
    """Scale both stages' step budgets (and warm-ups) by the trainer's `steps_scale` times the run's `budget`."""
    cfg = cfg.copy()
    with open_dict(cfg):
        scale = float(cfg.trainer.get("steps_scale", 1.0)) * float(cfg.get("budget", 1.0))
        if scale <= 0:
            raise ConfigError(f"budget × trainer.steps_scale must be positive, got {scale}")
        for group in ("tokenizer", "generator"):
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
            check_range("generator.train.ema_decay", cfg.generator.train.ema_decay, minimum=0, below=1)
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


def data_identity(cfg: DictConfig) -> dict[str, Any]:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {k: v for k, v in data.items() if k not in DATA_LOADING_KEYS}


def tokenizer_key(cfg: DictConfig) -> str:
    return config_hash("tokenizer", cfg.tokenizer.model, cfg.tokenizer.train, data_identity(cfg), cfg.seed)


def classifier_key(cfg: DictConfig) -> str:
    return config_hash("classifier", cfg.metrics.classifier, data_identity(cfg), cfg.seed)


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """Everything that decides a run's generator weights: its tokenizer (by artifact key), generator network and
    training settings, data, seed and trainer. Sampling and evaluation settings are not part of it."""
    trainer = {k: v for k, v in trainer_kwargs(cfg).items() if k not in DISPLAY_TRAINER_KEYS}
    generator = {k: v for k, v in OmegaConf.to_container(cfg.generator, resolve=True).items() if k != "sample"}
    return {"tokenizer": tokenizer_key(cfg), "generator": generator,
            "data": data_identity(cfg), "seed": cfg.seed, "trainer": trainer}


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
    kwargs.pop("steps_scale", None)
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
                 grad_clip: float | None = None) -> L.Trainer:
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
    return L.Trainer(**trainer_kwargs(cfg), max_steps=max_steps, max_epochs=1, logger=loggers or False,
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
    if resume:
        log.info("resuming from %s", resume)
        done = loader.sampler.start_step = completed_steps(resume)
    start = time.perf_counter()
    try:
        trainer.fit(task, train_dataloaders=loader, ckpt_path=resume, weights_only=True)
    except NonFiniteLoss as err:
        raise NonFiniteLoss(f"{err}; {roll_back(Path(trainer.default_root_dir), trainer.global_step)}") from None
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
                           callbacks=instantiate_dict(cfg.get("callbacks")))
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
            "train_img_per_s": steps_run * train.batch_size * trainer.world_size / max(seconds, 1e-9),
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
    key = tokenizer_key(cfg)
    if cache.exists("tokenizer", key):
        log.info("stage 1: reusing tokenizer artifact %s", key)
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


def get_token_cache(cfg: DictConfig, tokenizer: Tokenizer, tokenizer_dir: Path, dm,
                    cache: ArtifactCache) -> tuple[Any, torch.Tensor]:
    model = OmegaConf.to_container(cfg.generator.model, resolve=True)
    encoding = check_target(model["_target_"]).token_encoding(tokenizer, model)
    # A generator's own encoding (FlexVAR's per-side ground truth) is another cache: its name joins the key.
    key = config_hash("tokens", tokenizer_dir.name, data_identity(cfg), *([encoding.name] if encoding.name else []))

    def build(tmp: Path) -> dict[str, Any]:
        start = time.perf_counter()
        tokens, labels = encode_dataset(tokenizer, dm.train_set, cfg.data.eval_batch_size, encode=encoding.encode)
        torch.save({"tokens": tokens, "labels": labels}, tmp / "tokens.pt")
        return {"kind": "tokens", "tokenizer": tokenizer_dir.name, "encoding": encoding.name,
                "num_items": len(labels), "encode_seconds": time.perf_counter() - start}

    path = cache.get_or_build("tokens", key, build)
    blob = load_weights(path / "tokens.pt")
    return blob["tokens"], blob["labels"]


# --------------------------------------------------------------------------------------------- stage 2
@dataclass
class Stage2:
    task: GeneratorTask
    seconds: float
    steps: int       # optimizer steps run in this call (timed)
    batch_size: int  # global: per-process batch × world size


def train_generator(cfg: DictConfig, tokenizer: Tokenizer, tokens: Any, labels: torch.Tensor, num_classes: int,
                    run_dir: Path) -> Stage2:
    L.seed_everything(cfg.seed, workers=True)
    generator = build_generator(cfg, tokenizer, num_classes)
    train = cfg.generator.train
    task = GeneratorTask(generator=generator, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
                         warmup_steps=train.warmup_steps, max_steps=train.max_steps, ema_decay=train.ema_decay,
                         compile=train.get("compile", False))
    loader = step_loader(TokenDataset(tokens, labels), batch_size=train.batch_size, num_steps=train.max_steps,
                         seed=cfg.seed)
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
    torch.save({"generator": task.generator.state_dict(), "ema": task.ema.module.state_dict(),
                "config": OmegaConf.to_container(cfg.generator.model, resolve=True), "num_classes": num_classes},
               run_dir / "generator.pt")
    return Stage2(task=task, seconds=seconds, steps=steps_run, batch_size=train.batch_size * trainer.world_size)


def load_generator(run_dir: Path, tokenizer: Tokenizer, *, ema: bool = True) -> Generator:
    path = Path(run_dir) / "generator.pt"
    blob = load_weights(path)
    try:
        generator = instantiate(blob["config"])(spec=tokenizer.spec, num_classes=blob["num_classes"])
    except RefusedTarget as err:
        raise UnreadableFile(f"{path}: {err}; the file was changed or written by other code") from None
    generator.attach_tokenizer(tokenizer)
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
            tokens, labels = get_token_cache(cfg, tokenizer, tokenizer_dir, dm, cache)
        with stage(stages, "generator_train"):
            stage2 = train_generator(cfg, tokenizer, tokens, labels, dm.num_classes, run_dir)
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
