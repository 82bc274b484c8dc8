"""arvision-eval: re-evaluate a finished run, or a samples .npz, with any metric set and sample count.

    arvision-eval run=<run dir> metrics.num_samples=50000 metrics.extractor=inception
    arvision-eval run=<run dir> select=[fid,test_loss] sample.cfg=1.5 sample.steps=12      # any subset, any sampling
    arvision-eval npz=<samples.npz> data=fashion_mnist                                      # ADM-layout samples
    arvision-eval run=<run dir> npz=<run dir>/samples_50000.npz                            # a run's exported samples

What it measures (`select`; null = everything that applies):
    fid, is, kid, precision, recall (k = 3), accuracy  — GenerationMetrics on the chosen extractor against
        `metrics.num_reference` real test images;
    sfid  — Fréchet distance on Inception's spatial features (ADM: `mixed_6/conv`, first 7 channels, 17×17×7;
        here torch-fidelity's `Mixed_6d.branch1x1`, the layer that TF node maps to). Only the Inception
        extractor has them: with `metrics.extractor=classifier` sFID is recorded as unavailable, never faked;
    sampling  — img/s over the timed batches (one warm-up batch excluded), network evaluations per batch and
        their backbone/head split, the device, and on CUDA the peak memory (runs only);
    test_loss  — the generator's loss on `metrics.num_reference` test images in eval mode (runs only; for
        scaling-law fits).

An .npz holds `arr_0` uint8 (N, H, W, C) — the ADM evaluator's layout, written by `arvision-sample` — and
optionally labels in `arr_1` (ADM) or `labels` (arvision-sample), which the class accuracy needs. Its reference
images come from the run's dataset (`run=`) or from `data=<group>`.

Each evaluation is appended to `evaluations` in the run's results.json (or in results.json next to the .npz)
with its provenance: date, git sha, versions, device, extractor, sample and reference counts, and settings.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from arvision import pipeline
from arvision.cli.common import config_dir, fail, print_table, task_overrides, value
from arvision.cli.sample import load_run, sampling_overrides
from arvision.data import DatasetNotFound
from arvision.evaluation import balanced_labels, get_extractor, reference_metrics, sample_images, test_loss
from arvision.metrics import INCEPTION_WEIGHTS_FILE, MissingWeights, frechet_distance
from arvision.utils.artifacts import ArtifactCache
from arvision.utils.results import RESULTS_FILE, git_sha, metric, now, read_results, versions, write_json_atomic

GENERATION = ("fid", "is", "kid", "precision", "recall", "accuracy")
ALL_METRICS = (*GENERATION, "sfid", "sampling", "test_loss")
SFID_LAYER = "Mixed_6d.branch1x1"  # TF inception-2015-12-05 `mixed_6/conv`
SFID_CHANNELS = 7


class EvalError(ValueError):
    """A request arvision-eval cannot carry out (bad selection, missing inputs); one line for the user."""


# --------------------------------------------------------------------------------------------- device
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device={name} needs a CUDA GPU and none is visible; use device=cpu or device=auto")
    return device


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "count": torch.cuda.device_count()}
    return {"type": device.type, "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------- sFID
class SpatialFeatures:
    """Captures Inception's 17×17 `Mixed_6d.branch1x1` activations (first 7 channels, flattened) on every
    forward of the extractor, for the real and then the generated images (`phase` says which list fills)."""

    def __init__(self, extractor: torch.nn.Module) -> None:
        layer = extractor.net.get_submodule(SFID_LAYER)
        self.features: dict[str, list[torch.Tensor]] = {"real": [], "fake": []}
        self.phase = "real"
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output: torch.Tensor) -> None:
        self.features[self.phase].append(output[:, :SFID_CHANNELS].flatten(1).float().cpu())

    def sfid(self) -> float:
        real, fake = (torch.cat(self.features[k]).double() for k in ("real", "fake"))
        return frechet_distance(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))

    def close(self) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------------------------- inputs
def load_npz(path: str | Path, num_samples: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ADM-layout samples as float images in [-1, 1] (N, C, H, W) and labels (or None); the first `num_samples`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no samples file {path}")
    with np.load(path) as npz:
        if "arr_0" not in npz:
            raise EvalError(f"{path} has no arr_0 (ADM layout: arr_0 uint8 N×H×W×C, labels in arr_1 or labels)")
        images = npz["arr_0"]
        labels = npz["arr_1"] if "arr_1" in npz else npz["labels"] if "labels" in npz else None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise EvalError(f"{path}: arr_0 must be uint8 N×H×W×C; got {images.dtype} {images.shape}")
    n = len(images) if num_samples is None else min(num_samples, len(images))
    x = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = None if labels is None else torch.from_numpy(np.asarray(labels[:n])).long()
    return x, y


def timed_samples(generator, labels: torch.Tensor, *, batch_size: int, seed: int, device: torch.device,
                  **sampling: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """`sample_images` on `device` (its warm-up batch is outside the timing) and, on CUDA, the peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    images, seconds = sample_images(generator, generator.tokenizer_on(device), labels, batch_size=batch_size,
                                    seed=seed, **sampling)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return images, {"seconds": seconds, "img_per_s": len(labels) / seconds, "peak_memory_mb": peak}


