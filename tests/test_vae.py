"""KL-VAE tokenizer: the KL term, reparameterised sampling, the scaling factor, shapes and a little training."""

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from arvision.tokenizers.vae import DiagonalGaussian, KLVAETokenizer, kl_standard_normal


def tiny_vae(**kw) -> KLVAETokenizer:
    args = dict(image_size=16, image_channels=1, ch=8, ch_mult=(1, 2, 2), z_channels=8, latent_channels=4,
                mid_attn=False)
    args.update(kw)
    return KLVAETokenizer(**args)


def random_images(n: int, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------------------------- KL term
def test_kl_is_zero_at_the_prior():
    mean, logvar = torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    assert torch.equal(kl_standard_normal(mean, logvar), torch.zeros(3))


def test_kl_matches_the_closed_form_summed_over_latents():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(kl_standard_normal(mean, logvar), expected, atol=1e-5)
    # Through the posterior and the tokenizer's loss: summed per image, averaged over the batch.
    assert torch.allclose(DiagonalGaussian(torch.cat([mean, logvar], 1)).kl(), expected, atol=1e-5)


@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=1, max_size=16))
@settings(max_examples=60, deadline=None)
def test_kl_is_positive_away_from_the_prior(pairs):
    mean = torch.tensor([m for m, _ in pairs], dtype=torch.float64).view(1, -1, 1, 1)
    logvar = torch.tensor([v for _, v in pairs], dtype=torch.float64).view(1, -1, 1, 1)
    kl = kl_standard_normal(mean, logvar).item()
    assert kl >= 0.0
    if max(max(abs(m), abs(v)) for m, v in pairs) > 1e-3:
        assert kl > 0.0


def test_logvar_is_clamped():
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1)], 1)
    post = DiagonalGaussian(moments, logvar_clamp=(-30.0, 20.0))
    assert post.logvar.flatten().tolist() == [-30.0, 20.0] and torch.isfinite(post.std).all()


# --------------------------------------------------------------------------------------------- sampling
def test_reparameterised_samples_have_the_posterior_mean_and_variance():
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 3, 2, 2, generator=g)
    n = 20_000
    post = DiagonalGaussian(torch.cat([mean, logvar], 1).expand(n, -1, -1, -1))
    samples = post.sample(generator=g)
    assert torch.allclose(samples.mean(0), mean[0], atol=4 * (0.5 * logvar).exp().max().item() / n**0.5)
    assert torch.allclose(samples.var(0), logvar[0].exp(), rtol=0.05)


def test_encode_is_the_mean_and_training_forward_samples():
    torch.manual_seed(0)
    vae = tiny_vae()
    images = random_images(2)
    vae.eval()
    assert torch.equal(vae.encode(images), vae.encode(images))
    assert torch.allclose(vae.encode(images), vae.posterior(images).mean)
    vae.train()  # no dropout in this net: the only randomness is the posterior sample
    assert not torch.allclose(vae(images)["recon"], vae(images)["recon"])
    # Encoding is deterministic in training mode too, and sample_posterior=False makes forward deterministic.
    assert torch.equal(vae.encode(images), vae.encode(images))
    vae.sample_posterior = False
    assert torch.equal(vae(images)["recon"], vae(images)["recon"])


def test_forward_returns_the_loss_terms_and_stats():
    vae = tiny_vae(kl_weight=0.5)
    images = random_images(3)
    out = vae(images)
    assert set(out) == {"recon", "loss", "recon_loss", "kl_loss", "latent_std", "posterior_std"}
    assert all(v.dim() == 0 for k, v in out.items() if k != "recon")
    assert torch.allclose(out["loss"], out["recon_loss"] + 0.5 * out["kl_loss"])
    post = vae.posterior(images)
    assert torch.allclose(out["kl_loss"], post.kl().mean(), rtol=1e-5)
    assert torch.allclose(out["posterior_std"], post.std.mean(), rtol=1e-5)


def test_gradients_reach_the_encoder_through_the_sample():
    torch.manual_seed(0)
    vae = tiny_vae().train()
    vae(random_images(2))["recon_loss"].backward()
    c = vae.spec.dim
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    # The log-variance rows of quant_conv get reconstruction gradient only through σ·ε, i.e. through the sample.
    assert vae.quant_conv.weight.grad[c:].abs().sum() > 0
    vae.zero_grad()
    vae.eval()
    vae(random_images(2))["recon_loss"].backward()
    assert vae.quant_conv.weight.grad[c:].abs().sum() == 0


