"""Reading the files arvision writes (weights, checkpoints, artifacts, token caches) as data, with one clear line
for a file that is truncated, corrupt or not one of arvision's."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch


class UnreadableFile(ValueError):
    """A file that exists but cannot be read back; the message names it and says what to do."""


def load_weights(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """`torch.load` of a file arvision wrote: tensors and plain containers only (`weights_only`, never code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, TypeError,
            IndexError) as err:  # what torch.load raises for truncated or foreign bytes
        reason = (str(err).splitlines() or [type(err).__name__])[0][:100]
        raise UnreadableFile(f"{path} cannot be read ({reason}): it is truncated, corrupt or not written by "
                             f"arvision; restore it, or delete it to rebuild") from None


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """`load_state_dict`, with a file whose weights do not fit the model its own config builds named in one line."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:200]
        raise UnreadableFile(f"{path}: its weights do not fit the {type(module).__name__} its config builds "
                             f"({detail}); the file was changed or written by other code") from None
