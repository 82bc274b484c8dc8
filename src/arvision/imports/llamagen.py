"""LlamaGen's official files (FoundationVision/LlamaGen): the VQ-16 tokenizer and the class-conditional GPTs.

Files and where their tensors sit:
- `vq_ds16_c2i.pt`: `{"model": state}` (the sampler reads `checkpoint["model"]`, strictly).
- `c2i_{B,L}_{256,384}.pt`, `c2i_XL_384.pt`: DDP training files `{"model", "optimizer", "steps", "args"[, "ema"]}`,
  `args` an argparse.Namespace; `c2i_XXL_384.pt`, `c2i_3B_384.pt`: FSDP-consolidated plain state dicts. The
  official sampler also accepts `"module"` (DeepSpeed) and `"state_dict"`, and reads `"model"` even when an
  `"ema"` entry is there (the presets set `ema: false` to do the same).

arvision's modules were laid out after LlamaGen's, so the names are the same on both sides:
- tokenizer (`VQTokenizer` on `ConvTokenizer` with `num_res_blocks: 2`, `attn_last_level: true`,
  `mid_attn: true`): `encoder.conv_blocks.{i}.res.{j}.…`, `….attn.{j}.{q,k,v,proj_out}`, `….downsample.conv`,
  `encoder.mid.{0,1,2}`, the decoder likewise with `upsample.conv`, `quant_conv`, `quantize.embedding.weight`,
  `post_quant_conv`. The one official-only tensor is `quantize.codebook_used` (a 65 536-entry ring of recently
  used codes, training statistics): it travels as an extra, so an export writes it back.
- generator (`RasterGenerator`): `cls_embedding.embedding_table.weight` (1001 rows, null class 1000),
  `tok_embeddings`, `layers.{i}.attention.{wqkv,wo}`, `layers.{i}.feed_forward.{w1,w2,w3}`,
  `layers.{i}.{attention_norm,ffn_norm}`, `norm`, `output`. The 2-D RoPE table (`freqs_cis` there, `rope`
  here) and the KV caches are rebuilt, not stored.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from arvision.imports.base import OfficialFamily, StateMap

TOKENIZER_NAMES = StateMap(official_only=["quantize.codebook_used"])
GENERATOR_NAMES = StateMap()


class LlamaGenCheckpoints(OfficialFamily):
    name = "llamagen"
    # DDP training files keep the weights under "model"; the sampler also takes DeepSpeed's "module" and
    # "state_dict"; FSDP-consolidated files are the state dict itself (find_state_dict's fall-back).
    tokenizer_keys: ClassVar[tuple[str, ...]] = ("model",)
    generator_keys: ClassVar[tuple[str, ...]] = ("model", "module", "state_dict")

    def tokenizer_names(self, tokenizer: nn.Module) -> StateMap:
        return TOKENIZER_NAMES

    def generator_names(self, generator: nn.Module) -> StateMap:
        return GENERATOR_NAMES
