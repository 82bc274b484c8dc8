"""ACDiT (Hu et al., 2024): blockwise autoregressive diffusion over continuous latent tokens.

The latent (B, C, h, w) is patchified (patch p) into a gh×gw grid of L tokens of C·p² channels, cut into N
square blocks of K = s×s tokens taken in raster order of blocks (K = L: one block, plain DiT; K = 1: token-wise
AR with full-network diffusion per token). Within a block, tokens are in raster order.

Training sequence ("clean first", as the official code): the clean blocks, then all N noisy blocks
    [c_0 … c_{N−2} | n_0 … n_{N−1}]      n_i = √ᾱ_{t_i}·c_i + √(1 − ᾱ_{t_i})·ε_i,  t_i ~ U{0 … 999} per (image, block)
c_{N−1} is seen by no noisy block, so it is left out (exact: the outputs equal the 2L-token sequence's; it saves
1/(2N) of the tokens, and N = 1 is then literally DiT). Attention follows the Skip-Causal Attention Mask
(`skip_causal_mask_mod`, the reference formula over the full 2N-block sequence): clean block i sees clean blocks
≤ i; noisy block i sees clean blocks < i and itself; clean never sees noisy; noisy never sees another noisy block.
Clean and noisy copies of a token share its RoPE position.

Conditioning, as the official `CustomDiTBlock`: adaLN-Zero (shift/scale/gate from SiLU → Linear of the timestep
embedding of the block's t plus the class embedding) on the noisy tokens only; clean tokens pass through plain
RMSNorm, no gates, and never see t or the class. Loss: DDPM ε-prediction MSE on the noisy tokens (linear β,
diffusers' DDPMScheduler defaults, as the official train.py); class dropout to the null class `num_classes`.
The block is the official one by default: fused qkv with biases, RMSNorm of each head's q and k (eps 1e-6) before
ACDiT's RopeND (`nn/rope.py: rope_nd`, base 100 below 40 tokens a side, rotate-half across the axes), output
projection with bias, tanh-GELU MLP of width dim·mlp_ratio; the names map one to one onto the official state dict
(`imports/acdit.py`). arvision's earlier block stays as options: `mlp="swiglu"`, `attn_bias=False`,
`qk_norm=False`, `rope="rope2d"` (LlamaGen's 2D RoPE).

Sampling (the official `sample`): for block i, `steps` DPM-Solver++ (or DDIM) steps over the K noisy tokens, each
attending to the cached keys/values of the finished blocks c_0 … c_{i−1}; CFG is constant on ε. The finished block
then runs once as a clean block (no conditioning) to append its keys/values to the per-layer KV cache; this is
exact because clean tokens see neither noisy tokens nor the class. The last block needs no clean pass, so a batch
costs N·steps + N − 1 backbone passes over K tokens each (2B rows under CFG, clean passes included). (The official
code folds the clean pass of block i − 1 into the first denoising pass of block i, 2K tokens, N·steps passes;
same keys/values.) Timesteps: the official sampler builds `DPMSolverMultistepScheduler.from_config(DDIMScheduler()
.config)`; diffusers' `from_config` (0.31.0, which the official code pins, as 0.42.1) skips every entry the source
config took at its default (`_use_default_values`), which for a default-built DDIMScheduler is all of them, so the
solver keeps its own defaults: "linspace" spacing, 999, 959, …, 40 for 25 steps (not DDIM's "leading"). `spacing` and
`steps_offset` give the others as diffusers spaces them (DPM-Solver's "leading": 950, 912, …, 38).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from arvision.generators.base import Generator, SamplingCost, require
from arvision.nn.attention import KVCache, flex
from arvision.nn.blocks import FeedForward, LabelEmbedding, TimestepEmbedder, swiglu_hidden
from arvision.nn.masks import MaskMod, flex_block_mask, is_block_mask, use_flex
from arvision.nn.norm import RMSNorm
from arvision.nn.processes import SPACINGS, GaussianDiffusion
from arvision.nn.rope import apply_rope, apply_rope_nd, grid_positions, rope_2d, rope_nd
from arvision.tokenizers.base import TokenSpec

SAMPLERS = ("dpm_solver_pp", "ddim")
MLPS = ("gelu", "swiglu")
ROPES = ("ropend", "rope2d")


# --- the Skip-Causal Attention Mask -----------------------------------------------------------------------------

def skip_causal_mask_mod(block_size: int, num_blocks: int) -> MaskMod:
    """The reference SCAM over [c_0 … c_{N−1} | n_0 … n_{N−1}] (2N blocks of `block_size`), as a FlexAttention
    mask_mod (`thunlp/ACDiT: skip_causal_attn_mask_mod_gen` with len1 = N)."""
    def mask_mod(b, h, q_idx, kv_idx):
        q, k = q_idx // block_size, kv_idx // block_size
        q_clean, k_clean = q < num_blocks, k < num_blocks
        return ((q_clean & k_clean & (k <= q))                    # clean: block-causal
                | (~q_clean & k_clean & (k < q - num_blocks))     # noisy i: clean blocks < i
                | (q == k))                                       # every block sees itself
    return mask_mod


def skip_causal_mask(block_size: int, num_blocks: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The same mask built block by block (the official `build_attention_mask`): dense bool (2L, 2L), True = may
    attend."""
    n = num_blocks
    blocks = torch.zeros(2 * n, 2 * n, dtype=torch.bool, device=device)
    blocks[:n, :n] = torch.ones(n, n, dtype=torch.bool, device=device).tril()          # clean → clean ≤ i
    blocks[n:, :n] = torch.ones(n, n, dtype=torch.bool, device=device).tril(-1)        # noisy → clean < i
    blocks[n:, n:] = torch.eye(n, dtype=torch.bool, device=device)                     # noisy → itself
    return blocks.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


