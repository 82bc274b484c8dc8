"""Parity of arvision-import's ACDiT models with the official code (thunlp/ACDiT).

    python experiments/parity/acdit.py --repo <ACDiT checkout> --commit 135ff064d979             # → parity.csv
    python experiments/parity/acdit.py --repo <ACDiT checkout> --commit 135ff064d979 --fixture   # + the fixture
    python experiments/parity/acdit.py --repo <ACDiT checkout> --tiny-only

Needs the checkout (`models.py`, `rope.py`) and, as the official code does, timm and diffusers (both in arvision's
environment). The official `ACDiT` class is built with seeded random weights (norm scales and biases moved off 1
and 0, the zero-initialised adaLN and output layers drawn), saved as a training checkpoint
`{"model", "ema", "args": argparse.Namespace}` and read back with arvision-import's code (the family's name map and
the strict `fit`). models.py picks FlexAttention whenever it imports, and then builds its training mask with
`create_block_mask` on CUDA; on a CPU the harness sets `models.USE_FLEX_ATTENTION = False`, the official dense-mask
path (`build_attention_mask`; sampling never uses FlexAttention there). Newer timm hands `device=`/`dtype=` to the
q/k norm layer, so the official LlamaRMSNorm is subclassed to accept (and ignore) them. Compared, fp32:
- ε of the training forward (`ACDiT.forward`: all clean blocks, then all noisy blocks, under the skip-causal mask;
  one timestep per block) against `ACDiTGenerator.forward`, ≤ 1e-5. The official forward drops labels at random
  whatever the mode (`y_embedder(y, True)`): its `dropout_prob` is set to 0 for this row, and null-class labels are
  given explicitly;
- the timesteps of `DPMSolverMultistepScheduler.from_config(DDIMScheduler().config)`, as sample_img.py builds it,
  against `GaussianDiffusion.inference_timesteps`, exact. diffusers' `from_config` skips the entries the DDIM config
  holds at their defaults (all of them), so the solver keeps its own "linspace" spacing: 999, 959, …, 40 for 25
  steps, not DDIM's "leading" (diffusers 0.31.0, which the official code pins, and 0.42.1);
- full DPM-Solver++ trajectories: `ACDiT.sample` with that scheduler, its KV cache, constant CFG, noise from a
  seeded generator, against `ACDiTGenerator.sample(spacing="linspace")` from a generator seeded alike (the same
  noise, block by block); every block's finished latents. Random weights predict ε far from the noise, so
  x0̂ = (x − σ·ε̂)/α at t = 999 (α = 0.0064) is ~150× the noise and the finished latents reach a few hundred; at
  that scale the official scheduler's own fp32 arithmetic (its σ tables and steps are fp32, arvision's fp64) moves
  the result by ~3e-4 with identical ε (measured: the same ε function through both solvers). These rows therefore
  give the largest difference divided by the largest |official latent| (its value in the row name), ≤ 1e-6, i.e.
  ≤ 1e-4 at the unit scale of a trained model's latents;
- for ACDiT-XL and -H: the official state dict's names and shapes against the model the preset builds (both built
  on the meta device: no weights), mismatches counted.
Sizes: tiny (width 128, 2 layers, 2 heads of 64 — RopeND is built for head_dim 64 — on an 8×8×4 latent in 4 blocks
of 4×4) and ACDiT-B at ImageNet's layout (32×32×4 latent, blocks of 16×16; XL's 677M parameters do not run its
sampler on a CPU in reasonable time, so B carries the numerics and XL/H the names and shapes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness beside this script
from harness import (  # noqa: E402
    FIXTURES, Row, commit_of, compose_import, max_abs, official_imports, save_fixture, write_rows,
)


from arvision import pipeline
from arvision.generators.acdit import ACDiTGenerator
from arvision.imports.acdit import ACDiTCheckpoints
from arvision.imports.runs import import_official
from arvision.tokenizers.base import TokenSpec

FAMILY = "acdit"
PRESET = "acdit_xl"  # the preset imported (its model keys set to the size compared)
PUBLISHED = {"acdit_xl": ("ACDiT-XL", dict(dim=1152, depth=28, heads=18)),
             "acdit_h": ("ACDiT-H", dict(dim=1280, depth=32, heads=20))}
# sizes: (official builder or None for the tiny class call, arvision sizes, latent side, block side, classes)
TINY = dict(dim=128, depth=2, heads=2, side=8, block=4, classes=10)
BASE = dict(dim=768, depth=12, heads=12, side=32, block=16, classes=1000)
CHANNELS = 4
TOLERANCE = {"eps": 1e-5, "trajectory": 1e-6, "images": 1e-4}  # trajectories: ÷ the largest |official latent|


# --------------------------------------------------------------------------------------------- official models
class Official:
    """models.py from the checkout, on its dense-mask path (the modules leave sys.modules afterwards)."""

    def __init__(self, repo: Path) -> None:
        with official_imports(repo), contextlib.redirect_stdout(io.StringIO()):  # it prints its attention choice
            import models
        models.USE_FLEX_ATTENTION = False

        class LlamaRMSNorm(models.LlamaRMSNorm):
            """timm ≥ 1.0.20 passes device=/dtype= to `norm_layer` (q_norm, k_norm), which the official LlamaRMSNorm
            does not take; models.py looks the class up by name per block, so this one builds the same modules."""

            def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
                super().__init__(hidden_size, eps=eps)

        models.LlamaRMSNorm = LlamaRMSNorm
        self.models = models
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
        self.scheduler = lambda: DPMSolverMultistepScheduler.from_config(DDIMScheduler().config)

    def build(self, size: dict, builder: str | None = None) -> torch.nn.Module:
        """The constructor call of sample_img.py (ImageNet args: patch 1, square blocks, 1 frame)."""
        args = dict(latent_size=CHANNELS, block_size=size["block"] ** 2, num_classes=size["classes"],
                    ar_len=(size["side"] // size["block"]) ** 2, temporal_len=1, spatial_len=size["side"] ** 2,
                    nd_split=None, square_block=True)
        with contextlib.redirect_stdout(io.StringIO()):  # RopeND prints its bases
            if builder is not None:
                return self.models.ACDiT_models[builder](**args)
            return self.models.ACDiT(patch_size=1, in_channels=CHANNELS, hidden_size=size["dim"], depth=size["depth"],
                                     num_heads=size["heads"], **args)


def randomize_(model: torch.nn.Module, *, seed: int) -> None:
    """Every tensor matters: norm scales and biases moved off 1 and 0, the zero-initialised adaLN and output layers
    drawn (small enough that 25 solver steps stay in range)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5 / param.shape[-1] ** 0.5)


