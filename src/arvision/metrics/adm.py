"""The ADM evaluator's protocol (openai/guided-diffusion `evaluations/evaluator.py`) without TensorFlow.

Published ImageNet FID, sFID, IS, precision and recall (ADM, VAR, LlamaGen, MAR, FlowAR…) come from that script run
on a samples .npz and a reference batch such as `VIRTUAL_imagenet256_labeled.npz`. This module computes the same
numbers the same way on torch-fidelity's port of the same TF Inception weights (inception-2015-12-05):

- **inputs**: the uint8 N×H×W×3 images of `arr_0`, at their own size; the network resizes them to 299×299 with TF1's
  bilinear resize (align_corners=False) and maps them to [-1, 1], as the TF graph does after the `ExpandDims` node
  the evaluator feeds;
- **features**, from one forward pass: `pool_3` (2048-d) for FID and precision/recall; `mixed_6/conv` for sFID, its
  first 7 channels flattened in TF's H×W×C order (17·17·7 = 2023-d) — `mixed_6/conv` is the ReLU output of the
  first 1×1 branch of the fourth 17×17 block, torch-fidelity's `Mixed_6d.branch1x1` (its weight converter maps
  `mixed_6/conv/conv2d_params` and `mixed_6/conv/batchnorm` there); pool_3 times the softmax weights, without the
  bias (`logits_unbiased`, the evaluator's `softmax/logits/MatMul` weight), for IS;
- **FID / sFID**: the samples' mean (`np.mean` of float32 features, so float32) and covariance (`np.cov`, float64)
  against the reference's `mu`/`sigma` (`mu_s`/`sigma_s`), Fréchet distance with scipy's `sqrtm` of Σ_samples·Σ_ref:
  when that is not finite it is redone with 1e-6 added to both diagonals; an imaginary part whose diagonal stays
  within 1e-3 of zero is dropped, a larger one is an error;
- **IS**: softmax, consecutive splits of 5,000 in file order (the last one shorter), the mean over splits of
  exp(E KL(p(y|x) ‖ p(y))), in float32 — no shuffling, no std;
- **precision / recall**: k = 3 nearest-neighbour balls on squared pool_3 distances (the ball of a point reaches its
  4th smallest distance, the point itself included), the reference batch's images against all samples. Distances
  are computed per 10,000 × 10,000 block in float16 as the evaluator's TF graph does — inputs rounded to fp16, the
  matmul accumulated in fp32, every result rounded to fp16, negatives clamped to 0 — and that block again in float32
  when any fp16 value overflows. One step differs: TF sums the squared norms in fp16 in an order that depends on the
  device and build; here they are summed exactly and rounded once, so a norm can differ from TF's in its last fp16
  bit, and so can a radius or a distance near a ball's edge (the evaluator's numbers move the same way between
  machines).

`experiments/parity/adm_evaluator.py` runs the evaluator's own functions on random features and writes
`tests/fixtures/parity/adm.pt`, against which `tests/test_adm_protocol.py` checks the functions here. What cannot be
checked without the TF graph file: that torch-fidelity's Inception gives the TF graph's features (torch-fidelity's
own tests compare them with TF1), and the `mixed_6/conv` mapping above (from the converter's name map).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from arvision.metrics.extractors import InceptionExtractor

ADM_EXTRACTOR = "inception (ADM protocol)"
POOL_DIM = 2048
SPATIAL_LAYER = "Mixed_6d.branch1x1"  # TF `mixed_6/conv`
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
IS_SPLIT_SIZE = 5000
PR_K = 3
PR_BLOCK = 10000   # the evaluator's row and column batch for pairwise distances
FID_EPS = 1e-6
IMAG_ATOL = 1e-3


class AdmError(ValueError):
    """An input the ADM protocol cannot use (a wrong reference file, a bad samples layout); one line for the user."""


# --------------------------------------------------------------------------------------------- npz files
class NpzImages:
    """`arr_0` of an .npz read in batches, never whole: 50,000 samples at 256² are 9.8 GB.

    Checks the ADM layout (uint8 N×H×W×3) on opening; `batches(n)` yields uint8 arrays of at most n images.
    """

    def __init__(self, path: str | os.PathLike[str], *, key: str = "arr_0") -> None:
        self.path = Path(path)
        self.key = key
        with self._member() as member:
            self.shape, self.dtype, self._streamable = self._header(member)
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise AdmError(f"{self.path}: {key} must be uint8 N×H×W×3 (the ADM evaluator's RGB layout); got "
                           f"{self.dtype} {tuple(self.shape)}")

    def __len__(self) -> int:
        return int(self.shape[0])

    @contextlib.contextmanager
    def _member(self) -> Iterator[IO[bytes]]:
        try:
            with zipfile.ZipFile(self.path) as archive:
                if f"{self.key}.npy" not in archive.namelist():
                    raise AdmError(f"{self.path} has no {self.key} (the ADM layout: {self.key} uint8 N×H×W×3)")
                with archive.open(f"{self.key}.npy") as member:
                    yield member
        except zipfile.BadZipFile:
            raise AdmError(f"{self.path} is not an .npz file (a zip of .npy arrays)") from None

    def _header(self, member: IO[bytes]) -> tuple[tuple[int, ...], np.dtype, bool]:
        """Shape, dtype and whether the images can be read from the stream one batch at a time (C order and a
        header version numpy has a public reader for; else the array is loaded whole)."""
        try:
            version = np.lib.format.read_magic(member)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                with np.load(self.path, mmap_mode=None) as npz:
                    array = npz[self.key]
                return tuple(array.shape), array.dtype, False
            shape, fortran, dtype = readers[version](member)
        except ValueError as err:
            raise AdmError(f"{self.path}: {self.key} is not a readable .npy array ({err})") from None
        return tuple(shape), np.dtype(dtype), not fortran

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if not self._streamable:
            with np.load(self.path) as npz:
                images = npz[self.key]
            for start in range(0, len(images), batch_size):
                yield np.ascontiguousarray(images[start:start + batch_size])
            return
        image_bytes = int(np.prod(self.shape[1:]))
        with self._member() as member:
            self._header(member)  # past the header, to the data
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = _read_exactly(member, count * image_bytes, self.path)
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])


def _read_exactly(stream: IO[bytes], size: int, path: Path) -> bytearray:
    data = bytearray()  # writable, so the arrays made from it are too
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise AdmError(f"{path} ends early: the file is truncated; write it again")
        data += chunk
    return data


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FrechetStats:
    mu: np.ndarray
    sigma: np.ndarray


@dataclass(frozen=True)
class AdmReference:
    """A reference batch: precomputed statistics (`mu`, `sigma` on pool_3; `mu_s`, `sigma_s` on the spatial
    features) and the images (`arr_0`) precision/recall compare with. Without `mu` the statistics come from the
    images' features (as the evaluator does); a file with `mu` but no `mu_s` (e.g. MAR's statistics) gives no sFID."""

    path: Path
    sha256: str
    pool: FrechetStats | None
    spatial: FrechetStats | None
    images: NpzImages | None

    def describe(self) -> dict[str, object]:
        return {"path": str(self.path), "sha256": self.sha256, "protocol": "ADM evaluator (guided-diffusion "
                "evaluations/evaluator.py)", "statistics": "precomputed" if self.pool is not None else "arr_0",
                "num_images": len(self.images) if self.images is not None else 0,
                "image_shape": list(self.images.shape[1:]) if self.images is not None else None}


def read_reference(path: str | os.PathLike[str]) -> AdmReference:
    """The reference batch at `path`, checked: `mu` (2048) and `sigma` (2048²), `mu_s` (2023) and `sigma_s` (2023²)
    when present, `arr_0` uint8 N×H×W×3 when present; at least `mu` or `arr_0`."""
    path = Path(path)
    if not path.is_file():
        raise AdmError(f"reference={path}: no such file (the ADM reference batch, e.g. "
                       "VIRTUAL_imagenet256_labeled.npz)")
    layout = ("expected the ADM reference batch layout: mu (2048), sigma (2048×2048), mu_s (2023), "
              "sigma_s (2023×2023), arr_0 uint8 N×H×W×3")
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            stats = {k: np.asarray(npz[k]) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise AdmError(f"reference={path} is not an .npz file ({err}); {layout}") from None
    if "mu" not in keys and "arr_0" not in keys:
        raise AdmError(f"reference={path} has neither mu nor arr_0 (it holds {', '.join(sorted(keys)) or 'nothing'}); "
                       f"{layout}")
    expected = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
                "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
    for key, array in stats.items():
        if array.shape != expected[key] or not np.issubdtype(array.dtype, np.floating):
            raise AdmError(f"reference={path}: {key} is {array.dtype} {array.shape}; {layout}")
    for a, b in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (a in stats) != (b in stats):
            raise AdmError(f"reference={path} has {a if a in stats else b} without {b if a in stats else a}; {layout}")
    images = NpzImages(path) if "arr_0" in keys else None
    pool = FrechetStats(stats["mu"], stats["sigma"]) if "mu" in stats else None
    spatial = FrechetStats(stats["mu_s"], stats["sigma_s"]) if "mu_s" in stats else None
    return AdmReference(path=path, sha256=sha256_of(path), pool=pool, spatial=spatial, images=images)


# --------------------------------------------------------------------------------------------- features
@dataclass
class AdmFeatures:
    """Per image: pool_3 (N, 2048), the spatial features (N, 2023) and the unbiased logits (N, 1008), float32."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return len(self.pool)


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Plain fp32 convolutions and matmuls on CUDA (no TF32), as the evaluator's TF graph computes."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class AdmInception:
    """torch-fidelity's InceptionV3 (the local weight file; `MissingWeights` without it) giving, in one forward
    pass of uint8 N×H×W×3 images, the three feature sets the evaluator reads."""

    def __init__(self, weights_path: str | os.PathLike[str] | None, device: torch.device) -> None:
        self.extractor = InceptionExtractor(weights_path)
        self.net = self.extractor.net.to(device)
        self.device = device
        self._spatial: Tensor | None = None
        self._hook = self.net.get_submodule(SPATIAL_LAYER).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: object, output: Tensor) -> None:
        # TF's tensors are N×H×W×C: the flattened order must match the reference's mu_s / sigma_s.
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).float().cpu()

    @torch.no_grad()
    def __call__(self, images: np.ndarray | Tensor) -> AdmFeatures:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            raise AdmError(f"ADM features need uint8 N×H×W×3 images; got {x.dtype} {tuple(x.shape)}")
        with full_fp32():
            pool, logits = self.net(x.to(self.device).permute(0, 3, 1, 2))
        assert self._spatial is not None
        spatial, self._spatial = self._spatial, None
        return AdmFeatures(pool.float().cpu().numpy(), spatial.numpy(), logits.float().cpu().numpy())

    def weights_info(self) -> dict[str, object]:
        return {"extractor": ADM_EXTRACTOR, "weights": str(self.extractor.weights_path),
                "weights_sha256": sha256_of(self.extractor.weights_path),
                "network": "torch-fidelity inception-v3-compat (TF inception-2015-12-05)",
                "features": {"fid/precision/recall": "pool_3 (2048)",
                             "sfid": f"{SPATIAL_LAYER}[:{SPATIAL_CHANNELS}] = TF mixed_6/conv, H×W×C order (2023)",
                             "is": "logits_unbiased (pool_3 · softmax weights)"},
                "resize": "TF1 bilinear to 299×299 (align_corners=False), inputs uint8 at their own size"}

    def close(self) -> None:
        self._hook.remove()


