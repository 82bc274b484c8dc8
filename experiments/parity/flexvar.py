"""Parity of arvision-import's FlexVAR models with the official code (jiaosiyu1999/FlexVAR).

    python experiments/parity/flexvar.py --repo <FlexVAR checkout>              # tiny + FlexVAR-d16 → parity.csv
    python experiments/parity/flexvar.py --repo <FlexVAR checkout> --fixture    # also tests/fixtures/parity/flexvar.pt
    python experiments/parity/flexvar.py --repo <checkout> --published flexvar_d16,flexvar_d24
    python experiments/parity/flexvar.py --repo <archive of 04462cb> --commit 04462cb   # a checkout without .git

Needs the checkout and arvision's environment plus what the official trainer module imports (its per-scale ground
truth `encode_var_wo_firstL` and schedule sampler `gen_curr_patch_nums` live there): `pytz` and
`typed-argument-parser` (`pip install pytz typed-argument-parser`); `models/flexvar.py` imports `huggingface_hub`.
flash-attn and xformers are not used (fp32, CPU).

For each size the official classes build FlexVAE (models/vq_llama.py) and the FlexVAR transformer with seeded random
weights (every tensor drawn: norm scales and biases off 1 and 0, attention log-scales around ln 4, AdaLN gates
open; the usage buffer `quantize.codebook_used` filled so the extras round trip is visible); they are saved in the
released layout (`FlexVAE.pth` = {"model": …}, the transformer a plain state dict) and imported with
arvision-import's code (`import_official`, official=flexvar_d16; tiny: with smaller model keys). The imported run
is loaded as arvision-sample loads it, and the same inputs go through both, fp32:
- FlexVAE: indices of images (`encode`, exact) and the images decoded from them (`decode_code`, ≤ 1e-4);
- per-scale ground truth (the official trainer's `encode_var_wo_firstL`: the continuous latent area-downsampled to
  each side and quantised): targets (exact) and teacher-forcing inputs (≤ 1e-5), on a training schedule drawn by
  `gen_curr_patch_nums` that ends below the grid;
- teacher-forced logits (`forward`, label dropout off) on that schedule and on the 10-step one (≤ 1e-5);
- `autoregressive_infer_cfg` (KV cache, max_pn 16) against `NextScaleGenerator.sample` with cfg = 1 + FlexVAR's:
  greedy (top-k 1 there, temperature 0 here) tokens at every scale, 10 steps and the README's 13-step zero-shot
  schedule (exact), the cached-pass logits (≤ 1e-5), the decoded image (≤ 1e-4); seeded sampling with top-k and
  top-p at 10 and 13 steps (FlexVAR draws with `torch.multinomial` from its generator, arvision with the same
  algorithm from one seeded alike: identical tokens) and the top-k of every draw (FlexVAR's greedy rule at sides
  off 1,2,3,4,5,6,8,10,13,16); the 512-px zero-shot schedule …,16,23,32 with FlexVAR's cfg 3.0 (tokens exact,
  the 32×32-token image ≤ 1e-4);
- top-k / top-p kept sets of `sample_with_top_k_top_p_` against arvision's filters on the guided logits (exact);
- random training schedules: the share of `gen_curr_patch_nums` draws that end below the grid against
  `flexvar_schedule`'s (20 000 draws each; ≤ 0.02 apart);
- for every preset (d16, d20, d24): the official state-dict names and shapes against the models the preset builds
  (arvision's on the meta device), mismatches counted.
Before the rows are written the harness checks that they can fail: the greedy run without guidance, and arvision's
earlier sampler (`cfg_schedule=linear_to_last`, `greedy_off_grid=false`) at 13 steps, give other tokens.
Tiny: FlexVAE with the official Encoder/Decoder narrowed (ch 32, ch_mult 1,1, one res block, z 32; VQ-16 fixes 128,
1,1,2,2,4, two) on 32-px images (a 16×16 grid, so the schedules are FlexVAR's), 32 codes of dim 32, a 2-block
32-wide FlexVAR; weights rounded to fp16 values so the fixture stores them in half the bytes, losslessly.
Published: `build_vae_var` exactly as eval_c2i.py calls it; one 256-px image, two classes, one sampling label.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import math
import random
import sys
import tempfile
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness beside this script
from harness import (  # noqa: E402
    FIXTURES, Row, commit_of, compose_import, max_abs, official_imports, save_fixture, write_rows,
)

import arvision.generators.next_scale as next_scale
from arvision import pipeline
from arvision.generators.sampling import top_k_filter, top_p_filter_var
from arvision.imports.runs import import_official
from arvision.utils.instantiate import instantiate

FAMILY = "flexvar"
PRESETS = {"flexvar_d16": (16, "FlexVARd16-epo179.pth"), "flexvar_d20": (20, "FlexVARd20-epo249.pth"),
           "flexvar_d24": (24, "FlexVARd24-epo349.pth")}
PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)                  # the default (training) schedule
ZERO_SHOT = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16)  # README: zero-shot 13 steps
AT_512 = (*ZERO_SHOT, 23, 32)                           # README: zero-shot 512 px (with --cfg 3.0)
FLEX_CFG, FLEX_CFG_512 = 2.5, 3.0  # FlexVAR's --cfg (VAR's convention); arvision's sample.cfg is 1 + this
SEED = 7
DRAWS = 20_000

TINY = dict(image_size=32, num_classes=10, vocab=32, cvae=32, ch=32, ch_mult=(1, 1), num_res_blocks=1, z=32,
            dim=32, depth=2, heads=2)
TINY_OVERRIDES = [
    f"data.image_size={TINY['image_size']}", f"data.num_classes={TINY['num_classes']}",
    f"tokenizer.model.ch={TINY['ch']}", "tokenizer.model.ch_mult=[1,1]",
    f"tokenizer.model.num_res_blocks={TINY['num_res_blocks']}", f"tokenizer.model.z_channels={TINY['z']}",
    f"tokenizer.model.vocab_size={TINY['vocab']}", f"generator.model.dim={TINY['dim']}",
    f"generator.model.depth={TINY['depth']}", f"generator.model.heads={TINY['heads']}"]


@dataclass
class Settings:
    """What one size compares: labels of the logits rows (the null class added), sampling labels, top-k/top-p."""

    labels: list[int]
    sample_labels: list[int]
    top_k: int                      # of the seeded sampling runs
    top_p: float
    kept: list[tuple[int, float]]   # (top_k, top_p) pairs for the kept sets; top_p 1.0 = off (0 in FlexVAR's call)


TINY_SETTINGS = Settings(labels=[3, 7], sample_labels=[4], top_k=8, top_p=0.95,
                         kept=[(8, 0.95), (0, 0.95), (8, 1.0), (4, 0.8)])
PUBLISHED_SETTINGS = Settings(labels=[207, 980], sample_labels=[388], top_k=900, top_p=0.95,
                              kept=[(900, 0.95), (0, 0.95), (900, 1.0), (50, 0.8)])
TOLERANCE = {"decoded images (indices)": 1e-4, "teacher-forcing inputs (training schedule)": 1e-5,
             "teacher-forced logits (training schedule)": 1e-5, "teacher-forced logits (10 steps)": 1e-5,
             "cached-pass logits (greedy run, 10 steps)": 1e-5, "greedy decoded image (10 steps)": 1e-4,
             "decoded image (512-px schedule)": 1e-4}


# --------------------------------------------------------------------------------------------- official models
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """FlexVAR's constructors print their sizes; keep the harness's output to the rows."""
    original = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        builtins.print = original


@contextlib.contextmanager
def kept_layer_init() -> Iterator[None]:
    """`build_vae_var` switches PyTorch's layer initialisation off on the classes themselves; restore it after, so
    the arvision modules this process builds later are initialised as usual."""
    classes = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm, torch.nn.Conv1d,
               torch.nn.Conv2d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d)
    saved = {cls: cls.__dict__.get("reset_parameters") for cls in classes}
    try:
        yield
    finally:
        for cls, method in saved.items():
            if method is not None:
                cls.reset_parameters = method


class Official:
    """The official builders and functions, imported from the checkout (its modules leave sys.modules after)."""

    def __init__(self, repo: Path) -> None:
        with official_imports(repo), quiet():
            import models
            import trainer
            from models import flexvar, helpers, vq_llama
        self.build_vae_var, self.FlexVAR, self.flexvar_module = models.build_vae_var, flexvar.FlexVAR, flexvar
        self.VQModel, self.ModelArgs, self.VQ_models = vq_llama.VQModel, vq_llama.ModelArgs, vq_llama.VQ_models
        self.Encoder, self.Decoder = vq_llama.Encoder, vq_llama.Decoder
        self.sample_with_top_k_top_p_ = helpers.sample_with_top_k_top_p_
        self.encode_var_wo_firstL = trainer.VARTrainer.encode_var_wo_firstL
        self.gen_curr_patch_nums = trainer.VARTrainer.gen_curr_patch_nums

    def tiny(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        with quiet():
            vae = self.VQModel(self.ModelArgs(codebook_size=TINY["vocab"], codebook_embed_dim=TINY["cvae"],
                                              encoder_ch_mult=list(TINY["ch_mult"]),
                                              decoder_ch_mult=list(TINY["ch_mult"]), z_channels=TINY["z"]))
            net = dict(ch=TINY["ch"], ch_mult=TINY["ch_mult"], num_res_blocks=TINY["num_res_blocks"],
                       z_channels=TINY["z"], dropout=0.0)
            vae.encoder, vae.decoder = self.Encoder(**net), self.Decoder(**net)
            model = self.FlexVAR(vae_local=vae, num_classes=TINY["num_classes"], depth=TINY["depth"],
                                 embed_dim=TINY["dim"], num_heads=TINY["heads"],
                                 drop_path_rate=0.1 * TINY["depth"] / 24,
                                 norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True,
                                 patch_nums=PN, flash_if_available=False, fused_if_available=False)
        return vae.eval(), model.eval()

    def vq16(self) -> torch.nn.Module:
        """FlexVAE as eval_c2i.py builds it (VQ-16, V=8912, Cvae=32), for the file `build_vae_var` loads."""
        with quiet():
            return self.VQ_models["VQ-16"](codebook_size=8912, codebook_embed_dim=32).eval()

    def published(self, depth: int, vae_ckpt: Path, *, device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
        """FlexVAR's own builder, as eval_c2i.py calls it (it loads FlexVAE from `vae_ckpt`)."""
        with quiet(), kept_layer_init():
            vae, model = self.build_vae_var(V=8912, Cvae=32, device=device, num_classes=1000, depth=depth,
                                            shared_aln=False, flash_if_available=False, fused_if_available=False,
                                            vae_ckpt=str(vae_ckpt))
        return vae.eval(), model.eval()


