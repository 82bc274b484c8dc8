"""`results.json`: the record of one run, and the only code that reads or writes it.

One file per run directory (or next to an evaluated .npz). Its fields are declared below as TypedDicts:

- `RunRecord`: who the run is (`tokenizer`, `generator`, `data`, `seed`, `tags`, `choices`, `spec`), how it was made
  (`config`, `overrides`, `versions`, `git_sha`, `started`, `finished`, `tokenizer_artifact`), what it measured
  (`metrics` with a `tokenizer` and a `generator` block, `feature_extractor`), what it cost (`costs`), and the later
  re-evaluations (`evaluations`, one `Evaluation` each, appended by arvision-eval), and for a run arvision-import
  made from official files, where they came from (`imported`);
- `Metric`: one number with its provenance: `value` plus the feature extractor, sample count, device and the
  settings that produced it (`metric(...)` builds one); `{"value": None, "unavailable": reason}` when a number
  cannot be computed for this input;
- `Costs`: training throughput and wall-clock per stage; `Evaluation`: one arvision-eval entry.

`schema_version` says which layout a file has. Files written before it existed have none and are read as version 0
(the same fields); a file from a newer arvision is refused with a message instead of being misread.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, NotRequired, TypedDict

RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1
PACKAGES = ("arvision", "torch", "torchvision", "lightning", "hydra-core", "torchmetrics", "torch-fidelity", "einops")


class ResultsError(ValueError):
    """A results.json that cannot be read or written as a run record; one line for the user."""


# --------------------------------------------------------------------------------------------- the schema
class Metric(TypedDict):
    """One number and its provenance; extra keys (batch_size, split, the sampling settings…) describe it further."""

    value: float | None
    extractor: NotRequired[str]
    num_samples: NotRequired[int]
    num_reference: NotRequired[int]
    device: NotRequired[str]
    unavailable: NotRequired[str]  # why `value` is None


class SamplingCostEntry(TypedDict):
    """`SamplingCost.to_dict()` of the generator: network passes of one sampling call."""

    passes: int
    backbone_passes: int
    head_passes: int
    rows_per_pass_factor: int


class RunMetrics(TypedDict, total=False):
    tokenizer: dict[str, Metric | int | float]               # psnr, ssim, rfid, usage…, params
    generator: dict[str, Metric | SamplingCostEntry | int | float]  # fid…, nfe_per_image, sampling_cost, params


class Costs(TypedDict, total=False):
    stage1_img_per_s: float
    stage1_seconds: float
    stage2_img_per_s: float
    stage2_seconds: float
    stage_seconds: dict[str, float]  # wall-clock of each stage of this run (a cache hit: the time to load it)
    total_seconds: float


class Evaluation(TypedDict, total=False):
    """One arvision-eval entry in `RunRecord.evaluations`."""

    date: str
    git_sha: str | None
    overrides: list[str] | None     # the command line's Hydra overrides (None: not run from the command line)
    versions: dict[str, str | None]
    source: str                     # run | npz
    npz: str | None
    ema: bool | None
    device: dict[str, Any]          # type, name, and count (cuda) or threads (cpu)
    feature_extractor: dict[str, Any]
    metrics: dict[str, Metric | SamplingCostEntry | float | None]
    settings: dict[str, Any]        # select, num_samples, num_reference, seed, metrics, sample (and a note)
    reference: dict[str, Any]       # the ADM reference batch (reference=): path, sha256, statistics, num_images …
    seconds: float


class Imported(TypedDict, total=False):
    """Where an imported run's weights came from (arvision-import)."""

    family: str                     # var | flexvar | llamagen | rq …
    preset: str                     # the conf/official/ preset that built the models
    files: dict[str, dict[str, str]]  # tokenizer / generator → path, sha256, layout (the key the state dict was under)
    published: dict[str, Any]       # the paper's / README's numbers for this model, with their source
    convention: str | None          # how the official sampling settings read in arvision's terms
    source: str | None              # where the official files are published


class RunRecord(TypedDict, total=False):
    schema_version: int
    run_dir: str
    started: str
    finished: str
    choices: dict[str, str]         # Hydra group choices (tokenizer=vq, …)
    overrides: list[str] | None     # the job's Hydra overrides, to rerun it (None: not run from the command line)
    tokenizer: str | None
    generator: str | None           # None: stage 1 only, or samples evaluated without a run
    data: str | None
    seed: int
    tags: list[str]
    config: dict[str, Any]          # the resolved config
    versions: dict[str, str | None]
    git_sha: str | None
    feature_extractor: dict[str, Any]
    metrics: RunMetrics
    costs: Costs
    tokenizer_artifact: str
    spec: dict[str, Any]            # TokenSpec.to_dict()
    samples_npz: str                # the .npz a record without a run describes
    evaluations: list[Evaluation]
    imported: Imported              # a run made by arvision-import from official files


# Metric blocks whose dict entries are structured, not `Metric`s.
STRUCTURED_METRICS = {"sampling_cost": SamplingCostEntry}


# --------------------------------------------------------------------------------------------- building entries
def metric(value: float | None, *, extractor: str | None = None, num_samples: int | None = None,
           **extra: Any) -> Metric:
    """One metric with its provenance (which features, how many samples)."""
    entry: dict[str, Any] = {"value": value}
    if extractor is not None:
        entry["extractor"] = extractor
    if num_samples is not None:
        entry["num_samples"] = num_samples
    entry.update(extra)
    return entry  # type: ignore[return-value]


def unavailable(reason: str) -> Metric:
    return {"value": None, "unavailable": reason}


