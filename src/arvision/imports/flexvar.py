"""FlexVAR's official files (jiaosiyu1999/FlexVAR): the FlexVAE tokenizer and the FlexVAR-d16/20/24 transformers.

Files and where their tensors sit:
- `FlexVAE.pth`: `{"model": state dict}` of a LlamaGen-style VQ-16 (`models/vq_llama.py`: ch 128, ch_mult
  1,1,2,2,4, two res blocks per level, z 256, 1×1 quant_conv to 32 dims, l2-normalised codebook of 8912 codes as
  `eval_c2i.py` builds it). A training checkpoint holds it under `trainer.vae_local`.
- `FlexVARd16-epo179.pth`, `FlexVARd20-epo249.pth`, `FlexVARd24-epo349.pth`: a plain state dict, or a training
  checkpoint `{"trainer": {"var_wo_ddp": …, …}, …}` (eval_c2i.py unwraps it when present). An export writes back the
  layout the import read, with only the weights.

Tokenizer (`VQTokenizer` on `ConvTokenizer`, whose names are LlamaGen's): every name is the same. The buffer
`quantize.codebook_used` (a ring of the 65 536 most recent training indices, FlexVAR's usage statistic) is
official-only and travels as an extra.

Generator (`NextScaleGenerator`, FlexVAR mode: `residual: false`, no level embedding, the learned 1×C×32×32
position grid `pos_1LC`): its names are FlexVAR's. `attn_bias_for_masking` is official-only: FlexVAR's loaders
overwrite it with the mask they build before the strict load (a training checkpoint keeps the mask of its last
random schedule, padded for xformers), so arvision keeps the file's as an extra, for the export, and rebuilds its own
per schedule.

An export orders each state dict as FlexVAR's modules do (`state_dict()` order), so the round trip gives the files
back name for name, value for value, in order.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from arvision.imports.base import OfficialFamily, StateDict, StateMap

TOKENIZER_NAMES = StateMap(official_only=["quantize.codebook_used"])
GENERATOR_NAMES = StateMap(official_only=["attn_bias_for_masking"])

# FlexVAR's module order: VQModel registers encoder, decoder, quantize, quant_conv, post_quant_conv (arvision builds
# quant_conv and the quantiser before the decoder); the quantiser's buffer precedes its embedding.
VQ_ORDER = ("encoder", "decoder", "quantize.codebook_used", "quantize", "quant_conv", "post_quant_conv")
# FlexVAR's own parameters, then its mask buffer, then its submodules (arvision's order otherwise).
FLEXVAR_ORDER = ("pos_start", "pos_1LC", "attn_bias_for_masking")


def vq_order(name: str) -> int:
    return next(i for i, part in enumerate(VQ_ORDER) if name == part or name.startswith(part + "."))


def flexvar_order(name: str) -> int:
    return FLEXVAR_ORDER.index(name) if name in FLEXVAR_ORDER else len(FLEXVAR_ORDER)


class FlexVARCheckpoints(OfficialFamily):
    name = "flexvar"
    tokenizer_keys: ClassVar[tuple[str, ...]] = ("model", "trainer.vae_local")
    generator_keys: ClassVar[tuple[str, ...]] = ("trainer.var_wo_ddp",)  # else the plain state dict

    def tokenizer_names(self, tokenizer: nn.Module) -> StateMap:
        return TOKENIZER_NAMES

    def generator_names(self, generator: nn.Module) -> StateMap:
        return GENERATOR_NAMES

    def tokenizer_to_official(self, ours: StateDict, extras: StateDict, tokenizer: nn.Module) -> StateDict:
        state = TOKENIZER_NAMES.to_official(ours, extras)
        return {name: state[name] for name in sorted(state, key=vq_order)}

    def generator_to_official(self, ours: StateDict, extras: StateDict, generator: nn.Module) -> StateDict:
        state = GENERATOR_NAMES.to_official(ours, extras)
        return {name: state[name] for name in sorted(state, key=flexvar_order)}
