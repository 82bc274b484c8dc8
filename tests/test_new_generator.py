"""A new paradigm is one module, one config and its tests: this adds a complete generator from a module file and a
config file outside the package (nothing else registered) and runs it through the pipeline end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

import arvision.generators
from arvision import pipeline
from arvision.generators.base import IncompatibleTokenizer
from tests.conftest import compose_train

MODULE = '''
"""Per-position class-conditional token distributions: every token drawn independently given the class."""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arvision.generators.base import Generator, SamplingCost, require
from arvision.tokenizers.base import TokenSpec


class UnigramGenerator(Generator):
    name = "unigram"

    def __init__(self, *, spec: TokenSpec, num_classes: int, class_dropout: float = 0.1) -> None:
        super().__init__()
        require(spec, generator="unigram", ok=spec.kind == "discrete" and spec.layout == "grid",
                needs="a discrete grid tokenizer (tokenizer=vq)")
        self.spec, self.num_classes, self.class_dropout = spec, num_classes, class_dropout
        self.logits = nn.Parameter(torch.zeros(num_classes + 1, spec.grid[0] * spec.grid[1], spec.vocab_size))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training:  # label dropout to the null class, for CFG
            drop = torch.rand(labels.shape, device=labels.device) < self.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return {"loss": F.cross_entropy(self.logits[labels].flatten(0, 1), tokens.flatten())}

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, cfg: float = 1.0, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        logits = self.logits[labels]
        if cfg != 1.0:
            null = self.logits[self.num_classes]
            logits = null + cfg * (logits - null)
        probs = torch.softmax(logits.flatten(0, 1) / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).view(labels.shape[0], *self.spec.grid)

    def sampling_cost(self, *, cfg: float = 1.0, **_: Any) -> SamplingCost:
        return SamplingCost(backbone_passes=1, rows_per_pass_factor=2 if cfg != 1.0 else 1)
'''

CONFIG = """
name: unigram
model:
  _target_: arvision.generators.unigram.UnigramGenerator
  _partial_: true
  class_dropout: 0.1
train:
  max_steps: 40
  batch_size: 16
  lr: 0.1
  betas: [0.9, 0.95]
  weight_decay: 0.0
  warmup_steps: 2
  grad_clip: 1.0
  ema_decay: 0.9
  compile: false
sample:
  cfg: 1.5
  temperature: 1.0
"""


@pytest.fixture
def unigram(tmp_path, monkeypatch) -> Path:
    """The module, importable as arvision.generators.unigram, and its config on Hydra's search path."""
    source = tmp_path / "unigram.py"
    source.write_text(MODULE)
    spec = importlib.util.spec_from_file_location("arvision.generators.unigram", source)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(arvision.generators, "unigram", module, raising=False)
    conf = tmp_path / "conf" / "generator"
    conf.mkdir(parents=True)
    (conf / "unigram.yaml").write_text(CONFIG)
    return tmp_path / "conf"


def compose(conf: Path, tmp_path: Path, *overrides: str):
    return compose_train(["debug=tiny", "data=shapes", "generator=unigram", f"hydra.searchpath=[file://{conf}]",
                          "metrics.num_samples=40", "metrics.num_reference=40", *overrides], tmp_path)


def test_a_generator_added_as_one_module_and_one_config_runs_end_to_end(unigram, tmp_path):
    cfg = compose(unigram, tmp_path, "tokenizer=vq")
    run_dir = tmp_path / "run"
    pipeline.run(cfg, run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    gen = results["metrics"]["generator"]
    assert results["generator"] == "unigram"
    assert gen["nfe_per_image"] == 1 and gen["sampling_cost"]["rows_per_pass_factor"] == 2  # cfg 1.5
    vocab = results["spec"]["vocab_size"]
    assert gen["test_loss"]["value"] < math.log(vocab)  # it learned: better than uniform over the codebook
    assert (run_dir / "samples.png").is_file() and (run_dir / "generator.pt").is_file()


def test_a_new_generator_refuses_tokens_it_cannot_model_before_training(unigram, tmp_path):
    cfg = compose(unigram, tmp_path, "tokenizer=vae")
    dm = pipeline.build_datamodule(cfg)
    with pytest.raises(IncompatibleTokenizer, match="unigram needs a discrete grid tokenizer .* got tokenizer=vae"):
        pipeline.build_generator(cfg, pipeline.build_tokenizer(cfg, dm), dm.num_classes)
