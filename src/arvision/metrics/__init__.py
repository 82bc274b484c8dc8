"""Metrics: generation (FID/IS/KID/precision-recall/accuracy on a chosen extractor), reconstruction, cost."""

from arvision.metrics.extractors import (
    INCEPTION_WEIGHTS_FILE,
    ClassifierExtractor,
    ClassifierNet,
    FeatureExtractor,
    InceptionExtractor,
    MissingWeights,
    find_inception_weights,
    train_classifier,
)
from arvision.metrics.generation import GenerationMetrics, frechet_distance
from arvision.metrics.reconstruction import CodebookUsage, psnr, ssim, to_uint8, usage_and_perplexity
from arvision.metrics.speed import count_parameters, peak_memory, timed

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "ClassifierExtractor",
    "ClassifierNet",
    "CodebookUsage",
    "FeatureExtractor",
    "GenerationMetrics",
    "InceptionExtractor",
    "MissingWeights",
    "count_parameters",
    "find_inception_weights",
    "frechet_distance",
    "peak_memory",
    "psnr",
    "ssim",
    "timed",
    "to_uint8",
    "train_classifier",
    "usage_and_perplexity",
]
