"""Residual-VQ tokenizer: residual maths, losses, EMA and restarts, per-depth stats, shapes, training."""

import math
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from arvision.metrics import CodebookUsage
from arvision.tokenizers.quantize import VectorQuantizer
from arvision.tokenizers.rvq import ResidualQuantizer, RVQTokenizer, usage_per_depth


def tiny_tokenizer(**kw) -> RVQTokenizer:
    args = dict(image_size=16, image_channels=1, ch=8, ch_mult=(1, 2, 2), z_channels=8, vocab_size=32, code_dim=4,
                depth=3)
    args.update(kw)
    return RVQTokenizer(**args)


def quantizer_with(codebook: torch.Tensor, depth: int, **kw) -> ResidualQuantizer:
    """A quantiser whose codebooks are `codebook`, in the state RQ-VAE starts from (EMA counts 0, sums = codes)."""
    q = ResidualQuantizer(vocab_size=codebook.shape[0], dim=codebook.shape[1], depth=depth, **kw)
    with torch.no_grad():
        for d in range(q.num_codebooks):
            q.book(d).weight.copy_(codebook)
            if q.ema:
                q.ema_embed_sum[d].copy_(codebook)
    return q.eval()


def as_map(z: torch.Tensor) -> torch.Tensor:
    """Rows (N, dim) → a (1, dim, N, 1) latent map, the quantiser's input layout."""
    return z.t()[None, :, :, None]


def partial_sum_errors(q: ResidualQuantizer, z: torch.Tensor) -> torch.Tensor:
    """‖z − Σ_{i≤d} e_i‖ per row, for d = 0 … D → (D + 1, N)."""
    _, indices, _ = q(as_map(z))
    errors = [z.norm(dim=1)]
    for d in range(1, q.depth + 1):
        errors.append((as_map(z) - q.lookup(indices[..., :d])).squeeze(0).squeeze(-1).norm(dim=0))
    return torch.stack(errors)


