"""LlamaGen-style raster generator: a Llama decoder predicting VQ tokens one at a time in raster order.

Sequence: [class] t_0 t_1 … t_{N-2}; the output at slot s predicts t_s, so the class token predicts t_0.
Residual (depth) tokens (B, h, w, D) are modelled one of two ways (`depth_mode`):
- `flatten`: position-major, t = ((i·w) + j)·D + d; the D tokens of a position share its RoPE position and get a
  learned depth embedding so the model knows which level comes next. N = h·w·D network passes to sample.
- `head` (RQ-Transformer): the spatial transformer runs over the h·w positions, its input at position t being the
  sum of the D code embeddings of position t − 1; its output h_t feeds a small causal *depth* transformer over
  [h_t, e(k_t1), e(k_t1) + e(k_t2), …] (cumulative code embeddings + a learned depth position) that predicts
  k_t1 … k_tD in turn. h·w spatial passes plus h·w·D (cheap) depth passes.
  As the RQ-Transformer by default: the code embeddings are the tokenizer's own frozen code vectors through a
  learned linear map (`code_embeddings="tokenizer"`: per depth then summed for the spatial input, RQ's
  `input_mlp`; after the cumulative sum for the depth head, RQ's `head_mlp`), and training uses RQ's soft targets
  (`soft_targets=T`): the tokenizer's latents are re-quantised each step with codes drawn from
  softmax(−‖r − e_k‖²/T) (`stochastic_codes`), the model is teacher-forced on the drawn codes, and the loss is the
  cross-entropy against those softmax distributions. Stage 2 then caches the tokenizer's latents, not its tokens
  (`token_encoding`). `code_embeddings="learned"` and `soft_targets=0` are the plain alternative (own embedding
  tables, hard cross-entropy).
`block="gpt2"` with `positions="learned"` and `null_class=False` is the RQ-Transformer's backbone: LayerNorm
blocks with biased q/k/v/proj and a 4× GELU MLP, learned absolute positions (slot s adds row s: the class slot
row 0, the token of position p row p + 1), no norm between the spatial transformer and the depth head, LayerNorm
and a biased output layer in the head, 1000 class rows and no CFG. `arvision-import official=rq_transformer_…`
loads its files (parity: experiments/parity/rq.py).
Module names follow LlamaGen (`tok_embeddings`, `cls_embedding.embedding_table`, `layers.{i}.attention.wqkv`,
…, `norm`, `output`) and the 2D RoPE matches theirs, so their c2i weights load by key, strictly (their `freqs_cis`
is not in the state dict): `arvision-import official=llamagen_c2i_…`, parity in experiments/parity/llamagen.py.

RAR (`order="random"` or `"annealed"`, with `target_aware=True`; `conf/paradigm/rar.yaml`): training feeds each
sequence in a random order with probability r and in raster order otherwise, r going 1 → 0 over the run as RAR's
`get_rar_random_ratio` (1 before `anneal_start`·max_steps, linear to 0 at `anneal_end`·max_steps, 0 after; the
training task tells the generator its step through `set_progress`). A token keeps its own position (its RoPE angle,
or its learned row) wherever it sits in the order, and each slot adds the learned `target_aware_pos_embed` row of
the position it must predict (RAR's target-aware positional embedding: slot s, fed the token of position o_{s−1},
adds row o_s; the class slot adds row o_0). The loss is the cross-entropy on the targets in that order. Sampling is
always raster (r = 0): slot s adds row s, so the KV cache, `static_step` and the compiled step need nothing else.
The orders are drawn from the torch RNG of the tokens' device, as dropout is: a resumed CPU run draws the same ones.
`target_aware_pos_embed` row p is RAR's `target_aware_pos_embed[0, 2 + p]` (RAR keeps two prefix rows).

Sampling decodes slot by slot against per-layer KV caches, in one of three ways that compute the same function
(`sample(decode=…)`): `eager` appends to growing caches (`decode`); `static` runs `static_step`, whose shapes never
change (preallocated `StaticKVCache`s, attention over all N slots with a position mask, the slot index a tensor);
`compiled` runs `static_step` through `torch.compile(fullgraph=True)`, on CUDA with mode="reduce-overhead" so each
step replays one CUDA graph (gpt-fast's recipe). Sampling itself (CFG, top-k/p, the RNG) stays eager.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvision.generators.base import Generator, SamplingCost, TokenEncoding, require
from arvision.generators.editing import batch_mask, known_on_grid
from arvision.generators.sampling import (classifier_free_guidance, sample_from_logits, top_p_filter_llamagen,
                                         top_p_filter_rq)
from arvision.nn import KVCache, LabelEmbedding, RMSNorm, TransformerBlock, grid_positions, rope_2d, with_zero_prefix
from arvision.nn.attention import StaticKVCache, position_mask
from arvision.nn.blocks import BLOCK_STYLES
from arvision.nn.graphs import compiled_step, held_static_caches
from arvision.tokenizers.base import ResidualTokenizer, Tokenizer, TokenSpec

DEPTH_MODES = ("flatten", "head")
DECODE_MODES = ("eager", "static", "compiled")
POSITIONS = ("rope", "learned")
CODE_EMBEDDINGS = ("tokenizer", "learned")
ORDERS = ("raster", "random", "annealed")  # training orders; sampling is raster
SOFT_TARGETS = 0.5  # the RQ-Transformer's soft-target temperature (its configs' `loss.temp`), the default
NUCLEI = {"llamagen": top_p_filter_llamagen, "rq": top_p_filter_rq}  # top_p_rule → the nucleus filter



def level_code_ids(codes: torch.Tensor, level: torch.Tensor | int, vocab_size: int,
                   per_level: bool) -> torch.Tensor:
    """Embedding rows of `codes` drawn at `level`: with one codebook per RVQ depth, code k of depth d is row
    d·vocab + k (depths are different codes); with a shared codebook the ids are the rows."""
    return codes + level * vocab_size if per_level else codes


def random_order_ratio(step: float, *, start: float, end: float) -> float:
    """RAR's r at training step `step`, the probability of a random order: 1 before `start`, 1 → 0 linearly from
    `start` to `end`, 0 from `end` on (RAR's `get_rar_random_ratio`; with start = end a switch at that step)."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return 1.0 - (step - start) / (end - start)


def draw_orders(batch: int, length: int, ratio: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """(batch, length) long: each row a uniformly random permutation of 0 … length − 1 with probability `ratio`,
    else 0, 1, …, length − 1 (RAR's `sample_orders`, drawn as tensors: one coin and one permutation per row, the
    permutation the argsort of uniform noise, so the draw never reads anything back to the host)."""
    coin = torch.rand(batch, 1, device=device) < ratio
    shuffled = torch.rand(batch, length, device=device).argsort(dim=1)
    return torch.where(coin, shuffled, torch.arange(length, device=device))


def guided_token(t: int, cfg_interval: int) -> bool:
    """Whether token t (0-based, in sampling order) gets CFG under LlamaGen's `cfg_interval`: every token when it
    is negative, else tokens 0 … cfg_interval + 1. LlamaGen's `generate` guides token 0 in its prefill, then
    decode step i (which draws token i + 1) while i ≤ cfg_interval, so cfg_interval = k guides k + 2 tokens."""
    return cfg_interval < 0 or t <= cfg_interval + 1


def nucleus_filter(top_p_rule: str) -> Callable[[torch.Tensor, float], torch.Tensor]:
    if top_p_rule not in NUCLEI:
        raise ValueError(f"top_p_rule must be one of {tuple(NUCLEI)}, got {top_p_rule!r}")
    return NUCLEI[top_p_rule]


def residual_tokenizer(tokenizer: Tokenizer) -> ResidualTokenizer:
    if not isinstance(tokenizer, ResidualTokenizer):
        raise TypeError(f"the depth head's code embeddings and soft targets read a residual tokenizer's codes "
                        f"(tokenizer=rvq); got tokenizer={tokenizer.spec.name}. Set generator.model."
                        "code_embeddings=learned and generator.model.soft_targets=0 for another tokenizer")
    return tokenizer


def trains_on_latents(spec: TokenSpec, model: Mapping[str, Any]) -> bool:
    """Whether a raster model with these settings (`generator.model`) trains on latents (soft targets)."""
    return (spec.layout == "depth" and spec.depth > 1 and model.get("depth_mode", "flatten") == "head"
            and float(model.get("soft_targets", SOFT_TARGETS)) > 0)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ_k target_k · log softmax(logits)_k (RQ-Transformer's `soft_target_cross_entropy`)."""
    return -(targets * logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


class DepthHead(nn.Module):
    """RQ-Transformer's depth transformer: causal over the D codes of one position, fed by the spatial context.

    Its inputs after the context are cumulative code vectors: its own learned embeddings (`code_dim=None`), or the
    tokenizer's code vectors (code_dim wide) through `code_proj` (RQ's `head_mlp`), applied after the sum."""

    def __init__(self, *, vocab_size: int, levels: int, dim: int, depth: int, heads: int, norm_eps: float,
                 codebook_per_level: bool = False, code_dim: int | None = None, block: str = "llama",
                 resid_dropout: float = 0.0, ffn_dropout: float = 0.0) -> None:
        super().__init__()
        self.levels, self.vocab_size, self.codebook_per_level = levels, vocab_size, codebook_per_level
        gpt2 = block == "gpt2"
        if code_dim is None:
            # its own code embeddings (`head_emb` in RQ-Transformer); one table per level when each depth has its
            # codebook
            self.tok_embeddings = nn.Embedding(vocab_size * (levels if codebook_per_level else 1), dim)
        else:
            self.code_proj = nn.Linear(code_dim, dim)
        self.level_embeddings = nn.Embedding(levels, dim)
        self.layers = nn.ModuleList(TransformerBlock(dim, heads, norm_eps=norm_eps, style=block,
                                                     resid_dropout=resid_dropout, ffn_dropout=ffn_dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if gpt2 else RMSNorm(dim, eps=norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=gpt2)
        self.learned_codes = code_dim is None

    def inputs(self, context: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """context (M, dim), the code vectors (M, d′, ·) of the d′ < D known codes → head inputs (M, d′ + 1, dim):
        [context, p(v_1), p(v_1 + v_2), …] (RQ-Transformer's `cumsum_depth_ctx`), p = `project`."""
        return torch.cat([context[:, None], self.project(vectors.cumsum(dim=1))], dim=1)

    def project(self, cumulative: torch.Tensor) -> torch.Tensor:
        return cumulative if self.learned_codes else self.code_proj(cumulative)

    def embed(self, codes: torch.Tensor, level: torch.Tensor | int) -> torch.Tensor:
        """Own embeddings of codes drawn at `level` (an int or a tensor broadcasting against `codes`)."""
        return self.tok_embeddings(level_code_ids(codes, level, self.vocab_size, self.codebook_per_level))

    def forward(self, x: torch.Tensor, *, start: int = 0, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Depth slots start … start + n − 1 (x: (M, n, dim)) → logits (M, n, vocab) in fp32."""
        x = x + self.level_embeddings(torch.arange(start, start + x.shape[1], device=x.device))
        for i, layer in enumerate(self.layers):
            x = layer(x, cache=None if caches is None else caches[i], is_causal=True)
        return self.output(self.norm(x)).float()

    def new_caches(self) -> list[KVCache]:
        return [KVCache(self.levels) for _ in self.layers]


class RasterGenerator(Generator):
    name = "raster"
    supports_editing = True

    def __init__(self, *, spec: TokenSpec, num_classes: int, dim: int = 256, depth: int = 6, heads: int = 4,
                 kv_heads: int | None = None, ffn_hidden: int | None = None, token_dropout: float = 0.1,
                 resid_dropout: float = 0.1, ffn_dropout: float = 0.1, drop_path: float = 0.0,
                 class_dropout: float = 0.1, rope_base: float = 10000.0, norm_eps: float = 1e-5,
                 depth_mode: str = "flatten", head_depth: int = 2, block: str = "llama", positions: str = "rope",
                 null_class: bool = True, code_embeddings: str = "tokenizer", soft_targets: float = SOFT_TARGETS,
                 stochastic_codes: bool = True, order: str = "raster", anneal_start: float = 0.5,
                 anneal_end: float = 0.75, target_aware: bool = False) -> None:
        super().__init__()
        require(spec, generator="raster", ok=spec.kind == "discrete" and spec.layout in ("grid", "depth"),
                needs="a discrete grid or residual tokenizer (tokenizer=vq or tokenizer=rvq)")
        for key, value, allowed in (("depth_mode", depth_mode, DEPTH_MODES), ("block", block, BLOCK_STYLES),
                                    ("positions", positions, POSITIONS),
                                    ("code_embeddings", code_embeddings, CODE_EMBEDDINGS), ("order", order, ORDERS)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
        if soft_targets < 0:
            raise ValueError(f"soft_targets (a temperature; 0 = hard targets) must be ≥ 0, got {soft_targets}")
        if not 0.0 <= anneal_start <= anneal_end <= 1.0:
            raise ValueError(f"anneal_start and anneal_end are fractions of the training steps with 0 ≤ start ≤ end "
                             f"≤ 1, got anneal_start={anneal_start}, anneal_end={anneal_end}")
        if order != "raster":
            require(spec, generator=f"raster with order={order}", ok=spec.layout == "grid",
                    needs="a tokenizer with one token per grid position (tokenizer=vq, fsq or lfq)")
            if not target_aware:
                raise ValueError(f"order={order} needs target_aware=true: in a random order the model must be told "
                                 "which position each slot predicts (RAR's target-aware positional embedding)")
        assert spec.vocab_size is not None  # guaranteed for discrete specs
        self.spec, self.num_classes = spec, num_classes
        self.levels = spec.depth if spec.layout == "depth" else 1
        # With a depth head (and for a grid, where D = 1 makes both modes the same) the spatial sequence has one
        # slot per position; flattened, one per code.
        self.depth_mode = depth_mode if self.levels > 1 else "flatten"
        self.seq_len = spec.num_tokens if self.depth_mode == "flatten" else spec.grid[0] * spec.grid[1]
        head = self.depth_mode == "head"
        # the RQ-Transformer's options act on the depth head only; a flattened sequence keeps its own tables
        self.tokenizer_codes = head and code_embeddings == "tokenizer"
        self.soft_targets = soft_targets if head else 0.0
        self.stochastic_codes = stochastic_codes
        self.order, self.anneal_start, self.anneal_end = order, anneal_start, anneal_end
        # r, the probability of a random order in this training step (set by `set_progress`): a tensor, so that a
        # compiled loss reads its value rather than being recompiled for each new one; not saved (a function of
        # the step)
        ratio = {"raster": 0.0, "random": 1.0, "annealed": random_order_ratio(0, start=anneal_start, end=anneal_end)}
        self.register_buffer("random_ratio", torch.tensor(ratio[order]), persistent=False)

        self.cls_embedding = LabelEmbedding(num_classes, dim, dropout=class_dropout, null_class=null_class)
        # RVQ with one codebook per depth: code k of depth d is another code than k of depth d′, so each depth gets
        # its own rows (ids offset by d·vocab); with a shared codebook (RQ-VAE) the depths share one table.
        self.codebook_per_level = self.levels > 1 and not spec.shared_codebook
        if self.tokenizer_codes:
            self.code_proj = nn.Linear(spec.dim, dim)  # RQ's `input_mlp` on the tokenizer's code vectors
        else:
            self.tok_embeddings = nn.Embedding(spec.vocab_size * (self.levels if self.codebook_per_level else 1), dim)
        flat_depth = self.levels > 1 and self.depth_mode == "flatten"
        self.depth_embeddings = nn.Embedding(self.levels, dim) if flat_depth else None
        if positions == "learned":  # slot s adds row s; the last row is the unused position of the last token
            self.pos_embeddings = nn.Parameter(torch.empty(self.seq_len + 1, dim))
        self.target_aware = target_aware
        if target_aware:  # row p: "this slot predicts the token at position p" (RAR)
            self.target_aware_pos_embed = nn.Parameter(torch.empty(self.seq_len, dim))
        self.tok_dropout = nn.Dropout(token_dropout)
        # stochastic depth grows with depth, as in LlamaGen (on the CPU: the model may be built on the meta device)
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
        self.layers = nn.ModuleList(
            TransformerBlock(dim, heads, kv_heads=kv_heads, ffn_hidden=ffn_hidden, resid_dropout=resid_dropout,
                             ffn_dropout=ffn_dropout, drop_path=rate, norm_eps=norm_eps, style=block)
            for rate in rates)
        gpt2 = block == "gpt2"
        if gpt2 and head:
            self.norm: nn.Module = nn.Identity()  # the RQ-Transformer feeds its head the raw spatial output
        else:
            self.norm = nn.LayerNorm(dim, eps=norm_eps) if gpt2 else RMSNorm(dim, eps=norm_eps)
        if head:
            self.depth_head = DepthHead(vocab_size=spec.vocab_size, levels=self.levels, dim=dim, depth=head_depth,
                                        heads=heads, norm_eps=norm_eps, codebook_per_level=self.codebook_per_level,
                                        code_dim=spec.dim if self.tokenizer_codes else None, block=block,
                                        resid_dropout=resid_dropout if gpt2 else 0.0,
                                        ffn_dropout=ffn_dropout if gpt2 else 0.0)
        else:
            self.output = nn.Linear(dim, spec.vocab_size, bias=False)

        if positions == "rope":
            grid = grid_positions(*spec.grid).repeat_interleave(self.seq_len // (spec.grid[0] * spec.grid[1]), dim=0)
            table = with_zero_prefix(rope_2d(grid, dim // heads, base=rope_base), 1)  # slot 0 = class
            self.register_buffer("rope", table, persistent=False)
        else:
            self.rope = None

        self.apply(self._init_weights)
        if positions == "learned":
            nn.init.normal_(self.pos_embeddings, std=0.02)
        if target_aware:
            nn.init.trunc_normal_(self.target_aware_pos_embed, std=0.02)  # as RAR's
        # start from the uniform distribution over the vocabulary
        nn.init.zeros_(self.depth_head.output.weight if head else self.output.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:  # GPT-2 style layers only
            nn.init.zeros_(module.bias)

    @classmethod
    def token_encoding(cls, tokenizer: Tokenizer, model: Mapping[str, Any]) -> TokenEncoding:
        """With a depth head and soft targets (the RQ-Transformer's default), stage 2 trains on the tokenizer's
        latents, re-quantised stochastically each step; otherwise on its tokens."""
        if trains_on_latents(tokenizer.spec, model):
            return TokenEncoding(name="rq_latents", encode=residual_tokenizer(tokenizer).latents)
        return super().token_encoding(tokenizer, model)

    def encode(self, images: torch.Tensor) -> Any:
        tokenizer = self.tokenizer_on(images.device)
        if self.soft_targets > 0:
            return residual_tokenizer(tokenizer).latents(images)
        return tokenizer.encode(images)

    # --- the network -------------------------------------------------------------------------------------------

    def embed_tokens(self, seq: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Embed tokens (B, n) that sit at sequence indices offset … offset + n − 1 → (B, n, dim); with a depth
        head, whole positions (B, n, D) → the sum of their D code embeddings (B, n, dim)."""
        vocab, per_level = self.spec.vocab_size, self.codebook_per_level
        if self.depth_mode == "head":
            if self.tokenizer_codes:  # RQ's input_mlp on each depth's code vector, then the sum over depths
                return self.code_proj(self.code_vectors(seq)).sum(dim=2)
            levels = torch.arange(seq.shape[2], device=seq.device)
            return self.tok_embeddings(level_code_ids(seq, levels, vocab, per_level)).sum(dim=2)
        if self.depth_embeddings is None:
            return self.tok_embeddings(seq)
        level = torch.arange(offset, offset + seq.shape[1], device=seq.device) % self.levels
        return self.tok_embeddings(level_code_ids(seq, level, vocab, per_level)) + self.depth_embeddings(level)

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (..., d′) of depths 0 … d′ − 1 → the tokenizer's frozen code vectors (..., d′, code_dim)."""
        return residual_tokenizer(self.tokenizer_on(codes.device)).depth_codes(codes)

    def head_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """What the depth head sums for codes (M, d′) of depths 0 … d′ − 1: (M, d′, ·), the tokenizer's code
        vectors or the head's own embeddings."""
        if self.tokenizer_codes:
            return self.code_vectors(codes)
        return self.depth_head.embed(codes, torch.arange(codes.shape[1], device=codes.device))

    def head_input(self, codes: torch.Tensor) -> torch.Tensor:
        """The depth head's input after the known codes (M, d′) of one position: p(v_1 + … + v_d′) (M, 1, dim)."""
        return self.depth_head.project(self.head_vectors(codes).cumsum(dim=1)[:, -1:])

    def decode(self, x: torch.Tensor, *, start: int = 0, caches: list[KVCache] | None = None,
               orders: torch.Tensor | None = None) -> torch.Tensor:
        """Run input slots start … start + n − 1 (x: (B, n, dim)) → logits (B, n, vocab) in fp32 (with a depth
        head: the spatial context (B, n, dim) for the head instead).

        Without caches `start` must be 0 and x is the whole prefix; with caches (one per layer, see `new_caches`)
        the earlier slots are read from them and these are appended. `orders` (B, N) (training in a drawn order,
        the whole sequence, no caches): slot s holds the token of position orders[:, s − 1] and predicts the one at
        orders[:, s]; None is the raster order.
        """
        if orders is None:  # slot s holds the token of position s − 1 (the class at 0) and predicts position s
            slots: slice | torch.Tensor = slice(start, start + x.shape[1])
            targets: slice | torch.Tensor = slots
        elif start or caches is not None:
            raise ValueError("a drawn order runs the whole teacher-forced sequence, without caches")
        else:  # per row and slot, the row of the position tables: 0 for the class, 1 + the held token's position
            slots, targets = torch.cat([torch.zeros_like(orders[:, :1]), orders[:, :-1] + 1], dim=1), orders
        if self.rope is None:  # learned absolute positions, added to the input (RQ-Transformer)
            rope, x = None, x + self.pos_embeddings[slots]
        else:  # in a drawn order one table per row, (B, 1, n, ·, 2): `apply_rope` broadcasts it over the heads
            rope = self.rope[slots] if orders is None else self.rope[slots][:, None]
        if self.target_aware:
            x = x + self.target_aware_pos_embed[targets]
        x = self.tok_dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope=rope, cache=None if caches is None else caches[i], is_causal=True)
        x = self.norm(x)
        return x if self.depth_mode == "head" else self.output(x).float()

    def new_caches(self) -> list[KVCache]:
        """Empty per-layer KV caches for one sampling run (class slot + N − 1 fed tokens)."""
        return [KVCache(self.seq_len) for _ in self.layers]

    def flatten(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or (B, h, w, D) → raster sequence (B, N) (with a depth head: positions (B, h·w, D))."""
        if self.depth_mode == "head":
            return rearrange(tokens, "b h w d -> b (h w) d")
        if self.spec.layout == "depth":
            return rearrange(tokens, "b h w d -> b (h w d)")
        return rearrange(tokens, "b h w -> b (h w)")

    def unflatten(self, seq: torch.Tensor) -> torch.Tensor:
        h, w = self.spec.grid
        if self.depth_mode == "head":
            return rearrange(seq, "b (h w) d -> b h w d", h=h, w=w)
        if self.spec.layout == "depth":
            return rearrange(seq, "b (h w d) -> b h w d", h=h, w=w)
        return rearrange(seq, "b (h w) -> b h w", h=h, w=w)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, N, vocab); position t predicts token t from the class and tokens < t (with a
        depth head: (B, h·w, D, vocab), code d of position t predicted from positions < t and codes < d of t).
        With `orders` (B, N) (RAR, see `decode`) slot s predicts the token at position orders[:, s] from the class
        and the tokens at orders[:, :s]: the logits are in that order."""
        seq = self.flatten(tokens)
        if orders is not None:
            seq = seq.gather(1, orders)
        x = torch.cat([self.cls_embedding(labels)[:, None], self.embed_tokens(seq[:, :-1])], dim=1)
        out = self.decode(x, orders=orders)
        if self.depth_mode == "flatten":
            return out
        b = seq.shape[0]
        head_in = self.depth_head.inputs(rearrange(out, "b n c -> (b n) c"),
                                         self.head_vectors(rearrange(seq[..., :-1], "b n d -> (b n) d")))
        return rearrange(self.depth_head(head_in), "(b n) d v -> b n d v", b=b)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the teacher-forced logits. Given latents (B, dim, h, w) (soft targets, see
        `token_encoding`) the codes are drawn from RQ-VAE's soft codes at temperature `soft_targets` (or are their
        argmin without `stochastic_codes`) and the targets are those soft codes; given tokens, hard targets."""
        if tokens.is_floating_point():
            if self.soft_targets <= 0:
                raise ValueError("latents were given to a raster model without soft targets (soft_targets=0 "
                                 "trains on the tokenizer's tokens)")
            soft, codes = residual_tokenizer(self.tokenizer_on(tokens.device)).soft_codes(
                tokens, temperature=self.soft_targets, stochastic=self.stochastic_codes)
            logits = self(codes, labels)
            loss = soft_cross_entropy(logits, rearrange(soft, "b h w d k -> b (h w) d k"))
            targets = self.flatten(codes)
        else:
            orders = self.training_orders(tokens)
            logits = self(tokens, labels, orders)
            targets = self.flatten(tokens) if orders is None else self.flatten(tokens).gather(1, orders)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.flatten())
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}

    def training_orders(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The orders (B, N) of this training step (RAR), or None for the raster order: always None for
        order=raster and in eval mode (the test loss scores the raster order that sampling uses)."""
        if self.order == "raster" or not self.training:
            return None
        return draw_orders(tokens.shape[0], self.seq_len, self.random_ratio, tokens.device)

    def set_progress(self, *, step: int, total_steps: int) -> None:
        """RAR's annealing (order=annealed): r = `random_order_ratio` at this step, the boundaries anneal_start and
        anneal_end times `total_steps`. Written into the `random_ratio` buffer in place."""
        if self.order == "annealed":
            self.random_ratio.fill_(random_order_ratio(step, start=self.anneal_start * total_steps,
                                                       end=self.anneal_end * total_steps))

    # --- sampling -------------------------------------------------------------------------------------------------

    def static_step(self, x: torch.Tensor, positions: torch.Tensor, caches: list[StaticKVCache]) -> torch.Tensor:
        """`decode` of one slot with fixed shapes: x (B, 1, dim) the input of slot `positions` ((1,) long tensor on
        x's device) → logits (B, 1, vocab) fp32 (with a depth head: the context (B, 1, dim)). Keys and values are
        written into `caches` at the slot; attention covers all N slots, those after it masked."""
        if self.rope is None:
            rope, x = None, x + self.pos_embeddings.index_select(0, positions)
        else:
            rope = self.rope.index_select(0, positions)
        if self.target_aware:  # slot t predicts position t
            x = x + self.target_aware_pos_embed.index_select(0, positions)
        mask = position_mask(positions, self.seq_len)
        x = self.tok_dropout(x)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, rope=rope, cache=cache.at(positions), attn_mask=mask)
        x = self.norm(x)
        return x if self.depth_mode == "head" else self.output(x).float()

    def static_caches(self, rows: int, device: torch.device) -> list[StaticKVCache]:
        """Per-layer static caches for `rows` rows, held across sampling runs (`nn.graphs.held_static_caches`)."""
        attention = self.layers[0].attention
        return held_static_caches(self, layers=len(self.layers), rows=rows, kv_heads=attention.kv_heads,
                                  max_len=self.seq_len, head_dim=attention.head_dim,
                                  weight_dtype=attention.wqkv.weight.dtype, device=device)

    def slot_stepper(self, decode: str, *, rows: int,
                     device: torch.device) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """The per-slot forward of one sampling run, (x, t) → output for slot t (see the module docstring)."""
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if decode == "eager":
            caches = self.new_caches()
            return lambda x, t: self.decode(x, start=t, caches=caches)
        static = self.static_caches(rows, device)
        positions = torch.arange(self.seq_len, device=device)  # slot t: the view positions[t:t+1], no host copy
        if decode == "static":
            return lambda x, t: self.static_step(x, positions[t:t + 1], static)
        compiled = compiled_step(RasterGenerator.static_step, device)  # a CUDA graph on CUDA
        return lambda x, t: compiled(self, x, positions[t:t + 1], static)

    @torch.inference_mode()
    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, generator: torch.Generator | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_interval: int = -1,
               decode: str = "eager", top_p_rule: str = "llamagen") -> torch.Tensor:
        """Sample tokens (B, h, w) or (B, h, w, D) for `labels` (B,).

        cfg ≠ 1 runs the conditional rows and null-class rows as one batch of 2B (guided logits
        uncond + cfg·(cond − uncond)); cfg = 1 runs only the B conditional rows. cfg_interval = k ≥ 0 guides
        tokens 0 … k + 1, exactly those LlamaGen's `generate` guides (`guided_token`), and then uses the
        conditional logits (the 2B rows keep running, as in LlamaGen); negative guides every token. `decode` =
        eager | static | compiled runs the spatial transformer's slots as the module docstring says (the depth
        head, if any, always runs eagerly); all three give the same tokens up to floating-point rounding. Top-p
        keeps LlamaGen's nucleus exactly (`top_p_filter_llamagen`), or the RQ-Transformer's with top_p_rule="rq"
        (`top_p_filter_rq`: they differ only where the mass before a token equals p).
        """
        was_training = self.training
        self.eval()
        try:
            guided = self.guided(cfg)
            nucleus = nucleus_filter(top_p_rule)
            batch = labels.shape[0]
            cond = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
            step = self.slot_stepper(decode, rows=cond.shape[0], device=labels.device)
            shape = (batch, self.seq_len) if self.depth_mode == "flatten" else (batch, self.seq_len, self.levels)
            seq = torch.empty(shape, dtype=torch.long, device=labels.device)
            x = self.cls_embedding(cond)[:, None]  # prefill: the class slot

            def draw(logits: torch.Tensor, t: int) -> torch.Tensor:
                if guided:
                    cond_logits, uncond_logits = logits.chunk(2)
                    logits = (classifier_free_guidance(cond_logits, uncond_logits, cfg)
                              if guided_token(t, cfg_interval) else cond_logits)
                return sample_from_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                          generator=generator, nucleus=nucleus)

            def both(token: torch.Tensor) -> torch.Tensor:  # the same token for the conditional and null rows
                return torch.cat([token, token]) if guided else token

            for t in range(self.seq_len):
                out = step(x, t)[:, -1]
                if self.depth_mode == "flatten":
                    seq[:, t] = draw(out, t)
                else:  # D depth-head passes over this position's codes, with their own small cache
                    head_caches, head_x = self.depth_head.new_caches(), out[:, None]
                    for d in range(self.levels):
                        seq[:, t, d] = draw(self.depth_head(head_x, start=d, caches=head_caches)[:, -1], t)
                        if d + 1 < self.levels:
                            head_x = self.head_input(both(seq[:, t, :d + 1]))  # p(v(c_1) + … + v(c_d))
                if t + 1 < self.seq_len:
                    x = self.embed_tokens(both(seq[:, t])[:, None], offset=t)
            return self.unflatten(seq)
        finally:
            self.train(was_training)

    def guided(self, cfg: float) -> bool:
        """Whether sampling runs CFG; a model without a null class (RQ-Transformer) cannot."""
        if cfg != 1.0 and not self.cls_embedding.null_class:
            raise ValueError(f"cfg={cfg} needs a null class, and this model has none (generator.model.null_class="
                             "false, as the RQ-Transformer, trained without CFG): sample with cfg=1")
        return cfg != 1.0

    def sampling_cost(self, *, cfg: float = 1.0, **_: Any) -> SamplingCost:
        """One backbone pass per spatial slot (the first is the class prefill), plus D depth-head passes per slot
        with a depth head; the 2B rows under CFG run for every token, also past `cfg_interval` (as in LlamaGen)."""
        head = self.seq_len * self.levels if self.depth_mode == "head" else 0
        return SamplingCost(backbone_passes=self.seq_len, head_passes=head,
                            rows_per_pass_factor=2 if cfg != 1.0 else 1)

    # --- zero-shot editing ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def edit(self, labels: torch.Tensor, known_tokens: torch.Tensor, known: torch.Tensor, *, cfg: float = 1.0,
             generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             cfg_interval: int = -1, top_p_rule: str = "llamagen") -> torch.Tensor:
        """In-/out-painting (VAR's zero-shot editing, in raster order): tokens shaped as `sample`'s that equal
        `known_tokens` wherever `known` is True and are sampled elsewhere.

        `known` (B, h, w) bool on the token grid, or a mask at any resolution (pixels (B, H, W) or one (H, W) for
        the batch) reduced to the grid by `editing.known_on_grid`; a residual position's D codes are known
        together. Decoding runs in raster order through the KV cache as in `sample`; at a known position the
        ground-truth token replaces the drawn one before it is fed back, so every later token is conditioned on
        it. A position known in every row is not drawn at all: runs of such positions (the known prefix
        included) are fed to the cache in one pass. Unknown tokens are drawn exactly as `sample` draws them (same
        CFG, cfg_interval, temperature, top-k/p), so an empty mask reproduces `sample` for the same generator state.
        """
        was_training = self.training
        self.eval()
        try:
            guided = self.guided(cfg)
            nucleus = nucleus_filter(top_p_rule)
            batch, device = labels.shape[0], labels.device
            if known_tokens.is_floating_point():  # `encode`'s latents (soft targets): the tokenizer's own codes
                known_tokens = residual_tokenizer(self.tokenizer_on(device)).soft_codes(
                    known_tokens.to(device), temperature=1.0, stochastic=False)[1]
            expected = (batch, *self.spec.grid) + ((self.levels,) if self.spec.layout == "depth" else ())
            if tuple(known_tokens.shape) != expected:
                raise ValueError(f"known_tokens must have shape {expected} (the tokenizer's tokens of the "
                                 f"reference images), got {tuple(known_tokens.shape)}")
            truth = self.flatten(known_tokens.to(device))
            seq = truth.clone()  # known slots keep the reference's tokens; the others are drawn
            forced = rearrange(known_on_grid(batch_mask(known, batch, device), self.spec.grid), "b h w -> b (h w)")
            if self.depth_mode == "flatten" and self.levels > 1:
                forced = forced.repeat_interleave(self.levels, dim=1)  # position-major: t = (i·w + j)·D + d
            todo = [t for t, everywhere in enumerate(forced.all(dim=0).tolist()) if not everywhere]  # one host read
            if not todo:
                return self.unflatten(seq)
            cond = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels

            def draw(logits: torch.Tensor, t: int) -> torch.Tensor:
                if guided:
                    cond_logits, uncond_logits = logits.chunk(2)
                    logits = (classifier_free_guidance(cond_logits, uncond_logits, cfg)
                              if guided_token(t, cfg_interval) else cond_logits)
                return sample_from_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                          generator=generator, nucleus=nucleus)

            def both(tokens: torch.Tensor) -> torch.Tensor:  # the same tokens for the conditional and null rows
                return torch.cat([tokens, tokens]) if guided else tokens

            caches = self.new_caches()
            x = self.cls_embedding(cond)[:, None]  # prefill: the class slot and the known prefix
            if todo[0]:
                x = torch.cat([x, self.embed_tokens(both(seq[:, :todo[0]]))], dim=1)
            start = 0
            for i, t in enumerate(todo):
                out = self.decode(x, start=start, caches=caches)[:, -1]  # predicts token t
                if self.depth_mode == "flatten":
                    seq[:, t] = torch.where(forced[:, t], truth[:, t], draw(out, t))
                else:  # the depth head over this position's codes; known rows feed it their own codes
                    head_caches, head_x = self.depth_head.new_caches(), out[:, None]
                    for d in range(self.levels):
                        code = draw(self.depth_head(head_x, start=d, caches=head_caches)[:, -1], t)
                        seq[:, t, d] = torch.where(forced[:, t], truth[:, t, d], code)
                        if d + 1 < self.levels:
                            head_x = self.head_input(both(seq[:, t, :d + 1]))
                if i + 1 < len(todo):  # feed token t and the known run after it, up to the next token to draw
                    x, start = self.embed_tokens(both(seq[:, t:todo[i + 1]]), offset=t), t + 1
            return self.unflatten(seq)
        finally:
            self.train(was_training)
