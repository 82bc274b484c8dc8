"""VQ tokenizer (LlamaGen's VQGAN): conv encoder → 1×1 quant_conv → l2-normalised codebook → decoder.

Tokens: LongTensor (B, h, w) with h = w = image_size / 2^(levels − 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arvision.tokenizers.base import TokenSpec, Tokenizer
from arvision.tokenizers.losses import reconstruction_loss
from arvision.tokenizers.nets import Decoder, Encoder, latent_side
from arvision.tokenizers.quantize import VectorQuantizer, nearest_code


class VQTokenizer(Tokenizer):
    def __init__(
        self,
        *,
        image_size: int,
        image_channels: int,
        ch: int = 64,
        ch_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        z_channels: int = 64,
        attn_last_level: bool = False,
        mid_attn: bool = True,
        dropout: float = 0.0,
        vocab_size: int = 1024,
        code_dim: int = 8,
        beta: float = 0.25,
        l2_norm: bool = True,
        entropy_weight: float = 0.0,
        restart_unused: bool = False,
        recon_loss: str = "l2",
        name: str = "vq",
    ) -> None:
        super().__init__()
        ch_mult = tuple(ch_mult)
        side = latent_side(image_size, ch_mult)
        net = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                   attn_last_level=attn_last_level, mid_attn=mid_attn, dropout=dropout)
        self.encoder = Encoder(in_channels=image_channels, **net)
        self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
        self.quantize = VectorQuantizer(vocab_size=vocab_size, dim=code_dim, beta=beta, l2_norm=l2_norm,
                                        entropy_weight=entropy_weight, restart_unused=restart_unused)
        self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)
        self.decoder = Decoder(out_channels=image_channels, **net)
        self.recon_loss = recon_loss
        self.spec = TokenSpec(name=name, kind="discrete", layout="grid", grid=(side, side), dim=code_dim,
                              vocab_size=vocab_size, image_size=image_size, image_channels=image_channels,
                              has_codebook=True)

    def quantize_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return self.quantize(self.quant_conv(self.encoder(images)))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize_images(images)[1]

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

