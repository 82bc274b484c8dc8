"""The papers' training recipes (`experiment=imagenet/<recipe>`): what a run does differently from the one it names.

A recipe config carries a `recipe` block, the published numbers it was built from (global batch, epochs, peak lr,
warm-up, schedule, EMA, GPUs, augmentation; each with its source in the config). `recipe_notes` compares the run
about to start with that block and says, one line each, where it departs: a batch, step count, learning rate,
learning-rate or weight-decay schedule, EMA or TF32 setting changed on the command line. `pipeline.run` logs them
before any work, so a log says which paper's recipe a run follows and how closely.
"""

from __future__ import annotations

from omegaconf import DictConfig

# The recipe keys that say a learning-rate schedule (tasks/optim.py lr_factor), compared with generator.train's
# same-named keys; a recipe names only those its schedule uses (no warmup_start without a warm-up, say).
SCHEDULE_KEYS = ("lr_schedule", "min_lr_ratio", "decay_fraction", "warmup_start")
# generator.train's defaults (conf/generator/*.yaml), for a config written before the keys existed.
SCHEDULE_DEFAULTS = {"lr_schedule": "cosine", "min_lr_ratio": 0.1, "decay_fraction": 0.15, "warmup_start": None}


def recipe_notes(cfg: DictConfig, *, world: int) -> list[str]:
    """Where this run departs from `cfg.recipe` (empty without one, or under debug=tiny, whose sizes are not
    the paper's on purpose). `world`: the run's processes (devices × nodes)."""
    recipe = cfg.get("recipe")
    if recipe is None or cfg.get("tiny", False):
        return []
    train, name = cfg.generator.train, recipe.name
    notes = []
    per_epoch = recipe.images // recipe.global_batch
    if per_epoch != recipe.steps_per_epoch:
        notes.append(f"recipe {name}: steps_per_epoch={recipe.steps_per_epoch} but {recipe.images} images // "
                     f"{recipe.global_batch} = {per_epoch}")
    if train.batch_size != recipe.global_batch:
        notes.append(f"recipe {name}: generator.train.batch_size={train.batch_size} is not the published global batch "
                     f"{recipe.global_batch}; learning-rate rule: {recipe.lr_scaling}")
    if train.lr != recipe.peak_lr:
        notes.append(f"recipe {name}: generator.train.lr={train.lr} is not the published peak {recipe.peak_lr}")
    steps = recipe.epochs * recipe.steps_per_epoch
    if abs(train.max_steps - steps) > recipe.steps_per_epoch:  # the paper's epochs, to within one
        notes.append(f"recipe {name}: generator.train.max_steps={train.max_steps} is "
                     f"{train.max_steps / recipe.steps_per_epoch:.1f} epochs, not the published {recipe.epochs}")
    if train.warmup_steps != recipe.warmup_epochs * recipe.steps_per_epoch:
        notes.append(f"recipe {name}: generator.train.warmup_steps={train.warmup_steps}; the published warm-up is "
                     f"{recipe.warmup_epochs} epochs ({recipe.warmup_epochs * recipe.steps_per_epoch} steps)")
    for key in SCHEDULE_KEYS:
        if key in recipe and recipe[key] != train.get(key, SCHEDULE_DEFAULTS[key]):
            notes.append(f"recipe {name}: generator.train.{key}={train.get(key, SCHEDULE_DEFAULTS[key])} is not the "
                         f"published {recipe[key]} ({recipe.schedule})")
    end = recipe.get("weight_decay_end")
    run_end = train.get("weight_decay_end")
    if end is not None and end != (train.weight_decay if run_end is None else run_end):
        notes.append(f"recipe {name}: the published weight decay goes {train.weight_decay} → {end}; here it ends at "
                     f"{train.weight_decay if run_end is None else run_end} (generator.train.weight_decay_end)")
    if "ema_decay" in recipe and recipe.ema_decay != train.ema_decay:
        notes.append(f"recipe {name}: generator.train.ema_decay={train.ema_decay} is not the published "
                     f"{recipe.ema_decay} (null: no EMA)")
    if "tf32" in recipe and recipe.tf32 != cfg.trainer.get("tf32", False):
        notes.append(f"recipe {name}: trainer.tf32={cfg.trainer.get('tf32', False)}; the published run has TF32 "
                     f"{'on' if recipe.tf32 else 'off'}")
    if world != recipe.gpus:
        share = train.batch_size / (world * cfg.trainer.get("accumulate_grad_batches", 1))
        notes.append(f"recipe {name}: {world} processes instead of the published {recipe.gpus} GPUs: the global batch "
                     f"stays {train.batch_size}, {share:g} images per process and micro-batch")
    return notes
