"""MAR's KL-16 VAE file (`kl16.ckpt`, LTH14/mar; FlowAR's tokenizer) ↔ `tokenizer=kl16` (`KL16Tokenizer`).

The file is `{"model": state_dict}` (MAR's `AutoencoderKL.init_from_ckpt` reads `["model"]`). Its names are LDM's;
arvision's blocks are `nets.py`'s (VAR's and LlamaGen's tokenizers use the same), so the names differ in two ways:
- encoder levels `encoder.down.{i}.block.{j}` / `.attn.{j}` / `.downsample` ↔ `encoder.conv_blocks.{i}.res.{j}` /
  `.attn.{j}` / `.downsample`; the mid blocks `mid.block_1`, `mid.attn_1`, `mid.block_2` ↔ `mid.0`, `mid.1`, `mid.2`;
- decoder levels are indexed by resolution there (`up.0` is the full-resolution level, run last) and by execution
  order here: `decoder.up.{L−1−i}` ↔ `decoder.conv_blocks.{i}`.
Attention keeps separate 1×1 `q`, `k`, `v` convs on both sides. MAR loads the file with `strict=False`, so a file
may carry LDM's training-loss modules (`loss.…`: LPIPS and the discriminator): they are official-only and travel as
extras, so an export writes the file back whole. The scaling factor is not in the file (MAR's code holds 0.2325):
arvision's `scaling_factor` buffer is filled from the preset on import and left out on export.

`KL16Family` carries all of this for any family whose tokenizer is KL-16: MAR's and FlowAR's families subclass it
and add their generator; on its own (official=mar_kl16) it imports the tokenizer alone.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from arvision.imports.base import OfficialFamily, StateDict, StateMap
from arvision.tokenizers.kl16 import KL16Tokenizer

SCALING_BUFFER = "scaling_factor"  # arvision's, not in the official file


def kl16_tokenizer_map(levels: int) -> StateMap:
    """`kl16.ckpt`'s names ↔ `KL16Tokenizer`'s for a VAE with `levels` resolution levels (len(ch_mult))."""
    pairs = [("encoder.down.{i}.block.{j}.{path}", "encoder.conv_blocks.{i}.res.{j}.{path}"),
             ("encoder.down.{i}.attn.{j}.{path}", "encoder.conv_blocks.{i}.attn.{j}.{path}"),
             ("encoder.down.{i}.downsample.{path}", "encoder.conv_blocks.{i}.downsample.{path}")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid.block_1.{{path}}", f"{part}.mid.0.{{path}}"),
                  (f"{part}.mid.attn_1.{{path}}", f"{part}.mid.1.{{path}}"),
                  (f"{part}.mid.block_2.{{path}}", f"{part}.mid.2.{{path}}")]
    for i in range(levels):  # reversed level order: literal indices, one pair set per level
        up = levels - 1 - i
        pairs += [(f"decoder.up.{up}.block.{{j}}.{{path}}", f"decoder.conv_blocks.{i}.res.{{j}}.{{path}}"),
                  (f"decoder.up.{up}.attn.{{j}}.{{path}}", f"decoder.conv_blocks.{i}.attn.{{j}}.{{path}}"),
                  (f"decoder.up.{up}.upsample.{{path}}", f"decoder.conv_blocks.{i}.upsample.{{path}}")]
    return StateMap(pairs=pairs, official_only=["loss.{path}"])


def kl16_order(name: str) -> tuple[int, int, int]:
    """Where MAR's AutoencoderKL state dict has `name`: encoder, decoder (conv_in, mid, levels by resolution with
    `up.0` first, then the output), quant_conv, post_quant_conv, anything else (a training loss) last."""
    parts = name.split(".")
    tops = ("encoder", "decoder", "quant_conv", "post_quant_conv")
    top = tops.index(parts[0]) if parts[0] in tops else len(tops)
    if parts[0] == "decoder":
        return top, (0 if parts[1] in ("conv_in", "mid") else 1 if parts[1] == "up" else 2), \
            int(parts[2]) if parts[1] == "up" else 0
    return top, 0, 0


def kl16_to_ours(official: StateDict, tokenizer: KL16Tokenizer) -> tuple[StateDict, StateDict]:
    """(arvision's state dict with the preset's scaling factor, the official-only extras)."""
    ours, extras = kl16_tokenizer_map(len(tokenizer.encoder.conv_blocks)).to_ours(official)
    ours[SCALING_BUFFER] = tokenizer.scaling_factor.detach().clone()
    return ours, extras


def kl16_to_official(ours: StateDict, extras: StateDict, tokenizer: KL16Tokenizer) -> StateDict:
    """The file's state dict in MAR's order, without arvision's scaling-factor buffer."""
    kept = {name: tensor for name, tensor in ours.items() if name != SCALING_BUFFER}
    state = kl16_tokenizer_map(len(tokenizer.encoder.conv_blocks)).to_official(kept, extras)
    return {name: state[name] for name in sorted(state, key=kl16_order)}


class KL16Family(OfficialFamily):
    """MAR's KL-16 file as a tokenizer; a family with a KL-16 tokenizer subclasses this and adds its generator."""

    name = "mar_kl16"
    tokenizer_keys: ClassVar[tuple[str, ...]] = ("model", "state_dict")

    def tokenizer_names(self, tokenizer: nn.Module) -> StateMap:
        if not isinstance(tokenizer, KL16Tokenizer):
            raise TypeError(f"the KL-16 map needs tokenizer=kl16, got {type(tokenizer).__name__}")
        return kl16_tokenizer_map(len(tokenizer.encoder.conv_blocks))

    def tokenizer_to_ours(self, official: StateDict, tokenizer: nn.Module) -> tuple[StateDict, StateDict]:
        self.tokenizer_names(tokenizer)  # the type check
        return kl16_to_ours(official, tokenizer)

    def tokenizer_to_official(self, ours: StateDict, extras: StateDict, tokenizer: nn.Module) -> StateDict:
        self.tokenizer_names(tokenizer)
        return kl16_to_official(ours, extras, tokenizer)

