"""Convolutional encoder and decoder shared by every tokenizer (LlamaGen / VQGAN layout).

Encoder: conv_in → per level [res blocks (+ attention at the last level), downsample] → mid (res, attn, res)
→ norm → conv_out. The decoder mirrors it with upsampling. Attributes are named as in LlamaGen's checkpoints
(`conv_blocks.{i}.res.{j}`, `mid`, `norm_out`, `conv_out`) so their weights map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arvision.tokenizers.base import Tokenizer


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in VQGAN; fewer for narrow CPU-sized networks.
    groups = 32
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with separate 1×1 q, k, v convs (LlamaGen's layout)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in VQGAN


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks, optional attention after each, optional resampling."""

    def __init__(self, in_ch: int, out_ch: int, num_res_blocks: int, attn: bool, resample: nn.Module | None,
                 dropout: float) -> None:
        # The resampler is stored as `downsample` or `upsample`, matching LlamaGen's state-dict keys.
        super().__init__()
        self.res = nn.ModuleList(
            [ResnetBlock(in_ch if j == 0 else out_ch, out_ch, dropout) for j in range(num_res_blocks)])
        self.attn = nn.ModuleList([AttnBlock(out_ch) for _ in range(num_res_blocks)]) if attn else nn.ModuleList()
        self.downsample = resample if isinstance(resample, Downsample) else None
        self.upsample = resample if isinstance(resample, Upsample) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


def mid_block(channels: int, attn: bool, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(channels, channels, dropout),
                         AttnBlock(channels) if attn else nn.Identity(),
                         ResnetBlock(channels, channels, dropout))


class Encoder(nn.Module):
    def __init__(self, *, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, attn_last_level: bool, mid_attn: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        widths = [ch * m for m in ch_mult]
        blocks, prev = [], ch
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            blocks.append(Level(prev, width, num_res_blocks, attn_last_level and last,
                                None if last else Downsample(width), dropout))
            prev = width
        self.conv_blocks = nn.ModuleList(blocks)
        self.mid = mid_block(prev, mid_attn, dropout)
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, attn_last_level: bool, mid_attn: bool, dropout: float = 0.0) -> None:
        super().__init__()
        widths = [ch * m for m in reversed(ch_mult)]
        self.conv_in = nn.Conv2d(z_channels, widths[0], 3, padding=1)
        self.mid = mid_block(widths[0], mid_attn, dropout)
        blocks, prev = [], widths[0]
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            # The decoder gets one extra res block per level, as in VQGAN.
            blocks.append(Level(prev, width, num_res_blocks + 1, attn_last_level and i == 0,
                                None if last else Upsample(width), dropout))
            prev = width
        self.conv_blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def latent_side(image_size: int, ch_mult: tuple[int, ...]) -> int:
    """Side of the latent grid: one 2× downsampling per level after the first."""
    factor = 2 ** (len(ch_mult) - 1)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} is not divisible by 2^{len(ch_mult) - 1} (len(ch_mult) − 1)")
    return image_size // factor



class ConvTokenizer(Tokenizer):
    """A tokenizer on this module's encoder and decoder: the network keys every tokenizer config shares
    (`conf/tokenizer/common/net.yaml`), so tokenizers compare like for like.

    A subclass passes these keys through (`**net`) and builds, in this order, which fixes the initial weights for
    a seed: the encoder (here), its own quant_conv, quantiser and post_quant_conv, then `self.make_decoder()`.
    """

    def __init__(self, *, image_size: int, image_channels: int, ch: int = 64, ch_mult: tuple[int, ...] = (1, 2, 2),
                 num_res_blocks: int = 1, z_channels: int = 64, attn_last_level: bool = False, mid_attn: bool = True,
                 dropout: float = 0.0, recon_loss: str = "l2") -> None:
        super().__init__()
        ch_mult = tuple(ch_mult)
        self.image_size, self.image_channels, self.z_channels = image_size, image_channels, z_channels
        self.latent_side = latent_side(image_size, ch_mult)
        self.recon_loss = recon_loss
        self._net = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                         attn_last_level=attn_last_level, mid_attn=mid_attn, dropout=dropout)
        self.encoder = Encoder(in_channels=image_channels, **self._net)

    def make_decoder(self) -> Decoder:
        return Decoder(out_channels=self.image_channels, **self._net)
