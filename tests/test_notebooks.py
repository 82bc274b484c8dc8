"""The notebooks run headless through nbmake, on the committed study CSVs (their default) and on a runs folder (the
checked-in fixture runs), and produce their tables and plots; each .ipynb is the jupytext pairing of its .py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arvision.analysis import read_csv, study_csv
from tests.conftest import REPO

NOTEBOOKS = REPO / "notebooks"
FIXTURE = REPO / "tests" / "fixtures" / "runs"
jupytext = pytest.importorskip("jupytext")
pytest.importorskip("nbmake")


@pytest.mark.parametrize("name", ["paradigms", "ablations"])
def test_ipynb_is_the_pairing_of_the_py_script(name):
    script = jupytext.read(NOTEBOOKS / f"{name}.py")
    notebook = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    sources = [(c.cell_type, c.source) for c in script.cells]
    assert sources == [(c.cell_type, c.source) for c in notebook.cells], \
        f"re-sync with: jupytext --sync notebooks/{name}.py"
    assert any("parameters" in c.metadata.get("tags", []) for c in notebook.cells)
    # No analysis logic in the notebook: code cells only import, call arvision.analysis and display.
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    assert "def " not in code and "lambda" not in code and ".groupby(" not in code


def _outputs(notebook: Path) -> tuple[list[str], int]:
    cells = json.loads(notebook.read_text())["cells"]
    texts, images = [], 0
    for cell in cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            images += "image/png" in data
            texts.append("".join(data.get("text/markdown", [])) + "".join(data.get("text/plain", []))
                         + "".join(out.get("text", [])))
    return texts, images


def _execute(tmp_path: Path, runs: Path | None) -> None:
    """Run both notebooks with nbmake in tmp_path, in place; `runs` None: their defaults (the committed CSVs)."""
    for name in ("paradigms", "ablations"):
        shutil.copy(NOTEBOOKS / f"{name}.ipynb", tmp_path)
    env = {"OMP_NUM_THREADS": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    if runs is not None:
        env["ARVISION_RUNS"] = str(runs)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "--nbmake", "--overwrite", "--nbmake-timeout=120", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout


def test_notebooks_execute_on_a_runs_folder_and_produce_tables_and_plots(tmp_path):
    _execute(tmp_path, FIXTURE)
    texts, images = _outputs(tmp_path / "paradigms.ipynb")
    assert any(f"rows from {FIXTURE} (tags=paradigms)" in t for t in texts)
    table = next(t for t in texts if "| type | model | params | FID |" in t)
    body = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert {line.split("|")[1].strip() for line in body} >= {"AR", "VAR", "Diff-AR (block)"}
    assert images >= 1

    texts, images = _outputs(tmp_path / "ablations.ipynb")
    joined = "\n".join(texts)
    assert "| group | exponent |" in joined and "| model | block size | blocks | FID |" in joined
    assert "| model | schedule | steps | trained steps | FID |" in joined
    assert images >= 3  # scaling laws, block size, steps


def test_notebooks_render_the_committed_study_csvs_by_default(tmp_path):
    studies = {"paradigms": ["demo"], "ablations": ["scaling", "acdit_block_size", "flexvar_steps"]}
    assert any(study_csv(s).is_file() for names in studies.values() for s in names), "no study CSV is committed"
    _execute(tmp_path, None)
    for notebook, names in studies.items():
        texts, _ = _outputs(tmp_path / f"{notebook}.ipynb")
        joined = "\n".join(texts)
        for study in names:
            path = study_csv(study)
            if path.is_file():
                assert f"{len(read_csv(path))} rows from experiments/{study}/results.csv" in joined, study
            else:
                assert f"experiments/{study}/results.csv, not committed" in joined, study
    steps = study_csv("flexvar_steps")
    if steps.is_file():  # every evaluated schedule is a row of the notebook's steps table
        texts, _ = _outputs(tmp_path / "ablations.ipynb")
        table = next(t for t in texts if "| model | schedule | steps | trained steps | FID |" in t)
        schedules = read_csv(steps)["eval.sample.schedule"].dropna()
        assert len(schedules) > 1 and all(f"| {s} |" in table for s in schedules)
