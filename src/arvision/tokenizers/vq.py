"""VQ tokenizer (LlamaGen's VQGAN): conv encoder → 1×1 quant_conv → l2-normalised codebook → decoder.

Tokens: LongTensor (B, h, w) with h = w = image_size / 2^(levels − 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvision.tokenizers.base import TokenSpec
from arvision.tokenizers.losses import reconstruction_loss
from arvision.tokenizers.nets import ConvTokenizer
from arvision.tokenizers.quantize import VectorQuantizer, nearest_code


class VQTokenizer(ConvTokenizer):
    def __init__(
        self,
        *,
        vocab_size: int = 1024,
        code_dim: int = 8,
        beta: float = 0.25,
        l2_norm: bool = True,
        entropy_weight: float = 0.0,
        restart_unused: bool = False,
        name: str = "vq",
        **net: Any,  # ConvTokenizer's network keys and image size
    ) -> None:
        super().__init__(**net)
        side = self.latent_side
        self.quant_conv = nn.Conv2d(self.z_channels, code_dim, 1)
        self.quantize = VectorQuantizer(vocab_size=vocab_size, dim=code_dim, beta=beta, l2_norm=l2_norm,
                                        entropy_weight=entropy_weight, restart_unused=restart_unused)
        self.post_quant_conv = nn.Conv2d(code_dim, self.z_channels, 1)
        self.decoder = self.make_decoder()
        self.spec = TokenSpec(name=name, kind="discrete", layout="grid", grid=(side, side), dim=code_dim,
                              vocab_size=vocab_size, image_size=self.image_size, image_channels=self.image_channels,
                              has_codebook=True)

    def quantize_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return self.quantize(self.quant_conv(self.encoder(images)))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize_images(images)[1]

    def encode_scales(self, images: torch.Tensor, sides: Sequence[int]) -> list[torch.Tensor]:
        """FlexVAR's per-scale tokens (its trainer's `encode_var_wo_firstL`): the continuous latent (after quant_conv)
        area-resized to each side n and quantised on its own → one (B, n, n) map per side; at the grid side that is
        `encode(images)`."""
        z = self.quant_conv(self.encoder(images))
        maps = []
        for n in sides:
            z_n = z if n == z.shape[-1] else F.interpolate(z, size=(n, n), mode="area")
            maps.append(self.nearest_codes(rearrange(z_n, "b c h w -> (b h w) c")).view(z.shape[0], n, n))
        return maps

    def codebook(self) -> torch.Tensor:
        return self.quantize.codebook()

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        return nearest_code(F.normalize(z, dim=-1) if self.quantize.l2_norm else z, self.codebook())

    def decode_codes(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(self.quantize.lookup(tokens)).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z_q, indices, terms = self.quantize_images(images)
        recon = self.decode_codes(z_q)
        rec = reconstruction_loss(recon, images, self.recon_loss)
        quant = sum(v for k, v in terms.items() if k.endswith("_loss"))
        return {"recon": recon, "indices": indices, "loss": rec + quant, "recon_loss": rec, **terms}

