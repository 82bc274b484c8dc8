"""Samples and zero-shot edits of a finished run, written as .npz files (arvision-sample).

`export(cfg)` writes class-balanced samples in the ADM evaluator's layout (`arr_0` uint8 N×H×W×C, `labels`), or,
with `edit=inpaint|outpaint`, edits of the run's first `num_samples` test images: their known tokens are
teacher-forced and the rest sampled (VAR's in-/out-painting; generators that declare `supports_editing`). Both use
the run's sampling settings with the command's `+sample.<key>=…` overrides, checked against the run's own keys.

An edit writes <run>/edit_<edit>_<mask>_<N>.npz (or `out`) with `images` (edited, uint8 N×H×W×C), `labels`, `masks`
(bool N×H×W, True = generated pixel) and `originals`, and a PNG next to it whose rows are original / masked /
edited (16 per row block, at most 64 images).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from arvision import pipeline
from arvision.evaluation import balanced_labels, sample_images, to_uint8
from arvision.generators.base import Generator
from arvision.generators.editing import EDITS, REGIONS, edit_images, editable_generators, known_pixels, masked_preview
from arvision.utils.device import resolve_device
from arvision.utils.validate import SettingError, check_range

PREVIEW_COLUMNS, PREVIEW_MAX = 16, 64  # the edit PNG: row blocks of 16 (original / masked / edited), ≤ 64 images


class EditError(ValueError):
    """An edit request that cannot be carried out (bad option, a generator without `edit`, too few test images);
    one line for the user."""


@dataclass(frozen=True)
class Exported:
    path: Path     # the .npz written
    message: str   # one line for the user: what was written, how fast, with which settings


def export(cfg: DictConfig) -> Exported:
    """arvision-sample: samples (`edit=null`) or edits of test images (see the module docstring)."""
    try:
        for key in ("num_samples", "batch_size"):
            check_range(key, cfg[key], minimum=1, integer=True)
        check_range("image_size", cfg.get("image_size"), minimum=1, integer=True, optional=True)
    except SettingError as err:
        raise pipeline.ConfigError(str(err)) from None
    if cfg.get("edit") is not None:
        return export_edits(cfg)
    return export_samples(cfg)


def export_samples(cfg: DictConfig) -> Exported:
    device = resolve_device(cfg.device)
    run = pipeline.load_run(cfg.run, ema=cfg.ema, overrides=pipeline.sample_overrides(cfg))
    labels = balanced_labels(cfg.num_samples, run.generator.num_classes)
    images, seconds = sample_images(run.generator.to(device), run.tokenizer, labels, batch_size=cfg.batch_size,
                                    seed=cfg.seed, as_uint8=True, size=cfg.get("image_size"), **run.sampling)
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / f"samples_{cfg.num_samples}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, arr_0=to_uint8(images), labels=labels.numpy())
    return Exported(out, f"wrote {out}: {cfg.num_samples} samples, {cfg.num_samples / seconds:.1f} img/s, "
                         f"sampling {run.sampling}")


# --------------------------------------------------------------------------------------------- zero-shot editing
def edit_settings(generator: Generator, sampling: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The sampling settings `generator.edit` takes, and the names of the sample-only ones it does not (e.g. a
    decode fast path): editing decodes on its own path."""
    accepted = inspect.signature(generator.edit).parameters
    kept = {k: v for k, v in sampling.items() if k in accepted}
    return kept, sorted(set(sampling) - set(kept))


def preview(originals: torch.Tensor, masked: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Row blocks of PREVIEW_COLUMNS images: original / masked / edited, for the first PREVIEW_MAX images."""
    rows = []
    for start in range(0, min(len(originals), PREVIEW_MAX), PREVIEW_COLUMNS):
        part = slice(start, min(start + PREVIEW_COLUMNS, PREVIEW_MAX, len(originals)))
        block = [originals[part], masked[part], edited[part]]
        if block[0].shape[0] < PREVIEW_COLUMNS and start:  # pad a short last block so its rows stay aligned
            pad = originals.new_full((PREVIEW_COLUMNS - block[0].shape[0], *originals.shape[1:]), -1.0)
            block = [torch.cat([b, pad]) for b in block]
        rows += block
    return torch.cat(rows)


def export_edits(cfg: DictConfig) -> Exported:
    """Zero-shot in-/out-painting of the first `num_samples` test images (see the module docstring)."""
    if cfg.edit not in EDITS:
        raise EditError(f"edit must be null, {' or '.join(EDITS)}, got {cfg.edit!r}")
    if cfg.edit_mask not in REGIONS:
        raise EditError(f"edit_mask must be one of {', '.join(REGIONS)}, got {cfg.edit_mask!r}")
    if cfg.edit_source != "test":
        raise EditError(f"edit_source must be test (the run's test split), got {cfg.edit_source!r}")
    device = resolve_device(cfg.device)
    run = pipeline.load_run(cfg.run, ema=cfg.ema, overrides=pipeline.sample_overrides(cfg))
    run.generator.to(device)
    if not run.generator.supports_editing:
        raise EditError(f"edit={cfg.edit} needs a generator with zero-shot editing "
                        f"({', '.join(editable_generators())}); this run's generator is {run.generator.name}")
    dm = pipeline.build_datamodule(OmegaConf.create(run.results["config"]))
    if not 1 <= cfg.num_samples <= len(dm.test_set):
        raise EditError(f"num_samples={cfg.num_samples}: edit needs 1 to {len(dm.test_set)} test images (the run's "
                        "test split)")
    originals_u8, labels = dm.reference_images(cfg.num_samples)
    originals = originals_u8.float() / 127.5 - 1.0
    n, _, height, width = originals.shape
    known = known_pixels(cfg.edit, cfg.edit_mask, height, width).expand(n, height, width)
    sampling, ignored = edit_settings(run.generator, run.sampling)
    edited, seconds = edit_images(run.generator, run.tokenizer, originals, labels, known, batch_size=cfg.batch_size,
                                  seed=cfg.seed, **sampling)

    out = Path(cfg.out) if cfg.out else Path(cfg.run) / f"edit_{cfg.edit}_{cfg.edit_mask}_{n}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, images=to_uint8(edited), labels=labels.numpy(), masks=(~known).numpy(),
             originals=to_uint8(originals))
    grid = out.with_suffix(".png")
    save_image(preview(originals, masked_preview(originals, known), edited) * 0.5 + 0.5, grid,
               nrow=min(n, PREVIEW_COLUMNS))
    note = f" (not used by edit: {', '.join(ignored)})" if ignored else ""
    return Exported(out, f"wrote {out} and {grid.name}: {n} test images, edit={cfg.edit} edit_mask={cfg.edit_mask}, "
                         f"{(~known[0]).float().mean().item():.0%} of the pixels generated, {n / seconds:.1f} img/s, "
                         f"sampling {sampling}{note}")


__all__ = ["EditError", "Exported", "edit_settings", "export", "export_edits", "export_samples", "preview"]
