"""The SD-VAE through diffusers (`tokenizer=sd_vae`, `arvision.imports.sd_vae`): the install hint without the extra,
the released layout, tokens as scaled posterior samples or means through the library, stage-1 training, the
generators it pairs with, and the tokenizer-only import of a diffusers folder (config.json's scaling factor, both
attention namings, .safetensors and .bin) with outputs equal to `AutoencoderKL.from_pretrained` and the export round
trip. Only the tests that build the model need diffusers (optional extra arvision[diffusers]); they skip without it."""

from __future__ import annotations

import builtins
import importlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arvision import pipeline
from arvision.imports.base import CheckpointMismatch
from arvision.imports.runs import export_official, import_official
from arvision.imports.sd_vae import DEPRECATED_ATTENTION, RENAMED
from arvision.tokenizers.base import MissingExtra
from arvision.tokenizers.diffusers_vae import SD_SCALING_FACTOR, DiffusersVAETokenizer
from arvision.utils.files import UnreadableFile
from tests.conftest import compose_import, compose_train


def installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


needs_diffusers = pytest.mark.skipif(not installed("diffusers"),
                                     reason="optional extra: pip install 'arvision[diffusers]'")
PRESET = "sd_vae_ft_ema"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# a narrow SD-VAE: 16-px images, two blocks → 8×8×4 latents
SMALL = dict(image_size=16, image_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8)
SMALL_OVERRIDES = ["tokenizer.model.block_out_channels=[8,16]", "tokenizer.model.layers_per_block=1",
                   "tokenizer.model.norm_num_groups=8", "data.image_size=16"]


def small(**kw) -> DiffusersVAETokenizer:
    return DiffusersVAETokenizer(**{**SMALL, **kw})


