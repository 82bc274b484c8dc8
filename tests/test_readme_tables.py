"""README tables are generated from committed CSVs (arvision.analysis.readme), and a CSV written by arvision-table
reads back as the runs it came from, with each row's commit and the command that reruns it."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pandas as pd
import pytest

from arvision.analysis import LAYOUTS, collect, describe, read_csv, study_csv, study_rows, table
from arvision.analysis.readme import blocks, default_files, update
from arvision.cli import table as table_cli
from tests.conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "runs"


def test_every_readme_table_block_is_what_its_csv_renders(monkeypatch):
    monkeypatch.chdir(REPO)  # marker commands name paths from the repository root
    files = default_files(REPO)
    assert REPO / "README.md" in files and len(files) > 5
    stale = {str(path.relative_to(REPO)): update(path, check=True) for path in files}
    assert not any(stale.values()), (f"{stale}: regenerate with python -m arvision.analysis.readme")
    commands = [b.command for path in files for b in blocks(path.read_text())]
    assert any(study_csv(study).is_file() and str(study_csv(study).relative_to(REPO)) in command
               for command in commands for study in ("flexvar_steps", "demo", "paradigms")), \
        "no README table is rendered from a committed study CSV"


def test_a_study_csv_holds_the_commit_and_the_rerun_command_of_every_row():
    committed = sorted(REPO.glob("experiments/*/results.csv"))
    assert committed, "no study has committed its results.csv"
    for path in committed:
        frame = read_csv(path)
        assert len(frame) > 0 and {"git_sha", "command"} <= set(frame.columns), path
        assert frame["git_sha"].str.fullmatch("[0-9a-f]{40}").all(), path
        assert frame["command"].str.startswith("arvision-train ").all(), path


def test_readme_blocks_are_regenerated_in_place_and_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table_cli.main([str(FIXTURE), "--layout", "all", "--format", "csv", "--out", "runs.csv"])
    command = "arvision-table runs.csv --layout var --rows tags=paradigms --sort type"
    readme = tmp_path / "README.md"
    readme.write_text(f"# Study\n\ntext\n<!-- table: {command} -->\n| pasted | table |\n|---|---|\n| 1 | 2 |\n"
                      "<!-- /table -->\n\nmore text\n<!-- table: arvision-table missing.csv --layout var -->\n"
                      "<!-- /table -->\nend\n")
    assert update(readme, check=True) == [command, "arvision-table missing.csv --layout var"]
    assert "| pasted | table |" in readme.read_text()  # --check changes nothing
    update(readme)
    text = readme.read_text()
    expected = table(collect(FIXTURE), layout="var", rows="tags=paradigms", sort="type")
    assert f"<!-- table: {command} -->\n{expected}\n<!-- /table -->" in text
    assert "*No table yet: `missing.csv` is not in the repository.*" in text
    assert text.startswith("# Study\n\ntext\n") and text.endswith("\nend\n") and "more text" in text
    assert update(readme, check=True) == []
    readme.write_text(text.replace("| VAR |", "| VAR (edited) |", 1))
    assert update(readme, check=True) == [command]
    done = subprocess.run([sys.executable, "-m", "arvision.analysis.readme", "--check", str(readme)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "differs from" in done.stdout and "regenerate with" in done.stderr
    readme.write_text("<!-- table: arvision-table runs.csv --format csv -->\n<!-- /table -->\n")
    with pytest.raises(ValueError, match="Markdown"):
        update(readme)


@pytest.mark.parametrize("layout", sorted(set(LAYOUTS) - {"all"}))
def test_a_csv_written_by_arvision_table_renders_the_same_tables_as_the_runs(tmp_path, layout, capsys):
    out = tmp_path / "runs.csv"
    table_cli.main([str(FIXTURE), "--layout", "all", "--format", "csv", "--out", str(out)])
    capsys.readouterr()
    runs, rows = collect(FIXTURE), read_csv(out)
    assert list(rows.columns) == list(runs.columns) and len(rows) == len(runs)
    for fmt in ("markdown", "latex"):
        assert table(rows, layout=layout, sort="model", fmt=fmt) == table(runs, layout=layout, sort="model",
                                                                          fmt=fmt)
    table_cli.main([str(out), "--layout", layout, "--sort", "model"])
    assert capsys.readouterr().out.rstrip("\n") == table(runs, layout=layout, sort="model")


def test_csv_output_carries_git_sha_and_the_rerun_command(tmp_path, capsys):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    results = json.loads((FIXTURE / "paradigms" / "raster_vq" / "results.json").read_text())
    results["overrides"] = ["experiment=paradigms", "paradigm=raster", "generator.sample.schedule=[1,2]"]
    results["git_sha"] = "0123456789abcdef0123456789abcdef01234567"
    (run / "results.json").write_text(json.dumps(results))
    legacy = tmp_path / "runs" / "b"  # an older run: Hydra's own record of the overrides
    (legacy / ".hydra").mkdir(parents=True)
    results.pop("overrides")
    (legacy / "results.json").write_text(json.dumps(results))
    (legacy / ".hydra" / "overrides.yaml").write_text("- tokenizer=vq\n- budget=0.4\n")
    table_cli.main([str(tmp_path / "runs"), "--layout", "var", "--format", "csv"])
    back = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(back.columns) == [*LAYOUTS["var"], "git_sha", "command"]
    assert list(back["command"]) == [
        "arvision-train experiment=paradigms paradigm=raster 'generator.sample.schedule=[1,2]'",
        "arvision-train tokenizer=vq budget=0.4"]
    assert set(back["git_sha"]) == {results["git_sha"]}
    md = table(collect(tmp_path / "runs"), layout=["model", "git_sha"])
    assert md.splitlines()[0] == "| model | commit |" and "| 0123456 |" in md


def test_study_rows_reads_the_committed_csv_or_a_runs_folder(monkeypatch):
    monkeypatch.delenv("ARVISION_RUNS", raising=False)
    missing = study_rows("no_such_study")
    assert missing.empty and "experiments/no_such_study/results.csv, not committed" in describe(missing)
    scaling = study_rows("scaling", FIXTURE, rows="tags=scaling")
    assert len(scaling) == len(list((FIXTURE / "scaling").rglob("results.json")))
    assert describe(scaling).startswith(f"{len(scaling)} rows from {FIXTURE} (tags=scaling)")
    monkeypatch.setenv("ARVISION_RUNS", str(FIXTURE))
    assert len(study_rows("scaling", rows="tags=scaling")) == len(scaling)
    monkeypatch.delenv("ARVISION_RUNS")
    for path in REPO.glob("experiments/*/results.csv"):
        rows = study_rows(path.parent.name)
        assert len(rows) == len(read_csv(path)) and f"rows from experiments/{path.parent.name}/results.csv" \
            in describe(rows)


def test_a_csv_block_renders_the_cells_of_its_csv_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "parity.csv").write_text("family,output,max abs diff\nvar,logits,7.2e-07\nllamagen,a|b,0\n")
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- table: csv parity.csv -->\nold\n<!-- /table -->\n<!-- table: csv none.csv -->\n"
                      "<!-- /table -->\n")
    assert update(readme) == ["csv parity.csv", "csv none.csv"]
    assert ("<!-- table: csv parity.csv -->\n| family | output | max abs diff |\n|---|---|---|\n"
            "| var | logits | 7.2e-07 |\n| llamagen | a\\|b | 0 |\n<!-- /table -->") in readme.read_text()
    assert "*No table yet: `none.csv` is not in the repository.*" in readme.read_text()
    assert update(readme, check=True) == []