def without_last_clean_block(mask_mod: MaskMod, block_size: int, num_blocks: int) -> MaskMod:
    """`mask_mod` on the training sequence, which omits c_{N−1}: indices from (N−1)·K on skip over it."""
    gap = (num_blocks - 1) * block_size

    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + block_size * (q_idx >= gap), kv_idx + block_size * (kv_idx >= gap))
    return shifted


# --- layers -----------------------------------------------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, clean_len: int) -> torch.Tensor:
    """adaLN on the noisy tokens x[:, clean_len:] only (shift, scale: (B, n_noisy, dim))."""
    return torch.cat([x[:, :clean_len], x[:, clean_len:] * (1 + scale) + shift], dim=1)


def gated(x: torch.Tensor, gate: torch.Tensor, clean_len: int) -> torch.Tensor:
    return torch.cat([x[:, :clean_len], gate * x[:, clean_len:]], dim=1)


class GeluMLP(nn.Module):
    """ACDiT's feed-forward (timm's `Mlp`): fc2(GELU_tanh(fc1 x)), with biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ACDiTAttention(nn.Module):
    """ACDiT's attention (timm's `Attention` with qk_norm, as `SkipCausalAttention`): fused qkv → per-head RMSNorm of
    q and k (eps 1e-6) → RoPE → SDPA (or FlexAttention with a BlockMask) → proj. `bias`: qkv and proj biases (the
    official model has both); `qk_norm=False` skips the norms; `rope` picks the rotation the table is for
    (`ropend`: ACDiT's rotate-half table, `rope2d`: LlamaGen's pair table). Keys/values of a `KVCache` come first."""

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None, bias: bool, qk_norm: bool, rope: str,
                 norm_eps: float) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        if dim % heads or heads % kv_heads:
            raise ValueError(f"need heads | dim and kv_heads | heads, got dim={dim} heads={heads} kv_heads={kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wqkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=bias)
        self.wo = nn.Linear(dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.rotate = apply_rope_nd if rope == "ropend" else apply_rope

    def forward(self, x: torch.Tensor, *, rope: torch.Tensor, cache: KVCache | None = None,
                attn_mask=None) -> torch.Tensor:
        kv = self.kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.heads * self.head_dim, kv, kv], dim=-1)
        q = self.q_norm(rearrange(q, "b l (h d) -> b h l d", h=self.heads))
        k = self.k_norm(rearrange(k, "b l (h d) -> b h l d", h=self.kv_heads))
        v = rearrange(v, "b l (h d) -> b h l d", h=self.kv_heads)
        q, k = self.rotate(q, rope), self.rotate(k, rope)
        if cache is not None:
            k, v = cache.append(k, v)
        gqa = self.kv_heads != self.heads
        if is_block_mask(attn_mask):
            out = flex(q, k, v, attn_mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.wo(rearrange(out, "b h l d -> b l (h d)"))


class ACDiTBlock(nn.Module):
    """Pre-norm block (RMSNorm → attention, RMSNorm → MLP) with adaLN-Zero on the noisy tokens only (the official
    `CustomDiTBlock`); `mlp` picks the GELU MLP (official) or SwiGLU."""

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None, mlp: str, ffn_hidden: int, attn_bias: bool,
                 qk_norm: bool, rope: str, norm_eps: float) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps=norm_eps)
        self.attention = ACDiTAttention(dim, heads, kv_heads=kv_heads, bias=attn_bias, qk_norm=qk_norm, rope=rope,
                                        norm_eps=norm_eps)
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)
        self.feed_forward = GeluMLP(dim, ffn_hidden) if mlp == "gelu" else FeedForward(dim, ffn_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None, *, clean_len: int, block_size: int,
                rope: torch.Tensor, cache: KVCache | None = None, attn_mask=None) -> torch.Tensor:
        """x (B, n, dim): `clean_len` clean tokens, then noisy blocks of `block_size` tokens whose conditioning is
        cond (B, noisy blocks, dim); cond None means every token is clean."""
        attend = dict(rope=rope, cache=cache, attn_mask=attn_mask)
        if cond is None:
            x = x + self.attention(self.attention_norm(x), **attend)
            return x + self.feed_forward(self.ffn_norm(x))
        # modulation per block (not per token), then broadcast over the block's tokens
        mod = repeat(self.adaLN_modulation(cond), "b n d -> b (n k) d", k=block_size)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.chunk(6, dim=-1)
        h = self.attention(modulate(self.attention_norm(x), shift_a, scale_a, clean_len), **attend)
        x = x + gated(h, gate_a, clean_len)
        h = self.feed_forward(modulate(self.ffn_norm(x), shift_f, scale_f, clean_len))
        return x + gated(h, gate_f, clean_len)


class FinalLayer(nn.Module):
    """RMSNorm, adaLN shift/scale from the block's conditioning, linear to the token channels (ε)."""

    def __init__(self, dim: int, out_dim: int, *, norm_eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, *, block_size: int) -> torch.Tensor:
        shift, scale = repeat(self.adaLN_modulation(cond), "b n d -> b (n k) d", k=block_size).chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


