"""FlowAR (Ren et al., 2024): next-scale autoregression over continuous VAE latents with a flow-matching head.

Built as OliverRensu/FlowAR's `models/flowar.py` and `models/flowmodel.py` build it by default; the official
state dict maps onto these modules by renaming alone (`imports/flowar.py`).

Scales. The latent (B, C, h, h) is modelled as a pyramid of K maps with sides `scales` (default 1, 2, 4, …, h),
each obtained by area-downsampling the finest latent (FlowAR's coarse scales are not re-encoded images). Token
order: scale by scale, raster order within a scale; L = Σ s_k² positions.

AR backbone (`backbone`). `official`: FlowAR's MAR-style pair of stacks at one width: `depth` "encoder" blocks
(learned position table, then RMSNorm `z_proj_ln`, the blocks, `norm`), a linear `decoder_embed`, a second
position table, `depth` "decoder" blocks and `decoder_norm`; a third table (`head_pos_embed`, FlowAR's
`diffusion_pos_embed`) is added to the output. `single_stack`: the encoder half only (one stack of `depth` blocks,
its norm and the third table). The input at slot 0 is the class embedding (it "predicts" the 1×1 scale); the inputs
of scale k + 1 are the scale-k latent (ground truth in training, the sample at inference) bicubic-upsampled to h×h,
area-downsampled to s_{k+1}, and linearly projected to the width. Positions: learned tables and/or 2-D RoPE with
per-scale coordinates normalised to the finest grid (index i of a side-s scale sits at i·h/s, FlowAR's
`VisionRotaryEmbeddingFast`). Blocks: RMSNorm (no affine) → attention (q/k/v and output biases, `bias`) → gated
MLP, each modulated by a *global* adaLN (gate, scale, shift) from the class embedding. The MLP (`mlp`):
`gelu_swiglu` is FlowAR's, timm's `SwiGLU` built with exact GELU as the gate's activation and biases, hidden
int(8d/3) (2730 at d = 1024); `swiglu` is Llama's (SiLU, no biases, hidden rounded up to a multiple of 64/256).
Attention is block-causal over scales (a scale sees itself and every coarser scale), one pass in training; at
sampling each scale is one pass over only its new tokens against per-layer KV caches (exact: no position attends
to a later scale).

Flow head. The backbone output z_i of every position conditions a rectified-flow velocity model for that
position's latent (`nn/processes.py`: x_t = (1 − t)·x0 + t·ε, v = ε − x0, t = 1 is noise; FlowAR's code
convention, its paper flips t). Three kinds (`head`):
- `spatial` (FlowAR-S: `SimpleTransformerAdaLN` with `Block_v1`): a small transformer over all tokens of one
  scale (2-D RoPE on the same normalised coordinates; q/k/v without bias, output with bias) whose attention and MLP
  are modulated *per token* by Linear(SiLU(cond_embed(z_i) + t_emb)) — "spatial adaLN".
- `cross` (FlowAR-L/H: `Block_v2`): attention modulated by t_emb alone, then an ungated cross-attention from the
  RMS-normed (affine) tokens to the RMS-normed (affine) raw conditions z of the same scale (RoPE on both), then the
  MLP modulated per token by c_i + t_emb.
- `mlp` (MAR's `SimpleMLPAdaLN`): residual MLP blocks with adaLN from t_emb + cond_embed(z_i); tokens do not
  interact, all spatial coupling comes from the backbone.
In training all scales go through one head call with a block-diagonal mask (tokens attend within their own scale
only), which equals K separate calls. Initialisation as FlowAR's `initialize_weights` leaves it: every linear layer
Xavier-uniform with zero biases — the head's output layer and time MLP included, since FlowAR's model-wide pass
runs after the head's own zero/normal initialisation and overrides it — class and position tables N(0, 0.02);
`head_out_init=zero` zeroes the output layer instead (the head then starts at v = 0). The `mlp` head keeps MAR's
initialisation. t is drawn once per (image, scale) and shared by its tokens; the head embeds floor(1000·t). The
loss is FlowAR's: Σ_k MSE_k · n_k / n_K (n_k = tokens of scale k), i.e. every token counts equally, normalised by
the finest scale. `head_batch_mul` > 1 repeats the head's part of the batch with fresh t and noise (MAR's
`diffusion_batch_mul`). The head and the loss run in fp32 with autocast off in training (FlowAR trains in fp32/TF32
and reports NaNs otherwise); in sampling the head follows the ambient autocast, as FlowAR samples under fp16
autocast (`sample(head_fp32=True)` keeps it in fp32 there too).

Sampling, per scale k: one cached backbone pass, then the head's ODE/SDE from t = 1 to 0 with classifier-free
guidance on the velocity, uncond + w_k·(cond − uncond): w_k ramps linearly from 1 at the first scale to `cfg` at
the last (FlowAR; `cfg_schedule=constant` keeps `cfg`), and is applied only while t ≤ guidance_high (FlowAR: 0.9
for S/L, 0.7 for H). `time_grid=flowar` samples as FlowAR's `models/sampler.py`: Euler on its non-uniform grid
(12 points 1 → 0.3, 13 points 0.25 → 0 for 25 steps: 24 evaluations) that switches to the uniform grid at exactly
50 steps, and Euler–Maruyama on linspace(1, 0.04, steps) then 0 (steps − 1 noisy steps and a final mean step);
`time_grid=uniform` uses linspace(1, 0, steps + 1) for any sampler. Under CFG the backbone runs conditional and
null-class rows as one batch of 2B; the sampled latent feeds both halves' next input. FlowAR's own loop keeps the
null-class half on its own noise outside the guidance interval and copies the conditional half into it inside;
the conditional half, the only one returned, follows the same path here. `sample(decode="compiled")` runs each
head evaluation through torch.compile (one graph per scale and row count, replayed as a CUDA graph on CUDA,
`mode="reduce-overhead"`); `eager` (default) calls the head as it is.

Measured on the CPU demo (`experiment=paradigms paradigm=flowar budget=0.4`, 10,000 training images, 500 samples
against 2,000 test images, one run each, generators/README.md): see the FlowAR table there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvision.generators.base import Generator, SamplingCost, require
from arvision.generators.sampling import linear_cfg_schedule
from arvision.nn.attention import Attention, KVCache, flex
from arvision.nn.graphs import compiled_step
from arvision.nn.blocks import FeedForward, LabelEmbedding, TimestepEmbedder, swiglu_hidden
from arvision.nn.masks import (block_causal_mask, block_causal_mask_mod, flex_block_mask, is_block_mask, segment_ids,
                               use_flex)
from arvision.nn.norm import RMSNorm
from arvision.nn.processes import TIME_GRIDS, RectifiedFlow
from arvision.nn.rope import apply_rope, rope_2d
from arvision.tokenizers.base import TokenSpec

HEADS = ("spatial", "cross", "mlp")
POSITIONS = ("both", "learned", "rope")
BACKBONES = ("official", "single_stack")
MLPS = ("gelu_swiglu", "swiglu")
HEAD_OUT_INITS = ("xavier", "zero")
CFG_SCHEDULES = ("linear", "constant")
DECODE_MODES = ("eager", "compiled")
SAMPLERS = ("euler", "heun", "euler_maruyama")


def rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm without affine weights (FlowAR's pre-adaLN norm), computed in fp32."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def scale_positions(scales: Sequence[int], side: int) -> torch.Tensor:
    """(L, 2) RoPE coordinates of every position, scale by scale: index i of a side-s map sits at i·side/s."""
    rows, cols = [], []
    for s in scales:
        coord = torch.arange(s, dtype=torch.float64) * side / s
        r, c = torch.meshgrid(coord, coord, indexing="ij")
        rows.append(r.flatten())
        cols.append(c.flatten())
    return torch.stack([torch.cat(rows), torch.cat(cols)], dim=-1)


def flowar_hidden(dim: int) -> int:
    """FlowAR's MLP width int(dim·mlp_ratio·2/3) with mlp_ratio 4: 2048 at 768, 2730 at 1024, 4096 at 1536."""
    return int(dim * 4 * 2 / 3)


