"""RasterGenerator (LlamaGen) and the shared nn layers it is built from."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arvision.generators import IncompatibleTokenizer, RasterGenerator
from arvision.generators.sampling import classifier_free_guidance, top_p_filter, top_p_filter_llamagen
from arvision.nn import Attention, KVCache, apply_rope, causal_mask, grid_positions, rope_2d
from arvision.tokenizers.base import TokenSpec
from arvision.tokenizers.rvq import RVQTokenizer

VQ = TokenSpec(name="vq", kind="discrete", layout="grid", grid=(4, 4), dim=8, vocab_size=32, image_size=16,
               image_channels=1)
RVQ = TokenSpec(name="rvq", kind="discrete", layout="depth", grid=(2, 2), dim=8, vocab_size=16, depth=3,
                image_size=8, image_channels=1)
RVQ_PER_DEPTH = dataclasses.replace(RVQ, shared_codebook=False)
NUM_CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine their spin-waits cost ~100×."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rvq_tokenizer(spec: TokenSpec, seed: int = 0) -> RVQTokenizer:
    """A residual tokenizer whose spec is `spec` (the depth head reads its code vectors); EMA codebooks start
    N(0, 1), so the codes differ visibly."""
    torch.manual_seed(seed)
    return RVQTokenizer(image_size=spec.image_size, image_channels=spec.image_channels, ch=8, ch_mult=(1, 2, 2),
                        z_channels=8, vocab_size=spec.vocab_size, code_dim=spec.dim, depth=spec.depth,
                        shared_codebook=spec.shared_codebook, ema=True, restart_unused=True).eval()


def make(spec: TokenSpec = VQ, *, kv_heads: int | None = None, seed: int = 0, **kwargs) -> RasterGenerator:
    torch.manual_seed(seed)
    model = RasterGenerator(spec=spec, num_classes=NUM_CLASSES, dim=32, depth=2, heads=4, kv_heads=kv_heads,
                            **kwargs)
    head = model.depth_head.output if model.depth_mode == "head" else model.output
    torch.nn.init.normal_(head.weight, std=0.5)  # the zero-initialised head would make every logit equal
    if spec.layout == "depth":
        model.attach_tokenizer(rvq_tokenizer(spec, seed))
    return model.eval()


def batch(spec: TokenSpec = VQ, b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (b, *spec.grid) + ((spec.depth,) if spec.layout == "depth" else ())
    assert spec.vocab_size is not None
    return (torch.randint(0, spec.vocab_size, shape, generator=gen),
            torch.randint(0, NUM_CLASSES, (b,), generator=gen))


@functools.cache
def shared(kv_heads: int | None = None) -> RasterGenerator:
    """One eval-mode model per GQA setting, reused by the read-only tests."""
    return make(kv_heads=kv_heads)


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
@pytest.mark.parametrize("chunks", [[1] * 16, [5, 1, 3, 1, 6]])
def test_cached_decoding_matches_teacher_forcing(kv_heads: int | None, chunks: list[int]) -> None:
    """Feeding the same tokens through the KV cache (a prefill, then chunks) gives the teacher-forced logits."""
    model = shared(kv_heads)
    tokens, labels = batch()
    full = model(tokens, labels)
    assert full.shape == (3, 16, 32)
    with torch.no_grad():
        seq = model.flatten(tokens)
        x = torch.cat([model.cls_embedding(labels)[:, None], model.embed_tokens(seq[:, :-1])], dim=1)
        caches, pieces, start = model.new_caches(), [], 0
        for n in chunks:
            pieces.append(model.decode(x[:, start:start + n], start=start, caches=caches))
            start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@settings(max_examples=15, deadline=None)
@given(j=st.integers(0, 15))
def test_causal(j: int) -> None:
    model = shared(2)
    tokens, labels = batch()
    changed = tokens.clone().flatten(1)
    changed[:, j] = (changed[:, j] + 1) % 32
    with torch.no_grad():
        a, b = model(tokens, labels), model(changed.view_as(tokens), labels)
    torch.testing.assert_close(a[:, :j + 1], b[:, :j + 1], atol=1e-6, rtol=0)
    if j < 15:
        assert not torch.allclose(a[:, j + 1], b[:, j + 1])  # token j does reach the next position


def test_rope_zeroes_class_slot() -> None:
    model = shared()
    assert model.rope.shape == (1 + 16, 4, 2)
    assert torch.all(model.rope[0] == 0)
    q = torch.randn(2, 4, 17, 8)
    rotated = apply_rope(q, model.rope)
    assert torch.all(rotated[:, :, 0] == 0)
    assert rotated[:, :, 1:].abs().sum() > 0
    torch.testing.assert_close(rotated[:, :, 1], q[:, :, 1])  # grid position (0, 0) is the identity rotation


@settings(max_examples=25, deadline=None)
@given(pos=st.lists(st.integers(0, 20), min_size=6, max_size=6))
def test_rope_depends_only_on_offset(pos: list[int]) -> None:
    r1, c1, r2, c2, dr, dc = pos
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=gen, dtype=torch.float64), torch.randn(16, generator=gen, dtype=torch.float64)

    def score(p: tuple[int, int], s: tuple[int, int]) -> torch.Tensor:
        table = rope_2d(torch.tensor([p, s]), 16).double()
        return apply_rope(q, table[0]) @ apply_rope(k, table[1])

    # the table is fp32 (as LlamaGen's), so allow its rounding at large angles
    torch.testing.assert_close(score((r1, c1), (r2, c2)), score((r1 + dr, c1 + dc), (r2 + dr, c2 + dc)),
                               atol=1e-5, rtol=1e-5)
    # and each axis matters on its own: a one-step offset along either changes the score
    same = score((r1, c1), (r1, c1))
    assert not torch.allclose(score((r1, c1), (r1 + 1, c1)), same)
    assert not torch.allclose(score((r1, c1), (r1, c1 + 1)), same)


def test_rope_matches_llamagen_layout() -> None:
    """First half of the channel pairs turns with the row, second half with the column; freq base^(-2j/(d/2))."""
    table = rope_2d(grid_positions(3, 3), 8, base=100.0)
    angles = torch.atan2(table[..., 1], table[..., 0])  # (9, 4)
    rows, cols = grid_positions(3, 3).unbind(-1)
    freqs = torch.tensor([1.0, 100.0 ** -0.5])
    torch.testing.assert_close(angles, torch.cat([torch.outer(rows, freqs), torch.outer(cols, freqs)], -1))


def test_attention_mask_equals_is_causal_and_cache_rejects_overflow() -> None:
    torch.manual_seed(0)
    attn = Attention(32, 4, kv_heads=2).eval()
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(attn(x, attn_mask=causal_mask(6, 6)), attn(x, is_causal=True))
    cache = KVCache(6)
    attn(x[:, :4], cache=cache, is_causal=True)
    with pytest.raises(ValueError, match="overflow"):
        attn(x[:, :3], cache=cache, is_causal=True)


def test_loss_decreases_when_overfitting() -> None:
    torch.manual_seed(0)
    model = RasterGenerator(spec=VQ, num_classes=NUM_CLASSES, dim=32, depth=2, heads=4, kv_heads=2).train()
    tokens, labels = batch(b=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = model.loss(tokens, labels)
        assert set(out) >= {"loss", "accuracy"}
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(32.0)).item(), abs=1e-4)  # zero head: uniform
    assert losses[-1] < 0.5 * losses[0]


def test_label_dropout_rate() -> None:
    model = make(class_dropout=0.25)
    labels = torch.randint(0, NUM_CLASSES, (20000,), generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(0)
    dropped = model.cls_embedding.drop(labels)
    is_null = dropped == NUM_CLASSES
    assert abs(is_null.float().mean().item() - 0.25) < 0.015
    assert torch.equal(dropped[~is_null], labels[~is_null])
    model.eval()
    assert torch.equal(model.cls_embedding.drop(labels), labels)
    assert model.cls_embedding.embedding_table.num_embeddings == NUM_CLASSES + 1


def test_sampling_is_seeded() -> None:
    model = shared(2).train()  # sample must switch to eval and back
    labels = torch.tensor([0, 1, 2, 3])
    draw = lambda seed, cfg: model.sample(labels, cfg=cfg, generator=torch.Generator().manual_seed(seed))
    for cfg in (1.0, 3.0):
        a = draw(0, cfg)
        assert a.shape == (4, 4, 4) and a.dtype == torch.long
        assert torch.equal(a, draw(0, cfg))
        assert not torch.equal(a, draw(1, cfg))
    assert model.training
    model.eval()


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_sampling_passes_and_rows(cfg: float) -> None:
    model = shared()
    rows: list[int] = []
    hook = model.output.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    try:
        model.sample(torch.arange(3), cfg=cfg, generator=torch.Generator().manual_seed(0), top_k=8, top_p=0.9)
    finally:
        hook.remove()
    factor = 2 if cfg != 1.0 else 1
    assert rows == [3 * factor] * 16
    assert model.sampling_cost(cfg=cfg, top_k=8).to_dict() == {"passes": 16, "backbone_passes": 16, "head_passes": 0,
                                                               "rows_per_pass_factor": factor}


def test_cfg_interval_and_greedy() -> None:
    model = shared()
    labels = torch.arange(2)
    greedy = lambda **kw: model.sample(labels, temperature=0.0, **kw)
    # guiding every token differs from the conditional model at a strong scale; cfg_interval past the last
    # token guides every token
    assert not torch.equal(greedy(cfg=4.0), greedy(cfg=1.0))
    assert torch.equal(greedy(cfg=4.0, cfg_interval=14), greedy(cfg=4.0))
    assert not torch.equal(greedy(cfg=4.0, cfg_interval=13), greedy(cfg=4.0))


@pytest.mark.parametrize("cfg_interval", [-1, 0, 1, 3, 13, 14, 40])
def test_cfg_interval_guides_the_tokens_llamagen_guides(cfg_interval: int) -> None:
    """LlamaGen's generate guides token 0 in its prefill, then decode step i (token i + 1) while i ≤ cfg_interval:
    tokens 0 … cfg_interval + 1. Checked on the greedy sequence itself: teacher-forced on it, each token must be
    the argmax of the guided logits where LlamaGen guides and of the conditional logits after."""
    model, cfg = shared(), 4.0
    labels = torch.arange(3)
    tokens = model.sample(labels, cfg=cfg, cfg_interval=cfg_interval, temperature=0.0)
    with torch.no_grad():
        cond = model(tokens, labels)
        uncond = model(tokens, torch.full_like(labels, NUM_CLASSES))
    n = cond.shape[1]
    guided = torch.tensor([cfg_interval < 0 or t <= cfg_interval + 1 for t in range(n)])
    expected = torch.where(guided[None, :], classifier_free_guidance(cond, uncond, cfg).argmax(-1), cond.argmax(-1))
    assert torch.equal(tokens.flatten(1), expected)
    # and the guided count is one the rule tells apart from its neighbours (the greedy argmaxes differ there)
    if 0 <= cfg_interval < n - 2:
        t = cfg_interval + 2  # the first unguided token
        assert not torch.equal(classifier_free_guidance(cond, uncond, cfg)[:, t].argmax(-1), cond[:, t].argmax(-1))


def test_cfg_interval_counts_guided_draws(monkeypatch) -> None:
    """The number of CFG combinations per run: every token, or cfg_interval + 2 of them (also when editing)."""
    import arvision.generators.raster as raster

    calls: list[int] = []
    original = raster.classifier_free_guidance
    monkeypatch.setattr(raster, "classifier_free_guidance", lambda c, u, s: calls.append(1) or original(c, u, s))
    model, labels = shared(), torch.arange(2)
    tokens = torch.zeros(2, 4, 4, dtype=torch.long)
    nothing_known = torch.zeros(2, 4, 4, dtype=torch.bool)
    for cfg_interval, expected in ((-1, 16), (0, 2), (5, 7), (14, 16), (99, 16)):
        for run in (lambda: model.sample(labels, cfg=3.0, cfg_interval=cfg_interval, top_k=5),
                    lambda: model.edit(labels, tokens, nothing_known, cfg=3.0, cfg_interval=cfg_interval)):
            calls.clear()
            run()
            assert len(calls) == expected, cfg_interval


def test_top_p_keeps_llamagen_boundary_token() -> None:
    """LlamaGen keeps a token while the mass before it is ≤ p: four equal logits at p = 0.5 keep three (the third
    has exactly 0.5 before it); the smallest-prefix rule of `top_p_filter` keeps two. The raster sampler draws
    with LlamaGen's rule."""
    logits = torch.zeros(1, 4)
    assert int(top_p_filter_llamagen(logits, 0.5).isfinite().sum()) == 3
    assert int(top_p_filter(logits, 0.5).isfinite().sum()) == 2
    assert torch.equal(top_p_filter_llamagen(logits, 1.0), logits)
    spread = torch.randn(64, 100, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.1, 0.5, 0.9):  # elsewhere the two rules agree
        assert torch.equal(top_p_filter_llamagen(spread, p).isfinite(), top_p_filter(spread, p).isfinite())
    model = make(VQ, seed=3)
    with torch.no_grad():
        torch.nn.init.zeros_(model.output.weight)  # every logit equal: p = 0.5 keeps 17 of the 32 codes (16 before)
    drawn = model.sample(torch.zeros(400, dtype=torch.long), top_p=0.5, generator=torch.Generator().manual_seed(1))
    assert drawn.unique().numel() == 17


