"""The results.json schema: round trip, version checks, older files, and the checks every writer goes through."""

from __future__ import annotations

import json

import pytest

from arvision.analysis import collect
from arvision.results import (SCHEMA_VERSION, ResultsError, RunRecord, append_evaluation, check_record, metric,
                              read_results, unavailable, write_results)
from arvision.utils.instantiate import instantiate
from tests.conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "runs"


def record() -> RunRecord:
    return RunRecord(
        run_dir="/runs/a", started="2026-01-01T00:00:00+00:00", finished="2026-01-01T00:01:00+00:00",
        choices={"tokenizer": "vq", "generator": "raster"}, overrides=["debug=tiny"], tokenizer="vq",
        generator="raster", data="shapes", seed=0, tags=["t"], config={"seed": 0}, versions={"torch": "2.14"},
        git_sha=None, feature_extractor={"extractor": "classifier"}, spec={"kind": "discrete", "grid": [8, 8]},
        metrics={"tokenizer": {"psnr": metric(20.5, num_samples=64, split="test"), "params": 10},
                 "generator": {"fid": metric(3.5, extractor="classifier", num_samples=40), "nfe_per_image": 64,
                               "sampling_cost": {"passes": 64, "backbone_passes": 64, "head_passes": 0,
                                                 "rows_per_pass_factor": 2}}},
        costs={"stage1_seconds": 1.0, "stage_seconds": {"setup": 0.1}, "total_seconds": 2.0})


def test_a_record_round_trips_with_its_schema_version(tmp_path):
    path = write_results(tmp_path, record())
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert read_results(tmp_path) == {**record(), "schema_version": SCHEMA_VERSION}


def test_writers_cannot_add_undeclared_fields_or_metrics_without_a_value(tmp_path):
    with pytest.raises(ResultsError, match=r"unknown field\(s\) colour; declare them in arvision.results.RunRecord"):
        write_results(tmp_path, {**record(), "colour": "red"})
    bad = record()
    bad["costs"]["stage3_seconds"] = 1.0
    with pytest.raises(ResultsError, match=r"costs: unknown field\(s\) stage3_seconds"):
        check_record(bad)
    bad = record()
    bad["metrics"]["generator"]["fid"] = {"num_samples": 40}
    with pytest.raises(ResultsError, match=r"metrics.generator.fid: a metric entry needs a value"):
        check_record(bad)
    bad = record()
    bad["evaluations"] = [{"date": "d", "metrics": {"sfid": unavailable("no Inception")}, "when": "now"}]
    with pytest.raises(ResultsError, match=r"evaluations\[0\]: unknown field\(s\) when"):
        check_record(bad)
    assert not (tmp_path / "results.json").exists()  # nothing was written


def test_a_newer_schema_version_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({**record(), "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ResultsError, match=rf"schema_version {SCHEMA_VERSION + 1}, newer than this arvision reads "
                                           rf"\({SCHEMA_VERSION}\); update arvision"):
        read_results(tmp_path / "run")
    frame = collect(tmp_path)  # tables never misread a newer file: it is left out, and says why
    assert frame.empty and "newer than this arvision reads" in frame.attrs["skipped"][0]
    (tmp_path / "run" / "results.json").write_text(json.dumps({**record(), "schema_version": "1"}))
    with pytest.raises(ResultsError, match="schema_version must be a non-negative integer"):
        read_results(tmp_path / "run")
    (tmp_path / "run" / "results.json").write_text("{")
    with pytest.raises(ResultsError, match="is not valid JSON"):
        read_results(tmp_path / "run")


@pytest.mark.parametrize("path", sorted(FIXTURE.rglob("results.json")), ids=lambda p: p.parent.name)
def test_files_written_before_schema_version_are_read_and_appended_to(path, tmp_path):
    """A fixture run as an older file (no `schema_version`; the committed ones are such files): it reads as the
    current version, unchanged otherwise, and every field it holds is one the schema declares, so arvision-eval
    can append to it."""
    raw = json.loads(path.read_text())
    raw.pop("schema_version", None)
    (tmp_path / "results.json").write_text(json.dumps(raw))
    upgraded = read_results(tmp_path)
    data = {k: v for k, v in raw["config"]["data"].items() if k != "batch_size"}  # a key the datamodule dropped
    assert upgraded == {**raw, "config": {**raw["config"], "data": data}, "schema_version": SCHEMA_VERSION}
    instantiate(upgraded["config"]["data"])  # an old run's data config still builds its datamodule
    check_record(upgraded)
    append_evaluation(tmp_path, {"date": "2026-01-02", "metrics": {"fid": metric(1.0)}}, new=RunRecord())
    again = read_results(tmp_path)
    assert again["evaluations"][-1]["metrics"]["fid"]["value"] == 1.0
    assert len(again["evaluations"]) == len(raw.get("evaluations", [])) + 1
    assert json.loads((tmp_path / "results.json").read_text())["schema_version"] == SCHEMA_VERSION


def test_append_evaluation_starts_a_record_or_appends_to_the_one_on_disk(tmp_path):
    entry = {"date": "2026-01-02", "source": "npz", "metrics": {"fid": metric(2.0)}}
    append_evaluation(tmp_path, entry, new=RunRecord(samples_npz="s.npz", tokenizer=None, generator=None, metrics={}))
    write_back = read_results(tmp_path)
    assert write_back["samples_npz"] == "s.npz" and len(write_back["evaluations"]) == 1
    # a second evaluation appends to what is on disk now, not to the `new` record it was given
    append_evaluation(tmp_path, {**entry, "date": "2026-01-03"}, new=RunRecord(samples_npz="other.npz"))
    on_disk = read_results(tmp_path)
    assert on_disk["samples_npz"] == "s.npz" and [e["date"] for e in on_disk["evaluations"]] == [
        "2026-01-02", "2026-01-03"]
