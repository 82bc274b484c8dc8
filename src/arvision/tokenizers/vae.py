"""KL-VAE tokenizer (LDM's AutoencoderKL, as used by MAR and FlowAR): continuous latents for flow/diffusion heads.

    images ─► encoder ─► quant_conv (1×1 → 2·C: mean, log-variance) ─► N(μ, σ²) ─► z ─► post_quant_conv ─► decoder

Training decodes a reparameterised posterior sample z = μ + σ·ε (with `sample_posterior`, the LDM default);
`encode` returns the posterior mean, so the latents a generator trains on are deterministic.

Loss = reconstruction + kl_weight · KL(N(μ, σ²) ‖ N(0, I)), the KL summed over all latent elements (C·h·w) of an
image and averaged over the batch, as in LDM. Our reconstruction term is a per-pixel mean (LDM sums it per
image), so a given kl_weight regularises C·H·W times more strongly here than the same number in LDM.

Tokens: FloatTensor (B, C, h, w) = μ · scaling_factor. The scaling factor (1 / std of the posterior means on
training images, LDM's "unit variance" recipe; MAR/FlowAR's 0.2325) is a persistent buffer, so it travels in
the artifact's state dict. `calibrate_scaling` sets it after stage 1; `decode` divides by it first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from arvision.tokenizers.base import TokenSpec
from arvision.tokenizers.losses import reconstruction_loss
from arvision.tokenizers.nets import ConvTokenizer


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per sample: 0.5 · Σ (μ² + σ² − 1 − log σ²) over every non-batch dimension."""
    # expm1: σ² − 1 without cancellation when log σ² ≈ 0 (posteriors near the prior), so the term stays ≥ 0.
    per_element = 0.5 * (mean.pow(2) + torch.expm1(logvar) - logvar)
    return per_element.flatten(1).sum(1)


class DiagonalGaussian:
    """A diagonal Gaussian posterior from `moments` (B, 2·C, h, w): the first C channels are μ, the rest log σ².

    The log-variance is clamped (LDM: [−30, 20]) so exp() neither underflows to a zero σ nor overflows.
    """

    def __init__(self, moments: torch.Tensor, logvar_clamp: tuple[float, float] = (-30.0, 20.0)) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*logvar_clamp)
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Reparameterised: the noise is a constant, so gradients reach μ and σ (and the encoder behind them).
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """KL to the standard normal prior, per sample (B,)."""
        return kl_standard_normal(self.mean, self.logvar)


class KLVAETokenizer(ConvTokenizer):
    has_scaling_factor = True

    def __init__(
        self,
        *,
        latent_channels: int = 4,
        kl_weight: float = 1e-9,
        sample_posterior: bool = True,
        logvar_clamp: tuple[float, float] = (-30.0, 20.0),
        name: str = "vae",
        **net: Any,  # ConvTokenizer's network keys and image size
    ) -> None:
        super().__init__(**net)
        side = self.latent_side
        low, high = (float(v) for v in logvar_clamp)
        if not low < high:
            raise ValueError(f"logvar_clamp must be (low, high) with low < high, got {tuple(logvar_clamp)}")
        self.quant_conv = nn.Conv2d(self.z_channels, 2 * latent_channels, 1)  # → mean and log-variance
        self.post_quant_conv = nn.Conv2d(latent_channels, self.z_channels, 1)
        self.decoder = self.make_decoder()
        self.kl_weight = kl_weight
        self.sample_posterior = sample_posterior
        self.logvar_clamp = (low, high)
        # Persistent, so a calibrated factor is saved and restored with the weights.
        self.register_buffer("scaling_factor", torch.tensor(1.0))
        self.spec = TokenSpec(name=name, kind="continuous", layout="grid", grid=(side, side), dim=latent_channels,
                              image_size=self.image_size, image_channels=self.image_channels)

    # ----------------------------------------------------------------------------------------- unscaled latents
    def posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(images)), self.logvar_clamp)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent → image (not clamped: the training loss sees the raw output)."""
        return self.decoder(self.post_quant_conv(z))

    # ----------------------------------------------------------------------------------------- tokens
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior mean, scaled to unit variance: (B, C, h, w)."""
        return self.posterior(images).mean * self.scaling_factor

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_latents(tokens / self.scaling_factor).clamp(-1, 1)

    # ----------------------------------------------------------------------------------------- stage 1
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        posterior = self.posterior(images)
        # A posterior sample while training (the decoder learns to tolerate latent noise); the mean otherwise,
        # so that in eval mode forward's reconstruction is decode(encode(images)).
        z = posterior.sample() if self.training and self.sample_posterior else posterior.mean
        recon = self.decode_latents(z)
        rec = reconstruction_loss(recon, images, self.recon_loss)
        kl = posterior.kl().mean()  # summed over latent elements, averaged over the batch (LDM)
        return {
            "recon": recon,
            "loss": rec + self.kl_weight * kl,
            "recon_loss": rec,
            "kl_loss": kl,  # unweighted, as LDM logs it
            "latent_std": (posterior.mean.detach() * self.scaling_factor).std(),  # spread of the tokens
            "posterior_std": posterior.std.detach().mean(),  # mean σ: how noisy the posterior is
        }


    # ----------------------------------------------------------------------------------------- scaling factor
    @torch.no_grad()
    def calibrate_scaling(self, images: torch.Tensor | Iterable, *, max_images: int | None = None) -> float:
        """Set `scaling_factor` to 1 / std of the posterior means over `images`; returns it.

        `images` is a tensor (N, C, H, W) or an iterable of batches (tensors, or (images, labels) tuples as a
        DataLoader yields). The std is over every latent element of every image (one scalar, as in LDM), and
        the means are unscaled, so calibrating twice gives the same factor. Runs in eval mode (no dropout).
        """
        batches = [images] if torch.is_tensor(images) else images
        device = self.scaling_factor.device
        total = total_sq = 0.0
        count = seen = 0
        was_training = self.training
        self.eval()
        try:
            for batch in batches:
                if not torch.is_tensor(batch):
                    batch = batch[0]  # (images, labels)
                if max_images is not None:
                    batch = batch[: max_images - seen]
                if len(batch) == 0:
                    break
                # float64 sums: a streaming variance over many latents loses precision in float32.
                mean = self.posterior(batch.to(device)).mean.double()
                total += mean.sum().item()
                total_sq += mean.pow(2).sum().item()
                count += mean.numel()
                seen += len(batch)
                if max_images is not None and seen >= max_images:
                    break
        finally:
            self.train(was_training)
        if count < 2:
            raise ValueError("calibrate_scaling needs at least one image")
        variance = (total_sq - total * total / count) / (count - 1)
        if not variance > 0:
            raise ValueError(f"posterior means have variance {variance}; cannot scale them to unit variance")
        self.scaling_factor.fill_(variance ** -0.5)
        return float(self.scaling_factor)  # the stored (float32) value, so metadata and weights agree