def test_incompatible_tokenizers() -> None:
    vae = TokenSpec(name="vae", kind="continuous", layout="grid", grid=(4, 4), dim=4)
    with pytest.raises(IncompatibleTokenizer) as err:
        RasterGenerator(spec=vae, num_classes=NUM_CLASSES, dim=32, depth=1, heads=4)
    assert str(err.value) == ("raster needs a discrete grid or residual tokenizer (tokenizer=vq or tokenizer=rvq); "
                              "got tokenizer=vae")
    msvq = TokenSpec(name="msvq", kind="discrete", layout="scales", grid=(4, 4), dim=8, vocab_size=32,
                     scales=(1, 2, 4))
    with pytest.raises(IncompatibleTokenizer, match="got tokenizer=msvq"):
        RasterGenerator(spec=msvq, num_classes=NUM_CLASSES, dim=32, depth=1, heads=4)


def test_depth_layout_trains_and_samples() -> None:
    model = make(RVQ).train()
    tokens, labels = batch(RVQ)
    out = model.loss(tokens, labels)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.depth_embeddings is not None and model.depth_embeddings.weight.grad is not None
    assert model(tokens, labels).shape == (3, 12, 16)
    # the three levels of a position share its RoPE position
    torch.testing.assert_close(model.rope[1:4], model.rope[1:2].expand(3, -1, -1))
    samples = model.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 2, 2, 3)
    assert samples.min() >= 0 and samples.max() < 16
    model.eval()
    # the cache path agrees with teacher forcing here too
    seq = model.flatten(tokens)
    with torch.no_grad():
        x = torch.cat([model.cls_embedding(labels)[:, None], model.embed_tokens(seq[:, :-1])], dim=1)
        caches = model.new_caches()
        stepped = torch.cat([model.decode(x[:, t:t + 1], start=t, caches=caches) for t in range(12)], dim=1)
    torch.testing.assert_close(stepped, model(tokens, labels), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec, cfg, depth_mode", [(VQ, 1.0, "flatten"), (VQ, 3.0, "flatten"), (RVQ, 3.0, "flatten"),
                                                   (RVQ, 1.0, "head"), (RVQ, 3.0, "head"),
                                                   (RVQ_PER_DEPTH, 3.0, "flatten"), (RVQ_PER_DEPTH, 3.0, "head")])
