"""MAR's official files (LTH14/mar): MAR-B, -L and -H on MAR's KL-16 VAE.

Files and where their tensors sit:
- `pretrained_models/mar/mar_{base,large,huge}/checkpoint-last.pth` (released, util/download.py) and every training
  checkpoint (main_mar.py → util/misc.py `save_model`): `{"model", "model_ema", "optimizer", "epoch", "scaler",
  "args"}` (the released files seem to keep `model` and `model_ema` only). `model_ema` is a whole state dict with the
  EMA parameters in place, and it is what MAR evaluates (main_mar.py, the demo notebook): the import reads it first
  unless it asks for `ema=false` (then `model`). An export writes the same key back with only those weights.
- `kl16.ckpt`: MAR's KL-16 VAE (`tokenizer=kl16`, its names mapped by `imports/kl16.py`).

Generator (`MARGenerator`, bidirectional, random order, diffusion head): its parameter names are MAR's, in MAR's
order (`class_emb`, `fake_latent`, `z_proj`, `z_proj_ln`, the three learned position tables, `encoder_blocks` /
`decoder_blocks` as timm's `Block`, `mask_token`, `diffloss.net.…` for SimpleMLPAdaLN), so the map is the identity.
MAR registers no buffers (its diffusion schedules are plain objects, rebuilt from `num_sampling_steps`), so nothing
travels as an extra and a file of another size (width, depth, buffer_size, the head's depth or width) is named by
`fit` in MAR's own names.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from arvision.generators.mar import MARGenerator
from arvision.imports.base import StateMap
from arvision.imports.kl16 import KL16Family

GENERATOR_NAMES = StateMap()  # MAR's names are arvision's


class MARCheckpoints(KL16Family):
    """KL-16's tokenizer map (`KL16Family`) and MAR's generator."""

    name = "mar"
    generator_keys: ClassVar[tuple[str, ...]] = ("model",)  # else a plain state dict
    ema_keys: ClassVar[tuple[str, ...]] = ("model_ema",)

    def generator_names(self, generator: nn.Module) -> StateMap:
        if not isinstance(generator, MARGenerator):
            raise TypeError(f"MAR's files need generator=mar, got {type(generator).__name__}")
        return GENERATOR_NAMES
