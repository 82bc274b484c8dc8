"""Parity of arvision's FlowAR (and its import of FlowAR's files) with the official code (OliverRensu/FlowAR).

    python experiments/parity/flowar.py --repo <FlowAR checkout> --commit 5745a964df1d             # → parity.csv
    python experiments/parity/flowar.py --repo <FlowAR checkout> --commit 5745a964df1d --fixture   # + fixture
    python experiments/parity/flowar.py --repo <FlowAR checkout> --commit 5745a964df1d --tiny-only

Needs the checkout (`models/flowar.py`, `flowmodel.py`, `rope.py`, `sampler.py`, `flowloss.py`) and timm, scipy and
einops (in arvision's dev environment). The official code calls `.cuda()` on a few tensors; the harness runs it on
the CPU with `Tensor.cuda` as the identity, in fp32.

For each size the official `FlowAR` class is built with seeded random weights (every tensor drawn: 1/√fan-in
matrices, biases ± 0.1, norm scales 1 ± 0.1, class and position tables of unit-ish scale, so gates, adaLN and the
head's output layer all matter), saved as the released plain state dict, and loaded through
`FlowARCheckpoints` (arvision-import's name map, buffer checks and strict load) into the generator its preset
builds (`conf/official/flowar_s.yaml` at the published size). The same inputs then go through both, fp32:
- teacher-forced head conditions z of every position (both stacks, `diffusion_pos_embed`; the official model in
  training mode without dropout, which runs its block-causal mask and per-scale RoPE) for two classes and the null
  class, ≤ 1e-5;
- velocities of the flow head on the same x_t, t and z (one official `flownet` call per scale, arvision's one call
  over all scales with its block-diagonal mask), ≤ 1e-5;
- sampling from the same noise (`sample_tokens` with the KV cache, the CFG ramp and the guidance interval against
  `FlowARGenerator.sample`, the noise FlowAR draws replayed from the same seed): the conditions z of every cached
  pass (≤ 1e-5) and the latent of every scale, i.e. the whole trajectory, ≤ 1e-4, for Euler on FlowAR's 25-step
  grid, Euler at 50 steps (where `euler_sampler` switches to the uniform grid) and FlowAR's SDE sampler
  (`sampler.euler_maruyama_sampler`, swapped in for `euler_sampler`: `sample_tokens` has no switch for it);
- the export back to FlowAR's layout: every name, in order, and every value (exact);
- for FlowAR-S, -L and -H: the official state-dict names and shapes against the model each preset builds (both on
  the meta device), mismatches counted.
Tiny: FlowAR's latent is fixed at 16×16×16 (its RoPE grid, bicubic target and noise channels are literals), so the
tiny models keep scales 1, 2, 4, 8, 16 and shrink the widths: a 16-wide 1 + 1-block backbone with 2 heads and a
one-block 64-wide head, spatial (`Block_v1`) and cross (`Block_v2`), on FlowAR's `models/vae.py` (MAR's KL-16)
narrowed to 32-px images (ch 32, ch_mult 1,1, one res block, 16 latent channels: 16×16×16 latents).
Published: FlowAR-S as `flowar_small(diffloss_d=2, diffloss_w=1024)` builds it, one class.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import einops
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness beside this script
from harness import (  # noqa: E402
    REPO_ROOT, Row, compose_import, max_abs, official_imports, on_cpu, save_fixture, write_rows,
)

from arvision import pipeline
from arvision.generators.flowar import FlowARGenerator
from arvision.imports.flowar import FlowARCheckpoints
from arvision.imports.runs import import_official
from arvision.tokenizers.base import TokenSpec

FAMILY = "flowar"
PRESETS = {"flowar_s": ("flowar_small", 2, 1024), "flowar_l": ("flowar_large", 12, 1024),
           "flowar_h": ("flowar_huge", 12, 1536)}  # preset → (official builder, diffloss_d, diffloss_w)
PRESETS_FILES = {"flowar_s": "FlowAR-S.pth", "flowar_l": "FlowAR-L.pth", "flowar_h": "FlowAR-H.pth"}
KL16 = TokenSpec(name="kl16", kind="continuous", layout="grid", grid=(16, 16), dim=16, image_size=256)
TINY_MODEL = dict(scales=[1, 2, 4, 8, 16], dim=16, depth=1, heads=2, head_width=64, head_depth=1, head_heads=1)
TINY_VAE = dict(ch=32, ch_mult=(1, 1), num_res_blocks=1, embed_dim=16, image_size=32)  # 32 px → 16×16×16
SCALE = 0.2325  # FlowAR's engine.py: vae.decode(tokens / 0.2325)


def tiny_overrides(head: str) -> list[str]:
    """official=flowar_s narrowed to the tiny models (arvision-import's overrides)."""
    return [f"data.image_size={TINY_VAE['image_size']}", f"tokenizer.model.ch={TINY_VAE['ch']}",
            "tokenizer.model.ch_mult=[1,1]", f"tokenizer.model.num_res_blocks={TINY_VAE['num_res_blocks']}",
            *[f"generator.model.{k}={v}" for k, v in TINY_MODEL.items() if k != "scales"],
            f"generator.model.head={head}"]


SEED = 11
TOLERANCE = {"conditions z (teacher-forced)": 1e-5, "velocity": 1e-5, "export: names in order, values": 0.0,
             "decoded images (euler 25 steps), decoder output": 1e-4,
             "decoded images (euler 25 steps), clamped": 1e-4}
SAMPLING_RUNS = {  # name → (steps, SDE?)
    "euler 25 steps (flowar grid)": (25, False), "euler 50 steps (uniform grid)": (50, False),
    "euler-maruyama 25 steps": (25, True)}
SAMPLING_TOLERANCE = {"conditions z (cached passes)": 1e-5, "latents of every scale": 1e-4}
DECODED = "decoded images (euler 25 steps)"


# --------------------------------------------------------------------------------------------- official code
class Official:
    def __init__(self, repo: Path) -> None:
        with official_imports(repo):
            from models import flowar, sampler, vae
        self.flowar, self.sampler, self.vae = flowar, sampler, vae

    def tiny_vae(self) -> torch.nn.Module:
        """FlowAR's `models/vae.py` (MAR's KL-16) narrowed: attention in the encoder's last level as at 256 px."""
        net = dict(ch=TINY_VAE["ch"], ch_mult=TINY_VAE["ch_mult"], num_res_blocks=TINY_VAE["num_res_blocks"],
                   z_channels=TINY_VAE["embed_dim"], resolution=TINY_VAE["image_size"])
        with on_cpu():
            model = self.vae.AutoencoderKL(embed_dim=TINY_VAE["embed_dim"], ch_mult=TINY_VAE["ch_mult"])
            model.encoder, model.decoder = self.vae.Encoder(**net), self.vae.Decoder(**net)
        return model.eval()

    def published_vae(self) -> torch.nn.Module:
        with on_cpu():
            return self.vae.AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)).eval()

    def tiny(self, *, cross: bool) -> torch.nn.Module:
        with on_cpu():
            return self.flowar.FlowAR(
                encoder_embed_dim=TINY_MODEL["dim"], encoder_depth=TINY_MODEL["depth"],
                encoder_num_heads=TINY_MODEL["heads"], decoder_embed_dim=TINY_MODEL["dim"],
                decoder_depth=TINY_MODEL["depth"], decoder_num_heads=TINY_MODEL["heads"], mlp_ratio=4,
                diffloss_d=TINY_MODEL["head_depth"], diffloss_w=TINY_MODEL["head_width"], cross=cross,
                label_drop_prob=0.0)

    def published(self, preset: str) -> torch.nn.Module:
        builder, depth, width = PRESETS[preset]
        with on_cpu():
            return getattr(self.flowar, builder)(diffloss_d=depth, diffloss_w=width, label_drop_prob=0.0)


