"""MAR's KL-16 VAE (`tokenizer=kl16`, `arvision.imports.kl16`): MAR's layout, tokens as scaled posterior samples or
means, stage-1 training, the generators it pairs with, the tokenizer-only import of `kl16.ckpt` (official=mar_kl16)
with its export round trip and wrong files named in one line, and parity with MAR's own code from the golden fixture
(experiments/parity/kl16.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arvision import pipeline
from arvision.imports.base import CheckpointMismatch, read_official
from arvision.imports.kl16 import KL16Family, kl16_tokenizer_map
from arvision.imports.runs import ImportError_, export_official, import_official
from arvision.tokenizers.kl16 import MAR_SCALING_FACTOR, KL16Tokenizer
from tests.conftest import REPO, compose_import, compose_train, run_import_cli

FIXTURE = REPO / "tests" / "fixtures" / "parity" / "kl16.pt"
PRESET = "mar_kl16"
# a narrow KL-16 of MAR's layout: 16-px images, two levels → 8×8×4 latents
SMALL = dict(image_size=16, image_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, embed_dim=4)
SMALL_OVERRIDES = ["tokenizer.model.ch=32", "tokenizer.model.ch_mult=[1,2]", "tokenizer.model.num_res_blocks=1",
                   "tokenizer.model.embed_dim=4", "data.image_size=16"]


def small(**kw) -> KL16Tokenizer:
    return KL16Tokenizer(**{**SMALL, **kw})


def random_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def official_state(tokenizer: KL16Tokenizer, extras: dict | None = None) -> dict[str, torch.Tensor]:
    """`tokenizer`'s weights under kl16.ckpt's names, in MAR's order."""
    return KL16Family().tokenizer_to_official(tokenizer.state_dict(), extras or {}, tokenizer)


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)


# --------------------------------------------------------------------------------------------- golden fixture
def test_golden_fixture_outputs_equal_mars_code(tmp_path, fixture):
    """The fixture holds a tiny KL-16's state dict (MAR's AutoencoderKL, Encoder and Decoder narrowed, seeded random
    weights), images and MAR's outputs on them (experiments/parity/kl16.py --fixture at `official_commit`): the
    imported tokenizer reproduces each, the sampled tokens from the same seeded global stream as MAR draws them."""
    fx = fixture
    official, inputs, tol = fx["official"], fx["inputs"], fx["tolerance"]
    ckpt = write_ckpt(tmp_path, fx["state"])
    import_official(compose_import([f"official={fx['preset']}", f"tokenizer_file={ckpt}", *fx["overrides"]],
                                   tmp_path), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    tokenizer = pipeline.load_tokenizer(Path(record["tokenizer_artifact"]))
    images, scale = inputs["images"], inputs["scale"]
    assert tokenizer.scaling_factor.item() == pytest.approx(scale)
    ours = {}
    with torch.no_grad():
        posterior = tokenizer.posterior(images)
        ours["posterior mean"], ours["posterior std"] = posterior.mean, posterior.std
        torch.manual_seed(inputs["noise_seed"])
        ours["tokens: sample × 0.2325 (same noise)"] = tokenizer.encode(images)
        tokenizer.encode_posterior = "mean"
        ours["tokens: mean × 0.2325"] = tokenizer.encode(images)
        tokens = official["tokens: sample × 0.2325 (same noise)"]
        ours["decoder output (tokens / 0.2325)"] = tokenizer.decode_latents(tokens / tokenizer.scaling_factor)
        ours["decoded images, clamped"] = tokenizer.decode(tokens)
    assert set(ours) == set(official)  # every recorded official output is checked
    for name, theirs in official.items():
        assert (ours[name] - theirs).abs().max().item() <= tol[name], name
    # the rows can fail: other noise, or the mean where MAR samples, is far off
    assert (ours["tokens: mean × 0.2325"] - official["tokens: sample × 0.2325 (same noise)"]).abs().max() > 1e-2
    assert official["decoded images, clamped"].abs().max() == 1.0  # the clamp is exercised


# --------------------------------------------------------------------------------------------- layout
def test_the_published_layout_is_mars():
    with torch.device("meta"):
        vae = KL16Tokenizer(image_size=256, image_channels=3)
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert sum(p.numel() for p in vae.parameters()) == 66_456_019  # MAR's AutoencoderKL(16, (1,1,2,2,4))
    assert vae.spec.grid == (16, 16) and vae.spec.dim == 16 and vae.spec.kind == "continuous"
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)  # double_z: the encoder emits μ and log σ²
    assert shapes["quant_conv.weight"] == (32, 32, 1, 1) and shapes["post_quant_conv.weight"] == (16, 16, 1, 1)
    assert shapes["decoder.conv_in.weight"] == (512, 16, 3, 3)
    # attention: the encoder's last level (16 px of 256) and both middle blocks; none in the decoder's levels
    attn = sorted({".".join(k.split(".")[:3]) for k in shapes if ".attn." in k})
    assert attn == ["encoder.conv_blocks.4"]
    assert "encoder.mid.1.q.weight" in shapes and "decoder.mid.1.q.weight" in shapes
    assert small().scaling_factor.item() == pytest.approx(MAR_SCALING_FACTOR)


