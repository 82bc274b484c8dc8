"""Official checkpoints in and out: what every family shares.

A family module (`var.py`, `llamagen.py`, …) says where its official files keep their tensors and how their names
map to arvision's; this module reads those files as data, maps names both ways, and refuses in one line anything
that does not fit. Nothing here is lenient: the official loaders call `load_state_dict(strict=False)` in places,
which hides a wrong file or a wrong model size; arvision lists what is missing, unexpected or of another shape.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from arvision.utils.files import UnreadableFile

# The only classes an official file may hold besides tensors and plain containers: the training scripts of MAR,
# LlamaGen and ACDiT pickle their `argparse.Namespace` next to the weights. Nothing else is ever unpickled.
OFFICIAL_PICKLED_CLASSES: tuple[type, ...] = (argparse.Namespace,)

StateDict = dict[str, torch.Tensor]


class CheckpointMismatch(ValueError):
    """An official file whose tensors do not fit the model its preset builds; the message lists what differs."""


# --------------------------------------------------------------------------------------------- reading
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_official(path: str | os.PathLike) -> Any:
    """The object an official `torch.save` wrote, read as data: `weights_only=True` with the allow-list above, so a
    file that would run code (any other pickled global) is refused in one line instead of executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}: give the path of the official checkpoint you downloaded")
    try:
        with torch.serialization.safe_globals(list(OFFICIAL_PICKLED_CLASSES)):
            # mmap keeps multi-GB files (LlamaGen-3B, MAR-H) out of memory until their tensors are copied
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"the object {found.group(1)}" if found else "objects other than tensors and plain containers"
        raise UnreadableFile(f"{path} holds {what}, which arvision does not unpickle (loading it could run code); "
                             "only official checkpoints of tensors, plain containers and argparse.Namespace are "
                             "read") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError) as err:  # garbage bytes
        reason = (str(err).splitlines() or [type(err).__name__])[0][:100]
        raise UnreadableFile(f"{path} cannot be read ({reason}): it is truncated or not a PyTorch checkpoint; "
                             "download it again") from None


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def find_state_dict(obj: Any, path: str | os.PathLike, keys: Sequence[str]) -> tuple[StateDict, str]:
    """The state dict inside an official file and where it was: the first of `keys` present (dotted for nested
    entries, e.g. `trainer.var_wo_ddp`), else the object itself when it is a flat name → tensor mapping (a plain or
    FSDP-consolidated state dict). Wrapper prefixes (`module.` from DDP, `_orig_mod.` from torch.compile) go."""
    for key in keys:
        node = obj
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if is_state_dict(node):
            return strip_prefixes(node), key
    if is_state_dict(obj):
        return strip_prefixes(obj), ""
    top = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
    raise UnreadableFile(f"{path}: no state dict found (top level: {top}); expected a plain state dict or one "
                         f"under {', '.join(repr(k) for k in keys)}")


def strip_prefixes(state: Mapping[str, torch.Tensor],
                   prefixes: Sequence[str] = ("module.", "_orig_mod.")) -> StateDict:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------- names
def _pattern(template: str) -> re.Pattern[str]:
    """`blocks.{i}.attn.qkv.weight` → a regex; `{i}`… (one letter) match an index, `{path}` any dotted rest of a
    name, any other `{name}` one name part."""
    out, pos = [], 0
    for found in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:found.start()]))
        name = found.group(1)
        out.append(rf"(?P<{name}>\d+)" if len(name) == 1 else rf"(?P<{name}>.+)" if name == "path"
                   else rf"(?P<{name}>[^.]+)")
        pos = found.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


