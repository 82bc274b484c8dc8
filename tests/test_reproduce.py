"""experiments/reproduce/: the published numbers its README renders are what the official presets record."""

from __future__ import annotations

import csv
import runpy

from omegaconf import OmegaConf

from tests.conftest import REPO


def test_the_published_table_is_what_the_presets_say():
    published = runpy.run_path(str(REPO / "experiments" / "reproduce" / "published.py"))
    with open(published["CSV"], newline="") as handle:
        committed = list(csv.DictReader(handle))
    assert committed == published["rows"](), "regenerate with: python experiments/reproduce/published.py"
    presets = sorted(p.stem for p in (REPO / "conf" / "official").glob("*.yaml")
                     if OmegaConf.load(p).official.files.generator is not None)  # tokenizer-only presets: no FID
    assert [row["preset"] for row in committed] == presets
    assert all(row["FID"] and row["source"] for row in committed)  # every preset carries its published FID