# --- the generator ----------------------------------------------------------------------------------------------

class ACDiTGenerator(Generator):
    name = "acdit"

    def __init__(self, *, spec: TokenSpec, num_classes: int, dim: int = 256, depth: int = 6, heads: int = 4,
                 kv_heads: int | None = None, mlp: str = "gelu", mlp_ratio: float = 4.0, ffn_hidden: int | None = None,
                 attn_bias: bool = True, qk_norm: bool = True, rope: str = "ropend", patch_size: int = 1,
                 block_size: int = 16, class_dropout: float = 0.1, rope_base: float = 10000.0,
                 norm_eps: float = 1e-6, time_freq_dim: int = 256, num_train_timesteps: int = 1000,
                 beta_schedule: str = "linear", label_init_std: float = 0.02, attention: str = "auto") -> None:
        super().__init__()
        require(spec, generator="acdit", ok=spec.kind == "continuous", needs="a continuous tokenizer (tokenizer=vae)")
        h, w = spec.grid
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(f"patch_size must divide the {h}×{w} latent, got {patch_size}")
        if mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {mlp!r}")
        if rope not in ROPES:
            raise ValueError(f"rope must be one of {ROPES}, got {rope!r}")
        gh, gw = h // patch_size, w // patch_size
        seq_len = gh * gw
        allowed = sorted({s * s for s in range(1, min(gh, gw) + 1) if gh % s == 0 and gw % s == 0} | {seq_len})
        if block_size not in allowed:
            raise ValueError(f"block_size must be a square s·s with s dividing the {gh}×{gw} token grid, or the whole "
                             f"grid: one of {allowed}; got {block_size}")
        use_flex(attention, "cpu")  # validates the switch
        self.spec, self.num_classes = spec, num_classes
        self.patch_size, self.block_size, self.attention_mode = patch_size, block_size, attention
        self.grid, self.seq_len = (gh, gw), seq_len
        self.block_side = (gh, gw) if block_size == seq_len else (math.isqrt(block_size),) * 2
        self.num_blocks = seq_len // block_size
        self.token_dim = spec.dim * patch_size ** 2
        self.diffusion = GaussianDiffusion(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)
        if ffn_hidden is None:  # the official GELU MLP is int(dim·mlp_ratio) wide; SwiGLU Llama's 2·4d/3 rounded
            ffn_hidden = int(dim * mlp_ratio) if mlp == "gelu" else swiglu_hidden(dim)

        self.x_embedder = nn.Linear(self.token_dim, dim, bias=False)  # shared by clean and noisy tokens
        self.t_embedder = TimestepEmbedder(dim, freq_dim=time_freq_dim)
        self.y_embedder = LabelEmbedding(num_classes, dim, dropout=class_dropout)
        self.layers = nn.ModuleList(
            ACDiTBlock(dim, heads, kv_heads=kv_heads, mlp=mlp, ffn_hidden=ffn_hidden, attn_bias=attn_bias,
                       qk_norm=qk_norm, rope=rope, norm_eps=norm_eps)
            for _ in range(depth))
        self.final_layer = FinalLayer(dim, self.token_dim, norm_eps=norm_eps)

        # RoPE of every token in sequence (block) order; clean and noisy copies use the same rows. RopeND (the
        # official) takes its bases from the grid's sides (100 for sides up to 39), rope2d takes `rope_base`.
        bh, bw = self.block_side
        positions = rearrange(grid_positions(gh, gw), "(nh bh nw bw) c -> (nh nw bh bw) c", bh=bh, bw=bw,
                              nh=gh // bh, nw=gw // bw)
        head_dim = dim // heads
        table = rope_nd(positions, head_dim, max_lens=(gh, gw)) if rope == "ropend" else \
            rope_2d(positions, head_dim, base=rope_base)
        self.register_buffer("rope", table, persistent=False)
        self.register_buffer("train_mask", self.training_mask(), persistent=False)
        self._block_masks: dict[str, object] = {}  # FlexAttention BlockMask per device, built on first use

        self._init_weights(label_init_std)

    def _init_weights(self, label_init_std: float) -> None:
        """DiT's initialisation: xavier linears, N(0, 0.02) time-MLP weights, N(0, label_init_std²) label embeddings
        (DiT: 0.02), adaLN-Zero, zero output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=label_init_std)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*self.layers, self.final_layer]:
            nn.init.zeros_(layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # --- layout ---------------------------------------------------------------------------------------------------

    def to_blocks(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, N, K, p²·C): patchify (a token's channels in the official order: patch row, patch
        column, latent channel), then square blocks in raster order, raster inside a block."""
        (bh, bw), p = self.block_side, self.patch_size
        return rearrange(latents, "b c (nh bh p1) (nw bw p2) -> b (nh nw) (bh bw) (p1 p2 c)", bh=bh, bw=bw, p1=p, p2=p)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """(B, N, K, p²·C) → (B, C, h, w)."""
        (bh, bw), p = self.block_side, self.patch_size
        return rearrange(blocks, "b (nh nw) (bh bw) (p1 p2 c) -> b c (nh bh p1) (nw bw p2)", bh=bh, bw=bw, p1=p, p2=p,
                         nh=self.grid[0] // bh)

    def training_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Dense SCAM of the training sequence (without c_{N−1}): ((2N−1)·K, (2N−1)·K). Built on a real device
        (the CPU by default) even when the model is built on the meta device: boolean indexing has no meta form."""
        keep = torch.ones(2 * self.seq_len, dtype=torch.bool, device=device)
        keep[(self.num_blocks - 1) * self.block_size:self.seq_len] = False
        full = skip_causal_mask(self.block_size, self.num_blocks, device=device)
        return full[keep][:, keep]

    def attention_mask(self, device: torch.device):
        """The training mask for `device`: a FlexAttention BlockMask (flex) or the dense bool buffer (sdpa)."""
        if not use_flex(self.attention_mode, device):
            return self.train_mask
        key = str(device)
        if key not in self._block_masks:
            n = self.train_mask.shape[0]
            mod = without_last_clean_block(skip_causal_mask_mod(self.block_size, self.num_blocks), self.block_size,
                                           self.num_blocks)
            self._block_masks[key] = flex_block_mask(mod, n, n, device=device)
        return self._block_masks[key]

    # --- the network ----------------------------------------------------------------------------------------------

    def condition(self, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-block conditioning: timesteps t (B, n) and labels (B,) → (B, n, dim); labels are dropped to the
        null class with probability class_dropout in training mode."""
        return self.t_embedder(t) + self.y_embedder(labels)[:, None]

    def forward(self, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training pass: clean and noisy blocks (B, N, K, c), timesteps t (B, N) → predicted ε (B, N, K, c)."""
        context = rearrange(self.x_embedder(clean[:, :-1]), "b n k d -> b (n k) d")  # c_{N−1} is never seen
        x = torch.cat([context, rearrange(self.x_embedder(noisy), "b n k d -> b (n k) d")], dim=1)
        clean_len = context.shape[1]
        cond = self.condition(t, labels)
        rope = torch.cat([self.rope[:clean_len], self.rope])
        mask = self.attention_mask(x.device)
        for layer in self.layers:
            x = layer(x, cond, clean_len=clean_len, block_size=self.block_size, rope=rope, attn_mask=mask)
        eps = self.final_layer(x[:, clean_len:], cond, block_size=self.block_size)
        return rearrange(eps, "b (n k) c -> b n k c", k=self.block_size)

    def new_caches(self) -> list[KVCache]:
        """Per-layer KV caches for one sampling run: the N − 1 context blocks plus the block being denoised."""
        return [KVCache(self.seq_len) for _ in self.layers]

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, block: int,
                caches: list[KVCache] | None = None) -> torch.Tensor:
        """ε for noisy block `block` (x_t: (B, K, c)) at timesteps t (B,), attending to the clean blocks < block held
        in `caches` (filled by `extend_context`; None when there is no context). The caches are left as found."""
        context = block * self.block_size
        if caches is not None and any(c.length != context for c in caches):
            raise ValueError(f"caches hold {[c.length for c in caches]} tokens; block {block} needs {context}")
        if caches is None and block:
            raise ValueError(f"block {block} needs the caches of blocks < {block}")
        x = self.x_embedder(x_t)
        cond = self.condition(t[:, None], labels)
        rope = self.rope[context:context + self.block_size]
        for i, layer in enumerate(self.layers):
            x = layer(x, cond, clean_len=0, block_size=self.block_size, rope=rope,
                      cache=None if caches is None else caches[i])
        if caches is not None:
            for cache in caches:  # forget this pass's noisy keys/values: only clean blocks stay
                cache.length = context
        return self.final_layer(x, cond, block_size=self.block_size)

    def extend_context(self, clean: torch.Tensor, block: int, caches: list[KVCache]) -> None:
        """Run finished block `block` (B, K, c) once as a clean block, appending its keys/values to `caches`."""
        context = block * self.block_size
        if any(c.length != context for c in caches):
            raise ValueError(f"caches hold {[c.length for c in caches]} tokens; block {block} needs {context}")
        x = self.x_embedder(clean)
        rope = self.rope[context:context + self.block_size]
        for layer, cache in zip(self.layers, caches):
            x = layer(x, None, clean_len=self.block_size, block_size=self.block_size, rope=rope, cache=cache)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        x0 = self.to_blocks(tokens)
        noise = torch.randn_like(x0)
        b, n = x0.shape[:2]
        t = self.diffusion.sample_t(b * n, device=x0.device)  # an independent timestep per (image, block)
        x_t = rearrange(self.diffusion.add_noise(rearrange(x0, "b n k c -> (b n) k c"),
                                                 rearrange(noise, "b n k c -> (b n) k c"), t),
                        "(b n) k c -> b n k c", b=b)
        eps = self(x0, x_t, t.reshape(b, n), labels)
        return {"loss": self.diffusion.loss(eps, x0, noise)}

    # --- sampling -------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, labels: torch.Tensor, *, cfg: float = 1.5, generator: torch.Generator | None = None,
               steps: int = 25, sampler: str = "dpm_solver_pp", eta: float = 0.0, spacing: str = "linspace",
               steps_offset: int = 0) -> torch.Tensor:
        """Latents (B, C, h, w) for `labels` (B,), block after block.

        cfg ≠ 1 runs conditional and null-class rows as one 2B batch, ε = ε_u + cfg·(ε_c − ε_u) at every step (the
        official constant CFG); the clean passes run the same 2B rows so the caches match the noisy passes. Noise
        is drawn from `generator` (on its device), block by block. `spacing` / `steps_offset`: diffusers' timestep
        spacing of the chosen sampler (`GaussianDiffusion.inference_timesteps`). The official sampler's is
        `linspace` (999, 959, …, 40 for 25 steps): see the module docstring.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        was_training = self.training
        self.eval()
        try:
            guided = cfg != 1.0
            device, b, k = labels.device, labels.shape[0], self.block_size
            rows = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
            caches = self.new_caches() if self.num_blocks > 1 else None
            noise_device = generator.device if generator is not None else device
            blocks = []
            for i in range(self.num_blocks):
                noise = torch.randn((b, k, self.token_dim), generator=generator, device=noise_device).to(device)

                def eps_fn(x_t: torch.Tensor, t: torch.Tensor, block: int = i) -> torch.Tensor:
                    return self.denoise(x_t, t, rows, block, caches)

                x0 = self.run_sampler(eps_fn, noise, steps=steps, sampler=sampler, cfg=cfg, eta=eta,
                                      generator=generator, spacing=spacing, steps_offset=steps_offset)
                blocks.append(x0)
                if i + 1 < self.num_blocks:
                    assert caches is not None
                    self.extend_context(torch.cat([x0, x0]) if guided else x0, i, caches)
            return self.from_blocks(torch.stack(blocks, dim=1))
        finally:
            self.train(was_training)

    def run_sampler(self, eps_fn, noise: torch.Tensor, *, steps: int, sampler: str, cfg: float, eta: float = 0.0,
                    generator: torch.Generator | None = None, spacing: str = "linspace",
                    steps_offset: int = 0) -> torch.Tensor:
        """Denoise one block from `noise` with the process's DPM-Solver++(2M) or DDIM, CFG on ε in the 2B layout."""
        spaced = dict(spacing=spacing, steps_offset=steps_offset)
        if sampler == "dpm_solver_pp":
            out = self.diffusion.dpm_solver_pp_2m(eps_fn, noise, steps, cfg=cfg, **spaced)
        else:
            step_noise = None if generator is None else \
                (lambda i: torch.randn(noise.shape, generator=generator, device=generator.device))
            out = self.diffusion.ddim(eps_fn, noise, steps, eta=eta, cfg=cfg, step_noise=step_noise, **spaced)
        return out.sample

    def sampling_cost(self, *, cfg: float = 1.5, steps: int = 25, **_: Any) -> SamplingCost:
        """`steps` backbone passes per block (one ε evaluation per DPM-Solver++/DDIM step) plus a clean pass for every
        block but the last; each over K new tokens, 2B rows under CFG. No separate head."""
        return SamplingCost(backbone_passes=self.num_blocks * steps + self.num_blocks - 1,
                            rows_per_pass_factor=2 if cfg != 1.0 else 1)
