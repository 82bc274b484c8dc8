"""Parity of arvision-import's RQ-VAE / RQ-Transformer models with the official code (kakaobrain/rq-vae-transformer).

    python experiments/parity/rq.py --repo <rq-vae-transformer checkout>             # tiny + published → parity.csv
    python experiments/parity/rq.py --repo <rq-vae-transformer checkout> --fixture   # also tests/fixtures/parity/rq.pt
    python experiments/parity/rq.py --repo <rq-vae-transformer checkout> --tiny-only
    python experiments/parity/rq.py --repo <archive of 341395e> --commit 341395e     # a checkout without .git

Needs the checkout (`rqvae/models/rqvae/*`, `rqvae/models/rqtransformer/*`, `rqvae/utils/utils.py`,
`rqvae/optimizer/loss.py`, `configs/imagenet256/*`) and arvision's environment (tqdm, omegaconf; not easydict: the
checkout's `rqvae/utils/config.py` is not imported). One adaptation, in memory only: on Python ≥ 3.11 the checkout's
`rqvae/models/rqtransformer/configs.py` fails at import (a dataclass default that is another dataclass instance);
its text is executed with those two defaults written as `field(default_factory=…)`, which builds the same configs.

For each size the official classes build the RQ-VAE (`RQVAE(**hparams, ddconfig=…)`) and the RQ-Transformer
(`RQTransformer(RQTransformerConfig.create(arch))`) from seeded random weights (1-d parameters moved off 0 and 1,
the EMA counts and sums of the codebook drawn so that they round trip visibly); they are saved as the released
training checkpoints (`{"epoch", "state_dict", "optimizer", "scheduler"}`), imported with arvision-import's code
(`import_official` on conf/import.yaml with official=rq_transformer_821m; tiny: smaller model keys) and loaded as
arvision-sample loads the run. Compared on the same inputs:
- RQ-VAE codes (exact), reconstructions and images decoded from codes (≤ 1e-4; arvision's `decode` clamps to
  [-1, 1], so the official decode is clamped for the comparison);
- the quantiser's input latents (≤ 1e-4); soft codes `get_soft_codes(temp=0.5)` from the images (≤ 1e-4) and, for
  the formula alone, from the same latents (≤ 1e-6), with the stochastic codes drawn from them by the same seed
  (exact);
- the EMA codebook after two training steps of the quantiser from the same seed and latents (weights, EMA counts
  and sums ≤ 1e-5; the codes of both steps exact): RQ-VAE's first-step restarts and per-depth updates of the
  shared book;
- teacher-forced logits `RQTransformer(codes, rqvae, cond)` (≤ 1e-5, fp32);
- the soft-target loss (the configs' `soft_target_cross_entropy`, temperature 0.5, stochastic codes) from the same
  seed and latents; the stage-2 training loop itself is not released, so this composes `get_soft_codes`, the
  forward and `compute_loss(use_soft_target=True)` as the configs name them (≤ 1e-5);
- greedy codes: the official `sample(top_k=1)` (a one-hot multinomial) against `sample(temperature=0)` (exact);
- seeded sampled codes (top-k 16384 or the tiny vocabulary, top-p, temperature 1): the official `sample` draws with
  `torch.multinomial` from the global generator, arvision with the same algorithm from a generator seeded alike
  (`top_p_rule=rq`), so the codes are identical;
- top-k / top-p kept sets of `top_k_logits` + `top_p_probs` against `top_k_filter` + `top_p_filter_rq` (exact);
- for every preset (480M, 821M, 1.4B ×2, 3.8B): the official state dicts' names and shapes, mapped by the import,
  against the models the preset builds (both built on the meta device), mismatches counted.
At the published size (the 821M RQ-Transformer and the 8×8×4 RQ-VAE) the forward runs on 2 sequences and the
RQ-VAE on 1 image at 256 px; greedy and sampled decoding run the 64 × 4 steps for 1 label.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness beside this script
from harness import (  # noqa: E402
    FIXTURES, Row, commit_of, compose_import, max_abs, official_imports, save_fixture, write_rows,
)

from arvision import pipeline
from arvision.generators.sampling import top_k_filter, top_p_filter_rq
from arvision.imports.rq import RQCheckpoints
from arvision.imports.runs import import_official
from arvision.utils.instantiate import instantiate

FAMILY = "rq"
PUBLISHED_PRESET = "rq_transformer_821m"
PRESETS = {  # preset → the checkout's stage-2 config
    "rq_transformer_480m": "in256-rqtransformer-8x8x4-480M.yaml",
    "rq_transformer_821m": "in256-rqtransformer-8x8x4-800M.yaml",
    "rq_transformer_1400m": "in256-rqtransformer-8x8x4-1400M.yaml",
    "rq_transformer_1400m_rqvae_50e": "in256-rqtransformer-8x8x4-1400M.yaml",
    "rq_transformer_3800m": "in256-rqtransformer-8x8x4-3800M.yaml",
}
STAGE1 = "configs/imagenet256/stage1/in256-rqvae-8x8x4.yaml"

# The tiny stand-in: the official classes at CPU size (GroupNorm has 32 groups there: 32 channels is the least).
TINY = dict(image_size=8, num_classes=10, vocab=64, code_dim=8, depth=4, ch=32, ch_mult=[1, 1],
            num_res_blocks=1, z_channels=32, dim=32, body=2, head=2, heads=2)
TINY_OVERRIDES = [
    f"data.image_size={TINY['image_size']}", f"data.num_classes={TINY['num_classes']}",
    f"tokenizer.model.ch={TINY['ch']}", "tokenizer.model.ch_mult=[1,1]",
    f"tokenizer.model.num_res_blocks={TINY['num_res_blocks']}", f"tokenizer.model.z_channels={TINY['z_channels']}",
    f"tokenizer.model.vocab_size={TINY['vocab']}", f"tokenizer.model.code_dim={TINY['code_dim']}",
    f"generator.model.dim={TINY['dim']}", f"generator.model.depth={TINY['body']}",
    f"generator.model.head_depth={TINY['head']}", f"generator.model.heads={TINY['heads']}"]
SEED, SOFT_TEMPERATURE = 7, 0.5
TOP_P = 0.92
SOFT_FROM_IMAGES = f"soft codes (T={SOFT_TEMPERATURE}) from images"
SOFT_SAME = f"soft codes (T={SOFT_TEMPERATURE}), same latents"
KEPT_SETTINGS = [(None, 0.92), (10, 0.8), (None, 0.5), (5, 0.99)]  # (top_k, top_p); None: the whole vocabulary


# --------------------------------------------------------------------------------------------- official models
class Official:
    """The official classes and functions, imported from the checkout (the modules leave sys.modules after)."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        with official_imports(repo):
            configs = types.ModuleType("rqvae.models.rqtransformer.configs")
            path = repo / "rqvae" / "models" / "rqtransformer" / "configs.py"
            source = path.read_text()
            source = source.replace("from dataclasses import dataclass", "from dataclasses import dataclass, field")
            for name in ("AttentionBlockConfig", "AttentionStackConfig"):
                source = source.replace(f"= {name}()", f"= field(default_factory={name})")
            configs.__file__ = str(path)
            sys.modules[configs.__name__] = configs
            try:
                # the checkout's own text, compiled without this file's `from __future__ import annotations`
                exec(compile(source, str(path), "exec", dont_inherit=True), configs.__dict__)  # noqa: S102
                from rqvae.models.rqtransformer import RQTransformer, RQTransformerConfig
                from rqvae.models.rqvae import RQVAE
                from rqvae.optimizer.loss import soft_target_cross_entropy
                from rqvae.utils.utils import top_k_logits, top_p_probs
            finally:
                sys.modules.pop(configs.__name__, None)
        self.RQVAE, self.RQTransformer, self.Config = RQVAE, RQTransformer, RQTransformerConfig
        self.soft_target_cross_entropy = soft_target_cross_entropy
        self.top_k_logits, self.top_p_probs = top_k_logits, top_p_probs

    def rqvae(self, *, hparams: dict, ddconfig: dict) -> torch.nn.Module:
        with contextlib.redirect_stdout(None):  # the Decoder prints its z shape
            return self.RQVAE(**hparams, ddconfig=ddconfig)

    def tiny_rqvae(self) -> torch.nn.Module:
        side = TINY["image_size"] // 2 ** (len(TINY["ch_mult"]) - 1)
        ddconfig = dict(double_z=False, z_channels=TINY["z_channels"], resolution=TINY["image_size"], in_channels=3,
                        out_ch=3, ch=TINY["ch"], ch_mult=TINY["ch_mult"], num_res_blocks=TINY["num_res_blocks"],
                        attn_resolutions=[side], dropout=0.0)
        hparams = dict(bottleneck_type="rq", embed_dim=TINY["code_dim"], n_embed=TINY["vocab"],
                       latent_shape=[side, side, TINY["code_dim"]], code_shape=[side, side, TINY["depth"]],
                       shared_codebook=True, decay=0.99, restart_unused_codes=True, loss_type="mse",
                       latent_loss_weight=0.25)
        return self.rqvae(hparams=hparams, ddconfig=ddconfig)

    def published_rqvae(self) -> torch.nn.Module:
        arch = OmegaConf.to_container(OmegaConf.load(self.repo / STAGE1).arch, resolve=True)
        return self.rqvae(hparams=arch["hparams"], ddconfig=arch["ddconfig"])

    def transformer(self, arch: dict) -> torch.nn.Module:
        return self.RQTransformer(self.Config.create(OmegaConf.create(arch)))

    def tiny_transformer(self) -> torch.nn.Module:
        side = TINY["image_size"] // 2 ** (len(TINY["ch_mult"]) - 1)
        return self.transformer(dict(
            type="rq-transformer", block_size=[side, side, TINY["depth"]], embed_dim=TINY["dim"],
            input_embed_dim=TINY["code_dim"], shared_tok_emb=True, shared_cls_emb=True, input_emb_vqvae=True,
            head_emb_vqvae=True, cumsum_depth_ctx=True, vocab_size_cond=TINY["num_classes"], block_size_cond=1,
            vocab_size=TINY["vocab"], body={"n_layer": TINY["body"], "block": {"n_head": TINY["heads"]}},
            head={"n_layer": TINY["head"], "block": {"n_head": TINY["heads"]}}))

    def published_transformer(self, config: str) -> torch.nn.Module:
        cfg = OmegaConf.load(self.repo / "configs" / "imagenet256" / "stage2" / config)
        arch = OmegaConf.to_container(cfg.arch, resolve=True)
        return self.transformer({**arch, "vocab_size": int(cfg.dataset.vocab_size)})


