"""MAR (Li et al., 2024): masked autoregressive generation with a per-token diffusion head, and its Table-1 axes.

Tokens. A grid of N = h·w tokens in raster order: continuous latents (B, C, h, w) → (B, N, C) (MAR's patchify with
patch 1), or discrete codes (B, h, w) → (B, N). Every image has a *generation order*, a permutation of 0 … N − 1
(`order`: `random`, one uniform permutation per image as MAR; or `raster`, 0 … N − 1). MAR's own `orders` tensor is
this order reversed: MAR masks the first k entries of its orders, here the last k of the generation order.

Network (MAR's `MAR` class, parameter names kept so its checkpoints map key for key). `buffer_size` slots are
prepended, every one filled with the class embedding (`class_emb`, or the learned `fake_latent` for the null class
that CFG and label dropout use); tokens go through `z_proj` (a Linear; an embedding table for discrete codes); the
learned `encoder_pos_embed_learned` is added, then `z_proj_ln`. Encoder: timm-style ViT blocks (`encoder_blocks`,
LayerNorm, qkv with bias, GELU MLP), `encoder_norm`; `decoder_embed` to the decoder width, the decoder's own
position table, `decoder_blocks`, `decoder_norm`; the buffer slots are dropped and `diffusion_pos_embed_learned`
is added to what conditions the head.

Two attentions (`attention`):
- `bidirectional` (MAR). Training: one mask ratio r per batch from a normal centred at 1 with σ = 0.25 truncated to
  [mask_ratio_min, 1] (mean ≈ 0.87 for 0.7), ceil(N·r) tokens masked: the last ones of each image's order. The
  encoder sees only the buffer and the unmasked tokens (MAE); the decoder puts the learned `mask_token` back at the
  masked slots. The loss covers the masked tokens only. Sampling: `num_iter` steps; after step k,
  floor(N·cos(π/2·(k + 1)/K)) tokens stay masked (clamped to [1, masked − 1], everything at the last step);
  the tokens to predict are the ones this removes, taken from the end of the order (`remask=random`, MAR) or
  the least confident of the sampled codes (`remask=confidence`, MaskGIT: log p + τ_k·Gumbel with
  τ_k = choice_temperature·(1 − (k + 1)/K); cross-entropy head only).
- `causal` (MAR's Table-1 "AR" and "MAR, causal" rows; not in MAR's code). Encoder and decoder are causal over
  [buffer, x_σ(0) … x_σ(N−2)]; the decoder slot that predicts x_σ(j) carries the decoder position of σ(j) (the
  target's position: the MAE trick of the paper §3.3), so one pass teacher-forces all N tokens, and sampling is
  N steps of one token, each one cached pass (per-block KV caches) over a single new slot. `order=raster` with
  `attention=causal` is a plain raster AR model with the chosen head ("AR with DiffLoss").

Heads (`head`, `arvision.nn.heads`): `diffusion` (MAR's DiffLoss: SimpleMLPAdaLN, cosine DDPM with learned variance,
T = 1000, ε-MSE + VLB, `diffusion_batch_mul` copies of every token with fresh t and noise; at sampling respaced to
`num_sampling_steps` with temperature τ on the noise) for continuous tokens; `cross_entropy` for discrete ones
(logits over the codebook, temperature, CFG on the logits). `auto` picks by the tokenizer.

Guidance: the batch is doubled with `fake_latent` rows; `cfg_schedule=linear` (MAR, Muse) guides step k with
1 + (cfg − 1)·(N − n_k)/N, n_k the clamped masked count after the step (constant: cfg). Temperature is constant.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvision.generators.base import Generator, SamplingCost, require
from arvision.nn.attention import KVCache, causal_mask
from arvision.nn.heads import CrossEntropyHead, DiffusionHead
from arvision.tokenizers.base import TokenSpec

ORDERS = ("random", "raster")
ATTENTIONS = ("bidirectional", "causal")
HEADS = ("auto", "diffusion", "cross_entropy")
CFG_SCHEDULES = ("linear", "constant")
REMASKS = ("auto", "random", "confidence")


# --- masks and schedules ----------------------------------------------------------------------------------------------


def truncated_mask_ratio(u: torch.Tensor, *, min_ratio: float, std: float = 0.25) -> torch.Tensor:
    """MAR's mask ratio from uniforms u ∈ [0, 1): N(1, std²) truncated to [min_ratio, 1], by the inverse CDF
    (scipy's `truncnorm((min_ratio − 1)/std, 0, loc=1, scale=std)`), in float64."""
    low = torch.special.ndtr(torch.tensor((min_ratio - 1.0) / std, dtype=torch.float64))
    p = low + u.double() * (0.5 - low)
    return (1.0 + std * torch.special.ndtri(p)).clamp(min_ratio, 1.0)


def masked_by_order(order: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Bool (B, N): True at the last `num_masked` positions of each generation order (B, N)."""
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                             .expand_as(order).contiguous())
    return ranks >= order.shape[1] - num_masked


def mask_schedule(seq_len: int, num_iter: int) -> list[int]:
    """MAR's masked count after each of `num_iter` sampling steps, as its code computes it:
    n_k = clamp(floor(N·cos(π/2·(k + 1)/K)), 1, masked_k − 1) — used by the CFG ramp; the tokens are all revealed
    at the last step whatever n_{K−1} says (`revealed_per_step`)."""
    masked, out = seq_len, []
    for k in range(num_iter):
        n = math.floor(seq_len * math.cos(math.pi / 2 * (k + 1) / num_iter))
        n = max(1, min(masked - 1, n))
        out.append(n)
        masked = n if k < num_iter - 1 else 0
    return out


def revealed_per_step(seq_len: int, num_iter: int) -> list[int]:
    """Tokens predicted at each sampling step (sums to seq_len; 0 where the clamp leaves one masked token waiting
    for the last step)."""
    masked, out = seq_len, []
    schedule = mask_schedule(seq_len, num_iter)
    for k, n in enumerate(schedule):
        after = n if k < num_iter - 1 else 0
        out.append(masked - after)
        masked = after
    return out


# --- the transformer (timm's ViT block, with the names of MAR's checkpoints) ----------------------------------------


class SelfAttention(nn.Module):
    """timm's `Attention` (fused qkv with bias, proj), optionally causal and KV-cached."""

    def __init__(self, dim: int, heads: int, *, attn_dropout: float, proj_dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads must divide the width, got dim={dim} heads={heads}")
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor, *, causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        mask, is_causal = None, causal
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
            if causal and past:  # the new chunk sits after the cached keys: a lower-right causal mask
                is_causal = False
                mask = causal_mask(q.shape[2], k.shape[2], device=x.device) if q.shape[2] > 1 else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(out, "b h l d -> b l (h d)")))


class Mlp(nn.Module):
    """timm's `Mlp`: fc1 → GELU → dropout → fc2 → dropout."""

    def __init__(self, dim: int, hidden: int, *, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """timm's pre-norm ViT `Block` (norm1, attn, norm2, mlp), LayerNorm eps 1e-6 as MAR's presets."""

    def __init__(self, dim: int, heads: int, *, mlp_ratio: float, attn_dropout: float, proj_dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, heads, attn_dropout=attn_dropout, proj_dropout=proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=proj_dropout)

    def forward(self, x: torch.Tensor, *, causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=causal, cache=cache)
        return x + self.mlp(self.norm2(x))


# --- the generator ----------------------------------------------------------------------------------------------------


class MARGenerator(Generator):
    name = "mar"

    def __init__(self, *, spec: TokenSpec, num_classes: int, dim: int = 1024, depth: int = 16, heads: int = 16,
                 decoder_dim: int | None = None, decoder_depth: int | None = None, decoder_heads: int | None = None,
                 mlp_ratio: float = 4.0, buffer_size: int = 64, mask_ratio_min: float = 0.7,
                 class_dropout: float = 0.1, attn_dropout: float = 0.1, proj_dropout: float = 0.1,
                 label_init_std: float = 0.02, order: str = "random", attention: str = "bidirectional",
                 head: str = "auto", head_width: int = 1024, head_depth: int = 3, diffusion_batch_mul: int = 4,
                 num_train_timesteps: int = 1000) -> None:
        super().__init__()
        for key, value, allowed in [("order", order, ORDERS), ("attention", attention, ATTENTIONS),
                                    ("head", head, HEADS)]:
            if value not in allowed:
                raise ValueError(f"generator.model.{key} must be one of {allowed}, got {value!r}")
        grid = spec.layout == "grid" and spec.depth == 1
        if head == "auto":
            head = "cross_entropy" if spec.kind == "discrete" else "diffusion"
        if head == "diffusion":
            require(spec, generator="mar", ok=grid and spec.kind == "continuous",
                    needs="a continuous tokenizer (tokenizer=vae) for head=diffusion, or head=cross_entropy with "
                          "a discrete one (tokenizer=vq)")
        else:
            require(spec, generator="mar", ok=grid and spec.kind == "discrete",
                    needs="a discrete single-grid tokenizer (tokenizer=vq) for head=cross_entropy, or "
                          "head=diffusion with a continuous one (tokenizer=vae)")
        if buffer_size < 1:
            raise ValueError(f"generator.model.buffer_size must be >= 1 (the class enters through the buffer "
                             f"slots), got {buffer_size}")
        if not 0.0 < mask_ratio_min <= 1.0:
            raise ValueError(f"generator.model.mask_ratio_min must be in (0, 1], got {mask_ratio_min}")
        if diffusion_batch_mul < 1:
            raise ValueError(f"generator.model.diffusion_batch_mul must be >= 1, got {diffusion_batch_mul}")
        decoder_dim, decoder_depth = decoder_dim or dim, decoder_depth or depth
        decoder_heads = decoder_heads or heads
        self.spec, self.num_classes = spec, num_classes
        self.grid, self.seq_len = spec.grid, spec.grid[0] * spec.grid[1]
        self.order_kind, self.attention_kind, self.head_kind = order, attention, head
        self.causal = attention == "causal"
        self.buffer_size, self.mask_ratio_min, self.class_dropout = buffer_size, mask_ratio_min, class_dropout
        self.diffusion_batch_mul = diffusion_batch_mul if head == "diffusion" else 1
        slots = self.seq_len + buffer_size

        self.class_emb = nn.Embedding(num_classes, dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, dim))  # the null class (CFG, label dropout)
        if spec.kind == "continuous":
            self.z_proj: nn.Module = nn.Linear(spec.dim, dim)
        else:
            self.z_proj = nn.Embedding(spec.vocab_size, dim)
        self.z_proj_ln = nn.LayerNorm(dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, slots, dim))
        self.encoder_blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=mlp_ratio, attn_dropout=attn_dropout, proj_dropout=proj_dropout)
            for _ in range(depth))
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim)) if not self.causal else None
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, slots, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, attn_dropout=attn_dropout,
                  proj_dropout=proj_dropout) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_dim))
        self._init_weights(label_init_std)
        if head == "diffusion":  # built after the init, as MAR, so it keeps its own (zeroed adaLN) init
            self.diffloss: DiffusionHead | CrossEntropyHead = DiffusionHead(
                channels=spec.dim, cond_dim=decoder_dim, width=head_width, depth=head_depth,
                num_train_timesteps=num_train_timesteps)
        else:
            self.diffloss = CrossEntropyHead(vocab_size=spec.vocab_size, cond_dim=decoder_dim)

    def _init_weights(self, label_init_std: float) -> None:
        nn.init.normal_(self.class_emb.weight, std=label_init_std)
        for p in (self.fake_latent, self.mask_token, self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.diffusion_pos_embed_learned):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        if isinstance(self.z_proj, nn.Embedding):
            nn.init.normal_(self.z_proj.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """MAR decays no parameter of the head (util/misc.py: `'diffloss' in name`)."""
        return {f"diffloss.{name}" for name, _ in self.diffloss.named_parameters()}

    # --- tokens, orders, classes --------------------------------------------------------------------------------------

    def sequence(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokenizer layout → (B, N, C) latents or (B, N) codes, raster order."""
        if self.spec.kind == "continuous":
            return rearrange(tokens, "b c h w -> b (h w) c")
        return rearrange(tokens, "b h w -> b (h w)")

    def unsequence(self, seq: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        if self.spec.kind == "continuous":
            return rearrange(seq, "b (h w) c -> b c h w", h=h, w=w)
        return rearrange(seq, "b (h w) -> b h w", h=h, w=w)

    def orders(self, batch: int, *, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Generation orders (B, N) long: a uniform permutation per image (`random`) or raster order."""
        if self.order_kind == "raster":
            return torch.arange(self.seq_len, device=device).expand(batch, -1).contiguous()
        noise_device = generator.device if generator is not None else device
        return torch.rand(batch, self.seq_len, generator=generator, device=noise_device).argsort(dim=1).to(device)

    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, dim): `class_emb` rows, `fake_latent` where the label is the null class `num_classes`; in training
        each label is dropped to the null class with probability `class_dropout`."""
        null = labels == self.num_classes
        if self.training and self.class_dropout:
            null = null | (torch.rand(labels.shape, device=labels.device) < self.class_dropout)
        emb = self.class_emb(labels.clamp(max=self.num_classes - 1))
        return torch.where(null[:, None], self.fake_latent.to(emb.dtype), emb)

    def num_masked(self) -> int:
        """Masked tokens of a training batch: ceil(N·r), one truncated-normal ratio r per batch (MAR)."""
        r = truncated_mask_ratio(torch.rand(()), min_ratio=self.mask_ratio_min)
        return int(math.ceil(self.seq_len * r.item()))

    # --- bidirectional encoder / decoder (MAR) --------------------------------------------------------------------

    def kept_slots(self, mask: torch.Tensor, num_masked: int | None = None) -> torch.Tensor:
        """(B, buffer + N − num_masked) long: the buffer slots and the unmasked positions (+ buffer), ascending —
        what MAR's boolean indexing keeps, found with a stable sort so that a known `num_masked` (every image
        has the same count) costs no device-to-host sync."""
        with_buffer = torch.cat([mask.new_zeros(mask.shape[0], self.buffer_size), mask], dim=1)
        if num_masked is None:
            num_masked = int(mask[0].sum())
        slots = torch.sort(with_buffer.to(torch.uint8), dim=1, stable=True).indices
        return slots[:, : with_buffer.shape[1] - num_masked]

    def forward_mae_encoder(self, seq: torch.Tensor, mask: torch.Tensor, class_emb: torch.Tensor, *,
                            num_masked: int | None = None) -> torch.Tensor:
        """MAR's `forward_mae_encoder`: the buffer and the unmasked tokens (mask (B, N) True = masked) → (B, n, dim)."""
        x = self.z_proj(seq)
        batch, _, dim = x.shape
        x = torch.cat([class_emb[:, None].expand(batch, self.buffer_size, dim).to(x.dtype), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        kept = self.kept_slots(mask, num_masked)
        x = x.gather(1, kept[..., None].expand(-1, -1, dim))
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor, *,
                            num_masked: int | None = None) -> torch.Tensor:
        """MAR's `forward_mae_decoder`: mask tokens back in, decoder → head conditions (B, N, decoder_dim)."""
        x = self.decoder_embed(x)
        batch, dim = x.shape[0], x.shape[-1]
        kept = self.kept_slots(mask, num_masked)
        full = self.mask_token.to(x.dtype).expand(batch, self.buffer_size + mask.shape[1], dim)
        x = full.scatter(1, kept[..., None].expand(-1, -1, dim), x) + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, self.buffer_size:]
        return x + self.diffusion_pos_embed_learned

    # --- causal encoder / decoder ---------------------------------------------------------------------------------

    def causal_pass(self, start: int, end: int, known: torch.Tensor, order: torch.Tensor, class_emb: torch.Tensor,
                    caches: list[KVCache] | None = None) -> torch.Tensor:
        """Slots start … end − 1 of the causal sequence → decoder outputs (B, end − start, decoder_dim).

        Encoder slot s < buffer: the class; slot buffer + j: token σ(j) (`known` (B, ≥ j + 1, …) in generation
        order) at its own position. Decoder slot s < buffer − 1: the buffer; slot buffer − 1 + j predicts σ(j)
        and carries σ(j)'s decoder position. With `caches` (encoder blocks first, then decoder blocks) earlier
        slots come from the caches.
        """
        buf, batch = self.buffer_size, order.shape[0]
        enc_pos, dec_pos = self.encoder_pos_embed_learned[0], self.decoder_pos_embed_learned[0]
        parts = []
        if start < buf:
            stop = min(end, buf)
            parts.append(class_emb[:, None].expand(batch, stop - start, -1) + enc_pos[start:stop])
        if end > buf:
            a, b = max(start, buf) - buf, end - buf
            parts.append(self.z_proj(known[:, a:b]) + enc_pos[buf + order[:, a:b]])
        x = self.z_proj_ln(torch.cat(parts, dim=1))
        depth = len(self.encoder_blocks)
        for i, block in enumerate(self.encoder_blocks):
            x = block(x, causal=True, cache=None if caches is None else caches[i])
        x = self.decoder_embed(self.encoder_norm(x))
        parts = []
        if start < buf - 1:
            parts.append(dec_pos[start:min(end, buf - 1)].expand(batch, -1, -1))
        if end > buf - 1:
            a, b = max(start, buf - 1) - (buf - 1), end - (buf - 1)
            parts.append(dec_pos[buf + order[:, a:b]])
        x = x + torch.cat(parts, dim=1)
        for i, block in enumerate(self.decoder_blocks):
            x = block(x, causal=True, cache=None if caches is None else caches[depth + i])
        return self.decoder_norm(x)

    def causal_forward(self, seq: torch.Tensor, order: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """Teacher-forced head conditions (B, N, decoder_dim) in generation order (target j = token σ(j))."""
        in_order = seq.gather(1, order if seq.ndim == 2 else order[..., None].expand_as(seq))
        z = self.causal_pass(0, self.buffer_size + self.seq_len - 1, in_order[:, :-1], order, class_emb)
        return z[:, self.buffer_size - 1:] + self.diffusion_pos_embed_learned[0][order]

    # --- training -----------------------------------------------------------------------------------------------------

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        seq = self.sequence(tokens)
        batch, device = seq.shape[0], seq.device
        class_emb = self.class_embedding(labels)
        order = self.orders(batch, device=device)
        if self.causal:
            z = self.causal_forward(seq, order, class_emb)
            target = seq.gather(1, order if seq.ndim == 2 else order[..., None].expand_as(seq))
            mask = torch.ones(batch, self.seq_len, device=device)
            out = {}
        else:
            num_masked = self.num_masked()
            masked = masked_by_order(order, num_masked)
            h = self.forward_mae_encoder(seq, masked, class_emb, num_masked=num_masked)
            z = self.forward_mae_decoder(h, masked, num_masked=num_masked)
            target, mask = seq, masked.float()
            out = {"mask_ratio": torch.tensor(num_masked / self.seq_len)}
        mul = self.diffusion_batch_mul
        target = target.reshape(batch * self.seq_len, *target.shape[2:]).repeat(mul, *([1] * (target.ndim - 2)))
        z = z.reshape(batch * self.seq_len, -1).repeat(mul, 1)
        return {"loss": self.diffloss.loss(target, z, mask.reshape(-1).repeat(mul)), **out}

    # --- sampling -----------------------------------------------------------------------------------------------------

    def _settings(self, *, num_iter: int, cfg_schedule: str, remask: str) -> str:
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"sample.cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
        if remask not in REMASKS:
            raise ValueError(f"sample.remask must be one of {REMASKS}, got {remask!r}")
        if num_iter < 1:
            raise ValueError(f"sample.num_iter must be >= 1, got {num_iter}")
        if remask == "auto":
            return "confidence" if self.head_kind == "cross_entropy" and not self.causal else "random"
        if remask == "confidence" and (self.head_kind != "cross_entropy" or self.causal):
            raise ValueError("sample.remask=confidence needs generator.model.head=cross_entropy (a likelihood to rank "
                             "tokens by) and attention=bidirectional; use remask=random")
        return remask

    def step_cfg(self, cfg: float, masked_after: int, schedule: str) -> float:
        """Guidance of a step after which `masked_after` tokens (MAR's clamped count) stay masked."""
        if schedule == "constant":
            return cfg
        # in float32 as MAR computes it (its count is a float32 tensor): a seeded run stays on MAR's trajectory,
        # which a one-ulp different weight leaves once random or undertrained heads amplify it
        revealed = torch.tensor(self.seq_len - masked_after, dtype=torch.float32)
        return float(1.0 + (cfg - 1.0) * revealed / self.seq_len)

    def _head_sample(self, z: torch.Tensor, *, guided: bool, cfg: float, temperature: float, steps: int,
                     clip_denoised: float,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens (rows, …) and, for the cross-entropy head, their log-probabilities. z has 2·rows under CFG."""
        if guided and cfg == 1.0:
            z = z[: z.shape[0] // 2]
        if isinstance(self.diffloss, DiffusionHead):
            return self.diffloss.sample(z, cfg=cfg, temperature=temperature, steps=steps, clip_denoised=clip_denoised,
                                        generator=generator), None
        return self.diffloss.sample_with_log_prob(z, cfg=cfg, temperature=temperature, generator=generator)

    @torch.inference_mode()
    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, generator: torch.Generator | None = None,
               num_iter: int = 64, num_sampling_steps: int = 100, temperature: float = 1.0,
               cfg_schedule: str = "linear", remask: str = "auto", choice_temperature: float = 4.5,
               clip_denoised: float = 0.0) -> torch.Tensor:
        """Tokens for `labels` (B,): bidirectional, `num_iter` masked steps (MAR's `sample_tokens`); causal, one
        cached step per token. `num_sampling_steps`: the diffusion head's respaced steps; `temperature`: τ on the
        head's noise (or the logits); `remask`: random (by order), confidence (MaskGIT), auto (confidence for the
        bidirectional cross-entropy model, else random); `clip_denoised` > 0 clamps the diffusion head's x0
        predictions to ±clip_denoised (0: none, MAR)."""
        remask = self._settings(num_iter=num_iter, cfg_schedule=cfg_schedule, remask=remask)
        was_training = self.training
        self.eval()
        try:
            guided = cfg != 1.0
            rows = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
            class_emb = self.class_embedding(rows)
            order = self.orders(labels.shape[0], device=labels.device, generator=generator)
            step = dict(guided=guided, temperature=temperature, steps=num_sampling_steps, generator=generator,
                        clip_denoised=clip_denoised)
            if self.causal:
                seq = self._sample_causal(class_emb, order, cfg=cfg, cfg_schedule=cfg_schedule, **step)
            else:
                seq = self._sample_masked(class_emb, order, cfg=cfg, cfg_schedule=cfg_schedule, num_iter=num_iter,
                                          remask=remask, choice_temperature=choice_temperature, **step)
            return self.unsequence(seq)
        finally:
            self.train(was_training)

    def _empty_sequence(self, batch: int, device: torch.device) -> torch.Tensor:
        if self.spec.kind == "continuous":
            return torch.zeros(batch, self.seq_len, self.spec.dim, device=device)
        return torch.zeros(batch, self.seq_len, dtype=torch.long, device=device)

    def _sample_masked(self, class_emb: torch.Tensor, order: torch.Tensor, *, cfg: float, cfg_schedule: str,
                       num_iter: int, remask: str, choice_temperature: float, **step: Any) -> torch.Tensor:
        """MAR's `sample_tokens` loop; `step`: the head's settings (guided, temperature, steps, clip_denoised,
        generator)."""
        batch, device = order.shape[0], order.device
        guided, generator = step["guided"], step["generator"]
        seq = self._empty_sequence(batch, device)
        mask = torch.ones(batch, self.seq_len, dtype=torch.bool, device=device)
        schedule = mask_schedule(self.seq_len, num_iter)
        twice = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        masked = self.seq_len  # masked tokens per image, the same for every image
        for k, masked_len in enumerate(schedule):
            h = self.forward_mae_encoder(twice(seq), twice(mask), class_emb, num_masked=masked)
            z = self.forward_mae_decoder(h, twice(mask), num_masked=masked)
            after = masked_len if k < num_iter - 1 else 0
            if masked == after:  # the clamp keeps the last masked token for the last step
                continue
            cfg_k = self.step_cfg(cfg, masked_len, cfg_schedule) if guided else 1.0
            if remask == "confidence":
                tokens, log_p = self._head_sample(z[twice(mask)], cfg=cfg_k, **step)
                candidates = seq.masked_scatter(mask, tokens)
                confidence = torch.full(mask.shape, math.inf, device=device)
                gumbel = -torch.log(-torch.log(torch.rand(mask.shape, generator=generator,
                                                          device=generator.device if generator is not None
                                                          else device).to(device).clamp(1e-20, 1.0)))
                tau = choice_temperature * (1.0 - (k + 1) / num_iter)
                confidence = confidence.masked_scatter(mask, log_p) + tau * gumbel * mask
                # the `after` least confident of the still-masked positions stay masked
                mask_next = torch.zeros_like(mask)
                if after:
                    mask_next.scatter_(1, confidence.topk(after, dim=1, largest=False).indices, True)
                to_pred = mask & ~mask_next
                seq = torch.where(to_pred, candidates, seq)
            else:
                mask_next = masked_by_order(order, after)
                to_pred = mask & ~mask_next
                tokens, _ = self._head_sample(z[twice(to_pred)], cfg=cfg_k, **step)
                seq = seq.clone()
                seq[to_pred] = tokens.to(seq.dtype)
            mask, masked = mask_next, after
        return seq


    def _sample_causal(self, class_emb: torch.Tensor, order: torch.Tensor, *, cfg: float, cfg_schedule: str,
                       **step: Any) -> torch.Tensor:
        """One token per step along the order, each step one cached pass over one new slot."""
        batch, device, buf, n = order.shape[0], order.device, self.buffer_size, self.seq_len
        guided = step["guided"]
        known = self._empty_sequence(batch, device)  # generation order
        rows_order = torch.cat([order, order]) if guided else order
        caches = [KVCache(buf + n - 1) for _ in range(len(self.encoder_blocks) + len(self.decoder_blocks))]
        for j in range(n):
            start, end = (0, buf) if j == 0 else (buf + j - 1, buf + j)
            rows_known = torch.cat([known, known]) if guided else known
            z = self.causal_pass(start, end, rows_known, rows_order, class_emb, caches)[:, -1]
            z = z + self.diffusion_pos_embed_learned[0][rows_order[:, j]]
            cfg_j = self.step_cfg(cfg, max(n - j - 1, 1), cfg_schedule) if guided else 1.0
            tokens, _ = self._head_sample(z, cfg=cfg_j, **step)
            known[:, j] = tokens.to(known.dtype)
        seq = torch.empty_like(known)
        index = order if known.ndim == 2 else order[..., None].expand_as(known)
        return seq.scatter_(1, index, known)

    def sampling_cost(self, *, cfg: float = 1.0, num_iter: int = 64, num_sampling_steps: int = 100,
                      **_: Any) -> SamplingCost:
        """Bidirectional: `num_iter` encoder–decoder passes and, for each step that predicts any token, one head
        sampling run (`num_sampling_steps` passes for the diffusion head; the cross-entropy head's logits belong to
        the backbone pass). Causal: N cached passes and N head runs. 2B rows per pass under CFG."""
        per_head = self.diffloss.evaluations(steps=num_sampling_steps)
        if self.causal:
            backbone, head_runs = self.seq_len, self.seq_len
        else:
            backbone = num_iter
            head_runs = sum(1 for r in revealed_per_step(self.seq_len, num_iter) if r > 0)
        return SamplingCost(backbone_passes=backbone, head_passes=head_runs * per_head,
                            rows_per_pass_factor=2 if cfg != 1.0 else 1)