def spec_for(size: dict) -> TokenSpec:
    return TokenSpec(name="sd_vae", kind="continuous", layout="grid", grid=(size["side"],) * 2, dim=CHANNELS)


def ours_for(size: dict) -> ACDiTGenerator:
    return ACDiTGenerator(spec=spec_for(size), num_classes=size["classes"], dim=size["dim"], depth=size["depth"],
                          heads=size["heads"], patch_size=1, block_size=size["block"] ** 2, attention="sdpa")


def official_vae(size: dict) -> torch.nn.Module:
    """diffusers' AutoencoderKL, which sample_img.py decodes with: the SD-VAE's config at the published size, a
    narrow one of the same class for the tiny model (stride 8 either way)."""
    from diffusers import AutoencoderKL
    narrow = size["side"] < 32
    channels = [8, 16, 16, 16] if narrow else [128, 256, 512, 512]
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=channels,
                        layers_per_block=1 if narrow else 2, latent_channels=CHANNELS,
                        norm_num_groups=8 if narrow else 32, sample_size=size["side"] * 8, scaling_factor=0.18215)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in vae.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return vae.eval()


def overrides_for(size: dict) -> list[str]:
    """The preset's model keys at `size` (the tiny VAE as official_vae builds it)."""
    out = [f"data.image_size={size['side'] * 8}", f"data.num_classes={size['classes']}",
           f"generator.model.dim={size['dim']}", f"generator.model.depth={size['depth']}",
           f"generator.model.heads={size['heads']}", f"generator.model.block_size={size['block'] ** 2}",
           "generator.model.attention=sdpa"]
    if size["side"] < 32:
        out += ["tokenizer.model.block_out_channels=[8,16,16,16]", "tokenizer.model.layers_per_block=1",
                "tokenizer.model.norm_num_groups=8"]
    return out


