"""Parity of `tokenizer=kl16` imported with arvision-import (official=mar_kl16) with MAR's KL-16 VAE (LTH14/mar).

    python experiments/parity/kl16.py --repo <LTH14/mar checkout>               # tiny + published → parity.csv
    python experiments/parity/kl16.py --repo <LTH14/mar checkout> --fixture     # also tests/fixtures/parity/kl16.pt
    python experiments/parity/kl16.py --repo <archive of fe470ac24afb> --commit fe470ac24afb   # no .git
    python experiments/parity/kl16.py --repo <mar checkout> --also <OliverRensu/FlowAR checkout>   # + FlowAR's file

Needs the checkout's `models/vae.py` only (torch and numpy); FlowAR's `models/vae.py` is the same file, which
`--also <FlowAR checkout>` checks byte for byte (one row).

For each size the official classes build the VAE with seeded random weights (every tensor drawn: convs at
1/√fan-in, norm scales 1 ± 0.1, biases ± 0.1), saved as MAR's `kl16.ckpt` ({"model": state_dict}) and imported with
arvision-import's code; the tokenizer is then loaded as stage 2 loads it. The same images go through both, fp32:
- the posterior's mean and standard deviation (`vae.encode(x)`: `.mean`, `.std`; ≤ 1e-4);
- MAR's tokens, `posterior.sample().mul_(0.2325)` (engine_mar.py) with the global stream seeded alike on both
  sides, against `encode` with `encode_posterior: sample` (≤ 1e-4), and the mean × 0.2325 (`mean`);
- the decoder on those tokens, `vae.decode(tokens / 0.2325)` (MAR's sampler), raw and clamped to [-1, 1] as the
  images are saved (≤ 1e-4);
- the export round trip: arvision-export's `kl16.ckpt` against the imported file, every tensor (exact; a `loss.`
  tensor of LDM's training loss rides along as an extra);
- at the published size, the names and shapes of MAR's state dict against the model the preset builds.
Tiny: MAR's Encoder/Decoder narrowed (ch 32, ch_mult 1,1, one res block, 4 latent channels; `resolution=32`, so
its `attn_resolutions=(16,)` puts attention in the encoder's last level, as at 256 px) on 16-px images.
Published: `AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))` exactly as MAR builds it, two 256-px images.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import math
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness beside this script
from harness import (  # noqa: E402
    FIXTURES, Row, commit_of, compose_import, max_abs, official_imports, save_fixture, write_rows,
)

from arvision import pipeline
from arvision.imports.base import read_official
from arvision.imports.runs import export_official, import_official
from arvision.utils.instantiate import instantiate

FAMILY = "kl16"
PRESET = "mar_kl16"
SCALE = 0.2325  # MAR's engine_mar.py
SEED = 7
TINY = dict(image_size=16, ch=32, ch_mult=(1, 1), num_res_blocks=1, embed_dim=4)
TINY_OVERRIDES = [f"data.image_size={TINY['image_size']}", f"tokenizer.model.ch={TINY['ch']}",
                  "tokenizer.model.ch_mult=[1,1]", f"tokenizer.model.num_res_blocks={TINY['num_res_blocks']}",
                  f"tokenizer.model.embed_dim={TINY['embed_dim']}"]
TOLERANCE = {"posterior mean": 1e-4, "posterior std": 1e-4, "tokens: sample × 0.2325 (same noise)": 1e-4,
             "tokens: mean × 0.2325": 1e-4, "decoder output (tokens / 0.2325)": 1e-4,
             "decoded images, clamped": 1e-4}
LOSS_EXTRA = {"loss.logvar": torch.tensor(0.0)}  # an LDM training file's loss tensor (MAR loads strict=False)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """MAR's Decoder prints the shape of z; keep the harness's output to the rows."""
    original = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        builtins.print = original


class Official:
    def __init__(self, repo: Path) -> None:
        with official_imports(repo):
            from models import vae
        self.AutoencoderKL, self.Encoder, self.Decoder = vae.AutoencoderKL, vae.Encoder, vae.Decoder

    def tiny(self) -> torch.nn.Module:
        net = dict(ch=TINY["ch"], ch_mult=TINY["ch_mult"], num_res_blocks=TINY["num_res_blocks"],
                   z_channels=TINY["embed_dim"], resolution=32)
        with quiet():
            model = self.AutoencoderKL(embed_dim=TINY["embed_dim"], ch_mult=TINY["ch_mult"])
            model.encoder, model.decoder = self.Encoder(**net), self.Decoder(**net)
        return model.eval()

    def published(self, device: str = "cpu") -> torch.nn.Module:
        with quiet(), torch.device(device):
            model = self.AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))
        return model.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, *, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if param.ndim == 1:
            param.copy_((1.0 if ".norm" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
        else:
            param.copy_(noise / math.sqrt(param[0].numel()))


def outputs(official: torch.nn.Module, tokenizer: torch.nn.Module, images: torch.Tensor
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(official outputs, arvision's) on `images`; both in eval mode, fp32."""
    theirs, ours = {}, {}
    with torch.no_grad():
        posterior = official.encode(images)
        mine = tokenizer.posterior(images)
        theirs["posterior mean"], ours["posterior mean"] = posterior.mean, mine.mean
        theirs["posterior std"], ours["posterior std"] = posterior.std, mine.std
        torch.manual_seed(SEED)
        theirs["tokens: sample × 0.2325 (same noise)"] = official.encode(images).sample().mul_(SCALE)
        torch.manual_seed(SEED)
        tokenizer.encode_posterior = "sample"
        ours["tokens: sample × 0.2325 (same noise)"] = tokenizer.encode(images)
        theirs["tokens: mean × 0.2325"] = posterior.mean * SCALE
        tokenizer.encode_posterior = "mean"
        ours["tokens: mean × 0.2325"] = tokenizer.encode(images)
        tokenizer.encode_posterior = "sample"
        tokens = theirs["tokens: sample × 0.2325 (same noise)"]
        theirs["decoder output (tokens / 0.2325)"] = official.decode(tokens / SCALE)
        ours["decoder output (tokens / 0.2325)"] = tokenizer.decode_latents(tokens / tokenizer.scaling_factor)
        theirs["decoded images, clamped"] = theirs["decoder output (tokens / 0.2325)"].clamp(-1, 1)
        ours["decoded images, clamped"] = tokenizer.decode(tokens)
    return theirs, ours


