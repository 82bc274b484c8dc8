"""The Generator and Tokenizer contracts: every implementation declares what it offers, nothing is discovered."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from arvision import pipeline
from arvision.generators.base import Generator, SamplingCost
from arvision.generators.editing import editable_generators
from arvision.tokenizers.base import MultiScaleTokenizer, Tokenizer
from tests.conftest import REPO, compose_train

CONF = REPO / "conf"
GENERATOR_CONFIGS = sorted(p.stem for p in (CONF / "generator").glob("*.yaml"))
TOKENIZER_CONFIGS = sorted(p.stem for p in (CONF / "tokenizer").glob("*.yaml"))
PAIR = {"raster": "vq", "next_scale": "msvq", "flowar": "vae", "acdit": "vae", "mar": "vae"}  # a tokenizer each accepts


def generator_class(name: str) -> type[Generator]:
    target = OmegaConf.load(CONF / "generator" / f"{name}.yaml").model._target_
    module, _, cls = target.rpartition(".")
    return getattr(__import__(module, fromlist=[cls]), cls)


def built(name: str, tmp_path: Path) -> Generator:
    cfg = compose_train([f"generator={name}", f"tokenizer={PAIR[name]}", "debug=tiny", "data=shapes"], tmp_path)
    dm = pipeline.build_datamodule(cfg)
    return pipeline.build_generator(cfg, pipeline.build_tokenizer(cfg, dm), dm.num_classes)


def test_every_generator_config_has_a_pair_here():
    assert sorted(PAIR) == GENERATOR_CONFIGS


@pytest.mark.parametrize("name", GENERATOR_CONFIGS)
def test_each_generator_class_names_its_config_and_implements_the_contract(name):
    cls = generator_class(name)
    assert issubclass(cls, Generator) and cls.name == name
    for method in ("loss", "sample", "sampling_cost"):
        assert getattr(cls, method) is not getattr(Generator, method), f"{name} does not implement {method}"
    # editing is declared, and declared exactly when the class implements it
    assert cls.supports_editing == (cls.edit is not Generator.edit)
    assert (name in editable_generators()) == cls.supports_editing


@pytest.mark.parametrize("name", GENERATOR_CONFIGS)
def test_sampling_cost_takes_samples_settings_with_the_same_defaults(name):
    """`sampling_cost(**settings)` describes `sample(labels, **settings)`: each setting it reads has sample's default."""
    cls = generator_class(name)
    sample = inspect.signature(cls.sample).parameters
    cost = inspect.signature(cls.sampling_cost).parameters
    read = [p for p in cost.values() if p.kind is p.KEYWORD_ONLY]
    assert read and any(p.kind is p.VAR_KEYWORD for p in cost.values())  # other settings are accepted, ignored
    for p in read:
        assert p.name in sample, f"{name}.sampling_cost reads {p.name}, which sample does not take"
        assert p.default == sample[p.name].default, f"{name}: {p.name} defaults differ"


@pytest.mark.parametrize("name", GENERATOR_CONFIGS)
def test_sampling_cost_is_pure_and_follows_the_run_settings(name, tmp_path):
    model = built(name, tmp_path)
    settings = OmegaConf.to_container(compose_train([f"generator={name}", "debug=tiny"], tmp_path).generator.sample,
                                      resolve=True)
    before = model.sampling_cost(**settings)
    assert isinstance(before, SamplingCost) and before.passes == before.backbone_passes + before.head_passes > 0
    labels = torch.tensor([0, 1])
    model.sample(labels, generator=torch.Generator().manual_seed(0), **{**settings, "cfg": 1.0})
    assert model.sampling_cost(**settings) == before  # an earlier sample call with other settings changes nothing
    assert model.sampling_cost(**{**settings, "cfg": 1.0}).rows_per_pass_factor == 1
    assert model.sampling_cost(**{**settings, "cfg": 2.0}).rows_per_pass_factor == 2
    assert model.sampling_cost(**{**settings, "top_k": 3, "temperature": 0.5}) == before  # settings without a cost


@pytest.mark.parametrize("name", TOKENIZER_CONFIGS)
def test_each_tokenizer_declares_its_abilities(name, tmp_path):
    if name == "sd_vae":  # the only tokenizer behind an extra CI may lack
        pytest.importorskip("diffusers", reason="optional extra: pip install 'arvision[diffusers]'")
    cfg = compose_train([f"tokenizer={name}", "debug=tiny", "data=shapes"], tmp_path)
    tok = pipeline.build_tokenizer(cfg, pipeline.build_datamodule(cfg))
    cls = type(tok)
    assert isinstance(tok, Tokenizer) and tok.spec.name == name
    assert cls.has_scaling_factor == (cls.calibrate_scaling is not Tokenizer.calibrate_scaling)
    assert tok.spec.has_codebook == (cls.codebook is not Tokenizer.codebook)
    assert (tok.spec.layout == "scales") == isinstance(tok, MultiScaleTokenizer)
    if tok.spec.has_codebook:  # the lookup picks the code whose vector is nearest: codes map to themselves
        codes = tok.codebook()
        assert codes.shape == (tok.spec.vocab_size, tok.spec.dim)
        assert torch.equal(tok.nearest_codes(codes.detach()), torch.arange(tok.spec.vocab_size))
    else:
        with pytest.raises(NotImplementedError, match=f"tokenizer={name} exposes no codebook"):
            tok.codebook()


def test_no_capability_is_discovered_with_hasattr_or_getattr():
    """The contract lives in the base classes: no code asks an object whether it has an attribute."""
    calls = []
    for path in sorted((REPO / "src" / "arvision").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr",
                                                                                                   "getattr"):
                calls.append(f"{path.relative_to(REPO)}:{node.lineno} {node.func.id}")
    assert calls == []