def distance_to_nearest(x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Exact (not matmul-based, as cdist on many rows) distance from each row of x to its nearest candidate."""
    return (x[:, None] - candidates[None]).norm(dim=-1).min(dim=1).values


# --- residual quantisation -----------------------------------------------------------------------------------------

@given(st.integers(1, 30), st.integers(2, 12), st.integers(1, 5), st.integers(1, 5), st.floats(0.05, 3.0),
       st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_error_never_grows_with_depth_when_the_codebook_holds_zero(n, k, dim, depth, scale, seed):
    # The zero code is always a candidate, so the next residual is at most as long as the current one:
    # ‖r_d‖ = min_k ‖r_{d−1} − e_k‖ ≤ ‖r_{d−1} − 0‖. And ‖z − Σ_{i≤d} e_i‖ is exactly ‖r_d‖.
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=g) * scale
    codebook = torch.cat([torch.zeros(1, dim), torch.randn(k - 1, dim, generator=g)])
    errors = partial_sum_errors(quantizer_with(codebook, depth), z)
    assert (errors[1:] <= errors[:-1] + 1e-5).all()


def test_without_a_zero_code_the_error_can_grow():
    # 1-d codebook {1, 3}, z = 1.2: depth 1 leaves 0.2, whose nearest code 1 overshoots to −0.8.
    errors = partial_sum_errors(quantizer_with(torch.tensor([[1.0], [3.0]]), depth=2), torch.tensor([[1.2]]))
    assert torch.allclose(errors.squeeze(1), torch.tensor([1.2, 0.2, 0.8]), atol=1e-6)


def test_each_depth_picks_the_nearest_code_to_its_residual():
    g = torch.Generator().manual_seed(0)
    z, codebooks = torch.randn(20, 3, generator=g), torch.randn(3, 10, 3, generator=g)
    q = quantizer_with(codebooks[0], depth=3, shared_codebook=False)
    with torch.no_grad():
        for d in range(3):
            q.book(d).weight.copy_(codebooks[d])
    _, indices, _ = q(as_map(z))
    indices = indices.reshape(20, 3)
    residual = z
    for d in range(3):
        expected = torch.cdist(residual, codebooks[d]).argmin(1)
        assert torch.equal(indices[:, d], expected)
        residual = residual - codebooks[d][expected]


@given(st.integers(1, 5), st.integers(2, 40), st.integers(0, 10_000))
@settings(max_examples=20, deadline=None)
def test_depth_one_is_plain_vq(dim, k, seed):
    torch.manual_seed(seed)
    vq = VectorQuantizer(vocab_size=k, dim=dim, l2_norm=False)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    rq = quantizer_with(vq.embedding.weight.detach(), depth=1)
    z = torch.randn(2, dim, 3, 4)
    vq_q, vq_idx, vq_terms = vq(z)
    rq_q, rq_idx, rq_terms = rq(z)
    assert torch.equal(rq_idx[..., 0], vq_idx) and rq_idx.shape == (2, 3, 4, 1)
    assert torch.allclose(rq_q, vq_q, atol=1e-6)
    for key in ("commit_loss", "codebook_loss", "usage", "perplexity"):
        assert torch.allclose(rq_terms[key], vq_terms[key], atol=1e-6), key


@pytest.mark.parametrize("shared", [True, False])
def test_lookup_equals_the_quantised_forward_value(shared):
    tok = tiny_tokenizer(shared_codebook=shared).eval()
    with torch.no_grad():  # codes of a trained scale, so that every depth matters
        for d in range(tok.quantize.num_codebooks):
            tok.quantize.book(d).weight.normal_(std=0.5)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    z_q, indices, _ = tok.quantize_images(images)
    assert torch.allclose(tok.lookup(indices), z_q, atol=1e-5)
    assert torch.allclose(tok.decode(tok.encode(images)), tok(images)["recon"].clamp(-1, 1), atol=1e-5)
    # The sum runs over each depth's own codebook.
    manual = sum(tok.quantize.book(d).weight[indices[..., d]] for d in range(3)).permute(0, 3, 1, 2)
    assert torch.allclose(tok.lookup(indices), manual, atol=1e-6)


def test_losses_follow_their_definitions():
    torch.manual_seed(0)
    codebook = torch.randn(8, 3)
    q = quantizer_with(codebook, depth=3, beta=0.25)
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    _, indices, terms = q(z)
    partial_sums = [q.lookup(indices[..., :d]) for d in range(1, 4)]
    mean_sq = torch.stack([((z - s) ** 2).mean() for s in partial_sums]).mean()
    assert torch.allclose(terms["commit_loss"], 0.25 * mean_sq)
    assert torch.allclose(terms["codebook_loss"], mean_sq)
    # The commitment loss moves only z; the codebook loss moves only the codes.
    terms["commit_loss"].backward(retain_graph=True)
    assert z.grad.abs().sum() > 0 and q.embedding.weight.grad is None
    z.grad = None
    terms["codebook_loss"].backward()
    assert z.grad is None and q.embedding.weight.grad.abs().sum() > 0


def test_straight_through_gradient_reaches_the_encoder_and_codebook_gets_its_own():
    tok = tiny_tokenizer()
    out = tok(torch.rand(2, 1, 16, 16) * 2 - 1)
    out["recon_loss"].backward(retain_graph=True)
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.quantize.embedding.weight.grad is None  # straight-through skips the codebook
    tok.zero_grad()
    out["codebook_loss"].backward()
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0
    assert tok.encoder.conv_in.weight.grad is None


# --- EMA and restarts ----------------------------------------------------------------------------------------------

def test_ema_codebook_is_not_learned_by_gradient():
    tok = tiny_tokenizer(ema=True)
    out = tok(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert "codebook_loss" not in out and not tok.quantize.embedding.weight.requires_grad
    out["loss"].backward()
    assert tok.quantize.embedding.weight.grad is None
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p is not tok.quantize.embedding.weight for p in tok.parameters() if p.requires_grad)


def test_ema_with_no_memory_sets_each_used_code_to_its_residual_mean():
    torch.manual_seed(0)
    codebook = torch.randn(6, 2)
    q = quantizer_with(codebook, depth=1, ema=True, ema_decay=0.0).train()
    z = torch.randn(200, 2)
    _, indices, _ = q(as_map(z))
    indices = indices.flatten()
    for k in indices.unique():
        # Laplace smoothing shifts cluster sizes by eps = 1e-5 only.
        assert torch.allclose(q.embedding.weight[k], z[indices == k].mean(0), rtol=1e-3, atol=1e-4)


def rq_vae_step(weight, size, embed, vectors, decay, eps=1e-5, restart=True):
    """RQ-VAE's VQEmbedding training update written out (one-hot counts and sums, the restart rule, Laplace
    smoothing); the restart candidates are drawn by the caller's RNG state as the official code draws them."""
    k = weight.shape[0]
    idx = torch.cdist(vectors, weight).argmin(1)
    one_hot = F.one_hot(idx, k).float().t()
    size = decay * size + (1 - decay) * one_hot.sum(1)
    embed = decay * embed + (1 - decay) * one_hot @ vectors
    if restart:
        n = vectors.shape[0]
        pool = vectors
        if n < k:
            pool = vectors.repeat((k + n - 1) // n, 1)
            pool = pool + torch.rand_like(pool) * (torch.full((vectors.shape[1],), 0.01) / math.sqrt(vectors.shape[1]))
        candidates = pool[torch.randperm(pool.shape[0])][:k]
        used = size >= 1
        embed = torch.where(used[:, None], embed, candidates)
        size = torch.where(used, size, torch.ones_like(size))
    n = size.sum()
    return embed / (n * (size + eps) / (n + k * eps))[:, None], size, embed, idx


@pytest.mark.parametrize("restart", [True, False])
def test_ema_step_is_rq_vae_update(restart):
    torch.manual_seed(0)
    codebook, z = torch.randn(16, 3), torch.randn(40, 3) * 2
    q = quantizer_with(codebook, depth=1, ema=True, ema_decay=0.9, restart_unused=restart).train()
    size, embed = torch.rand(16) * 3, torch.randn(16, 3)
    with torch.no_grad():
        q.ema_cluster_size[0].copy_(size)
        q.ema_embed_sum[0].copy_(embed)
    torch.manual_seed(1)
    _, indices, _ = q(as_map(z))
    torch.manual_seed(1)
    weight, size, embed, idx = rq_vae_step(codebook, size, embed, z, decay=0.9, restart=restart)
    assert torch.equal(indices.flatten(), idx)
    torch.testing.assert_close(q.ema_cluster_size[0], size)
    torch.testing.assert_close(q.ema_embed_sum[0], embed)
    torch.testing.assert_close(q.embedding.weight, weight)


def test_first_step_reseeds_every_code_used_fewer_than_100_times():
    """RQ-VAE's start: counts at 0 make a code's EMA count (1 − decay)·hits, below 1 unless it was hit 100 times."""
    torch.manual_seed(0)
    codebook = torch.stack([torch.zeros(2), *[torch.full((2,), 10.0 + k) for k in range(7)]])
    z = torch.cat([torch.randn(150, 2) * 0.1, torch.full((30, 2), 10.0) + torch.randn(30, 2) * 0.1])
    q = quantizer_with(codebook, depth=1, ema=True, ema_decay=0.99, restart_unused=True).train()
    _, indices, _ = q(as_map(z))
    hits = torch.bincount(indices.flatten(), minlength=8)
    assert hits[0] == 150 and hits[1] == 30  # code 1 is used, but fewer than 100 times
    size = q.ema_cluster_size[0]
    torch.testing.assert_close(size[0], torch.tensor(1.5))
    assert torch.equal(size[1:], torch.ones(7))  # every other code was re-seeded with count 1
    assert (distance_to_nearest(q.embedding.weight[1:], z) < 0.1).all()
    # code 0 keeps (0.99·e + 0.01·Σ) / count with its EMA count 1.5 (Laplace smoothing aside)
    expected = (0.99 * codebook[0] + 0.01 * z[:150].sum(0)) / 1.5
    torch.testing.assert_close(q.embedding.weight[0], expected, atol=1e-4, rtol=1e-3)


def test_shared_codebook_is_updated_after_each_depth():
    """Depth 2 is looked up in the codebook depth 1 has just updated (RQ-VAE's shared VQEmbedding), while each
    depth's own codes are those from before its update."""
    torch.manual_seed(0)
    codebook, z = torch.randn(12, 3), torch.randn(64, 3)
    q = quantizer_with(codebook, depth=2, ema=True, ema_decay=0.5, restart_unused=True).train()
    torch.manual_seed(1)
    z_q, indices, _ = q(as_map(z))
    indices = indices.reshape(64, 2)
    torch.manual_seed(1)
    after_first, size, embed, idx0 = rq_vae_step(codebook, torch.zeros(12), codebook.clone(), z, decay=0.5)
    residual = z - codebook[idx0]
    assert torch.equal(indices[:, 0], idx0)
    assert torch.equal(indices[:, 1], torch.cdist(residual, after_first).argmin(1))
    after_second, *_ = rq_vae_step(after_first, size, embed, residual, decay=0.5)
    torch.testing.assert_close(q.embedding.weight, after_second)
    # the quantised value sums the codes each depth saw: before depth 1's update, and after it
    torch.testing.assert_close(z_q.squeeze(-1).squeeze(0).t(), codebook[idx0] + after_first[indices[:, 1]])


# --- RQ-VAE's soft codes (the RQ-Transformer's targets) -----------------------------------------------------------

@pytest.mark.parametrize("shared", [True, False])
def test_soft_codes_are_softmax_of_negative_distances_along_the_drawn_residuals(shared):
    torch.manual_seed(0)
    tok = tiny_tokenizer(shared_codebook=shared, ema=True).eval()
    latents = torch.randn(2, 4, 2, 3)
    soft, codes = tok.soft_codes(latents, temperature=0.5, generator=torch.Generator().manual_seed(3))
    assert soft.shape == (2, 2, 3, 3, 32) and codes.shape == (2, 2, 3, 3)
    torch.testing.assert_close(soft.sum(-1), torch.ones(2, 2, 3, 3))
    # RQ-VAE's formula, with exact (not matmul-expanded) distances, along the residuals of the drawn codes
    residual = latents.permute(0, 2, 3, 1)
    draws = torch.Generator().manual_seed(3)
    for d in range(3):
        book = tok.quantize.book(d).weight
        expected = torch.softmax(-((residual[..., None, :] - book) ** 2).sum(-1) / 0.5, dim=-1)
        torch.testing.assert_close(soft[..., d, :], expected, atol=1e-5, rtol=1e-4)
        drawn = torch.multinomial(soft[..., d, :].reshape(-1, 32), 1, generator=draws).reshape(2, 2, 3)
        assert torch.equal(codes[..., d], drawn)
        residual = residual - book[codes[..., d]]
    # without stochastic codes, the codes are the tokenizer's own (argmin) codes
    _, argmin_codes = tok.soft_codes(latents, temperature=0.5, stochastic=False)
    assert torch.equal(argmin_codes, tok.quantize(latents)[1])
    with pytest.raises(ValueError, match="temperature"):
        tok.soft_codes(latents, temperature=0.0)


def test_low_temperature_soft_codes_are_one_hot_codes():
    torch.manual_seed(0)
    tok = tiny_tokenizer(ema=True).eval()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    soft, codes = tok.soft_codes(tok.latents(images), temperature=1e-6)
    assert torch.equal(codes, tok.encode(images))
    assert torch.equal(soft.argmax(-1), codes) and (soft.max(-1).values > 0.999).all()


def test_eval_mode_and_encode_never_change_the_codebook():
    tok = tiny_tokenizer(ema=True, restart_unused=True)
    before = {k: v.clone() for k, v in tok.state_dict().items() if k.startswith("quantize")}
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    tok.encode(images)  # training mode, but encoding is read-only
    tok.eval()(images)
    assert all(torch.equal(v, tok.state_dict()[k]) for k, v in before.items())
    tok.train()(images)
    assert not torch.equal(before["quantize.embedding.weight"], tok.quantize.embedding.weight)


@pytest.mark.parametrize("ema", [False, True])
def test_restart_reseeds_only_dead_codes_and_only_in_training(ema):
    torch.manual_seed(0)
    codebook = torch.cat([torch.randn(4, 3) * 0.1, torch.full((4, 3), 100.0)])  # codes 4-7 are out of reach
    z = torch.randn(64, 3)
    # an EMA codebook is updated after each depth, so a code re-seeded at depth 1 may be used at depth 2: one depth
    depth = 1 if ema else 2
    q = quantizer_with(codebook, depth=depth, restart_unused=True, ema=ema, ema_decay=0.0 if ema else 0.99)
    q(as_map(z))
    assert torch.equal(q.embedding.weight, codebook)  # eval mode: untouched
    z_q, indices, terms = q.train()(as_map(z))
    weight = q.embedding.weight
    candidates = z if ema else torch.cat([z, z - codebook[indices.reshape(-1, 2)[:, 0]]])  # the residuals
    assert (distance_to_nearest(weight[4:], candidates) < 1e-4).all()  # dead codes re-seeded from residuals
    if not ema:
        # Live codes are kept, and the in-place restart leaves this step's backward intact: the codebook gradient
        # is the one of the same step without restarts.
        used = indices.unique()
        assert torch.equal(weight[used], codebook[used])
        terms["codebook_loss"].backward()
        plain = quantizer_with(codebook, depth=2, restart_unused=False).train()
        plain(as_map(z))[2]["codebook_loss"].backward()
        assert q.embedding.weight.grad.abs().sum() > 0
        torch.testing.assert_close(q.embedding.weight.grad, plain.embedding.weight.grad)
    else:
        assert torch.equal(q.ema_cluster_size[0, 4:], torch.ones(4))


def test_restart_tiles_a_small_batch_to_cover_every_code():
    q = quantizer_with(torch.full((32, 2), 50.0), depth=1, restart_unused=True).train()
    z = torch.randn(5, 2)
    q(as_map(z))
    # Code 0 wins every tie and is kept; the 31 others now sit within small noise of one of the five vectors.
    assert torch.equal(q.embedding.weight[0], torch.full((2,), 50.0))
    assert (distance_to_nearest(q.embedding.weight[1:], z) < 0.1).all()


def test_distributed_code_path_on_a_single_process_group(tmp_path):
    # all_reduce and broadcast are identities on one rank: the update must equal the local one.
    torch.manual_seed(0)
    codebook, z = torch.randn(8, 3), torch.randn(40, 3)
    local = quantizer_with(codebook, depth=2, ema=True, restart_unused=True).train()
    synced = quantizer_with(codebook, depth=2, ema=True, restart_unused=True).train()
    torch.manual_seed(1)
    local(as_map(z))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(1)
        synced(as_map(z))
    finally:
        dist.destroy_process_group()
    assert not torch.allclose(local.embedding.weight, codebook)  # the step did update the codebook
    assert torch.allclose(local.embedding.weight, synced.embedding.weight)


# --- the tokenizer -------------------------------------------------------------------------------------------------

def test_shared_and_per_depth_codebooks_parameter_counts_and_keys():
    shared, separate = tiny_tokenizer(shared_codebook=True), tiny_tokenizer(shared_codebook=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(shared.quantize) == 32 * 4 and count(separate.quantize) == 3 * 32 * 4
    assert count(separate) - count(shared) == 2 * 32 * 4
    assert {k for k in shared.state_dict() if k.startswith("quantize")} == {"quantize.embedding.weight"}
    assert {k for k in separate.state_dict() if k.startswith("quantize")} == {
        f"quantize.embeddings.{d}.weight" for d in range(3)}
    keys = set(shared.state_dict())
    for key in ["encoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight", "decoder.conv_out.weight"]:
        assert key in keys, key


@pytest.mark.parametrize("channels,size,depth,shared", [(1, 16, 3, True), (3, 16, 2, False), (3, 32, 1, True)])
def test_round_trip_shapes_ranges_and_spec(channels, size, depth, shared):
    tok = tiny_tokenizer(image_channels=channels, image_size=size, depth=depth, shared_codebook=shared).eval()
    images = torch.rand(3, channels, size, size) * 2 - 1
    tokens = tok.encode(images)
    side = size // 4
    assert tokens.shape == (3, side, side, depth) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < tok.spec.vocab_size
    spec = tok.spec
    assert (spec.name, spec.kind, spec.layout, spec.grid, spec.depth, spec.dim) == (
        "rvq", "discrete", "depth", (side, side), depth, 4)
    assert spec.num_tokens == side * side * depth and spec.image_channels == channels
    recon = tok.decode(tokens)
    assert recon.shape == images.shape and recon.min() >= -1 and recon.max() <= 1
    assert tok.decode(tokens[..., :1]).shape == images.shape  # coarse decode from the first depth only
    with pytest.raises(ValueError, match="depths"):
        tok.decode(torch.zeros(1, side, side, depth + 1, dtype=torch.long))


def test_image_size_must_divide_by_downsampling():
    with pytest.raises(ValueError, match="divisible"):
        tiny_tokenizer(image_size=18)


def test_forward_reports_loss_terms_and_per_depth_usage():
    out = tiny_tokenizer()(torch.rand(4, 1, 16, 16) * 2 - 1)
    assert out["indices"].shape == (4, 4, 4, 3)
    assert torch.allclose(out["loss"], out["recon_loss"] + out["commit_loss"] + out["codebook_loss"])
    for d in range(3):
        usage, perplexity = out[f"usage_d{d}"], out[f"perplexity_d{d}"]
        assert torch.allclose(usage, (out["indices"][..., d].unique().numel() / 32) * torch.ones(()))
        p = torch.bincount(out["indices"][..., d].flatten(), minlength=32).float() / out["indices"][..., d].numel()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        assert perplexity.item() == pytest.approx(entropy.exp().item(), rel=1e-4)
    assert torch.allclose(out["usage"], torch.stack([out[f"usage_d{d}"] for d in range(3)]).mean())


@given(st.lists(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]), min_size=1, max_size=4))  # divisors of 48
@settings(max_examples=20, deadline=None)
def test_usage_per_depth_counts_each_depth_alone(used_per_depth):
    vocab = 16
    # Depth d uses exactly its first k_d codes, each equally often: usage k_d / V, perplexity k_d.
    tokens = torch.stack([torch.arange(48) % k for k in used_per_depth], dim=-1).reshape(2, 4, 6, -1)
    stats = usage_per_depth(tokens, vocab)
    assert len(stats) == len(used_per_depth)
    for (usage, perplexity), k in zip(stats, used_per_depth):
        assert math.isclose(usage, k / vocab, rel_tol=1e-6) and math.isclose(perplexity, k, rel_tol=1e-4)
    pooled = CodebookUsage(vocab)
    pooled.update(tokens)
    assert math.isclose(pooled.usage(), max(used_per_depth) / vocab, rel_tol=1e-6)
    with pytest.raises(ValueError):
        usage_per_depth(tokens[..., 0], vocab)


@pytest.mark.parametrize("kw", [dict(), dict(ema=True, restart_unused=True)], ids=["gradient", "ema-restart"])
def test_training_reduces_reconstruction_error(kw):
    torch.manual_seed(0)
    tok = tiny_tokenizer(**kw)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    opt = torch.optim.Adam([p for p in tok.parameters() if p.requires_grad], lr=3e-3)
    first = tok(images)["recon_loss"].item()
    for _ in range(40):
        out = tok(images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["recon_loss"].item() < 0.7 * first


def test_deeper_codes_refine_a_trained_tokenizer():
    torch.manual_seed(0)
    tok = tiny_tokenizer(ema=True, restart_unused=True)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    opt = torch.optim.Adam([p for p in tok.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(30):
        out = tok(images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    tok.eval()
    with torch.no_grad():
        z = tok.quant_conv(tok.encoder(images))
        tokens = tok.encode(images)
        errors = [F.mse_loss(tok.lookup(tokens[..., :d]), z).item() for d in range(1, 4)]
    assert errors[0] > errors[1] > errors[2]
