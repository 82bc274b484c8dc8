"""The RQ-VAE / RQ-Transformer official files (kakaobrain/rq-vae-transformer): the 8×8×4 RQ-VAE and the
class-conditional ImageNet RQ-Transformers (480M, 821M, 1.4B, 3.8B).

Files and where their tensors sit: each released tarball holds `stage1/model.pt` (the RQ-VAE) and
`stage2/model.pt` (the RQ-Transformer), each a training checkpoint `{"epoch", "state_dict", "optimizer",
"scheduler"[, "state_dict_ema"]}` next to its `config.yaml`. The official sampler (main_sampling_fid.py) reads
`state_dict`, or `state_dict_ema` with `--ema` (the README's command has no `--ema`: the presets set `ema: false`).
An export writes `{"state_dict": …}` (or `state_dict_ema`, where the import read it) to `stage1/model.pt` and
`stage2/model.pt`.

Tokenizer (`RVQTokenizer` on `ConvTokenizer` with `attn_last_level: true`, `mid_attn: true`, `ema: true`):
- encoder/decoder names as VAR's and LlamaGen's VQGAN lineage: `encoder.down.{i}.block.{j}` / `.attn.{j}` /
  `.downsample` ↔ `encoder.conv_blocks.{i}.res.{j}` / `.attn.{j}` / `.downsample`; `mid.block_1`, `mid.attn_1`,
  `mid.block_2` ↔ `mid.0`, `mid.1`, `mid.2`; decoder levels by resolution there, by execution order here:
  `decoder.up.{L−1−i}` ↔ `decoder.conv_blocks.{i}`. Attention convs `q`, `k`, `v`, `proj_out` have the same names.
- the quantiser: `quantizer.codebooks.{d}.weight` has vocab + 1 rows there (the last is `nn.Embedding`'s padding
  row, never a code) and vocab rows here (`quantize.embedding.weight`, or `quantize.embeddings.{d}.weight` for one
  codebook per depth); the padding row travels beside the weights (an extra) and the export puts it back. RQ-VAE's
  shared codebook is one module listed D times, so its file holds D equal copies of each tensor: the import checks
  they are equal and keeps one; the export writes the D names back onto one tensor. The EMA state
  `codebooks.{d}.cluster_size_ema` (vocab) and `.embed_ema` (vocab × dim) ↔ `quantize.ema_cluster_size[d]` and
  `quantize.ema_embed_sum[d]` (stacked per codebook).
Generator (`RasterGenerator`, `depth_mode=head`, `block=gpt2`, `positions=learned`, `null_class=false`,
`code_embeddings=tokenizer`):
- `cond_emb.weight` (1000 rows, no null class) ↔ `cls_embedding.embedding_table.weight`;
- `pos_emb_cond` (1×1×C) and `pos_emb_hw` (1×HW×C) ↔ the rows 0 and 1 … HW of `pos_embeddings` ((HW + 1)×C; slot s
  adds row s); `pos_emb_d` (1×D×C) ↔ `depth_head.level_embeddings.weight` (D×C);
- `input_mlp` ↔ `code_proj`, `head_mlp` ↔ `depth_head.code_proj` (the linear maps on the RQ-VAE's code vectors);
- `body_transformer.blocks.{i}` ↔ `layers.{i}`, `head_transformer.blocks.{i}` ↔ `depth_head.layers.{i}`, and in
  each block `ln1` ↔ `attention_norm`, `ln2` ↔ `ffn_norm`, `attn.proj` ↔ `attention.wo`, `mlp.0` / `mlp.2` ↔
  `feed_forward.fc1` / `fc2`, and the three `attn.query`, `attn.key`, `attn.value` ↔ one `attention.wqkv`
  (rows q | k | v, weights and biases): concatenated on import, split on export;
- `classifier.layer_norm` ↔ `depth_head.norm`, `classifier.linear` ↔ `depth_head.output`.
The stage-2 file holds no codebook: the RQ-Transformer reads the RQ-VAE's code vectors at run time, as here.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn

from arvision.imports.base import CheckpointMismatch, OfficialFamily, StateDict, StateMap, nest

CODEBOOK = re.compile(r"quantizer\.codebooks\.(?P<d>\d+)\.(?P<name>weight|cluster_size_ema|embed_ema)")
PADDING = "quantizer.codebooks.{d}.padding_row"  # the extra that keeps each codebook's padding row
OURS_BOOK = {"weight": "weight", "cluster_size_ema": "ema_cluster_size", "embed_ema": "ema_embed_sum"}
QKV = re.compile(r"(?P<stack>body_transformer|head_transformer)\.blocks\.(?P<i>\d+)\.attn\."
                 r"(?P<part>query|key|value)\.(?P<kind>weight|bias)")
WQKV = re.compile(r"(?P<layers>layers|depth_head\.layers)\.(?P<i>\d+)\.attention\.wqkv\.(?P<kind>weight|bias)")


def tokenizer_names(levels: int) -> StateMap:
    """The network's names (the quantiser is mapped by `codebooks_to_ours`): `levels` = len(ch_mult)."""
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
    # the quantiser is mapped by codebooks_to_ours; these pairs word the mismatch messages in official names
    pairs += [("quantizer.codebooks.{d}.weight", "quantize.embeddings.{d}.weight"),
              ("quantizer.codebooks.*.weight", "quantize.embedding.weight"),
              ("quantizer.codebooks.*.cluster_size_ema", "quantize.ema_cluster_size"),
              ("quantizer.codebooks.*.embed_ema", "quantize.ema_embed_sum")]
    return StateMap(pairs=pairs)


