"""The Generator contract and the compatibility check that runs before any training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from arvision.tokenizers.base import TokenSpec


class IncompatibleTokenizer(ValueError):
    """A generator was paired with a tokenizer whose tokens it cannot model."""


class Generator(nn.Module):
    """Base class of every stage-2 model.

    Built from the frozen tokenizer's `TokenSpec` (the tokenizer itself is never a submodule, so its weights
    are not trained, averaged or saved twice). Class-conditional with a null class (`num_classes`) for CFG.
    """

    spec: TokenSpec
    num_classes: int

    def loss(self, tokens: Any, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, generator: torch.Generator | None = None,
               **sampling: Any) -> Any:
        raise NotImplementedError

    def network_evaluations(self, cfg: float) -> int:
        """Forward passes of the network per sampled batch; under CFG each pass runs 2B rows (see `sampling_cost`)."""
        raise NotImplementedError


def require(spec: TokenSpec, *, generator: str, ok: bool, needs: str) -> None:
    """Raise `IncompatibleTokenizer` with one sentence naming what `generator` needs."""
    if not ok:
        raise IncompatibleTokenizer(f"{generator} needs {needs}; got tokenizer={spec.name}")