def test_names_map_to_kl16_ckpt_and_back():
    names = kl16_tokenizer_map(levels=5)
    assert names.ours("encoder.down.4.attn.1.proj_out.weight") == "encoder.conv_blocks.4.attn.1.proj_out.weight"
    assert names.ours("encoder.down.0.downsample.conv.bias") == "encoder.conv_blocks.0.downsample.conv.bias"
    assert names.ours("decoder.up.4.block.2.conv1.weight") == "decoder.conv_blocks.0.res.2.conv1.weight"
    assert names.ours("decoder.up.1.upsample.conv.weight") == "decoder.conv_blocks.3.upsample.conv.weight"
    assert names.ours("decoder.mid.attn_1.q.weight") == "decoder.mid.1.q.weight"
    assert names.ours("quant_conv.weight") == "quant_conv.weight"
    vae = small()
    state = official_state(vae)
    assert "scaling_factor" not in state and list(state)[:2] == ["encoder.conv_in.weight", "encoder.conv_in.bias"]
    # MAR's order: the decoder's levels by resolution (up.0 first), then quant_conv, post_quant_conv
    ups = [k for k in state if k.startswith("decoder.up.")]
    assert ups[0].startswith("decoder.up.0.") and ups[-1].startswith("decoder.up.1.")
    assert list(state)[-2:] == ["post_quant_conv.weight", "post_quant_conv.bias"]
    ours, extras = KL16Family().tokenizer_to_ours(state, vae)
    assert extras == {} and ours.keys() == vae.state_dict().keys()


# --------------------------------------------------------------------------------------------- tokens
def test_tokens_are_posterior_samples_or_means_times_the_scaling_factor():
    torch.manual_seed(0)
    vae = small().eval()
    images = random_images(2)
    posterior = vae.posterior(images)
    # sample: μ + σ·ε with ε from the given generator (MAR draws ε from the global stream: the same noise)
    tokens = vae.encode(images, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(tokens, (posterior.mean + posterior.std * eps) * MAR_SCALING_FACTOR, atol=1e-6)
    torch.manual_seed(5)
    first = vae.encode(images)
    torch.manual_seed(5)
    assert torch.equal(vae.encode(images), first) and not torch.equal(vae.encode(images), first)
    # mean: deterministic
    vae.encode_posterior = "mean"
    assert torch.allclose(vae.encode(images), posterior.mean * MAR_SCALING_FACTOR)
    # decoding divides by the factor
    z = torch.randn(2, 4, 8, 8)
    assert torch.allclose(vae.decode(z * MAR_SCALING_FACTOR), vae.decode_latents(z).clamp(-1, 1), atol=1e-5)
    assert vae.decode(tokens).shape == images.shape


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="encode_posterior must be one of sample, mean, got 'mode'"):
        small(encode_posterior="mode")
    with pytest.raises(ValueError, match="scaling_factor must be > 0"):
        small(scaling_factor=0.0)
    with pytest.raises(ValueError, match="divisible"):
        small(image_size=15)


# --------------------------------------------------------------------------------------------- stage 1
def test_stage1_training_lowers_the_reconstruction_loss_and_calibrates_the_factor():
    torch.manual_seed(0)
    vae = small(ch=16, embed_dim=4)
    coarse = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = F.interpolate(coarse, size=16, mode="bilinear", align_corners=False)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        out = vae(images)
        assert set(out) == {"recon", "loss", "recon_loss", "kl_loss", "latent_std", "posterior_std"}
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["recon_loss"].item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    factor = vae.calibrate_scaling(images)  # the pipeline's step after stage 1
    assert factor != pytest.approx(MAR_SCALING_FACTOR) and vae.scaling_factor.item() == pytest.approx(factor)
    vae.encode_posterior = "mean"
    assert vae.encode(images).std().item() == pytest.approx(1.0, abs=1e-3)