def test_greedy_sampling_matches_recomputing_every_prefix(spec: TokenSpec, cfg: float, depth_mode: str) -> None:
    """The cached sampling loop picks what a cache-free model would, token by token (CFG and depth included)."""
    model = shared() if spec is VQ else make(spec, depth_mode=depth_mode)
    labels = torch.tensor([1, 7])
    null = torch.full_like(labels, NUM_CLASSES)
    tokens = torch.zeros(2, *spec.grid, spec.depth, dtype=torch.long)  # (B, h, w, D), D = 1 for a grid
    with torch.no_grad():
        for i in range(spec.grid[0]):
            for j in range(spec.grid[1]):
                for d in range(spec.depth):
                    view = tokens if spec.layout == "depth" else tokens[..., 0]
                    def logits_at(lab):  # the logits of code (i, j, d), whichever layout the model outputs
                        out = model(view, lab)
                        if depth_mode == "head":
                            return out[:, i * spec.grid[1] + j, d]
                        return out[:, (i * spec.grid[1] + j) * spec.depth + d]
                    logits = logits_at(labels)
                    if cfg != 1.0:
                        logits = classifier_free_guidance(logits, logits_at(null), cfg)
                    tokens[:, i, j, d] = logits.argmax(-1)
    expected = tokens if spec.layout == "depth" else tokens[..., 0]
    torch.testing.assert_close(model.sample(labels, cfg=cfg, temperature=0.0), expected)