def imported(model: torch.nn.Module, vae: torch.nn.Module, size: dict, folder: Path) -> pipeline.FinishedRun:
    """The released layouts — the VAE as a diffusers folder (config.json + diffusion_pytorch_model.safetensors),
    ACDiT as the training script's checkpoint — imported with arvision-import's code and loaded as arvision-sample
    loads the run."""
    vae.save_pretrained(folder / "vae")
    path = folder / "ACDiT-XL-img.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(),
                "args": argparse.Namespace(model="ACDiT-XL", block_size=size["block"] ** 2, patch_size=1,
                                           vae_latent_size=CHANNELS, image_size=size["side"] * 8, num_frames=1)},
               path)
    cfg = compose_import([f"official={PRESET}", f"tokenizer_file={folder / 'vae'}", f"generator_file={path}",
                          *overrides_for(size)], folder)
    import_official(cfg, folder / "run")
    return pipeline.load_run(folder / "run")


# --------------------------------------------------------------------------------------------- the comparison
def compare(official: Official, model: torch.nn.Module, vae: torch.nn.Module, run: pipeline.FinishedRun, *,
            batch: int, steps: int, cfgs: list[float], seed: int) -> tuple[dict[str, torch.Tensor],
                                                                          dict[str, torch.Tensor], dict]:
    """(official outputs, ours, the inputs) for the same inputs; both fp32, eval mode."""
    model.eval()
    ours, tokenizer = run.generator.eval(), run.tokenizer.eval()
    n, k, c = ours.num_blocks, ours.block_size, ours.token_dim
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randn(batch, n, k, c, generator=gen)
    noisy = torch.randn(batch, n, k, c, generator=gen)
    t = torch.randint(0, 1000, (batch, n), generator=gen)
    labels = torch.randint(0, ours.num_classes, (batch,), generator=gen)
    labels[-1] = ours.num_classes  # a null-class row
    sample_labels = torch.randint(0, ours.num_classes, (batch,), generator=gen)
    theirs, mine = {}, {}
    scheduler = official.scheduler()
    scheduler.set_timesteps(steps)
    theirs[f"DPM-Solver++ timesteps, {steps} steps"] = scheduler.timesteps.long()
    mine[f"DPM-Solver++ timesteps, {steps} steps"] = torch.tensor(
        ours.diffusion.inference_timesteps(steps, "linspace", solver="dpm_solver"))
    dropout = model.y_embedder.dropout_prob
    model.y_embedder.dropout_prob = 0.0  # the official forward drops labels at random even in eval mode
    try:
        theirs["eps, training forward"] = model(clean, noisy, t, labels)
    finally:
        model.y_embedder.dropout_prob = dropout
    mine["eps, training forward"] = ours(clean, noisy, t, labels).flatten(1, 2)
    scales = {}
    for cfg in cfgs:
        official_latents = model.sample(sample_labels, official.scheduler(), steps, cfg, (batch, n, k, c),
                                        generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float)
        scale = float(official_latents.abs().max())
        key = f"DPM-Solver++ {steps} steps, cfg {cfg:g}: latents ÷ {scale:.0f}"
        theirs[key] = official_latents / scale
        latents = ours.sample(sample_labels, cfg=cfg, steps=steps, spacing="linspace",
                              generator=torch.Generator().manual_seed(seed + 1))
        mine[key] = ours.to_blocks(latents) / scale
        scales[cfg] = scale
    # sample_img.py's decode of the last trajectory: latents ÷ vae.config.scaling_factor through the VAE, saved
    # with value_range (-1, 1), i.e. clamped, as arvision's decode clamps. The latents are taken ÷ their largest
    # value first (unit scale, as a trained model's): at ~500 nearly every pixel would sit on the clamp.
    theirs[f"decoded images, cfg {cfg:g} (latents ÷ {scale:.0f})"] = vae.decode(
        ours.from_blocks(official_latents) / scale / vae.config.scaling_factor).sample.clamp(-1, 1)
    mine[f"decoded images, cfg {cfg:g} (latents ÷ {scale:.0f})"] = tokenizer.decode(latents / scale)
    inside = theirs[f"decoded images, cfg {cfg:g} (latents ÷ {scale:.0f})"].abs().lt(1).float().mean()
    if inside < 0.5:
        raise SystemExit(f"only {inside:.0%} of the decoded pixels lie inside the clamp: the row would prove little")
    inputs = {"clean": clean, "noisy": noisy, "t": t, "labels": labels, "sample_labels": sample_labels,
              "steps": steps, "cfgs": cfgs, "seed": seed + 1, "scales": scales}
    return theirs, mine, inputs


