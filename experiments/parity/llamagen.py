"""Parity of arvision-import's LlamaGen models with the official code (FoundationVision/LlamaGen).

    python experiments/parity/llamagen.py --repo <LlamaGen checkout>             # tiny + published → results.csv
    python experiments/parity/llamagen.py --repo <LlamaGen checkout> --fixture   # + tests/fixtures/parity/llamagen.pt
    python experiments/parity/llamagen.py --repo <LlamaGen checkout> --tiny-only
    python experiments/parity/llamagen.py --repo <archive of ce98ec4> --commit ce98ec4   # a checkout without .git

Needs only the checkout (its `tokenizer/tokenizer_image/vq_model.py`, `autoregressive/models/gpt.py`,
`autoregressive/models/generate.py` and `utils/drop_path.py`) and arvision's environment; no other package.

For each size the official builders make the VQ tokenizer (`VQ_models['VQ-16']`, or a narrow one of the same
classes) and the GPT (`GPT_models['GPT-B']`, or a 2-layer `Transformer`) with seeded random weights (norm scales
and biases moved off 1 and 0, the zero-initialised output layer drawn, `quantize.codebook_used` filled so the
extras round trip is visible); they are saved in the released layouts (`{"model": …}` for the tokenizer, a DDP
training file `{"model", "steps", "args": argparse.Namespace}` for the GPT) and imported with arvision-import's
code (`import_official` on conf/import.yaml with official=llamagen_c2i_b_256; tiny: with smaller model keys). The
imported run is loaded as arvision-sample loads it, and the same inputs go through both:
- VQ indices (exact), reconstructions (≤ 1e-4), decoded images from indices (≤ 1e-4; arvision's `decode`
  clamps to [-1, 1], so the official decode is clamped for the comparison);
- teacher-forced logits (≤ 1e-5, fp32);
- greedy token sequences under CFG through the official `generate` (its KV cache, `sample_logits=False`) against
  `RasterGenerator.sample(temperature=0)`: every token guided, and with `cfg_interval` (which tokens are guided);
- seeded sampled sequences (CFG, top-k, top-p, temperature 1): `generate` draws with `torch.multinomial` from the
  global generator, arvision with the same algorithm from a generator seeded alike, so the tokens are identical;
- top-k / top-p kept sets of `top_k_top_p_filtering` against the raster sampler's filters
  (`top_k_filter`, `top_p_filter_llamagen`) on the same logits (exact);
- for every preset (B/L at 256, B/L/XL/XXL/3B at 384): the official GPT's and the VQ's state-dict names and
  shapes against the model the preset builds (built on the meta device: no weights), mismatches counted.
At the published size the forward pass runs on 2 sequences and the VQ on 1 image at 256 px; greedy decoding runs
the 256 steps for 1 label.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness beside this script
from harness import (  # noqa: E402
    FIXTURES, Row, commit_of, compose_import, max_abs, official_imports, save_fixture, write_rows,
)

from arvision import pipeline
from arvision.generators.sampling import top_k_filter, top_p_filter_llamagen
from arvision.imports.runs import import_official
from arvision.utils.instantiate import instantiate

FAMILY = "llamagen"
PUBLISHED_PRESET = "llamagen_c2i_b_256"
PRESETS = {  # preset → (official GPT builder, tokens per side)
    "llamagen_c2i_b_256": ("GPT-B", 16), "llamagen_c2i_l_256": ("GPT-L", 16),
    "llamagen_c2i_b_384": ("GPT-B", 24), "llamagen_c2i_l_384": ("GPT-L", 24), "llamagen_c2i_xl_384": ("GPT-XL", 24),
    "llamagen_c2i_xxl_384": ("GPT-XXL", 24), "llamagen_c2i_3b_384": ("GPT-3B", 24),
}

# The tiny stand-in: the official classes at CPU size. GroupNorm has 32 groups there, so 32 channels is the least.
TINY = dict(image_size=16, num_classes=10, vocab=64, code_dim=8, ch=32, ch_mult=[1, 1], num_res_blocks=1,
            z_channels=32, dim=32, depth=2, heads=2, ffn_hidden=96)
TINY_OVERRIDES = [
    f"data.image_size={TINY['image_size']}", f"data.num_classes={TINY['num_classes']}",
    f"tokenizer.model.ch={TINY['ch']}", "tokenizer.model.ch_mult=[1,1]",
    f"tokenizer.model.num_res_blocks={TINY['num_res_blocks']}", f"tokenizer.model.z_channels={TINY['z_channels']}",
    f"tokenizer.model.vocab_size={TINY['vocab']}", f"generator.model.dim={TINY['dim']}",
    f"generator.model.depth={TINY['depth']}", f"generator.model.heads={TINY['heads']}",
    f"generator.model.ffn_hidden={TINY['ffn_hidden']}"]
# Sampling settings compared (CFG strong enough that guided and unguided greedy sequences differ).
CFG, CFG_INTERVAL, SEED = 4.0, 3, 7
KEPT_SETTINGS = [(0, 0.9), (10, 1.0), (10, 0.8), (900, 0.95)]  # (top_k, top_p); 900 ≥ the tiny vocab: top-k off


# --------------------------------------------------------------------------------------------- official models
class Official:
    """The official builders and functions, imported from the checkout (the modules leave sys.modules after)."""

    def __init__(self, repo: Path) -> None:
        with official_imports(repo):
            from autoregressive.models import generate as generate_module
            from autoregressive.models.gpt import GPT_models, ModelArgs, Transformer
            from tokenizer.tokenizer_image import vq_model
        self.generate, self.top_k_top_p_filtering = generate_module.generate, generate_module.top_k_top_p_filtering
        self.GPT_models, self.ModelArgs, self.Transformer = GPT_models, ModelArgs, Transformer
        self.vq = vq_model

    def tiny_vq(self) -> torch.nn.Module:
        """VQModel with a narrow Encoder/Decoder of the official classes (VQModel fixes ch=128, 2 res blocks)."""
        net = dict(ch=TINY["ch"], ch_mult=TINY["ch_mult"], num_res_blocks=TINY["num_res_blocks"],
                   z_channels=TINY["z_channels"])
        model = self.vq.VQModel(self.vq.ModelArgs(codebook_size=TINY["vocab"], codebook_embed_dim=TINY["code_dim"],
                                                  encoder_ch_mult=TINY["ch_mult"], decoder_ch_mult=TINY["ch_mult"],
                                                  z_channels=TINY["z_channels"]))
        model.encoder, model.decoder = self.vq.Encoder(**net), self.vq.Decoder(**net)
        return model

    def tiny_gpt(self) -> torch.nn.Module:
        side = TINY["image_size"] // 2 ** (len(TINY["ch_mult"]) - 1)
        # multiple_of=32: SwiGLU width find_multiple(int(8·32/3), 32) = 96 (TINY["ffn_hidden"])
        return self.Transformer(self.ModelArgs(dim=TINY["dim"], n_layer=TINY["depth"], n_head=TINY["heads"],
                                               multiple_of=32, vocab_size=TINY["vocab"], block_size=side * side,
                                               num_classes=TINY["num_classes"], cls_token_num=1, model_type="c2i"))

    def gpt(self, name: str, side: int) -> torch.nn.Module:
        # sample_c2i_ddp.py's call
        return self.GPT_models[name](vocab_size=16384, block_size=side * side, num_classes=1000, cls_token_num=1,
                                     model_type="c2i")


def randomize_(vq: torch.nn.Module, gpt: torch.nn.Module, *, seed: int) -> None:
    """Weights that exercise every tensor: the builders' random init (seeded before building), plus norm scales and
    biases moved off 1 and 0, the zero-initialised GPT output layer drawn at a scale that spreads the logits, and
    the codebook-usage ring filled with code ids."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (vq, gpt):
            for _, param in model.named_parameters():
                if param.ndim == 1:
                    param.add_(0.1 * torch.randn(param.shape, generator=gen))
        dim = gpt.output.weight.shape[1]
        gpt.output.weight.copy_(torch.randn(gpt.output.weight.shape, generator=gen) * 2.0 / dim ** 0.5)
        used = vq.quantize.codebook_used
        used.copy_(torch.randint(0, vq.quantize.n_e, used.shape, generator=gen).to(used.dtype))