def test_depth_head_is_causal_over_positions_then_depths() -> None:
    """Code (t, d) is predicted from positions < t and codes < d of position t: changing code (t, d) leaves the
    logits of every code up to and including (t, d) unchanged and changes some later one."""
    model = make(RVQ, depth_mode="head")
    tokens, labels = batch(RVQ)
    with torch.no_grad():
        base = model(tokens, labels)
        assert base.shape == (3, 4, 3, 16)
        for t in range(4):
            for d in range(3):
                changed = tokens.clone()
                i, j = divmod(t, 2)
                changed[:, i, j, d] = (changed[:, i, j, d] + 1) % 16
                out = model(changed, labels)
                flat_base, flat_out = base.reshape(3, 12, 16), out.reshape(3, 12, 16)
                k = t * 3 + d
                torch.testing.assert_close(flat_out[:, :k + 1], flat_base[:, :k + 1])
                if k < 11:
                    assert not torch.allclose(flat_out[:, k + 1:], flat_base[:, k + 1:])


@pytest.mark.parametrize("code_embeddings", ["tokenizer", "learned"])
def test_depth_head_trains_and_counts_its_passes(code_embeddings: str) -> None:
    model = make(RVQ, depth_mode="head", code_embeddings=code_embeddings).train()
    tokens, labels = batch(RVQ)
    out = model.loss(tokens, labels)
    out["loss"].backward()
    assert model.depth_embeddings is None
    if code_embeddings == "learned":
        assert model.depth_head.tok_embeddings.weight.grad is not None
        assert model.tok_embeddings.weight.grad.abs().sum() > 0  # the spatial input is the sum of a position's codes
    else:  # the linear maps on the frozen code vectors learn; the tokenizer's codebook does not
        assert model.code_proj.weight.grad.abs().sum() > 0 and model.depth_head.code_proj.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.tokenizer_on("cpu").parameters())
    assert model.seq_len == 4 and model.rope.shape[0] == 4 + 1  # + the class slot
    assert model.sampling_cost(cfg=2.0).to_dict() == {"passes": 4 + 12, "backbone_passes": 4, "head_passes": 12,
                                                      "rows_per_pass_factor": 2}
    # on a grid tokenizer a depth head is moot: the model is the plain raster model
    assert make(VQ, depth_mode="head").depth_mode == "flatten"


