"""FSQ and LFQ tokenizers through `vector-quantize-pytorch` (optional extra: pip install 'arvision[vqp]').

Both quantise each latent channel on its own (FSQ: a few bounded levels per channel, Mentzer et al. 2023; LFQ:
the sign of each channel, MAGVIT-v2), so the "codebook" is implicit and every index is used by construction of
the grid. Tokens are a plain grid (B, h, w) of indices in [0, vocab_size), so raster generators take them as they
take VQ tokens. The library's arguments are passed explicitly here (see reference notes §5). LFQ's loss weights
are lighter than MAGVIT-v2's 0.1 / 0.25, which swamp our per-pixel-mean reconstruction loss (conf/tokenizer/lfq.yaml).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from arvision.tokenizers.base import MissingExtra, TokenSpec
from arvision.tokenizers.losses import reconstruction_loss
from arvision.tokenizers.nets import ConvTokenizer
from arvision.tokenizers.quantize import usage_and_perplexity

VQP_VERSION = "1.32.0"


def _library():
    try:
        import vector_quantize_pytorch
    except ImportError as err:
        raise MissingExtra(f"tokenizer=fsq|lfq needs vector-quantize-pytorch=={VQP_VERSION}: "
                           f"pip install 'arvision[vqp]'") from err
    return vector_quantize_pytorch


class LookupFreeTokenizer(ConvTokenizer):
    def __init__(
        self,
        *,
        method: str = "fsq",
        levels: tuple[int, ...] = (8, 5, 5, 5),
        codebook_size: int = 256,
        entropy_weight: float = 0.001,
        commitment_weight: float = 0.01,
        name: str = "fsq",
        **net: Any,  # ConvTokenizer's network keys and image size
    ) -> None:
        vqp = _library()  # before any work: a missing extra says how to install it
        super().__init__(**net)
        side = self.latent_side
        if method == "fsq":
            code_dim, vocab_size = len(levels), math.prod(levels)
            self.quantize = vqp.FSQ(levels=list(levels), dim=code_dim, channel_first=True)
        elif method == "lfq":
            code_dim = int(math.log2(codebook_size))
            if 2**code_dim != codebook_size:
                raise ValueError(f"lfq codebook_size must be a power of two, got {codebook_size}")
            vocab_size = codebook_size
            self.quantize = vqp.LFQ(dim=code_dim, codebook_size=codebook_size, entropy_loss_weight=entropy_weight,
                                    commitment_loss_weight=commitment_weight, channel_first=True)
        else:
            raise ValueError(f"method must be fsq or lfq, got {method!r}")
        self.method = method
        self.quant_conv = nn.Conv2d(self.z_channels, code_dim, 1)
        self.post_quant_conv = nn.Conv2d(code_dim, self.z_channels, 1)
        self.decoder = self.make_decoder()
        self.spec = TokenSpec(name=name, kind="discrete", layout="grid", grid=(side, side), dim=code_dim,
                              vocab_size=vocab_size, image_size=self.image_size,
                              image_channels=self.image_channels)

    def quantize_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ (straight-through codes (B, d, h, w), indices (B, h, w), auxiliary loss)."""
        z = self.quant_conv(self.encoder(images))
        if self.method == "fsq":
            z_q, indices = self.quantize(z)
            return z_q, indices, z.new_zeros(())
        z_q, indices, aux = self.quantize(z)
        return z_q, indices, aux

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize_images(images)[1].long()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = self.quantize.indices_to_codes(tokens)
        return self.decoder(self.post_quant_conv(codes)).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z_q, indices, aux = self.quantize_images(images)
        recon = self.decoder(self.post_quant_conv(z_q))
        rec = reconstruction_loss(recon, images, self.recon_loss)
        usage, perplexity = usage_and_perplexity(indices.long(), self.spec.vocab_size)
        return {"recon": recon, "indices": indices, "loss": rec + aux, "recon_loss": rec, "aux_loss": aux,
                "usage": usage, "perplexity": perplexity}