def block_pairs(official: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{official}.blocks.{{i}}.ln1.{{path}}", f"{ours}.{{i}}.attention_norm.{{path}}"),
            (f"{official}.blocks.{{i}}.ln2.{{path}}", f"{ours}.{{i}}.ffn_norm.{{path}}"),
            (f"{official}.blocks.{{i}}.attn.proj.{{path}}", f"{ours}.{{i}}.attention.wo.{{path}}"),
            (f"{official}.blocks.{{i}}.mlp.0.{{path}}", f"{ours}.{{i}}.feed_forward.fc1.{{path}}"),
            (f"{official}.blocks.{{i}}.mlp.2.{{path}}", f"{ours}.{{i}}.feed_forward.fc2.{{path}}")]


GENERATOR_NAMES = StateMap(pairs=[
    ("cond_emb.weight", "cls_embedding.embedding_table.weight"),
    ("input_mlp.{path}", "code_proj.{path}"),
    ("head_mlp.{path}", "depth_head.code_proj.{path}"),
    ("classifier.layer_norm.{path}", "depth_head.norm.{path}"),
    ("classifier.linear.{path}", "depth_head.output.{path}"),
    *block_pairs("body_transformer", "layers"),
    *block_pairs("head_transformer", "depth_head.layers"),
    # tensors made of several official ones: these names only word the mismatch messages
    ("body_transformer.blocks.{i}.attn.{{query,key,value}}.{path}", "layers.{i}.attention.wqkv.{path}"),
    ("head_transformer.blocks.{i}.attn.{{query,key,value}}.{path}", "depth_head.layers.{i}.attention.wqkv.{path}"),
    ("pos_emb_cond+pos_emb_hw", "pos_embeddings"),
    ("pos_emb_d", "depth_head.level_embeddings.weight"),
])


def codebooks_to_ours(official: StateDict, quantizer: nn.Module, path_hint: str) -> tuple[StateDict, StateDict]:
    """RQ-VAE's `quantizer.codebooks.{d}.*` → arvision's quantiser tensors, and the padding rows as extras. The
    other entries of `official` are left to the caller; a shared codebook's D copies must agree."""
    depth, shared = int(quantizer.depth), bool(quantizer.shared_codebook)
    found: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in official.items():
        if match := CODEBOOK.fullmatch(name):
            found.setdefault(int(match["d"]), {})[match["name"]] = tensor
    ours, extras = {}, {}
    if sorted(found) != list(range(depth)):
        return ours, extras  # left for fit() to report as missing or unexpected
    if shared:
        for name in ("weight", "cluster_size_ema", "embed_ema"):
            copies = [found[d].get(name) for d in range(depth)]
            if any(c is None or c.is_meta for c in copies):  # missing (fit() names it), or a structure-only check
                continue
            if not all(torch.equal(copies[0], c) for c in copies[1:]):
                raise CheckpointMismatch(
                    f"{path_hint}: quantizer.codebooks.0 … {depth - 1}.{name} differ, so the file has one codebook "
                    "per depth (shared_codebook: false in its config.yaml); set tokenizer.model.shared_codebook=false")
    books = [0] if shared else list(range(depth))
    prefix = "quantize.embedding" if shared else "quantize.embeddings.{c}"
    for c in books:
        weight = found[c].get("weight")
        if weight is not None:
            ours[prefix.format(c=c) + ".weight"] = weight[:-1]  # RQ-VAE's last row is nn.Embedding's padding row
            extras[PADDING.format(d=c)] = weight[-1:].clone()
    for name in ("cluster_size_ema", "embed_ema"):
        rows = [found[c].get(name) for c in books]
        if all(r is not None for r in rows):
            ours[f"quantize.{OURS_BOOK[name]}"] = torch.stack(rows)
    return ours, extras