def time_grid_for(sampler: str, time_grid: str) -> str:
    """The processes' grid a (sampler, time_grid) pair integrates on: `flowar` means as FlowAR's sampler.py does —
    its Euler grid for Euler and Heun, its SDE grid for Euler–Maruyama."""
    if sampler not in SAMPLERS:
        raise ValueError(f"flow sampler must be one of {SAMPLERS}, got {sampler!r}")
    if time_grid not in TIME_GRIDS:
        raise ValueError(f"time_grid must be one of {TIME_GRIDS}, got {time_grid!r}")
    return "sde" if sampler == "euler_maruyama" and time_grid == "flowar" else time_grid


class GatedMLP(nn.Module):
    """timm's `SwiGLU` as FlowAR builds it (`act_layer=nn.GELU`): fc2(GELU(fc1_g x) · fc1_x x), all with biases."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)  # FlowAR's drop1 and drop2 (proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1_g(x)) * self.fc1_x(x))))


def feed_forward(kind: str, dim: int, hidden: int | None, *, dropout: float = 0.0) -> nn.Module:
    if kind == "gelu_swiglu":
        return GatedMLP(dim, hidden or flowar_hidden(dim), dropout=dropout)
    return FeedForward(dim, hidden or swiglu_hidden(dim), dropout=dropout)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask) -> torch.Tensor:
    """(B, h, n, d) each → (B, n, h·d): SDPA with a dense mask, or FlexAttention with a block mask."""
    if is_block_mask(attn_mask):
        out = flex(q, k, v, attn_mask, enable_gqa=False)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return rearrange(out, "b h n d -> b n (h d)")


# --- the AR backbone ------------------------------------------------------------------------------------------------


class ARBlock(nn.Module):
    """FlowAR's backbone block: global adaLN (6·d from the class embedding) around attention and the MLP."""

    def __init__(self, dim: int, heads: int, *, mlp: str, ffn_hidden: int | None, bias: bool, dropout: float,
                 attn_dropout: float, norm_eps: float) -> None:
        super().__init__()
        self.norm_eps = norm_eps
        self.attention = Attention(dim, heads, resid_dropout=dropout, attn_dropout=attn_dropout, bias=bias)
        self.feed_forward = feed_forward(mlp, dim, ffn_hidden, dropout=dropout)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, *, rope: torch.Tensor | None,
                cache: KVCache | None = None, attn_mask=None) -> torch.Tensor:
        gate1, gate2, scale1, scale2, shift1, shift2 = self.ada_lin(cond)[:, None].chunk(6, dim=-1)
        h = modulate(rms(x, self.norm_eps), shift1, scale1)
        x = x + gate1 * self.attention(h, rope=rope, cache=cache, attn_mask=attn_mask)
        h = modulate(rms(x, self.norm_eps), shift2, scale2)
        return x + gate2 * self.feed_forward(h)


