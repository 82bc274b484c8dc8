"""VQ tokenizer mathematics: lookup, losses, straight-through gradients, usage, shapes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arvision.tokenizers import VQTokenizer
from arvision.tokenizers.quantize import VectorQuantizer, nearest_code, usage_and_perplexity


def tiny_tokenizer(**kw) -> VQTokenizer:
    args = dict(image_size=16, image_channels=1, ch=8, ch_mult=(1, 2, 2), z_channels=8, vocab_size=32, code_dim=4)
    args.update(kw)
    return VQTokenizer(**args)


@given(st.integers(1, 40), st.integers(2, 30), st.integers(1, 6), st.integers(0, 10_000))
@settings(max_examples=30, deadline=None)
def test_nearest_code_matches_brute_force(n, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    z, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    brute = torch.cdist(z, codebook).argmin(1)
    chosen = nearest_code(z, codebook)
    # Equal up to exact ties: the chosen code is as near as the brute-force one.
    assert torch.allclose(torch.cdist(z, codebook).gather(1, chosen[:, None]).squeeze(1),
                          torch.cdist(z, codebook).gather(1, brute[:, None]).squeeze(1), atol=1e-5)


def test_l2_normalised_lookup_returns_unit_codes_and_cosine_nearest():
    vq = VectorQuantizer(vocab_size=16, dim=4, l2_norm=True)
    z = torch.randn(2, 4, 3, 3)
    z_q, idx, _ = vq(z)
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)
    flat = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    cos = flat @ vq.codebook().t()
    assert torch.equal(idx.flatten(), cos.argmax(1))


def test_losses_follow_their_definitions():
    vq = VectorQuantizer(vocab_size=8, dim=3, beta=0.25, l2_norm=False)
    z = torch.randn(2, 3, 2, 2)
    z_q, idx, terms = vq(z)
    codes = vq.lookup(idx)
    assert torch.allclose(z_q, codes, atol=1e-6)  # forward value is the code itself
    mse = ((z - codes) ** 2).mean()
    assert torch.allclose(terms["codebook_loss"], mse)
    assert torch.allclose(terms["commit_loss"], 0.25 * mse)


def test_straight_through_gradient_reaches_the_encoder_and_codebook_gets_its_own():
    tok = tiny_tokenizer()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    out = tok(images)
    out["recon_loss"].backward(retain_graph=True)
    assert tok.encoder.conv_in.weight.grad is not None and tok.encoder.conv_in.weight.grad.abs().sum() > 0
    # The reconstruction loss alone does not move the codebook (straight-through skips it) ...
    assert tok.quantize.embedding.weight.grad is None or tok.quantize.embedding.weight.grad.abs().sum() == 0
    tok.zero_grad()
    out["codebook_loss"].backward()
    # ... the codebook loss does, and only the codebook.
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0
    assert tok.encoder.conv_in.weight.grad is None or tok.encoder.conv_in.weight.grad.abs().sum() == 0


@given(st.integers(1, 64), st.integers(1, 64))
@settings(max_examples=30, deadline=None)
def test_usage_and_perplexity_of_uniform_histograms(k, vocab):
    k = min(k, vocab)
    indices = torch.arange(k).repeat(3)
    usage, perplexity = usage_and_perplexity(indices, vocab)
    assert math.isclose(usage.item(), k / vocab, rel_tol=1e-6)
    assert math.isclose(perplexity.item(), k, rel_tol=1e-4)


@pytest.mark.parametrize("channels,size,mult", [(1, 16, (1, 2, 2)), (3, 32, (1, 2, 2)), (3, 32, (1, 2, 2, 2))])
def test_round_trip_shapes_ranges_and_spec(channels, size, mult):
    tok = tiny_tokenizer(image_channels=channels, image_size=size, ch_mult=mult).eval()
    images = torch.rand(3, channels, size, size) * 2 - 1
    tokens = tok.encode(images)
    side = size // 2 ** (len(mult) - 1)
    assert tokens.shape == (3, side, side) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < tok.spec.vocab_size
    assert tok.spec.grid == (side, side) and tok.spec.layout == "grid" and tok.spec.kind == "discrete"
    recon = tok.decode(tokens)
    assert recon.shape == images.shape and recon.min() >= -1 and recon.max() <= 1
    # decode(encode(x)) is the quantised forward pass.
    assert torch.allclose(recon, tok(images)["recon"].clamp(-1, 1), atol=1e-5)


def test_image_size_must_divide_by_downsampling():
    with pytest.raises(ValueError, match="divisible"):
        tiny_tokenizer(image_size=18)


def test_state_dict_uses_llamagen_key_layout():
    keys = set(tiny_tokenizer().state_dict())
    for key in ["encoder.conv_in.weight", "encoder.conv_blocks.0.res.0.conv1.weight",
                "encoder.conv_blocks.0.downsample.conv.weight", "encoder.mid.0.norm1.weight", "quant_conv.weight",
                "quantize.embedding.weight", "post_quant_conv.weight", "decoder.conv_blocks.0.upsample.conv.weight",
                "decoder.norm_out.weight", "decoder.conv_out.weight"]:
        assert key in keys, key


def test_training_reduces_reconstruction_error():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    first = tok(images)["recon_loss"].item()
    for _ in range(40):
        out = tok(images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["recon_loss"].item() < 0.7 * first


def test_restart_unused_moves_dead_codes_onto_batch_latents_and_keeps_gradients_exact():
    from arvision.tokenizers.quantize import VectorQuantizer
    torch.manual_seed(0)
    quantizer = VectorQuantizer(vocab_size=16, dim=4, l2_norm=True, restart_unused=True).train()
    with torch.no_grad():  # every code but the first points away from all the data: 15 dead codes
        quantizer.embedding.weight[:] = -1.0
        quantizer.embedding.weight[0] = 1.0
    z = (torch.rand(2, 4, 6, 6) + 0.1).requires_grad_()
    reference = VectorQuantizer(vocab_size=16, dim=4, l2_norm=True, restart_unused=False).train()
    reference.load_state_dict(quantizer.state_dict())
    z_ref = z.detach().clone().requires_grad_()

    z_q, indices, terms = quantizer(z)
    assert set(indices.unique().tolist()) == {0}
    latents = torch.nn.functional.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    restarted = quantizer.codebook()[1:].detach()
    # each restarted code is one of this batch's latents (up to the tiny jitter used only when codes outnumber them)
    assert torch.cdist(restarted, latents).min(dim=1).values.max() < 1e-3
    assert torch.equal(quantizer.embedding.weight[0], torch.ones(4))  # the live code is untouched

    # the step's gradients are those of the step without restarts
    loss = z_q.square().sum() + terms["codebook_loss"] + terms["commit_loss"]
    loss.backward()
    z_q_ref, _, terms_ref = reference(z_ref)
    (z_q_ref.square().sum() + terms_ref["codebook_loss"] + terms_ref["commit_loss"]).backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    torch.testing.assert_close(quantizer.embedding.weight.grad, reference.embedding.weight.grad)

    quantizer.eval()  # no restarts outside training
    before = quantizer.embedding.weight.clone()
    quantizer(torch.randn(1, 4, 2, 2))
    assert torch.equal(before, quantizer.embedding.weight)
