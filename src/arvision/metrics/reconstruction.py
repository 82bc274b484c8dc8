"""Tokenizer metrics: per-image PSNR / SSIM on the images as they would be saved, and codebook usage.

PSNR and SSIM see the reconstruction quantised to uint8 (what a PNG holds, VAR's x·255 + 0.5 rounding), scaled to
[0, 1] with `data_range=1`, and are returned per image so that callers can average or report spread.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats to uint8, rounding half up like saving a PNG (x·127.5 + 127.5, rounded, clamped)."""
    return torch.floor(images.float() * 127.5 + 128.0).clamp_(0, 255).to(torch.uint8)


def _unit(images: Tensor) -> Tensor:
    return to_uint8(images).double() / 255.0


def psnr(x: Tensor, y: Tensor, *, max_db: float = 100.0) -> Tensor:
    """PSNR in dB per image, (N,), on uint8-rounded [0, 1] images; identical images give `max_db` instead of inf."""
    if x.shape != y.shape:
        raise ValueError(f"psnr needs images of one shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (_unit(x) - _unit(y)).square().flatten(1).mean(1)
    return (-10.0 * torch.log10(mse)).clamp(max=max_db).float()


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """SSIM per image, (N,), on uint8-rounded [0, 1] images (torchmetrics, Gaussian 11×11 window, data_range 1)."""
    if x.shape != y.shape:
        raise ValueError(f"ssim needs images of one shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    values = structural_similarity_index_measure(_unit(x).float(), _unit(y).float(), data_range=1.0, reduction="none")
    return values.float()  # type: ignore[union-attr]


def _histogram(indices: Tensor, vocab_size: int) -> Tensor:
    flat = indices.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise ValueError(f"code indices must lie in [0, {vocab_size}); got [{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat, minlength=vocab_size)


def _usage_perplexity(counts: Tensor) -> tuple[float, float]:
    total = counts.sum()
    if total == 0:
        return 0.0, math.nan
    p = counts.double() / total
    entropy = -torch.special.xlogy(p, p).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())


def usage_and_perplexity(indices: Tensor, vocab_size: int) -> tuple[float, float]:
    """Fraction of the codebook used at least once in `indices`, and exp(entropy) of its code histogram."""
    return _usage_perplexity(_histogram(indices, vocab_size))


class CodebookUsage(Metric):
    """Code histogram accumulated over an evaluation set; `usage()` and `perplexity()` read it.

    A torchmetrics `Metric` so that the histogram is summed across DDP ranks before it is read.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, vocab_size: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.vocab_size = vocab_size
        self.add_state("counts", default=torch.zeros(vocab_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, indices: Tensor) -> None:  # type: ignore[override]
        self.counts += _histogram(indices, self.vocab_size).to(self.counts.device)

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        usage, perplexity = _usage_perplexity(self.counts)
        return {"usage": usage, "perplexity": perplexity}

    def usage(self) -> float:
        """Fraction of the `vocab_size` codes seen at least once."""
        return self.compute()["usage"]

    def perplexity(self) -> float:
        """exp(entropy) of the code histogram: k for a uniform use of k codes."""
        return self.compute()["perplexity"]


__all__ = ["CodebookUsage", "psnr", "ssim", "to_uint8", "usage_and_perplexity"]
