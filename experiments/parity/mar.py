"""Parity of arvision's MAR (and its import of MAR's files) with the official code (LTH14/mar).

    python experiments/parity/mar.py --repo <LTH14/mar checkout> --commit fe470ac24afb             # → parity.csv
    python experiments/parity/mar.py --repo <LTH14/mar checkout> --commit fe470ac24afb --fixture   # + fixture
    python experiments/parity/mar.py --repo <LTH14/mar checkout> --commit fe470ac24afb --tiny-only

Needs the checkout (`models/mar.py`, `models/diffloss.py`, `models/vae.py`, `diffusion/`) and timm, scipy and tqdm
(in arvision's dev environment). The official code calls `.cuda()` on its masks, orders and noise; the harness runs
it on the CPU with `Tensor.cuda` as the identity, in fp32.

For each size the official `MAR` class is built with seeded random weights (every tensor drawn: 1/√fan-in matrices,
biases ± 0.1, norm scales 1 ± 0.1, class, position, mask and null-class tables of unit-ish scale, and the DiffLoss
MLP's zero-initialised adaLN and output layers too, so gates, modulation and the variance channels all matter),
saved as main_mar.py saves it (`{"model", "model_ema", "optimizer", "epoch", "scaler", "args"}`, with `model` a
perturbed copy so that reading it instead of `model_ema` shows) beside `kl16.ckpt`, and imported with
arvision-import's code (`MARCheckpoints`). The same inputs then go through both, fp32:
- the head conditions z (`forward_mae_encoder` → `forward_mae_decoder`, eval mode) of a masked batch, MAR's orders
  with their first k masked against arvision's reversed orders with their last k masked, two classes and the null
  class (`fake_latent`), ≤ 1e-5;
- the DiffLoss MLP's output (ε and the variance channels) on the same x_t, t and z, ≤ 1e-5;
- the training-loss terms per row (`train_diffusion.training_losses` with given t and noise: the ε-MSE and the VLB
  term, t = 0's decoder NLL included) against `LearnedVarianceDiffusion.loss_terms`, ≤ 1e-5;
- the training loss of a whole batch (`MAR.forward` in training mode, label drop 0.5, 4 copies per token) against
  `MARGenerator.loss` with the orders and mask ratio MAR drew (numpy's stream) and the same torch stream for the
  label drop, t and noise, ≤ 1e-5;
- sampling (`sample_tokens`) from the same seed and orders (MAR's numpy orders, reversed, replayed; both sides draw
  the head's noise from torch's global stream in the same order): the tokens, ≤ 1e-4, for CFG 2.9 with the linear
  schedule (MAR's 100 diffusion steps), CFG 3.0 constant at τ 0.9 and no CFG at τ 0.95 (25 steps), and num_iter = N
  (MAR's clamps keep a token for the last step; 10 steps), the head's sampler respaced per run as `DiffLoss` builds
  it from `num_sampling_steps`; the images MAR's engine decodes from the first run (`vae.decode(tokens / 0.2325)`,
  raw and clamped);
- the export back to MAR's layout (`{"model_ema": …}`): every name, in order, and every value (exact; it fails if the
  import read `model`);
- for MAR-B, -L and -H: the official state-dict names and shapes against the model each preset builds (both on the
  meta device), mismatches counted.
Tiny: a 32-wide one-block encoder and a 24-wide two-block decoder (2 and 3 heads), 4 class slots, a DiffLoss MLP of
2 blocks × 32, on 8×8×16 latents of MAR's `models/vae.py` narrowed to 16-px images (ch 32, ch_mult 1,1, one res
block; `resolution=32` so that attention sits in the encoder's last level, as at 256 px).
Published: MAR-B as `mar_base(buffer_size=64, diffloss_d=6, diffloss_w=1024)` builds it, on the full KL-16; its
sampling run is one image at num_iter 64 (main_mar.py's default) and 100 diffusion steps: the whole script takes
about 9 CPU minutes, most of it that run on both sides (the README's num_iter 256 would take four times as long).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness beside this script
from harness import (  # noqa: E402
    REPO_ROOT, Row, compose_import, max_abs, official_imports, on_cpu, save_fixture, write_rows,
)

from arvision import pipeline
from arvision.generators.mar import MARGenerator, masked_by_order
from arvision.imports.base import read_official
from arvision.imports.mar import MARCheckpoints
from arvision.imports.runs import export_official, import_official
from arvision.tokenizers.base import TokenSpec

FAMILY = "mar"
PRESETS = {"mar_b": ("mar_base", 6, 1024), "mar_l": ("mar_large", 8, 1280),
           "mar_h": ("mar_huge", 12, 1536)}  # preset → (official builder, diffloss_d, diffloss_w)
GENERATOR_FILES = {"mar_b": "mar_base/checkpoint-last.pth", "mar_l": "mar_large/checkpoint-last.pth",
                   "mar_h": "mar_huge/checkpoint-last.pth"}
KL16 = TokenSpec(name="kl16", kind="continuous", layout="grid", grid=(16, 16), dim=16, image_size=256)
SCALE = 0.2325  # engine_mar.py: vae.decode(tokens / 0.2325)
SEED = 13
# the tiny model: (arvision key, MAR keyword, value)
TINY_MODEL = [("dim", "encoder_embed_dim", 32), ("depth", "encoder_depth", 1), ("heads", "encoder_num_heads", 2),
              ("decoder_dim", "decoder_embed_dim", 24), ("decoder_depth", "decoder_depth", 2),
              ("decoder_heads", "decoder_num_heads", 3), ("buffer_size", "buffer_size", 4),
              ("head_depth", "diffloss_d", 2), ("head_width", "diffloss_w", 32)]
TINY_VAE = dict(ch=32, ch_mult=(1, 1), num_res_blocks=1, embed_dim=16, image_size=16, resolution=32)  # → 8×8×16
NO_DROPOUT = ["generator.model.attn_dropout=0.0", "generator.model.proj_dropout=0.0"]  # the training-loss row


def tiny_overrides() -> list[str]:
    """official=mar_b narrowed to the tiny models (arvision-import's overrides)."""
    return [f"data.image_size={TINY_VAE['image_size']}", f"tokenizer.model.ch={TINY_VAE['ch']}",
            "tokenizer.model.ch_mult=[1,1]", f"tokenizer.model.num_res_blocks={TINY_VAE['num_res_blocks']}",
            *[f"generator.model.{ours}={value}" for ours, _, value in TINY_MODEL], *NO_DROPOUT]


TOLERANCE = {"conditions z (masked batch)": 1e-5, "head output (ε, variance)": 1e-5,
             "loss terms: ε-MSE per row": 1e-5, "loss terms: VLB per row": 1e-5,
             "training loss (label drop 0.5, 4 copies)": 1e-5}
SAMPLING_RUNS = {  # name → (num_iter, cfg, cfg_schedule, temperature, the head's diffusion steps)
    "cfg 2.9 linear": (8, 2.9, "linear", 1.0, 100),
    "cfg 3.0 constant, τ 0.9, 25 steps": (8, 3.0, "constant", 0.9, 25),
    "no cfg, τ 0.95, 25 steps": (8, 1.0, "linear", 0.95, 25),
    "cfg 2.9 linear, num_iter = N, 10 steps": (64, 2.9, "linear", 1.0, 10)}
SAMPLING_TOLERANCE = 1e-4
DECODED = "decoded images (cfg 2.9 linear)"
DECODED_TOLERANCE = 1e-4
PUBLISHED_RUN = {"cfg 2.9 linear, num_iter 64, 100 diffusion steps": (64, 2.9, "linear", 1.0, 100)}


# --------------------------------------------------------------------------------------------- official code
class Official:
    def __init__(self, repo: Path) -> None:
        with official_imports(repo):
            from diffusion import create_diffusion
            from models import mar, vae
        self.mar, self.vae, self.create_diffusion = mar, vae, create_diffusion

    def tiny_vae(self) -> torch.nn.Module:
        net = dict(ch=TINY_VAE["ch"], ch_mult=TINY_VAE["ch_mult"], num_res_blocks=TINY_VAE["num_res_blocks"],
                   z_channels=TINY_VAE["embed_dim"], resolution=TINY_VAE["resolution"])
        model = self.vae.AutoencoderKL(embed_dim=TINY_VAE["embed_dim"], ch_mult=TINY_VAE["ch_mult"])
        model.encoder, model.decoder = self.vae.Encoder(**net), self.vae.Decoder(**net)
        return model.eval()

    def published_vae(self) -> torch.nn.Module:
        return self.vae.AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)).eval()

    def tiny(self) -> torch.nn.Module:
        """MAR on an 8×8 grid (img_size 128 at stride 16), no dropout."""
        kw = {theirs: value for _, theirs, value in TINY_MODEL}
        return self.mar.MAR(img_size=128, vae_stride=16, patch_size=1, mlp_ratio=4.0,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), vae_embed_dim=16,
                            attn_dropout=0.0, proj_dropout=0.0, **kw)

    def published(self, preset: str) -> torch.nn.Module:
        builder, depth, width = PRESETS[preset]
        return getattr(self.mar, builder)(buffer_size=64, diffloss_d=depth, diffloss_w=width, attn_dropout=0.0,
                                          proj_dropout=0.0)

    def sampling_steps_(self, model: torch.nn.Module, steps: int) -> None:
        """The head's sampler respaced to `steps`, as `DiffLoss.__init__` builds it from `num_sampling_steps`."""
        model.diffloss.gen_diffusion = self.create_diffusion(timestep_respacing=str(steps), noise_schedule="cosine")


