"""ACDiT's official files (thunlp/ACDiT): the class-conditional ImageNet models ACDiT-XL-img.pt and ACDiT-H-img.pt.

Files and where their tensors sit:
- `ACDiT-{XL,H}-img.pt`: the training script's checkpoint `{"model", "ema", "opt", "lrs", "args"}` (`args` an
  argparse.Namespace; released files may hold fewer entries). The official sampler (`sample_img.py`) loads
  `checkpoint["model"]` strictly, so the presets read `model` too (`ema: true` takes `ema` where the file has it).
- the VAE: the SD-VAE that sample_img.py loads (`AutoencoderKL.from_pretrained("facebook/DiT-XL-2-256",
  subfolder="vae")`, the ft-EMA decoder): a diffusers folder, imported as `DiffusersVAEFamily` does
  (`tokenizer=sd_vae`, names under `vae.`, the scaling factor from the folder's config.json).

Generator names (official `ACDiT` → arvision `ACDiTGenerator`, which keeps arvision's module names):
`blocks.{i}` → `layers.{i}` with `norm1` → `attention_norm`, `attn.qkv` → `attention.wqkv`, `attn.proj` →
`attention.wo`, `attn.{q,k}_norm` → `attention.{q,k}_norm`, `norm2` → `ffn_norm`, `mlp.fc{1,2}` →
`feed_forward.fc{1,2}`; `final_layer.norm_final` → `final_layer.norm`. `x_embedder`, `t_embedder.mlp.{0,2}`,
`y_embedder.embedding_table` (1001 rows, null class 1000), `final_layer.{linear,adaLN_modulation.1}` and each
block's `adaLN_modulation.1` keep their names. The official model registers no buffers: RopeND's tables, the
position ids and the attention masks are rebuilt, here as there.
"""

from __future__ import annotations

import re
from typing import ClassVar

from torch import nn

from arvision.imports.base import StateDict, StateMap
from arvision.imports.sd_vae import DiffusersVAEFamily

GENERATOR_NAMES = StateMap(pairs=[
    ("blocks.{i}.norm1.{path}", "layers.{i}.attention_norm.{path}"),
    ("blocks.{i}.attn.qkv.{path}", "layers.{i}.attention.wqkv.{path}"),
    ("blocks.{i}.attn.proj.{path}", "layers.{i}.attention.wo.{path}"),
    ("blocks.{i}.attn.q_norm.{path}", "layers.{i}.attention.q_norm.{path}"),
    ("blocks.{i}.attn.k_norm.{path}", "layers.{i}.attention.k_norm.{path}"),
    ("blocks.{i}.norm2.{path}", "layers.{i}.ffn_norm.{path}"),
    ("blocks.{i}.mlp.{path}", "layers.{i}.feed_forward.{path}"),
    ("blocks.{i}.adaLN_modulation.{path}", "layers.{i}.adaLN_modulation.{path}"),
    ("final_layer.norm_final.{path}", "final_layer.norm.{path}"),
])

# The official module order (ACDiT.__init__ registers t_embedder, y_embedder, x_embedder, blocks, final_layer; a
# block norm1, attn.{qkv, q_norm, k_norm, proj}, norm2, mlp.{fc1, fc2}, adaLN_modulation; the final layer
# norm_final, linear, adaLN_modulation), so an export writes the state dict in the order the official file has it.
TOP_ORDER = ("t_embedder.", "y_embedder.", "x_embedder.", "blocks.", "final_layer.")
PART_ORDER = ("norm1.", "attn.qkv.", "attn.q_norm.", "attn.k_norm.", "attn.proj.", "norm2.", "mlp.fc1.", "mlp.fc2.",
              "norm_final.", "linear.", "adaLN_modulation.")


def official_order(name: str) -> tuple[int, int, int, str, bool]:
    top = next((i for i, prefix in enumerate(TOP_ORDER) if name.startswith(prefix)), len(TOP_ORDER))
    block = re.match(r"blocks\.(\d+)\.(.*)", name)
    index, rest = (int(block.group(1)), block.group(2)) if block else (0, name.split(".", 1)[-1])
    part = next((i for i, prefix in enumerate(PART_ORDER) if rest.startswith(prefix)), len(PART_ORDER))
    module, _, leaf = rest.rpartition(".")
    return top, index, part, module, leaf == "bias"  # weight before bias, as nn.Linear registers them


class ACDiTCheckpoints(DiffusersVAEFamily):
    """The SD-VAE folder as the tokenizer (DiffusersVAEFamily), the ACDiT checkpoint as the generator."""

    name = "acdit"
    generator_keys: ClassVar[tuple[str, ...]] = ("model",)
    ema_keys: ClassVar[tuple[str, ...]] = ("ema",)

    def generator_names(self, generator: nn.Module) -> StateMap:
        return GENERATOR_NAMES

    def generator_to_official(self, ours: StateDict, extras: StateDict, generator: nn.Module) -> StateDict:
        state = GENERATOR_NAMES.to_official(ours, extras)
        return {name: state[name] for name in sorted(state, key=official_order)}