def codebooks_to_official(ours: StateDict, extras: StateDict, depth: int, shared: bool) -> StateDict:
    """The inverse: D names per tensor for a shared codebook (one tensor, as RQ-VAE's ModuleList saves it)."""
    out: StateDict = {}
    prefix = "quantize.embedding" if shared else "quantize.embeddings.{c}"
    books = {d: 0 if shared else d for d in range(depth)}
    weights = {c: torch.cat([ours[prefix.format(c=c) + ".weight"], extras[PADDING.format(d=c)]])
               for c in set(books.values())}
    for d, c in books.items():
        out[f"quantizer.codebooks.{d}.weight"] = weights[c]
        out[f"quantizer.codebooks.{d}.cluster_size_ema"] = ours["quantize.ema_cluster_size"][c]
        out[f"quantizer.codebooks.{d}.embed_ema"] = ours["quantize.ema_embed_sum"][c]
    return out


def fuse_qkv(state: StateDict) -> StateDict:
    """RQ-Transformer's `attn.query`, `attn.key`, `attn.value` → one `attn.qkv` (rows q | k | v), still under the
    official block prefix (renamed to `attention.wqkv` by the caller)."""
    out: StateDict = {}
    for name, tensor in state.items():
        match = QKV.fullmatch(name)
        if match is None:
            out[name] = tensor
        elif match["part"] == "query":
            base = f"{match['stack']}.blocks.{match['i']}.attn"
            parts = [state.get(f"{base}.{p}.{match['kind']}") for p in ("query", "key", "value")]
            if all(p is not None for p in parts):
                out[f"{base}.qkv.{match['kind']}"] = torch.cat(parts)
            else:  # an incomplete triple: keep the names so that fit() lists what is missing
                out.update({f"{base}.{p}.{match['kind']}": t for p, t in zip(("query", "key", "value"), parts)
                            if t is not None})
    return out


def tokenizer_rank(name: str) -> tuple[int, ...]:
    """Where RQVAE's state_dict puts `name`: encoder, decoder (conv_in, mid, up.0 … up.L−1, norm_out, conv_out),
    quantizer (by depth), quant_conv, post_quant_conv; a stable sort keeps the order inside each part."""
    parts = name.split(".")
    top = {"encoder": 0, "decoder": 1, "quantizer": 2, "quant_conv": 3, "post_quant_conv": 4}.get(parts[0], 5)
    if parts[0] == "decoder":
        section = {"conv_in": 0, "mid": 1, "up": 2, "norm_out": 3, "conv_out": 4}.get(parts[1], 5)
        return top, section, int(parts[2]) if section == 2 else 0
    if parts[0] == "quantizer":
        return top, int(parts[2]), 0
    return top, 0, 0


BLOCK_ORDER = {"ln1": 0, "ln2": 1, "attn.key": 2, "attn.query": 3, "attn.value": 4, "attn.proj": 5, "mlp.0": 6,
               "mlp.2": 7}


def generator_rank(name: str) -> tuple[int, ...]:
    """Where RQTransformer's state_dict puts `name`: its own parameters pos_emb_cond, pos_emb_hw, pos_emb_d, then
    cond_emb, input_mlp, head_mlp, the body and head blocks (ln1, ln2, key, query, value, proj, mlp), classifier."""
    parts = name.split(".")
    order = ["pos_emb_cond", "pos_emb_hw", "pos_emb_d", "cond_emb", "input_mlp", "head_mlp", "body_transformer",
             "head_transformer", "classifier"]
    top = order.index(parts[0]) if parts[0] in order else len(order)
    if parts[0] in ("body_transformer", "head_transformer"):
        return top, int(parts[2]), BLOCK_ORDER.get(".".join(parts[3:5]), BLOCK_ORDER.get(parts[3], 8))
    if parts[0] == "classifier":
        return top, int(parts[1] == "linear"), 0
    return top, 0, 0