@torch.no_grad()
# --------------------------------------------------------------------------------------------- evaluation
def _selection(cfg: DictConfig, *, has_model: bool, has_npz: bool) -> list[str]:
    """The metric names to compute: `select=null` is everything that applies to the input (sampling cost needs
    a model to sample from, test loss a model)."""
    if cfg.select is None:
        return [m for m in ALL_METRICS if not (m == "test_loss" and not has_model)
                and not (m == "sampling" and (has_npz or not has_model))]
    chosen = [cfg.select] if isinstance(cfg.select, str) else list(cfg.select)
    unknown = sorted(set(chosen) - set(ALL_METRICS))
    if unknown:
        raise EvalError(f"select: unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}")
    return chosen


def _unavailable(reason: str) -> dict[str, Any]:
    return {"value": None, "unavailable": reason}


def _data_config(cfg: DictConfig) -> DictConfig:
    """What the datamodule and the classifier extractor need, for an .npz without a run."""
    if cfg.get("data") is None:
        raise EvalError("an .npz without run=<dir> needs data=<group> (the dataset whose test split is the "
                        "reference), e.g. data=fashion_mnist")
    return OmegaConf.create({"data": OmegaConf.to_container(cfg.data, resolve=True),
                             "metrics": OmegaConf.to_container(cfg.metrics, resolve=True), "seed": cfg.seed,
                             "trainer": {"enable_progress_bar": False},
                             "paths": OmegaConf.to_container(cfg.paths, resolve=False)})


def _inception_hint(err: MissingWeights) -> str:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:  # pragma: no cover - torch-fidelity is a dependency
        return str(err)
    return (f"{err} It is torch-fidelity's port of the TF Inception (2015-12-05); fetch it once on a machine "
            f"with network access from {URL_INCEPTION_V3} and copy {INCEPTION_WEIGHTS_FILE} to one of those "
            "places, or pass metrics.inception_weights=<file or folder>.")


