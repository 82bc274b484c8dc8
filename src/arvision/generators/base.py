"""The Generator contract and the compatibility check that runs before any training.

Everything the pipeline, the evaluation and the CLIs may ask of a generator is declared here; nothing is
discovered with `hasattr`. A generator module subclasses `Generator` and provides:

- `name`: its config name (`conf/generator/<name>.yaml`), used in messages and in the list of editable generators;
- `__init__(*, spec, num_classes, **model)`: checks the tokenizer with `require` (raises `IncompatibleTokenizer`);
- `loss(tokens, labels) -> dict` with the scalar `loss` to minimise (other entries are logged);
- `sample(labels, *, cfg, generator, **sampling) -> tokens` in the tokenizer's layout;
- `sampling_cost(**sampling) -> SamplingCost`: a pure function of the same settings as `sample`;
- optionally `supports_editing = True` with `edit(...)`, and `no_weight_decay()`;
- optionally `set_progress(step=, total_steps=)` when training follows a schedule over the run (RAR's order
  annealing): the training task calls it before every step's loss;
- optionally `token_encoding` / `encode` when it trains on more than the tokenizer's tokens (FlexVAR's per-scale
  ground truth quantised from the continuous latent): the token cache, the test loss and editing read them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from arvision.tokenizers.base import Tokenizer, TokenSpec


class IncompatibleTokenizer(ValueError):
    """A generator was paired with a tokenizer whose tokens it cannot model."""


@dataclass(frozen=True)
class SamplingCost:
    """Sequential network passes of one `sample` call, whatever the batch size.

    `backbone_passes` run the main network; `head_passes` run a separate per-token head (FlowAR's flow head, the
    RQ-Transformer's depth head). Under CFG every pass runs the conditional and the null-class rows together:
    `rows_per_pass_factor` is 2 then, else 1.
    """

    backbone_passes: int
    head_passes: int = 0
    rows_per_pass_factor: int = 1

    @property
    def passes(self) -> int:
        """Network evaluations per image (NFE): backbone and head passes together."""
        return self.backbone_passes + self.head_passes

    def to_dict(self) -> dict[str, int]:
        return {"passes": self.passes, **asdict(self)}


@dataclass(frozen=True)
class TokenEncoding:
    """What stage 2 trains on for a batch of images (B, C, H, W) in [-1, 1]: `encode(images)`. `name` is "" for
    the tokenizer's own tokens, else it names the generator's encoding and is part of the token cache's key (the
    cache must change when the ground truth does)."""

    name: str
    encode: Callable[[torch.Tensor], Any]


class _Frozen:
    """Holds the tokenizer outside the module tree: not a submodule (not trained, averaged, saved or moved with
    the generator) and shared, not copied, when the generator is deep-copied (the EMA copy uses the same one)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __deepcopy__(self, memo: dict) -> _Frozen:
        return self


class Generator(nn.Module):
    """Base class of every stage-2 model (see the module docstring for what a subclass provides).

    Built from the frozen tokenizer's `TokenSpec`; the pipeline then calls `attach_tokenizer`, and generators that
    need the tokenizer's own operations (VAR's teacher-forcing inputs, FlexVAR's codebook) read it through
    `tokenizer_on(device)`. Class-conditional with a null class (`num_classes`) for CFG.
    """

    name: ClassVar[str]
    supports_editing: ClassVar[bool] = False  # zero-shot in-/out-painting through `edit`

    spec: TokenSpec
    num_classes: int
    _frozen: _Frozen | None = None

    def attach_tokenizer(self, tokenizer: Tokenizer) -> Generator:
        if tokenizer.spec != self.spec:
            raise ValueError(f"tokenizer spec {tokenizer.spec} differs from the generator's {self.spec}")
        tokenizer.eval().requires_grad_(False)
        self._frozen = _Frozen(tokenizer)
        return self

    def tokenizer_on(self, device: torch.device | str) -> Tokenizer:
        """The attached tokenizer, moved to `device` on first use there (it is not a submodule, so `.to()` on the
        generator does not move it)."""
        if self._frozen is None:
            raise RuntimeError(f"{type(self).__name__} needs its tokenizer: call generator.attach_tokenizer(tokenizer)")
        tokenizer = self._frozen.tokenizer
        if next(tokenizer.parameters()).device != torch.device(device):
            tokenizer.to(device)
        return tokenizer

    @classmethod
    def token_encoding(cls, tokenizer: Tokenizer, model: Mapping[str, Any]) -> TokenEncoding:
        """The encoding stage 2 trains on, from the generator's settings (`generator.model`) before any generator is
        built (the token cache comes first): the tokenizer's tokens unless a generator says otherwise."""
        return TokenEncoding(name="", encode=tokenizer.encode)

    def encode(self, images: torch.Tensor) -> Any:
        """This generator's training tokens of `images` (what `loss` and `edit` take): `token_encoding` of its
        settings; the tokenizer's tokens unless a generator overrides it."""
        return self.tokenizer_on(images.device).encode(images)

    @property
    def training_spec(self) -> TokenSpec:
        """The layout of the tokens `loss` takes (what `encode` returns; arvision-bench draws random ones in it): the
        tokenizer's spec unless the generator trains on its own encoding."""
        return self.spec

    def loss(self, tokens: Any, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, generator: torch.Generator | None = None,
               **sampling: Any) -> Any:
        raise NotImplementedError

    def sampling_cost(self, **sampling: Any) -> SamplingCost:
        """The passes `sample(labels, **sampling)` runs: a pure function of the settings, with `sample`'s own
        defaults for those not given; settings that do not change the cost (top_k, temperature…) are ignored."""
        raise NotImplementedError

    def edit(self, labels: torch.Tensor, known_tokens: Any, known: torch.Tensor, *, cfg: float = 1.0,
             generator: torch.Generator | None = None, **sampling: Any) -> Any:
        """Tokens for `labels` that keep `known_tokens` where `known` is True and sample the rest (zero-shot
        in-/out-painting); only generators that set `supports_editing` implement it."""
        raise NotImplementedError(f"generator={self.name} has no zero-shot editing")

    def set_progress(self, *, step: int, total_steps: int) -> None:
        """Called by the training task before each step's `loss`: `step` optimizer steps of `total_steps` are done
        (a resumed run is told its restored step, so a schedule resumes with it). For generators whose training
        follows a schedule over the run (RAR's order annealing in `raster`); the others ignore it."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names the optimiser must not decay (timm's convention: positions, tables, scales)."""
        return set()


def require(spec: TokenSpec, *, generator: str, ok: bool, needs: str) -> None:
    """Raise `IncompatibleTokenizer` with one sentence naming what `generator` needs."""
    if not ok:
        raise IncompatibleTokenizer(f"{generator} needs {needs}; got tokenizer={spec.name}")