# --------------------------------------------------------------------------------------------- scaling factor
def test_calibration_gives_unit_variance_tokens_and_leaves_the_round_trip_unchanged():
    torch.manual_seed(0)
    vae = tiny_vae().eval()
    train = random_images(32, seed=2)
    assert vae.scaling_factor.item() == 1.0
    before = vae.decode(vae.encode(train[:4]))
    factor = vae.calibrate_scaling(train)
    assert factor == pytest.approx(1 / vae.posterior(train).mean.std().item(), rel=1e-4)
    assert vae.scaling_factor.item() == pytest.approx(factor)
    assert vae.encode(train).std().item() == pytest.approx(1.0, abs=1e-3)
    assert vae.encode(random_images(32, seed=3)).std().item() == pytest.approx(1.0, abs=0.2)  # held-out
    assert torch.allclose(vae.decode(vae.encode(train[:4])), before, atol=1e-5)  # scale and unscale cancel
    assert vae.calibrate_scaling(train) == pytest.approx(factor, rel=1e-6)  # idempotent: means are unscaled


def test_calibration_accepts_loader_batches_and_caps_the_image_count():
    torch.manual_seed(0)
    vae = tiny_vae().train()
    images = random_images(12, seed=4)
    whole = vae.calibrate_scaling(images)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(12)), batch_size=5)
    assert vae.calibrate_scaling(loader) == pytest.approx(whole, rel=1e-5)
    assert vae.calibrate_scaling(loader, max_images=7) == pytest.approx(vae.calibrate_scaling(images[:7]), rel=1e-5)
    assert vae.training  # the mode is restored
    with pytest.raises(ValueError, match="at least one image"):
        vae.calibrate_scaling([])


def test_scaling_factor_persists_through_the_state_dict():
    torch.manual_seed(0)
    vae = tiny_vae().eval()
    images = random_images(8)
    factor = vae.calibrate_scaling(images)
    assert "scaling_factor" in vae.state_dict()
    buf = io.BytesIO()
    torch.save(vae.state_dict(), buf)
    buf.seek(0)
    fresh = tiny_vae().eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.scaling_factor.item() == pytest.approx(factor)
    assert torch.equal(fresh.encode(images), vae.encode(images))


def test_a_calibrated_artifact_reloads_from_its_config(tmp_path):
    # What pipeline.load_tokenizer does, without importing Lightning: instantiate, then a strict weights-only load.
    from arvision.utils.instantiate import instantiate
    vae = tiny_vae()
    vae.calibrate_scaling(random_images(8))
    config = dict(_target_="arvision.tokenizers.vae.KLVAETokenizer", name="vae", ch=8, ch_mult=[1, 2, 2],
                  z_channels=8, latent_channels=4, mid_attn=False, logvar_clamp=[-30.0, 20.0])
    torch.save({"state_dict": vae.state_dict(), "config": config}, tmp_path / "tokenizer.pt")
    blob = torch.load(tmp_path / "tokenizer.pt", map_location="cpu", weights_only=True)
    loaded = instantiate(blob["config"], image_size=16, image_channels=1)
    loaded.load_state_dict(blob["state_dict"])
    assert isinstance(loaded, KLVAETokenizer) and loaded.scaling_factor.item() == vae.scaling_factor.item()
    assert loaded.logvar_clamp == (-30.0, 20.0)


# --------------------------------------------------------------------------------------------- shapes, training
@pytest.mark.parametrize("channels,size,mult,latent", [(1, 16, (1, 2, 2), 4), (3, 32, (1, 2, 2, 2), 8)])
def test_round_trip_shapes_ranges_and_spec(channels, size, mult, latent):
    vae = tiny_vae(image_channels=channels, image_size=size, ch_mult=mult, latent_channels=latent).eval()
    images = random_images(3, channels, size)
    tokens = vae.encode(images)
    side = size // 2 ** (len(mult) - 1)
    assert tokens.shape == (3, latent, side, side) and tokens.dtype == torch.float32
    spec = vae.spec
    assert (spec.kind, spec.layout, spec.grid, spec.dim, spec.vocab_size) == ("continuous", "grid", (side, side),
                                                                              latent, None)
    assert (spec.name, spec.image_size, spec.image_channels) == ("vae", size, channels)
    recon = vae.decode(tokens)
    assert recon.shape == images.shape and recon.min() >= -1 and recon.max() <= 1
    # In eval mode forward decodes the mean: decode(encode(x)) is its (clamped) reconstruction.
    assert torch.allclose(recon, vae(images)["recon"].clamp(-1, 1), atol=1e-5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        tiny_vae(image_size=18)
    with pytest.raises(ValueError, match="logvar_clamp"):
        tiny_vae(logvar_clamp=(5.0, -5.0))


def test_training_reduces_reconstruction_error():
    torch.manual_seed(0)
    vae = tiny_vae()
    # Smooth images (upsampled 4×4 noise): structure a 4×4×4 latent can hold, unlike per-pixel noise.
    coarse = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = F.interpolate(coarse, size=16, mode="bilinear", align_corners=False)

    def eval_error() -> float:  # the deterministic path: decode(encode(x))
        with torch.no_grad():
            return F.mse_loss(vae.eval().decode(vae.encode(images)), images).item()

    first = eval_error()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    vae.train()
    for _ in range(30):  # on posterior samples, as stage 1 trains
        out = vae(images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert eval_error() < 0.5 * first
    assert torch.isfinite(out["kl_loss"]) and out["kl_loss"] > 0