# --- the flow heads ---------------------------------------------------------------------------------------------------


class HeadAttention(nn.Module):
    """The head's self-attention (FlowAR's `flowmodel.Attention`): `qkv` without bias, `proj` with bias, RoPE."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, *, rope: torch.Tensor | None, attn_mask=None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return self.proj(attend(q, k, v, attn_mask))


class HeadCrossAttention(nn.Module):
    """FlowAR's `CrossAttention`: queries from the tokens, keys and values from the conditions (no biases), RoPE on
    both (they share positions), `proj` with bias."""

    def __init__(self, width: int, cond_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(cond_dim, 2 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, z: torch.Tensor, *, rope: torch.Tensor | None, attn_mask=None) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(z), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return self.proj(attend(q, k, v, attn_mask))


class SpatialAdaLNBlock(nn.Module):
    """FlowAR's `Block_v1`: attention and MLP, both modulated per token from SiLU(c_i + t)."""

    def __init__(self, width: int, heads: int, *, mlp: str) -> None:
        super().__init__()
        self.attn = HeadAttention(width, heads)
        self.mlp = feed_forward(mlp, width, None)
        self.ada_lin = nn.Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, z: torch.Tensor, *,
                rope: torch.Tensor | None, attn_mask=None) -> torch.Tensor:
        gate1, gate2, scale1, scale2, shift1, shift2 = self.ada_lin(F.silu(t + c)).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(rms(x), shift1, scale1), rope=rope, attn_mask=attn_mask)
        return x + gate2 * self.mlp(modulate(rms(x), shift2, scale2))


