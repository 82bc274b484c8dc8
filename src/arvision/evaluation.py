"""Evaluation of a run: tokenizer reconstructions, generated samples, sampling cost.

Every metric is stored with the feature extractor and the number of samples that produced it. Sampling speed is
timed by `arvision.metrics.speed.timed` (warm-up excluded, device synchronised), as arvision-bench times it;
re-evaluation of a finished run is `arvision.reevaluate`.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from arvision.generators.base import Generator
from arvision.metrics import (ClassifierExtractor, ClassifierNet, CodebookUsage, FeatureExtractor, GenerationMetrics,
                              InceptionExtractor, count_parameters, psnr, ssim, timed, train_classifier)
from arvision.results import metric
from arvision.tokenizers.base import Tokenizer
from arvision.utils.artifacts import ArtifactCache
from arvision.utils.files import load_weights
from arvision.utils.progress import phase, track

log = logging.getLogger("arvision")


# --------------------------------------------------------------------------------------------- feature extractor
def get_extractor(cfg: DictConfig, dm, cache: ArtifactCache, key: str) -> tuple[FeatureExtractor, dict[str, Any]]:
    """The configured extractor; the classifier is trained once per dataset and cached as an artifact."""
    if cfg.metrics.extractor == "inception":
        return InceptionExtractor(cfg.metrics.inception_weights), {"extractor": "inception"}
    if cfg.metrics.extractor != "classifier":
        raise ValueError(f"metrics.extractor must be classifier or inception, got {cfg.metrics.extractor!r}")
    c = cfg.metrics.classifier

    def build(tmp: Path) -> dict[str, Any]:
        log.info("training the classifier feature extractor (once per dataset)")
        start = time.perf_counter()
        net, accuracy = train_classifier(dm.train_set, dm.test_set, in_channels=dm.channels,
                                         num_classes=dm.num_classes, width=c.width, epochs=c.epochs,
                                         batch_size=c.batch_size, lr=c.lr, seed=cfg.seed,
                                         # an imported run (arvision-import) has no trainer settings
                                         progress=bool(OmegaConf.select(cfg, "trainer.enable_progress_bar",
                                                                        default=True)))
        torch.save({"state_dict": net.state_dict(), "width": c.width, "in_channels": dm.channels,
                    "num_classes": dm.num_classes}, tmp / "classifier.pt")
        return {"kind": "classifier", "test_accuracy": accuracy, "train_seconds": time.perf_counter() - start,
                "num_test": len(dm.test_set)}

    path = cache.get_or_build("classifier", key, build)
    blob = load_weights(path / "classifier.pt")
    net = ClassifierNet(in_channels=blob["in_channels"], num_classes=blob["num_classes"], width=blob["width"])
    net.load_state_dict(blob["state_dict"])
    meta = ArtifactCache.meta(path)
    return ClassifierExtractor(net.eval()), {"extractor": "classifier", "artifact": path.name,
                                             "classifier_test_accuracy": meta["test_accuracy"]}


def reference_metrics(extractor: FeatureExtractor, dm, num_reference: int, cfg: DictConfig) -> GenerationMetrics:
    metrics = GenerationMetrics(extractor=extractor, num_classes=dm.num_classes)
    images, _ = dm.reference_images(num_reference)
    for chunk in track(images.split(cfg.metrics.batch_size), "reference statistics", total=len(images)):
        metrics.update_real(chunk.float() / 127.5 - 1.0)
    return metrics


# --------------------------------------------------------------------------------------------- tokenizer
@torch.no_grad()
def evaluate_tokenizer(tokenizer: Tokenizer, dm, extractor: FeatureExtractor, cfg: DictConfig,
                       out_dir: Path | None = None) -> dict[str, Any]:
    """PSNR/SSIM per image, rFID against the originals, eval-set codebook usage/perplexity, codec speed."""
    n = min(cfg.metrics.num_reference, len(dm.test_set))
    images, _ = dm.reference_images(n)
    images = images.float() / 127.5 - 1.0
    metrics = GenerationMetrics(extractor=extractor, num_classes=None)
    spec = tokenizer.spec
    usage = CodebookUsage(spec.vocab_size) if spec.kind == "discrete" else None
    # Per depth (RVQ) or per scale (multi-scale): usage of one codebook position can hide dead codes at another.
    parts = spec.depth if spec.layout == "depth" else len(spec.scales) if spec.layout == "scales" else 0
    part_usage = [CodebookUsage(spec.vocab_size) for _ in range(parts)]
    psnrs, ssims, encode_s, decode_s = [], [], 0.0, 0.0
    tokenizer.encode(images[:8])  # warm-up, excluded from the timings
    for chunk in track(images.split(cfg.metrics.batch_size), "tokenizer evaluation", total=n):
        start = time.perf_counter()
        tokens = tokenizer.encode(chunk)
        encode_s += time.perf_counter() - start
        start = time.perf_counter()
        recon = tokenizer.decode(tokens)
        decode_s += time.perf_counter() - start
        if usage is not None:
            usage.update(tokens if torch.is_tensor(tokens) else torch.cat([t.flatten() for t in tokens]))
            for k, part in enumerate(part_usage):
                part.update(tokens[..., k] if spec.layout == "depth" else tokens[k])
        psnrs.append(psnr(recon, chunk))
        ssims.append(ssim(recon, chunk))
        metrics.update_real(chunk)
        metrics.update_fake(recon)
    gen = metrics.compute()
    ex = extractor.name
    out = {
        "psnr": metric(torch.cat(psnrs).mean().item(), num_samples=n, split="test"),
        "ssim": metric(torch.cat(ssims).mean().item(), num_samples=n, split="test", data_range=1.0),
        "rfid": metric(gen["fid"], extractor=ex, num_samples=n, reference="test originals"),
        "encode_img_per_s": metric(n / encode_s, device="cpu"),
        "decode_img_per_s": metric(n / decode_s, device="cpu"),
        "params": count_parameters(tokenizer),
    }
    if usage is not None:
        out["usage"] = metric(usage.usage(), num_samples=n, scope="eval set")
        out["perplexity"] = metric(usage.perplexity(), num_samples=n, scope="eval set")
        unit = "depth" if spec.layout == "depth" else "scale"
        for k, part in enumerate(part_usage):
            out[f"usage_{unit}{k}"] = metric(part.usage(), num_samples=n, scope="eval set")
            out[f"perplexity_{unit}{k}"] = metric(part.perplexity(), num_samples=n, scope="eval set")
    if out_dir is not None:
        k = min(32, n)
        save_image(torch.cat([images[:k], tokenizer.decode(tokenizer.encode(images[:k]))]) * 0.5 + 0.5,
                   out_dir / "reconstructions.png", nrow=k // 2 if k >= 16 else k)
    return out


# --------------------------------------------------------------------------------------------- generator
def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


@torch.no_grad()
def sample_images(generator: Generator, tokenizer: Tokenizer, labels: torch.Tensor, *, batch_size: int,
                  seed: int, as_uint8: bool = False, size: int | None = None,
                  **sampling: Any) -> tuple[torch.Tensor, float]:
    """Generate and decode images for `labels`; returns images in [-1, 1] (on the CPU) and the timed seconds.
    `as_uint8`: each batch is rounded to uint8 (N, C, H, W) as it comes, so 50 000 samples at 256 px take 9.8 GB of
    memory instead of 39 GB of floats. `size`: the decoded images are resized to size × size (bicubic, before the
    clamp to [-1, 1]), as LlamaGen scores its 384-px models at 256 px.

    One small batch runs first as warm-up and is excluded from the timing; each batch of `batch_size` is timed.
    """
    device = next(generator.parameters()).device  # sample where the model is (the RNG must live there too)
    tokenizer.to(device)
    labels = labels.to(device)
    rng = torch.Generator(device=device).manual_seed(seed)
    batches = labels.split(batch_size)
    pending = iter(batches)
    chunks: list[torch.Tensor] = []

    def warm_up() -> None:
        tokenizer.decode(generator.sample(labels[: min(4, len(labels))],
                                          generator=torch.Generator(device=device).manual_seed(seed), **sampling))

    def next_batch() -> None:
        images = tokenizer.decode(generator.sample(next(pending), generator=rng, **sampling))
        if size is not None and images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic")
        images = images.clamp(-1, 1).cpu()
        chunks.append(uint8_images(images) if as_uint8 else images)
        bar.advance(len(chunks[-1]))

    with phase("sampling", total=len(labels)) as bar:
        seconds = timed(next_batch, warmup=1, warmup_fn=warm_up, repeats=len(batches), device=device)
    return torch.cat(chunks), sum(seconds)


def latency(generator: Generator, tokenizer: Tokenizer, labels: torch.Tensor, *, batch_size: int, repeats: int,
            seed: int, **sampling: Any) -> dict[str, Any]:
    """img/s of sampling small batches (decode included), the median of `repeats` timed batches after a warm-up:
    the latency-bound regime where the number of sequential passes decides (VAR's speed claim), unlike the
    throughput of the large evaluation batches."""
    device = next(generator.parameters()).device
    batch = labels[:batch_size].to(device)
    rng = torch.Generator(device=device).manual_seed(seed)
    seconds = timed(lambda: tokenizer.decode(generator.sample(batch, generator=rng, **sampling)), warmup=1,
                    repeats=repeats, device=device)
    return metric(len(batch) / statistics.median(seconds), device=str(device), batch_size=len(batch),
                  repeats=repeats, **sampling)


def uint8_images(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (N, C, H, W) → uint8 (N, C, H, W), rounding as the ADM/VAR exporters do."""
    return ((images * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats or uint8 (N, C, H, W) → uint8 (N, H, W, C), the ADM npz layout."""
    x = images if images.dtype == torch.uint8 else uint8_images(images)
    return x.permute(0, 2, 3, 1).numpy()


def save_class_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, per_class: int = 10) -> None:
    """One row per class."""
    rows = []
    for c in labels.unique(sorted=True).tolist():
        picked = images[labels == c][:per_class]
        if len(picked) < per_class:
            picked = torch.cat([picked, -torch.ones(per_class - len(picked), *images.shape[1:])])
        rows.append(picked)
    save_image(torch.cat(rows) * 0.5 + 0.5, path, nrow=per_class, padding=1)


@torch.no_grad()
def evaluate_generator(generator: Generator, tokenizer: Tokenizer, dm, reference: GenerationMetrics,
                       cfg: DictConfig, out_dir: Path | None = None) -> tuple[dict[str, Any], torch.Tensor,
                                                                               torch.Tensor]:
    m = cfg.metrics
    sampling = OmegaConf.to_container(cfg.generator.sample, resolve=True)
    cost = generator.sampling_cost(**sampling)
    labels = balanced_labels(m.num_samples, dm.num_classes)
    started = time.perf_counter()
    images, seconds = sample_images(generator, tokenizer, labels, batch_size=m.batch_size, seed=m.seed,
                                    **sampling)
    stage_seconds = {"sampling": time.perf_counter() - started}  # warm-up batch and decode included
    started = time.perf_counter()
    reference.reset(keep_real=True)
    for img, lab in zip(track(images.split(m.batch_size), "sample features", total=len(images)),
                        labels.split(m.batch_size)):
        reference.update_fake(img, lab)
    gen = reference.compute()
    ex, n = reference.extractor.name, m.num_samples
    out = {name: metric(gen[key], extractor=ex, num_samples=n, num_reference=gen["num_real"])
           for name, key in [("fid", "fid"), ("is", "is_mean"), ("kid", "kid_mean"), ("precision", "precision"),
                             ("recall", "recall"), ("accuracy", "accuracy")] if key in gen}
    out["is_std"] = gen["is_std"]
    out["kid_std"] = gen["kid_std"]
    stage_seconds["metrics"] = time.perf_counter() - started  # fake features + FID/IS/KID/PR/accuracy
    out["sample_img_per_s"] = metric(n / seconds, device=str(next(generator.parameters()).device),
                                     batch_size=m.batch_size, **sampling)
    if m.get("latency_batch_size"):
        started = time.perf_counter()
        out["latency_img_per_s"] = latency(generator, tokenizer, labels, batch_size=m.latency_batch_size,
                                           repeats=m.get("latency_repeats", 3), seed=m.seed, **sampling)
        stage_seconds["latency"] = time.perf_counter() - started
    out["nfe_per_image"] = cost.passes
    out["sampling_cost"] = cost.to_dict()  # passes split into backbone and head where a paradigm has both
    out["params"] = count_parameters(generator)
    n_test = min(m.num_reference, len(dm.test_set))  # held-out loss: the y-axis of scaling-law fits
    started = time.perf_counter()
    out["test_loss"] = metric(test_loss(generator, dm, num_images=n_test, batch_size=m.batch_size, seed=m.seed,
                                        device=next(generator.parameters()).device), num_samples=n_test, split="test")
    stage_seconds["test_loss"] = time.perf_counter() - started
    out["stage_seconds"] = stage_seconds
    if out_dir is not None:
        save_class_grid(images, labels, out_dir / "samples.png")
        np.savez(out_dir / "samples.npz", arr_0=to_uint8(images), labels=labels.numpy())
    return out, images, labels


@torch.no_grad()
def test_loss(generator, dm, *, num_images: int, batch_size: int, seed: int, device: torch.device) -> float:
    """Mean generator loss over the first `num_images` test images (eval mode, seeded noise for flow/diffusion
    losses), weighted by batch size."""
    images, labels = dm.reference_images(num_images)
    total = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for x, y in zip(track(images.split(batch_size), "test loss", total=len(images)), labels.split(batch_size)):
            x = x.to(device).float() / 127.5 - 1.0
            total += float(generator.loss(generator.encode(x), y.to(device))["loss"]) * len(x)
    return total / num_images
