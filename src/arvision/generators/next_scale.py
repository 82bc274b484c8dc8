"""Next-scale prediction: VAR (multi-scale residual tokens), and FlexVAR's residual-free variant (`residual=False`).

A schedule of K square token maps n_1 < … < n_K = side is generated coarse to fine, one whole scale per step:

    sequence   [SOS]·n_1²  word_embed(input_2)  …  word_embed(input_K)       (L = Σ n_k² positions)
    targets     idx_1       idx_2               …  idx_K

SOS = class embedding + `pos_start`; every position adds its position embedding. Attention is block-causal over
scales (a token sees its own scale and all coarser ones), so the logits at scale k depend only on the class and
the inputs of scales ≤ k, and scale k's input is built from scales < k. Sampling runs one forward per scale with
a KV cache: the new scale's n_k² queries may see every cached key and each other, so no mask is needed there.
`sample(decode=…)` runs that loop in one of three ways that compute the same function: `eager` appends to growing
caches; `static` writes each scale into fixed-size caches of all L positions and masks the slots after the scale
(`static_step`, the same shapes on every call); `compiled` is `static_step` under torch.compile, one graph per scale,
replayed as a CUDA graph on CUDA (`mode="reduce-overhead"`).

VAR (`residual=True`, tokenizer=msvq). The input of scale k+1 is the running f̂ = Σ_{j≤k} φ_j(up(codebook[idx_j]))
area-downsampled to n_{k+1} (the tokenizer's `teacher_forcing_inputs` / `next_scale_input`, VAR's
`idxBl_to_var_input`); the image decodes from all K maps. Positions: a learned level embedding per scale
(`lvl_embed`) + a learned absolute table over all L positions (`pos_1LC`), so the schedule is fixed.

FlexVAR (`residual=False`, tokenizer=vq). No residuals: scale k's tokens quantise the latent at n_k×n_k on its own,
so every step is a whole image, and the image decodes from the last map alone. The input of scale k+1 is scale
k's code map, bicubic-upsampled to n_{k+1} (FlexVAR's `encode_var_wo_firstL` and sampler). Positions: a learned
P×P grid (P = 2·side, FlexVAR's sin/cos init) area-resized to each n_k, no level embedding, so any schedule works.
FlexVAR's behaviour is the default; arvision's earlier choices stay as options. Measured (experiments/flexvar_steps:
Fashion-MNIST, 8×8 grid, 0.7M parameters, 700 steps, FID of 1,000 samples, noise about ±0.7): trim_last=false
6.60 against FlexVAR's 7.82 at the default 7 steps, ground_truth=requantised 7.38, both 6.67; on 8 steps the
sampler options give 7.87 (linear_to_last), 8.76 (greedy_off_grid=false) and 8.25 (both) against 8.18.
- `ground_truth`: "continuous" (FlexVAR) — scale k's target quantises the *continuous* latent area-downsampled to
  n_k; the token cache then holds one map per side 1..side (`encode` → the tokenizer's `encode_scales`, cached
  under its own key). "requantised" — the cache holds the grid only and each scale re-quantises the
  area-downsampled *quantised* latent codebook[grid] (cosine rule for an l2-normalised codebook).
- Training draws a random schedule per batch (FlexVAR's `gen_curr_patch_nums`, `flexvar_schedule`). `trim_last`
  true (FlexVAR): trimming a schedule to the token budget may drop its last side, so about a third of the batches
  end below the grid (at side 16); false: every schedule ends at the grid.
- Sampling takes any schedule that starts at the trained first side and ends at the grid side or beyond it
  (resolution extrapolation, FlexVAR's 512 px `…_16_23_32`: the position grid is resized past P and the tokenizer
  decodes the larger latent). CFG `cfg_schedule="linear"` is FlexVAR's ramp t_k = (cfg − 1)·k/min(K − 1, K₀ − 1),
  K₀ the default schedule's length (9 at side 16), with the full cfg − 1 at sides above the grid: VAR's ramp for
  schedules no longer than the default, the default's slope for longer ones (it passes cfg − 1 after step K₀ − 1);
  "linear_to_last" stretches the ramp to reach cfg − 1 at the last step of any schedule. `greedy_off_grid` true
  (FlexVAR): a side that is not in the default schedule (`scales`) or lies above the grid is drawn with top-k 1.

Blocks are VAR's `AdaLNSelfAttn`: LayerNorm without affine, modulated by the class vector (SiLU → Linear → γ1, γ2,
scale1, scale2, shift1, shift2), x += γ1·Attn(LN(x)(1+s1)+b1), x += γ2·FFN(LN(x)(1+s2)+b2), tanh-GELU FFN (4×),
stochastic depth; `shared_aln` (VAR-d36-s) shares one modulation Linear across blocks plus a per-block `ada_gss`.
Attention has a bias-free fused qkv with learned q/v biases (k bias fixed at zero); `attn_l2_norm` makes q and k unit
vectors and multiplies q by a learned per-head scale (log-parametrised, init ln 4, capped at ln 100), softmax scale
1; otherwise the softmax scale is 0.25/√head_dim. The head is AdaLN (scale, shift) → Linear. Sizes follow VAR's rule
width = 64·depth, heads = depth, drop_path = 0.1·depth/24 unless given. `init_weights` is VAR's.

Training (`attention`): the block-causal mask is a FlexAttention BlockMask on CUDA ("auto"/"flex", compiled) and a
dense boolean mask for SDPA otherwise; both are built once per (schedule, device) and cached.

Class conditioning: labels go to the null class `num_classes` with probability `cond_drop_rate` in training mode
(VAR drops labels in eval mode too; here eval logits are deterministic). The loss is the token-mean cross-entropy
(VAR's 1/L weights); `loss()` also reports per-scale `loss_s{k}` / `acc_s{k}` (0-based k) on the default schedule,
and `loss_last` / `acc_last` (the finest scale, VAR's "t" metrics) on every schedule.

CFG: `cfg` is the guidance weight at the last scale, with the framework's convention that cfg = 1 is unguided
(only the B conditional rows run; any other cfg runs conditional + null-class rows as one batch of 2B). VAR's ramp
is applied to its excess: logits (1 + t_k)·cond − t_k·uncond with t_k = (cfg − 1)·k/(K − 1) ("linear", VAR: the
first scale unguided; FlexVAR's capped form for longer schedules, see above), "linear_to_last" or t_k = cfg − 1
("constant"). VAR's own `cfg=s` is t at the last scale, so VAR's cfg s is cfg = 1 + s here: its FID setting
cfg 1.5, top_k 900, top_p 0.96 reads cfg 2.5 here, and FlexVAR's cfg 2.5, top_k 900, top_p 0.95 reads cfg 3.5.
Each draw applies temperature, top-k, then top-p with VAR's own nucleus rule (`sampling.top_p_filter_var`, the
one `sample_with_top_k_top_p_` in VAR and FlexVAR computes), from one exponential draw per token as
`torch.multinomial` does: the same generator state gives VAR's and FlexVAR's tokens.

State-dict keys follow VAR (`class_emb`, `pos_start`, `pos_1LC`, `lvl_embed`, `word_embed`,
`blocks.{i}.attn.mat_qkv`, `…attn.q_bias`, `…attn.scale_mul_1H11`, `…ffn.fc1`, `blocks.{i}.ada_lin.1`,
`head_nm.ada_lin.1`, `head`); VAR's checkpoints also hold the buffers `lvl_1L` and `attn_bias_for_masking`, which
are rebuilt here (load with strict=False). FlexVAR's `pos_1LC` is the 1×C×P×P grid, as here, and its
`attn_bias_for_masking` is rebuilt too (arvision.imports.flexvar reads and writes FlexVAR's files).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvision.generators.base import Generator, SamplingCost, TokenEncoding, require
from arvision.generators.editing import batch_mask, known_on_grid
from arvision.generators.sampling import (apply_temperature, classifier_free_guidance, linear_cfg_schedule,
                                         sample_from_logits, top_k_filter, top_p_filter_var)
from arvision.nn.attention import KVCache, StaticKVCache, flex
from arvision.nn.graphs import compiled_step, held_static_caches
from arvision.nn.blocks import DropPath
from arvision.nn.masks import (block_causal_mask, block_causal_mask_mod, flex_block_mask, is_block_mask, segment_ids,
                               use_flex)
from arvision.tokenizers.base import TokenSpec

# VAR's 256-pixel schedule (16×16 latent); smaller latents use it truncated and ending at their side.
VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
MASK_CACHE_SIZE = 64  # FlexVAR draws a schedule per batch: keep the masks of the most recent ones
DECODE_MODES = ("eager", "static", "compiled")
GROUND_TRUTHS = ("continuous", "requantised")  # FlexVAR's per-scale targets: see the module docstring
CFG_SCHEDULES = ("linear", "linear_to_last", "constant")


def var_schedule(side: int) -> tuple[int, ...]:
    return tuple(n for n in VAR_PATCH_NUMS if n < side) + (side,)


def check_schedule(schedule: Sequence[int], side: int, *, beyond: bool = False) -> tuple[int, ...]:
    """`schedule` as a tuple of ints, strictly increasing and ending at `side` (or above it when `beyond`)."""
    schedule = tuple(int(n) for n in schedule)
    if not schedule or schedule[0] < 1 or any(b <= a for a, b in zip(schedule, schedule[1:])):
        raise ValueError(f"a schedule must be strictly increasing positive sides, got {schedule}")
    if schedule[-1] != side and not (beyond and schedule[-1] > side):
        where = f"at the token grid side {side} or above it" if beyond else f"at the token grid side {side}"
        raise ValueError(f"a schedule must end {where}, got {schedule}")
    return schedule


def flexvar_schedule(default: Sequence[int], *, full_prob: float = 0.05, trim_last: bool = True,
                     generator: torch.Generator | None = None) -> tuple[int, ...]:
    """One random training schedule, FlexVAR's `gen_curr_patch_nums` generalised from side 16 to any side.

    FlexVAR (side 16, K = 10): with p = 5% VAR's schedule; else [1, 2] + 5 distinct sides from 3..10 + 2 from 11..15
    + [16]; then drop 1/2/3/4 intermediate scales with p 10/5/2/1%; then, while the tokens exceed VAR's 680, drop
    one of the last four sides (the last one included). Generalised: the first two sides of `default` are kept, its
    K − 3 middle sides are drawn in the same 5 : 2 proportion from the bands (n_2, ⌈11·side/16⌉) and
    [⌈11·side/16⌉, side), and the budget is the default schedule's token count. `trim_last=False` (arvision's
    earlier rule) never trims the last side, so every schedule ends at the grid.
    """
    default = tuple(default)
    side = default[-1]

    def rand() -> float:
        return torch.rand((), generator=generator).item()

    def pick(choices: Sequence[int], k: int) -> list[int]:
        order = torch.randperm(len(choices), generator=generator)[:k].tolist()
        return [choices[i] for i in order]

    if len(default) < 4:
        return default
    if rand() < full_prob:
        schedule = list(default)  # FlexVAR drops scales from this one too
    else:
        middle = len(default) - 3
        split = max(default[1] + 1, math.ceil(11 * side / 16))
        low, high = list(range(default[1] + 1, split)), list(range(split, side))
        n_high = min(len(high), round(middle * 2 / 7))
        n_low = min(len(low), middle - n_high)
        n_high = min(len(high), middle - n_low)  # a narrow low band hands its share to the high one
        schedule = list(default[:2]) + sorted(pick(low, n_low) + pick(high, n_high)) + [side]
    x = rand()
    for threshold in (0.9, 0.95, 0.98, 0.99):  # scale dropping: intermediate sides only, never the first two
        if x > threshold and len(schedule) > 3:
            schedule.pop(2 + pick(range(len(schedule) - 3), 1)[0])
    budget = sum(n * n for n in default)
    while sum(n * n for n in schedule) > budget and len(schedule) > 3:
        first = max(2, len(schedule) - 4)
        schedule.pop(first + pick(range(len(schedule) - first - (0 if trim_last else 1)), 1)[0])
    return tuple(schedule)


def smooth_codes(logits: torch.Tensor, codebook: torch.Tensor, *, ratio: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """VAR's `more_smooth` code at one scale: the Gumbel-softmax mix of the codebook rows (..., V) @ (V, C) → (..., C).

    weights = softmax((logits·(1 + r) + g) / τ), g = −log(E), E ~ Exp(1) drawn from `generator` (VAR's
    `gumbel_softmax_with_rng`), τ = max(0.27·(1 − 0.95·r), 0.005) (MaskGIT's annealing), r = k/(K − 1) the scale's
    place in the schedule: soft and sharpened more at later scales. `logits` are the guided ones after top-k/top-p
    (−inf outside the kept set, whose rows then get no weight).
    """
    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
    gumbel = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits * (1 + ratio) + gumbel) / tau).softmax(dim=-1) @ codebook


# ------------------------------------------------------------------------------------------------- VAR's layers
class FFN(nn.Module):
    """VAR's MLP: fc1 → tanh-GELU → fc2 (with biases)."""

    def __init__(self, dim: int, hidden: int, *, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SelfAttention(nn.Module):
    """VAR's attention: fused qkv without bias plus learned q/v biases, optional l2-normalised q/k."""

    def __init__(self, dim: int, heads: int, *, l2_norm: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads must divide dim, got dim={dim} heads={heads}")
        self.heads, self.head_dim, self.l2_norm = heads, dim // heads, l2_norm
        if l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, *, attn_mask=None, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, L, dim) → (B, L, dim); `attn_mask` a dense bool mask (True = may attend) or a BlockMask."""
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        q, k, v = rearrange(F.linear(x, self.mat_qkv.weight, bias), "b l (s h d) -> s b h l d", s=3, h=self.heads)
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.append(k, v)
        # Both kernels apply 1/√head_dim; fold VAR's own softmax scale into q so SDPA and flex agree.
        q = q * (self.scale * math.sqrt(self.head_dim))
        if is_block_mask(attn_mask):
            out = flex(q, k, v, attn_mask, enable_gqa=False)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(out, "b h l d -> b l (h d)")))


class SharedAdaLin(nn.Linear):
    """VAR-d36-s: one modulation Linear for every block, output (B, 1, 6, C)."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return rearrange(super().forward(cond), "b (s c) -> b 1 s c", s=6)


class AdaLNSelfAttn(nn.Module):
    """VAR's block: affine-free LayerNorm modulated by the class vector, γ-gated attention and FFN branches."""

    def __init__(self, dim: int, cond_dim: int, heads: int, *, mlp_ratio: float = 4.0, shared_aln: bool = False,
                 attn_l2_norm: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.shared_aln = dim, shared_aln
        self.attn = SelfAttention(dim, heads, l2_norm=attn_l2_norm, attn_drop=attn_drop, proj_drop=drop)
        self.ffn = FFN(dim, round(dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, *, attn_mask=None,
                cache: KVCache | None = None) -> torch.Tensor:
        """`cond`: the class vector (B, D), or with shared_aln the shared modulation (B, 1, 6, C)."""
        mod = self.ada_gss + cond if self.shared_aln else rearrange(self.ada_lin(cond), "b (s c) -> b 1 s c", s=6)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        h = self.attn(self.ln_wo_grad(x) * (1 + scale1) + shift1, attn_mask=attn_mask, cache=cache)
        x = x + self.drop_path(h * gamma1)
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x) * (1 + scale2) + shift2) * gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, cond_dim: int, *, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = rearrange(self.ada_lin(cond), "b (s c) -> s b 1 c", s=2)
        return self.ln_wo_grad(x) * (1 + scale) + shift


def sincos_grid(dim: int, size: int) -> torch.Tensor:
    """FlexVAR's position-grid init (1, dim, size, size): sin(row·ω) on even channels, cos(col·ω) on odd ones."""
    omega = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    coords = torch.arange(size, dtype=torch.float32)
    grid = torch.zeros(dim, size, size)
    grid[0::2] = torch.sin(coords[None, :, None] * omega[:, None, None]).expand(-1, size, size)
    grid[1::2] = torch.cos(coords[None, None, :] * omega[:, None, None]).expand(-1, size, size)
    return grid[None]


# ------------------------------------------------------------------------------------------------- the generator
class NextScaleGenerator(Generator):
    name = "next_scale"
    supports_editing = True

    def __init__(self, *, spec: TokenSpec, num_classes: int, depth: int = 16, dim: int | None = None,
                 heads: int | None = None, drop_path: float | None = None, mlp_ratio: float = 4.0,
                 drop: float = 0.0, attn_drop: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 attn_l2_norm: bool = True, cond_drop_rate: float = 0.1, init_adaln: float = 0.5,
                 init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float | None = None,
                 residual: bool = True, scales: Sequence[int] | None = None, random_schedules: bool = True,
                 full_schedule_prob: float = 0.05, trim_last: bool = True, ground_truth: str = "continuous",
                 pos_grid: int | None = None, attention: str = "auto") -> None:
        super().__init__()
        if ground_truth not in GROUND_TRUTHS:
            raise ValueError(f"ground_truth must be one of {GROUND_TRUTHS}, got {ground_truth!r}")
        if residual:
            require(spec, generator="next_scale", ok=spec.kind == "discrete" and spec.layout == "scales",
                    needs="a multi-scale tokenizer (tokenizer=msvq) or residual=false with tokenizer=vq")
        else:
            require(spec, generator="next_scale",
                    ok=spec.layout == "grid" and spec.has_codebook and spec.grid[0] == spec.grid[1],
                    needs="a square single-grid tokenizer with a codebook (tokenizer=vq) with residual=false "
                          "(FlexVAR), or residual=true with tokenizer=msvq")
        use_flex(attention, "cpu")  # validates the switch
        assert spec.vocab_size is not None  # guaranteed for discrete specs
        self.spec, self.num_classes, self.residual = spec, num_classes, residual
        self.side = spec.grid[0]
        if residual:
            if scales is not None and tuple(scales) != tuple(spec.scales):
                raise ValueError(f"VAR mode uses the tokenizer's scales {spec.scales}, got scales={tuple(scales)}")
            self.scales = tuple(spec.scales)
        else:
            self.scales = check_schedule(var_schedule(self.side) if scales is None else scales, self.side)
        self.random_schedules, self.full_schedule_prob = random_schedules and not residual, full_schedule_prob
        self.trim_last, self.ground_truth = trim_last, ground_truth  # FlexVAR mode only
        self.attention = attention
        self.depth = depth
        self.dim = dim = dim or 64 * depth  # VAR's size rule
        heads = heads or depth
        drop_path = 0.1 * depth / 24 if drop_path is None else drop_path
        self.cond_drop_rate = cond_drop_rate
        first = self.scales[0] ** 2

        self.word_embed = nn.Linear(spec.dim, dim)
        self.class_emb = nn.Embedding(num_classes + 1, dim)  # row num_classes = the null class (CFG)
        self.pos_start = nn.Parameter(torch.zeros(1, first, dim))
        std = math.sqrt(1 / dim / 3) if init_std is None else init_std
        if residual:
            self.pos_1LC = nn.Parameter(torch.zeros(1, spec.num_tokens, dim))
            self.lvl_embed = nn.Embedding(len(self.scales), dim)
            nn.init.trunc_normal_(self.pos_1LC, std=std)
        else:
            self.pos_1LC = nn.Parameter(sincos_grid(dim, pos_grid or 2 * self.side))
        nn.init.trunc_normal_(self.pos_start, std=std)

        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(dim, 6 * dim)) if shared_aln else nn.Identity()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear stochastic depth, as VAR
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(dim, dim, heads, mlp_ratio=mlp_ratio, shared_aln=shared_aln, attn_l2_norm=attn_l2_norm,
                          drop=drop, attn_drop=attn_drop, drop_path=rate, norm_eps=norm_eps) for rate in rates)
        self.head_nm = AdaLNBeforeHead(dim, dim, norm_eps=norm_eps)
        self.head = nn.Linear(dim, spec.vocab_size)
        self.init_weights(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head, std=std)
        self._masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def init_weights(self, *, init_adaln: float, init_adaln_gamma: float, init_head: float, std: float) -> None:
        """VAR's `init_weights`: trunc-normal Linear/Embedding, residual outputs ÷ √(2·depth), near-identity AdaLN
        gates (γ rows × init_adaln_gamma, scale/shift rows × init_adaln) and a small head (× init_head)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * len(self.blocks)))
            block.ffn.fc2.weight.div_(math.sqrt(2 * len(self.blocks)))
            if block.shared_aln:
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                lin = block.ada_lin[-1]
                lin.weight[2 * self.dim:].mul_(init_adaln)
                lin.weight[:2 * self.dim].mul_(init_adaln_gamma)
                lin.bias.zero_()

    def no_weight_decay(self) -> set[str]:
        """Parameters VAR keeps out of weight decay although they are not 1-D (timm's convention): positions, the
        level table, the attention log-scales and the shared-AdaLN gains (biases and 1-D gains never decay)."""
        keep = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul", "ada_gss")
        return {name for name, _ in self.named_parameters() if any(k in name for k in keep)}

    # --- schedules, positions, masks --------------------------------------------------------------------------

    def check_schedule(self, schedule: Sequence[int] | None) -> tuple[int, ...]:
        """A sampling schedule (None: the default one); FlexVAR mode may end above the grid side."""
        if schedule is None:
            return self.scales
        schedule = check_schedule(schedule, self.side, beyond=not self.residual)
        if self.residual and schedule != self.scales:
            raise ValueError(f"VAR mode (residual=true) samples the tokenizer's scales {self.scales}; "
                             f"any schedule needs residual=false (FlexVAR), got {schedule}")
        if schedule[0] != self.scales[0]:
            raise ValueError(f"a schedule must start at the trained first side {self.scales[0]}, got {schedule}")
        return schedule

    def training_schedule(self) -> tuple[int, ...]:
        """The schedule of one training batch: random (FlexVAR) in training mode, else the default one."""
        if self.training and self.random_schedules:
            return flexvar_schedule(self.scales, full_prob=self.full_schedule_prob, trim_last=self.trim_last)
        return self.scales

    def positions(self, schedule: tuple[int, ...]) -> torch.Tensor:
        """Position embeddings (1, L, dim) of every token of `schedule` (VAR: + level embedding)."""
        if self.residual:
            levels = segment_ids([n * n for n in schedule], device=self.pos_1LC.device)
            return self.pos_1LC + self.lvl_embed(levels)[None]
        grids = [F.interpolate(self.pos_1LC, size=(n, n), mode="area") for n in schedule]
        return torch.cat([rearrange(g, "1 c h w -> 1 (h w) c") for g in grids], dim=1)

    def attn_mask(self, schedule: tuple[int, ...], device: torch.device):
        """The block-causal mask of `schedule`: a BlockMask when flex is in use on `device`, else dense bool."""
        kind = "flex" if use_flex(self.attention, device) else "dense"
        key = (schedule, str(device), kind)
        if key not in self._masks:
            lengths = [n * n for n in schedule]
            if kind == "flex":
                length = sum(lengths)
                mask = flex_block_mask(block_causal_mask_mod(segment_ids(lengths, device=device)), length, length,
                                       device=device)
            else:
                mask = block_causal_mask(lengths, device=device)
            self._masks[key] = mask
            while len(self._masks) > MASK_CACHE_SIZE:
                self._masks.popitem(last=False)
        self._masks.move_to_end(key)
        return self._masks[key]

    # --- tokens → teacher-forcing inputs and targets -------------------------------------------------------------

    @classmethod
    def token_encoding(cls, tokenizer, model: Mapping[str, Any]) -> TokenEncoding:
        """FlexVAR mode with ground_truth=continuous trains on one map per side 1..side (`encode`); otherwise the
        tokenizer's tokens."""
        if model.get("residual", True) or model.get("ground_truth", "continuous") != "continuous":
            return super().token_encoding(tokenizer, model)
        sides = tuple(range(1, tokenizer.spec.grid[0] + 1))
        return TokenEncoding(name=f"flexvar_continuous_sides_1-{sides[-1]}",
                             encode=lambda images: tokenizer.encode_scales(images, sides))

    def encode(self, images: torch.Tensor) -> Any:
        """Training tokens: VAR mode and ground_truth=requantised the tokenizer's; ground_truth=continuous one map
        (B, n, n) per side n = 1..side, each quantised from the continuous latent area-resized to n."""
        if self.residual or self.ground_truth != "continuous":
            return super().encode(images)
        return self.tokenizer_on(images.device).encode_scales(images, range(1, self.side + 1))

    @property
    def training_spec(self) -> TokenSpec:
        """ground_truth=continuous trains on one map per side 1..side: the multi-scale layout over those sides."""
        if self.residual or self.ground_truth != "continuous":
            return self.spec
        return dataclasses.replace(self.spec, layout="scales", scales=tuple(range(1, self.side + 1)))

    def check_flex_tokens(self, tokens) -> None:
        """FlexVAR mode: tokens in the form `ground_truth` trains on, else one line saying what to pass."""
        per_side = isinstance(tokens, (list, tuple))
        if self.ground_truth == "continuous" and not per_side:
            raise ValueError(f"next_scale with ground_truth=continuous (FlexVAR) trains on generator.encode(images), "
                             f"one map per side 1..{self.side}; got a single token grid (ground_truth=requantised "
                             "trains on grids)")
        if self.ground_truth == "requantised" and per_side:
            raise ValueError("next_scale with ground_truth=requantised trains on the token grid (B, side, side); got "
                             f"{len(tokens)} per-side maps (those are ground_truth=continuous's tokens)")

    def quantized_scales(self, tokens, schedule: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """FlexVAR mode: tokens → per-scale indices (B, n, n) and code maps (B, C, n, n) of `schedule`.

        `tokens` one map per side 1..side (`encode` under ground_truth=continuous): scale n's indices are map n, the
        continuous latent quantised at that side. `tokens` the grid (B, side, side): each scale re-quantises the
        area-downsampled quantised latent codebook[grid] on its own (no residual); the grid side is the grid itself.
        """
        per_side = isinstance(tokens, (list, tuple))
        if per_side and [tuple(t.shape[1:]) for t in tokens] != [(n, n) for n in range(1, self.side + 1)]:
            raise ValueError(f"per-side tokens must be {self.side} maps (B, n, n) for n = 1..{self.side}, got "
                             f"{[tuple(t.shape) for t in tokens]}")
        grid = tokens[-1] if per_side else tokens
        tokenizer = self.tokenizer_on(grid.device)
        with torch.autocast(device_type=grid.device.type, enabled=False):
            codebook = tokenizer.codebook().float()  # l2-normalised rows when the tokenizer uses cosine lookup
            z_q = rearrange(codebook[grid], "b h w c -> b c h w")
            indices, codes = [], []
            for n in schedule:
                if per_side:
                    idx = tokens[n - 1]
                    code = rearrange(codebook[idx], "b h w c -> b c h w")
                elif n == self.side:
                    idx, code = grid, z_q
                else:
                    z = F.interpolate(z_q, size=(n, n), mode="area")
                    idx = tokenizer.nearest_codes(rearrange(z, "b c h w -> (b h w) c")).view(grid.shape[0], n, n)
                    code = rearrange(codebook[idx], "b h w c -> b c h w")
                indices.append(idx)
                codes.append(code)
        return indices, codes

    def flex_input(self, code: torch.Tensor, n: int) -> torch.Tensor:
        """Scale k's code map (B, C, n_k, n_k) → the input tokens of the next scale (B, n², C): bicubic (FlexVAR)."""
        with torch.autocast(device_type=code.device.type, enabled=False):
            return rearrange(F.interpolate(code.float(), size=(n, n), mode="bicubic"), "b c h w -> b (h w) c")

    def teacher_forcing(self, tokens, schedule: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens → (inputs of scales 2..K (B, L − n_1², code_dim) fp32, targets (B, L))."""
        if self.residual:
            if len(tokens) != len(self.scales):
                raise ValueError(f"expected {len(self.scales)} token maps for scales {self.scales}, got {len(tokens)}")
            inputs = self.tokenizer_on(tokens[0].device).teacher_forcing_inputs(tokens)
            targets = torch.cat([t.flatten(1) for t in tokens], dim=1)
            return inputs, targets
        self.check_flex_tokens(tokens)
        indices, codes = self.quantized_scales(tokens, schedule)
        inputs = [self.flex_input(code, n) for code, n in zip(codes[:-1], schedule[1:])]
        targets = torch.cat([i.flatten(1) for i in indices], dim=1)
        if not inputs:
            return codes[0].new_zeros(targets.shape[0], 0, self.spec.dim), targets
        return torch.cat(inputs, dim=1), targets

    # --- the network -----------------------------------------------------------------------------------------------

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """Class vectors (B, dim), with label dropout to the null class in training mode."""
        if self.training and self.cond_drop_rate > 0:
            dropped = torch.rand(labels.shape, device=labels.device) < self.cond_drop_rate
            labels = torch.where(dropped, torch.full_like(labels, self.num_classes), labels)
        return self.class_emb(labels)

    def start_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """SOS: the class vector + pos_start, one per token of the first scale (B, n_1², dim)."""
        return cond[:, None] + self.pos_start

    def run(self, x: torch.Tensor, cond: torch.Tensor, *, attn_mask=None,
            caches: list[KVCache] | None = None) -> torch.Tensor:
        """Embedded tokens (B, l, dim) → logits (B, l, vocab) fp32."""
        mod = self.shared_ada_lin(cond)
        for i, block in enumerate(self.blocks):
            x = block(x, mod, attn_mask=attn_mask, cache=None if caches is None else caches[i])
        return self.head(self.head_nm(x.float(), cond)).float()

    def logits(self, inputs: torch.Tensor, labels: torch.Tensor, schedule: tuple[int, ...]) -> torch.Tensor:
        """Teacher-forced logits (B, L, vocab) from the inputs of scales 2..K."""
        cond = self.condition(labels)
        x = torch.cat([self.start_tokens(cond), self.word_embed(inputs.float())], dim=1)
        x = x + self.positions(schedule)
        return self.run(x, cond, attn_mask=self.attn_mask(schedule, x.device))

    def forward(self, tokens, labels: torch.Tensor, *, schedule: Sequence[int] | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, L, vocab); scale k's logits depend on the class and scales < k only. FlexVAR
        mode takes any schedule a training batch may draw (it may end below the grid side)."""
        if schedule is not None and not self.residual:
            schedule = check_schedule(schedule, max(int(schedule[-1]), 1))
            if schedule[0] != self.scales[0] or schedule[-1] > self.side:
                raise ValueError(f"a teacher-forced schedule must start at {self.scales[0]} and end at or below the "
                                 f"grid side {self.side}, got {schedule}")
        else:
            schedule = self.check_schedule(schedule)
        inputs, _ = self.teacher_forcing(tokens, schedule)
        return self.logits(inputs, labels, schedule)

    def loss(self, tokens, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        schedule = self.training_schedule()
        inputs, targets = self.teacher_forcing(tokens, schedule)
        logits = self.logits(inputs, labels, schedule)
        per_token = F.cross_entropy(rearrange(logits, "b l v -> b v l"), targets, reduction="none")
        correct = (logits.argmax(dim=-1) == targets).float()
        out = {"loss": per_token.mean(), "accuracy": correct.mean().detach()}
        last = schedule[-1] ** 2
        out["loss_last"], out["acc_last"] = per_token[:, -last:].mean().detach(), correct[:, -last:].mean()
        if schedule == self.scales:
            start = 0
            for k, n in enumerate(schedule):
                out[f"loss_s{k}"] = per_token[:, start:start + n * n].mean().detach()
                out[f"acc_s{k}"] = correct[:, start:start + n * n].mean()
                start += n * n
        return out

    # --- sampling ----------------------------------------------------------------------------------------------------

    def guidance(self, cfg: float, k: int, schedule: tuple[int, ...], cfg_schedule: str) -> float:
        """t at step k of `schedule`; the guided logits are (1 + t)·c − t·u (VAR's `cfg` is cfg − 1 here, see the
        module docstring). "linear" (VAR, FlexVAR's `autoregressive_infer_cfg`): (cfg − 1)·k/min(K − 1, K₀ − 1) with
        K₀ the default schedule's length, and cfg − 1 at sides above the grid; in VAR mode K = K₀, VAR's ramp.
        "linear_to_last": (cfg − 1)·k/(K − 1) for any schedule. "constant": cfg − 1."""
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {cfg_schedule!r}")
        if cfg_schedule == "constant" or schedule[k] > self.side:
            return cfg - 1.0
        steps = len(schedule) if cfg_schedule == "linear_to_last" else min(len(schedule), len(self.scales))
        return linear_cfg_schedule(cfg - 1.0, k, steps) if steps > 1 else cfg - 1.0

    def draw_top_k(self, n: int, top_k: int, greedy_off_grid: bool) -> int:
        """The top-k of the draw at side n: 1 (greedy) when `greedy_off_grid` and n is a side the default schedule
        lacks or lies above the grid (FlexVAR's zero-shot rule), else `top_k`."""
        return 1 if greedy_off_grid and (n > self.side or n not in self.scales) else top_k

    # --- sampling ---------------------------------------------------------------------------------------------

    def static_step(self, x: torch.Tensor, cond: torch.Tensor, positions: torch.Tensor,
                    caches: list[StaticKVCache]) -> torch.Tensor:
        """One scale's forward with fixed-size caches: x (R, n², dim) the scale's tokens at `positions` (n²,) long
        on x's device → logits (R, n², vocab) fp32. Keys and values are written into `caches` at those positions;
        attention covers all L slots, those after the scale masked (its queries see every slot up to its last)."""
        visible = torch.arange(caches[0].max_len, device=x.device) <= positions[-1:, None]  # (1, L)
        return self.run(x, cond, attn_mask=visible, caches=[cache.at(positions) for cache in caches])

    def static_caches(self, rows: int, length: int, device: torch.device) -> list[StaticKVCache]:
        """Per-block static caches of `length` slots for `rows` rows, held across sampling runs."""
        attn = self.blocks[0].attn
        return held_static_caches(self, layers=len(self.blocks), rows=rows, kv_heads=attn.heads, max_len=length,
                                  head_dim=attn.head_dim, weight_dtype=attn.mat_qkv.weight.dtype, device=device)

    def scale_stepper(self, decode: str, *, rows: int, length: int,
                      device: torch.device) -> Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]:
        """The per-scale forward of one sampling run, (x, cond, start, n²) → logits of the scale's tokens."""
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if decode == "eager":
            caches = [KVCache(length) for _ in self.blocks]
            return lambda x, cond, start, count: self.run(x, cond, caches=caches)
        static = self.static_caches(rows, length, device)
        slots = torch.arange(length, device=device)  # the scale's positions: a view, no host copy
        if decode == "static":
            return lambda x, cond, start, count: self.static_step(x, cond, slots[start:start + count], static)
        # One graph per scale (their shapes differ), a CUDA graph on CUDA: room for a few schedules' scales.
        compiled = compiled_step(NextScaleGenerator.static_step, device, graphs=4 * len(self.scales))
        return lambda x, cond, start, count: compiled(self, x, cond, slots[start:start + count], static)

    @torch.inference_mode()
    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, generator: torch.Generator | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_schedule: str = "linear",
               schedule: Sequence[int] | None = None, decode: str = "eager", more_smooth: bool = False,
               greedy_off_grid: bool = True):
        """Sample for `labels` (B,): VAR mode → list of K maps (B, n_k, n_k); FlexVAR mode → the grid (B, side, side).

        One forward per scale over only that scale's tokens, against per-block KV caches. cfg ≠ 1 runs the
        conditional and null-class rows as one batch of 2B (see the module docstring for the parametrisation).
        `schedule` (FlexVAR mode) may differ from the trained one, in sides and in number of steps. `decode` =
        eager | static | compiled runs the per-scale forward (module docstring); all three sample the same tokens.
        FlexVAR mode: the schedule may end above the grid (the map returned is then that larger grid), and
        `greedy_off_grid` draws sides off the default schedule greedily (`draw_top_k`, FlexVAR's rule).
        `more_smooth` (VAR mode; VAR's option for pictures, not for FID): each scale feeds on the Gumbel-softmax
        mix of the codebook instead of the drawn code (`smooth_codes`), and the K maps returned are those code
        vectors (B, n_k, n_k, code_dim) float, which the multi-scale tokenizer decodes like indices.
        """
        schedule = self.check_schedule(schedule)
        self.guidance(cfg, 0, schedule, cfg_schedule)  # validates the schedule name before any work
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if more_smooth and (not self.residual or temperature <= 0):
            raise ValueError("more_smooth (VAR's Gumbel-softmax code mixing) needs residual=true (VAR mode) and "
                             f"temperature > 0, got residual={self.residual} temperature={temperature}")
        was_training = self.training
        self.eval()
        try:
            guided = cfg != 1.0
            b = labels.shape[0]
            rows = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
            cond = self.class_emb(rows)
            positions = self.positions(schedule)
            step = self.scale_stepper(decode, rows=cond.shape[0], length=positions.shape[1], device=labels.device)
            tokenizer = self.tokenizer_on(labels.device)
            x = self.start_tokens(cond) + positions[:, :schedule[0] ** 2]
            maps, f_hat, start = [], None, 0
            for k, n in enumerate(schedule):
                logits = step(x, cond, start, n * n)
                if guided:
                    t = self.guidance(cfg, k, schedule, cfg_schedule)
                    logits = classifier_free_guidance(logits[:b], logits[b:], 1.0 + t)  # (1 + t)·c − t·u
                top_k_n = self.draw_top_k(n, top_k, greedy_off_grid)
                idx = sample_from_logits(logits, temperature=temperature, top_k=top_k_n, top_p=top_p,
                                         generator=generator, nucleus=top_p_filter_var)
                if more_smooth:  # VAR draws the code first (same random stream), then mixes the codebook instead
                    kept = top_p_filter_var(top_k_filter(apply_temperature(logits.float(), temperature), top_k), top_p)
                    ratio = k / (len(schedule) - 1) if len(schedule) > 1 else 0.0
                    idx = smooth_codes(kept, tokenizer.code_vectors().float(), ratio=ratio, generator=generator)
                maps.append(idx.unflatten(1, (n, n)))
                start += n * n
                if k + 1 == len(schedule):
                    break
                f_hat, x = self.next_scale_tokens(tokenizer, k, idx, f_hat, schedule, positions[:, start:], guided)
            return maps if self.residual else maps[-1]
        finally:
            self.train(was_training)

    def next_scale_tokens(self, tokenizer, k: int, idx: torch.Tensor, f_hat, schedule: tuple[int, ...],
                          positions: torch.Tensor, guided: bool):
        """Scale k's sampled indices → the embedded input tokens of scale k + 1 (positions start at that scale),
        doubled for CFG; returns the updated accumulator f̂ (VAR) and those tokens. Shared by `sample` and `edit`."""
        n, nxt = schedule[k], schedule[k + 1]
        if self.residual:
            f_hat, inputs = tokenizer.next_scale_input(k, f_hat, idx)
        else:
            code = rearrange(tokenizer.codebook()[idx], "b (h w) c -> b c h w", h=n)
            inputs = self.flex_input(code, nxt)
        x = self.word_embed(inputs.float()) + positions[:, :nxt * nxt]
        return f_hat, torch.cat([x, x]) if guided else x

    def sampling_cost(self, *, cfg: float = 1.0, schedule: Sequence[int] | None = None, **_: Any) -> SamplingCost:
        """One forward pass per scale of the sampling schedule (the trained one unless `schedule` is given); 2B rows
        under CFG."""
        return SamplingCost(backbone_passes=len(self.check_schedule(schedule)),
                            rows_per_pass_factor=2 if cfg != 1.0 else 1)

    # --- zero-shot editing -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def edit(self, labels: torch.Tensor, known_tokens, known: torch.Tensor, *, cfg: float = 1.0,
             generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             cfg_schedule: str = "linear", schedule: Sequence[int] | None = None, greedy_off_grid: bool = True):
        """In-/out-painting by VAR's zero-shot rule: sample each scale as `sample` does, then overwrite the tokens
        whose cell is known at that scale with the reference's ground-truth tokens before they reach the
        accumulator (VAR) or the next scale's input (FlexVAR). At the last scale the known region therefore
        decodes from ground truth. Returns what `sample` returns.

        `known_tokens`: the reference images' tokens — VAR mode the K maps of `encode`; FlexVAR mode `encode(images)`
        (one map per side under ground_truth=continuous) or the grid (B, side, side), whose per-scale ground truth
        is then re-quantised (`quantized_scales`, on the sampling `schedule`, which must end at the grid).
        `known`: bool mask (B, H, W) or (H, W) at any resolution
        (pixels, or the finest token grid); each scale's mask is `editing.known_on_grid(known, n_k)`, so a coarse
        token is known only if its whole cell is. Every scale still runs its forward pass (later scales attend to
        its keys); a scale known in every row is not drawn, others are drawn exactly as in `sample`, so an empty
        mask reproduces `sample` for the same generator state.
        """
        schedule = self.check_schedule(schedule)
        self.guidance(cfg, 0, schedule, cfg_schedule)  # validates the schedule name before any work
        if schedule[-1] != self.side:
            raise ValueError(f"editing keeps tokens of the {self.side}×{self.side} grid: its schedule must end at "
                             f"side {self.side}, got {schedule}")
        was_training = self.training
        self.eval()
        try:
            guided = cfg != 1.0
            b, device = labels.shape[0], labels.device
            if self.residual:
                if len(known_tokens) != len(schedule) or any(
                        tuple(t.shape) != (b, n, n) for t, n in zip(known_tokens, schedule)):
                    raise ValueError(f"known_tokens must be {len(schedule)} maps (B={b}, n, n) for scales "
                                     f"{schedule}, got {[tuple(t.shape) for t in known_tokens]}")
                truth = [t.to(device).flatten(1) for t in known_tokens]
            else:
                per_side = isinstance(known_tokens, (list, tuple))
                grid = known_tokens[-1] if per_side else known_tokens
                if tuple(grid.shape) != (b, self.side, self.side):
                    raise ValueError(f"known_tokens must be the grid (B={b}, {self.side}, {self.side}) or "
                                     f"generator.encode(images), got {tuple(grid.shape)} at the grid side")
                known_tokens = [t.to(device) for t in known_tokens] if per_side else known_tokens.to(device)
                truth = [i.flatten(1) for i in self.quantized_scales(known_tokens, schedule)[0]]
            known = batch_mask(known, b, device)
            masks = [known_on_grid(known, n).flatten(1) for n in schedule]
            drawn = [not m for m in torch.stack([m.all() for m in masks]).tolist()]  # one host read
            rows = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
            cond = self.class_emb(rows)
            positions = self.positions(schedule)
            caches = [KVCache(positions.shape[1]) for _ in self.blocks]
            tokenizer = self.tokenizer_on(device)
            x = self.start_tokens(cond) + positions[:, :schedule[0] ** 2]
            maps, f_hat, start = [], None, 0
            for k, n in enumerate(schedule):
                logits = self.run(x, cond, caches=caches)
                if drawn[k]:
                    if guided:
                        t = self.guidance(cfg, k, schedule, cfg_schedule)
                        logits = classifier_free_guidance(logits[:b], logits[b:], 1.0 + t)  # (1 + t)·c − t·u
                    top_k_n = self.draw_top_k(n, top_k, greedy_off_grid)
                    idx = sample_from_logits(logits, temperature=temperature, top_k=top_k_n, top_p=top_p,
                                             generator=generator, nucleus=top_p_filter_var)
                    idx = torch.where(masks[k], truth[k], idx)  # the zero-shot rule
                else:
                    idx = truth[k]
                maps.append(rearrange(idx, "b (h w) -> b h w", h=n))
                start += n * n
                if k + 1 == len(schedule):
                    break
                f_hat, x = self.next_scale_tokens(tokenizer, k, idx, f_hat, schedule, positions[:, start:], guided)
            return maps if self.residual else maps[-1]
        finally:
            self.train(was_training)