@pytest.mark.parametrize("depth_mode", ["flatten", "head"])
def test_per_depth_codebooks_give_each_depth_its_own_code_embeddings(depth_mode: str) -> None:
    """With one codebook per depth, code k at depth d and code k at depth d′ are different codes: the model reads
    row d·vocab + k, so editing depth 1's row for k moves the output only where a depth-1 code is k."""
    model = make(RVQ_PER_DEPTH, depth_mode=depth_mode, code_embeddings="learned")
    vocab, levels = RVQ.vocab_size, RVQ.depth
    assert model.tok_embeddings.num_embeddings == vocab * levels
    if depth_mode == "head":
        assert model.depth_head.tok_embeddings.num_embeddings == vocab * levels
    shared_book = make(RVQ, depth_mode=depth_mode, code_embeddings="learned")
    assert shared_book.tok_embeddings.num_embeddings == vocab  # shared: one table
    tokens = torch.zeros(2, *RVQ.grid, levels, dtype=torch.long)
    tokens[0, :, :, 1] = 5  # sample 0 holds code 5 at depth 1; sample 1 holds code 5 nowhere
    labels = torch.tensor([3, 3])
    with torch.no_grad():
        base = model(tokens, labels)
        tables = [model.tok_embeddings] + ([model.depth_head.tok_embeddings] if depth_mode == "head" else [])
        for table in tables:
            table.weight[1 * vocab + 5] += 1.0  # depth 1, code 5
        out = model(tokens, labels)
        assert not torch.allclose(out[0], base[0])
        torch.testing.assert_close(out[1], base[1])
        for table in tables:  # move the edit to depth 0's code 5: sample 0 (5 only at depth 1) no longer sees it
            table.weight[1 * vocab + 5] -= 1.0
            table.weight[0 * vocab + 5] += 1.0
        torch.testing.assert_close(model(tokens, labels), base)