def featurize(model: AdmInception, batches: Iterator[np.ndarray]) -> AdmFeatures:
    """The features of every image in `batches` (uint8 N×H×W×3 arrays), in order."""
    parts = [model(batch) for batch in batches]
    if not parts:
        raise AdmError("no images to featurise")
    return AdmFeatures(pool=np.concatenate([p.pool for p in parts]),
                       spatial=np.concatenate([p.spatial for p in parts]),
                       logits=np.concatenate([p.logits for p in parts]))


# --------------------------------------------------------------------------------------------- FID / sFID
def statistics(features: np.ndarray) -> FrechetStats:
    """Mean and covariance as the evaluator takes them: np.mean keeps float32 features' dtype, np.cov is float64."""
    return FrechetStats(np.mean(features, axis=0), np.cov(features, rowvar=False))


def frechet_distance(samples: FrechetStats, reference: FrechetStats, *, eps: float = FID_EPS) -> float:
    """‖μ_s − μ_r‖² + tr Σ_s + tr Σ_r − 2 tr √(Σ_s Σ_r) with scipy's general matrix square root, in the order and
    with the fallbacks of the evaluator (see the module docstring)."""
    mu1, mu2 = np.atleast_1d(samples.mu), np.atleast_1d(reference.mu)
    sigma1, sigma2 = np.atleast_2d(samples.sigma), np.atleast_2d(reference.sigma)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise AdmError(f"Fréchet distance of statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular products are expected with few samples
        root = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(root).all():
            offset = np.eye(sigma1.shape[0]) * eps
            root = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=IMAG_ATOL):
            raise AdmError(f"Fréchet distance: the matrix square root has an imaginary component of "
                           f"{np.max(np.abs(root.imag)):.3g} (the covariances are not valid)")
        root = root.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