class CrossAdaLNBlock(nn.Module):
    """FlowAR's `Block_v2`: attention modulated by t alone, cross-attention to the conditions, MLP modulated per
    token from SiLU(c_i + t)."""

    def __init__(self, width: int, cond_dim: int, heads: int, *, mlp: str) -> None:
        super().__init__()
        self.attn = HeadAttention(width, heads)
        self.crossattn = HeadCrossAttention(width, cond_dim, heads)
        self.norm2_1 = RMSNorm(width, eps=1e-6)
        self.norm2_2 = RMSNorm(cond_dim, eps=1e-6)
        self.mlp = feed_forward(mlp, width, None)
        self.ada_lin_attn = nn.Linear(width, 3 * width)
        self.ada_lin_mlp = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, z: torch.Tensor, *,
                rope: torch.Tensor | None, attn_mask=None) -> torch.Tensor:
        gate1, scale1, shift1 = self.ada_lin_attn(F.silu(t)).chunk(3, dim=-1)
        gate2, scale2, shift2 = self.ada_lin_mlp(F.silu(c + t)).chunk(3, dim=-1)
        x = x + gate1 * self.attn(modulate(rms(x), shift1, scale1), rope=rope, attn_mask=attn_mask)
        x = x + self.crossattn(self.norm2_1(x), self.norm2_2(z), rope=rope, attn_mask=attn_mask)
        return x + gate2 * self.mlp(modulate(rms(x), shift2, scale2))