def rows_for(model: str, size: str, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
             commit: str) -> list[Row]:
    def tolerance(output: str) -> float:
        if "timesteps" in output:
            return 0.0
        return TOLERANCE["eps" if output.startswith("eps") else "images" if "images" in output else "trajectory"]
    return [Row(FAMILY, model, size, output, max_abs(ours[output], theirs[output]), tolerance(output), commit)
            for output in theirs]


# --------------------------------------------------------------------------------------------- the sizes
def tiny(official: Official, commit: str, *, fixture: bool) -> list[Row]:
    torch.manual_seed(0)
    model = official.build(TINY)
    randomize_(model, seed=1)
    vae = official_vae(TINY)
    with tempfile.TemporaryDirectory() as tmp:
        run = imported(model, vae, TINY, Path(tmp))
        theirs, mine, inputs = compare(official, model, vae, run, batch=3, steps=25, cfgs=[1.0, 1.5, 4.0], seed=2)
    if fixture:
        save_fixture(FAMILY, {
            "about": "ACDiT parity: the official-layout state dict of a tiny ACDiT (seeded random weights), the "
                     "inputs, and the official code's outputs on them (experiments/parity/acdit.py --fixture)",
            "official_commit": commit, "size": TINY,
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "vae": {k: v.clone() for k, v in vae.state_dict().items()}, "vae_config": dict(vae.config),
            "overrides": overrides_for(TINY), "preset": PRESET,
            "inputs": inputs, "official": theirs, "tolerance": TOLERANCE})
    return rows_for("tiny: width 128, 2 layers, 8×8×4 latent, 4 blocks", "tiny", theirs, mine, commit)


def base(official: Official, commit: str) -> list[Row]:
    torch.manual_seed(0)
    model = official.build(BASE, "ACDiT-B")
    randomize_(model, seed=1)
    vae = official_vae(BASE)
    with tempfile.TemporaryDirectory() as tmp:
        run = imported(model, vae, BASE, Path(tmp))
        theirs, mine, _ = compare(official, model, vae, run, batch=1, steps=4, cfgs=[1.5], seed=2)
    return rows_for("ACDiT-B (32×32×4 latent, 4 blocks of 256)", "published", theirs, mine, commit)


def structures(official: Official, commit: str) -> list[Row]:
    """ACDiT-XL and -H: the official state dicts' names (through the import's map) and shapes against ours."""
    rows, family = [], ACDiTCheckpoints()
    size = dict(BASE)
    for preset, (builder, dims) in PUBLISHED.items():
        with torch.device("meta"):
            model = official.build(size, builder)
            ours = ours_for({**size, **dims})
        names = family.generator_names(ours)
        a = {names.ours(k): tuple(v.shape) for k, v in model.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        differ = len(set(a) ^ set(b)) + sum(a[k] != b[k] for k in set(a) & set(b))
        params = sum(p.numel() for p in ours.parameters()) / 1e6
        rows.append(Row(FAMILY, preset, "published", f"generator names+shapes ({len(a)} tensors, {params:.1f}M)",
                        float(differ), 0.0, commit))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, type=Path, help="checkout of thunlp/ACDiT")
    parser.add_argument("--fixture", action="store_true", help=f"also write {FIXTURES / (FAMILY + '.pt')}")
    parser.add_argument("--tiny-only", action="store_true", help="skip the published sizes (no parity.csv)")
    parser.add_argument("--commit", default=None,
                        help="the official commit, recorded when --repo is an exported archive without .git")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    official, commit = Official(args.repo), args.commit or commit_of(args.repo)
    rows = tiny(official, commit, fixture=args.fixture)
    if args.tiny_only:
        for row in rows:
            print(row.as_csv())
        if any(r.max_abs_diff > r.tolerance for r in rows):
            raise SystemExit(f"{FAMILY}: a row is outside its tolerance")
        return
    rows += base(official, commit) + structures(official, commit)
    write_rows(FAMILY, rows)


if __name__ == "__main__":
    sys.exit(main())