def random_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def diffusers_folder(folder: Path, *, scaling_factor: float = SD_SCALING_FACTOR, seed: int = 0):
    """A diffusers AutoencoderKL with seeded weights saved as diffusers saves one (config.json + safetensors)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=16,
                          scaling_factor=scaling_factor)
    with torch.no_grad():  # norms and biases off 1 and 0, so every tensor matters
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model.eval()


def test_without_the_extra_building_it_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_diffusers(name, *args, **kwargs):
        if name.startswith("diffusers"):
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    with pytest.raises(MissingExtra, match=r"^tokenizer=sd_vae needs diffusers==0\.42\.1: "
                                           r"pip install 'arvision\[diffusers\]'$"):
        small()


# --------------------------------------------------------------------------------------------- the model
@needs_diffusers
def test_the_published_layout_is_the_sd_vaes():
    with torch.device("meta"):
        vae = DiffusersVAETokenizer(image_size=256, image_channels=3)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # stabilityai/sd-vae-ft-ema's config.json
    assert (vae.spec.kind, vae.spec.grid, vae.spec.dim, vae.spec.name) == ("continuous", (32, 32), 4, "sd_vae")
    names = list(vae.state_dict())
    assert names[:2] == ["scaling_factor", "vae.encoder.conv_in.weight"]
    assert "vae.decoder.mid_block.attentions.0.to_q.weight" in names
    assert small().scaling_factor.item() == pytest.approx(SD_SCALING_FACTOR)


@needs_diffusers
def test_tokens_go_through_the_library_times_the_scaling_factor():
    torch.manual_seed(0)
    vae = small().eval()
    images = random_images(2)
    posterior = vae.vae.encode(images).latent_dist  # the library's own call
    tokens = vae.encode(images, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(tokens, (posterior.mean + posterior.std * eps) * SD_SCALING_FACTOR, atol=1e-6)
    vae.encode_posterior = "mean"
    assert torch.allclose(vae.encode(images), posterior.mean * SD_SCALING_FACTOR)
    z = torch.randn(2, 4, 8, 8)
    assert torch.allclose(vae.decode(z * SD_SCALING_FACTOR), vae.vae.decode(z).sample.clamp(-1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="encode_posterior must be one of sample, mean"):
        small(encode_posterior="mode")
    with pytest.raises(ValueError, match=r"block_out_channels \[8, 12\] must be multiples of norm_num_groups 8"):
        small(block_out_channels=(8, 12))


@needs_diffusers
def test_stage1_training_lowers_the_reconstruction_loss_and_calibrates_the_factor():
    torch.manual_seed(0)
    vae = small()
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
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5  # 0.23 → 0.12 at this seed
    factor = vae.calibrate_scaling(images)
    assert vae.scaling_factor.item() == pytest.approx(factor) and factor != pytest.approx(SD_SCALING_FACTOR)
    vae.encode_posterior = "mean"
    assert vae.encode(images).std().item() == pytest.approx(1.0, abs=1e-3)


@needs_diffusers
def test_the_config_builds_a_tiny_sd_vae_that_flowar_and_acdit_take(tmp_path):
    for generator in ("flowar", "acdit"):
        cfg = compose_train(["tokenizer=sd_vae", f"generator={generator}", "debug=tiny", "data=shapes"], tmp_path)
        dm = pipeline.build_datamodule(cfg)
        tokenizer = pipeline.build_tokenizer(cfg, dm)
        assert isinstance(tokenizer, DiffusersVAETokenizer) and tokenizer.spec.grid == (8, 8)
        assert pipeline.build_generator(cfg, tokenizer, dm.num_classes).spec == tokenizer.spec


# --------------------------------------------------------------------------------------------- import / export
@needs_diffusers
def test_a_diffusers_folder_imports_as_from_pretrained_loads_it_and_exports_back(tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    folder = tmp_path / "vae"
    diffusers_folder(folder, scaling_factor=0.2)  # the config's factor, not the preset's, is the one used
    run = tmp_path / "imported"  # (the command line itself: tests/test_kl16.py)
    done = import_official(compose_import([f"official={PRESET}", f"tokenizer_file={folder}", *SMALL_OVERRIDES],
                                          tmp_path), run)
    assert done.message.startswith(f"imported official={PRESET}") and "no generator" in done.message
    record = json.loads((run / "results.json").read_text())
    assert record["generator"] is None and record["imported"]["files"]["tokenizer"]["layout"] == ""
    assert record["imported"]["files"]["tokenizer"]["path"] == str((folder / WEIGHTS).resolve())
    tokenizer = pipeline.load_tokenizer(Path(record["tokenizer_artifact"]))
    assert tokenizer.scaling_factor.item() == pytest.approx(0.2)

    reference = AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False).eval()  # what ACDiT's sampler does
    images = random_images(2)
    with torch.no_grad():
        posterior = reference.encode(images).latent_dist
        torch.manual_seed(4)
        theirs = reference.encode(images).latent_dist.sample() * reference.config.scaling_factor
        torch.manual_seed(4)
        assert torch.equal(tokenizer.encode(images), theirs)
        assert torch.equal(tokenizer.posterior(images).mean, posterior.mean)
        assert torch.equal(tokenizer.decode(theirs), reference.decode(theirs / 0.2).sample.clamp(-1, 1))

    written = export_official(run, tmp_path / "out")
    assert [p.name for p in written] == [WEIGHTS, "config.json"]
    original, back = load_file(folder / WEIGHTS), load_file(written[0])
    assert set(back) == set(original)  # (safetensors files keep their names sorted)
    assert all(torch.equal(back[name], tensor) for name, tensor in original.items())
    # the export is a diffusers folder again: diffusers loads it, with the same weights and scaling factor
    again = AutoencoderKL.from_pretrained(tmp_path / "out", low_cpu_mem_usage=False).eval()
    assert again.config.scaling_factor == pytest.approx(0.2)
    assert again.config.block_out_channels == reference.config.block_out_channels
    with torch.no_grad():
        assert torch.equal(again.encode(images).latent_dist.mean, posterior.mean)


@needs_diffusers
def test_the_old_attention_names_of_a_bin_file_are_read_and_written_back(tmp_path):
    folder = tmp_path / "vae"
    model = diffusers_folder(folder)
    old = {}
    for name, tensor in model.state_dict().items():  # diffusers' names before its attention rewrite
        for before, after in RENAMED:
            name = name.replace(f".{after}.", f".{before}.")
        old[name] = tensor
    assert "encoder.mid_block.attentions.0.query.weight" in old
    assert "decoder.mid_block.attentions.0.proj_attn.bias" in old
    torch.save(old, folder / "diffusion_pytorch_model.bin")
    cfg = compose_import([f"official={PRESET}", f"tokenizer_file={folder / 'diffusion_pytorch_model.bin'}",
                          "official.files.tokenizer=diffusion_pytorch_model.bin", *SMALL_OVERRIDES], tmp_path)
    import_official(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["imported"]["files"]["tokenizer"]["layout"] == DEPRECATED_ATTENTION
    tokenizer = pipeline.load_tokenizer(Path(record["tokenizer_artifact"]))
    assert torch.equal(tokenizer.vae.encoder.mid_block.attentions[0].to_q.weight,
                       old["encoder.mid_block.attentions.0.query.weight"])
    written = export_official(tmp_path / "run", tmp_path / "out")
    assert [p.name for p in written] == ["diffusion_pytorch_model.bin", "config.json"]
    back = torch.load(written[0], weights_only=True)
    assert written[0].name == "diffusion_pytorch_model.bin" and list(back) == list(old)
    assert all(torch.equal(back[name], tensor) for name, tensor in old.items())


@needs_diffusers
def test_a_folder_of_another_size_is_named_in_one_line(tmp_path):
    folder = tmp_path / "vae"
    diffusers_folder(folder)
    cfg = compose_import([f"official={PRESET}", f"tokenizer_file={folder}", *SMALL_OVERRIDES,
                          "tokenizer.model.latent_channels=8"], tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"diffusion_pytorch_model\.safetensors does not fit "
                                                 r"official=sd_vae_ft_ema \(DiffusersVAETokenizer\): 7 of another "
                                                 r"shape \(encoder\.conv_out\.weight 8×16×3×3 in the file, "
                                                 r"16×16×3×3 in the model"):
        import_official(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (folder / WEIGHTS).write_bytes(b"not a safetensors file")
    cfg = compose_import([f"official={PRESET}", f"tokenizer_file={folder}", *SMALL_OVERRIDES], tmp_path)
    with pytest.raises(UnreadableFile, match=r"cannot be read .*: it is truncated or not a safetensors file"):
        import_official(cfg, tmp_path / "run")