class MLPAdaLNBlock(nn.Module):
    """MAR's head block (`ResBlock`): LayerNorm → adaLN → Linear-SiLU-Linear → gated residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada_lin = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, z: torch.Tensor, **_) -> torch.Tensor:
        shift, scale, gate = self.ada_lin(F.silu(t + c)).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FlowHead(nn.Module):
    """Velocity model v(x_t, t, z): x (N, n, C), t (N, n) or (N,) embedding inputs, z (N, n, cond_dim) → (N, n, C).

    `spatial` / `cross`: tokens of a row interact through RoPE attention (restricted by `attn_mask`); `mlp`: per
    token.
    """

    def __init__(self, *, kind: str, channels: int, cond_dim: int, width: int, depth: int, heads: int, mlp: str,
                 out_init: str) -> None:
        super().__init__()
        self.kind = kind
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(channels, width)
        blocks: list[nn.Module]
        if kind == "spatial":
            blocks = [SpatialAdaLNBlock(width, heads, mlp=mlp) for _ in range(depth)]
        elif kind == "cross":
            blocks = [CrossAdaLNBlock(width, cond_dim, heads, mlp=mlp) for _ in range(depth)]
        else:
            blocks = [MLPAdaLNBlock(width) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        if kind == "mlp":
            self.final_norm: nn.Module = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        else:
            self.final_norm = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.output = nn.Linear(width, channels)  # before final_ada: FlowAR's FinalLayer order (linear, adaLN)
        self.final_ada = nn.Linear(width, 2 * width)
        self.initialize(out_init)

    def initialize(self, out_init: str) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.kind == "mlp":  # MAR: normal time MLP, zero adaLN and output
            for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)
            for block in self.blocks:
                nn.init.zeros_(block.ada_lin.weight)
            nn.init.zeros_(self.final_ada.weight)
        if self.kind == "mlp" or out_init == "zero":
            nn.init.zeros_(self.output.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, *, rope: torch.Tensor | None = None,
                attn_mask=None) -> torch.Tensor:
        t_emb, c = self.time_embed(t), self.cond_embed(z)  # per token: its own condition and its time
        if t.ndim == 1:  # one time per row (sampling): embedded once and broadcast, as FlowAR does
            t_emb = t_emb[:, None]
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, t_emb, c, z, rope=rope, attn_mask=attn_mask)
        shift, scale = self.final_ada(F.silu(c + t_emb)).chunk(2, dim=-1)
        return self.output(modulate(self.final_norm(h), shift, scale))


# --- the generator ----------------------------------------------------------------------------------------------------


class FlowARGenerator(Generator):
    name = "flowar"

    def __init__(self, *, spec: TokenSpec, num_classes: int, scales: Sequence[int] | None = None, dim: int = 256,
                 depth: int = 2, heads: int = 4, backbone: str = "official", mlp: str = "gelu_swiglu",
                 ffn_hidden: int | None = None, bias: bool = True, dropout: float = 0.0, attn_dropout: float = 0.0,
                 class_dropout: float = 0.1, positions: str = "both", rope_base: float = 10000.0,
                 norm_eps: float = 1e-6, head: str = "spatial", head_width: int = 256, head_depth: int = 2,
                 head_heads: int = 4, head_out_init: str = "xavier", head_batch_mul: int = 1,
                 discrete_time: bool = True, attention: str = "auto") -> None:
        super().__init__()
        require(spec, generator="flowar", ok=spec.kind == "continuous" and spec.layout == "grid",
                needs="a continuous tokenizer (tokenizer=vae)")
        side = spec.grid[0]
        if spec.grid[1] != side:
            raise ValueError(f"flowar needs a square latent grid, got {spec.grid}")
        scales = list(scales) if scales is not None else [2**k for k in range(int(math.log2(side)) + 1)]
        if scales[-1] != side or any(a >= b for a, b in zip(scales, scales[1:])) or scales[0] < 1:
            raise ValueError(f"scales must increase and end at the latent side {side}, got {scales}")
        if scales[0] != 1:
            raise ValueError(f"the first scale is the class slot's single token, so it must be 1, got {scales}")
        for name, value, allowed in [("head", head, HEADS), ("positions", positions, POSITIONS),
                                     ("backbone", backbone, BACKBONES), ("mlp", mlp, MLPS),
                                     ("head_out_init", head_out_init, HEAD_OUT_INITS)]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        use_flex(attention, "cpu")  # validates the switch
        self.spec, self.num_classes = spec, num_classes
        self.scales, self.side, self.channels = scales, side, spec.dim
        self.lengths = [s * s for s in scales]
        self.offsets = [sum(self.lengths[:k]) for k in range(len(scales) + 1)]
        self.seq_len = self.offsets[-1]
        self.head_kind, self.head_batch_mul, self.attention_mode = head, head_batch_mul, attention
        self.process = RectifiedFlow(discrete_time=discrete_time)

        def table() -> nn.Parameter | None:  # a learned position table over all L slots (FlowAR: (1, L, dim))
            return nn.Parameter(torch.zeros(1, self.seq_len, dim)) if positions in ("both", "learned") else None

        def stack() -> nn.ModuleList:
            return nn.ModuleList(ARBlock(dim, heads, mlp=mlp, ffn_hidden=ffn_hidden, bias=bias, dropout=dropout,
                                         attn_dropout=attn_dropout, norm_eps=norm_eps) for _ in range(depth))

        self.cls_embedding = LabelEmbedding(num_classes, dim, dropout=class_dropout)
        self.z_proj = nn.Linear(spec.dim, dim)
        self.z_proj_ln = RMSNorm(dim, eps=norm_eps)
        self.pos_embed = table()
        self.attn_dropout = attn_dropout
        self.layers = stack()  # FlowAR's encoder_blocks
        self.norm = RMSNorm(dim, eps=norm_eps)
        official = backbone == "official"
        self.decoder_embed = nn.Linear(dim, dim) if official else None
        self.decoder_pos_embed = table() if official else None
        self.decoder_layers = stack() if official else nn.ModuleList()
        self.decoder_norm = RMSNorm(dim, eps=norm_eps) if official else None
        self.head_pos_embed = table()
        self.head = FlowHead(kind=head, channels=spec.dim, cond_dim=dim, width=head_width, depth=head_depth,
                             heads=head_heads, mlp=mlp, out_init=head_out_init)

        coords = scale_positions(scales, side)
        use_rope = positions in ("both", "rope")
        self.register_buffer("rope", rope_2d(coords, dim // heads, base=rope_base) if use_rope else None,
                             persistent=False)
        self.register_buffer("head_rope", rope_2d(coords, head_width // head_heads, base=rope_base)
                             if head != "mlp" else None, persistent=False)
        seg = segment_ids(self.lengths)
        self.register_buffer("segments", seg, persistent=False)
        self.register_buffer("ar_mask", block_causal_mask(self.lengths), persistent=False)
        self.register_buffer("head_mask", seg[:, None] == seg[None, :], persistent=False)  # block-diagonal
        self._flex_masks: dict[str, tuple] = {}

        self._init_weights()

    def _init_weights(self) -> None:
        backbone = [self.z_proj, self.decoder_embed, *self.layers.modules(), *self.decoder_layers.modules()]
        for m in backbone:
            if isinstance(m, nn.Linear):  # FlowAR: xavier-uniform linears, zero biases
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_embedding.embedding_table.weight, std=0.02)
        for table in (self.pos_embed, self.decoder_pos_embed, self.head_pos_embed):
            if table is not None:
                nn.init.normal_(table, std=0.02)

    # --- pyramid and AR inputs -----------------------------------------------------------------------------------

    def pyramid(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, h, h) → K maps (B, C, s, s), each the area-average of the finest latent."""
        return [latents if s == self.side else F.interpolate(latents, size=(s, s), mode="area") for s in self.scales]

    def next_input(self, latent: torch.Tensor, side: int) -> torch.Tensor:
        """A scale-k map (B, C, s, s) → the AR input tokens of the next scale (B, side², C): bicubic up to the
        finest grid, then area down to `side` (FlowAR)."""
        full = F.interpolate(latent, size=(self.side, self.side), mode="bicubic")
        return rearrange(F.interpolate(full, size=(side, side), mode="area"), "b c h w -> b (h w) c")

    def ar_inputs(self, pyramid: list[torch.Tensor], class_emb: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing inputs (B, L, dim): the class embedding, then every scale's input from the one before."""
        tokens = [self.next_input(pyramid[k], s) for k, s in enumerate(self.scales[1:])]
        return torch.cat([class_emb[:, None], self.z_proj(torch.cat(tokens, dim=1))], dim=1)

    # --- the networks ---------------------------------------------------------------------------------------------

    def _masks(self, device: torch.device) -> tuple:
        """(backbone mask, head mask) for a full-sequence pass: dense booleans, or FlexAttention block masks. With
        attention dropout the backbone trains on the dense mask (SDPA), as FlowAR does: FlexAttention has none."""
        if not use_flex(self.attention_mode, device):
            return self.ar_mask, self.head_mask
        key = str(device)
        if key not in self._flex_masks:
            seg = self.segments.to(device)
            self._flex_masks[key] = (
                flex_block_mask(block_causal_mask_mod(seg), self.seq_len, self.seq_len, device=device),
                flex_block_mask(lambda b, h, q, k: seg[q] == seg[k], self.seq_len, self.seq_len, device=device))
        backbone_mask, head_mask = self._flex_masks[key]
        if self.training and self.attn_dropout:
            backbone_mask = self.ar_mask
        return backbone_mask, head_mask

    def backbone(self, x: torch.Tensor, class_emb: torch.Tensor, *, start: int = 0,
                 caches: list[KVCache] | None = None, attn_mask=None) -> torch.Tensor:
        """Slots start … start + n − 1 (x: (N, n, dim) inputs) → head conditions z (N, n, dim).

        Without caches: the whole sequence with the block-causal `attn_mask`. With caches (`new_caches`: one per
        layer, encoder stack first): one scale's slots, attending to the cached earlier scales and to themselves
        (no mask needed: nothing later exists yet).
        """
        end = start + x.shape[1]
        rope = None if self.rope is None else self.rope[start:end]
        caches = caches or [None] * (len(self.layers) + len(self.decoder_layers))

        def run(layers: nn.ModuleList, x: torch.Tensor, layer_caches: Sequence[KVCache | None]) -> torch.Tensor:
            for layer, cache in zip(layers, layer_caches):
                x = layer(x, class_emb, rope=rope, cache=cache, attn_mask=attn_mask)
            return x

        if self.pos_embed is not None:
            x = x + self.pos_embed[:, start:end]
        x = self.norm(run(self.layers, self.z_proj_ln(x), caches[:len(self.layers)]))
        if self.decoder_embed is not None and self.decoder_norm is not None:  # FlowAR's second stack
            x = self.decoder_embed(x)
            if self.decoder_pos_embed is not None:
                x = x + self.decoder_pos_embed[:, start:end]
            x = self.decoder_norm(run(self.decoder_layers, x, caches[len(self.layers):]))
        return x if self.head_pos_embed is None else x + self.head_pos_embed[:, start:end]

    def forward(self, latents: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher-forced head conditions z (B, L, dim) for every position, and the pyramid they predict."""
        pyramid = self.pyramid(latents)
        class_emb = self.cls_embedding(labels)  # one label draw (with dropout) for the class slot and the adaLN
        ar_mask, _ = self._masks(latents.device)
        return self.backbone(self.ar_inputs(pyramid, class_emb), class_emb, attn_mask=ar_mask), pyramid

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, *, start: int = 0,
                 attn_mask=None, fp32: bool = True) -> torch.Tensor:
        """The head: x_t (N, n, C), t (N, n) or (N,) flow times in [0, 1], z (N, n, dim); in fp32 with autocast off, or
        (fp32=False, sampling) under the ambient autocast as FlowAR samples."""
        rope = None if self.head_rope is None else self.head_rope[start:start + x_t.shape[1]]
        with torch.autocast(device_type=x_t.device.type, enabled=False) if fp32 else contextlib.nullcontext():
            return self.head(x_t.float() if fp32 else x_t, self.process.timestep_embedding_input(t),
                             z.float() if fp32 else z, rope=rope, attn_mask=attn_mask)

    def head_stepper(self, decode: str, *, fp32: bool, device: torch.device) -> Callable[..., torch.Tensor]:
        """The head evaluation of the sampling loop, (x_t, t_tokens, z, start) → velocity: eager or compiled."""
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if decode == "eager":
            return lambda x_t, t, z, start: self.velocity(x_t, t, z, start=start, fp32=fp32)
        # One graph per scale and row count (2B while guided, B outside the guidance interval), a CUDA graph on
        # CUDA; its output copied, as Heun reads a velocity after the next evaluation.
        compiled = compiled_step(FlowARGenerator.velocity, device, graphs=4 * len(self.scales), copy_output=True)
        return lambda x_t, t, z, start: compiled(self, x_t, t, z, start=start, fp32=fp32)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        z, pyramid = self(tokens, labels)
        x0 = torch.cat([rearrange(p, "b c h w -> b (h w) c") for p in pyramid], dim=1).float()
        if self.head_batch_mul > 1:
            x0, z = x0.repeat(self.head_batch_mul, 1, 1), z.repeat(self.head_batch_mul, 1, 1)
        rows, num_scales = x0.shape[0], len(self.scales)
        t = self.process.sample_t(rows * num_scales, device=x0.device).view(rows, num_scales)[:, self.segments]
        noise = torch.randn_like(x0)
        _, head_mask = self._masks(x0.device)
        pred = self.velocity(self.process.add_noise(x0, noise, t), t, z,
                             attn_mask=head_mask if self.head_kind != "mlp" else None)
        out: dict[str, torch.Tensor] = {}
        total = x0.new_zeros(())
        with torch.autocast(device_type=x0.device.type, enabled=False):
            for k, n in enumerate(self.lengths):  # FlowAR: Σ_k MSE_k · n_k / n_K
                part = slice(self.offsets[k], self.offsets[k + 1])
                loss_k = self.process.loss(pred[:, part], x0[:, part], noise[:, part])
                total = total + loss_k * n / self.lengths[-1]
                out[f"loss_scale{k}"] = loss_k.detach()
        return {"loss": total, **out}

    # --- sampling ---------------------------------------------------------------------------------------------------

    def new_caches(self) -> list[KVCache]:
        return [KVCache(self.seq_len) for _ in range(len(self.layers) + len(self.decoder_layers))]

    def scale_cfg(self, cfg: float, k: int, schedule: str) -> float:
        """Guidance weight at scale k: FlowAR's ramp 1 + (cfg − 1)·k/(K − 1), or the constant cfg."""
        if schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")
        if schedule == "constant":
            return cfg
        return 1.0 + linear_cfg_schedule(cfg - 1.0, k, len(self.scales))

    @torch.inference_mode()
    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, generator: torch.Generator | None = None,
               steps: int = 25, sampler: str = "euler", time_grid: str = "flowar", guidance_high: float = 0.9,
               guidance_low: float = 0.0, cfg_schedule: str = "linear", head_fp32: bool = False,
               decode: str = "eager", noise: Sequence[torch.Tensor] | None = None,
               step_noise: Sequence[Sequence[torch.Tensor]] | None = None) -> torch.Tensor:
        """Sample latents (B, C, h, h) for `labels` (B,). Per scale: one cached backbone pass over the scale's new
        slots, then the head's ODE/SDE from noise with guidance weight w_k applied while guidance_low ≤ t ≤
        guidance_high (cfg = 1: no null-class rows at all). Noise: drawn with `generator` (on its device), or
        given per scale — `noise[k]` (B, s_k², C) the initial noise, `step_noise[k]` Euler–Maruyama's per-step
        draws. The head runs under the ambient autocast unless `head_fp32`; `decode` = eager | compiled (module
        docstring)."""
        grid = time_grid_for(sampler, time_grid)
        was_training = self.training
        self.eval()
        try:
            guided = cfg != 1.0
            batch, device = labels.shape[0], labels.device
            cond = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
            class_emb = self.cls_embedding(cond)
            caches = self.new_caches()
            head = self.head_stepper(decode, fp32=head_fp32, device=device)
            x = class_emb[:, None]
            for k, s in enumerate(self.scales):
                start = self.offsets[k]
                z = self.backbone(x, class_emb, start=start, caches=caches)

                def model_fn(x_t: torch.Tensor, t: torch.Tensor, z=z, start=start) -> torch.Tensor:
                    # x_t: 2B rows when this scale is guided, else the B conditional rows. As FlowAR: the head runs
                    # on all 2B rows of a guided run (so each row's arithmetic is FlowAR's: a matrix product's rows
                    # depend on the row count), one time per row, the velocity in float64 (guidance then combines
                    # at the solver's precision)
                    rows = x_t.shape[0]
                    if rows < z.shape[0]:  # a scale with weight 1 in a guided run: FlowAR still runs all 2B rows
                        return head(torch.cat([x_t, x_t]), torch.cat([t, t]), z, start)[:rows].double()
                    return head(x_t, t, z, start).double()

                if noise is None:
                    start_noise = torch.randn((batch, s * s, self.channels), generator=generator,
                                              device=generator.device if generator is not None else device)
                else:
                    start_noise = noise[k]
                latent = self.process.sample(model_fn, start_noise.to(device), sampler=sampler, steps=steps,
                                             grid=grid, cfg=self.scale_cfg(cfg, k, cfg_schedule),
                                             guidance_interval=(guidance_low, guidance_high),
                                             step_noise=None if step_noise is None else step_noise[k],
                                             generator=generator).sample
                latent = rearrange(latent, "b (h w) c -> b c h w", h=s)
                if k + 1 == len(self.scales):
                    return latent
                nxt = self.z_proj(self.next_input(latent, self.scales[k + 1]).to(class_emb.dtype))
                x = torch.cat([nxt, nxt]) if guided else nxt
            raise AssertionError("unreachable")
        finally:
            self.train(was_training)

    def sampling_cost(self, *, cfg: float = 1.0, steps: int = 25, sampler: str = "euler", time_grid: str = "flowar",
                      **_: Any) -> SamplingCost:
        """K cached backbone passes (one per scale) and K × (head evaluations per ODE solve) head passes over one
        scale's tokens; under CFG each pass runs 2B rows (also the first scale's, whose weight the ramp sets to 1,
        as FlowAR)."""
        backbone = len(self.scales)
        grid = time_grid_for(sampler, time_grid)
        head = backbone * self.process.evaluations(sampler=sampler, steps=steps, grid=grid)
        return SamplingCost(backbone_passes=backbone, head_passes=head,
                            rows_per_pass_factor=2 if cfg != 1.0 else 1)