def official_files(vq: torch.nn.Module, gpt: torch.nn.Module, folder: Path) -> tuple[Path, Path]:
    """The released layouts: the tokenizer under "model", the GPT as a DDP training file."""
    tokenizer, generator = folder / "vq_ds16_c2i.pt", folder / "c2i_B_256.pt"
    torch.save({"model": vq.state_dict()}, tokenizer)
    torch.save({"model": gpt.state_dict(), "steps": 0,
                "args": argparse.Namespace(gpt_model="GPT-B", vq_model="VQ-16", cls_token_num=1, ema=False)},
               generator)
    return tokenizer, generator


# --------------------------------------------------------------------------------------------- arvision side
def imported(tokenizer_file: Path, generator_file: Path, overrides: list[str], root: Path) -> pipeline.FinishedRun:
    """arvision-import on the official files, then the run as arvision-sample loads it."""
    cfg = compose_import([f"official={PUBLISHED_PRESET}", f"tokenizer_file={tokenizer_file}",
                          f"generator_file={generator_file}", *overrides], root)
    import_official(cfg, root / "run")
    return pipeline.load_run(root / "run")


# --------------------------------------------------------------------------------------------- the comparison
def compare(official: Official, vq: torch.nn.Module, gpt: torch.nn.Module, run: pipeline.FinishedRun, *,
            images: torch.Tensor, labels: torch.Tensor, greedy_labels: torch.Tensor,
            kept_settings: list[tuple[int, float]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                             torch.Tensor]:
    """(official outputs, arvision's outputs, the tokens the logits were taken on) for the same inputs; both
    models in eval mode, fp32."""
    tokenizer, generator = run.tokenizer.eval(), run.generator.eval()
    vq.eval(), gpt.eval()
    ours, theirs = {}, {}
    with torch.no_grad():
        _, _, (_, _, flat) = vq.encode(images)
        side = images.shape[-1] // 2 ** (len(vq.config.encoder_ch_mult) - 1)
        theirs["indices"] = flat.view(images.shape[0], side, side)
        ours["indices"] = tokenizer.encode(images)
        theirs["reconstructions"] = vq(images)[0]
        ours["reconstructions"] = tokenizer(images)["recon"]
        shape = [images.shape[0], vq.config.codebook_embed_dim, side, side]
        theirs["decoded images"] = vq.decode_code(theirs["indices"], shape).clamp(-1, 1)
        ours["decoded images"] = tokenizer.decode(theirs["indices"])

        # tokens the logits are taken on: the images' codes, one row per label (cycled)
        tokens = theirs["indices"].flatten(1).repeat(-(-labels.shape[0] // images.shape[0]), 1)[:labels.shape[0]]
        n = tokens.shape[1]
        # the official eval-mode forward with idx and cond_idx covers the 1 + N slots of its RoPE table: feed all N
        # tokens and drop the output after the last one
        theirs["logits"] = gpt(idx=tokens, cond_idx=labels)[0][:, :n]
        ours["logits"] = generator(tokens.view(-1, side, side), labels)

        kept_theirs, kept_ours = [], []
        for top_k, top_p in kept_settings:
            rows = theirs["logits"].flatten(0, 1)
            kept_theirs.append(official.top_k_top_p_filtering(rows.clone(), top_k=top_k, top_p=top_p).isfinite())
            kept_ours.append(top_p_filter_llamagen(top_k_filter(rows, top_k), top_p).isfinite())
        theirs["top-k/top-p kept sets"] = torch.stack(kept_theirs)
        ours["top-k/top-p kept sets"] = torch.stack(kept_ours)

    def official_tokens(**kw: Any) -> torch.Tensor:
        return official.generate(gpt, greedy_labels, n, **kw).long()

    def our_tokens(**kw: Any) -> torch.Tensor:
        return generator.sample(greedy_labels, **kw).flatten(1)

    theirs["greedy tokens, cfg"] = official_tokens(cfg_scale=CFG, sample_logits=False)
    ours["greedy tokens, cfg"] = our_tokens(cfg=CFG, temperature=0.0)
    theirs[f"greedy tokens, cfg_interval={CFG_INTERVAL}"] = official_tokens(cfg_scale=CFG, cfg_interval=CFG_INTERVAL,
                                                                           sample_logits=False)
    ours[f"greedy tokens, cfg_interval={CFG_INTERVAL}"] = our_tokens(cfg=CFG, cfg_interval=CFG_INTERVAL,
                                                                     temperature=0.0)
    top_k, top_p = kept_settings[2]
    torch.manual_seed(SEED)  # generate draws from the global generator
    theirs["sampled tokens, cfg top-k top-p"] = official_tokens(cfg_scale=CFG, top_k=top_k, top_p=top_p)
    ours["sampled tokens, cfg top-k top-p"] = our_tokens(cfg=CFG, top_k=top_k, top_p=top_p,
                                                         generator=torch.Generator().manual_seed(SEED))
    # the rows must be able to fail: CFG changes the greedy sequence, and so do the two tokens by which
    # cfg_interval = k and k − 2 differ (an off-by-two in which tokens are guided)
    if torch.equal(official_tokens(cfg_scale=1.0, sample_logits=False), theirs["greedy tokens, cfg"]):
        raise SystemExit("the greedy sequences with and without CFG coincide: the CFG rows would prove nothing")
    if torch.equal(official_tokens(cfg_scale=CFG, cfg_interval=CFG_INTERVAL - 2, sample_logits=False),
                   theirs[f"greedy tokens, cfg_interval={CFG_INTERVAL}"]):
        raise SystemExit(f"cfg_interval={CFG_INTERVAL} and {CFG_INTERVAL - 2} give the same greedy sequence: "
                         "the cfg_interval row would not tell them apart")
    return theirs, ours, tokens


TOLERANCE = {"indices": 0.0, "reconstructions": 1e-4, "decoded images": 1e-4, "logits": 1e-5}


def rows_for(model: str, size: str, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
             commit: str) -> list[Row]:
    return [Row(FAMILY, model, size, output, max_abs(ours[output], theirs[output]), TOLERANCE.get(output, 0.0), commit)
            for output in theirs]


# --------------------------------------------------------------------------------------------- the sizes
def tiny(official: Official, commit: str, *, fixture: bool) -> list[Row]:
    torch.manual_seed(0)
    vq, gpt = official.tiny_vq(), official.tiny_gpt()
    randomize_(vq, gpt, seed=1)
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, TINY["image_size"], TINY["image_size"], generator=gen) * 2 - 1
    labels = torch.tensor([3, 7])
    greedy_labels = torch.tensor([1, 4, 9])
    with tempfile.TemporaryDirectory() as tmp:
        files = official_files(vq, gpt, Path(tmp))
        state = {"tokenizer": {k: v.clone() for k, v in vq.state_dict().items()},
                 "generator": {k: v.clone() for k, v in gpt.state_dict().items()}}
        run = imported(*files, [*TINY_OVERRIDES], Path(tmp))
        theirs, ours, tokens = compare(official, vq, gpt, run, images=images, labels=labels,
                                       greedy_labels=greedy_labels, kept_settings=KEPT_SETTINGS)
    if fixture:
        save_fixture(FAMILY, {
            "about": "LlamaGen parity: official-layout state dicts of a tiny VQ-16-class tokenizer and GPT (seeded "
                     "random weights), the inputs, and the official code's outputs on them "
                     "(experiments/parity/llamagen.py --fixture)",
            "official_commit": commit, "overrides": TINY_OVERRIDES, "preset": PUBLISHED_PRESET,
            "state": state,
            "inputs": {"images": images, "labels": labels, "tokens": tokens, "greedy_labels": greedy_labels},
            "settings": {"cfg": CFG, "cfg_interval": CFG_INTERVAL, "seed": SEED, "kept": KEPT_SETTINGS,
                         "sampled_top_k": KEPT_SETTINGS[2][0], "sampled_top_p": KEPT_SETTINGS[2][1]},
            "official": theirs, "tolerance": TOLERANCE})
    return rows_for("tiny VQ + 2-layer GPT", "tiny", theirs, ours, commit)


def published(official: Official, commit: str) -> list[Row]:
    torch.manual_seed(0)
    vq, gpt = official.vq.VQ_models["VQ-16"](), official.gpt("GPT-B", 16)
    randomize_(vq, gpt, seed=1)
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(1, 3, 256, 256, generator=gen) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        files = official_files(vq, gpt, Path(tmp))
        run = imported(*files, [], Path(tmp))
        theirs, ours, _ = compare(official, vq, gpt, run, images=images, labels=torch.tensor([207, 980]),
                                  greedy_labels=torch.tensor([388]), kept_settings=KEPT_SETTINGS)
    return rows_for(PUBLISHED_PRESET, "published", theirs, ours, commit)


@contextlib.contextmanager
def cpu_linspace() -> Iterator[None]:
    """The official Transformer calls `.item()` on a `torch.linspace` (its drop-path rates), which a meta tensor
    cannot answer: while the models are built on the meta device, linspace is computed on the CPU."""
    original = torch.linspace
    torch.linspace = lambda *args, **kwargs: original(*args, **{"device": "cpu", **kwargs})
    try:
        yield
    finally:
        torch.linspace = original


def structures(official: Official, commit: str) -> list[Row]:
    """For every preset: names and shapes of the official state dicts against the models the preset builds."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, (builder, side) in PRESETS.items():
            cfg = compose_import([f"official={preset}"], Path(tmp))
            with torch.device("meta"), cpu_linspace():
                vq, gpt = official.vq.VQ_models["VQ-16"](), official.gpt(builder, side)
                tokenizer = instantiate(cfg.tokenizer.model, image_size=int(cfg.data.image_size),
                                        image_channels=int(cfg.data.channels))
                generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=1000)
            for what, theirs, ours, extras in (("tokenizer", vq, tokenizer, {"quantize.codebook_used"}),
                                               ("generator", gpt, generator, set())):
                a = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k not in extras}
                b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
                differ = len(set(a) ^ set(b)) + sum(a[k] != b[k] for k in set(a) & set(b))
                params = sum(p.numel() for p in ours.parameters()) / 1e6
                rows.append(Row(FAMILY, preset, "published",
                                f"{what} names+shapes ({len(a)} tensors, {params:.1f}M)", float(differ), 0.0, commit))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, type=Path, help="checkout of FoundationVision/LlamaGen")
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
    rows += published(official, commit) + structures(official, commit)
    write_rows(FAMILY, rows)


if __name__ == "__main__":
    sys.exit(main())