@torch.no_grad()
def randomize_(model: torch.nn.Module, *, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if param.ndim == 1:
            is_scale = name.endswith("weight") and ("norm" in name or name.endswith("_ln.weight"))
            value = (1.0 if is_scale else 0.0) + 0.1 * noise
        elif name in ("class_emb.weight", "fake_latent", "mask_token") or name.endswith("pos_embed_learned"):
            value = 0.5 * noise
        else:
            value = noise / math.sqrt(param[0].numel())
        param.copy_(value)


def training_checkpoint(ema: dict[str, torch.Tensor]) -> dict[str, Any]:
    """main_mar.py's `checkpoint-last.pth`: `model` (here the EMA weights + 1, so reading it would show), the EMA
    copy, the optimizer state, epoch, scaler and the pickled args."""
    raw = {k: v + 1.0 for k, v in ema.items()}
    return {"model": raw, "model_ema": ema, "optimizer": {}, "epoch": 799, "scaler": {},
            "args": argparse.Namespace(model="mar", buffer_size=64)}


def imported(vae: torch.nn.Module, model: torch.nn.Module, preset: str, overrides: list[str], folder: Path
             ) -> tuple[pipeline.FinishedRun, dict[str, torch.Tensor]]:
    """The official files in their released layouts → arvision-import's run, loaded as arvision-sample loads it;
    and the file's `model_ema`."""
    tokenizer_file, generator_file = folder / "kl16.ckpt", folder / GENERATOR_FILES[preset]
    generator_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": vae.state_dict()}, tokenizer_file)
    ema = copy.deepcopy(model.state_dict())
    torch.save(training_checkpoint(ema), generator_file)
    cfg = compose_import([f"official={preset}", f"tokenizer_file={tokenizer_file}",
                          f"generator_file={generator_file}", *overrides], folder)
    import_official(cfg, folder / "run")
    run = pipeline.load_run(folder / "run")
    run.generator.eval()
    return run, ema


def preset_model(preset: str) -> dict[str, Any]:
    cfg = OmegaConf.load(REPO_ROOT / "conf" / "official" / f"{preset}.yaml")
    model = OmegaConf.to_container(cfg.generator.model, resolve=True)
    return {k: v for k, v in model.items() if k not in ("_target_", "_partial_")}


def mar_orders(seed: int, batch: int, seq_len: int) -> torch.Tensor:
    """The orders MAR's `sample_orders` draws after `np.random.seed(seed)` (one `np.random.shuffle` per image)."""
    np.random.seed(seed)
    orders = []
    for _ in range(batch):
        order = np.arange(seq_len)
        np.random.shuffle(order)
        orders.append(order)
    return torch.from_numpy(np.stack(orders)).long()


@contextlib.contextmanager
def replayed(generator: MARGenerator, orders: torch.Tensor, num_masked: int | None = None) -> Iterator[None]:
    """arvision's generator on MAR's orders (reversed: MAR masks their first k, arvision the last k of its own) and
    MAR's masked count, set on the instance (no torch draw, so the torch streams stay aligned)."""
    generator.orders = lambda batch, *, device, generator=None: orders.flip(1).to(device)
    if num_masked is not None:
        generator.num_masked = lambda: num_masked
    try:
        yield
    finally:
        del generator.orders
        if num_masked is not None:
            del generator.num_masked


# --------------------------------------------------------------------------------------------- the comparisons
def official_conditions(official: torch.nn.Module, latents: torch.Tensor, labels: torch.Tensor,
                        orders: torch.Tensor, num_masked: int) -> torch.Tensor:
    """z of every position (eval mode) with MAR's first `num_masked` entries of each order masked."""
    batch, seq_len = orders.shape
    mask = torch.zeros(batch, seq_len).scatter(-1, orders[:, :num_masked], 1.0)
    null = labels == official.num_classes
    emb = official.class_emb(labels.clamp(max=official.num_classes - 1))
    emb = torch.where(null[:, None], official.fake_latent.expand_as(emb), emb)
    with torch.no_grad(), on_cpu():
        x = official.forward_mae_encoder(official.patchify(latents), mask, emb)
        return official.forward_mae_decoder(x, mask)


def ours_conditions(generator: MARGenerator, latents: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor,
                    num_masked: int) -> torch.Tensor:
    masked = masked_by_order(orders.flip(1), num_masked)
    with torch.no_grad():
        h = generator.forward_mae_encoder(generator.sequence(latents), masked, generator.class_embedding(labels))
        return generator.forward_mae_decoder(h, masked)


def official_loss_terms(official: torch.nn.Module, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad(), on_cpu():
        terms = official.diffloss.train_diffusion.training_losses(official.diffloss.net, target, t,
                                                                  dict(c=z), noise=noise)
    return {"loss terms: ε-MSE per row": terms["mse"], "loss terms: VLB per row": terms["vb"]}


def ours_loss_terms(generator: MARGenerator, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor) -> dict[str, torch.Tensor]:
    head = generator.diffloss
    with torch.no_grad():
        x_t = head.train_diffusion.add_noise(target, noise, t)
        mse, vb = head.train_diffusion.loss_terms(head.net(x_t, t.float(), z), target, x_t, noise, t)
    return {"loss terms: ε-MSE per row": mse, "loss terms: VLB per row": vb}


def training_losses(official: torch.nn.Module, generator: MARGenerator, latents: torch.Tensor,
                    labels: torch.Tensor, *, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(MAR's loss, arvision's loss, what MAR drew): `MAR.forward` in training mode after seeding numpy and torch;
    arvision's `loss` on the orders and count MAR drew and the same torch seed."""
    drawn: dict[str, Any] = {}
    sample_orders, random_masking = official.sample_orders, official.random_masking

    def spy_orders(bsz):
        drawn["orders"] = sample_orders(bsz)
        return drawn["orders"]

    def spy_masking(x, orders):
        mask = random_masking(x, orders)
        drawn["num_masked"] = int(mask[0].sum())
        return mask

    official.sample_orders, official.random_masking = spy_orders, spy_masking
    kept = official.label_drop_prob, generator.class_dropout
    official.label_drop_prob, generator.class_dropout = 0.5, 0.5
    try:
        np.random.seed(seed)
        torch.manual_seed(seed)
        with torch.no_grad(), on_cpu():
            theirs = official.train()(latents, labels)
        official.eval()
        torch.manual_seed(seed)
        with torch.no_grad(), replayed(generator, drawn["orders"], drawn["num_masked"]):
            ours = generator.train().loss(latents, labels)["loss"]
        generator.eval()
    finally:
        del official.sample_orders, official.random_masking
        official.label_drop_prob, generator.class_dropout = kept
    return theirs, ours, drawn


def official_sampling(off: Official, official: torch.nn.Module, labels: torch.Tensor, *, num_iter: int,
                      cfg: float, schedule: str, temperature: float, seed: int, steps: int) -> torch.Tensor:
    off.sampling_steps_(official, steps)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad(), on_cpu():
        return official.eval().sample_tokens(labels.shape[0], num_iter=num_iter, cfg=cfg, cfg_schedule=schedule,
                                             labels=labels, temperature=temperature)


def ours_sampling(generator: MARGenerator, labels: torch.Tensor, *, num_iter: int, cfg: float, schedule: str,
                  temperature: float, seed: int, steps: int) -> torch.Tensor:
    orders = mar_orders(seed, labels.shape[0], generator.seq_len)
    torch.manual_seed(seed)
    with replayed(generator, orders):
        return generator.sample(labels, cfg=cfg, num_iter=num_iter, num_sampling_steps=steps,
                                temperature=temperature, cfg_schedule=schedule, remask="random", clip_denoised=0.0)


def export_check(run_dir: Path, ema: dict[str, torch.Tensor], preset: str) -> float:
    """0 when arvision-export writes `{"model_ema": …}` back: the file's EMA names in order and values."""
    with tempfile.TemporaryDirectory() as out:
        written = export_official(run_dir, Path(out))
        back = read_official(Path(out) / GENERATOR_FILES[preset])
        if [p.name for p in written] != ["kl16.ckpt", "checkpoint-last.pth"] or list(back) != ["model_ema"]:
            return 1.0
        back = back["model_ema"]
        if list(back) != list(ema):
            return float(sum(a != b for a, b in zip(back, ema)) + abs(len(back) - len(ema)))
        return float(sum(not torch.equal(back[k], ema[k]) for k in ema))


def compare(name: str, size: str, off: Official, vae: torch.nn.Module, official: torch.nn.Module,
            run: pipeline.FinishedRun, run_dir: Path, ema: dict[str, torch.Tensor], labels: torch.Tensor,
            sample_labels: torch.Tensor, *, runs: dict, num_masked: int, preset: str, commit: str,
            record: dict[str, Any] | None = None) -> list[Row]:
    generator, tokenizer = run.generator, run.tokenizer
    h, w = generator.grid
    gen = torch.Generator().manual_seed(SEED)
    rows_labels = torch.cat([labels, torch.tensor([1000])])  # + the null class
    batch = rows_labels.shape[0]
    latents = torch.randn(batch, 16, h, w, generator=gen)
    orders = mar_orders(SEED, batch, generator.seq_len)
    theirs = {"conditions z (masked batch)": official_conditions(official, latents, rows_labels, orders, num_masked)}
    mine = {"conditions z (masked batch)": ours_conditions(generator, latents, rows_labels, orders, num_masked)}
    z = theirs["conditions z (masked batch)"].reshape(batch * generator.seq_len, -1)
    target = generator.sequence(latents).reshape(batch * generator.seq_len, -1)
    t = torch.randint(0, 1000, (z.shape[0],), generator=gen)
    t[:2] = torch.tensor([0, 999])  # the decoder NLL at t = 0 and the noisiest step
    noise = torch.randn(target.shape, generator=gen)
    x_t = torch.randn(target.shape, generator=gen)
    with torch.no_grad(), on_cpu():
        theirs["head output (ε, variance)"] = official.diffloss.net(x_t, t, z)
    with torch.no_grad():
        mine["head output (ε, variance)"] = generator.diffloss.net(x_t, t.float(), z)
    theirs.update(official_loss_terms(official, target, z, t, noise))
    mine.update(ours_loss_terms(generator, target, z, t, noise))
    their_loss, my_loss, drawn = training_losses(official, generator, latents[:2], labels, seed=SEED + 1)
    theirs["training loss (label drop 0.5, 4 copies)"] = their_loss
    mine["training loss (label drop 0.5, 4 copies)"] = my_loss
    tolerance, sampling_orders, sampling_seeds = dict(TOLERANCE), {}, {}
    for i, (run_name, (num_iter, cfg, schedule, temperature, steps)) in enumerate(runs.items()):
        kw = dict(num_iter=num_iter, cfg=cfg, schedule=schedule, temperature=temperature, seed=SEED + 100 + i,
                  steps=steps)
        sampling_seeds[run_name] = kw["seed"]
        key = f"sampled tokens: {run_name}"
        sampling_orders[run_name] = mar_orders(kw["seed"], sample_labels.shape[0], generator.seq_len)
        theirs[key] = official_sampling(off, official, sample_labels, **kw)
        mine[key] = ours_sampling(generator, sample_labels, **kw)
        tolerance[key] = SAMPLING_TOLERANCE
    first = f"sampled tokens: {next(iter(runs))}"
    with torch.no_grad(), on_cpu():
        image = vae.decode(theirs[first] / SCALE)
    with torch.no_grad():
        mine[f"{DECODED}, decoder output"] = tokenizer.decode_latents(mine[first] / tokenizer.scaling_factor)
        mine[f"{DECODED}, clamped"] = tokenizer.decode(mine[first])
    theirs[f"{DECODED}, decoder output"], theirs[f"{DECODED}, clamped"] = image, image.clamp(-1, 1)
    tolerance[f"{DECODED}, decoder output"] = tolerance[f"{DECODED}, clamped"] = DECODED_TOLERANCE
    rows = [Row(FAMILY, name, size, out, max_abs(mine[out], theirs[out]), tolerance[out], commit) for out in theirs]
    rows.append(Row(FAMILY, name, size, "export (model_ema): names in order, values",
                    export_check(run_dir, ema, preset), 0.0, commit))
    if record is not None:
        record.update(inputs={"latents": latents, "labels": rows_labels, "orders": orders, "num_masked": num_masked,
                              "x_t": x_t, "t": t, "noise": noise, "sample_labels": sample_labels,
                              "train": {"latents": latents[:2], "labels": labels, "seed": SEED + 1,
                                        "orders": drawn["orders"], "num_masked": drawn["num_masked"]},
                              "sampling_orders": sampling_orders, "sampling_seeds": sampling_seeds},
                      official={k: v for k, v in theirs.items() if "decoded" not in k}, tolerance=tolerance)
    return rows


def names_and_shapes(off: Official, preset: str, commit: str) -> Row:
    """Every official tensor of the preset's model against what the preset builds (meta device: no weights)."""
    builder, depth, width = PRESETS[preset]
    with torch.device("meta"), on_cpu():
        official = getattr(off.mar, builder)(buffer_size=64, diffloss_d=depth, diffloss_w=width)
        state = dict(official.state_dict())
        generator = MARGenerator(spec=KL16, num_classes=1000, **preset_model(preset))
    ours, extras = MARCheckpoints().generator_names(generator).to_ours(state)
    own = generator.state_dict()
    bad = sum(1 for k in own if k not in ours or ours[k].shape != own[k].shape) + sum(1 for k in ours if k not in own)
    bad += len(extras) + (list(ours) != list(own))
    params = sum(v.numel() for v in official.parameters()) / 1e6
    return Row(FAMILY, preset, "published", f"names and shapes ({len(state)} tensors, {params:.1f}M parameters)",
               float(bad), 0.0, commit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a MAR checkout (LTH14/mar)")
    parser.add_argument("--commit", required=True, help="the checkout's commit (parity.csv's official_commit)")
    parser.add_argument("--fixture", action="store_true", help="(re)write tests/fixtures/parity/mar.pt")
    parser.add_argument("--tiny-only", action="store_true")
    args = parser.parse_args()
    off = Official(args.repo)
    rows: list[Row] = []
    torch.manual_seed(0)
    vae, official = off.tiny_vae(), off.tiny()
    randomize_(vae, seed=SEED)
    randomize_(official, seed=SEED + 1)
    record: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        run, ema = imported(vae, official, "mar_b", tiny_overrides(), Path(folder))
        rows += compare("tiny (32-wide 1-block encoder, 24-wide 2-block decoder)", "tiny", off, vae, official, run,
                        Path(folder) / "run", ema, torch.tensor([977, 3]), torch.tensor([5, 640]), runs=SAMPLING_RUNS,
                        num_masked=45, preset="mar_b", commit=args.commit, record=record)
    fixture = {"official_commit": args.commit, "seed": SEED, "preset": "mar_b", "overrides": tiny_overrides(),
               "sampling_runs": SAMPLING_RUNS, "generator": ema, **record}
    if not args.tiny_only:
        torch.manual_seed(0)
        vae, official = off.published_vae(), off.published("mar_b")
        randomize_(vae, seed=SEED)
        randomize_(official, seed=SEED + 1)
        with tempfile.TemporaryDirectory() as folder:
            run, ema = imported(vae, official, "mar_b", NO_DROPOUT, Path(folder))
            rows += compare("mar_b", "published", off, vae, official, run, Path(folder) / "run", ema,
                            torch.tensor([207, 980]), torch.tensor([388]), runs=PUBLISHED_RUN,
                            num_masked=200, preset="mar_b", commit=args.commit)
        del official, run, ema
        rows += [names_and_shapes(off, preset, args.commit) for preset in PRESETS]
    if args.fixture:
        save_fixture(FAMILY, fixture)
    write_rows(FAMILY, rows)


if __name__ == "__main__":
    main()
