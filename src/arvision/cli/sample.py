"""arvision-sample run=<run dir> num_samples=N out=<file.npz>: export class-balanced samples (ADM npz layout)."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from arvision import pipeline
from arvision.cli.common import config_dir, fail
from arvision.evaluation import balanced_labels, sample_images, to_uint8
from arvision.utils.results import read_results


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


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except FileNotFoundError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
