"""Zero-shot editing (in-painting, out-painting) by teacher-forcing the known tokens: the pieces both generators share.

VAR's zero-shot tasks need no training: the generator samples as usual, but every token whose image content is
known is replaced by the reference image's ground-truth token before it is fed back (raster: to the KV cache in
raster order; next-scale: to the accumulator and the next scale's input, at every scale). The model therefore
conditions each generated token on all known content before it in its own order, and the known region decodes
from ground-truth tokens. Each generator implements the loop (`RasterGenerator.edit`,
`NextScaleGenerator.edit`); this module holds what they share:

- masks on the image grid, True = known (kept) pixel. `region(name, …)` is one of `REGIONS`: `center` a centred
  box of half the height and width, `left`/`right`/`top`/`bottom` a half (left/right and top/bottom are exact
  complements). `known_pixels("inpaint", r)` generates region r and keeps the rest; `known_pixels("outpaint", r)`
  keeps r and generates the rest (outpaint + center: keep the centre, generate the border). Any bool mask works
  as well.
- the pixel → token rule `known_on_grid`. A token of an (h, w) grid over an (H, W) image is *known* iff its
  whole receptive cell lies in the known region. The cell of token (i, j) is the pixel window
  rows [⌊i·H/h⌋, ⌈(i + 1)·H/h⌉) × cols [⌊j·W/w⌋, ⌈(j + 1)·W/w⌉) — the window of adaptive average pooling, so the
  rule is "area-downsample the known mask to the grid and require exactly 1.0". When h does not divide H (VAR's
  3×3 scale on an 8×8 latent) neighbouring cells overlap and a token is known only if every pixel it covers is.
  The rule is applied to whatever resolution the mask has: a mask already on the token grid is unchanged, and
  coarser grids (next-scale) are derived from the same pixel mask. The cell ignores the tokenizer's convolutional
  receptive field beyond it (as VAR does): known tokens next to the boundary still carry some of the hole's
  content, and generated tokens there are decoded with context from both sides.
- `edit_images`: encode reference images, edit their tokens with a generator, decode (the CLI's path).

Sampling of the unknown tokens is exactly the generator's `sample` (CFG, top-k/p, temperature), and with an empty
mask `edit` consumes the random stream as `sample` does, so both give the same tokens for the same seed.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from typing import Any

import torch
import torch.nn.functional as F

from arvision.generators.base import Generator
from arvision.tokenizers.base import Tokenizer
from arvision.utils.progress import track

REGIONS = ("center", "left", "right", "top", "bottom")
EDITS = ("inpaint", "outpaint")


# --------------------------------------------------------------------------------------------- masks on the image
def region(name: str, height: int, width: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The named region of an (height, width) image as a bool mask (True inside)."""
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    if name == "center":  # the middle half of each side: [H/4, H − H/4) × [W/4, W − W/4)
        inside = ((rows >= height // 4) & (rows < height - height // 4)
                  & (cols >= width // 4) & (cols < width - width // 4))
    elif name == "left":
        inside = cols < width // 2
    elif name == "right":
        inside = cols >= width // 2
    elif name == "top":
        inside = rows < height // 2
    elif name == "bottom":
        inside = rows >= height // 2
    else:
        raise ValueError(f"edit_mask must be one of {', '.join(REGIONS)}, got {name!r}")
    return inside.expand(height, width).clone()


def known_pixels(edit: str, name: str, height: int, width: int, *,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The kept pixels (H, W) of an edit: inpaint generates region `name` and keeps the rest; outpaint keeps
    region `name` and generates the rest (outpaint + center = keep the centre, generate the border)."""
    inside = region(name, height, width, device=device)
    if edit == "inpaint":
        return ~inside
    if edit == "outpaint":
        return inside
    raise ValueError(f"edit must be one of {', '.join(EDITS)} (or null to sample), got {edit!r}")


# --------------------------------------------------------------------------------------------- pixel → token rule
def known_on_grid(known: torch.Tensor, grid: tuple[int, int] | int) -> torch.Tensor:
    """Known mask (H, W) or (B, H, W) → known tokens (…, h, w): a token is known iff every pixel of its receptive
    cell is (area-downsample, require exactly 1.0; see the module docstring). Exact: a window mean of 0/1 values is
    1.0 only when all of them are 1 (sums of ones and the division by their count are exact in fp32)."""
    if known.dtype != torch.bool:
        raise TypeError(f"a known mask must be bool (True = kept), got {known.dtype}")
    if known.dim() not in (2, 3):
        raise ValueError(f"a known mask is (H, W) or (B, H, W), got shape {tuple(known.shape)}")
    size = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if tuple(known.shape[-2:]) == size:
        return known.clone()
    unbatched = known.dim() == 2
    x = known[None] if unbatched else known
    with torch.autocast(device_type=x.device.type, enabled=False):
        covered = F.interpolate(x[:, None].float(), size=size, mode="area")[:, 0]
    out = covered == 1.0
    return out[0] if unbatched else out


def batch_mask(known: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A mask (H, W) shared by the batch, or one per row (B, H, W) → (B, H, W) on `device`."""
    known = known.to(device)
    if known.dim() == 2:
        return known.expand(batch, *known.shape)
    if known.dim() != 3 or known.shape[0] != batch:
        raise ValueError(f"a known mask is (H, W) or (B={batch}, H, W), got shape {tuple(known.shape)}")
    return known


def masked_preview(images: torch.Tensor, known: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] with the pixels to generate filled with `fill` (mid-grey): what the model is
    shown."""
    return torch.where(known[:, None], images, torch.full_like(images, fill))


# --------------------------------------------------------------------------------------------- images → edited images
def editable_generators() -> list[str]:
    """Names of the generators that declare zero-shot editing (`Generator.supports_editing`), for messages: every
    module of this package is imported, so the list does not depend on what happened to be loaded."""
    import arvision.generators as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")

    def subclasses(cls: type[Generator]) -> list[type[Generator]]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    return sorted({cls.name for cls in subclasses(Generator) if cls.supports_editing})


@torch.no_grad()
def edit_images(generator: Generator, tokenizer: Tokenizer, images: torch.Tensor, labels: torch.Tensor,
                known: torch.Tensor, *, batch_size: int, seed: int,
                **sampling: Any) -> tuple[torch.Tensor, float]:
    """Edit reference `images` (N, C, H, W) in [-1, 1] of class `labels` (N,): the pixels where `known` (N, H, W)
    is True are kept, the rest generated. Returns the edited images in [-1, 1] (on the CPU) and the seconds spent.

    Runs where the generator is, in chunks of `batch_size`, with one seeded random stream for all of them.
    """
    if not generator.supports_editing:
        raise ValueError(f"zero-shot editing needs one of the generators {', '.join(editable_generators())}; "
                         f"generator={generator.name} has none")
    device = next(generator.parameters()).device
    tokenizer.to(device)
    rng = torch.Generator(device=device).manual_seed(seed)
    known = batch_mask(known, images.shape[0], torch.device("cpu"))
    chunks = []
    start = time.perf_counter()
    for x, y, m in zip(track(images.split(batch_size), "editing", total=len(images)), labels.split(batch_size),
                       known.split(batch_size)):
        x, y, m = x.to(device), y.to(device), m.to(device)
        tokens = generator.edit(y, generator.encode(x), m, generator=rng, **sampling)
        chunks.append(tokenizer.decode(tokens).clamp(-1, 1).cpu())
    return torch.cat(chunks), time.perf_counter() - start


__all__ = ["EDITS", "REGIONS", "batch_mask", "edit_images", "editable_generators", "known_on_grid", "known_pixels",
           "masked_preview", "region"]
