"""Parity of arvision-import's VAR models with the official code (FoundationVision/VAR).

    python experiments/parity/var.py --repo <VAR checkout>             # tiny + published → parity.csv
    python experiments/parity/var.py --repo <VAR checkout> --fixture   # also tests/fixtures/parity/var.pt
    python experiments/parity/var.py --repo <VAR checkout> --tiny-only
    python experiments/parity/var.py --repo <archive of 78b9539> --commit 78b9539   # a checkout without .git

Needs the checkout (its `models/` and `dist.py`) and arvision's environment: `models/var.py` imports
`huggingface_hub` (installed with arvision's dev environment); flash-attn and xformers are not used (fp32, CPU).

For each size the official classes build the VQVAE and the VAR transformer with seeded random weights (every
tensor drawn: norm scales and biases off 1 and 0, attention log-scales around ln 4, code-hit statistics filled so
the extras round trip is visible; VAR's own builder leaves the VQVAE uninitialised); they are saved as the released
plain state dicts and imported with arvision-import's code (`import_official` on conf/import.yaml with
official=var_d16; tiny: with smaller model keys). The imported run is loaded as arvision-sample loads it, and the
same inputs go through both, fp32:
- VQVAE: multi-scale indices of images (`img_to_idxBl`, exact), the teacher-forcing inputs from them
  (`idxBl_to_var_input`, ≤ 1e-5), the images decoded from the indices (`idxBl_to_img`, ≤ 1e-4);
- VAR: teacher-forced logits for two classes and the null class (`forward`, label dropout off, ≤ 1e-5);
- `autoregressive_infer_cfg` (KV cache, VAR's CFG ramp) against `NextScaleGenerator.sample` with cfg = 1 + VAR's:
  greedy (top-k 1 there, temperature 0 here) tokens at every scale (exact), the logits of each cached pass, class
  and null rows (≤ 1e-5) and the decoded image (≤ 1e-4); seeded sampling with top-k and top-p (VAR draws with
  `torch.multinomial` from its generator, arvision with the same algorithm from one seeded alike: identical
  tokens); `more_smooth` (seeded: the image from the Gumbel-softmax codebook mixes, ≤ 1e-3: the softmax at
  temperature τ/(1 + r) ≥ 0.007 magnifies the logits' fp32 differences ~150×) and the mixing function itself on the
  same logits and noise (`gumbel_softmax_with_rng(...) @ codebook` against `smooth_codes`, ≤ 1e-5);
- top-k / top-p kept sets of `sample_with_top_k_top_p_` against arvision's filters on the guided logits (exact);
- a tiny VAR with shared AdaLN (VAR-d36-s's layout): logits and greedy tokens;
- for every preset (d16, d20, d24, d30, d36 at 512 px): the official state-dict names and shapes against the
  models the preset builds (on the meta device: no weights), mismatches counted.
Tiny: the official VQVAE with the official Encoder/Decoder classes narrowed (ch 32, ch_mult 1,1, one res block;
VQVAE fixes 160, 1,1,2,2,4, two), 64 codes of dim 8 on scales 1,2,3,4 (8-px images), a 2-block 32-wide VAR.
Published: `build_vae_var` for VAR-d16 exactly; one 256-px image, two classes, one label for the sampling runs.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import math
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness beside this script
from harness import (  # noqa: E402
    FIXTURES, Row, commit_of, compose_import, max_abs, official_imports, save_fixture, write_rows,
)

from arvision import pipeline
from arvision.generators.next_scale import smooth_codes
from arvision.generators.sampling import top_k_filter, top_p_filter
from arvision.imports.runs import import_official
from arvision.utils.instantiate import instantiate

FAMILY = "var"
PUBLISHED_PRESET = "var_d16"
PRESETS = {"var_d16": (16, False), "var_d20": (20, False), "var_d24": (24, False), "var_d30": (30, False),
           "var_d36": (36, True)}  # preset → (depth, shared AdaLN)
PN_256, PN_512 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

TINY = dict(image_size=8, num_classes=10, vocab=64, cvae=8, ch=32, ch_mult=(1, 1), num_res_blocks=1,
            patch_nums=(1, 2, 3, 4), dim=32, depth=2, heads=2)
TINY_OVERRIDES = [
    f"data.image_size={TINY['image_size']}", f"data.num_classes={TINY['num_classes']}",
    f"tokenizer.model.ch={TINY['ch']}", "tokenizer.model.ch_mult=[1,1]",
    f"tokenizer.model.num_res_blocks={TINY['num_res_blocks']}", f"tokenizer.model.z_channels={TINY['cvae']}",
    f"tokenizer.model.code_dim={TINY['cvae']}", f"tokenizer.model.vocab_size={TINY['vocab']}",
    "tokenizer.model.scales=[1,2,3,4]", f"generator.model.dim={TINY['dim']}",
    f"generator.model.depth={TINY['depth']}", f"generator.model.heads={TINY['heads']}"]
VAR_CFG = 3.0  # VAR's cfg (t at the last scale); arvision's sample.cfg is 1 + this
SEED = 7


@dataclass
class Settings:
    """What one size compares: labels of the logits rows (the null class added), sampling labels, top-k/top-p."""

    labels: list[int]
    sample_labels: list[int]
    top_k: int                      # of the seeded sampling run
    top_p: float
    kept: list[tuple[int, float]]   # (top_k, top_p) pairs for the kept sets; top_p 1.0 = off (0 in VAR's call)


TINY_SETTINGS = Settings(labels=[3, 7], sample_labels=[1, 4, 9], top_k=16, top_p=0.9,
                         kept=[(0, 0.96), (16, 1.0), (16, 0.8), (32, 0.96)])
PUBLISHED_SETTINGS = Settings(labels=[207, 980], sample_labels=[388], top_k=900, top_p=0.96,
                              kept=[(900, 0.96), (0, 0.96), (900, 1.0), (50, 0.8)])
# more_smooth's image: the Gumbel softmax divides the logits by τ/(1 + r), down to 0.0135/2 at the last scale, so
# the logits' fp32 differences (~1e-6) reach the code mixes ~150× larger; the mixing function alone is exact.
TOLERANCE = {"tokenizer indices": 0.0, "teacher-forcing inputs": 1e-5, "decoded images (indices)": 1e-4,
             "teacher-forced logits": 1e-5, "cached-pass logits (greedy run)": 1e-5,
             "greedy decoded image": 1e-4, "more_smooth decoded image (seeded)": 1e-3,
             "more_smooth codebook mix (same logits, noise)": 1e-5}


# --------------------------------------------------------------------------------------------- official models
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """VAR's constructors print their configuration; keep the harness's output to the rows."""
    original = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        builtins.print = original


@contextlib.contextmanager
def kept_layer_init() -> Iterator[None]:
    """`build_vae_var` switches PyTorch's layer initialisation off for good (setattr on the classes); put it back
    after, so the arvision modules this process builds later are initialised as usual."""
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
        with official_imports(repo):
            import models
            from models import basic_vae, helpers, quant, var, vqvae
        self.build_vae_var, self.VAR, self.VQVAE = models.build_vae_var, var.VAR, vqvae.VQVAE
        self.Encoder, self.Decoder, self.var_module = basic_vae.Encoder, basic_vae.Decoder, var
        self.sample_with_top_k_top_p_ = helpers.sample_with_top_k_top_p_
        self.gumbel_softmax_with_rng = helpers.gumbel_softmax_with_rng
        self.quant = quant

    def tiny(self, *, shared_aln: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
        with quiet():
            vae = self.VQVAE(vocab_size=TINY["vocab"], z_channels=TINY["cvae"], ch=TINY["ch"], test_mode=True,
                             share_quant_resi=4, v_patch_nums=TINY["patch_nums"])
            net = dict(ch=TINY["ch"], ch_mult=TINY["ch_mult"], num_res_blocks=TINY["num_res_blocks"], dropout=0.0,
                       in_channels=3, z_channels=TINY["cvae"], using_sa=True, using_mid_sa=True)
            vae.encoder, vae.decoder = self.Encoder(double_z=False, **net), self.Decoder(**net)
            model = self.VAR(vae_local=vae, num_classes=TINY["num_classes"], depth=TINY["depth"],
                             embed_dim=TINY["dim"], num_heads=TINY["heads"], drop_path_rate=0.1 * TINY["depth"] / 24,
                             norm_eps=1e-6, shared_aln=shared_aln, cond_drop_rate=0.1, attn_l2_norm=True,
                             patch_nums=TINY["patch_nums"], flash_if_available=False, fused_if_available=False)
        return vae.eval(), model.eval()

    def published(self, depth: int, *, shared_aln: bool = False, patch_nums: tuple[int, ...] = PN_256,
                  device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
        """VAR's own builder, as its README and demo call it."""
        with quiet(), kept_layer_init():
            vae, model = self.build_vae_var(device=device, patch_nums=patch_nums, V=4096, Cvae=32, ch=160,
                                            share_quant_resi=4, num_classes=1000, depth=depth, shared_aln=shared_aln,
                                            attn_l2_norm=True, flash_if_available=False, fused_if_available=False)
        return vae.eval(), model.eval()


