"""The bad-input table: every input below, given to the real command line, ends with exactly one line on stderr
(`arvision: error: …` naming the key or file and what to do), a non-zero exit, and nothing lost or half-written:
every file that existed before is unchanged, and the only new files are Hydra's own records of the command (each
command keeps its own, `.hydra/<time>/`, so a refused rerun into a run directory leaves the record of the command
that made the run as it was).

The table in README.md is rendered from tests/fixtures/bad_inputs.csv, which this module writes
(`python -m tests.test_bad_input`) and checks (a case added here without regenerating the CSV fails).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "tests" / "fixtures" / "bad_inputs.csv"
FASHION = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Case:
    id: str
    input: str                      # what is wrong, as a user would say it
    command: str                    # the command line; {run} = a finished tiny run, {root} = the work folder
    says: str                       # text the one line must contain
    prepare: Callable[[Path], None] = field(default=lambda root: None, compare=False)
    patch: Callable[[pytest.MonkeyPatch], None] = field(default=lambda monkeypatch: None, compare=False)

    @property
    def program(self) -> str:
        return self.command.split()[0]


# --------------------------------------------------------------------------------------------- preparations
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write(relative: str, content: bytes | str) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return prepare


def _edit_results(change: Callable[[dict], dict | bytes]) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        path = root / "run" / "results.json"
        new = change(json.loads(path.read_text()))
        path.write_bytes(new if isinstance(new, bytes) else json.dumps(new).encode())
    return prepare


def _edit_generator(change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        path = root / "run" / "generator.pt"
        torch.save(change(torch.load(path, weights_only=True)), path)
    return prepare


def _code_pickle(root: Path) -> None:
    """A generator.pt whose unpickling would call os.system (a reduce of a global)."""
    class RunsCode:
        def __reduce__(self):
            import os
            return os.system, (f"touch {root / 'ran'}",)
    torch.save({"generator": RunsCode()}, root / "run" / "generator.pt")


def _official_code_pickle(root: Path) -> None:
    class RunsCode:
        def __reduce__(self):
            import os
            return os.system, (f"touch {root / 'ran'}",)
    torch.save({"model": {"weight": torch.zeros(1)}, "args": RunsCode()}, root / "official.pth")


def _fashion_copy(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        target = root / "fashion"
        target.mkdir()
        for path in FASHION.glob("*-ubyte*"):
            shutil.copy(path, target / path.name)
        damage(target)
    return prepare


def _truncated_gz(folder: Path) -> None:
    path = next(folder.glob("t10k-images-idx3-ubyte.gz"))
    _truncate(path)


def _bad_images(root: Path) -> None:
    for name in ("a", "b"):
        (root / "images" / name).mkdir(parents=True)
        (root / "images" / name / "broken.png").write_bytes(b"not a png")


def _unfinished_run(root: Path) -> None:
    """A run directory whose training was interrupted, trained with the default lr."""
    run = root / "unfinished"
    shutil.copytree(root / "run", run)
    (run / "results.json").unlink()


def _read_only(root: Path) -> None:
    (root / "readonly" / "run").mkdir(parents=True)
    (root / "readonly" / "run").chmod(0o555)


def _as_non_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """root writes anywhere: give it the refusal the file system gives everyone else."""
    if os.geteuid() == 0:
        from arvision import pipeline

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(pipeline.tempfile, "NamedTemporaryFile", refuse)


# --------------------------------------------------------------------------------------------- the table
TRAIN = "arvision-train debug=tiny data=shapes evaluate=false"
CASES = [
    # settings: refused before any work
    Case("type", "a model setting of the wrong type", f"{TRAIN} generator.model.depth=abc",
         "generator.model.depth='abc': RasterGenerator takes depth: int"),
    Case("unknown-key", "a model setting that does not exist", f"{TRAIN} +generator.model.depthh=3",
         "generator.model.depthh is not a setting of RasterGenerator; it takes: "),
    Case("batch-zero", "a batch size of 0", f"{TRAIN} generator.train.batch_size=0",
         "generator.train.batch_size=0: must be an integer ≥ 1"),
    Case("batch-negative", "a negative batch size", f"{TRAIN} tokenizer.train.batch_size=-4",
         "tokenizer.train.batch_size=-4: must be an integer ≥ 1"),
    Case("lr", "a learning rate of 0", f"{TRAIN} generator.train.lr=0", "generator.train.lr=0: must be a number > 0"),
    Case("ema", "an EMA decay above 1", f"{TRAIN} generator.train.ema_decay=1.5",
         "generator.train.ema_decay=1.5: must be a number ≥ 0 and < 1"),
    Case("samples-zero", "an evaluation with 0 samples", "arvision-train debug=tiny data=shapes metrics.num_samples=0",
         "metrics.num_samples=0: must be an integer ≥ 1"),
    Case("checkpoint-every", "checkpoints every 0 steps", f"{TRAIN} checkpoint_every=0",
         "checkpoint_every=0: must be an integer ≥ 1"),
    Case("budget", "a negative step budget", f"{TRAIN} budget=-1",
         "budget × trainer.steps_scale must be positive, got -1.0"),
    Case("target", "a config that names code to run", f"{TRAIN} generator.model._target_=os.system",
         "refusing to instantiate 'os.system'"),
    Case("pair", "a generator that cannot use the tokenizer", f"{TRAIN} tokenizer=vae",
         "raster needs a discrete grid or residual tokenizer (tokenizer=vq or tokenizer=rvq); got tokenizer=vae"),
    Case("gpu", "a GPU trainer on a machine without one", f"{TRAIN} trainer=gpu",
         "trainer=gpu needs a CUDA GPU and none is visible; use trainer=cpu"),
    # data
    Case("no-dataset", "a data.root without the dataset", "arvision-train debug=tiny data.root={root}/empty",
         "no Fashion-MNIST", _write("empty/.keep", "")),
    Case("truncated-gz", "a truncated Fashion-MNIST .gz file", "arvision-train debug=tiny data.root={root}/fashion",
         "t10k-images-idx3-ubyte.gz", _fashion_copy(_truncated_gz)),
    Case("imagefolder-root", "an image-folder dataset without a root", f"{TRAIN} data=imagefolder data.num_classes=2",
         "data.root is not set; give data.root=<value> on the command line"),
    Case("unreadable-images", "an image folder whose files are all unreadable",
         "arvision-train debug=tiny data=imagefolder data.root={root}/images data.num_classes=2 data.num_workers=0",
         "none of the 2 image files under", _bad_images),
    # run directories
    Case("finished-run", "a rerun into a finished run's directory", f"{TRAIN} hydra.run.dir={{run}}",
         "holds a finished run (results.json) and is never trained again"),
    Case("changed-settings", "a rerun of an unfinished run with other settings",
         f"{TRAIN} generator.train.lr=0.5 hydra.run.dir={{root}}/unfinished",
         "generator.train.lr", _unfinished_run),
    Case("read-only", "a run directory that cannot be written (a full or read-only disk)",
         f"{TRAIN} hydra.run.dir={{root}}/readonly/run", "cannot write to the run directory", _read_only, _as_non_root),
    # files read back
    Case("truncated-weights", "a truncated generator.pt", "arvision-sample run={run} num_samples=4",
         "generator.pt cannot be read", lambda root: _truncate(root / "run" / "generator.pt")),
    Case("code-in-weights", "a generator.pt that would run code when unpickled",
         "arvision-sample run={run} num_samples=4", "generator.pt cannot be read", _code_pickle),
    Case("code-in-config", "a generator.pt whose stored config names code to run",
         "arvision-sample run={run} num_samples=4", "refusing to instantiate 'os.system'",
         _edit_generator(lambda blob: {**blob, "config": {**blob["config"], "depth_mode": [
             {"_target_": "os.system", "_args_": ["touch ran"]}]}})),
    Case("wrong-shape", "a generator.pt whose weights do not fit its config", "arvision-sample run={run} num_samples=4",
         "its weights do not fit the RasterGenerator its config builds",
         _edit_generator(lambda blob: {**blob, "ema": {k: v[..., :1] if v.dim() else v
                                                       for k, v in blob["ema"].items()}})),
    Case("corrupt-results", "a results.json that is not JSON", "arvision-eval run={run} select=[fid]",
         "results.json is not valid JSON", _edit_results(lambda r: b'{"run_dir": ')),
    Case("non-utf8-results", "a results.json that is not UTF-8", "arvision-eval run={run} select=[fid]",
         "results.json is not UTF-8 text", _edit_results(lambda r: b'{"a": "\xff\xfe"}')),
    Case("newer-results", "a results.json from a newer arvision", "arvision-eval run={run} select=[fid]",
         "newer than this arvision reads", _edit_results(lambda r: {**r, "schema_version": 99})),
    Case("not-a-run", "arvision-sample on a folder that is not a run", "arvision-sample run={root} num_samples=4",
         "no results.json in"),
    # sampling and evaluation settings
    Case("sample-zero", "arvision-sample with 0 samples", "arvision-sample run={run} num_samples=0",
         "num_samples=0: must be an integer ≥ 1"),
    Case("sample-negative", "arvision-sample with -5 samples", "arvision-sample run={run} num_samples=-5",
         "num_samples=-5: must be an integer ≥ 1"),
    Case("sample-gpu", "sampling on a GPU on a machine without one", "arvision-sample run={run} device=cuda",
         "device=cuda needs a CUDA GPU and none is visible; use device=cpu or device=auto"),
    Case("sample-key", "a sampling setting the generator does not have", "arvision-sample run={run} +sample.cfgg=2",
         "sample.cfgg is not a sampling setting of generator=raster; its settings: "),
    Case("eval-metric", "an unknown metric", "arvision-eval run={run} select=[fid,bogus]",
         "select: unknown metric(s) bogus; choose from "),
    Case("eval-nothing", "arvision-eval with neither a run nor samples", "arvision-eval",
         "give run=<run dir> (re-sample a finished run) or npz=<samples.npz>"),
    Case("inception-missing", "Inception features without the Inception weights",
         "arvision-eval run={run} select=[fid] metrics.extractor=inception metrics.inception_weights={root}/none.pth",
         "Inception weights not found"),
    Case("table-column", "a table column that does not exist", "arvision-table {root} --columns model,FID,bogus",
         "no column 'FID'; columns include: run, "),
    # official checkpoints
    Case("official-code", "an official-looking checkpoint that would run code",
         "arvision-import official=llamagen_c2i_b_256 tokenizer_file={root}/official.pth "
         "generator_file={root}/official.pth "
         "hydra.run.dir={root}/imported", "holds the object", _official_code_pickle),
    Case("official-missing", "an official checkpoint path that does not exist",
         "arvision-import official=llamagen_c2i_b_256 tokenizer_file={root}/nope.pth generator_file={root}/nope.pth "
         "hydra.run.dir={root}/imported", "no file"),
]


def shown(command: str) -> str:
    """The command as a user types it: the settings that only make the test fast (tiny sizes) left out."""
    for fast in ("debug=tiny ", "data=shapes ", "evaluate=false "):
        command = command.replace(fast, "")
    return "`" + command.replace("{run}", "<run>").replace("{root}", "<dir>").strip() + "`"


def rows() -> list[dict[str, str]]:
    return [{"input": c.input, "command": shown(c.command), "the one line says": f"`{c.says.strip()}`"}
            for c in CASES]


def write_table(path: Path = TABLE) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows()[0]))
        writer.writeheader()
        writer.writerows(rows())


# --------------------------------------------------------------------------------------------- running
def main_of(program: str):
    from arvision.cli import evaluate, exports, imports, sample, table, train
    return {"arvision-train": train.main, "arvision-eval": evaluate.main, "arvision-sample": sample.main,
            "arvision-table": table.main, "arvision-import": imports.main, "arvision-export": exports.main}[program]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` → its sha256; Hydra's log of each command (`<task>.log`, appended to) and the
    artifact cache's empty lock files aside."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix not in (".log", ".lock")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A folder holding a finished tiny run (`run/`) and its artifacts."""
    from arvision import pipeline
    from tests.conftest import compose_train

    root = tmp_path_factory.mktemp("finished")
    pipeline.run(compose_train(["debug=tiny", "data=shapes", "evaluate=false"], root), root / "run")
    return root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_in_one_line_and_loses_nothing(case, finished, tmp_path, monkeypatch, capsys):
    from hydra.core.global_hydra import GlobalHydra

    if case.id == "truncated-gz" and not FASHION.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    root = tmp_path / "work"
    shutil.copytree(finished, root)
    for meta in root.rglob("results.json"):  # the copy's results.json point at the copy's artifacts
        meta.write_text(meta.read_text().replace(str(finished), str(root)))
    case.prepare(root)
    case.patch(monkeypatch)
    monkeypatch.chdir(root)
    monkeypatch.setenv("ARVISION_ROOT", str(root))
    monkeypatch.setenv("ARVISION_ARTIFACTS", str(root / "artifacts"))
    argv = case.command.format(run=root / "run", root=root).split()
    if argv[0] != "arvision-table" and not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={tmp_path / 'command'}")
    before = snapshot(root)
    capsys.readouterr()
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main_of(case.program)(*([argv[1:]] if case.program == "arvision-table" else []))
    err = capsys.readouterr().err
    assert exit_.value.code not in (0, None), err
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and re.match(r"arvision(-table)?: error: ", errors[0]), err
    assert case.says in errors[0], errors[0]
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that existed was changed or removed"
    left = sorted(name for name in set(after) - set(before) if ".hydra" not in Path(name).parts)
    assert left == [], f"the command left files behind: {left}"  # Hydra's record of the command aside
    assert not (root / "ran").exists()
    if (root / "readonly").exists():
        (root / "readonly" / "run").chmod(0o755)


def test_the_readme_table_lists_every_case():
    with open(TABLE, newline="") as handle:
        assert list(csv.DictReader(handle)) == rows(), "regenerate with: python -m tests.test_bad_input"
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert "<!-- table: csv tests/fixtures/bad_inputs.csv -->" in (REPO / "README.md").read_text()


if __name__ == "__main__":
    write_table()
    print(f"wrote {TABLE} ({len(CASES)} cases)")
