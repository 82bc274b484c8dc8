"""arvision-sample run=<run dir> num_samples=N out=<file.npz>: export class-balanced samples (ADM npz layout).

Zero-shot editing of the run's test images (VAR's in-/out-painting, raster and next_scale generators):

    arvision-sample run=<run dir> edit=inpaint edit_mask=center num_samples=16     # regenerate the centre box
    arvision-sample run=<run dir> edit=outpaint num_samples=16                     # keep the centre, redo the border
    arvision-sample run=<run dir> edit=inpaint edit_mask=right sample.cfg=1.0      # complete the right half

The first `num_samples` test images are encoded, their known tokens teacher-forced and the rest sampled with the
run's sampling settings (`sample.*` overrides them); their class labels condition the generator. Writes
<run>/edit_<edit>_<mask>_<N>.npz (or `out`) with `images` (edited, uint8 N×H×W×C), `labels`, `masks` (bool N×H×W,
True = generated pixel) and `originals`, and a PNG next to it whose rows are original / masked / edited (16 per
row block, at most 64 images).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from arvision import pipeline
from arvision.cli.common import config_dir, fail
from arvision.evaluation import balanced_labels, sample_images, to_uint8
from arvision.generators.editing import (EDITABLE, EDITS, REGIONS, edit_images, known_pixels, masked_preview,
                                         supports_editing)
from arvision.utils.results import read_results

PREVIEW_COLUMNS, PREVIEW_MAX = 16, 64  # the edit PNG: row blocks of 16 (original / masked / edited), ≤ 64 images


class EditError(ValueError):
    """An edit request that cannot be carried out (bad option, a generator without `edit`, too few test images);
    one line for the user."""


def load_run(run: str | Path, *, ema: bool = True):
    """(results, tokenizer, generator) of a finished run directory."""
    results = read_results(run)
    tokenizer = pipeline.load_tokenizer(Path(results["tokenizer_artifact"]))
    generator = pipeline.load_generator(Path(run), tokenizer, ema=ema)
    return results, tokenizer, generator


def sampling_overrides(cfg: DictConfig) -> dict:
    """The `sample.*` settings given on the command line (null = keep the run's own)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.sample).items() if v is not None}


def export(cfg: DictConfig) -> Path:
    if cfg.get("edit") is not None:
        return export_edits(cfg)
    results, tokenizer, generator = load_run(cfg.run, ema=cfg.ema)
    sampling = {**results["config"]["generator"]["sample"], **sampling_overrides(cfg)}
    labels = balanced_labels(cfg.num_samples, generator.num_classes)
    images, seconds = sample_images(generator, tokenizer, labels, batch_size=cfg.batch_size, seed=cfg.seed,
                                    **sampling)
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / f"samples_{cfg.num_samples}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, arr_0=to_uint8(images), labels=labels.numpy())
    print(f"wrote {out}: {cfg.num_samples} samples, {cfg.num_samples / seconds:.1f} img/s, sampling {sampling}")
    return out


# --------------------------------------------------------------------------------------------- zero-shot editing
def edit_settings(generator, sampling: dict) -> tuple[dict, list[str]]:
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


def export_edits(cfg: DictConfig) -> Path:
    """Zero-shot in-/out-painting of the first `num_samples` test images (see the module docstring)."""
    if cfg.edit not in EDITS:
        raise EditError(f"edit must be null, {' or '.join(EDITS)}, got {cfg.edit!r}")
    if cfg.edit_mask not in REGIONS:
        raise EditError(f"edit_mask must be one of {', '.join(REGIONS)}, got {cfg.edit_mask!r}")
    if cfg.edit_source != "test":
        raise EditError(f"edit_source must be test (the run's test split), got {cfg.edit_source!r}")
    results, tokenizer, generator = load_run(cfg.run, ema=cfg.ema)
    if not supports_editing(generator):
        raise EditError(f"edit={cfg.edit} needs a generator with zero-shot editing ({', '.join(EDITABLE)}); "
                              f"this run's generator is {results.get('generator') or type(generator).__name__}")
    dm = pipeline.build_datamodule(OmegaConf.create(results["config"]))
    if not 1 <= cfg.num_samples <= len(dm.test_set):
        raise EditError(f"num_samples={cfg.num_samples}: edit needs 1 to {len(dm.test_set)} test images (the run's "
                        "test split)")
    originals_u8, labels = dm.reference_images(cfg.num_samples)
    originals = originals_u8.float() / 127.5 - 1.0
    n, _, height, width = originals.shape
    known = known_pixels(cfg.edit, cfg.edit_mask, height, width).expand(n, height, width)
    sampling = {**results["config"]["generator"]["sample"], **sampling_overrides(cfg)}
    sampling, ignored = edit_settings(generator, sampling)
    edited, seconds = edit_images(generator, tokenizer, originals, labels, known, batch_size=cfg.batch_size,
                                  seed=cfg.seed, **sampling)

    out = Path(cfg.out) if cfg.out else Path(cfg.run) / f"edit_{cfg.edit}_{cfg.edit_mask}_{n}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, images=to_uint8(edited), labels=labels.numpy(), masks=(~known).numpy(),
             originals=to_uint8(originals))
    grid = out.with_suffix(".png")
    save_image(preview(originals, masked_preview(originals, known), edited) * 0.5 + 0.5, grid,
               nrow=min(n, PREVIEW_COLUMNS))
    note = f" (not used by edit: {', '.join(ignored)})" if ignored else ""
    print(f"wrote {out} and {grid.name}: {n} test images, edit={cfg.edit} edit_mask={cfg.edit_mask}, "
          f"{(~known[0]).float().mean().item():.0%} of the pixels generated, {n / seconds:.1f} img/s, "
          f"sampling {sampling}{note}")
    return out


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except (FileNotFoundError, EditError) as err:
        fail(str(err))


if __name__ == "__main__":
    main()