# --- the RQ-Transformer's depth head: code embeddings from the tokenizer, soft targets, GPT-2 blocks -------------

def rq_model(**kwargs) -> RasterGenerator:
    """The RQ-Transformer's configuration at test size (GPT-2 blocks, learned positions, no null class)."""
    kwargs = {"depth_mode": "head", "block": "gpt2", "positions": "learned", "null_class": False,
              "class_dropout": 0.0, **kwargs}
    model = make(RVQ, **kwargs)
    with torch.no_grad():  # move the zero-initialised biases and positions so that every term shows
        for name, param in model.named_parameters():
            if param.ndim == 1 or "pos_embeddings" in name:
                param.add_(0.1 * torch.randn(param.shape))
    return model


def test_code_embeddings_are_rq_input_mlp_per_depth_and_head_mlp_after_the_sum() -> None:
    """The spatial input of a position is Σ_d (W v_d + b) (RQ's input_mlp on each depth, then the sum); the depth
    head's input after d known codes is W′ (v_1 + … + v_d) + b′ (head_mlp on the cumulative sum), v the tokenizer's
    frozen code vectors."""
    model = rq_model()
    tokens, labels = batch(RVQ, b=2)
    books = model.tokenizer_on("cpu").quantize
    seq = model.flatten(tokens)  # (B, 4 positions, 3 depths)
    vectors = torch.stack([books.book(d).weight[seq[..., d]] for d in range(3)], dim=2)
    W, b = model.code_proj.weight, model.code_proj.bias
    with torch.no_grad():
        expected = sum(vectors[:, :, d] @ W.t() + b for d in range(3))
        torch.testing.assert_close(model.embed_tokens(seq), expected, atol=1e-6, rtol=0)
        context = torch.randn(8, 32)
        head_in = model.depth_head.inputs(context, model.head_vectors(seq[..., :2].reshape(8, 2)))
        Wh, bh = model.depth_head.code_proj.weight, model.depth_head.code_proj.bias
        flat = vectors[:, :, :2].reshape(8, 2, 8)
        torch.testing.assert_close(head_in[:, 0], context)
        torch.testing.assert_close(head_in[:, 1], flat[:, 0] @ Wh.t() + bh, atol=1e-6, rtol=0)
        torch.testing.assert_close(head_in[:, 2], (flat[:, 0] + flat[:, 1]) @ Wh.t() + bh, atol=1e-6, rtol=0)
    # the codebook is read, not owned: changing it changes the logits; the model has no embedding table
    assert "tok_embeddings" not in dict(model.named_children())
    with torch.no_grad():
        before = model(tokens, labels)
        books.embedding.weight.mul_(2)
        assert not torch.allclose(model(tokens, labels), before)