@dataclass
class StateMap:
    """Official tensor names ↔ arvision's, both ways, from pairs of name templates
    (`("blocks.{i}.attn.mat_qkv.weight", "blocks.{i}.attn.qkv.weight")`); a name no pair matches is the same in
    both. `official_only`: templates of official tensors arvision's modules do not hold (buffers they rebuild,
    training statistics); they travel beside the weights (`extras`) so an export writes the file back as it was."""

    pairs: Sequence[tuple[str, str]] = ()
    official_only: Sequence[str] = ()
    _compiled: list[tuple[re.Pattern[str], re.Pattern[str], str, str]] = field(init=False, repr=False)
    _extras: list[re.Pattern[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._compiled = [(_pattern(a), _pattern(b), a, b) for a, b in self.pairs]
        self._extras = [_pattern(t) for t in self.official_only]

    def ours(self, name: str) -> str:
        for official, _, _, template in self._compiled:
            if match := official.fullmatch(name):
                return template.format(**match.groupdict())
        return name

    def official(self, name: str) -> str:
        for _, ours, template, _ in self._compiled:
            if match := ours.fullmatch(name):
                return template.format(**match.groupdict())
        return name

    def to_ours(self, state: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
        """(arvision's state dict, the official-only extras)."""
        ours, extras = {}, {}
        for name, tensor in state.items():
            if any(p.fullmatch(name) for p in self._extras):
                extras[name] = tensor
            else:
                ours[self.ours(name)] = tensor
        return ours, extras

    def to_official(self, ours: Mapping[str, torch.Tensor], extras: Mapping[str, torch.Tensor]) -> StateDict:
        return {**{self.official(name): tensor for name, tensor in ours.items()}, **extras}


def _shape(t: torch.Tensor | torch.Size) -> str:
    return "×".join(map(str, t.shape if isinstance(t, torch.Tensor) else t)) or "scalar"


def _first(names: Iterable[str], n: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "")


def fit(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, path: str | os.PathLike, preset: str,
        official_names: StateMap | None = None) -> None:
    """Load `state` into `module` strictly, or raise `CheckpointMismatch` in one line naming what is missing,
    unexpected or of another shape (in the file's own names when `official_names` is given)."""
    own = module.state_dict()
    name = official_names.official if official_names is not None else (lambda n: n)
    missing = [name(k) for k in own if k not in state]
    unexpected = [name(k) for k in state if k not in own]
    shapes = [f"{name(k)} {_shape(state[k])} in the file, {_shape(v)} in the model"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = ([f"{len(missing)} missing ({_first(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected ({_first(unexpected)})"] if unexpected else []) + \
                ([f"{len(shapes)} of another shape ({_first(shapes, 2)})"] if shapes else [])
        raise CheckpointMismatch(f"{path} does not fit official={preset} ({type(module).__name__}): "
                                 f"{'; '.join(parts)}; is it the file of that model, or another size?")
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------- a family
class OfficialFamily:
    """How one family's official files hold a tokenizer and a generator. Subclasses (one file per family) name the
    places the state dicts sit, map names with a `StateMap` and say what layout an export writes back."""

    name: ClassVar[str]
    tokenizer_keys: ClassVar[tuple[str, ...]] = ("model", "state_dict")
    generator_keys: ClassVar[tuple[str, ...]] = ("model", "state_dict")
    ema_keys: ClassVar[tuple[str, ...]] = ("ema",)  # where EMA weights sit, read first when the import asks for EMA

    def read_tokenizer(self, path: str | os.PathLike) -> tuple[StateDict, str]:
        """(the official tokenizer state dict, where it sat in the file). Override for files `torch.load` does
        not read (a diffusers folder's safetensors)."""
        return find_state_dict(read_official(path), path, self.tokenizer_keys)

    def tokenizer_names(self, tokenizer: torch.nn.Module) -> StateMap:
        raise NotImplementedError

    def generator_names(self, generator: torch.nn.Module) -> StateMap:
        raise NotImplementedError

    def tokenizer_to_ours(self, official: StateDict, tokenizer: torch.nn.Module) -> tuple[StateDict, StateDict]:
        """(arvision's tokenizer state dict, official-only extras). Override for more than renaming."""
        return self.tokenizer_names(tokenizer).to_ours(official)

    def generator_to_ours(self, official: StateDict, generator: torch.nn.Module) -> tuple[StateDict, StateDict]:
        return self.generator_names(generator).to_ours(official)

    def tokenizer_to_official(self, ours: StateDict, extras: StateDict, tokenizer: torch.nn.Module) -> StateDict:
        return self.tokenizer_names(tokenizer).to_official(ours, extras)

    def generator_to_official(self, ours: StateDict, extras: StateDict, generator: torch.nn.Module) -> StateDict:
        return self.generator_names(generator).to_official(ours, extras)

    def tokenizer_companions(self, tokenizer: torch.nn.Module) -> dict[str, str]:
        """Text files an export writes beside the tokenizer file (name → content): a diffusers folder's
        `config.json`; none for the other families."""
        return {}

    def tokenizer_file(self, state: StateDict, layout: str) -> Any:
        """What an export saves for the tokenizer: the state dict where the imported file had it (`layout`: the key
        it was found under, "" for a plain state dict)."""
        return nest(state, layout)

    def generator_file(self, state: StateDict, layout: str) -> Any:
        return nest(state, layout)


def nest(state: StateDict, layout: str) -> Any:
    """`state` placed under the dotted key `layout` ("" → the state dict itself)."""
    obj: Any = state
    for part in reversed(layout.split(".") if layout else []):
        obj = {part: obj}
    return obj