def in_order(state: StateDict, rank) -> StateDict:
    return {name: state[name] for name in sorted(state, key=rank)}


class RQCheckpoints(OfficialFamily):
    name = "rq"
    tokenizer_keys: ClassVar[tuple[str, ...]] = ("state_dict",)
    generator_keys: ClassVar[tuple[str, ...]] = ("state_dict",)
    ema_keys: ClassVar[tuple[str, ...]] = ("state_dict_ema",)

    # --- tokenizer ------------------------------------------------------------------------------------------------
    def tokenizer_names(self, tokenizer: nn.Module) -> StateMap:
        return tokenizer_names(len(tokenizer.encoder.conv_blocks))

    def tokenizer_to_ours(self, official: StateDict, tokenizer: nn.Module) -> tuple[StateDict, StateDict]:
        books, extras = codebooks_to_ours(official, tokenizer.quantize, "the tokenizer file")
        rest = {k: v for k, v in official.items() if not (books and CODEBOOK.fullmatch(k))}
        ours, more = self.tokenizer_names(tokenizer).to_ours(rest)
        return {**ours, **books}, {**more, **extras}

    def tokenizer_to_official(self, ours: StateDict, extras: StateDict, tokenizer: nn.Module) -> StateDict:
        quantizer = tokenizer.quantize
        books = codebooks_to_official(ours, extras, int(quantizer.depth), bool(quantizer.shared_codebook))
        rest = {k: v for k, v in ours.items() if not k.startswith("quantize.")}
        padding = {k: v for k, v in extras.items() if k.endswith(".padding_row")}
        names = self.tokenizer_names(tokenizer)
        state = {**names.to_official(rest, {k: v for k, v in extras.items() if k not in padding}), **books}
        return in_order(state, tokenizer_rank)

    # --- generator ------------------------------------------------------------------------------------------------
    def generator_names(self, generator: nn.Module) -> StateMap:
        return GENERATOR_NAMES

    def generator_to_ours(self, official: StateDict, generator: nn.Module) -> tuple[StateDict, StateDict]:
        state = dict(official)
        cond, hw, depth = (state.pop(k, None) for k in ("pos_emb_cond", "pos_emb_hw", "pos_emb_d"))
        state = fuse_qkv(state)
        for name in list(state):
            if match := re.fullmatch(r"(body_transformer|head_transformer)\.blocks\.(\d+)\.attn\.qkv\.(\w+)", name):
                ours_stack = "layers" if match[1] == "body_transformer" else "depth_head.layers"
                state[f"{ours_stack}.{match[2]}.attention.wqkv.{match[3]}"] = state.pop(name)
        ours, extras = GENERATOR_NAMES.to_ours(state)
        if cond is not None and hw is not None:
            if cond.shape[:2] != (1, 1) or hw.shape[0] != 1:
                raise CheckpointMismatch(f"the generator file's pos_emb_cond {tuple(cond.shape)} / pos_emb_hw "
                                         f"{tuple(hw.shape)} are not one class slot and one row per position "
                                         "(block_size_cond must be 1, as the ImageNet models have)")
            ours["pos_embeddings"] = torch.cat([cond[0], hw[0]])
        if depth is not None:
            ours["depth_head.level_embeddings.weight"] = depth[0]
        return ours, extras

    def generator_to_official(self, ours: StateDict, extras: StateDict, generator: nn.Module) -> StateDict:
        state = dict(ours)
        positions, levels = state.pop("pos_embeddings"), state.pop("depth_head.level_embeddings.weight")
        out: StateDict = {"pos_emb_cond": positions[None, :1].clone(), "pos_emb_hw": positions[None, 1:].clone(),
                          "pos_emb_d": levels[None].clone()}
        for name in list(state):
            if match := WQKV.fullmatch(name):
                stack = "body_transformer" if match["layers"] == "layers" else "head_transformer"
                base = f"{stack}.blocks.{match['i']}.attn"
                for part, tensor in zip(("query", "key", "value"), state.pop(name).chunk(3, dim=0)):
                    out[f"{base}.{part}.{match['kind']}"] = tensor.clone()
        return in_order({**out, **GENERATOR_NAMES.to_official(state, extras)}, generator_rank)

    # --- files ----------------------------------------------------------------------------------------------------
    def tokenizer_file(self, state: StateDict, layout: str) -> Any:
        return nest(state, layout or "state_dict")

    def generator_file(self, state: StateDict, layout: str) -> Any:
        return nest(state, layout or "state_dict")