def value(entry: Any) -> Any:
    """The number of a metric entry (or the entry itself when it is a plain number)."""
    if isinstance(entry, dict):
        return entry.get("value")
    return entry


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------- checking
def _unknown(entry: dict[str, Any], schema: type, where: str) -> None:
    extra = sorted(set(entry) - set(schema.__annotations__))
    if extra:
        raise ResultsError(f"{where}: unknown field(s) {', '.join(extra)}; declare them in arvision.results."
                           f"{schema.__name__}")


def check_record(record: RunRecord) -> None:
    """Raise `ResultsError` when `record` holds a field the schema does not declare, or a metric without a value:
    every writer goes through here, so the schema above stays the whole truth about the file."""
    if not isinstance(record, dict):
        raise ResultsError(f"a run record is a dict, got {type(record).__name__}")
    _unknown(record, RunRecord, RESULTS_FILE)
    _unknown(record.get("costs", {}), Costs, "costs")
    _unknown(record.get("metrics", {}), RunMetrics, "metrics")
    blocks = [(f"metrics.{k}", v) for k, v in record.get("metrics", {}).items()]
    for k, entry in enumerate(record.get("evaluations", [])):
        _unknown(entry, Evaluation, f"evaluations[{k}]")
        blocks.append((f"evaluations[{k}].metrics", entry.get("metrics", {})))
    for where, block in blocks:
        for name, entry in block.items():
            if name in STRUCTURED_METRICS and isinstance(entry, dict):
                _unknown(entry, STRUCTURED_METRICS[name], f"{where}.{name}")
            elif isinstance(entry, dict) and "value" not in entry:
                raise ResultsError(f"{where}.{name}: a metric entry needs a value (use metric(...) or unavailable())")


def _from_version_0(record: dict[str, Any]) -> dict[str, Any]:
    """Files from before `schema_version`: the same fields, but their data config may still hold `batch_size`,
    which chose only how images were served and which the datamodule no longer takes (training batches are each
    stage's `train.batch_size`)."""
    record = {**record, "schema_version": 1}
    data = (record.get("config") or {}).get("data")
    if isinstance(data, dict) and "batch_size" in data:
        record["config"] = {**record["config"], "data": {k: v for k, v in data.items() if k != "batch_size"}}
    return record


UPGRADES = {0: _from_version_0}  # version → the function that turns it into the next one


def upgrade(record: dict[str, Any], *, source: str = RESULTS_FILE) -> RunRecord:
    """`record` in the current layout: older versions are upgraded, a newer one is refused."""
    if not isinstance(record, dict):
        raise ResultsError(f"{source}: expected a JSON object, got {type(record).__name__}")
    version = record.get("schema_version", 0)
    if not isinstance(version, int) or version < 0:
        raise ResultsError(f"{source}: schema_version must be a non-negative integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ResultsError(f"{source} has results schema_version {version}, newer than this arvision reads "
                           f"({SCHEMA_VERSION}); update arvision to read it")
    while version < SCHEMA_VERSION:
        record = UPGRADES[version](record)
        version = record["schema_version"]
    return record  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- files
def results_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / RESULTS_FILE


def read_results(directory: str | os.PathLike) -> RunRecord:
    """The run record in `directory`, upgraded to the current schema."""
    path = results_path(directory)
    if not path.exists():
        raise FileNotFoundError(f"no {RESULTS_FILE} in {directory}: is it a finished arvision run directory?")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); rerun what wrote it") from None
    except UnicodeDecodeError:
        raise ResultsError(f"{path} is not UTF-8 text; rerun what wrote it") from None
    return upgrade(record, source=str(path))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
    os.replace(tmp, path)


def write_results(directory: str | os.PathLike, record: RunRecord) -> Path:
    """Check `record` against the schema, stamp the current version and write it atomically; returns the path."""
    record = {**record, "schema_version": SCHEMA_VERSION}  # type: ignore[assignment]
    check_record(record)
    path = results_path(directory)
    write_json_atomic(path, record)  # type: ignore[arg-type]
    return path


def append_evaluation(directory: str | os.PathLike, entry: Evaluation, *, new: RunRecord) -> Path:
    """Append `entry` to the record in `directory` (read again now, so an evaluation that finished meanwhile is
    kept), or to `new` when there is none yet."""
    record = read_results(directory) if results_path(directory).exists() else new
    record.setdefault("evaluations", []).append(entry)
    return write_results(directory, record)


# --------------------------------------------------------------------------------------------- summaries
def run_summary(record: RunRecord) -> dict[str, object]:
    """The one-row summary arvision-train prints."""
    tok = record["metrics"].get("tokenizer", {})
    gen = record["metrics"].get("generator", {})
    row = {"tokenizer": record["tokenizer"], "generator": record["generator"] or "-",
           "PSNR": value(tok.get("psnr")), "usage": value(tok.get("usage")), "rFID": value(tok.get("rfid"))}
    if gen:
        row.update({"FID": value(gen["fid"]), "IS": value(gen["is"]), "prec": value(gen["precision"]),
                    "recall": value(gen["recall"]), "accuracy": value(gen.get("accuracy")),
                    "sample img/s": value(gen["sample_img_per_s"]), "NFE": gen["nfe_per_image"]})
    row["train img/s (s1/s2)"] = "{:.0f}/{:.0f}".format(record["costs"].get("stage1_img_per_s", 0),
                                                          record["costs"].get("stage2_img_per_s", 0))
    return row


__all__ = ["RESULTS_FILE", "SCHEMA_VERSION", "Costs", "Evaluation", "Metric", "ResultsError", "RunMetrics",
           "RunRecord", "SamplingCostEntry", "append_evaluation", "check_record", "git_sha", "metric", "now",
           "read_results", "results_path", "run_summary", "unavailable", "upgrade", "value", "versions",
           "write_json_atomic", "write_results"]
