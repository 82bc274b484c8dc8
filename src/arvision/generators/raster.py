"""LlamaGen-style raster generator: a Llama decoder predicting VQ tokens one at a time in raster order.

Sequence: [class] t_0 t_1 … t_{N-2}; the output at slot s predicts t_s, so the class token predicts t_0.
Residual (depth) tokens (B, h, w, D) are flattened position-major, t = ((i·w) + j)·D + d; the D tokens of a
position share its RoPE position and get a learned depth embedding so the model knows which level comes next.
Module names follow LlamaGen (`tok_embeddings`, `cls_embedding.embedding_table`, `layers.{i}.attention.wqkv`,
…, `norm`, `output`) and the 2D RoPE matches theirs, so their c2i weights should load by key (strict=False for
their `freqs_cis`; not yet tried on a released checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvision.generators.base import Generator, require
from arvision.generators.sampling import classifier_free_guidance, sample_from_logits
from arvision.nn import KVCache, LabelEmbedding, RMSNorm, TransformerBlock, grid_positions, rope_2d, with_zero_prefix
from arvision.tokenizers.base import TokenSpec


class RasterGenerator(Generator):
    def __init__(self, *, spec: TokenSpec, num_classes: int, dim: int = 256, depth: int = 6, heads: int = 4,
                 kv_heads: int | None = None, ffn_hidden: int | None = None, token_dropout: float = 0.1,
                 resid_dropout: float = 0.1, ffn_dropout: float = 0.1, drop_path: float = 0.0,
                 class_dropout: float = 0.1, rope_base: float = 10000.0, norm_eps: float = 1e-5,
                 depth_mode: str = "flatten") -> None:
        super().__init__()
        require(spec, generator="raster", ok=spec.kind == "discrete" and spec.layout in ("grid", "depth"),
                needs="a discrete grid or residual tokenizer (tokenizer=vq or tokenizer=rvq)")
        if depth_mode != "flatten":
            raise ValueError(f"depth_mode must be 'flatten' (an RQ depth head is not built yet), got {depth_mode!r}")
        assert spec.vocab_size is not None  # guaranteed for discrete specs
        self.spec, self.num_classes = spec, num_classes
        self.levels = spec.depth if spec.layout == "depth" else 1
        self.seq_len = spec.num_tokens

        self.cls_embedding = LabelEmbedding(num_classes, dim, dropout=class_dropout)
        self.tok_embeddings = nn.Embedding(spec.vocab_size, dim)
        self.depth_embeddings = nn.Embedding(self.levels, dim) if self.levels > 1 else None
        self.tok_dropout = nn.Dropout(token_dropout)
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth, as in LlamaGen
        self.layers = nn.ModuleList(
            TransformerBlock(dim, heads, kv_heads=kv_heads, ffn_hidden=ffn_hidden, resid_dropout=resid_dropout,
                             ffn_dropout=ffn_dropout, drop_path=rate, norm_eps=norm_eps)
            for rate in rates)
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.output = nn.Linear(dim, spec.vocab_size, bias=False)

        positions = grid_positions(*spec.grid).repeat_interleave(self.levels, dim=0)
        table = with_zero_prefix(rope_2d(positions, dim // heads, base=rope_base), 1)  # slot 0 = class
        self.register_buffer("rope", table, persistent=False)

        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)  # start from the uniform distribution over the vocabulary

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    # --- the network -------------------------------------------------------------------------------------------

    def embed_tokens(self, seq: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Embed tokens (B, n) that sit at sequence indices offset … offset + n − 1 → (B, n, dim)."""
        x = self.tok_embeddings(seq)
        if self.depth_embeddings is not None:
            level = torch.arange(offset, offset + seq.shape[1], device=seq.device) % self.levels
            x = x + self.depth_embeddings(level)
        return x

    def decode(self, x: torch.Tensor, *, start: int = 0, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Run input slots start … start + n − 1 (x: (B, n, dim)) → logits (B, n, vocab) in fp32.

        Without caches `start` must be 0 and x is the whole prefix; with caches (one per layer, see `new_caches`)
        the earlier slots are read from them and these are appended.
        """
        rope = self.rope[start:start + x.shape[1]]
        x = self.tok_dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope=rope, cache=None if caches is None else caches[i], is_causal=True)
        return self.output(self.norm(x)).float()

    def new_caches(self) -> list[KVCache]:
        """Empty per-layer KV caches for one sampling run (class slot + N − 1 fed tokens)."""
        return [KVCache(self.seq_len) for _ in self.layers]

    def flatten(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or (B, h, w, D) → raster sequence (B, N)."""
        if self.spec.layout == "depth":
            return rearrange(tokens, "b h w d -> b (h w d)")
        return rearrange(tokens, "b h w -> b (h w)")

    def unflatten(self, seq: torch.Tensor) -> torch.Tensor:
        h, w = self.spec.grid
        if self.spec.layout == "depth":
            return rearrange(seq, "b (h w d) -> b h w d", h=h, w=w)
        return rearrange(seq, "b (h w) -> b h w", h=h, w=w)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, N, vocab); position t predicts token t from the class and tokens < t."""
        seq = self.flatten(tokens)
        x = torch.cat([self.cls_embedding(labels)[:, None], self.embed_tokens(seq[:, :-1])], dim=1)
        return self.decode(x)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self(tokens, labels)
        targets = self.flatten(tokens)
        loss = F.cross_entropy(rearrange(logits, "b n v -> (b n) v"), targets.flatten())
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}

    # --- sampling -------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, generator: torch.Generator | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_interval: int = -1) -> torch.Tensor:
        """Sample tokens (B, h, w) or (B, h, w, D) for `labels` (B,).

        cfg ≠ 1 runs the conditional rows and null-class rows as one batch of 2B (guided logits
        uncond + cfg·(cond − uncond)); cfg = 1 runs only the B conditional rows. cfg_interval ≥ 0 guides only the
        first `cfg_interval` tokens and then uses the conditional logits (the 2B rows keep running, as in
        LlamaGen); negative guides every token.
        """
        was_training = self.training
        self.eval()
        try:
            guided = cfg != 1.0
            batch = labels.shape[0]
            cond = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
            caches = self.new_caches()
            seq = torch.empty(batch, self.seq_len, dtype=torch.long, device=labels.device)
            x = self.cls_embedding(cond)[:, None]  # prefill: the class slot
            for t in range(self.seq_len):
                logits = self.decode(x, start=t, caches=caches)[:, -1]
                if guided:
                    cond_logits, uncond_logits = logits.chunk(2)
                    use_cfg = cfg_interval < 0 or t < cfg_interval
                    logits = classifier_free_guidance(cond_logits, uncond_logits, cfg) if use_cfg else cond_logits
                token = sample_from_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                           generator=generator)
                seq[:, t] = token
                if t + 1 < self.seq_len:
                    x = self.embed_tokens((torch.cat([token, token]) if guided else token)[:, None], offset=t)
            return self.unflatten(seq)
        finally:
            self.train(was_training)

    def sampling_cost(self, cfg: float) -> dict[str, int]:
        """Forward passes per sampled batch (one per token, the first one the class prefill) and the rows each
        pass runs, as a multiple of the batch size (2 under CFG: conditional + null-class rows)."""
        return {"passes": self.seq_len, "rows_per_pass_factor": 2 if cfg != 1.0 else 1}

    def network_evaluations(self, cfg: float) -> int:
        """Forward passes per sampled batch: N = h·w·D, whatever the CFG (see `sampling_cost` for the rows)."""
        return self.seq_len
