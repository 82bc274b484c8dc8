"""MAR's KL-16 VAE (LTH14/mar `models/vae.py`, `kl16.ckpt`; FlowAR uses the same file): continuous latents with 16
channels at stride 16 for the flow/diffusion generators.

    images ─► encoder (conv_out: 2·C channels) ─► quant_conv (1×1, 2·C → 2·C: μ, log σ²) ─► N(μ, σ²) ─► z
    z ─► post_quant_conv (1×1, C → C) ─► decoder (conv_in reads C channels)

The layout differs from `tokenizer=vae` (arvision's KL-VAE) in three places: the encoder itself emits the 2·C
moments (LDM's `double_z`), both 1×1 convs keep their width, and only the encoder has attention in its levels
(MAR builds it at the 16-px level of a 256-px image, its last level with ch_mult (1, 1, 2, 2, 4); the decoder
attends in its middle block only). Every other block is `nets.py`'s, so arvision's names map one to one onto
`kl16.ckpt`'s (`arvision.imports.kl16`).

Tokens: FloatTensor (B, C, h, w) = z · scaling_factor, where z is a posterior sample (`encode_posterior: sample`,
what MAR and FlowAR train on) or the posterior mean (`mean`: deterministic tokens). Decoding divides by the factor.
The factor is MAR's 0.2325 as built (what an import of `kl16.ckpt` uses); a KL-16 trained in arvision's stage 1
measures its own, as MAR measured theirs (1 / std of the posterior means, `calibrate_scaling`). Training, the loss
terms and the calibration are `tokenizer=vae`'s (`KLVAETokenizer`).
"""

from __future__ import annotations

import torch
from torch import nn

from arvision.tokenizers.nets import Decoder
from arvision.tokenizers.vae import KLVAETokenizer

MAR_SCALING_FACTOR = 0.2325  # LTH14/mar engine_mar.py and FlowAR's engine.py: posterior.sample() · 0.2325
POSTERIOR_MODES = ("sample", "mean")


class KL16Tokenizer(KLVAETokenizer):
    def __init__(
        self,
        *,
        image_size: int,
        image_channels: int,
        embed_dim: int = 16,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        encoder_attn_last_level: bool = True,
        dropout: float = 0.0,
        scaling_factor: float = MAR_SCALING_FACTOR,
        encode_posterior: str = "sample",
        kl_weight: float = 1e-9,
        sample_posterior: bool = True,
        logvar_clamp: tuple[float, float] = (-30.0, 20.0),
        recon_loss: str = "l2",
        name: str = "kl16",
    ) -> None:
        if encode_posterior not in POSTERIOR_MODES:
            raise ValueError(f"encode_posterior must be one of {', '.join(POSTERIOR_MODES)}, got {encode_posterior!r}")
        if not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}")
        self.embed_dim = embed_dim
        # The encoder emits the moments itself (z_channels = 2·C), so quant_conv is 2·C → 2·C as in MAR.
        super().__init__(image_size=image_size, image_channels=image_channels, ch=ch, ch_mult=tuple(ch_mult),
                         num_res_blocks=num_res_blocks, z_channels=2 * embed_dim,
                         attn_last_level=encoder_attn_last_level, mid_attn=True, dropout=dropout,
                         recon_loss=recon_loss, latent_channels=embed_dim, kl_weight=kl_weight,
                         sample_posterior=sample_posterior, logvar_clamp=logvar_clamp, name=name)
        # MAR's post_quant_conv keeps the latent's width (C → C); the decoder reads the C channels.
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.encode_posterior = encode_posterior
        self.scaling_factor.fill_(scaling_factor)

    def make_decoder(self) -> Decoder:
        """MAR's decoder: attention in its middle block only, conv_in from the C latent channels."""
        net = self._net
        return Decoder(out_channels=self.image_channels, ch=net["ch"], ch_mult=net["ch_mult"],
                       num_res_blocks=net["num_res_blocks"], z_channels=self.embed_dim, attn_last_level=False,
                       mid_attn=True, dropout=net["dropout"])

    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled tokens (B, C, h, w): a posterior sample (noise from `generator`, else the global stream, as MAR
        draws it) or the posterior mean, by `encode_posterior`."""
        posterior = self.posterior(images)
        z = posterior.sample(generator) if self.encode_posterior == "sample" else posterior.mean
        return z * self.scaling_factor