def test_gpt2_blocks_and_learned_positions_follow_the_rq_transformer() -> None:
    model = rq_model()
    names = dict(model.named_parameters())
    assert model.rope is None and names["pos_embeddings"].shape == (4 + 1, 32)  # class slot + 4 positions
    assert isinstance(model.norm, torch.nn.Identity)  # the head reads the raw spatial output
    assert names["layers.0.attention.wqkv.bias"].shape == (96,) and names["layers.0.feed_forward.fc1.weight"].shape \
        == (128, 32)  # q|k|v biases, 4× GELU MLP
    assert names["depth_head.output.bias"].shape == (16,) and isinstance(model.depth_head.norm, torch.nn.LayerNorm)
    assert names["cls_embedding.embedding_table.weight"].shape == (NUM_CLASSES, 32)  # no null row
    # slot s adds row s: the class slot row 0, the token of position p row p + 1
    tokens, labels = batch(RVQ, b=2)
    with torch.no_grad():
        base = model(tokens, labels)
        model.pos_embeddings[2] += torch.randn(32)  # the slot of position 1's codes, which predicts position 2
        moved = model(tokens, labels)
    torch.testing.assert_close(moved[:, :2], base[:, :2])
    assert not torch.allclose(moved[:, 2:], base[:, 2:])
    with pytest.raises(ValueError, match="needs a null class"):
        model.sample(labels, cfg=2.0)
    with pytest.raises(ValueError, match="class dropout"):
        RasterGenerator(spec=RVQ, num_classes=NUM_CLASSES, null_class=False, class_dropout=0.1)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_rq_transformer_cached_sampling_matches_recomputing_every_prefix(decode: str) -> None:
    model = rq_model()
    labels = torch.tensor([1, 7])
    tokens = torch.zeros(2, *RVQ.grid, RVQ.depth, dtype=torch.long)
    with torch.no_grad():
        for t in range(4):
            for d in range(3):
                i, j = divmod(t, 2)
                tokens[:, i, j, d] = model(tokens, labels)[:, t, d].argmax(-1)
    torch.testing.assert_close(model.sample(labels, temperature=0.0, decode=decode), tokens)


