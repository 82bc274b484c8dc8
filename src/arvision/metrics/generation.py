"""Generation metrics on one feature extractor: FID, IS, KID, precision/recall (k-NN manifolds) and class accuracy.

Each image goes through the extractor once; its features (and, for generated images, logits) are kept, and all
metrics are computed from them in `compute()`. States are torchmetrics list states, so under DDP every rank
featurises its own share and `compute()` gathers them. The reference set's features can be saved with
`real_state()` and restored with `load_real_state()`, so a reference set is featurised once per extractor.

Conventions follow torch-fidelity / the ADM evaluator: FID in float64, KID with the cubic polynomial kernel and
the unbiased MMD² averaged over random subsets, IS over shuffled splits with population std, precision/recall
after Kynkäänniemi et al. (2019) with k = 3.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from arvision.metrics.extractors import FeatureExtractor

# Pairwise-distance blocks hold at most this many entries (64 MB in float32), whatever the set sizes.
_MAX_BLOCK_ENTRIES = 1 << 24


def _mean_cov(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance in float64, accumulated in row blocks to bound the float64 copy."""
    n, d = features.shape
    total = torch.zeros(d, dtype=torch.float64, device=features.device)
    for block in features.split(4096):
        total += block.double().sum(0)
    mean = total / n
    cov = torch.zeros(d, d, dtype=torch.float64, device=features.device)
    for block in features.split(4096):
        centred = block.double() - mean
        cov += centred.T @ centred
    return mean, cov / (n - 1)


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr √(Σ1 Σ2), in float64.

    tr √(Σ1 Σ2) comes from the eigenvalues of the symmetric PSD matrix √Σ1 Σ2 √Σ1 (same spectrum as Σ1 Σ2),
    which stays real and stable where a general matrix square root can turn complex.
    """
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    evals, evecs = torch.linalg.eigh(cov1)
    sqrt_cov1 = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = sqrt_cov1 @ cov2 @ sqrt_cov1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    fid = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return max(float(fid), 0.0)  # rounding can leave a tiny negative for identical statistics


def kernel_inception_distance(
    real: Tensor, fake: Tensor, *, subset_size: int, subsets: int, generator: torch.Generator
) -> tuple[float, float]:
    """Mean and std of the unbiased MMD² with kernel (x·y/d + 1)³ over random subsets (size clipped to the sets)."""
    n = min(subset_size, len(real), len(fake))
    d = real.shape[1]
    values = []
    for _ in range(subsets):
        r = real[torch.randperm(len(real), generator=generator)[:n].to(real.device)]
        f = fake[torch.randperm(len(fake), generator=generator)[:n].to(fake.device)]
        k_rr = ((r @ r.T) / d + 1).double().pow(3)
        k_ff = ((f @ f.T) / d + 1).double().pow(3)
        k_rf = ((r @ f.T) / d + 1).double().pow(3)
        within = (k_rr.sum() - k_rr.trace() + k_ff.sum() - k_ff.trace()) / (n * (n - 1))
        values.append(within - 2 * k_rf.mean())
    mmd = torch.stack(values)
    return float(mmd.mean()), float(mmd.std(correction=0))


def inception_score(logits: Tensor, *, splits: int, generator: torch.Generator) -> tuple[float, float]:
    """Mean and std over `splits` of exp(E KL(p(y|x) ‖ p(y))); samples are shuffled first so that splits of
    label-ordered samples (e.g. 50 per class) still see every class."""
    probs = logits.double().softmax(dim=1)[torch.randperm(len(logits), generator=generator).to(logits.device)]
    scores = []
    for part in probs.tensor_split(min(splits, len(probs))):
        marginal = part.mean(0, keepdim=True)
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)).sum(1).mean()
        scores.append(kl.exp())
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(correction=0))


def _row_block(rows: int, cols: int) -> int:
    return max(1, min(rows, _MAX_BLOCK_ENTRIES // max(cols, 1)))


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance from each point to its k-th nearest other point (the point itself is the 0-th)."""
    block = _row_block(len(features), len(features))
    return torch.cat([torch.cdist(rows, features).kthvalue(k + 1, dim=1).values for rows in features.split(block)])


def manifold_coverage(queries: Tensor, points: Tensor, radii: Tensor) -> float:
    """Fraction of `queries` inside at least one ball (points[j], radii[j])."""
    block = _row_block(len(queries), len(points))
    inside = [(torch.cdist(rows, points) <= radii).any(dim=1) for rows in queries.split(block)]
    return float(torch.cat(inside).double().mean())


