"""The Generator contract and the compatibility check that runs before any training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from arvision.tokenizers.base import Tokenizer, TokenSpec


class IncompatibleTokenizer(ValueError):
    """A generator was paired with a tokenizer whose tokens it cannot model."""


class _Frozen:
    """Holds the tokenizer outside the module tree: not a submodule (not trained, averaged, saved or moved with
    the generator) and shared, not copied, when the generator is deep-copied (the EMA copy uses the same one)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __deepcopy__(self, memo: dict) -> _Frozen:
        return self


class Generator(nn.Module):
    """Base class of every stage-2 model.

    Built from the frozen tokenizer's `TokenSpec`; the pipeline then calls `attach_tokenizer`, which generators
    that need the tokenizer's own operations (VAR's teacher-forcing inputs and accumulator) read through
    `self.tokenizer`. Class-conditional with a null class (`num_classes`) for CFG.
    """

    spec: TokenSpec
    num_classes: int
    _frozen: _Frozen | None = None

    def attach_tokenizer(self, tokenizer: Tokenizer) -> Generator:
        if tokenizer.spec != self.spec:
            raise ValueError(f"tokenizer spec {tokenizer.spec} differs from the generator's {self.spec}")
        tokenizer.eval().requires_grad_(False)
        self._frozen = _Frozen(tokenizer)
        return self

    def tokenizer_on(self, device: torch.device) -> Tokenizer:
        """The attached tokenizer, moved to `device` on first use there (it is not a submodule, so `.to()` on the
        generator does not move it)."""
        if self._frozen is None:
            raise RuntimeError(f"{type(self).__name__} needs its tokenizer: call generator.attach_tokenizer(tokenizer)")
        tokenizer = self._frozen.tokenizer
        if next(tokenizer.parameters()).device != torch.device(device):
            tokenizer.to(device)
        return tokenizer

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