def compare(official: torch.nn.Module, images: torch.Tensor, overrides: list[str], model: str, size: str,
            commit: str) -> tuple[list[Row], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Import MAR's file, compare the outputs and the export round trip: (rows, the file's state dict, the official
    outputs)."""
    state = {name: tensor.clone() for name, tensor in official.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.save({"model": {**state, **LOSS_EXTRA}}, root / "kl16.ckpt")
        import_official(compose_import([f"official={PRESET}", f"tokenizer_file={root / 'kl16.ckpt'}", *overrides],
                                       root), root / "run")
        record = pipeline.read_results(root / "run")
        tokenizer = pipeline.load_tokenizer(Path(record["tokenizer_artifact"]))
        theirs, ours = outputs(official, tokenizer, images)
        back = read_official(export_official(root / "run", root / "out")[0])["model"]
    original = {**state, **LOSS_EXTRA}
    differ = float(list(back) != list(original)) + sum(
        0.0 if name in back and torch.equal(back[name], tensor) else 1.0 for name, tensor in original.items())
    rows = [Row(FAMILY, model, size, output, max_abs(ours[output], theirs[output]), TOLERANCE[output], commit)
            for output in theirs]
    rows.append(Row(FAMILY, model, size, f"export round trip ({len(original)} tensors, names and order)", differ, 0.0,
                    commit))
    return rows, state, theirs


def tiny(official: Official, commit: str, *, fixture: bool) -> list[Row]:
    torch.manual_seed(0)
    vae = official.tiny()
    randomize_(vae, seed=1)
    images = torch.rand(2, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(2))
    images = images * 2 - 1
    rows, state, theirs = compare(vae, images, TINY_OVERRIDES, "tiny KL-16 (ch 32, 1,1)", "tiny", commit)
    if fixture:
        save_fixture(FAMILY, {
            "about": "KL-16 parity: the state dict of a tiny MAR KL-16 VAE (MAR's AutoencoderKL with its Encoder and "
                     "Decoder narrowed, seeded random weights), the inputs and MAR's outputs on them "
                     "(experiments/parity/kl16.py --fixture)",
            "official_commit": commit, "overrides": TINY_OVERRIDES, "preset": PRESET, "state": state,
            "inputs": {"images": images, "noise_seed": SEED, "scale": SCALE}, "official": theirs,
            "tolerance": TOLERANCE})
    return rows


def structure(official: Official, commit: str) -> Row:
    """MAR's published state dict (names, shapes) against the model official=mar_kl16 builds."""
    vae = official.published(device="meta")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_import([f"official={PRESET}"], Path(tmp))
    with torch.device("meta"):
        tokenizer = instantiate(cfg.tokenizer.model, image_size=256, image_channels=3)
    family = instantiate(cfg.official.family)
    mapped, _ = family.tokenizer_to_ours(dict(vae.state_dict()), tokenizer)
    a = {k: tuple(v.shape) for k, v in mapped.items()}
    b = {k: tuple(v.shape) for k, v in tokenizer.state_dict().items()}
    differ = len(set(a) ^ set(b)) + sum(a[k] != b[k] for k in set(a) & set(b))
    params = sum(p.numel() for p in vae.parameters()) / 1e6
    return Row(FAMILY, PRESET, "published", f"names+shapes ({len(vae.state_dict())} tensors, {params:.1f}M)",
               float(differ), 0.0, commit)


def published(official: Official, commit: str) -> list[Row]:
    torch.manual_seed(0)
    vae = official.published()
    randomize_(vae, seed=1)
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1
    rows, _, _ = compare(vae, images, [], PRESET, "published", commit)
    return [structure(official, commit), *rows]


def same_file(mar: Path, other: Path, other_commit: str, commit: str) -> Row:
    """FlowAR's models/vae.py against MAR's, byte for byte."""
    equal = (mar / "models" / "vae.py").read_bytes() == (other / "models" / "vae.py").read_bytes()
    return Row(FAMILY, f"FlowAR {other_commit}", "published", "models/vae.py is MAR's, byte for byte",
               0.0 if equal else 1.0, 0.0, commit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, type=Path, help="checkout of LTH14/mar")
    parser.add_argument("--fixture", action="store_true", help=f"also write {FIXTURES / (FAMILY + '.pt')}")
    parser.add_argument("--tiny-only", action="store_true", help="skip the published size (no parity.csv)")
    parser.add_argument("--commit", default=None,
                        help="the official commit, recorded when --repo is an exported archive without .git")
    parser.add_argument("--also", type=Path, default=None,
                        help="a FlowAR checkout whose models/vae.py must be MAR's (one more row)")
    parser.add_argument("--also-commit", default=None, help="that checkout's commit, when it has no .git")
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
    if args.also is not None:
        rows.append(same_file(args.repo, args.also, args.also_commit or commit_of(args.also), commit))
    write_rows(FAMILY, rows)


if __name__ == "__main__":
    sys.exit(main())
