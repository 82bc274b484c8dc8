"""Tests for arvision.metrics: generation metrics on tiny random extractors, reconstruction, codebook, cost."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from arvision.metrics import (
    INCEPTION_WEIGHTS_FILE,
    ClassifierExtractor,
    CodebookUsage,
    FeatureExtractor,
    GenerationMetrics,
    InceptionExtractor,
    MissingWeights,
    count_parameters,
    find_inception_weights,
    frechet_distance,
    psnr,
    ssim,
    timed,
    train_classifier,
    usage_and_perplexity,
)
from arvision.metrics.generation import knn_radii


class RandomConvExtractor(FeatureExtractor):
    """A frozen random conv net: the stand-in for a trained extractor; counts the images it has seen."""

    name = "random"

    def __init__(self, in_channels: int = 3, num_features: int = 32, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, num_features, 3, stride=2, padding=1),
                nn.ReLU(),
            )
            self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self.num_classes = num_classes
        self.images_seen = 0
        self.requires_grad_(False)

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        self.images_seen += len(images)
        features = self.body(images).mean(dim=(2, 3))
        return features, self.head(features)


class PassThroughExtractor(FeatureExtractor):
    """Images of shape (N, K, 1, 1) *are* the logits: lets tests set p(y|x) exactly."""

    name = "pass"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_features = num_classes
        self.num_classes = num_classes

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return images.flatten(1), images.flatten(1)


def _images(n: int, seed: int, channels: int = 3, size: int = 16) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, size, size, generator=g) * 2 - 1) * 0.8


def _scores(real: Tensor, fake: Tensor, extractor: FeatureExtractor | None = None, **kwargs: int) -> dict:
    kwargs.setdefault("kid_subsets", 10)
    metrics = GenerationMetrics(extractor=extractor or RandomConvExtractor(), num_classes=None, **kwargs)
    for batch in real.split(64):
        metrics.update_real(batch)
    for batch in fake.split(64):
        metrics.update_fake(batch)
    return metrics.compute()


# --- generation metrics -------------------------------------------------------------------------------------


def test_fid_is_zero_for_identical_sets_and_grows_with_a_mean_shift() -> None:
    real = _images(200, seed=0)
    metrics = GenerationMetrics(extractor=RandomConvExtractor(), num_classes=None, kid_subsets=2)
    metrics.update_real(real)
    fids = []
    for shift in (0.0, 0.05, 0.15, 0.4):
        metrics.update_fake(real + shift)
        fids.append(metrics.compute()["fid"])
        metrics.reset(keep_real=True)
    assert fids[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_fid_is_symmetric() -> None:
    a, b = _images(250, seed=1), _images(200, seed=2) * 0.7 + 0.1
    forward, backward = _scores(a, b)["fid"], _scores(b, a)["fid"]
    assert forward > 1e-3
    assert forward == pytest.approx(backward, rel=1e-6)


def test_precision_recall_are_one_for_identical_sets_and_precision_drops_off_manifold() -> None:
    real = _images(200, seed=3)
    same = _scores(real, real)
    assert same["precision"] == 1.0 and same["recall"] == 1.0

    off = torch.full_like(real[:100], 0.9) + 0.05 * _images(100, seed=4)  # bright images, far from the real ones
    mixed = _scores(real, torch.cat([real[:100], off]))
    assert mixed["precision"] <= 0.55
    assert _scores(real, off)["precision"] == 0.0


def test_mode_collapse_keeps_precision_and_loses_recall() -> None:
    real = _images(200, seed=13)
    collapsed = _scores(real, real[:5].repeat(20, 1, 1, 1))  # duplicates: fake balls of radius 0
    assert collapsed["precision"] == 1.0
    assert collapsed["recall"] == pytest.approx(5 / 200)


def test_fid_and_kid_match_direct_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g)
    y = 0.8 * torch.randn(30, 6, generator=g) + 0.3
    # With the KID subset as large as both sets, every subset is the whole set: one deterministic value.
    result = _scores(x[:, :, None, None], y[:, :, None, None], PassThroughExtractor(6), kid_subset_size=30)

    xd, yd = x.double(), y.double()
    cov_x, cov_y = torch.cov(xd.T), torch.cov(yd.T)
    sqrt_product = torch.from_numpy(scipy.linalg.sqrtm(cov_x.numpy() @ cov_y.numpy()).real)
    fid = (xd.mean(0) - yd.mean(0)).square().sum() + torch.trace(cov_x + cov_y - 2 * sqrt_product)
    assert result["fid"] == pytest.approx(float(fid), rel=1e-9)
    assert frechet_distance(xd.mean(0), cov_x, yd.mean(0), cov_y) == pytest.approx(float(fid), rel=1e-9)

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.T / 6 + 1) ** 3

    off_diagonal = ~torch.eye(30, dtype=torch.bool)
    kid = kernel(xd, xd)[off_diagonal].mean() + kernel(yd, yd)[off_diagonal].mean() - 2 * kernel(xd, yd).mean()
    assert result["kid_mean"] == pytest.approx(float(kid), rel=1e-5)
    assert result["kid_std"] == pytest.approx(0.0, abs=1e-9)


def test_knn_radii_are_distances_to_the_kth_other_point() -> None:
    line = torch.arange(10.0)[:, None]  # points 0, 1, ..., 9 on a line
    radii = knn_radii(line, 3)
    assert radii[0] == 3 and radii[5] == 2 and radii[9] == 3


def test_kid_is_near_zero_for_identical_sets() -> None:
    real = _images(300, seed=5)
    identical = _scores(real, real, kid_subset_size=100)
    shifted = _scores(real, real + 0.3, kid_subset_size=100)
    assert abs(identical["kid_mean"]) < 0.02 * shifted["kid_mean"]
    assert shifted["kid_mean"] > 0


def test_inception_score_is_one_for_uniform_and_num_classes_for_confident_balanced_logits() -> None:
    k = 10
    uniform = torch.zeros(200, k, 1, 1)
    assert _scores(uniform, uniform, PassThroughExtractor(k))["is_mean"] == pytest.approx(1.0, abs=1e-9)

    labels = torch.arange(k).repeat_interleave(50)  # label-ordered, like 50 samples per class
    confident = (40.0 * nn.functional.one_hot(labels, k).float())[:, :, None, None]
    one_split = _scores(confident, confident, PassThroughExtractor(k), is_splits=1)
    assert one_split["is_mean"] == pytest.approx(k, rel=1e-6)
    # Shuffled splits each still see (roughly) every class.
    ten_splits = _scores(confident, confident, PassThroughExtractor(k), is_splits=10)
    assert 0.85 * k < ten_splits["is_mean"] <= k


def test_accuracy_is_one_for_perfect_labels_and_chance_for_shuffled_ones() -> None:
    k, n = 10, 1000
    labels = torch.arange(n) % k
    logits = (5.0 * nn.functional.one_hot(labels, k).float())[:, :, None, None]
    shuffled = labels[torch.randperm(n, generator=torch.Generator().manual_seed(0))]

    def accuracy(given: Tensor | None, num_classes: int | None = k) -> float | None:
        metrics = GenerationMetrics(extractor=PassThroughExtractor(k), num_classes=num_classes, kid_subsets=2)
        metrics.update_real(logits)
        metrics.update_fake(logits, given)
        return metrics.compute().get("accuracy")

    assert accuracy(labels) == 1.0
    assert accuracy(shuffled) == pytest.approx(1 / k, abs=0.03)
    assert accuracy(None) is None
    assert accuracy(labels, num_classes=k + 1) is None  # extractor classes are not the dataset's


def test_each_image_is_featurised_once_and_results_record_extractor_and_counts() -> None:
    extractor = RandomConvExtractor()
    metrics = GenerationMetrics(extractor=extractor, num_classes=10, kid_subsets=5)
    metrics.update_real(_images(120, seed=6))
    metrics.update_fake(_images(80, seed=7), torch.randint(0, 10, (80,)))
    result = metrics.compute()
    assert extractor.images_seen == 200
    assert result["num_real"] == 120 and result["num_fake"] == 80 and result["extractor"] == "random"
    assert {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall", "accuracy"} <= set(result)


def test_real_state_round_trip_and_reset_keeping_the_reference_set() -> None:
    real, fake = _images(150, seed=8), _images(100, seed=9) + 0.1
    first = GenerationMetrics(extractor=RandomConvExtractor(), num_classes=None, kid_subsets=5)
    first.update_real(real)
    first.update_fake(fake)
    expected = first.compute()

    second = GenerationMetrics(extractor=RandomConvExtractor(), num_classes=None, kid_subsets=5)
    second.load_real_state(first.real_state())
    second.update_fake(fake)
    assert second.compute() == expected

    first.reset(keep_real=True)
    first.update_fake(fake)
    assert first.compute() == expected
    first.reset()
    first.update_fake(fake)
    with pytest.raises(ValueError, match="real"):
        first.compute()

    other = GenerationMetrics(extractor=PassThroughExtractor(3), num_classes=None)
    with pytest.raises(ValueError, match="random"):
        other.load_real_state(first.real_state() | {"extractor": "random"})


def test_extractor_stays_in_eval_mode() -> None:
    extractor = RandomConvExtractor()
    metrics = GenerationMetrics(extractor=extractor, num_classes=None)
    metrics.train()
    assert not extractor.training


# --- extractors ---------------------------------------------------------------------------------------------


def test_inception_without_weights_raises_missing_weights_naming_the_file(tmp_path, monkeypatch) -> None:
    for var in ("ARVISION_INCEPTION_WEIGHTS", "TORCH_HOME", "HOME"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert find_inception_weights() is None
    with pytest.raises(MissingWeights) as info:
        InceptionExtractor()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert INCEPTION_WEIGHTS_FILE in message and "metrics.extractor=classifier" in message
    assert "\n" not in message


def test_inception_extractor_loads_a_local_file_and_handles_gray_images(tmp_path, monkeypatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    # A weight file of the right layout with random values: built without any download.
    with monkeypatch.context() as patch:
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / INCEPTION_WEIGHTS_FILE)
    monkeypatch.setenv("ARVISION_INCEPTION_WEIGHTS", str(tmp_path))

    extractor = InceptionExtractor()
    assert extractor.weights_path == tmp_path / INCEPTION_WEIGHTS_FILE
    gray = _images(2, seed=10, channels=1, size=32)
    features, logits = extractor.features_and_logits(gray)
    assert features.shape == (2, extractor.num_features) == (2, 2048)
    assert logits.shape == (2, 1008)
    rgb_features = extractor(gray.expand(-1, 3, -1, -1))
    assert torch.allclose(features, rgb_features)


def test_train_classifier_separates_bright_from_dark_images() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2
    images = (labels.float() - 0.5)[:, None, None, None] + 0.35 * torch.randn(400, 1, 16, 16, generator=g)
    data = TensorDataset(images.clamp(-1, 1), labels)
    train, test = torch.utils.data.Subset(data, range(300)), torch.utils.data.Subset(data, range(300, 400))

    rng_before = torch.random.get_rng_state()
    start = time.perf_counter()
    net, accuracy = train_classifier(
        train, test, in_channels=1, num_classes=2, width=8, epochs=2, batch_size=32, progress=False, device="cpu"
    )
    assert time.perf_counter() - start < 10
    assert accuracy > 0.9
    assert not net.training
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # seeding does not touch the global RNG

    extractor = ClassifierExtractor(net)
    features, logits = extractor.features_and_logits(images[:5])
    assert features.shape == (5, extractor.num_features) == (5, 32) and logits.shape == (5, 2)


# --- reconstruction ----------------------------------------------------------------------------------------


def _reference_psnr(x: Tensor, y: Tensor) -> np.ndarray:
    def quantise(t: Tensor) -> np.ndarray:  # uint8 as a saved PNG holds it, then [0, 1]
        return np.clip(np.floor(t.numpy() * np.float32(127.5) + np.float32(128.0)), 0, 255).astype(np.float64) / 255

    mse = ((quantise(x) - quantise(y)) ** 2).reshape(len(x), -1).mean(1)
    return 10 * np.log10(1.0 / mse)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), sigma=st.floats(0.02, 1.0), channels=st.sampled_from([1, 3]))
def test_psnr_matches_the_mse_formula(seed: int, sigma: float, channels: int) -> None:
    x = _images(3, seed, channels=channels)
    y = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    np.testing.assert_allclose(psnr(x, y).numpy(), _reference_psnr(x, y), rtol=1e-5)


def test_psnr_is_capped_for_identical_images_and_falls_with_noise() -> None:
    x = _images(4, seed=11)
    assert torch.equal(psnr(x, x), torch.full((4,), 100.0))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    values = [psnr(x, x + s * noise).mean().item() for s in (0.01, 0.05, 0.2, 0.5)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert psnr(x, x).shape == (4,)


def test_ssim_is_one_for_identical_images_and_lower_with_noise() -> None:
    x = _images(4, seed=12, size=32)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-6)
    noisy = ssim(x, x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    assert noisy.shape == (4,) and bool((noisy < 0.95).all())


@settings(max_examples=40, deadline=None)
@given(data=st.data(), vocab_size=st.integers(1, 64), repeats=st.integers(1, 4), parts=st.integers(1, 3))
def test_codebook_usage_on_uniform_histograms(data: st.DataObject, vocab_size: int, repeats: int, parts: int) -> None:
    used = data.draw(st.integers(1, vocab_size))
    codes = torch.tensor(data.draw(st.permutations(range(vocab_size)))[:used])
    indices = codes.repeat(repeats)[torch.randperm(used * repeats)]

    usage, perplexity = usage_and_perplexity(indices.view(1, -1, 1), vocab_size)
    assert usage == pytest.approx(used / vocab_size)
    assert perplexity == pytest.approx(used)

    metric = CodebookUsage(vocab_size)
    for chunk in indices.tensor_split(parts):
        metric.update(chunk)
    assert metric.usage() == pytest.approx(used / vocab_size)
    assert metric.perplexity() == pytest.approx(used)


def test_codebook_perplexity_of_a_skewed_histogram_and_reset() -> None:
    metric = CodebookUsage(8)
    metric.update(torch.tensor([[0, 0, 0, 5]]))
    assert metric.usage() == pytest.approx(2 / 8)
    assert metric.perplexity() == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    metric.reset()
    metric.update(torch.tensor([3]))
    assert metric.usage() == pytest.approx(1 / 8) and metric.perplexity() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="code indices"):
        metric.update(torch.tensor([8]))


# --- cost ----------------------------------------------------------------------------------------------------


def test_timed_excludes_the_warm_up_and_times_each_repeat() -> None:
    calls = []

    def generate() -> None:
        calls.append("fn")
        time.sleep(0.3 if len(calls) <= 2 else 0.01)  # slow warm-up, as with compilation

    seconds = timed(generate, warmup=2, repeats=3, device=torch.device("cpu"))
    assert len(calls) == 5 and len(seconds) == 3
    assert all(0.01 <= s < 0.15 for s in seconds)  # a timed call sleeps 0.01 s; a warm-up call would add 0.3 s
    calls.clear()
    seconds = timed(generate, warmup=1, repeats=2, device=torch.device("cpu"), warmup_fn=lambda: calls.append("w"))
    assert calls == ["w", "fn", "fn"] and len(seconds) == 2  # the warm-up is the cheaper call when one is given


def test_count_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert count_parameters(model) == 16 + 10
    model[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 10
