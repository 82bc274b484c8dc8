"""diffusers' AutoencoderKL folders (the SD-VAE of DiT and ACDiT: `stabilityai/sd-vae-ft-ema`, `-ft-mse`,
`facebook/DiT-XL-2-256` subfolder `vae`) ↔ `tokenizer=sd_vae` (`DiffusersVAETokenizer`).

A diffusers folder holds `config.json` and the weights as `diffusion_pytorch_model.safetensors` and/or `.bin`
(a plain state dict); `tokenizer_file` is that weights file, and the `config.json` beside it gives the scaling
factor (ACDiT's sampler divides by `vae.config.scaling_factor`). The wrapped module is diffusers' own, so the names
are the file's under the prefix `vae.`, with one exception: files saved by diffusers before its attention rewrite
(the 2022 SD-VAE uploads among them) name the attention projections `query`, `key`, `value`, `proj_attn`, which
diffusers itself renames to `to_q`, `to_k`, `to_v`, `to_out.0` on loading. The import does the same, records the
file's naming as its layout (`deprecated attention names`), and an export writes those names back. The scaling
factor is arvision's buffer, not a tensor of the file; an export writes it into a `config.json` beside the weights
(diffusers' own config of the model), so the exported folder loads with `AutoencoderKL.from_pretrained`.

`DiffusersVAEFamily` carries this for any family whose tokenizer is the SD-VAE (ACDiT's subclasses it); on its own
(official=sd_vae_ft_ema, sd_vae_ft_mse) it imports the tokenizer alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from arvision.imports.base import (CheckpointMismatch, OfficialFamily, StateDict, StateMap, find_state_dict,
                                   read_official)
from arvision.tokenizers.base import MissingExtra
from arvision.tokenizers.diffusers_vae import DIFFUSERS_VERSION, DiffusersVAETokenizer
from arvision.utils.files import UnreadableFile

SCALING_BUFFER = "scaling_factor"
DEPRECATED_ATTENTION = "deprecated attention names"  # the layout of a file with query/key/value/proj_attn
RENAMED = (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))

DIFFUSERS_NAMES = StateMap(pairs=[("{path}", "vae.{path}")])
# the same tensors under diffusers' names before its attention rewrite (the VAE attends in its two mid blocks)
DEPRECATED_NAMES = StateMap(pairs=[
    *[(f"{part}.mid_block.attentions.{{i}}.{old}.{{kind}}", f"vae.{part}.mid_block.attentions.{{i}}.{new}.{{kind}}")
      for part in ("encoder", "decoder") for old, new in RENAMED],
    ("{path}", "vae.{path}")])


def uses_deprecated_attention(state: StateDict) -> bool:
    return any(name.endswith((".query.weight", ".proj_attn.weight")) for name in state)


def read_weights(path: Path) -> StateDict:
    """A diffusers weights file: safetensors, or a torch-saved plain state dict (read as data)."""
    if path.suffix != ".safetensors":
        return find_state_dict(read_official(path), path, ())[0]
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:
        raise MissingExtra(f"reading {path.name} needs safetensors (with diffusers=={DIFFUSERS_VERSION}): "
                           "pip install 'arvision[diffusers]'") from err
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise UnreadableFile(f"{path} cannot be read ({str(err)[:100]}): it is truncated or not a safetensors "
                             "file; download it again") from None


def folder_scaling_factor(path: Path) -> float | None:
    """The `scaling_factor` of the config.json beside a weights file (None: no config.json there)."""
    config = path.parent / "config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text()).get("scaling_factor", None)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise UnreadableFile(f"{config} is not a diffusers config ({err}); download the folder again") from None
    return None if value is None else float(value)


class DiffusersVAEFamily(OfficialFamily):
    """An SD-VAE in a diffusers folder as a tokenizer; a family with this tokenizer subclasses it."""

    name = "sd_vae"
    tokenizer_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.scaling_factor: float | None = None  # from the config.json of the folder read last

    def read_tokenizer(self, path: str | os.PathLike) -> tuple[StateDict, str]:
        path = Path(path)
        state = read_weights(path)
        self.scaling_factor = folder_scaling_factor(path)
        return state, DEPRECATED_ATTENTION if uses_deprecated_attention(state) else ""

    def tokenizer_names(self, tokenizer: nn.Module) -> StateMap:
        if not isinstance(tokenizer, DiffusersVAETokenizer):
            raise TypeError(f"the diffusers VAE map needs tokenizer=sd_vae, got {type(tokenizer).__name__}")
        return DIFFUSERS_NAMES

    def tokenizer_to_ours(self, official: StateDict, tokenizer: nn.Module) -> tuple[StateDict, StateDict]:
        names = DEPRECATED_NAMES if uses_deprecated_attention(official) else self.tokenizer_names(tokenizer)
        ours, extras = names.to_ours(official)
        factor = tokenizer.scaling_factor.detach().clone()
        if self.scaling_factor is not None:
            factor = torch.tensor(self.scaling_factor, dtype=factor.dtype)
        ours[SCALING_BUFFER] = factor
        return ours, extras

    def tokenizer_to_official(self, ours: StateDict, extras: StateDict, tokenizer: nn.Module) -> StateDict:
        kept = {name: tensor for name, tensor in ours.items() if name != SCALING_BUFFER}
        return self.tokenizer_names(tokenizer).to_official(kept, extras)

    def tokenizer_companions(self, tokenizer: nn.Module) -> dict[str, str]:
        """The folder's config.json (diffusers' own, with the tokenizer's scaling factor), so that
        `AutoencoderKL.from_pretrained(<export folder>)` loads the export."""
        self.tokenizer_names(tokenizer)  # the type check
        config = json.loads(tokenizer.vae.to_json_string())
        config["scaling_factor"] = float(tokenizer.scaling_factor)
        return {"config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}

    def tokenizer_file(self, state: StateDict, layout: str) -> Any:
        """The weights as the imported file had them: a plain state dict, with the old attention names if it had
        those."""
        if layout == DEPRECATED_ATTENTION:
            return DEPRECATED_NAMES.to_official({f"vae.{name}": tensor for name, tensor in state.items()}, {})
        if layout:
            raise CheckpointMismatch(f"unknown diffusers layout {layout!r}")
        return state
