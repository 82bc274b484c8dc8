"""Bad settings fail before any work, in one line that names the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from arvision import pipeline
from tests.conftest import REPO, compose_train

BAD = [  # override → what the one-line error must say
    ("generator.model.depth=abc", r"^generator\.model\.depth='abc': RasterGenerator takes depth: int$"),
    ("generator.model.dim=2.5", r"generator\.model\.dim=2\.5: RasterGenerator takes dim: int"),
    ("generator.model.depth_mode=[1]", r"generator\.model\.depth_mode=\[1\]: RasterGenerator takes depth_mode: str"),
    ("+generator.model.depthh=3", r"generator\.model\.depthh is not a setting of RasterGenerator; it takes: dim, "),
    ("tokenizer.model.ch_mult=[1,two]", r"tokenizer\.model\.ch_mult=\[1, 'two'\]: VQTokenizer takes ch_mult: "
                                        r"tuple\[int, \.\.\.\]"),
    ("tokenizer.model.vocab_size=true", r"tokenizer\.model\.vocab_size=True: VQTokenizer takes vocab_size: int"),
    ("generator.train.batch_size=0", r"^generator\.train\.batch_size=0: must be an integer ≥ 1$"),
    ("generator.train.batch_size=-4", r"generator\.train\.batch_size=-4: must be an integer ≥ 1"),
    ("tokenizer.train.batch_size=2.5", r"tokenizer\.train\.batch_size=2\.5: must be an integer ≥ 1"),
    ("generator.train.lr=0", r"generator\.train\.lr=0: must be a number > 0"),
    ("tokenizer.train.lr=-1e-3", r"tokenizer\.train\.lr=-0\.001: must be a number > 0"),
    ("generator.train.warmup_steps=-1", r"generator\.train\.warmup_steps=-1: must be an integer ≥ 0"),
    ("generator.train.weight_decay=-0.1", r"generator\.train\.weight_decay=-0\.1: must be a number ≥ 0"),
    ("generator.train.grad_clip=-1", r"generator\.train\.grad_clip=-1: must be a number ≥ 0 \(or null\)"),
    ("generator.train.ema_decay=1.5", r"generator\.train\.ema_decay=1\.5: must be a number ≥ 0 and < 1"),
    ("generator.train.max_steps=abc", r"generator\.train\.max_steps='abc': must be an integer ≥ 1"),
    ("checkpoint_every=0", r"checkpoint_every=0: must be an integer ≥ 1"),
    ("metrics.num_samples=0", r"metrics\.num_samples=0: must be an integer ≥ 1"),
    ("metrics.num_reference=-1", r"metrics\.num_reference=-1: must be an integer ≥ 1"),
    ("metrics.batch_size=0", r"metrics\.batch_size=0: must be an integer ≥ 1"),
    ("generator.model._target_=os.system", r"refusing to instantiate 'os\.system'"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[o for o, _ in BAD])
def test_a_bad_setting_fails_before_any_work_in_one_line(override, message, tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "build_datamodule", lambda cfg: pytest.fail("did work before checking settings"))
    with pytest.raises(pipeline.ConfigError, match=message) as err:
        pipeline.run(tiny_cfg(override), tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("experiment", [None, *sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))])
@pytest.mark.parametrize("tiny", [False, True])
def test_every_shipped_config_passes_the_checks(experiment, tiny, tmp_path):
    overrides = [f"experiment={experiment}"] if experiment else []
    cfg = compose_train([*overrides, *(["debug=tiny"] if tiny else [])], tmp_path)
    pipeline.check_settings(pipeline.finalize_config(cfg))


@pytest.mark.parametrize("pair", ["tokenizer=rvq generator=raster", "paradigm=next_scale", "paradigm=flowar",
                                  "paradigm=acdit", "tokenizer=fsq", "tokenizer=lfq",
                                  "tokenizer=vq generator=next_scale generator.residual=false"])
def test_every_pair_passes_the_checks(pair, tmp_path):
    pipeline.check_settings(pipeline.finalize_config(compose_train(pair.split(), tmp_path)))
