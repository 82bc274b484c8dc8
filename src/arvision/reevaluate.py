"""Re-evaluation of a finished run, or of a samples .npz, with any metric set and sample count (arvision-eval).

What it measures (`select`; null = everything that applies):
    fid, is, kid, precision, recall (k = 3), accuracy  — GenerationMetrics on the chosen extractor against
        `metrics.num_reference` real test images;
    sfid  — Fréchet distance on Inception's spatial features (ADM: `mixed_6/conv`, first 7 channels, 17×17×7;
        here torch-fidelity's `Mixed_6d.branch1x1`, the layer that TF node maps to). Only the Inception
        extractor has them: with `metrics.extractor=classifier` sFID is recorded as unavailable, never faked;
    sampling  — img/s over the timed batches (one warm-up batch excluded), network evaluations per image and
        their backbone/head split, the device, and on CUDA the peak memory (runs only);
    test_loss  — the generator's loss on `metrics.num_reference` test images in eval mode (runs only; for
        scaling-law fits).

A run is re-sampled with its own `generator.sample` settings; `sample` (the command's `+sample.<key>=…`) overrides
some of them, and a key the run's generator does not have is refused before any work. An .npz holds `arr_0`
uint8 (N, H, W, C) — the ADM evaluator's layout, written by arvision-sample — and optionally labels in `arr_1`
(ADM) or `labels` (arvision-sample), which the class accuracy needs. Its reference images come from the run's
dataset (`run=`) or from `data=<group>`.

With `reference=<ADM reference batch .npz>` (e.g. VIRTUAL_imagenet256_labeled.npz) the numbers are the ADM
evaluator's, as papers report them (`arvision.metrics.adm`): FID, sFID, IS, precision and recall on torch-fidelity's
Inception against the file's statistics and images, for every image of the .npz (as the evaluator reads it) or
`metrics.num_samples` images sampled from the run; no dataset is needed, `metrics.extractor` does not apply, and
kid / accuracy are not part of that protocol.

Each evaluation is appended to `evaluations` in the run's results.json (or in results.json next to the .npz)
with its provenance: date, git sha, versions, device, extractor, sample and reference counts, and settings (with
`reference=`: the reference file and its sha256 too).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from arvision import pipeline
from arvision.evaluation import (balanced_labels, get_extractor, reference_metrics, sample_images, test_loss,
                                 to_uint8)
from arvision.generators.base import Generator
from arvision.metrics import INCEPTION_WEIGHTS_FILE, MissingWeights, adm, frechet_distance, peak_memory
from arvision.results import (Evaluation, Metric, RunRecord, append_evaluation, git_sha, metric, now, unavailable,
                              value, versions)
from arvision.utils.artifacts import ArtifactCache
from arvision.utils.device import device_info, resolve_device
from arvision.utils.progress import track

GENERATION = ("fid", "is", "kid", "precision", "recall", "accuracy")
ALL_METRICS = (*GENERATION, "sfid", "sampling", "test_loss")
SFID_LAYER = "Mixed_6d.branch1x1"  # TF inception-2015-12-05 `mixed_6/conv`
SFID_CHANNELS = 7
ADM_METRICS = ("fid", "sfid", "is", "precision", "recall")  # what the ADM evaluator reports (reference=)
GENERATION_KEYS = {"fid": "fid", "is": "is_mean", "kid": "kid_mean", "precision": "precision", "recall": "recall",
                   "accuracy": "accuracy"}  # metric name → GenerationMetrics.compute() key


class EvalError(ValueError):
    """A request arvision-eval cannot carry out (bad selection, missing inputs); one line for the user."""


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


def selection(cfg: DictConfig, *, has_model: bool, has_npz: bool, adm_protocol: bool = False) -> list[str]:
    """The metric names to compute: `select=null` is everything that applies to the input (sampling cost needs
    a model to sample from, test loss a model; with an ADM reference, the evaluator's five and the sampling cost)."""
    sampling = has_model and not has_npz
    if cfg.select is None:
        if adm_protocol:
            return [*ADM_METRICS, *(["sampling"] if sampling else [])]
        return [m for m in ALL_METRICS if not (m == "test_loss" and not has_model)
                and not (m == "sampling" and not sampling)]
    chosen = [cfg.select] if isinstance(cfg.select, str) else list(cfg.select)
    unknown = sorted(set(chosen) - set(ALL_METRICS))
    if unknown:
        raise EvalError(f"select: unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}")
    allowed = (*ADM_METRICS, "sampling", "test_loss")
    outside = [m for m in chosen if m not in allowed]
    if adm_protocol and outside:
        raise EvalError(f"select: {', '.join(outside)} not part of the ADM protocol (reference={cfg.reference}); "
                        f"choose from {', '.join(allowed)}")
    return chosen


def data_config(cfg: DictConfig) -> DictConfig:
    """What the datamodule and the classifier extractor need, for an .npz without a run."""
    if cfg.get("data") is None:
        raise EvalError("an .npz without run=<dir> needs data=<group> (the dataset whose test split is the "
                        "reference), e.g. data=fashion_mnist")
    return OmegaConf.create({"data": OmegaConf.to_container(cfg.data, resolve=True),
                             "metrics": OmegaConf.to_container(cfg.metrics, resolve=True), "seed": cfg.seed,
                             "trainer": {"enable_progress_bar": False},
                             "paths": OmegaConf.to_container(cfg.paths, resolve=False)})


def inception_hint(err: MissingWeights) -> str:
    """The missing-weights message with where the file comes from."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:  # pragma: no cover - torch-fidelity is a dependency
        return str(err)
    return (f"{err} It is torch-fidelity's port of the TF Inception (2015-12-05); fetch it once on a machine "
            f"with network access from {URL_INCEPTION_V3} and copy {INCEPTION_WEIGHTS_FILE} to one of those "
            "places, or pass metrics.inception_weights=<file or folder>.")


# --------------------------------------------------------------------------------------------- measurements
def sampling_metrics(generator: Generator, labels: torch.Tensor, sampling: dict[str, Any], *, batch_size: int,
                     seed: int, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """Samples for `labels` and what their sampling cost: img/s (warm-up excluded), peak CUDA memory, passes."""
    cost = generator.sampling_cost(**sampling)
    memory: dict[str, float] = {}
    with peak_memory(device, memory):
        images, seconds = sample_images(generator, generator.tokenizer_on(device), labels, batch_size=batch_size,
                                        seed=seed, **sampling)
    return images, {
        "sample_img_per_s": metric(len(labels) / seconds, device=device.type, batch_size=batch_size,
                                   num_samples=len(labels), warmup=True, **sampling),
        "peak_memory_mb": memory.get("peak_memory_mib"),  # CUDA only
        "nfe_per_image": cost.passes, "sampling_cost": cost.to_dict()}


def feature_metrics(chosen: list[str], images: torch.Tensor, labels: torch.Tensor | None, run_cfg: DictConfig, dm,
                    *, artifact_dir: str, device: torch.device) -> tuple[dict[str, Metric | float], dict[str, Any]]:
    """The chosen generation metrics and sFID of `images` against the test split; and the extractor's info."""
    m = run_cfg.metrics
    extractor, info = get_extractor(run_cfg, dm, ArtifactCache(artifact_dir), pipeline.classifier_key(run_cfg))
    extractor.to(device)
    spatial = SpatialFeatures(extractor) if "sfid" in chosen and extractor.name == "inception" else None
    out: dict[str, Metric | float] = {}
    try:
        n_ref = min(m.num_reference, len(dm.test_set))
        reference = reference_metrics(extractor, dm, n_ref, run_cfg)
        if spatial is not None:
            spatial.phase = "fake"
        reference.reset(keep_real=True)
        for k, img in enumerate(track(images.split(m.batch_size), "sample features", total=len(images))):
            lab = None if labels is None else labels[k * m.batch_size: k * m.batch_size + len(img)]
            reference.update_fake(img, lab)
        # GenerationMetrics.compute does every metric at once (two 2048² eigendecompositions for FID): skip it
        # when only sFID was asked for.
        gen = reference.compute() if any(name in chosen for name in GENERATION) else {"num_real": n_ref}
        ex, n = extractor.name, len(images)
        for name in GENERATION:
            if name not in chosen:
                continue
            if GENERATION_KEYS[name] in gen:
                out[name] = metric(gen[GENERATION_KEYS[name]], extractor=ex, num_samples=n,
                                   num_reference=gen["num_real"])
            else:  # only accuracy can be missing
                out[name] = unavailable("the samples carry no labels" if labels is None
                                        else f"the {ex} extractor's classes are not the dataset's")
        if "is" in out and "is_std" in gen:
            out["is_std"] = gen["is_std"]
        if "kid" in out and "kid_std" in gen:
            out["kid_std"] = gen["kid_std"]
        if "sfid" in chosen:
            out["sfid"] = (
                metric(spatial.sfid(), extractor=f"inception:{SFID_LAYER}[:{SFID_CHANNELS}]", num_samples=n,
                       num_reference=gen["num_real"], mapping="ADM mixed_6/conv; not checked against the "
                       "TF evaluator") if spatial is not None
                else unavailable(f"sFID needs the Inception extractor's spatial features; this evaluation "
                                 f"used metrics.extractor={ex}"))
    finally:
        if spatial is not None:
            spatial.close()
    return out, info


# --------------------------------------------------------------------------------------------- ADM protocol
def adm_metrics(chosen: list[str], samples: adm.NpzImages | torch.Tensor, reference: adm.AdmReference,
                model: adm.AdmInception, *, batch_size: int,
                device: torch.device) -> tuple[dict[str, Metric], dict[str, Any]]:
    """The chosen ADM-evaluator metrics of `samples` (an .npz's images, or generated images in [-1, 1]) against
    `reference`; and the extractor's description. Every number names the extractor, the sample count and the
    reference file with its sha256."""
    if isinstance(samples, adm.NpzImages):
        n, batches = len(samples), samples.batches(batch_size)
    else:
        n, batches = len(samples), (to_uint8(chunk) for chunk in samples.split(batch_size))
    fake = adm.featurize(model, track(batches, "ADM sample features", total=n))
    # The reference's images are featurised only when a number needs them: precision/recall always, FID and sFID
    # when the file holds no precomputed statistics (the evaluator then takes them from these images).
    needs_images = ("precision" in chosen or "recall" in chosen
                    or (reference.pool is None and ("fid" in chosen or "sfid" in chosen)))
    real = None
    if needs_images and reference.images is not None:
        real = adm.featurize(model, track(reference.images.batches(batch_size), "ADM reference features",
                                          total=len(reference.images)))
    source = {"extractor": adm.ADM_EXTRACTOR, "num_samples": n, "reference": str(reference.path),
              "reference_sha256": reference.sha256}
    out: dict[str, Metric] = {}
    for name, features, stats, keys in (("fid", fake.pool, reference.pool, "mu/sigma"),
                                        ("sfid", fake.spatial, reference.spatial, "mu_s/sigma_s")):
        if name not in chosen:
            continue
        if stats is None and reference.pool is None and real is not None:
            stats, keys = adm.statistics(real.pool if name == "fid" else real.spatial), f"arr_0 ({len(real)} images)"
        if stats is None:
            out[name] = unavailable(f"the reference file has no {keys}: {reference.path}")
            continue
        out[name] = metric(adm.frechet_distance(adm.statistics(features), stats), **source,
                           features="pool_3" if name == "fid" else "mixed_6/conv[:7]", reference_statistics=keys)
    if "is" in chosen:
        out["is"] = metric(adm.inception_score(fake.logits), **source, split_size=adm.IS_SPLIT_SIZE,
                           num_splits=-(-n // adm.IS_SPLIT_SIZE))
    if "precision" in chosen or "recall" in chosen:
        if real is None:
            reason = f"the reference file has no images (arr_0) to compare with: {reference.path}"
            pr: dict[str, Metric] = {"precision": unavailable(reason), "recall": unavailable(reason)}
        else:
            precision, recall = adm.precision_recall(torch.from_numpy(real.pool).to(device),
                                                     torch.from_numpy(fake.pool).to(device))
            pr = {key: metric(v, **source, num_reference=len(real), k=adm.PR_K)
                  for key, v in (("precision", precision), ("recall", recall))}
        out.update({key: v for key, v in pr.items() if key in chosen})
    return out, model.weights_info()


# --------------------------------------------------------------------------------------------- arvision-eval
def reevaluate(cfg: DictConfig) -> dict[str, Any]:
    """One evaluation entry, appended to the results.json it belongs to (see the module docstring); the returned
    entry also names that file (`results_file`)."""
    if cfg.run is None and cfg.npz is None:
        raise EvalError("give run=<run dir> (re-sample a finished run) or npz=<samples.npz> (evaluate samples)")
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    overrides = pipeline.sample_overrides(cfg)
    adm_protocol = cfg.get("reference") is not None
    chosen = selection(cfg, has_model=cfg.run is not None, has_npz=cfg.npz is not None, adm_protocol=adm_protocol)
    reference: adm.AdmReference | None = None
    model: adm.AdmInception | None = None
    if adm_protocol and any(name in chosen for name in ADM_METRICS):
        # Checked before any sampling: a wrong reference file or missing weights fail in seconds, not after hours.
        try:
            reference = adm.read_reference(cfg.reference)
        except adm.AdmError as err:
            raise EvalError(str(err)) from None
        model = adm.AdmInception(cfg.metrics.inception_weights, device)
    generator: Generator | None = None
    sampling: dict[str, Any] | None = None
    if cfg.run is not None:
        run = pipeline.load_run(cfg.run, ema=cfg.ema, overrides=overrides)
        generator, sampling = run.generator, run.sampling
        run_cfg = OmegaConf.create(run.results["config"])
        with open_dict(run_cfg):
            # The classifier extractor stays the run's own, so numbers compare with its training-time evaluation.
            run_cfg.metrics = OmegaConf.merge(cfg.metrics, {"classifier": run_cfg.metrics.classifier})
            run_cfg.paths.artifact_dir = cfg.paths.artifact_dir
        target, new = Path(cfg.run), run.results
    else:
        if overrides:
            raise EvalError(f"sample.{next(iter(overrides))}: an .npz holds samples already drawn; sampling "
                            "overrides need run=<run dir>")
        run_cfg = None if adm_protocol else data_config(cfg)  # the ADM reference replaces the dataset
        target = Path(cfg.npz).parent
        new = RunRecord(run_dir=str(target), data=None if run_cfg is None else run_cfg.data.get("name"),
                        tokenizer=None, generator=None, samples_npz=str(cfg.npz), metrics={})
    m = cfg.metrics
    # With an ADM reference only the test loss reads the dataset.
    needs_data = run_cfg is not None and (not adm_protocol or ("test_loss" in chosen and generator is not None))
    dm = pipeline.build_datamodule(run_cfg) if needs_data else None
    metrics: dict[str, Any] = {}
    info: dict[str, Any] = {}
    images = None

    if generator is not None:
        generator.to(device)
    if "test_loss" in chosen and generator is None:
        metrics["test_loss"] = unavailable("an .npz without run=<dir> has no model to compute a loss with")
    elif "test_loss" in chosen:
        n_ref = min(m.num_reference, len(dm.test_set))
        metrics["test_loss"] = metric(test_loss(generator, dm, num_images=n_ref, batch_size=m.batch_size,
                                                seed=m.seed, device=device), num_samples=n_ref, split="test")
    num_evaluated = None
    if any(name in chosen for name in (*GENERATION, "sfid", "sampling")):
        if cfg.npz is not None:
            if not adm_protocol:  # the ADM path streams the .npz instead of loading it
                images, labels = load_npz(cfg.npz, m.num_samples)
            if "sampling" in chosen:
                metrics["sample_img_per_s"] = unavailable("samples read from an .npz are not timed")
        else:
            labels = balanced_labels(m.num_samples, generator.num_classes if dm is None else dm.num_classes)
            images, cost = sampling_metrics(generator, labels, sampling, batch_size=m.batch_size, seed=m.seed,
                                            device=device)
            if "sampling" in chosen:
                metrics.update(cost)
        if reference is not None and model is not None:
            try:
                samples = adm.NpzImages(cfg.npz) if cfg.npz is not None else images
                measured, info = adm_metrics(chosen, samples, reference, model, batch_size=m.batch_size,
                                             device=device)
            except adm.AdmError as err:
                raise EvalError(str(err)) from None
            finally:
                model.close()
            metrics.update(measured)
            num_evaluated = len(samples)
        elif any(name in chosen for name in (*GENERATION, "sfid")):
            measured, info = feature_metrics(chosen, images, labels, run_cfg, dm, artifact_dir=cfg.paths.artifact_dir,
                                             device=device)
            metrics.update(measured)

    entry = Evaluation(
        date=now(), git_sha=git_sha(), overrides=pipeline.task_overrides(), versions=versions(),
        source="npz" if cfg.npz else "run",
        npz=str(cfg.npz) if cfg.npz else None, ema=cfg.ema if generator is not None else None,
        device=device_info(device), feature_extractor=info, metrics=metrics,
        settings={"select": chosen, "num_samples": m.num_samples, "num_reference": m.num_reference,
                  "seed": m.seed, "metrics": OmegaConf.to_container(m, resolve=True), "sample": sampling},
        seconds=time.perf_counter() - started)
    if reference is not None:
        entry["reference"] = reference.describe()
        entry["settings"]["num_samples"] = num_evaluated
        entry["settings"]["num_reference"] = len(reference.images) if reference.images is not None else None
        if num_evaluated != 50000:
            entry["settings"]["note"] = (f"{num_evaluated} samples: FID depends on the sample count; papers use "
                                         "50,000")
    elif cfg.npz is not None and images is not None and len(images) < (m.num_samples or 0):
        entry["settings"]["note"] = f"the .npz holds {len(images)} samples, fewer than metrics.num_samples"
    path = append_evaluation(target, entry, new=new)
    return {**entry, "results_file": str(path)}


def summary_row(entry: dict[str, Any]) -> dict[str, object]:
    """The row arvision-eval prints: each metric's value, or why it is unavailable."""
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
    return row


__all__ = ["ADM_METRICS", "ALL_METRICS", "EvalError", "SFID_CHANNELS", "SFID_LAYER", "SpatialFeatures", "adm_metrics",
           "inception_hint", "load_npz", "reevaluate", "selection", "summary_row"]