@torch.no_grad()
def randomize_(model: torch.nn.Module, *, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if param.ndim == 1:
            value = (1.0 if "norm" in name and name.endswith("weight") or name.endswith("_ln.weight") else 0.0) \
                + 0.1 * noise
        elif name == "class_emb.weight" or name.endswith("pos_embed_learned"):
            value = 0.5 * noise
        else:
            value = noise / math.sqrt(param[0].numel())
        param.copy_(value)


def imported(vae: torch.nn.Module, model: torch.nn.Module, preset: str, overrides: list[str], folder: Path
             ) -> pipeline.FinishedRun:
    """The official files in their released layouts (`kl16.ckpt` = {"model": …}, `FlowAR-*.pth` a plain state
    dict) → arvision-import's run, loaded as arvision-sample loads it."""
    tokenizer_file, generator_file = folder / "kl16.ckpt", folder / PRESETS_FILES[preset]
    torch.save({"model": vae.state_dict()}, tokenizer_file)
    torch.save(model.state_dict(), generator_file)
    cfg = compose_import([f"official={preset}", f"tokenizer_file={tokenizer_file}",
                          f"generator_file={generator_file}", *overrides], folder)
    import_official(cfg, folder / "run")
    run = pipeline.load_run(folder / "run")
    run.generator.eval()
    return run


def preset_model(preset: str) -> dict[str, Any]:
    cfg = OmegaConf.load(REPO_ROOT / "conf" / "official" / f"{preset}.yaml")
    model = OmegaConf.to_container(cfg.generator.model, resolve=True)
    return {k: v for k, v in model.items() if k not in ("_target_", "_partial_")}


def sampling_noise(seed: int, rows: int, scales: list[int], steps: int, sde: bool) -> list[tuple[torch.Tensor, list]]:
    """The draws FlowAR's `sample_tokens` makes after `torch.manual_seed(seed)`, in its order: per scale the initial
    noise (rows, s², 16), then (SDE) one float64 `randn_like` per noisy step — steps − 1 of them."""
    torch.manual_seed(seed)
    out = []
    for s in scales:
        start = torch.randn(rows, s * s, 16)
        # the SDE's `randn_like` of its float64 state draws doubles
        steps_noise = [torch.randn(rows, s * s, 16, dtype=torch.float64) for _ in range(steps - 1)] if sde else []
        out.append((start, steps_noise))
    return out


# --------------------------------------------------------------------------------------------- the comparisons
def teacher_forced(official: torch.nn.Module, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z of every position as FlowAR's forward computes it before its loss."""
    model = official.train()  # training mode: the block-causal mask and per-scale RoPE; dropout is 0
    gt = [latents] + [torch.nn.functional.interpolate(latents, (s, s), mode="area") for s in model.scale[::-1][1:]]
    gt = gt[::-1]
    inputs = [torch.nn.functional.interpolate(torch.nn.functional.interpolate(gt[i], (16, 16), mode="bicubic"),
                                              (s, s), mode="area") for i, s in enumerate(model.scale[1:])]
    emb = model.class_emb(labels)
    x = model.z_proj(torch.cat([model.patchify(i) for i in inputs], dim=1))
    x = torch.cat([emb[:, None], x], dim=1)
    with torch.no_grad(), on_cpu():
        z = model.forward_mae_decoder(model.forward_mae_encoder(x, emb, model.mask), emb, model.mask)
    model.eval()
    return z


def official_velocity(official: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """One `flownet` call per scale (as FlowAR's loss and sampler call it), t (B, K) one time per row and scale."""
    out, start = [], 0
    with torch.no_grad(), on_cpu():
        for k, s in enumerate(official.scale):
            part = slice(start, start + s * s)
            out.append(official.flownet(x_t[:, part], t[:, k], z[:, part]))
            start += s * s
    return torch.cat(out, dim=1)


def official_sampling(off: Official, model: torch.nn.Module, labels: torch.Tensor, *, steps: int, cfg: float,
                      guidance: float, sde: bool, seed: int) -> dict[str, torch.Tensor]:
    """`sample_tokens` with the solver's inputs and outputs recorded (z of each cached pass, each scale's latent)."""
    solver = off.sampler.euler_maruyama_sampler if sde else off.sampler.euler_sampler
    conditions, latents = [], []
    rows = labels.shape[0]

    def recorded(flownet, noise, condition, **kwargs):
        out = solver(flownet, noise, condition, **kwargs)
        conditions.append(condition[:rows].clone())
        latents.append(out[:rows].float().clone())
        return out

    original = off.flowar.sampler.euler_sampler
    off.flowar.sampler.euler_sampler = recorded
    try:
        torch.manual_seed(seed)
        with on_cpu(), torch.no_grad():
            model.eval().sample_tokens(num_steps=steps, guidance=guidance, cfg=cfg, labels=labels)
    finally:
        off.flowar.sampler.euler_sampler = original
    return {"conditions z (cached passes)": torch.cat(conditions, dim=1),
            "latents of every scale": torch.cat(latents, dim=1)}


def ours_sampling(generator: FlowARGenerator, labels: torch.Tensor, *, steps: int, cfg: float, guidance: float,
                  sde: bool, seed: int) -> dict[str, torch.Tensor]:
    """`FlowARGenerator.sample` on FlowAR's draws (their conditional rows), recording what the official run
    records."""
    rows = labels.shape[0]
    draws = sampling_noise(seed, 2 * rows, generator.scales, steps, sde)
    conditions, latents = [], []
    backbone, sample = generator.backbone, generator.process.sample

    def spy_backbone(*args: Any, **kwargs: Any) -> torch.Tensor:
        z = backbone(*args, **kwargs)
        conditions.append(z[:rows].clone())
        return z

    def spy_sample(*args: Any, **kwargs: Any):
        out = sample(*args, **kwargs)
        latents.append(out.sample.clone())
        return out

    generator.backbone, generator.process.sample = spy_backbone, spy_sample  # instance attributes, removed below
    try:
        generator.sample(labels, cfg=cfg, steps=steps, guidance_high=guidance,
                         sampler="euler_maruyama" if sde else "euler", noise=[d[0][:rows] for d in draws],
                         step_noise=[[n[:rows] for n in d[1]] for d in draws] if sde else None)
    finally:
        del generator.backbone
        del generator.process.sample
    return {"conditions z (cached passes)": torch.cat(conditions, dim=1),
            "latents of every scale": torch.cat(latents, dim=1)}


def export_check(generator: FlowARGenerator, state: dict[str, torch.Tensor]) -> float:
    """0 when the export writes the official state dict back: same names in the same order, same values."""
    family = FlowARCheckpoints()
    ours, extras = family.generator_to_ours(state, generator)
    back = family.generator_to_official(ours, extras, generator)
    if list(back) != list(state):
        return float(sum(a != b for a, b in zip(back, state)) + abs(len(back) - len(state)))
    return float(sum(not torch.equal(back[k], state[k]) for k in state))


def compare(name: str, size: str, off: Official, vae: torch.nn.Module, official: torch.nn.Module,
            run: pipeline.FinishedRun, labels: torch.Tensor, sample_labels: torch.Tensor, *, cfg: float,
            guidance: float, commit: str, record: dict[str, Any] | None = None) -> list[Row]:
    generator, tokenizer = run.generator, run.tokenizer
    gen = torch.Generator().manual_seed(SEED)
    rows_labels = torch.cat([labels, torch.tensor([1000])])
    latents = torch.randn(rows_labels.shape[0], 16, 16, 16, generator=gen)
    x_t = torch.randn(rows_labels.shape[0], generator.seq_len, 16, generator=gen)
    t = torch.rand(rows_labels.shape[0], len(generator.scales), generator=gen)
    theirs = {"conditions z (teacher-forced)": teacher_forced(official, latents, rows_labels)}
    theirs["velocity"] = official_velocity(official, x_t, t, theirs["conditions z (teacher-forced)"])
    with torch.no_grad():
        z, _ = generator(latents, rows_labels)
        mine = {"conditions z (teacher-forced)": z,
                "velocity": generator.velocity(x_t, t[:, generator.segments], theirs["conditions z (teacher-forced)"],
                                               attn_mask=generator.head_mask)}
    sampled = {}
    for run_name, (steps, sde) in SAMPLING_RUNS.items():
        kw = dict(steps=steps, cfg=cfg, guidance=guidance, sde=sde, seed=SEED + steps + int(sde))
        their_run = official_sampling(off, official, sample_labels, **kw)
        my_run = ours_sampling(generator, sample_labels, **kw)
        sampled[run_name] = their_run
        for out in SAMPLING_TOLERANCE:
            theirs[f"{run_name}: {out}"], mine[f"{run_name}: {out}"] = their_run[out], my_run[out]
    # the image of the Euler run's last scale, as FlowAR's engine.py decodes it (and saves it, clamped)
    last = sampled["euler 25 steps (flowar grid)"]["latents of every scale"][:, -256:]
    last_ours = mine["euler 25 steps (flowar grid): latents of every scale"][:, -256:]
    grid = "b (h w) c -> b c h w"
    with torch.no_grad(), on_cpu():
        image = vae.decode(einops.rearrange(last, grid, h=16) / SCALE)
    with torch.no_grad():
        tokens = einops.rearrange(last_ours, grid, h=16)
        mine[f"{DECODED}, decoder output"] = tokenizer.decode_latents(tokens / tokenizer.scaling_factor)
        mine[f"{DECODED}, clamped"] = tokenizer.decode(tokens)
    theirs[f"{DECODED}, decoder output"], theirs[f"{DECODED}, clamped"] = image, image.clamp(-1, 1)
    tolerance = {**TOLERANCE, **{f"{r}: {o}": v for r in SAMPLING_RUNS for o, v in SAMPLING_TOLERANCE.items()}}
    rows = [Row(FAMILY, name, size, out, max_abs(mine[out], theirs[out]), tolerance[out], commit) for out in theirs]
    rows.append(Row(FAMILY, name, size, "export: names in order, values",
                    export_check(generator, official.state_dict()), 0.0, commit))
    if record is not None:
        record.update(inputs={"latents": latents, "labels": rows_labels, "x_t": x_t, "t": t,
                              "sample_labels": sample_labels}, official=theirs, tolerance=tolerance)
    return rows


def names_and_shapes(off: Official, preset: str, commit: str) -> Row:
    """Every official tensor of the preset's model against what the preset builds (meta device: no weights)."""
    builder, depth, width = PRESETS[preset]
    with torch.device("meta"), on_cpu():
        official = getattr(off.flowar, builder)(diffloss_d=depth, diffloss_w=width)
        state = {k: v for k, v in official.state_dict().items()}
        generator = FlowARGenerator(spec=KL16, num_classes=1000, attention="sdpa", **preset_model(preset))
    ours, _ = FlowARCheckpoints().generator_names(generator).to_ours(state)
    own = generator.state_dict()
    bad = sum(1 for k in own if k not in ours or ours[k].shape != own[k].shape) + sum(1 for k in ours if k not in own)
    params = sum(v.numel() for v in official.parameters()) / 1e6
    return Row(FAMILY, preset, "published", f"names and shapes ({len(state)} tensors, {params:.1f}M parameters)",
               float(bad), 0.0, commit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a FlowAR checkout (OliverRensu/FlowAR)")
    parser.add_argument("--commit", required=True, help="the checkout's commit (parity.csv's official_commit)")
    parser.add_argument("--fixture", action="store_true", help="(re)write tests/fixtures/parity/flowar.pt")
    parser.add_argument("--tiny-only", action="store_true")
    args = parser.parse_args()
    off = Official(args.repo)
    rows: list[Row] = []
    fixture: dict[str, Any] = {"official_commit": args.commit, "seed": SEED, "preset": "flowar_s",
                               "sampling_runs": SAMPLING_RUNS, "settings": {"cfg": 4.3, "guidance": 0.9}}
    torch.manual_seed(0)
    vae = off.tiny_vae()
    randomize_(vae, seed=SEED)
    for head, cross in (("spatial", False), ("cross", True)):
        torch.manual_seed(0)
        official = off.tiny(cross=cross)
        randomize_(official, seed=SEED + 1)
        record: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as folder:
            run = imported(vae, official, "flowar_s", tiny_overrides(head), Path(folder))
            rows += compare(f"tiny {head} head (16-wide, 1 + 1 blocks)", "tiny", off, vae, official, run,
                            torch.tensor([977]), torch.tensor([5, 640]), cfg=4.3, guidance=0.9,
                            commit=args.commit, record=record)
        # the fixture stays small: no mask (341² floats; the tests build FlowAR's themselves), no tokenizer (the
        # decoded images are kl16's parity), the trajectories' latents without the cached passes' conditions; of the
        # cross head only its velocity and one sampling run
        kept = [k for k in record["official"] if "decoded" not in k and "cached passes" not in k and
                (head == "spatial" or k in ("velocity", "euler 25 steps (flowar grid): latents of every scale"))]
        fixture["inputs"] = record["inputs"]  # the same for both heads
        fixture[head] = {"generator": {k: v for k, v in official.state_dict().items() if k != "mask"},
                         "overrides": tiny_overrides(head),
                         "official": {k: record["official"][k] for k in kept},
                         "tolerance": {k: record["tolerance"][k] for k in kept}}
    if not args.tiny_only:
        torch.manual_seed(0)
        vae, official = off.published_vae(), off.published("flowar_s")
        randomize_(vae, seed=SEED)
        randomize_(official, seed=SEED + 1)
        with tempfile.TemporaryDirectory() as folder:
            run = imported(vae, official, "flowar_s", [], Path(folder))
            rows += compare("flowar_s", "published", off, vae, official, run, torch.tensor([207, 980]),
                            torch.tensor([388]), cfg=4.3, guidance=0.9, commit=args.commit)
        del official, run
        rows += [names_and_shapes(off, preset, args.commit) for preset in PRESETS]
    if args.fixture:
        save_fixture(FAMILY, fixture)
    write_rows(FAMILY, rows)


if __name__ == "__main__":
    main()