def test_the_config_builds_a_tiny_kl16_that_flowar_and_acdit_take(tmp_path):
    for generator in ("flowar", "acdit"):
        cfg = compose_train(["tokenizer=kl16", f"generator={generator}", "debug=tiny", "data=shapes"], tmp_path)
        dm = pipeline.build_datamodule(cfg)
        tokenizer = pipeline.build_tokenizer(cfg, dm)
        assert isinstance(tokenizer, KL16Tokenizer) and tokenizer.spec.name == "kl16"
        assert (tokenizer.spec.kind, tokenizer.spec.grid, tokenizer.spec.dim) == ("continuous", (8, 8), 4)
        model = pipeline.build_generator(cfg, tokenizer, dm.num_classes)
        assert model.spec == tokenizer.spec
    published = compose_train(["tokenizer=kl16", "data=shapes"], tmp_path).tokenizer.model
    assert (published.ch, list(published.ch_mult), published.num_res_blocks, published.embed_dim) == \
        (128, [1, 1, 2, 2, 4], 2, 16)


# --------------------------------------------------------------------------------------------- import / export
def write_ckpt(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "kl16.ckpt") -> Path:
    path = tmp_path / name
    torch.save({"model": state}, path)  # MAR's layout
    return path


def test_tokenizer_only_import_cli_and_the_export_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = small()
    # a loss module's tensors, as LDM training files carry them (MAR loads strict=False): they travel as extras
    extras = {"loss.logvar": torch.tensor(0.5), "loss.discriminator.main.0.weight": torch.randn(4, 3, 2, 2)}
    state = official_state(vae, extras)
    ckpt = write_ckpt(tmp_path, state)
    run = tmp_path / "imported"
    done = run_import_cli(tmp_path, f"official={PRESET}", f"tokenizer_file={ckpt}", *SMALL_OVERRIDES,
                          f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr
    assert f"imported official={PRESET}" in done.stdout and "no generator" in done.stdout
    record = json.loads((run / "results.json").read_text())
    assert record["generator"] is None and not (run / "generator.pt").exists()
    assert record["imported"]["family"] == "mar_kl16" and record["imported"]["files"]["tokenizer"]["layout"] == "model"
    assert list(record["imported"]["files"]) == ["tokenizer"] and record["spec"]["name"] == "kl16"
    tokenizer = pipeline.load_tokenizer(Path(record["tokenizer_artifact"]))
    assert tokenizer.scaling_factor.item() == pytest.approx(MAR_SCALING_FACTOR)
    images = random_images(2)
    vae.eval()
    assert torch.equal(tokenizer.posterior(images).mean, vae.posterior(images).mean)

    # sampling or evaluating it says in one line that there is no generator
    with pytest.raises(pipeline.ConfigError, match=r"holds a tokenizer and no generator \(a stage-1 run or an "
                                                   r"imported tokenizer\)"):
        pipeline.load_run(run)

    written = export_official(run, tmp_path / "out")
    assert [p.name for p in written] == ["kl16.ckpt"]
    back = read_official(written[0])
    assert list(back) == ["model"] and list(back["model"]) == list(state)
    for name, tensor in state.items():
        assert back["model"][name].dtype == tensor.dtype and torch.equal(back["model"][name], tensor), name


def test_a_plain_state_dict_is_read_too(tmp_path):
    vae = small()
    path = tmp_path / "kl16.ckpt"
    torch.save(official_state(vae), path)
    cfg = compose_import([f"official={PRESET}", f"tokenizer_file={path}", *SMALL_OVERRIDES], tmp_path)
    import_official(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["imported"]["files"]["tokenizer"]["layout"] == ""


def test_a_file_of_another_size_is_named_in_one_line(tmp_path):
    bigger = official_state(small(embed_dim=8))
    ckpt = write_ckpt(tmp_path, bigger)
    cfg = compose_import([f"official={PRESET}", f"tokenizer_file={ckpt}", *SMALL_OVERRIDES], tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"kl16\.ckpt does not fit official=mar_kl16 \(KL16Tokenizer\): "
                                                 r"7 of another shape \(encoder\.conv_out\.weight 16×64×3×3 in the "
                                                 r"file, 8×64×3×3 in the model"):
        import_official(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    cfg = compose_import([f"official={PRESET}", *SMALL_OVERRIDES], tmp_path)
    with pytest.raises(ImportError_, match=r"give tokenizer_file=<path of the official kl16\.ckpt you downloaded>"):
        import_official(cfg, tmp_path / "run")