class GenerationMetrics(Metric):
    """FID, IS, KID, precision/recall and (class-conditional) accuracy of generated against real images.

    `update_real(images)` and `update_fake(images, labels)` take image batches in [-1, 1]; batch them as the
    extractor's memory allows. `accuracy` is reported when labels were given and the extractor's classes are
    the dataset's (`extractor.num_classes == num_classes`; not so for Inception's 1008 TF classes). The result
    dict also records the extractor name and both sample counts.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        *,
        extractor: FeatureExtractor,
        num_classes: int | None,
        pr_k: int = 3,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        is_splits: int = 10,
        seed: int = 0,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.extractor = extractor
        self.num_classes = num_classes
        self.pr_k = pr_k
        self.kid_subset_size = kid_subset_size
        self.kid_subsets = kid_subsets
        self.is_splits = is_splits
        self.seed = seed
        self.with_accuracy = num_classes is not None and extractor.num_classes == num_classes
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_logits", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("labelled", default=torch.tensor(0), dist_reduce_fx="sum")

    def _extractor_device(self) -> torch.device:
        param = next(self.extractor.parameters(), None)
        return param.device if param is not None else self.device

    def _featurise(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.to(self._extractor_device(), torch.float32)
        # Metrics are measured in fp32 even when called inside a bf16-autocast validation step.
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            features, logits = self.extractor.features_and_logits(x)
        return features.float(), logits.float()

    def update(  # type: ignore[override]
        self, images: Tensor, labels: Tensor | None = None, *, real: bool = False
    ) -> None:
        """Featurise a batch; prefer the explicit `update_real` / `update_fake`."""
        features, logits = self._featurise(images)
        if real:
            self.real_features.append(features)
            return
        self.fake_features.append(features)
        self.fake_logits.append(logits)
        if labels is not None and self.with_accuracy:
            self.correct += (logits.argmax(1) == labels.to(logits.device)).sum().to(self.correct.device)
            self.labelled += len(labels)

    def update_real(self, images: Tensor) -> None:
        self.update(images, real=True)

    def update_fake(self, images: Tensor, labels: Tensor | None = None) -> None:
        self.update(images, labels)

    def forward(self, *args: object, **kwargs: object) -> None:
        raise TypeError("GenerationMetrics has no per-batch value: call update_real / update_fake, then compute()")

    def compute(self) -> dict[str, float | int | str]:  # type: ignore[override]
        real = dim_zero_cat(self.real_features) if len(self.real_features) else torch.empty(0)
        fake = dim_zero_cat(self.fake_features) if len(self.fake_features) else torch.empty(0)
        needed = max(self.pr_k + 1, 2)  # k-th neighbours and the unbiased KID need this many of each
        if len(real) < needed or len(fake) < needed:
            raise ValueError(
                f"GenerationMetrics needs at least {needed} real and {needed} generated images; "
                f"got {len(real)} real and {len(fake)} generated"
            )
        generator = torch.Generator().manual_seed(self.seed)
        fid = frechet_distance(*_mean_cov(real), *_mean_cov(fake))
        is_mean, is_std = inception_score(dim_zero_cat(self.fake_logits), splits=self.is_splits, generator=generator)
        kid_mean, kid_std = kernel_inception_distance(
            real, fake, subset_size=self.kid_subset_size, subsets=self.kid_subsets, generator=generator
        )
        precision = manifold_coverage(fake, real, knn_radii(real, self.pr_k))
        recall = manifold_coverage(real, fake, knn_radii(fake, self.pr_k))
        result: dict[str, float | int | str] = {
            "fid": fid,
            "is_mean": is_mean,
            "is_std": is_std,
            "kid_mean": kid_mean,
            "kid_std": kid_std,
            "precision": precision,
            "recall": recall,
        }
        if int(self.labelled) > 0:
            result["accuracy"] = int(self.correct) / int(self.labelled)
        result.update(num_real=len(real), num_fake=len(fake), extractor=self.extractor.name)
        return result

    def reset(self, keep_real: bool = False) -> None:
        """Clear all accumulated images; with `keep_real=True` keep the reference set for the next evaluation."""
        real = list(self.real_features) if keep_real else []
        super().reset()
        self.real_features.extend(real)

    def real_state(self) -> dict[str, object]:
        """The reference set's features (all ranks gathered, on CPU) with the extractor they belong to.

        Under DDP this gathers, so call it on every rank. The check in `load_real_state` only compares extractor
        names and sizes: key a saved state by the extractor's weights too (e.g. the classifier artifact's hash).
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            features = dim_zero_cat(self.real_features).cpu() if len(self.real_features) else torch.empty(0)
        return {"extractor": self.extractor.name, "num_features": self.extractor.num_features, "features": features}

    def load_real_state(self, state: dict[str, object]) -> None:
        """Replace the reference set by a saved `real_state()`; under DDP each rank keeps a disjoint share so
        that the gathered set is the saved one."""
        if state["extractor"] != self.extractor.name or state["num_features"] != self.extractor.num_features:
            raise ValueError(
                f"real_state was made with extractor {state['extractor']!r} ({state['num_features']} features); "
                f"this metric uses {self.extractor.name!r} ({self.extractor.num_features})"
            )
        features = state["features"]
        assert isinstance(features, Tensor)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank(self.process_group)
            features = features[rank :: torch.distributed.get_world_size(self.process_group)]
        self.real_features = [features.to(self._extractor_device(), torch.float32)]
        self._computed = None


__all__ = [
    "GenerationMetrics",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "knn_radii",
    "manifold_coverage",
]
