"""The SD-VAE through diffusers' own `AutoencoderKL` (optional extra: pip install 'arvision[diffusers]'): the
tokenizer of DiT and ACDiT (`stabilityai/sd-vae-ft-ema`, `-ft-mse`; 4 latent channels at stride 8).

The network is the library's, not rewritten: `self.vae` is a `diffusers.AutoencoderKL` built from the config keys
below (the names of its `config.json`), so its state dict is a diffusers one under the prefix `vae.`. Encoding and
decoding go through the library's `encode(...).latent_dist` and `decode(...).sample`.

Tokens: FloatTensor (B, C, h, w) = z · scaling_factor, z a posterior sample (`encode_posterior: sample`, as DiT
encodes its training images) or the posterior mean (`mean`). The factor starts as the config's (SD-VAE: 0.18215;
an import takes the one in the folder's config.json); decoding divides by it first, as ACDiT's sampler does.

Stage 1 trains the whole VAE from scratch (at a CPU size via `block_out_channels` / `layers_per_block`) with
`tokenizer=vae`'s objective: reconstruction + kl_weight · KL, a posterior sample decoded in training, then the
scaling factor measured on training images. Fine-tuning the released decoder is not offered: arvision's stage 1
starts from the config, and a released VAE comes in through arvision-import (official=sd_vae_ft_ema).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from arvision.tokenizers.base import MissingExtra, Tokenizer, TokenSpec
from arvision.tokenizers.kl16 import POSTERIOR_MODES
from arvision.tokenizers.losses import reconstruction_loss
from arvision.tokenizers.nets import latent_side
from arvision.tokenizers.vae import KLVAETokenizer

DIFFUSERS_VERSION = "0.42.1"
SD_SCALING_FACTOR = 0.18215  # the SD-VAE's config.json (DiT, ACDiT: latents ÷ vae.config.scaling_factor)


def autoencoder_kl() -> type:
    """diffusers' AutoencoderKL class, or MissingExtra saying how to install it."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise MissingExtra(f"tokenizer=sd_vae needs diffusers=={DIFFUSERS_VERSION}: "
                           "pip install 'arvision[diffusers]'") from err
    return AutoencoderKL


class DiffusersVAETokenizer(Tokenizer):
    has_scaling_factor = True

    def __init__(
        self,
        *,
        image_size: int,
        image_channels: int,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        scaling_factor: float = SD_SCALING_FACTOR,
        encode_posterior: str = "sample",
        kl_weight: float = 1e-9,
        sample_posterior: bool = True,
        recon_loss: str = "l2",
        name: str = "sd_vae",
    ) -> None:
        library = autoencoder_kl()  # before any work: a missing extra says how to install it
        super().__init__()
        block_out_channels = tuple(int(c) for c in block_out_channels)
        if encode_posterior not in POSTERIOR_MODES:
            raise ValueError(f"encode_posterior must be one of {', '.join(POSTERIOR_MODES)}, got {encode_posterior!r}")
        if not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}")
        narrow = [c for c in block_out_channels if c % norm_num_groups]
        if narrow:
            raise ValueError(f"block_out_channels {list(block_out_channels)} must be multiples of norm_num_groups "
                             f"{norm_num_groups}")
        side = latent_side(image_size, block_out_channels)  # one 2× downsampling per block after the first
        levels = len(block_out_channels)
        self.vae = library(in_channels=image_channels, out_channels=image_channels,
                           down_block_types=("DownEncoderBlock2D",) * levels,
                           up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=block_out_channels,
                           layers_per_block=layers_per_block, latent_channels=latent_channels,
                           norm_num_groups=norm_num_groups, sample_size=image_size, scaling_factor=scaling_factor)
        self.image_size, self.image_channels = image_size, image_channels
        self.encode_posterior = encode_posterior
        self.kl_weight = kl_weight
        self.sample_posterior = sample_posterior
        self.recon_loss = recon_loss
        # Persistent, so a calibrated factor is saved and restored with the weights.
        self.register_buffer("scaling_factor", torch.tensor(float(scaling_factor)))
        self.spec = TokenSpec(name=name, kind="continuous", layout="grid", grid=(side, side), dim=latent_channels,
                              image_size=image_size, image_channels=image_channels)

    # ----------------------------------------------------------------------------------------- unscaled latents
    def posterior(self, images: torch.Tensor) -> Any:
        """diffusers' DiagonalGaussianDistribution (`mean`, `std`, `sample(generator)`, `kl()`)."""
        return self.vae.encode(images).latent_dist

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent → image (not clamped)."""
        return self.vae.decode(z).sample

    # ----------------------------------------------------------------------------------------- tokens
    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        posterior = self.posterior(images)
        z = posterior.sample(generator=generator) if self.encode_posterior == "sample" else posterior.mean
        return z * self.scaling_factor

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_latents(tokens / self.scaling_factor).clamp(-1, 1)

    # ----------------------------------------------------------------------------------------- stage 1
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        posterior = self.posterior(images)
        z = posterior.sample() if self.training and self.sample_posterior else posterior.mean
        recon = self.decode_latents(z)
        rec = reconstruction_loss(recon, images, self.recon_loss)
        kl = posterior.kl().mean()  # summed over latent elements, averaged over the batch (LDM)
        return {"recon": recon, "loss": rec + self.kl_weight * kl, "recon_loss": rec, "kl_loss": kl,
                "latent_std": (posterior.mean.detach() * self.scaling_factor).std(),
                "posterior_std": posterior.std.detach().mean()}

    @torch.no_grad()
    def calibrate_scaling(self, images: torch.Tensor | Iterable, *, max_images: int | None = None) -> float:
        """1 / std of the posterior means over `images`, stored and returned: `tokenizer=vae`'s measurement, which
        reads only `posterior(...).mean` and the `scaling_factor` buffer."""
        return KLVAETokenizer.calibrate_scaling(self, images, max_images=max_images)  # type: ignore[arg-type]
