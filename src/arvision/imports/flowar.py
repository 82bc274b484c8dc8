"""FlowAR's official files (OliverRensu/FlowAR, weights on HF OliverRen/FlowAR): FlowAR-S, -L and -H on MAR's KL-16.

Files and where their tensors sit:
- `FlowAR-S.pth`, `FlowAR-L.pth`, `FlowAR-H.pth` (released): a plain state dict (eval.py loads it strictly).
- training checkpoints (`checkpoint-last.pth`, main_flowar.py / util/misc.py `save_model`): `{"model", "model_ema",
  "optimizer", "epoch", "scaler", "args"}`; the EMA copy is read first unless the import asks for `ema=false`. An
  export of such an import writes the same key back with only those weights.
- `kl16.ckpt`: MAR's KL-16 VAE (`tokenizer=kl16`, its names mapped by `imports/kl16.py`).

Generator (`FlowARGenerator` with `backbone: official`, `mlp: gelu_swiglu`): the names differ by renaming only —
`class_emb` ↔ `cls_embedding.embedding_table`, the three position tables `encoder_pos_embed_learned`,
`decoder_pos_embed_learned`, `diffusion_pos_embed_learned` ↔ `pos_embed`, `decoder_pos_embed`, `head_pos_embed`;
`encoder_blocks` / `decoder_blocks` ↔ `layers` / `decoder_layers` with `attn.qkv` / `attn.proj` ↔ `attention.wqkv`
/ `attention.wo` (the same fused q | k | v rows) and `mlp` ↔ `feed_forward`; `encoder_norm` ↔ `norm`; `flownet` ↔
`head` with `res_blocks` ↔ `blocks` and `final_layer.linear` / `final_layer.adaLN_modulation.1` ↔ `output` /
`final_ada`. Buffers FlowAR saves and arvision rebuilds: `mask` (block-causal 0/−inf, (1, 1, L, L)) and every
attention's RoPE `rope.freqs` (1/10000^(2j/(head_dim/2))); the import checks that the file's equal the ones built
for the preset (a difference means another size or other scales) and keeps them as extras, so an export writes the
file back name for name, value for value, in FlowAR's order.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from torch import nn

from arvision.imports.base import CheckpointMismatch, StateDict, StateMap
from arvision.imports.kl16 import KL16Family

ROPE = re.compile(r"(?P<attn>.+\.(?:attn|crossattn))\.rope\.freqs")


def _pairs() -> list[tuple[str, str]]:
    pairs = [("class_emb.weight", "cls_embedding.embedding_table.weight"),
             ("encoder_pos_embed_learned", "pos_embed"),
             ("decoder_pos_embed_learned", "decoder_pos_embed"),
             ("diffusion_pos_embed_learned", "head_pos_embed"),
             ("encoder_norm.{path}", "norm.{path}")]
    for official, ours in (("encoder_blocks", "layers"), ("decoder_blocks", "decoder_layers")):
        pairs += [(f"{official}.{{i}}.attn.qkv.{{kind}}", f"{ours}.{{i}}.attention.wqkv.{{kind}}"),
                  (f"{official}.{{i}}.attn.proj.{{kind}}", f"{ours}.{{i}}.attention.wo.{{kind}}"),
                  (f"{official}.{{i}}.mlp.{{path}}", f"{ours}.{{i}}.feed_forward.{{path}}"),
                  (f"{official}.{{i}}.{{path}}", f"{ours}.{{i}}.{{path}}")]
    return pairs + [("flownet.res_blocks.{i}.{path}", "head.blocks.{i}.{path}"),
                    ("flownet.final_layer.linear.{kind}", "head.output.{kind}"),
                    ("flownet.final_layer.adaLN_modulation.1.{kind}", "head.final_ada.{kind}"),
                    ("flownet.{path}", "head.{path}")]


GENERATOR_NAMES = StateMap(pairs=_pairs(), official_only=[
    "mask", "encoder_blocks.{i}.attn.rope.freqs", "decoder_blocks.{i}.attn.rope.freqs",
    "flownet.res_blocks.{i}.attn.rope.freqs", "flownet.res_blocks.{i}.crossattn.rope.freqs"])


def rope_freqs(head_dim: int) -> torch.Tensor:
    """FlowAR's `VisionRotaryEmbeddingFast(dim=head_dim // 2)` buffer: 1/10000^(arange(0, d, 2)/d), d = head_dim/2."""
    half = head_dim // 2
    return 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))


def flowar_buffers(generator: nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer FlowAR's state dict holds, as FlowAR builds it for this generator's scales and sizes."""
    allowed = generator.ar_mask
    built = {"mask": torch.where(allowed, 0.0, float("-inf"))[None, None]}
    for stack, layers in (("encoder_blocks", generator.layers), ("decoder_blocks", generator.decoder_layers)):
        for i, layer in enumerate(layers):
            built[f"{stack}.{i}.attn.rope.freqs"] = rope_freqs(layer.attention.head_dim)
    for i, block in enumerate(generator.head.blocks):
        head_dim = block.attn.qkv.in_features // block.attn.heads
        built[f"flownet.res_blocks.{i}.attn.rope.freqs"] = rope_freqs(head_dim)
        if generator.head_kind == "cross":
            built[f"flownet.res_blocks.{i}.crossattn.rope.freqs"] = rope_freqs(head_dim)
    return built


class FlowARCheckpoints(KL16Family):
    """KL-16's tokenizer map (`KL16Family`) and FlowAR's generator."""

    name = "flowar"
    generator_keys: ClassVar[tuple[str, ...]] = ("model",)  # else the released plain state dict
    ema_keys: ClassVar[tuple[str, ...]] = ("model_ema",)

    def generator_names(self, generator: nn.Module) -> StateMap:
        return GENERATOR_NAMES

    def generator_to_ours(self, official: StateDict, generator: nn.Module) -> tuple[StateDict, StateDict]:
        ours, extras = GENERATOR_NAMES.to_ours(official)
        built = flowar_buffers(generator)
        for name, tensor in extras.items():
            expected = built.get(name)  # a buffer this model does not build: `fit` names what else differs
            if expected is not None and (tensor.shape != expected.shape or not torch.equal(tensor.float(), expected)):
                raise CheckpointMismatch(
                    f"the generator file's {name} ({'×'.join(map(str, tensor.shape))}) is not the one FlowAR builds "
                    f"for this preset (scales {tuple(generator.scales)}, its widths and heads): the file was made "
                    "for another model; choose the official= preset of that model (flowar_s, flowar_l, flowar_h)")
        return ours, extras

    def generator_to_official(self, ours: StateDict, extras: StateDict, generator: nn.Module) -> StateDict:
        """FlowAR's state-dict order: its three tables, `mask`, then the modules, each attention's `rope.freqs`
        right after its `proj.bias`; arvision's module order is otherwise FlowAR's."""
        out: StateDict = {}
        left = dict(extras)
        for name, tensor in ours.items():
            official = GENERATOR_NAMES.official(name)
            out[official] = tensor
            if official == "diffusion_pos_embed_learned" and "mask" in left:
                out["mask"] = left.pop("mask")
            if official.endswith("attn.proj.bias"):
                freqs = official.removesuffix("proj.bias") + "rope.freqs"
                if freqs in left:
                    out[freqs] = left.pop(freqs)
        return {**out, **left}