# --------------------------------------------------------------------------------------------- IS
def inception_score(logits: np.ndarray | Tensor, *, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive splits of `split_size` (file order) of exp(E KL(p(y|x) ‖ p(y))), float32 softmax."""
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1).numpy()
    scores = []
    with np.errstate(divide="ignore", invalid="ignore"):  # a probability of exactly 0 gives NaN, as in the evaluator
        for start in range(0, len(probs), split_size):
            part = probs[start:start + split_size]
            kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
            scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------------- precision / recall
def _half(x: Tensor) -> Tensor:
    """Round to float16 and hold the value in float32 (overflow becomes inf, as a cast to fp16 does)."""
    return x.half().float()


def pairwise_sq_distances(u: Tensor, v: Tensor) -> Tensor:
    """Squared Euclidean distances (len(u), len(v)) as the evaluator's DistanceBlock: in float16, with every
    intermediate rounded to fp16 (the matmul accumulated in fp32, the norms summed exactly), max(·, 0); in float32
    when any fp16 value of the block is not finite."""
    u, v = u.float(), v.float()
    u16, v16 = _half(u), _half(v)
    with full_fp32():
        norm_u = _half(_half(u16.square()).sum(1))
        norm_v = _half(_half(v16.square()).sum(1))
        twice = _half(2 * _half(u16 @ v16.T))
    dist = _half(_half(norm_u[:, None] - twice) + norm_v[None, :]).clamp_min(0)
    if torch.isfinite(dist).all():
        return dist
    with full_fp32():
        return (u.square().sum(1)[:, None] - 2 * (u @ v.T) + v.square().sum(1)[None, :]).clamp_min(0)


def manifold_radii(features: Tensor, *, k: int = PR_K, row_batch: int = PR_BLOCK,
                   col_batch: int = PR_BLOCK) -> Tensor:
    """Per point, the (k+1)-th smallest squared distance to the set, itself included (so its k-th neighbour's),
    with the distances of each row_batch × col_batch block computed as one `pairwise_sq_distances` call."""
    if len(features) <= k:
        raise AdmError(f"precision/recall need more than k = {k} images in each set; got {len(features)}")
    radii = []
    for rows in features.split(row_batch):
        nearest = None  # the k+1 smallest distances of each row so far: a row of 50,000 never sits in memory whole
        for cols in features.split(col_batch):
            block = pairwise_sq_distances(rows, cols)
            candidates = block if nearest is None else torch.cat([nearest, block], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(reference: Tensor, samples: Tensor, *, k: int = PR_K, row_batch: int = PR_BLOCK,
                     col_batch: int = PR_BLOCK) -> tuple[float, float]:
    """(precision, recall): the fraction of samples inside some reference ball, and of reference points inside
    some sample ball; reference rows in blocks of `row_batch`, samples in blocks of `col_batch`."""
    ref_radii = manifold_radii(reference, k=k, row_batch=row_batch, col_batch=col_batch)
    sample_radii = manifold_radii(samples, k=k, row_batch=row_batch, col_batch=col_batch)
    ref_inside = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    sample_inside = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
    for r0 in range(0, len(reference), row_batch):
        rows = slice(r0, r0 + row_batch)
        for c0 in range(0, len(samples), col_batch):
            cols = slice(c0, c0 + col_batch)
            dist = pairwise_sq_distances(reference[rows], samples[cols])
            ref_inside[rows] |= (dist <= sample_radii[cols][None, :]).any(dim=1)
            sample_inside[cols] |= (dist <= ref_radii[rows][:, None]).any(dim=0)
    return float(sample_inside.double().mean()), float(ref_inside.double().mean())


__all__ = ["ADM_EXTRACTOR", "AdmError", "AdmFeatures", "AdmInception", "AdmReference", "FrechetStats",
           "IS_SPLIT_SIZE", "NpzImages", "PR_BLOCK", "PR_K", "SPATIAL_CHANNELS", "SPATIAL_DIM", "SPATIAL_LAYER",
           "featurize", "frechet_distance", "inception_score", "manifold_radii", "pairwise_sq_distances",
           "precision_recall", "read_reference", "sha256_of", "statistics"]