def reevaluate(cfg: DictConfig) -> dict[str, Any]:
    """One evaluation entry, appended to the results.json it belongs to (see the module docstring)."""
    if cfg.run is None and cfg.npz is None:
        raise EvalError("give run=<run dir> (re-sample a finished run) or npz=<samples.npz> (evaluate samples)")
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    results: dict[str, Any]
    generator = None
    if cfg.run is not None:
        results, _, generator = load_run(cfg.run, ema=cfg.ema)
        run_cfg = OmegaConf.create(results["config"])
        with open_dict(run_cfg):
            # The classifier extractor stays the run's own, so numbers compare with its training-time evaluation.
            run_cfg.metrics = OmegaConf.merge(cfg.metrics, {"classifier": run_cfg.metrics.classifier})
            run_cfg.paths.artifact_dir = cfg.paths.artifact_dir
            run_cfg.generator.sample = OmegaConf.merge(run_cfg.generator.sample, sampling_overrides(cfg))
        target = Path(cfg.run) / RESULTS_FILE
    else:
        run_cfg = _data_config(cfg)
        target = Path(cfg.npz).parent / RESULTS_FILE
        results = read_results(target.parent) if target.exists() else {
            "run_dir": str(target.parent), "data": run_cfg.data.get("name"), "tokenizer": None, "generator": None,
            "samples_npz": str(cfg.npz), "metrics": {}}
    chosen = _selection(cfg, has_model=generator is not None, has_npz=cfg.npz is not None)
    m = cfg.metrics
    dm = pipeline.build_datamodule(run_cfg)
    metrics: dict[str, Any] = {}
    info: dict[str, Any] = {}
    images, labels = None, None

    if generator is not None:
        generator.to(device)
    if "test_loss" in chosen and generator is None:
        metrics["test_loss"] = _unavailable("an .npz without run=<dir> has no model to compute a loss with")
    elif "test_loss" in chosen:
        n_ref = min(m.num_reference, len(dm.test_set))
        metrics["test_loss"] = metric(test_loss(generator, dm, num_images=n_ref, batch_size=m.batch_size,
                                                seed=m.seed, device=device), num_samples=n_ref, split="test")

    wants_images = any(name in chosen for name in (*GENERATION, "sfid", "sampling"))
    if wants_images:
        sampling = dict(run_cfg.generator.sample) if generator is not None else {}
        if cfg.npz is not None:
            images, labels = load_npz(cfg.npz, m.num_samples)
        else:
            labels = balanced_labels(m.num_samples, dm.num_classes)
            images, cost = timed_samples(generator, labels, batch_size=m.batch_size, seed=m.seed, device=device,
                                         **sampling)
            labels = labels.cpu()
            if "sampling" in chosen:
                split = generator.sampling_cost(sampling.get("cfg", 1.0)) if hasattr(generator, "sampling_cost") \
                    else {}
                metrics["sample_img_per_s"] = metric(cost["img_per_s"], device=device.type,
                                                     batch_size=m.batch_size, num_samples=len(labels), warmup=True,
                                                     **sampling)
                metrics["peak_memory_mb"] = cost["peak_memory_mb"]
                metrics["nfe_per_image"] = generator.network_evaluations(sampling.get("cfg", 1.0))
                if split:
                    metrics["sampling_cost"] = split
        if "sampling" in chosen and cfg.npz is not None:
            metrics["sample_img_per_s"] = _unavailable("samples read from an .npz are not timed")

        needs_features = any(name in chosen for name in (*GENERATION, "sfid"))
        if needs_features:
            extractor, info = get_extractor(run_cfg, dm, ArtifactCache(cfg.paths.artifact_dir),
                                            pipeline.classifier_key(run_cfg))
            extractor.to(device)
            spatial = SpatialFeatures(extractor) if "sfid" in chosen and extractor.name == "inception" else None
            try:
                n_ref = min(m.num_reference, len(dm.test_set))
                reference = reference_metrics(extractor, dm, n_ref, run_cfg)
                if spatial is not None:
                    spatial.phase = "fake"
                reference.reset(keep_real=True)
                for k, img in enumerate(images.split(m.batch_size)):
                    lab = None if labels is None else labels[k * m.batch_size: k * m.batch_size + len(img)]
                    reference.update_fake(img, lab)
                # GenerationMetrics.compute does every metric at once (two 2048² eigendecompositions for FID):
                # skip it when only sFID was asked for.
                gen = reference.compute() if any(name in chosen for name in GENERATION) else {"num_real": n_ref}
                ex, n = extractor.name, len(images)
                keys = {"fid": "fid", "is": "is_mean", "kid": "kid_mean", "precision": "precision",
                        "recall": "recall", "accuracy": "accuracy"}
                for name in GENERATION:
                    if name not in chosen:
                        continue
                    if keys[name] in gen:
                        metrics[name] = metric(gen[keys[name]], extractor=ex, num_samples=n,
                                               num_reference=gen["num_real"])
                    else:  # only accuracy can be missing
                        metrics[name] = _unavailable("the samples carry no labels" if labels is None
                                                     else f"the {ex} extractor's classes are not the dataset's")
                if "is" in metrics and "is_std" in gen:
                    metrics["is_std"] = gen["is_std"]
                if "kid" in metrics and "kid_std" in gen:
                    metrics["kid_std"] = gen["kid_std"]
                if "sfid" in chosen:
                    metrics["sfid"] = (
                        metric(spatial.sfid(), extractor=f"inception:{SFID_LAYER}[:{SFID_CHANNELS}]", num_samples=n,
                               num_reference=gen["num_real"], mapping="ADM mixed_6/conv; not checked against the "
                               "TF evaluator") if spatial is not None
                        else _unavailable(f"sFID needs the Inception extractor's spatial features; this evaluation "
                                          f"used metrics.extractor={ex}"))
            finally:
                if spatial is not None:
                    spatial.close()

    entry = {
        "date": now(), "git_sha": git_sha(), "overrides": task_overrides(), "versions": versions(),
        "source": "npz" if cfg.npz else "run",
        "npz": str(cfg.npz) if cfg.npz else None, "ema": cfg.ema if generator is not None else None,
        "device": device_info(device), "feature_extractor": info, "metrics": metrics,
        "settings": {"select": chosen, "num_samples": m.num_samples, "num_reference": m.num_reference,
                     "seed": m.seed, "metrics": OmegaConf.to_container(m, resolve=True),
                     "sample": OmegaConf.to_container(run_cfg.generator.sample, resolve=True)
                     if generator is not None else None},
        "seconds": time.perf_counter() - started,
    }
    if cfg.npz is not None and images is not None and len(images) < (m.num_samples or 0):
        entry["settings"]["note"] = f"the .npz holds {len(images)} samples, fewer than metrics.num_samples"
    results.setdefault("evaluations", []).append(entry)
    write_json_atomic(target, results)
    entry["results_file"] = str(target)
    return entry


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        entry = reevaluate(cfg)
    except MissingWeights as err:
        fail(_inception_hint(err))
    except (FileNotFoundError, DatasetNotFound, EvalError) as err:
        fail(str(err))
    row: dict[str, object] = {}
    for name, v in entry["metrics"].items():
        if name == "sampling_cost":
            row.update({f"sampling_cost.{k}": c for k, c in v.items()})
        elif isinstance(v, dict) and "unavailable" in v:
            row[name] = f"unavailable: {v['unavailable']}"
        elif name == "peak_memory_mb" and v is None:
            row[name] = "n/a (not CUDA)"
        else:
            row[name] = value(v)
    print_table(f"arvision-eval {cfg.run or cfg.npz} ({entry['device']['type']})", [row])
    print(f"appended to {entry['results_file']}: " + json.dumps({"select": entry["settings"]["select"],
                                                                  "device": entry["device"]}))


if __name__ == "__main__":
    main()
