"""arvision-eval run=<run dir>: re-evaluate a finished run with any metric set and sample count.

The result is appended to the run's results.json under `evaluations`, with the settings that produced it.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from arvision import pipeline
from arvision.cli.common import config_dir, fail, print_table, value
from arvision.cli.sample import load_run, sampling_overrides
from arvision.evaluation import evaluate_generator, get_extractor, reference_metrics
from arvision.metrics import MissingWeights
from arvision.utils.artifacts import ArtifactCache
from arvision.utils.results import RESULTS_FILE, now, write_json_atomic


def reevaluate(cfg: DictConfig) -> dict:
    results, tokenizer, generator = load_run(cfg.run, ema=cfg.ema)
    run_cfg = OmegaConf.create(results["config"])
    run_cfg.metrics = cfg.metrics
    run_cfg.paths.artifact_dir = cfg.paths.artifact_dir
    run_cfg.generator.sample = OmegaConf.merge(run_cfg.generator.sample, sampling_overrides(cfg))
    dm = pipeline.build_datamodule(run_cfg)
    extractor, info = get_extractor(run_cfg, dm, ArtifactCache(cfg.paths.artifact_dir),
                                    pipeline.classifier_key(run_cfg))
    reference = reference_metrics(extractor, dm, min(cfg.metrics.num_reference, len(dm.test_set)), run_cfg)
    metrics, _, _ = evaluate_generator(generator, tokenizer, dm, reference, run_cfg)
    entry = {"date": now(), "ema": cfg.ema, "metrics": metrics, "feature_extractor": info,
             "settings": {"metrics": OmegaConf.to_container(cfg.metrics),
                          "sample": OmegaConf.to_container(run_cfg.generator.sample)}}
    results.setdefault("evaluations", []).append(entry)
    write_json_atomic(Path(cfg.run) / RESULTS_FILE, results)
    return entry


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        entry = reevaluate(cfg)
    except (FileNotFoundError, MissingWeights) as err:
        fail(str(err))
    row = {k: value(v) for k, v in entry["metrics"].items() if not isinstance(v, (list, str))}
    print_table(f"arvision-eval {cfg.run}", [row])
    print(json.dumps(entry["settings"]))


if __name__ == "__main__":
    main()
