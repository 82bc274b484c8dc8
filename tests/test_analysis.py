"""arvision.analysis (collect, tables, power laws, Pareto fronts), arvision-table and arvision-eval."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hypothesis import given, settings
from hypothesis import strategies as st

from arvision.analysis import (collect, fit_power_law, pareto_front, plot_pareto, plot_scaling, read_csv,
                               relative_time, render, scaling_fits, select_rows, sort_rows, table)
from arvision.cli import table as table_cli
from arvision.cli.common import config_dir
from arvision.metrics import INCEPTION_WEIGHTS_FILE, ClassifierExtractor, ClassifierNet, MissingWeights
from arvision.pipeline import run as train_run
from arvision.reevaluate import SFID_CHANNELS, EvalError, inception_hint, load_npz, reevaluate
from arvision.results import SCHEMA_VERSION
from tests.conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "runs"


# --------------------------------------------------------------------------------------------- collect
def test_a_run_files_itself_under_its_configured_family(tmp_path):
    # A new paradigm names its family in its generator config; no table in the library needs editing.
    source = next(p for p in FIXTURE.rglob("results.json") if json.loads(p.read_text())["generator"] == "raster")
    results = json.loads(source.read_text())
    results["config"]["generator"]["family"] = "Some-AR"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    frame = collect(tmp_path)
    assert list(frame["type"]) == ["Some-AR"] and list(frame["generator"]) == ["raster"]


def test_collect_reads_every_run_of_the_fixture_with_its_provenance():
    frame = collect(FIXTURE)
    assert len(frame) == len(list(FIXTURE.rglob("results.json")))
    paradigms = select_rows(frame, "tags=paradigms")
    assert set(paradigms["generator"]) >= {"raster", "next_scale", "acdit"}
    mapping = dict(zip(paradigms["generator"], paradigms["type"]))
    assert mapping["raster"] == "AR" and mapping["next_scale"] == "VAR" and mapping["acdit"] == "Diff-AR (block)"
    raster = paradigms[(paradigms.generator == "raster") & (paradigms.tokenizer == "vq")].iloc[0]
    assert raster["spec.grid"] == "8x8" and raster["gen.fid.extractor"] == "classifier"
    assert raster["gen.fid.num_samples"] == 40 and raster["gen.params"] > 0 and raster["cost.stage2_seconds"] > 0
    assert raster["steps"] == raster["gen.nfe_per_image"] == 64 and raster["tokens_per_image"] == 64
    assert raster["s_per_image"] == pytest.approx(1 / raster["gen.sample_img_per_s"])
    assert raster["train_compute"] == pytest.approx(6 * raster["gen.params"] * raster["cfg.max_steps"]
                                                    * raster["cfg.batch_size"] * 64)
    msvq = paradigms[paradigms.generator == "next_scale"].iloc[0]
    assert msvq["tokens_per_image"] == sum(int(n) ** 2 for n in msvq["spec.scales"].split(","))
    # arvision-eval entries: the latest one is flattened into eval.* columns.
    scaling = select_rows(frame, "tags=scaling")
    assert (scaling["num_evaluations"] == 1).all() and scaling["eval.test_loss"].notna().all()
    assert (scaling["test_loss"] == scaling["eval.test_loss"]).all()
    assert scaling["eval.git_sha"].notna().all() and set(scaling["eval.device"]) <= {"cpu", "cuda"}


def test_collect_rows_mode_gives_one_row_per_evaluation():
    rows = collect(FIXTURE / "flexvar_steps", evaluations="rows")
    results = json.loads((FIXTURE / "flexvar_steps" / "flexvar_vq" / "results.json").read_text())
    assert len(rows) == 1 + len(results["evaluations"])
    evaluated = rows[rows.source != "train"]
    schedules = [",".join(map(str, e["settings"]["sample"]["schedule"])) for e in results["evaluations"]]
    assert list(evaluated["eval.sample.schedule"]) == schedules
    assert list(evaluated["eval.sample.schedule.len"]) == [len(s.split(",")) for s in schedules]
    assert evaluated["eval.fid"].notna().all()


def _write(root: Path, name: str, **fields) -> None:
    base = {"tokenizer": "vq", "generator": "raster", "data": "shapes", "seed": 0, "tags": ["t"],
            "spec": {"kind": "discrete", "layout": "depth", "grid": [4, 4], "depth": 2},
            "metrics": {"generator": {}}, "costs": {}, "config": {}}
    base.update(fields)
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(base))


def test_collect_flattens_the_sampling_cost_split_and_uses_backbone_passes_as_steps(tmp_path):
    _write(tmp_path, "a", metrics={"generator": {
        "fid": {"value": 3.0, "extractor": "inception", "num_samples": 50000}, "nfe_per_image": 48,
        "sampling_cost": {"passes": 48, "backbone_passes": 16, "head_passes": 32, "rows_per_pass_factor": 2}}})
    _write(tmp_path, "b", generator="next_scale", metrics={"generator": {"nfe_per_image": 7}})
    frame = collect(tmp_path).set_index("generator")
    assert frame.loc["raster", "gen.head_passes"] == 32 and frame.loc["raster", "steps"] == 16
    assert frame.loc["next_scale", "steps"] == 7  # no split recorded: network evaluations
    assert frame.loc["raster", "tokens_per_image"] == 32  # 4·4 positions × depth 2
    assert frame.loc["raster", "gen.fid.extractor"] == "inception"
    with pytest.raises(FileNotFoundError):
        collect(tmp_path / "missing")


# --------------------------------------------------------------------------------------------- tables
def _frame() -> pd.DataFrame:
    return pd.DataFrame({
        "generator": ["raster", "next_scale", "acdit", "raster"], "type": ["AR", "VAR", "Diff-AR (block)", "AR"],
        "model": ["raster-d2 / vq", "next_scale-d2 / msvq", "acdit-d2 / vae", "raster-d4 / vq"],
        "tags": ["paradigms", "paradigms,extra", "paradigms", "scaling"], "cfg.depth": [2, 2, 2, 4],
        "gen.params": [1_200_000, 950_000, 2_500_000, 40_000], "gen.fid": [7.5, 5.25, np.nan, 9.0],
        "gen.is": [3.1, 3.4, 2.0, 1.5], "gen.precision": [0.8, 0.9, 0.7, 0.6], "gen.recall": [0.5, 0.6, 0.4, 0.3],
        "steps": [64, 7, 103, 64], "s_per_image": [0.02, 0.004, 0.05, 0.03],
    })


def test_row_filters_sort_and_relative_time():
    frame = _frame()
    assert list(select_rows(frame, "generator=raster,next_scale").model) == [
        "raster-d2 / vq", "next_scale-d2 / msvq", "raster-d4 / vq"]
    assert list(select_rows(frame, ["generator=raster", "depth=4"]).model) == ["raster-d4 / vq"]  # header name
    assert list(select_rows(frame, "tags=extra").generator) == ["next_scale"]  # a comma list contains it
    assert list(select_rows(frame, "generator!=raster").generator) == ["next_scale", "acdit"]
    with pytest.raises(ValueError):
        select_rows(frame, "generator")
    assert list(sort_rows(frame, "FID").model)[-1] == "acdit-d2 / vae"  # missing last
    assert list(sort_rows(frame, "-params")["gen.params"]) == sorted(frame["gen.params"], reverse=True)
    rel = relative_time(frame)
    assert rel.min() == 1.0 and rel[0] == pytest.approx(5.0)
    assert relative_time(frame, reference="AR")[0] == 1.0 and relative_time(frame, reference="AR")[1] == 0.2
    with pytest.raises(ValueError):
        relative_time(frame, reference="nope")


def test_var_layout_renders_to_markdown_latex_and_csv_that_parses_back():
    frame = _frame()
    md = table(frame, layout="var", rows="tags=paradigms", sort="FID")
    lines = md.splitlines()
    assert lines[0] == "| type | model | params | FID | IS | precision | recall | steps | relative time |"
    assert len(lines) == 2 + 3 and lines[2].startswith("| VAR | next_scale-d2 / msvq | 950K | 5.25 |")
    assert "| – |" in lines[-1]  # the missing FID, sorted last
    latex = table(frame, layout="var", fmt="latex")
    body = latex.split("\\midrule\n")[1].split("\\bottomrule")[0].strip().splitlines()
    assert len(body) == len(frame) and all(row.endswith(r"\\") for row in body)
    assert latex.count("&") == (len(frame) + 1) * 8 and r"Diff-AR (block)" in latex and "1.2M" in latex
    assert render(pd.DataFrame({"a_b": ["x%y"]}), columns=["a_b"], fmt="latex").count(r"x\%y") == 1
    csv = table(frame, layout="var", fmt="csv")  # raw values under the collected names, so it reads back
    back = pd.read_csv(io.StringIO(csv))
    assert list(back.columns) == ["type", "model", "gen.params", "gen.fid", "gen.is", "gen.precision", "gen.recall",
                                  "steps", "relative_time"]
    assert np.allclose(back["gen.params"], frame["gen.params"]) and np.allclose(back["gen.fid"], frame["gen.fid"],
                                                                                equal_nan=True)
    assert np.allclose(back["relative_time"], frame["s_per_image"] / 0.004)
    with pytest.raises(ValueError):
        render(frame, fmt="html")


def test_table_cli_layout_rows_sort_and_out(tmp_path, capsys):
    out = tmp_path / "t.md"
    table_cli.main([str(FIXTURE), "--layout", "var", "--rows", "tags=paradigms", "--rows", "tokenizer!=rvq",
                    "--sort=-steps", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    rows = printed.splitlines()[2:]
    steps = [float(r.split("|")[8]) for r in rows]
    assert steps == sorted(steps, reverse=True) and len(rows) == len(
        select_rows(collect(FIXTURE), ["tags=paradigms", "tokenizer!=rvq"]))
    table_cli.main([str(FIXTURE), "--format", "csv", "--columns", "model,tok.psnr", "--rows", "generator=raster"])
    back = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(back.columns) == ["model", "tok.psnr", "git_sha", "command", "eval.git_sha", "eval.command"]
    assert (back["tok.psnr"] > 0).all() and back["git_sha"].notna().all()
    with pytest.raises(SystemExit):
        table_cli.main([str(FIXTURE), "--sort", "no_such_column"])
    assert "no column" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an asked-for column that no run has is refused, not dropped
        table_cli.main([str(FIXTURE), "--columns", "model,FID,bogus"])
    assert "no column 'bogus'" in capsys.readouterr().err
    table_cli.main([str(FIXTURE), "--columns", "model,FID", "--format", "csv"])  # a readable header names its column
    assert list(pd.read_csv(io.StringIO(capsys.readouterr().out)).columns)[:2] == ["model", "gen.fid"]


def _sweep(root: Path) -> None:
    """Two jobs of `-m generator.model.depth=4,8` (and an Optuna-style `+` key), one run from a script."""
    same = ["experiment=paradigms", "data.train_size=256"]
    _write(root, "0", overrides=[*same, "generator.model.depth=4", "+generator.train.lr=0.001"],
           metrics={"generator": {"fid": {"value": 9.0}}})
    _write(root, "1", overrides=[*same, "generator.model.depth=8", "+generator.train.lr=0.001"],
           metrics={"generator": {"fid": {"value": 7.0}}})


def test_the_default_table_shows_each_swept_value_after_the_identifying_columns(tmp_path, capsys):
    _sweep(tmp_path)
    frame = collect(tmp_path)
    assert list(frame["generator.model.depth"]) == [4, 8]
    assert "experiment" not in frame and "data.train_size" not in frame and "generator.train.lr" not in frame
    lines = table(frame).splitlines()
    assert lines[0] == "| tokenizer | generator | data | generator.model.depth | FID |"
    assert lines[2:] == ["| vq | raster | shapes | 4 | 9 |", "| vq | raster | shapes | 8 | 7 |"]
    assert "generator.model.depth" not in table(frame, rows="generator.model.depth=8")  # one value shown: no column
    assert list(select_rows(frame, "generator.model.depth=8")["gen.fid"]) == [7.0]
    table_cli.main([str(tmp_path), "--columns", "generator,FID"])  # --columns still selects exactly
    assert capsys.readouterr().out.splitlines()[0] == "| generator | FID |"
    table_cli.main([str(tmp_path), "--sort=-generator.model.depth"])
    assert capsys.readouterr().out.splitlines()[2] == "| vq | raster | shapes | 8 | 7 |"


def test_swept_values_read_from_a_csv_or_missing_where_a_run_kept_the_default(tmp_path, capsys):
    _sweep(tmp_path / "runs")
    _write(tmp_path / "runs", "2", seed=1, overrides=["experiment=paradigms", "data.train_size=256", "seed=1"])
    table_cli.main([str(tmp_path / "runs"), "--layout", "all", "--format", "csv", "--out", str(tmp_path / "r.csv")])
    capsys.readouterr()
    runs, rows = collect(tmp_path / "runs"), read_csv(tmp_path / "r.csv")
    assert table(rows) == table(runs)
    lines = table(runs).splitlines()
    assert lines[0].startswith("| tokenizer | generator | data | generator.model.depth | generator.train.lr | seed |")
    assert lines[4].startswith("| vq | raster | shapes | – | – | 1 |")
    older = rows.drop(columns=["generator.model.depth", "generator.train.lr"])  # a CSV from before the columns
    assert table(older) == table(runs)


# --------------------------------------------------------------------------------------------- power laws
@settings(max_examples=40, deadline=None)
@given(a=st.floats(0.01, 100), b=st.floats(-2, 2).filter(lambda v: abs(v) > 1e-3),
       n=st.integers(2, 12), start=st.floats(1, 1e6))
def test_power_law_fit_recovers_exact_data(a, b, n, start):
    x = start * np.geomspace(1, 1000, n)
    law = fit_power_law(x, a * x**b)
    assert law.exponent == pytest.approx(b, abs=1e-8) and law.prefactor == pytest.approx(a, rel=1e-6)
    assert law.pearson_r == pytest.approx(math.copysign(1.0, b), abs=1e-9) and law.num_points == n
    assert law(x[-1]) == pytest.approx(a * x[-1] ** b, rel=1e-6)


def test_power_law_fit_on_noisy_data_and_bad_points():
    rng = np.random.default_rng(0)
    params = np.geomspace(1e5, 1e9, 60)
    loss = 12.0 * params ** -0.1 * np.exp(rng.normal(0, 0.02, params.shape))
    law = fit_power_law(params, loss)
    assert law.exponent == pytest.approx(-0.1, abs=0.01) and law.prefactor == pytest.approx(12.0, rel=0.25)
    assert -1 < law.pearson_r < -0.95
    with_bad = fit_power_law(np.r_[params, 0.0, 5.0, np.nan], np.r_[loss, 1.0, -1.0, 2.0])
    assert with_bad.dropped == 3 and with_bad.exponent == pytest.approx(law.exponent)
    with pytest.raises(ValueError):
        fit_power_law([1.0, 1.0], [2.0, 3.0])
    frame = pd.DataFrame({"generator": ["a"] * 5 + ["b"] * 5 + ["c"], "gen.params": list(params[:5]) * 2 + [1.0],
                          "test_loss": [3 * p ** -0.05 for p in params[:5]] + [2 * p ** -0.2 for p in params[:5]]
                          + [1.0]})
    fits = scaling_fits(frame).set_index("group")
    assert list(fits.index) == ["a", "b"]  # c has a single point
    assert fits.loc["a", "exponent"] == pytest.approx(-0.05) and fits.loc["b", "exponent"] == pytest.approx(-0.2)
    fig = plot_scaling(frame)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any("b = -0.050" in label for label in labels) and fig.axes[0].get_xscale() == "log"


# --------------------------------------------------------------------------------------------- Pareto
def _dominated(i: int, x: np.ndarray, y: np.ndarray) -> bool:
    return bool(np.any((x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.one_of(st.integers(0, 6), st.just(None))), min_size=0,
                max_size=25))
def test_pareto_front_is_exactly_the_non_dominated_points(points):
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([np.nan if p[1] is None else p[1] for p in points], dtype=float)
    front = pareto_front(x, y)
    valid = ~np.isnan(y)
    xv, yv = x[valid], y[valid]
    expected = np.zeros(len(x), dtype=bool)
    expected[np.flatnonzero(valid)] = [not _dominated(i, xv, yv) for i in range(len(xv))]
    assert front.tolist() == expected.tolist()
    if valid.any():  # the front is never empty, and each dominated point has a dominator on it
        assert front.any()
        for i in np.flatnonzero(valid & ~front):
            assert np.any(front & (x <= x[i]) & (y <= y[i]))


def test_pareto_plot_marks_the_front():
    frame = _frame()
    frame.loc[2, "gen.fid"] = 4.0  # acdit: slowest but best, so on the front with next_scale
    fig = plot_pareto(frame)
    ax = fig.axes[0]
    dominated, on_front = ax.collections[:2]
    assert sorted(map(tuple, on_front.get_offsets().tolist())) == [(0.004, 5.25), (0.05, 4.0)]
    assert sorted(map(tuple, dominated.get_offsets().tolist())) == [(0.02, 7.5), (0.03, 9.0)]
    assert ax.get_xlabel() == "sampling time (s / image)"


# --------------------------------------------------------------------------------------------- arvision-eval
def eval_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.conftest import compose_train
    root = tmp_path_factory.mktemp("evalrun")
    cfg = compose_train(["debug=tiny", "data=shapes", "logger=none"], root)
    train_run(cfg, root / "run")
    return root


def test_eval_appends_a_run_reevaluation_with_provenance(tiny_run):
    run, artifacts = tiny_run / "run", tiny_run / "artifacts"
    before = json.loads((run / "results.json").read_text())
    entry = reevaluate(eval_cfg(f"run={run}", f"paths.artifact_dir={artifacts}", "metrics.num_samples=12",
                                "metrics.num_reference=32", "metrics.batch_size=6", "+sample.cfg=1.0"))
    after = json.loads((run / "results.json").read_text())
    assert len(after["evaluations"]) == len(before.get("evaluations", [])) + 1
    saved = after["evaluations"][-1]
    assert saved["metrics"]["fid"]["num_samples"] == 12 and saved["metrics"]["fid"]["num_reference"] == 32
    assert saved["metrics"]["fid"]["extractor"] == "classifier" == saved["feature_extractor"]["extractor"]
    # the classifier features are the training run's own (same artifact), so numbers compare
    assert saved["feature_extractor"]["artifact"] == before["feature_extractor"]["artifact"]
    assert saved["device"]["type"] == "cpu" and saved["metrics"]["peak_memory_mb"] is None
    assert saved["git_sha"] and saved["date"] and saved["versions"]["torch"]
    assert saved["settings"]["sample"]["cfg"] == 1.0 and saved["metrics"]["sampling_cost"]["rows_per_pass_factor"] == 1
    assert saved["settings"]["sample"]["temperature"] == before["config"]["generator"]["sample"]["temperature"]
    assert saved["metrics"]["nfe_per_image"] == saved["metrics"]["sampling_cost"]["passes"] == 64
    assert after["schema_version"] == SCHEMA_VERSION
    assert saved["metrics"]["sfid"] == {"value": None, "unavailable": saved["metrics"]["sfid"]["unavailable"]}
    assert "Inception" in saved["metrics"]["sfid"]["unavailable"]
    assert saved["metrics"]["test_loss"]["value"] > 0 and saved["metrics"]["sample_img_per_s"]["value"] > 0
    assert entry["metrics"]["fid"]["value"] == saved["metrics"]["fid"]["value"]
    # Only the chosen metrics; collect picks the latest entry up.
    reevaluate(eval_cfg(f"run={run}", f"paths.artifact_dir={artifacts}", "select=[test_loss]",
                        "metrics.num_reference=16", "metrics.batch_size=8"))
    latest = json.loads((run / "results.json").read_text())["evaluations"][-1]
    assert set(latest["metrics"]) == {"test_loss"}
    row = collect(run).iloc[0]
    assert row["eval.test_loss"] == latest["metrics"]["test_loss"]["value"] and row["num_evaluations"] == 2
    with pytest.raises(EvalError, match="unknown metric"):
        reevaluate(eval_cfg(f"run={run}", "select=[fid,bogus]"))
    with pytest.raises(EvalError, match="run=<run dir>"):
        reevaluate(eval_cfg())


def test_eval_of_an_adm_npz_uses_its_labels_and_writes_beside_it(tiny_run, tmp_path):
    samples = np.load(tiny_run / "run" / "samples.npz")
    npz = tmp_path / "samples" / "s.npz"
    npz.parent.mkdir()
    np.savez(npz, samples["arr_0"][:16], samples["labels"][:16])  # ADM: arr_0 images, arr_1 labels
    overrides = [f"npz={npz}", "data=shapes", "data.shapes_train_size=256", "data.shapes_test_size=128",
                 f"paths.artifact_dir={tiny_run / 'artifacts'}", "metrics.num_reference=32", "metrics.batch_size=8",
                 "metrics.classifier.width=8", "metrics.num_samples=100"]
    entry = reevaluate(eval_cfg(*overrides))
    assert entry["source"] == "npz" and entry["metrics"]["fid"]["num_samples"] == 16
    assert "sample_img_per_s" not in entry["metrics"] and "test_loss" not in entry["metrics"]
    assert "fewer" in entry["settings"]["note"]
    on_disk = json.loads((npz.parent / "results.json").read_text())
    assert on_disk["samples_npz"] == str(npz) and len(on_disk["evaluations"]) == 1
    # the accuracy is read against the npz's own labels: labelled with the classifier's own predictions every
    # sample is right, labelled with the next class every one is wrong
    classifier = tiny_run / "artifacts" / "classifier" / entry["feature_extractor"]["artifact"] / "classifier.pt"
    blob = torch.load(classifier, weights_only=True)
    net = ClassifierNet(in_channels=blob["in_channels"], num_classes=blob["num_classes"], width=blob["width"])
    net.load_state_dict(blob["state_dict"])
    with torch.no_grad():
        predicted = ClassifierExtractor(net.eval()).logits(load_npz(npz, None)[0]).argmax(1).numpy()
    for labels, expected in ((predicted, 1.0), ((predicted + 1) % blob["num_classes"], 0.0)):
        np.savez(npz, samples["arr_0"][:16], labels)
        assert reevaluate(eval_cfg(*overrides, "select=[accuracy]"))["metrics"]["accuracy"]["value"] == expected
    np.savez(npz, arr_0=samples["arr_0"][:16])  # no labels: accuracy is unavailable, not invented
    entry = reevaluate(eval_cfg(*overrides, "select=[fid,accuracy]"))
    assert entry["metrics"]["accuracy"]["unavailable"] == "the samples carry no labels"
    with pytest.raises(EvalError, match="data=<group>"):
        reevaluate(eval_cfg(f"npz={npz}"))
    with pytest.raises(EvalError, match=r"sample.cfg: an .npz holds samples already drawn"):
        reevaluate(eval_cfg(*overrides, "+sample.cfg=2.0"))


def test_sfid_on_inception_spatial_features(tiny_run, tmp_path, monkeypatch):
    """With an Inception extractor (random weights here: the real file is never downloaded in tests), sFID is the
    Fréchet distance of the 17×17×7 spatial features: zero for the reference images themselves, positive else."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save({}, weights)

    def random_init(self, state):  # unit BatchNorm scales and He-initialised convs keep the activations alive
        for module in self.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.weight)
            elif isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)

    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", random_init)
    torch.manual_seed(0)
    from tests.conftest import compose_train
    from arvision import pipeline
    dm = pipeline.build_datamodule(compose_train(["debug=tiny", "data=shapes"], tiny_run))
    real, labels = dm.reference_images(4)
    npz = tmp_path / "s.npz"
    common = ["data=shapes", "data.shapes_train_size=256", "data.shapes_test_size=128", "metrics.extractor=inception",
              f"metrics.inception_weights={weights}", "metrics.num_reference=4", "metrics.batch_size=4",
              "select=[sfid]", f"paths.artifact_dir={tiny_run / 'artifacts'}"]
    values = []
    for images in (real, 255 - real):
        np.savez(npz, arr_0=images.permute(0, 2, 3, 1).numpy(), arr_1=labels.numpy())
        entry = reevaluate(eval_cfg(f"npz={npz}", *common))
        assert set(entry["metrics"]) == {"sfid"} and entry["metrics"]["sfid"]["num_reference"] == 4
        values.append(entry["metrics"]["sfid"]["value"])
        assert entry["metrics"]["sfid"]["extractor"] == f"inception:Mixed_6d.branch1x1[:{SFID_CHANNELS}]"
    same, inverted = values
    assert same == pytest.approx(0, abs=1e-6) and inverted > 1e-3


def test_missing_inception_weights_say_which_file_and_where(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    message = inception_hint(MissingWeights(f"Inception weights not found: put {INCEPTION_WEIGHTS_FILE} in …"))
    assert INCEPTION_WEIGHTS_FILE in message and URL_INCEPTION_V3 in message
    assert "metrics.inception_weights" in message


def test_unreadable_results_files_are_skipped_with_one_warning_each_and_a_count(tmp_path, capsys):
    import shutil
    for name in ("raster_vq", "acdit_vae"):
        shutil.copytree(FIXTURE / "paradigms" / name, tmp_path / name)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text('{"tokenizer": "vq", ')  # truncated
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "results.json").write_bytes(b'{"tokenizer": "\xe9"}')  # not UTF-8
    table_cli.main([str(tmp_path), "--columns", "model,FID"])
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 2 + 2  # header, rule and the two readable runs
    warnings = [line for line in err.splitlines() if line.startswith("arvision-table: warning: skipped ")]
    assert len(warnings) == 2 and any("broken/results.json is not valid JSON" in w for w in warnings)
    assert any("latin1/results.json is not UTF-8 text" in w for w in warnings)
    assert err.splitlines()[-1] == "arvision-table: skipped 2 unreadable results.json"