@torch.no_grad()
def randomize_(vae: torch.nn.Module, model: torch.nn.Module, *, seed: int) -> None:
    """Seeded weights for every tensor, at scales where each one matters: 1/√fan-in for weight matrices and convs,
    unit-variance class/level tables and codebook, norm scales 1 ± 0.1, biases ± 0.1, attention log-scales
    ln 4 ± 0.3; the code-hit statistics (an extra) filled. The other buffers stay as VAR builds them."""
    gen = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    for module in (vae, model):
        for name, param in module.named_parameters():
            if name.endswith("scale_mul_1H11"):
                value = math.log(4.0) + 0.3 * randn(param.shape)
            elif param.ndim == 1:
                value = (1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * randn(param.shape)
            elif name in ("class_emb.weight", "lvl_embed.weight", "quantize.embedding.weight"):
                value = randn(param.shape)
            elif name.startswith("pos_") or name.endswith("ada_gss"):
                value = 0.5 * randn(param.shape)
            else:
                value = randn(param.shape) / math.sqrt(param[0].numel())
            param.copy_(value)
    hits = vae.quantize.ema_vocab_hit_SV
    hits.copy_(torch.rand(hits.shape, generator=gen) * 100)


def official_files(vae: torch.nn.Module, model: torch.nn.Module, folder: Path) -> tuple[Path, Path]:
    """The released layout: plain state dicts."""
    tokenizer, generator = folder / "vae_ch160v4096z32.pth", folder / "var_d16.pth"
    torch.save(vae.state_dict(), tokenizer)
    torch.save(model.state_dict(), generator)
    return tokenizer, generator


# --------------------------------------------------------------------------------------------- arvision side
def imported(tokenizer_file: Path, generator_file: Path, overrides: list[str], root: Path) -> pipeline.FinishedRun:
    """arvision-import on the official files, then the run as arvision-sample loads it."""
    cfg = compose_import([f"official={PUBLISHED_PRESET}", f"tokenizer_file={tokenizer_file}",
                          f"generator_file={generator_file}", *overrides], root)
    import_official(cfg, root / "run")
    return pipeline.load_run(root / "run")


class Recorder:
    """Wraps VAR's `sample_with_top_k_top_p_` inside its sampler: records each scale's guided logits (before the
    in-place filtering) and the drawn indices."""

    def __init__(self, official: Official) -> None:
        self.official, self.logits, self.indices = official, [], []

    def __call__(self, logits: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.logits.append(logits.clone())
        out = self.official.sample_with_top_k_top_p_(logits, **kwargs)
        self.indices.append(out[:, :, 0].clone())
        return out

    def __enter__(self) -> Recorder:
        self.official.var_module.sample_with_top_k_top_p_ = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.official.var_module.sample_with_top_k_top_p_ = self.official.sample_with_top_k_top_p_


class HeadCalls:
    """arvision's side of the recording: the raw logits of each forward pass (one per scale)."""

    def __init__(self, generator: torch.nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = generator.head.register_forward_hook(lambda mod, inp, out: self.outputs.append(out.float()))

    def __enter__(self) -> HeadCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# --------------------------------------------------------------------------------------------- the comparison
def official_sample(official: Official, model: torch.nn.Module, labels: torch.Tensor, **kwargs: Any
                    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(VAR's image in [0, 1], its tokens (B, L), its guided logits per scale)."""
    with Recorder(official) as rec:
        image = model.autoregressive_infer_cfg(B=labels.shape[0], label_B=labels, **kwargs)
    return image, torch.cat(rec.indices, dim=1), rec.logits


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.add(1).mul(0.5)  # VAR's sampler returns [0, 1]


def compare(official: Official, vae: torch.nn.Module, model: torch.nn.Module, run: pipeline.FinishedRun, *,
            images: torch.Tensor, settings: Settings
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """(official outputs, arvision's outputs, the official guided logits the kept sets and mixes are taken on) on
    the same inputs; both in eval mode, fp32."""
    tokenizer, generator = run.tokenizer.eval(), run.generator.eval()
    model.cond_drop_rate = 0.0  # VAR drops labels in eval mode too
    ours, theirs = {}, {}
    with torch.no_grad():
        idx_bl = vae.img_to_idxBl(images)
        theirs["tokenizer indices"] = torch.cat(idx_bl, dim=1)
        tokens = tokenizer.encode(images)
        ours["tokenizer indices"] = torch.cat([t.flatten(1) for t in tokens], dim=1)
        maps = [i.view(-1, n, n) for i, n in zip(idx_bl, generator.scales)]
        theirs["teacher-forcing inputs"] = vae.quantize.idxBl_to_var_input(idx_bl)
        ours["teacher-forcing inputs"] = tokenizer.teacher_forcing_inputs(maps)
        theirs["decoded images (indices)"] = vae.idxBl_to_img(idx_bl, same_shape=True, last_one=True)
        ours["decoded images (indices)"] = tokenizer.decode(maps)

        # logits rows: the images' tokens (cycled) for each label, and once more for the null class
        labels = torch.tensor([*settings.labels, generator.num_classes])
        rows = [i.repeat(-(-labels.shape[0] // images.shape[0]), 1)[:labels.shape[0]] for i in idx_bl]
        theirs["teacher-forced logits"] = model(labels, vae.quantize.idxBl_to_var_input(rows))
        ours["teacher-forced logits"] = generator([r.view(-1, n, n) for r, n in zip(rows, generator.scales)], labels)

    sample_labels = torch.tensor(settings.sample_labels)
    # greedy under CFG: top-k 1 there, argmax here
    with HeadCalls(model) as official_calls:
        image, theirs["greedy tokens, cfg"], _ = official_sample(official, model, sample_labels, g_seed=SEED,
                                                                 cfg=VAR_CFG, top_k=1, top_p=0.0)
    theirs["greedy decoded image"] = image
    with HeadCalls(generator) as calls:
        greedy = generator.sample(sample_labels, cfg=1 + VAR_CFG, temperature=0.0)
    ours["greedy tokens, cfg"] = torch.cat([m.flatten(1) for m in greedy], dim=1)
    ours["greedy decoded image"] = to_unit(tokenizer.decode(greedy))
    # the logits of each KV-cached pass (class and null rows) before guidance
    theirs["cached-pass logits (greedy run)"] = torch.cat(official_calls.outputs, dim=1)
    ours["cached-pass logits (greedy run)"] = torch.cat(calls.outputs, dim=1)

    # seeded sampling with top-k and top-p: the same random stream on both sides
    _, theirs["sampled tokens, cfg top-k top-p"], sampled_logits = official_sample(
        official, model, sample_labels, g_seed=SEED, cfg=VAR_CFG, top_k=settings.top_k, top_p=settings.top_p)
    drawn = generator.sample(sample_labels, cfg=1 + VAR_CFG, top_k=settings.top_k, top_p=settings.top_p,
                             generator=torch.Generator().manual_seed(SEED))
    ours["sampled tokens, cfg top-k top-p"] = torch.cat([m.flatten(1) for m in drawn], dim=1)

    # kept sets on the guided logits of that run, every scale
    logits = torch.cat(sampled_logits, dim=1)
    kept_theirs, kept_ours = [], []
    for top_k, top_p in settings.kept:
        filtered = logits.clone()
        official.sample_with_top_k_top_p_(filtered, top_k=top_k, top_p=0.0 if top_p >= 1 else top_p,
                                          rng=torch.Generator().manual_seed(0))
        kept_theirs.append(filtered.isfinite())
        kept_ours.append(top_p_filter(top_k_filter(logits, top_k), top_p).isfinite())
    theirs["top-k/top-p kept sets"], ours["top-k/top-p kept sets"] = torch.stack(kept_theirs), torch.stack(kept_ours)

    # more_smooth: seeded image, and the mixing function on the same logits and noise
    theirs["more_smooth decoded image (seeded)"], _, _ = official_sample(
        official, model, sample_labels, g_seed=SEED, cfg=VAR_CFG, top_k=settings.top_k, top_p=settings.top_p,
        more_smooth=True)
    smooth = generator.sample(sample_labels, cfg=1 + VAR_CFG, top_k=settings.top_k, top_p=settings.top_p,
                              more_smooth=True, generator=torch.Generator().manual_seed(SEED))
    ours["more_smooth decoded image (seeded)"] = to_unit(tokenizer.decode(smooth))
    codebook, filtered = vae.quantize.embedding.weight, top_k_filter(logits, settings.top_k)
    mixes_theirs, mixes_ours = [], []
    for ratio in (0.0, 0.5, 1.0):
        tau = max(0.27 * (1 - ratio * 0.95), 0.005)  # the annealing as VAR's sampler writes it
        mixes_theirs.append(official.gumbel_softmax_with_rng(
            filtered.mul(1 + ratio), tau=tau, hard=False, dim=-1, rng=torch.Generator().manual_seed(SEED)) @ codebook)
        mixes_ours.append(smooth_codes(filtered, tokenizer.code_vectors(), ratio=ratio,
                                       generator=torch.Generator().manual_seed(SEED)))
    theirs["more_smooth codebook mix (same logits, noise)"] = torch.stack(mixes_theirs)
    ours["more_smooth codebook mix (same logits, noise)"] = torch.stack(mixes_ours)

    # the rows must be able to fail: guidance changes the greedy sequence
    _, unguided, _ = official_sample(official, model, sample_labels, g_seed=SEED, cfg=0.0, top_k=1, top_p=0.0)
    if torch.equal(unguided, theirs["greedy tokens, cfg"]):
        raise SystemExit("the greedy sequences with and without CFG coincide: the CFG rows would prove nothing")
    return theirs, ours, logits


def saln_rows(official: Official, commit: str) -> list[Row]:
    """A tiny VAR with shared AdaLN (VAR-d36-s's layout): logits and greedy tokens."""
    torch.manual_seed(0)
    vae, model = official.tiny(shared_aln=True)
    randomize_(vae, model, seed=3)
    model.cond_drop_rate = 0.0
    labels = torch.tensor([2, 5, TINY["num_classes"]])
    with tempfile.TemporaryDirectory() as tmp:
        files = official_files(vae, model, Path(tmp))
        run = imported(*files, [*TINY_OVERRIDES, "generator.model.shared_aln=true"], Path(tmp))
        generator = run.generator.eval()
        with torch.no_grad():
            tokens = [torch.randint(0, TINY["vocab"], (3, n * n), generator=torch.Generator().manual_seed(n))
                      for n in TINY["patch_nums"]]
            theirs_logits = model(labels, vae.quantize.idxBl_to_var_input(tokens))
            ours_logits = generator([t.view(3, n, n) for t, n in zip(tokens, TINY["patch_nums"])], labels)
        _, theirs_greedy, _ = official_sample(official, model, labels[:2], g_seed=SEED, cfg=VAR_CFG, top_k=1,
                                              top_p=0.0)
        ours_greedy = torch.cat([m.flatten(1) for m in generator.sample(labels[:2], cfg=1 + VAR_CFG,
                                                                         temperature=0.0)], dim=1)
    model_name = "tiny VAR, shared AdaLN"
    return [Row(FAMILY, model_name, "tiny", "teacher-forced logits", max_abs(ours_logits, theirs_logits), 1e-5,
                commit),
            Row(FAMILY, model_name, "tiny", "greedy tokens, cfg", max_abs(ours_greedy, theirs_greedy), 0.0, commit)]


def rows_for(model: str, size: str, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
             commit: str) -> list[Row]:
    return [Row(FAMILY, model, size, output, max_abs(ours[output], theirs[output]), TOLERANCE.get(output, 0.0), commit)
            for output in theirs]


# --------------------------------------------------------------------------------------------- the sizes
def tiny(official: Official, commit: str, *, fixture: bool) -> list[Row]:
    torch.manual_seed(0)
    vae, model = official.tiny()
    randomize_(vae, model, seed=1)
    images = torch.rand(2, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(2))
    images = images * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        files = official_files(vae, model, Path(tmp))
        state = {"tokenizer": {k: v.clone() for k, v in vae.state_dict().items()},
                 "generator": {k: v.clone() for k, v in model.state_dict().items()}}
        run = imported(*files, TINY_OVERRIDES, Path(tmp))
        theirs, ours, guided = compare(official, vae, model, run, images=images, settings=TINY_SETTINGS)
    if fixture:
        s = TINY_SETTINGS
        save_fixture(FAMILY, {
            "about": "VAR parity: official-layout state dicts of a tiny VQVAE and VAR (seeded random weights, the "
                     "official classes), the inputs, and the official code's outputs on them "
                     "(experiments/parity/var.py --fixture)",
            "official_commit": commit, "overrides": TINY_OVERRIDES, "preset": PUBLISHED_PRESET, "state": state,
            "inputs": {"images": images, "labels": torch.tensor(s.labels),
                       "sample_labels": torch.tensor(s.sample_labels), "guided_logits": guided},
            "settings": {"var_cfg": VAR_CFG, "seed": SEED, "top_k": s.top_k, "top_p": s.top_p, "kept": s.kept},
            "official": theirs, "tolerance": TOLERANCE})
    return rows_for("tiny VQVAE + 2-block VAR", "tiny", theirs, ours, commit) + saln_rows(official, commit)


def published(official: Official, commit: str) -> list[Row]:
    torch.manual_seed(0)
    vae, model = official.published(16)
    randomize_(vae, model, seed=1)
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        files = official_files(vae, model, Path(tmp))
        run = imported(*files, [], Path(tmp))
        theirs, ours, _ = compare(official, vae, model, run, images=images, settings=PUBLISHED_SETTINGS)
    return rows_for(PUBLISHED_PRESET, "published", theirs, ours, commit)


def structures(official: Official, commit: str) -> list[Row]:
    """For every preset: names and shapes of the official state dicts against the models the preset builds."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, (depth, shared_aln) in PRESETS.items():
            cfg = compose_import([f"official={preset}"], Path(tmp))
            patch_nums = tuple(cfg.tokenizer.model.scales)
            vae, model = official.published(depth, shared_aln=shared_aln, patch_nums=patch_nums, device="meta")
            with torch.device("meta"):
                tokenizer = instantiate(cfg.tokenizer.model, image_size=int(cfg.data.image_size),
                                        image_channels=int(cfg.data.channels))
                generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=1000)
            family = instantiate(cfg.official.family)
            for what, theirs, ours in (("tokenizer", vae, tokenizer), ("generator", model, generator)):
                official_state = dict(theirs.state_dict())
                if what == "tokenizer":  # VAR's fused qkv becomes the three tensors arvision holds
                    mapped, _ = family.tokenizer_to_ours(official_state, ours)
                else:  # (the buffers' values are checked by the imports above, not on the meta device)
                    mapped, _ = family.generator_names(ours).to_ours(official_state)
                a = {k: tuple(v.shape) for k, v in mapped.items()}
                b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
                differ = len(set(a) ^ set(b)) + sum(a[k] != b[k] for k in set(a) & set(b))
                params = sum(p.numel() for p in ours.parameters()) / 1e6
                rows.append(Row(FAMILY, preset, "published",
                                f"{what} names+shapes ({len(official_state)} tensors, {params:.1f}M)",
                                float(differ), 0.0, commit))
            del vae, model, tokenizer, generator
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, type=Path, help="checkout of FoundationVision/VAR")
    parser.add_argument("--fixture", action="store_true", help=f"also write {FIXTURES / (FAMILY + '.pt')}")
    parser.add_argument("--tiny-only", action="store_true", help="skip the published size (no results.csv)")
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
    rows += structures(official, commit) + published(official, commit)
    write_rows(FAMILY, rows)


if __name__ == "__main__":
    sys.exit(main())