@torch.no_grad()
def randomize_(vae: torch.nn.Module, model: torch.nn.Module, *, seed: int, half_exact: bool = False) -> None:
    """Seeded weights for every tensor, at scales where each one matters: 1/√fan-in for weight matrices and convs
    (the AdaLN gates too: open branches), unit-variance class table and codebook, position grid 0.5, norm scales
    1 ± 0.1, biases ± 0.1, attention log-scales ln 4 ± 0.3; the usage buffer (an extra) filled with code indices.
    `half_exact`: every value rounded to the nearest fp16 one (stored as fp32), so fp16 holds the weights exactly."""
    gen = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    for module in (vae, model):
        for name, param in module.named_parameters():
            if name.endswith("scale_mul_1H11"):
                value = math.log(4.0) + 0.3 * randn(param.shape)
            elif param.ndim == 1:
                value = (1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * randn(param.shape)
            elif name in ("class_emb.weight", "quantize.embedding.weight"):
                value = randn(param.shape)
            elif name.startswith("pos_"):
                value = 0.5 * randn(param.shape)
            else:
                value = randn(param.shape) / math.sqrt(param[0].numel())
            param.copy_(value.half().float() if half_exact else value)
    used = vae.quantize.codebook_used
    used.copy_(torch.randint(0, vae.quantize.n_e, used.shape, generator=gen).to(used.dtype))


def official_files(vae: torch.nn.Module, model: torch.nn.Module, folder: Path,
                   names: tuple[str, str] = ("FlexVAE.pth", "FlexVARd16-epo179.pth")) -> tuple[Path, Path]:
    """The released layout: FlexVAE under `model`, the transformer a plain state dict."""
    tokenizer, generator = folder / names[0], folder / names[1]
    torch.save({"model": vae.state_dict()}, tokenizer)
    torch.save(model.state_dict(), generator)
    return tokenizer, generator


def training_schedule(official: Official) -> tuple[int, ...]:
    """The first `gen_curr_patch_nums` draw (python's random, seeded) that ends below the grid: FlexVAR trains on
    such schedules in about a third of its batches."""
    state = random.getstate()
    random.seed(SEED)
    try:
        while (schedule := tuple(official.gen_curr_patch_nums(None)))[-1] == PN[-1]:
            pass
    finally:
        random.setstate(state)
    return schedule


def below_grid_shares(official: Official) -> tuple[float, float]:
    """Share of training schedules that end below the grid: FlexVAR's sampler against arvision's."""
    state = random.getstate()
    random.seed(SEED)
    try:
        theirs = sum(official.gen_curr_patch_nums(None)[-1] < PN[-1] for _ in range(DRAWS)) / DRAWS
    finally:
        random.setstate(state)
    gen = torch.Generator().manual_seed(SEED)
    ours = sum(next_scale.flexvar_schedule(PN, generator=gen)[-1] < PN[-1] for _ in range(DRAWS)) / DRAWS
    return theirs, ours


# --------------------------------------------------------------------------------------------- arvision side
def imported(preset: str, tokenizer_file: Path, generator_file: Path, overrides: list[str],
             root: Path) -> pipeline.FinishedRun:
    """arvision-import on the official files, then the run as arvision-sample loads it."""
    cfg = compose_import([f"official={preset}", f"tokenizer_file={tokenizer_file}",
                          f"generator_file={generator_file}", *overrides], root)
    import_official(cfg, root / "run")
    return pipeline.load_run(root / "run")


class Draws:
    """Records every draw of a sampler: the logits it was given (before FlexVAR's in-place filtering), its top-k
    and the indices drawn. `official` wraps FlexVAR's `sample_with_top_k_top_p_` in models/flexvar.py, otherwise
    arvision's `sample_from_logits` in next_scale."""

    def __init__(self, official: Official | None = None) -> None:
        self.official, self.logits, self.top_ks, self.indices = official, [], [], []
        self.original = official.sample_with_top_k_top_p_ if official else next_scale.sample_from_logits

    def __call__(self, logits: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.logits.append(logits.clone())
        self.top_ks.append(kwargs["top_k"])
        out = self.original(logits, **kwargs)
        self.indices.append((out[:, :, 0] if self.official else out).clone())
        return out

    def __enter__(self) -> Draws:
        if self.official:
            self.official.flexvar_module.sample_with_top_k_top_p_ = self
        else:
            next_scale.sample_from_logits = self
        return self

    def __exit__(self, *exc: object) -> None:
        if self.official:
            self.official.flexvar_module.sample_with_top_k_top_p_ = self.original
        else:
            next_scale.sample_from_logits = self.original

    @property
    def tokens(self) -> torch.Tensor:
        return torch.cat(self.indices, dim=1)


class HeadCalls:
    """The raw logits of each forward pass of a model's head (one per scale when sampling)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = model.head.register_forward_hook(lambda mod, inp, out: self.outputs.append(out.float()))

    def __enter__(self) -> HeadCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# --------------------------------------------------------------------------------------------- the comparison
def official_sample(official: Official, vae: torch.nn.Module, model: torch.nn.Module, labels: torch.Tensor,
                    schedule: tuple[int, ...], **kwargs: Any) -> tuple[torch.Tensor, Draws]:
    """(FlexVAR's decoded image, its draws) from `autoregressive_infer_cfg` with max_pn 16, as eval_c2i.py."""
    with Draws(official) as draws:
        image = model.autoregressive_infer_cfg(vqvae=vae, B=labels.shape[0], label_B=labels,
                                               infer_patch_nums=schedule, max_pn=PN[-1], more_smooth=False, **kwargs)
    return image, draws


def ours_sample(model: torch.nn.Module, labels: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Draws]:
    """(arvision's sampled grid, its draws)."""
    with Draws() as draws:
        grid = model.sample(labels, **kwargs)
    return grid, draws


def compare(official: Official, vae: torch.nn.Module, model: torch.nn.Module, run: pipeline.FinishedRun, *,
            images: torch.Tensor, settings: Settings, schedule: tuple[int, ...]
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """(official outputs, arvision's, the official guided logits the kept sets are taken on) on the same inputs; both
    in eval mode, fp32. `schedule`: a training schedule for the ground truth and teacher-forced logits."""
    tokenizer, generator = run.tokenizer.eval(), run.generator.eval()
    model.cond_drop_rate = 0.0  # FlexVAR's forward drops labels in eval mode too
    theirs, ours = {}, {}
    side = generator.side
    with torch.no_grad():
        _, _, (_, _, flat) = vae.encode(images)
        grid = flat.view(images.shape[0], side, side)
        theirs["tokenizer indices"] = grid
        ours["tokenizer indices"] = tokenizer.encode(images)
        theirs["decoded images (indices)"] = vae.decode_code(grid, shape=(images.shape[0], vae.Cvae, side, side))
        ours["decoded images (indices)"] = tokenizer.decode_codes(tokenizer.quantize.lookup(grid))

        trainer = types.SimpleNamespace(vae_local=vae)  # encode_var_wo_firstL reads only the VAE
        inputs_theirs, targets_theirs = official.encode_var_wo_firstL(trainer, images, list(schedule))
        per_side = generator.encode(images)
        inputs_ours, targets_ours = generator.teacher_forcing(per_side, schedule)
        theirs["per-scale targets (training schedule)"], ours["per-scale targets (training schedule)"] = (
            targets_theirs, targets_ours)
        theirs["teacher-forcing inputs (training schedule)"] = inputs_theirs
        ours["teacher-forcing inputs (training schedule)"] = inputs_ours

        # logits rows: the images' ground truth (cycled) for each label, and once more for the null class
        labels = torch.tensor([*settings.labels, generator.num_classes])
        rows = [m.repeat(-(-labels.shape[0] // m.shape[0]), 1, 1)[:labels.shape[0]] for m in per_side]
        images_rows = images.repeat(-(-labels.shape[0] // images.shape[0]), 1, 1, 1)[:labels.shape[0]]
        for name, steps in (("training schedule", schedule), ("10 steps", PN)):
            quant, _ = official.encode_var_wo_firstL(trainer, images_rows, list(steps))
            theirs[f"teacher-forced logits ({name})"] = model(labels, quant, list(steps))
            ours[f"teacher-forced logits ({name})"] = generator(rows, labels, schedule=steps)

    sample_labels = torch.tensor(settings.sample_labels)
    cfg = 1 + FLEX_CFG
    # greedy under CFG, 10 steps: top-k 1 there, argmax here; the logits of each KV-cached pass (class, null rows)
    with HeadCalls(model) as official_calls:
        image, draws = official_sample(official, vae, model, sample_labels, PN, g_seed=SEED, cfg=FLEX_CFG, top_k=1,
                                       top_p=0.0)
    theirs["greedy tokens, cfg (10 steps)"] = draws.tokens
    theirs["greedy decoded image (10 steps)"] = image.clamp(-1, 1)
    with HeadCalls(generator) as calls:
        grid, mine = ours_sample(generator, sample_labels, cfg=cfg, temperature=0.0)
    ours["greedy tokens, cfg (10 steps)"], ours["greedy decoded image (10 steps)"] = mine.tokens, tokenizer.decode(grid)
    theirs["cached-pass logits (greedy run, 10 steps)"] = torch.cat(official_calls.outputs, dim=1)
    ours["cached-pass logits (greedy run, 10 steps)"] = torch.cat(calls.outputs, dim=1)

    # greedy under CFG at 13 steps: the ramp's slope past cfg, FlexVAR's top-k 1 at sides off the default schedule
    _, draws = official_sample(official, vae, model, sample_labels, ZERO_SHOT, g_seed=SEED, cfg=FLEX_CFG, top_k=1,
                               top_p=0.0)
    theirs["greedy tokens, cfg (13 steps)"] = draws.tokens
    ours["greedy tokens, cfg (13 steps)"] = ours_sample(generator, sample_labels, cfg=cfg, temperature=0.0,
                                                        schedule=ZERO_SHOT)[1].tokens

    # seeded sampling with top-k and top-p, 10 and 13 steps: the same random stream on both sides
    sampled_logits = None
    for name, steps in (("10 steps", PN), ("13 steps", ZERO_SHOT)):
        _, draws = official_sample(official, vae, model, sample_labels, steps, g_seed=SEED, cfg=FLEX_CFG,
                                   top_k=settings.top_k, top_p=settings.top_p)
        _, mine = ours_sample(generator, sample_labels, cfg=cfg, top_k=settings.top_k, top_p=settings.top_p,
                              schedule=steps, generator=torch.Generator().manual_seed(SEED))
        theirs[f"sampled tokens, cfg top-k top-p ({name})"] = draws.tokens
        ours[f"sampled tokens, cfg top-k top-p ({name})"] = mine.tokens
        theirs[f"top-k of each draw ({name})"] = torch.tensor(draws.top_ks)
        ours[f"top-k of each draw ({name})"] = torch.tensor(mine.top_ks)
        sampled_logits = sampled_logits if sampled_logits is not None else torch.cat(draws.logits, dim=1)

    # zero-shot 512 px: sides 23 and 32 above the grid (full cfg, greedy), the position grid resized past 32
    image, draws = official_sample(official, vae, model, sample_labels, AT_512, g_seed=SEED, cfg=FLEX_CFG_512,
                                   top_k=settings.top_k, top_p=settings.top_p)
    grid, mine = ours_sample(generator, sample_labels, cfg=1 + FLEX_CFG_512, top_k=settings.top_k,
                             top_p=settings.top_p, schedule=AT_512, generator=torch.Generator().manual_seed(SEED))
    theirs["sampled tokens (512-px schedule)"], ours["sampled tokens (512-px schedule)"] = draws.tokens, mine.tokens
    theirs["decoded image (512-px schedule)"] = image.clamp(-1, 1)
    ours["decoded image (512-px schedule)"] = tokenizer.decode(grid)

    # kept sets on the guided logits of the 10-step seeded run, every scale
    kept_theirs, kept_ours = [], []
    for top_k, top_p in settings.kept:
        filtered = sampled_logits.clone()
        official.sample_with_top_k_top_p_(filtered, top_k=top_k, top_p=0.0 if top_p >= 1 else top_p,
                                          rng=torch.Generator().manual_seed(0))
        kept_theirs.append(filtered.isfinite())
        kept_ours.append(top_p_filter_var(top_k_filter(sampled_logits, top_k), top_p).isfinite())
    theirs["top-k/top-p kept sets"], ours["top-k/top-p kept sets"] = torch.stack(kept_theirs), torch.stack(kept_ours)

    check_rows_can_fail(official, vae, model, generator, sample_labels, theirs, settings)
    return theirs, ours, sampled_logits


def check_rows_can_fail(official: Official, vae: torch.nn.Module, model: torch.nn.Module,
                        generator: torch.nn.Module, labels: torch.Tensor, theirs: dict[str, torch.Tensor],
                        settings: Settings) -> None:
    """Guidance changes the greedy sequence, and arvision's earlier sampler (the ramp stretched to the last step, no
    greedy rule) gives other tokens at 13 steps than FlexVAR's: the rows above can fail."""
    _, unguided = official_sample(official, vae, model, labels, PN, g_seed=SEED, cfg=0.0, top_k=1, top_p=0.0)
    if torch.equal(unguided.tokens, theirs["greedy tokens, cfg (10 steps)"]):
        raise SystemExit("the greedy sequences with and without CFG coincide: the CFG rows would prove nothing")
    cfg = 1 + FLEX_CFG
    for what, overrides, key, draw in (
            ("the ramp stretched to the last step", {"cfg_schedule": "linear_to_last"},
             "greedy tokens, cfg (13 steps)", {"temperature": 0.0}),
            ("no greedy draws off the default schedule", {"greedy_off_grid": False},
             "sampled tokens, cfg top-k top-p (13 steps)",
             {"top_k": settings.top_k, "top_p": settings.top_p, "generator": torch.Generator().manual_seed(SEED)}),
            ("both (arvision's earlier sampler)", {"cfg_schedule": "linear_to_last", "greedy_off_grid": False},
             "sampled tokens, cfg top-k top-p (13 steps)",
             {"top_k": settings.top_k, "top_p": settings.top_p, "generator": torch.Generator().manual_seed(SEED)})):
        tokens = ours_sample(generator, labels, cfg=cfg, schedule=ZERO_SHOT, **draw, **overrides)[1].tokens
        differ = int((tokens != theirs[key]).sum())
        print(f"  13 steps with {what}: {differ} of {tokens.numel()} tokens differ from FlexVAR's ({key})")
        if differ == 0:
            raise SystemExit(f"{what} gives FlexVAR's tokens: the 13-step rows would prove nothing")


def rows_for(model: str, size: str, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
             commit: str) -> list[Row]:
    return [Row(FAMILY, model, size, output, max_abs(ours[output].reshape(theirs[output].shape), theirs[output]),
                TOLERANCE.get(output, 0.0), commit) for output in theirs]


def schedule_row(official: Official, commit: str) -> Row:
    theirs, ours = below_grid_shares(official)
    print(f"  training schedules ending below the grid: FlexVAR {theirs:.4f}, arvision {ours:.4f} ({DRAWS} draws)")
    return Row(FAMILY, "gen_curr_patch_nums / flexvar_schedule", "published",
               f"share of training schedules ending below 16 ({theirs:.3f} official, {DRAWS} draws)",
               abs(ours - theirs), 0.02, commit)


# --------------------------------------------------------------------------------------------- the sizes
def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp16 copies of float tensors (the tiny weights are fp16 values: lossless), others as they are."""
    return {k: v.half() if v.is_floating_point() else v.clone() for k, v in state.items()}


def tiny(official: Official, commit: str, *, fixture: bool) -> list[Row]:
    torch.manual_seed(0)
    vae, model = official.tiny()
    randomize_(vae, model, seed=1, half_exact=True)
    images = torch.rand(2, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(2))
    images = images * 2 - 1
    schedule = training_schedule(official)
    with tempfile.TemporaryDirectory() as tmp:
        files = official_files(vae, model, Path(tmp))
        state = {"tokenizer": half(vae.state_dict()),  # the mask buffer (1.8 MB) is rebuilt by the test
                 "generator": half({k: v for k, v in model.state_dict().items() if k != "attn_bias_for_masking"})}
        run = imported("flexvar_d16", *files, TINY_OVERRIDES, Path(tmp))
        theirs, ours, guided = compare(official, vae, model, run, images=images, settings=TINY_SETTINGS,
                                       schedule=schedule)
    if fixture:
        s = TINY_SETTINGS
        save_fixture(FAMILY, {
            "about": "FlexVAR parity: official-layout state dicts of a tiny FlexVAE and FlexVAR (seeded random weights "
                     "of fp16 values, stored as fp16; the official classes; attn_bias_for_masking left out: FlexVAR "
                     "builds it for the 10-step schedule), the inputs, and the official code's outputs on them "
                     "(experiments/parity/flexvar.py --fixture)",
            "official_commit": commit, "overrides": TINY_OVERRIDES, "preset": "flexvar_d16", "state": state,
            "inputs": {"images": images, "labels": torch.tensor(s.labels),
                       "sample_labels": torch.tensor(s.sample_labels), "guided_logits": guided,
                       "training_schedule": torch.tensor(schedule)},
            "settings": {"flexvar_cfg": FLEX_CFG, "flexvar_cfg_512": FLEX_CFG_512, "seed": SEED, "top_k": s.top_k,
                         "top_p": s.top_p, "kept": s.kept, "default": list(PN), "zero_shot": list(ZERO_SHOT),
                         "at_512": list(AT_512)},
            "official": theirs, "tolerance": TOLERANCE})
    return rows_for("tiny FlexVAE + 2-block FlexVAR", "tiny", theirs, ours, commit)


def published(official: Official, preset: str, commit: str) -> list[Row]:
    depth, name = PRESETS[preset]
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.save({"model": official.vq16().state_dict()}, folder / "vae.pth")  # what build_vae_var loads
        vae, model = official.published(depth, folder / "vae.pth")
        randomize_(vae, model, seed=1)
        files = official_files(vae, model, folder, names=("FlexVAE.pth", name))
        run = imported(preset, *files, [], folder)
        theirs, ours, _ = compare(official, vae, model, run, images=images, settings=PUBLISHED_SETTINGS,
                                  schedule=training_schedule(official))
    return rows_for(preset, "published", theirs, ours, commit)


def structures(official: Official, commit: str) -> list[Row]:
    """For every preset: names and shapes of the official state dicts against the models the preset builds (those
    on the meta device; FlexVAR's on the CPU, uninitialised layers as build_vae_var leaves them)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vq = official.vq16()
        torch.save({"model": vq.state_dict()}, Path(tmp) / "vae.pth")  # build_vae_var loads a FlexVAE file
        for preset, (depth, _) in PRESETS.items():
            cfg = compose_import([f"official={preset}"], Path(tmp))
            _, model = official.published(depth, Path(tmp) / "vae.pth")  # FlexVAR's .item() rules out meta
            with torch.device("meta"):
                tokenizer = instantiate(cfg.tokenizer.model, image_size=int(cfg.data.image_size),
                                        image_channels=int(cfg.data.channels))
                generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=1000)
            family = instantiate(cfg.official.family)
            for what, theirs, ours in (("tokenizer", vq, tokenizer), ("generator", model, generator)):
                official_state = dict(theirs.state_dict())
                names = family.tokenizer_names(ours) if what == "tokenizer" else family.generator_names(ours)
                mapped, _ = names.to_ours(official_state)
                a = {k: tuple(v.shape) for k, v in mapped.items()}
                b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
                differ = len(set(a) ^ set(b)) + sum(a[k] != b[k] for k in set(a) & set(b))
                params = sum(p.numel() for p in ours.parameters()) / 1e6
                rows.append(Row(FAMILY, preset, "published",
                                f"{what} names+shapes ({len(official_state)} tensors, {params:.1f}M)",
                                float(differ), 0.0, commit))
            del model, tokenizer, generator
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, type=Path, help="checkout of jiaosiyu1999/FlexVAR")
    parser.add_argument("--fixture", action="store_true", help=f"also write {FIXTURES / (FAMILY + '.pt')}")
    parser.add_argument("--tiny-only", action="store_true", help="skip the published sizes (no results.csv)")
    parser.add_argument("--published", default="flexvar_d16",
                        help=f"comma-separated presets compared at full size ({', '.join(PRESETS)})")
    parser.add_argument("--commit", default=None,
                        help="the official commit, recorded when --repo is an exported archive without .git")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    official, commit = Official(args.repo), args.commit or commit_of(args.repo)
    print("tiny:")
    rows = tiny(official, commit, fixture=args.fixture)
    if args.tiny_only:
        for row in rows:
            print(row.as_csv())
        if any(r.max_abs_diff > r.tolerance for r in rows):
            raise SystemExit(f"{FAMILY}: a row is outside its tolerance")
        return
    rows += [schedule_row(official, commit)] + structures(official, commit)
    for preset in args.published.split(","):
        print(f"{preset}:")
        rows += published(official, preset, commit)
    write_rows(FAMILY, rows)


if __name__ == "__main__":
    sys.exit(main())