def test_soft_targets_train_on_stochastic_codes_against_rq_vae_soft_codes() -> None:
    """Given latents, the loss draws codes from RQ-VAE's soft codes at temperature T (the global RNG, as
    torch.multinomial in the official code), teacher-forces on them and takes the cross-entropy against the soft
    codes; the targets are distributions (sum 1) and the gradient reaches the linear maps, not the codebook."""
    model = rq_model(soft_targets=0.5).train()
    tokenizer = model.tokenizer_on("cpu")
    images, labels = torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([2, 5])
    latents = model.encode(images)
    assert latents.is_floating_point() and latents.shape == (2, 8, 2, 2)
    torch.manual_seed(3)
    out = model.loss(latents, labels)
    torch.manual_seed(3)
    soft, codes = tokenizer.soft_codes(latents, temperature=0.5)
    torch.testing.assert_close(soft.sum(-1), torch.ones(2, 2, 2, 3))
    model.eval()  # the same dropout-free forward for the comparison
    expected = -(soft.flatten(1, 2) * model(codes, labels).log_softmax(-1)).sum(-1).mean()
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model.loss(latents, labels)["loss"], expected)
    out["loss"].backward()
    assert model.code_proj.weight.grad.abs().sum() > 0 and model.depth_head.code_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tokenizer.parameters())
    # another seed draws other codes (stochastic), and stochastic_codes=False uses the argmin codes
    torch.manual_seed(4)
    assert not torch.equal(tokenizer.soft_codes(latents, temperature=0.5)[1], codes)
    argmin = rq_model(soft_targets=0.5, stochastic_codes=False).eval()
    argmin.attach_tokenizer(tokenizer)
    soft, _ = tokenizer.soft_codes(latents, temperature=0.5, stochastic=False)
    with torch.no_grad():
        expected = -(soft.flatten(1, 2) * argmin(tokenizer.quantize(latents)[1], labels).log_softmax(-1)).sum(-1).mean()
        torch.testing.assert_close(argmin.loss(latents, labels)["loss"], expected)


def test_token_encoding_is_the_latents_with_soft_targets_else_the_tokens() -> None:
    tokenizer = rvq_tokenizer(RVQ)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    soft = RasterGenerator.token_encoding(tokenizer, {"depth_mode": "head"})  # the RQ-Transformer's default
    assert soft.name == "rq_latents" and torch.equal(soft.encode(images), tokenizer.latents(images))
    for model in ({"depth_mode": "head", "soft_targets": 0.0}, {"depth_mode": "flatten"}, {}):
        encoding = RasterGenerator.token_encoding(tokenizer, model)
        assert encoding.name == "" and torch.equal(encoding.encode(images), tokenizer.encode(images))
    hard = make(RVQ, depth_mode="head", soft_targets=0.0)
    assert torch.equal(hard.encode(images), tokenizer.encode(images))
    with pytest.raises(ValueError, match="soft_targets=0"):
        hard.loss(tokenizer.latents(images), torch.tensor([0, 1]))


def test_editing_takes_the_latents_encode_gives() -> None:
    """With soft targets `encode` gives latents; `edit` reads their (argmin) codes as the known tokens."""
    model = rq_model()
    images, labels = torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([2, 5])
    known = torch.ones(2, 2, 2, dtype=torch.bool)
    known[:, 1, 1] = False
    tokens = model.tokenizer_on("cpu").encode(images)
    from_latents = model.edit(labels, model.encode(images), known, temperature=0.0)
    torch.testing.assert_close(from_latents, model.edit(labels, tokens, known, temperature=0.0))
    assert torch.equal(from_latents[:, 0], tokens[:, 0]) and torch.equal(from_latents[:, 1, 0], tokens[:, 1, 0])


def test_depth_head_options_are_checked() -> None:
    for key, value in (("block", "gpt3"), ("positions", "alibi"), ("code_embeddings", "frozen")):
        with pytest.raises(ValueError, match=key):
            RasterGenerator(spec=RVQ, num_classes=NUM_CLASSES, depth_mode="head", **{key: value})
    with pytest.raises(ValueError, match="soft_targets"):
        RasterGenerator(spec=RVQ, num_classes=NUM_CLASSES, depth_mode="head", soft_targets=-1.0)
    with pytest.raises(ValueError, match="top_p_rule"):
        shared().sample(torch.tensor([1]), top_p=0.9, top_p_rule="nucleus")
    vq_tokens_only = make(RVQ, depth_mode="head")
    vq_tokens_only._frozen = None  # no tokenizer attached: the code vectors cannot be read
    with pytest.raises(RuntimeError, match="attach_tokenizer"):
        vq_tokens_only(*batch(RVQ))
