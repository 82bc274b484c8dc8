"""Feature extractors for the generation metrics, and the in-project classifier behind the offline one.

Every generation metric (FID, IS, KID, precision/recall, class accuracy) reads one `FeatureExtractor`:
`features_and_logits(images)` gives pooled features and class logits from a single forward pass.
`inception` is torch-fidelity's port of the TF InceptionV3 used by published FIDs, loaded only from a local file;
`classifier` wraps a small CNN trained here on the dataset's own training split and always works offline.
Numbers from the two are not comparable, so every result records `extractor.name`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from arvision.metrics.reconstruction import to_uint8

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


class MissingWeights(FileNotFoundError):
    """A pretrained weight file that arvision never downloads is not on this machine."""


# ---------------------------------------------------------------------------------------------------------------
# The in-project classifier


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ClassifierNet(nn.Module):
    """Small CNN: conv-BN-ReLU stages at widths w, 2w, 4w, each entered with a stride-2 conv, then a global
    average pool (the features, 4w) and a linear head.

    The stride-2 stem keeps one Fashion-MNIST epoch within a minute on two CPU cores; any input side ≥ 16 works.
    The constructor arguments are kept as attributes so that the net can be rebuilt from a saved artifact.
    """

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width
        w = width
        self.body = nn.Sequential(
            _conv_bn_relu(in_channels, w, stride=2),
            _conv_bn_relu(w, 2 * w, stride=2),
            _conv_bn_relu(2 * w, 2 * w),
            _conv_bn_relu(2 * w, 4 * w, stride=2),
            _conv_bn_relu(4 * w, 4 * w),
        )
        self.head = nn.Linear(4 * w, num_classes)
        self.num_features = 4 * w

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features, globally average-pooled: (N, 4·width)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def _accuracy(net: ClassifierNet, loader: DataLoader) -> float:
    device = next(net.parameters()).device
    net.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((net(images.to(device)).argmax(1).cpu() == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def _fit(net: ClassifierNet, loader: DataLoader, *, total_steps: int, lr: float, progress: bool) -> None:
    device = next(net.parameters()).device
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    start = time.perf_counter()
    net.train()
    step = 0
    while step < total_steps:
        for images, labels in loader:
            loss = F.cross_entropy(net(images.to(device)), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress and (step % max(1, total_steps // 10) == 0 or step == total_steps):
                elapsed = time.perf_counter() - start
                log.info("classifier step %d/%d  loss %.3f  %.0fs", step, total_steps, loss.item(), elapsed)
            if step == total_steps:
                break


def train_classifier(
    train_set: Dataset,
    test_set: Dataset,
    *,
    in_channels: int,
    num_classes: int,
    width: int = 32,
    epochs: float = 1.0,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> tuple[ClassifierNet, float]:
    """Train a `ClassifierNet` on `(image, label)` pairs; return it in eval mode on `device` and its test accuracy.

    `epochs` may be fractional (a fraction of one pass). AdamW with a one-cycle schedule. `device` defaults to
    CUDA when available. Reproducible from `seed` without touching the caller's global RNG state.
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ClassifierNet(in_channels=in_channels, num_classes=num_classes, width=width).to(dev)
        # Dropping the ragged last batch avoids a batch of one, which BatchNorm cannot train on.
        drop_last = len(train_set) > batch_size  # type: ignore[arg-type]
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=drop_last)
        _fit(net, loader, total_steps=max(1, math.ceil(epochs * len(loader))), lr=lr, progress=progress)
        accuracy = _accuracy(net, DataLoader(test_set, batch_size=512))
    if progress:
        log.info("classifier test accuracy %.4f", accuracy)
    return net.eval(), accuracy


# ---------------------------------------------------------------------------------------------------------------
# Feature extractors


class FeatureExtractor(nn.Module):
    """A frozen network that maps images in [-1, 1], (N, C, H, W), to features (N, d) and class logits (N, K).

    Subclasses set `name`, `num_features` (d) and `num_classes` (K) and implement `features_and_logits`, so that
    the metrics featurise each image exactly once. The module stays in eval mode whatever `.train()` is called
    with, so that BatchNorm statistics never move when it sits inside a LightningModule.
    """

    name: str
    num_features: int
    num_classes: int

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]

    def logits(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[1]

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)


class ClassifierExtractor(FeatureExtractor):
    """Pooled penultimate features and logits of an arvision `ClassifierNet` (offline; not comparable to papers).

    Freezes the wrapped net (requires_grad off) so that it never joins an optimiser's parameters.
    """

    name = "classifier"

    def __init__(self, net: ClassifierNet) -> None:
        super().__init__()
        self.net = net.requires_grad_(False)
        self.num_features = net.num_features
        self.num_classes = net.num_classes
        self.eval()

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.net.features(images)
        return features, self.net.head(features)


def find_inception_weights(weights_path: str | os.PathLike[str] | None = None) -> Path | None:
    """The local Inception weight file, or None.

    Searched in order: `weights_path` (a file, or a folder holding the file), `$ARVISION_INCEPTION_WEIGHTS`
    (same), `$TORCH_HOME/hub/checkpoints/`, torch's hub cache and `~/.cache/torch/hub/checkpoints/`.
    """
    candidates: list[Path] = []
    for given in (weights_path, os.environ.get("ARVISION_INCEPTION_WEIGHTS")):
        if given:
            path = Path(given).expanduser()
            candidates.append(path if path.is_file() else path / INCEPTION_WEIGHTS_FILE)
    if os.environ.get("TORCH_HOME"):
        candidates.append(Path(os.environ["TORCH_HOME"]).expanduser() / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    candidates.append(Path.home() / ".cache" / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    return next((path for path in candidates if path.is_file()), None)


class InceptionExtractor(FeatureExtractor):
    """torch-fidelity's TF-compatible InceptionV3 ("inception-v3-compat"): pool3 (2048) and unbiased logits (1008).

    Images are quantised to uint8 as a saved PNG would be and gray is repeated to RGB; torch-fidelity resizes to
    299 with its TF1-compatible bilinear. Loads only a local weight file and raises `MissingWeights` otherwise.
    """

    name = "inception"
    num_features = 2048
    num_classes = 1008

    def __init__(self, weights_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        path = find_inception_weights(weights_path)
        if path is None:
            raise MissingWeights(
                f"Inception weights not found: put {INCEPTION_WEIGHTS_FILE} in $ARVISION_INCEPTION_WEIGHTS "
                "(a folder or the file itself), $TORCH_HOME/hub/checkpoints/ or ~/.cache/torch/hub/checkpoints/ "
                "- or use metrics.extractor=classifier, which works offline."
            )
        # Imported here so that the offline classifier path never needs torch-fidelity.
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = path
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        )
        self.eval()

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = to_uint8(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        features, logits = self.net(x)
        return features, logits


__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "ClassifierExtractor",
    "ClassifierNet",
    "FeatureExtractor",
    "InceptionExtractor",
    "MissingWeights",
    "find_inception_weights",
    "train_classifier",
]
