"""arvision-train: tokenizer (stage 1, cached) → generator (stage 2) → evaluation → results.json.

    arvision-train                                   # VQ + raster on Fashion-MNIST, CPU demo budget
    arvision-train debug=tiny data=shapes             # any pair end to end in seconds
    arvision-train -m generator.model.depth=4,8       # a sweep; results.json per run, arvision-table to gather
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from arvision import pipeline
from arvision.cli.common import config_dir, fail, print_table, task_overrides, value
from arvision.data import DatasetNotFound
from arvision.evaluation import evaluate_generator, evaluate_tokenizer, get_extractor, reference_metrics
from arvision.generators.base import IncompatibleTokenizer
from arvision.metrics import MissingWeights
from arvision.tasks import NonFiniteLoss
from arvision.tokenizers.base import MissingExtra
from arvision.utils.artifacts import ArtifactCache
from arvision.utils.results import RESULTS_FILE, git_sha, now, versions, write_json_atomic

log = logging.getLogger("arvision")


def group_choices() -> dict[str, str]:
    try:
        choices = HydraConfig.get().runtime.choices
        return {k: v for k, v in choices.items() if not k.startswith("hydra") and v is not None}
    except ValueError:  # composed outside @hydra.main (tests)
        return {}


@contextlib.contextmanager
def stage(stages: dict[str, float], name: str):
    """Add the wall-clock seconds of the block to `stages[name]` (a cache hit shows as the time to load it)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - start


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """The whole run; returns the results dict (also written to `run_dir/results.json`)."""
    started = time.perf_counter()
    stages: dict[str, float] = {}  # wall-clock per stage of this run → costs.stage_seconds
    cfg = pipeline.finalize_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    cache = ArtifactCache(cfg.paths.artifact_dir)

    # Everything that can be wrong with the request fails here, before any training.
    with stage(stages, "setup"):
        pipeline.check_machine(cfg)
        dm = pipeline.build_datamodule(cfg)
        probe = pipeline.build_tokenizer(cfg, dm)
        if cfg.train_generator:
            pipeline.build_generator(cfg, probe, dm.num_classes)
    with stage(stages, "feature_extractor"):
        extractor, extractor_info = (get_extractor(cfg, dm, cache, pipeline.classifier_key(cfg)) if cfg.evaluate
                                     else (None, {}))

    results: dict = {
        "run_dir": str(run_dir), "started": now(), "choices": group_choices(), "overrides": task_overrides(),
        "tokenizer": cfg.tokenizer.name, "generator": cfg.generator.name if cfg.train_generator else None,
        "data": cfg.data.name, "seed": cfg.seed, "tags": list(cfg.tags),
        "config": OmegaConf.to_container(cfg, resolve=True), "versions": versions(), "git_sha": git_sha(),
        "feature_extractor": extractor_info, "metrics": {}, "costs": {},
    }
    with stage(stages, "tokenizer_train"):
        tokenizer, tokenizer_dir = pipeline.get_tokenizer(cfg, dm, cache)
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
            tokens, labels = pipeline.get_token_cache(cfg, tokenizer, tokenizer_dir, dm, cache)
        with stage(stages, "generator_train"):
            stage2 = pipeline.train_generator(cfg, tokenizer, tokens, labels, dm.num_classes, run_dir)
        results["costs"]["stage2_img_per_s"] = stage2.steps * stage2.batch_size / max(stage2.seconds, 1e-9)
        results["costs"]["stage2_seconds"] = stage2.seconds
        if cfg.evaluate:
            with stage(stages, "reference_stats"):  # real-image features of the test split
                reference = reference_metrics(extractor, dm, min(cfg.metrics.num_reference, len(dm.test_set)), cfg)
            with stage(stages, "generator_eval"):  # what the three entries below leave: grids, npz
                generator = stage2.task.sampler().eval()
                metrics, _, _ = evaluate_generator(generator, tokenizer, dm, reference, cfg, run_dir)
            for name, seconds in metrics.pop("stage_seconds").items():  # sampling, metrics, test_loss
                stages[f"generator_{name}"] = seconds
                stages["generator_eval"] -= seconds
            results["metrics"]["generator"] = metrics
    results["costs"]["stage_seconds"] = {name: round(seconds, 3) for name, seconds in stages.items()}
    results["costs"]["total_seconds"] = time.perf_counter() - started
    results["finished"] = now()
    write_json_atomic(run_dir / RESULTS_FILE, results)
    return results


def summary_row(results: dict) -> dict[str, object]:
    tok = results["metrics"].get("tokenizer", {})
    gen = results["metrics"].get("generator", {})
    row = {"tokenizer": results["tokenizer"], "generator": results["generator"] or "-",
           "PSNR": value(tok.get("psnr")), "usage": value(tok.get("usage")), "rFID": value(tok.get("rfid"))}
    if gen:
        row.update({"FID": value(gen["fid"]), "IS": value(gen["is"]), "prec": value(gen["precision"]),
                    "recall": value(gen["recall"]), "accuracy": value(gen.get("accuracy")),
                    "sample img/s": value(gen["sample_img_per_s"]), "NFE": gen["nfe_per_image"]})
    row["train img/s (s1/s2)"] = "{:.0f}/{:.0f}".format(results["costs"].get("stage1_img_per_s", 0),
                                                          results["costs"].get("stage2_img_per_s", 0))
    return row


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = train(cfg, run_dir)
    except (pipeline.ConfigError, DatasetNotFound, IncompatibleTokenizer, MissingExtra, MissingWeights,
            NonFiniteLoss) as err:
        fail(str(err))
    if pipeline.world_rank() == 0:
        print_table(f"arvision — {run_dir}", [summary_row(results)])
        ex = results["feature_extractor"]
        if ex:
            print(f"metrics: {ex['extractor']} features" + (
                f" (classifier test accuracy {ex['classifier_test_accuracy']:.3f})" if "classifier_test_accuracy" in ex
                else "") + f"; samples grid: {run_dir / 'samples.png'}; results: {run_dir / RESULTS_FILE}")
    gen = results["metrics"].get("generator")
    return value(gen["fid"]) if gen else None  # the value an Optuna sweep minimises


if __name__ == "__main__":
    main()
