"""VAR's official files (FoundationVision/VAR): the multi-scale VQVAE and the VAR-d16/20/24/30/36 transformers.

Files and where their tensors sit:
- `vae_ch160v4096z32.pth` and `var_d{16,20,24,30,36}.pth`: plain state dicts (the demo loads them strictly).
- training checkpoints (`ar-ckpt-last.pth`): `{"epoch", "iter", "trainer": {"config", "var_wo_ddp", "vae_local",
  "var_opt"}, "args"}`: the transformer under `trainer.var_wo_ddp`, the VQVAE under `trainer.vae_local`. An export
  of such an import writes the same nesting back, with only those weights.

Tokenizer (`MultiScaleVQTokenizer` on `ConvTokenizer` with `num_res_blocks: 2`, `attn_last_level: true`,
`mid_attn: true`; the presets set VAR's sizes). The names differ in four ways:
- encoder levels `encoder.down.{i}.block.{j}` / `.attn.{j}` / `.downsample` ↔ `encoder.conv_blocks.{i}.res.{j}` /
  `.attn.{j}` / `.downsample`; the mid blocks `mid.block_1`, `mid.attn_1`, `mid.block_2` ↔ `mid.0`, `mid.1`, `mid.2`;
- decoder levels are indexed by resolution there (`up.0` is the full-resolution level, run last) and by execution
  order here: `decoder.up.{L−1−i}` ↔ `decoder.conv_blocks.{i}` (L levels, each with num_res_blocks + 1 blocks);
- attention blocks hold one fused 1×1 conv `qkv` (3C outputs, q | k | v) there, three convs `q`, `k`, `v` here:
  split on import, concatenated on export;
- the φ convs `quantize.quant_resi.qresi_ls.{k}` (4 partially shared φ's; `quant_resi.qresi` for one shared φ)
  ↔ `quantize.quant_resi.{k}`. `quantize.ema_vocab_hit_SV` (per-scale code-hit statistics of training) is
  official-only and travels as an extra.
Generator (`NextScaleGenerator`, VAR mode): its names are VAR's. The buffers `lvl_1L` (scale id of each position)
and `attn_bias_for_masking` (block-causal 0/−inf) are official-only: arvision rebuilds both from the scales, checks on
import that the file's equal what it builds (a difference means the file was made for other scales) and keeps them
as extras for the export.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from torch import nn

from arvision.imports.base import CheckpointMismatch, OfficialFamily, StateDict, StateMap
from arvision.nn.masks import segment_ids

FUSED = re.compile(r"(?P<block>.+\.attn(?:_1|\.\d+))\.qkv\.(?P<kind>weight|bias)")  # VAR's fused attention conv
SPLIT = re.compile(r"(?P<block>.+\.attn(?:_1|\.\d+))\.(?P<letter>[qkv])\.(?P<kind>weight|bias)")  # arvision's


def encoder_levels(tokenizer: nn.Module) -> int:
    return len(tokenizer.encoder.conv_blocks)


def phi_names(count: int) -> tuple[str, str]:
    """VAR's container of the φ convs: share_quant_resi 1 → PhiShared (`qresi`), 0 → PhiNonShared (a ModuleList),
    otherwise PhiPartiallyShared (`qresi_ls`)."""
    if count == 1:
        return "quantize.quant_resi.qresi.{path}", "quantize.quant_resi.0.{path}"
    if count == 0:
        return "quantize.quant_resi.{i}.{path}", "quantize.quant_resi.{i}.{path}"
    return "quantize.quant_resi.qresi_ls.{i}.{path}", "quantize.quant_resi.{i}.{path}"


def tokenizer_names(levels: int, phi_count: int) -> StateMap:
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
    pairs.append(phi_names(phi_count))
    return StateMap(pairs=pairs, official_only=["quantize.ema_vocab_hit_SV"])


GENERATOR_NAMES = StateMap(official_only=["lvl_1L", "attn_bias_for_masking"])


def split_qkv(state: StateDict) -> StateDict:
    """VAR's fused `….attn.{j}.qkv.{weight,bias}` (3C rows) → `….q.…`, `….k.…`, `….v.…` (C rows each)."""
    out: StateDict = {}
    for name, tensor in state.items():
        if found := FUSED.fullmatch(name):
            for letter, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"{found['block']}.{letter}.{found['kind']}"] = part.clone()
        else:
            out[name] = tensor
    return out


