"""arvision-train: tokenizer (stage 1, cached) → generator (stage 2) → evaluation → results.json.

    arvision-train                                   # VQ + raster on Fashion-MNIST, CPU demo budget
    arvision-train debug=tiny data=shapes             # any pair end to end in seconds
    arvision-train -m generator.model.depth=4,8       # a sweep; results.json per run, arvision-table to gather

The run itself is `arvision.pipeline.run`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from arvision import pipeline
from arvision.cli.common import config_dir, fail, print_table
from arvision.data import DatasetNotFound
from arvision.generators.base import IncompatibleTokenizer
from arvision.metrics import MissingWeights
from arvision.results import RESULTS_FILE, run_summary, value
from arvision.tasks import NonFiniteLoss
from arvision.tokenizers.base import MissingExtra
from arvision.utils.files import UnreadableFile


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = pipeline.run(cfg, run_dir)
    except (pipeline.ConfigError, DatasetNotFound, IncompatibleTokenizer, MissingExtra, MissingWeights, UnreadableFile,
            NonFiniteLoss) as err:
        fail(str(err))
    if pipeline.world_rank() == 0:
        print_table(f"arvision — {run_dir}", [run_summary(results)])
        ex = results["feature_extractor"]
        if ex:
            print(f"metrics: {ex['extractor']} features" + (
                f" (classifier test accuracy {ex['classifier_test_accuracy']:.3f})" if "classifier_test_accuracy" in ex
                else "") + f"; samples grid: {run_dir / 'samples.png'}; results: {run_dir / RESULTS_FILE}")
    gen = results["metrics"].get("generator")
    return value(gen["fid"]) if gen else None  # the value an Optuna sweep minimises


if __name__ == "__main__":
    main()