def randomize_(vae: torch.nn.Module, gpt: torch.nn.Module, *, seed: int) -> None:
    """Weights that exercise every tensor: the classes' own random init (seeded before building), 1-d parameters
    moved off 0 and 1, and the codebook's EMA counts (some below 1, some above) and sums drawn."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (vae, gpt):
            for _, param in model.named_parameters():
                if param.ndim == 1:
                    param.add_(0.1 * torch.randn(param.shape, generator=gen))
        book = vae.quantizer.codebooks[0]  # shared: one module listed D times
        book.cluster_size_ema.copy_(torch.rand(book.cluster_size_ema.shape, generator=gen) * 3)
        book.embed_ema.copy_(book.weight[:-1] * book.cluster_size_ema[:, None]
                             + 0.1 * torch.randn(book.embed_ema.shape, generator=gen))


def official_files(vae: torch.nn.Module, gpt: torch.nn.Module, folder: Path) -> tuple[Path, Path]:
    """The released layout: stage1/model.pt and stage2/model.pt, training checkpoints."""
    paths = folder / "stage1" / "model.pt", folder / "stage2" / "model.pt"
    for model, path in zip((vae, gpt), paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 10, "state_dict": model.state_dict(), "optimizer": {}, "scheduler": {}}, path)
    return paths


def imported(tokenizer_file: Path, generator_file: Path, overrides: list[str], root: Path) -> pipeline.FinishedRun:
    """arvision-import on the official files, then the run as arvision-sample loads it."""
    cfg = compose_import([f"official={PUBLISHED_PRESET}", f"tokenizer_file={tokenizer_file}",
                          f"generator_file={generator_file}", *overrides], root)
    import_official(cfg, root / "run")
    return pipeline.load_run(root / "run")


# --------------------------------------------------------------------------------------------- the comparison
def kept_official(official: Official, logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """The official `sample_from_logits` filters (temperature 1): top_k_logits, softmax, top_p_probs → kept."""
    if top_k is not None:
        logits = official.top_k_logits(logits, top_k)
    return official.top_p_probs(torch.softmax(logits, dim=-1), top_p) > 0


def compare(official: Official, vae: torch.nn.Module, gpt: torch.nn.Module, run: pipeline.FinishedRun, *,
            images: torch.Tensor, labels: torch.Tensor, sample_labels: torch.Tensor, ema_steps: bool = True,
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(official outputs, arvision's outputs) on the same inputs; both models in eval mode, fp32."""
    tokenizer, generator = run.tokenizer.eval(), run.generator.eval()
    vae.eval(), gpt.eval()
    vocab = int(tokenizer.spec.vocab_size)
    theirs: dict[str, torch.Tensor] = {}
    ours: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        theirs["codes"] = vae.get_codes(images)
        ours["codes"] = tokenizer.encode(images)
        theirs["reconstructions"] = vae(images)[0]
        ours["reconstructions"] = tokenizer(images)["recon"]
        theirs["decoded images"] = vae.decode_code(theirs["codes"]).clamp(-1, 1)
        ours["decoded images"] = tokenizer.decode(theirs["codes"])

        latents = tokenizer.latents(images)
        # (B, h, w, dim) contiguous, as the official encode returns it
        theirs["latents"], ours["latents"] = vae.encode(images), latents.permute(0, 2, 3, 1).contiguous()
        theirs[SOFT_FROM_IMAGES] = vae.get_soft_codes(images, temp=SOFT_TEMPERATURE)[0]
        ours[SOFT_FROM_IMAGES] = tokenizer.soft_codes(latents, temperature=SOFT_TEMPERATURE, stochastic=False)[0]
        # the formula alone: both quantisers on the same (arvision's) latents
        theirs[SOFT_SAME] = vae.quantizer.get_soft_codes(ours["latents"], temp=SOFT_TEMPERATURE)[0]
        ours[SOFT_SAME] = ours[SOFT_FROM_IMAGES]
        torch.manual_seed(SEED)
        theirs["stochastic codes, same latents"] = vae.quantizer.get_soft_codes(
            ours["latents"], temp=SOFT_TEMPERATURE, stochastic=True)[1]
        torch.manual_seed(SEED)
        ours["stochastic codes, same latents"] = tokenizer.soft_codes(latents, temperature=SOFT_TEMPERATURE)[1]

        # teacher forcing on the images' codes, one row per label (cycled)
        codes = theirs["codes"].repeat(-(-labels.shape[0] // images.shape[0]), 1, 1, 1)[:labels.shape[0]]
        theirs["logits"] = gpt(codes, vae, cond=labels).flatten(1, 2)
        ours["logits"] = generator(codes, labels)

        # the soft-target loss, from the same seed (stochastic codes drawn inside)
        torch.manual_seed(SEED)
        soft, drawn = vae.quantizer.get_soft_codes(ours["latents"], temp=SOFT_TEMPERATURE, stochastic=True)
        repeat = -(-labels.shape[0] // images.shape[0])
        soft, drawn = soft.repeat(repeat, 1, 1, 1, 1)[:labels.shape[0]], drawn.repeat(repeat, 1, 1, 1)[:labels.shape[0]]
        theirs["soft-target loss"] = gpt.compute_loss(gpt(drawn, vae, cond=labels), soft, use_soft_target=True)
        torch.manual_seed(SEED)
        batch_latents = latents.repeat(repeat, 1, 1, 1)[:labels.shape[0]]
        if repeat == 1:
            ours["soft-target loss"] = generator.loss(batch_latents, labels)["loss"]
        else:  # the official draws once per image and repeats; arvision would draw per row: same draws, repeated
            ours["soft-target loss"] = soft_loss_from(generator, tokenizer, latents, labels, repeat)

        rows = theirs["logits"].flatten(0, 2)
        kept_theirs, kept_ours = [], []
        for top_k, top_p in KEPT_SETTINGS:
            kept_theirs.append(kept_official(official, rows, top_k, top_p))
            kept_ours.append(top_p_filter_rq(top_k_filter(rows, top_k or 0), top_p).isfinite())
        theirs["top-k/top-p kept sets"], ours["top-k/top-p kept sets"] = torch.stack(kept_theirs), torch.stack(kept_ours)

    say("decoding")
    shape = (sample_labels.shape[0], *gpt.block_size)
    theirs["greedy codes"] = gpt.sample(torch.zeros(shape, dtype=torch.long), vae, cond=sample_labels, top_k=1)
    ours["greedy codes"] = generator.sample(sample_labels, temperature=0.0)
    torch.manual_seed(SEED)  # the official sampler draws from the global generator
    theirs[f"sampled codes, top-k {vocab} top-p {TOP_P}"] = gpt.sample(
        torch.zeros(shape, dtype=torch.long), vae, cond=sample_labels, temperature=1.0, top_k=vocab, top_p=TOP_P)
    ours[f"sampled codes, top-k {vocab} top-p {TOP_P}"] = generator.sample(
        sample_labels, temperature=1.0, top_k=vocab, top_p=TOP_P, top_p_rule="rq",
        generator=torch.Generator().manual_seed(SEED))
    if torch.equal(theirs["greedy codes"], theirs[f"sampled codes, top-k {vocab} top-p {TOP_P}"]):
        raise SystemExit("greedy and sampled codes coincide: the sampling row would prove nothing")

    if ema_steps:
        ema_rows(vae, tokenizer, images, theirs, ours)
    return theirs, ours


def soft_loss_from(generator, tokenizer, latents, labels, repeat) -> torch.Tensor:
    """arvision's soft-target loss on the official draws-then-repeat batch (the per-image soft codes repeated)."""
    from arvision.generators.raster import soft_cross_entropy

    soft, drawn = tokenizer.soft_codes(latents, temperature=SOFT_TEMPERATURE)
    soft = soft.repeat(repeat, 1, 1, 1, 1)[:labels.shape[0]]
    drawn = drawn.repeat(repeat, 1, 1, 1)[:labels.shape[0]]
    return soft_cross_entropy(generator(drawn, labels), soft.flatten(1, 2))


def ema_rows(vae: torch.nn.Module, tokenizer: torch.nn.Module, images: torch.Tensor,
             theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    """Two training steps of the quantiser alone from the same seed on the same (arvision's) latents: after the
    first step's restarts the codebook holds tiled copies of the batch 6e-4 apart, so the encoders' ~1e-6
    difference alone would flip near-tied lookups. Both quantisers are restored after."""
    official_q, our_q = vae.quantizer, tokenizer.quantize
    saved_official = {k: v.clone() for k, v in official_q.state_dict().items()}
    saved_ours = {k: v.clone() for k, v in our_q.state_dict().items()}
    with torch.no_grad():
        z_ours = tokenizer.latents(images)
        z_official = z_ours.permute(0, 2, 3, 1).contiguous()
        official_q.train(), our_q.train()
        codes_theirs, codes_ours = [], []
        for step in range(2):
            torch.manual_seed(SEED + step)
            codes_theirs.append(official_q(z_official)[2])
            torch.manual_seed(SEED + step)
            codes_ours.append(our_q(z_ours)[1])
        official_q.eval(), our_q.eval()
        book = official_q.codebooks[0]
        theirs["EMA step: codes of 2 steps"] = torch.stack(codes_theirs)
        ours["EMA step: codes of 2 steps"] = torch.stack(codes_ours)
        theirs["EMA step: codebook"] = book.weight[:-1].clone()
        ours["EMA step: codebook"] = our_q.embedding.weight.clone()
        theirs["EMA step: counts"] = book.cluster_size_ema.clone()
        ours["EMA step: counts"] = our_q.ema_cluster_size[0].clone()
        theirs["EMA step: sums"] = book.embed_ema.clone()
        ours["EMA step: sums"] = our_q.ema_embed_sum[0].clone()
        official_q.load_state_dict(saved_official)
        our_q.load_state_dict(saved_ours)


TOLERANCE = {"reconstructions": 1e-4, "decoded images": 1e-4, "latents": 1e-4, SOFT_FROM_IMAGES: 1e-4, SOFT_SAME: 1e-6,
             "logits": 1e-5, "soft-target loss": 1e-5, "EMA step: codebook": 1e-5, "EMA step: counts": 1e-5,
             "EMA step: sums": 1e-5}


def rows_for(model: str, size: str, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
             commit: str) -> list[Row]:
    return [Row(FAMILY, model, size, output, max_abs(ours[output], theirs[output]), TOLERANCE.get(output, 0.0), commit)
            for output in theirs]


# --------------------------------------------------------------------------------------------- the sizes
def tiny(official: Official, commit: str, *, fixture: bool) -> list[Row]:
    torch.manual_seed(0)
    vae, gpt = official.tiny_rqvae(), official.tiny_transformer()
    randomize_(vae, gpt, seed=1)
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, TINY["image_size"], TINY["image_size"], generator=gen) * 2 - 1
    labels = torch.tensor([3, 7])
    sample_labels = torch.tensor([1, 4, 9])
    with tempfile.TemporaryDirectory() as tmp:
        files = official_files(vae, gpt, Path(tmp))
        state = {"tokenizer": {k: v.clone() for k, v in vae.state_dict().items()},
                 "generator": {k: v.clone() for k, v in gpt.state_dict().items()}}
        run = imported(*files, [*TINY_OVERRIDES], Path(tmp))
        theirs, ours = compare(official, vae, gpt, run, images=images, labels=labels, sample_labels=sample_labels)
    if fixture:
        save_fixture(FAMILY, {
            "about": "RQ-VAE / RQ-Transformer parity: official-layout state dicts of a tiny RQ-VAE and RQ-Transformer "
                     "(seeded random weights), the inputs, and the official code's outputs on them "
                     "(experiments/parity/rq.py --fixture)",
            "official_commit": commit, "overrides": TINY_OVERRIDES, "preset": PUBLISHED_PRESET,
            "state": state, "inputs": {"images": images, "labels": labels, "sample_labels": sample_labels},
            "settings": {"seed": SEED, "soft_temperature": SOFT_TEMPERATURE, "top_p": TOP_P,
                         "kept": [(k or 0, p) for k, p in KEPT_SETTINGS]},
            "official": theirs, "tolerance": TOLERANCE})
    return rows_for("tiny RQ-VAE + 2+2-layer RQ-T", "tiny", theirs, ours, commit)


def published(official: Official, commit: str) -> list[Row]:
    torch.manual_seed(0)
    say(f"building the official {PUBLISHED_PRESET} models")
    vae, gpt = official.published_rqvae(), official.published_transformer(PRESETS[PUBLISHED_PRESET])
    randomize_(vae, gpt, seed=1)
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(1, 3, 256, 256, generator=gen) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        files = official_files(vae, gpt, Path(tmp))
        say("importing")
        run = imported(*files, [], Path(tmp))
        say("comparing")
        theirs, ours = compare(official, vae, gpt, run, images=images, labels=torch.tensor([207, 980]),
                               sample_labels=torch.tensor([388]))
    return rows_for(PUBLISHED_PRESET, "published", theirs, ours, commit)


def structures(official: Official, commit: str) -> list[Row]:
    """For every preset: the official state dicts' names and shapes, mapped by the import, against the models the
    preset builds (both on the meta device: no weights)."""
    rows = []
    family = RQCheckpoints()
    with tempfile.TemporaryDirectory() as tmp:
        for preset, config in PRESETS.items():
            cfg = compose_import([f"official={preset}"], Path(tmp))
            with torch.device("meta"):
                vae, gpt = official.published_rqvae(), official.published_transformer(config)
                tokenizer = instantiate(cfg.tokenizer.model, image_size=int(cfg.data.image_size),
                                        image_channels=int(cfg.data.channels))
                generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=1000)
            mapped = (family.tokenizer_to_ours(vae.state_dict(), tokenizer)[0],
                      family.generator_to_ours(gpt.state_dict(), generator)[0])
            for what, theirs, ours in (("tokenizer", mapped[0], tokenizer), ("generator", mapped[1], generator)):
                a = {k: tuple(v.shape) for k, v in theirs.items()}
                b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
                differ = len(set(a) ^ set(b)) + sum(a[k] != b[k] for k in set(a) & set(b))
                params = sum(p.numel() for p in ours.parameters()) / 1e6
                n_official = len((vae if what == "tokenizer" else gpt).state_dict())
                rows.append(Row(FAMILY, preset, "published",
                                f"{what} names+shapes ({n_official} tensors, {params:.1f}M)", float(differ), 0.0,
                                commit))
    return rows


def say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, type=Path, help="checkout of kakaobrain/rq-vae-transformer")
    parser.add_argument("--fixture", action="store_true", help=f"also write {FIXTURES / (FAMILY + '.pt')}")
    parser.add_argument("--tiny-only", action="store_true", help="skip the published size (no parity.csv)")
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
    rows += published(official, commit)
    say("structures of every preset")
    rows += structures(official, commit)
    write_rows(FAMILY, rows)


if __name__ == "__main__":
    sys.exit(main())