def fuse_qkv(state: StateDict) -> StateDict:
    """The inverse of `split_qkv`: each attention block's q, k and v → one `qkv` (rows q | k | v)."""
    out: StateDict = {}
    for name, tensor in state.items():
        found = SPLIT.fullmatch(name)
        if found is None:
            out[name] = tensor
        elif found["letter"] == "q":
            block, kind = found["block"], found["kind"]
            out[f"{block}.qkv.{kind}"] = torch.cat([state[f"{block}.{letter}.{kind}"] for letter in "qkv"])
    return out


def vqvae_order(name: str) -> tuple[int, int, int]:
    """Where VAR's VQVAE state dict has `name`: encoder, decoder (levels by resolution, `up.0` first), quantize
    (code-hit statistics, φ's, codebook), quant_conv, post_quant_conv; a stable sort keeps the rest in place."""
    parts = name.split(".")
    top = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv").index(parts[0])
    if parts[0] == "decoder":
        return top, (0 if parts[1] in ("conv_in", "mid") else 1 if parts[1] == "up" else 2), \
            int(parts[2]) if parts[1] == "up" else 0
    if parts[0] == "quantize":
        return top, ("ema_vocab_hit_SV", "quant_resi", "embedding").index(parts[1]), 0
    return top, 0, 0


def var_order(name: str) -> int:
    """VAR's own parameters, then its two buffers, then the submodules (the module's state-dict order)."""
    return 0 if name in ("pos_start", "pos_1LC") else 1 if name in ("lvl_1L", "attn_bias_for_masking") else 2


def var_buffers(scales: tuple[int, ...]) -> StateDict:
    """`lvl_1L` (1, L) int64 and `attn_bias_for_masking` (1, 1, L, L) as VAR builds them for `scales`."""
    levels = segment_ids([n * n for n in scales], device="cpu")
    bias = torch.where(levels[:, None] >= levels[None, :], 0.0, float("-inf"))
    return {"lvl_1L": levels[None].long(), "attn_bias_for_masking": bias[None, None]}


class VARCheckpoints(OfficialFamily):
    name = "var"
    # released files are plain state dicts (find_state_dict's fall-back); VAR's training checkpoints nest them
    tokenizer_keys: ClassVar[tuple[str, ...]] = ("trainer.vae_local",)
    generator_keys: ClassVar[tuple[str, ...]] = ("trainer.var_wo_ddp",)
    ema_keys: ClassVar[tuple[str, ...]] = ()  # VAR keeps no EMA copy

    def tokenizer_names(self, tokenizer: nn.Module) -> StateMap:
        return tokenizer_names(encoder_levels(tokenizer), tokenizer.quantize.phi_count)

    def generator_names(self, generator: nn.Module) -> StateMap:
        return GENERATOR_NAMES

    def tokenizer_to_ours(self, official: StateDict, tokenizer: nn.Module) -> tuple[StateDict, StateDict]:
        return self.tokenizer_names(tokenizer).to_ours(split_qkv(official))

    def tokenizer_to_official(self, ours: StateDict, extras: StateDict, tokenizer: nn.Module) -> StateDict:
        state = fuse_qkv(self.tokenizer_names(tokenizer).to_official(ours, extras))
        return {name: state[name] for name in sorted(state, key=vqvae_order)}

    def generator_to_official(self, ours: StateDict, extras: StateDict, generator: nn.Module) -> StateDict:
        state = GENERATOR_NAMES.to_official(ours, extras)
        return {name: state[name] for name in sorted(state, key=var_order)}

    def generator_to_ours(self, official: StateDict, generator: nn.Module) -> tuple[StateDict, StateDict]:
        ours, extras = GENERATOR_NAMES.to_ours(official)
        built = var_buffers(tuple(generator.scales))
        for name, tensor in extras.items():
            if tensor.shape != built[name].shape or not torch.equal(tensor.to(built[name].dtype), built[name]):
                raise CheckpointMismatch(
                    f"the generator file's {name} ({'×'.join(map(str, tensor.shape))}) is not the one VAR builds for "
                    f"the scales {tuple(generator.scales)} of this preset: the file was made for other patch_nums "
                    "(another resolution?); choose the official= preset of that model")
        return ours, extras
