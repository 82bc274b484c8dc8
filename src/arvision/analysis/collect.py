"""`collect(dir)`: every results.json under a directory → one tidy DataFrame (one row per run).

Column families (all flat, dotted names):

- identity: `run`, `tokenizer`, `generator`, `data`, `seed`, `tags` (comma-joined), `choice.<group>`, `git_sha`
  and `command` (the `arvision-train` call that reruns it, from the overrides the run recorded);
- `spec.<field>` of the tokenizer's TokenSpec (`spec.grid` as "8x8", `spec.scales` as "1,2,4,8");
- `tok.<metric>` and `gen.<metric>` from the training run's own evaluation (`metrics.tokenizer|generator`): the
  value, plus `.extractor` and `.num_samples` where the metric records them; a nested `sampling_cost` dict is
  flattened to `gen.passes`, `gen.backbone_passes`, `gen.head_passes`, …;
- `eval.<metric>` from the latest `arvision-eval` entry in `evaluations` (with `eval.date`, `eval.device` (cpu/cuda),
  `eval.device_name`, `eval.num_samples`, `eval.extractor`, `eval.git_sha`, `eval.command`), and `num_evaluations`;
- `cost.<name>` from `costs`, `cfg.<key>` for a few config values the analyses need (depth, width, steps, batch);
- swept values: one column per override whose value differs between the collected runs (a sweep's
  `generator.model.depth=4,8`, an Optuna trial's parameters), named by its dotted key and holding each run's
  value (missing where a run kept the default); read from the overrides each run recorded (`command`);
- derived: `type` (the paradigm's family: the run's `generator.family`, else `PARADIGM_TYPES`), `model` (e.g. "raster-d4 / vq"),
  `steps` (generation steps: backbone passes when split, else network evaluations), `s_per_image`
  (1 / sampling img/s), `tokens_per_image` and `train_compute` (≈ 6·N·D FLOPs, Kaplan et al. 2020, with N the
  generator's parameters and D the tokens it was trained on).

Files are read through `arvision.results` (older layouts upgraded, newer ones refused).

`collect(dir, evaluations="rows")` instead gives one row per (run, evaluation) plus the training-time row, with
a `source` column ("train" or the evaluation's date), for comparing sample counts or extractors.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml

from arvision.results import RESULTS_FILE, ResultsError, read_results

# Paradigm family of each generator, as the VAR paper's Table 1 names them (documented in notebooks/README.md). A run
# records its own (`generator.family` in its config); this table files runs written before that key existed.
PARADIGM_TYPES = {
    "raster": "AR",
    "next_scale": "VAR",
    "flowar": "Flow-AR",
    "acdit": "Diff-AR (block)",
    "mar": "Masked-AR (diffusion head)",
    "rar": "AR (random→raster)",
}

# Config values worth a column (present for every generator that has them).
CONFIG_COLUMNS = {
    "cfg.family": ("generator", "family"),
    "cfg.depth": ("generator", "model", "depth"),
    "cfg.dim": ("generator", "model", "dim"),
    "cfg.heads": ("generator", "model", "heads"),
    "cfg.block_size": ("generator", "model", "block_size"),
    "cfg.max_steps": ("generator", "train", "max_steps"),
    "cfg.batch_size": ("generator", "train", "batch_size"),
    "cfg.sample_cfg": ("generator", "sample", "cfg"),
    "cfg.sample_steps": ("generator", "sample", "steps"),
    "cfg.sample_schedule": ("generator", "sample", "schedule"),
    "cfg.num_samples": ("metrics", "num_samples"),
    "cfg.extractor": ("metrics", "extractor"),
}


def _flatten_metrics(prefix: str, metrics: dict[str, Any]) -> dict[str, object]:
    row: dict[str, object] = {}
    for name, entry in metrics.items():
        if name == "sampling_cost" and isinstance(entry, dict):
            row.update({f"{prefix}.{k}": v for k, v in entry.items()})
        elif isinstance(entry, dict):
            row[f"{prefix}.{name}"] = entry.get("value")
            for key in ("extractor", "num_samples", "device", "unavailable"):
                if key in entry:
                    row[f"{prefix}.{name}.{key}"] = entry[key]
        elif isinstance(entry, (list, tuple)):
            row[f"{prefix}.{name}"] = ",".join(str(v) for v in entry)
        else:
            row[f"{prefix}.{name}"] = entry
    return row


def _flatten_spec(spec: dict[str, Any]) -> dict[str, object]:
    row: dict[str, object] = {}
    for key, value in spec.items():
        if key == "grid" and isinstance(value, (list, tuple)):
            row["spec.grid"] = "x".join(str(v) for v in value)
        elif isinstance(value, (list, tuple)):
            row[f"spec.{key}"] = ",".join(str(v) for v in value)
        else:
            row[f"spec.{key}"] = value
    return row


def _dig(tree: dict[str, Any], path: tuple[str, ...]) -> object:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def tokens_per_image(spec: dict[str, Any]) -> int | None:
    """Tokens one image costs the generator: Σ n² over scales, h·w·D for depth stacks, h·w otherwise."""
    if not spec:
        return None
    if spec.get("layout") == "scales" and spec.get("scales"):
        return int(sum(n * n for n in spec["scales"]))
    h, w = spec.get("grid", (0, 0))
    depth = (spec.get("depth") or 1) if spec.get("layout") == "depth" else 1
    return int(h * w * depth)


def rerun_command(program: str, overrides: list[str] | None, run_dir: Path | None = None) -> str | None:
    """The command line that reruns a job: `program` and the overrides it recorded (results.json `overrides`, or
    Hydra's `<run>/.hydra/overrides.yaml` for older runs); None when neither was recorded."""
    if overrides is None and run_dir is not None and (run_dir / ".hydra" / "overrides.yaml").is_file():
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    if overrides is None:
        return None
    return " ".join([program, *(shlex.quote(str(item)) for item in overrides)])


def _override_value(text: str) -> object:
    """An override's value as the number, boolean or null it spells, else its text."""
    if text.lower() in ("null", "none"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def command_overrides(command: object) -> dict[str, str | None]:
    """The `key=value` overrides of a command written by `rerun_command`, as written (`+`/`++` dropped; a deleted
    `~key` is None); empty when no command was recorded."""
    if not isinstance(command, str) or not command:
        return {}
    overrides: dict[str, str | None] = {}
    for item in shlex.split(command)[1:]:
        if item.startswith("~"):
            overrides[item[1:].partition("=")[0]] = None
            continue
        key, sep, text = item.lstrip("+").partition("=")
        if sep:
            overrides[key] = text
    return overrides


def swept_values(commands: Iterable[object]) -> dict[str, list[object]]:
    """The overrides whose value differs between the commands (one per run): dotted key → each run's value (None
    where a run did not set it), in the order the keys first appear."""
    runs = [command_overrides(command) for command in commands]
    keys = dict.fromkeys(key for overrides in runs for key in overrides)
    missing = object()
    swept = [key for key in keys if len({overrides.get(key, missing) for overrides in runs}) > 1]
    return {key: [None if overrides.get(key) is None else _override_value(overrides[key]) for overrides in runs]
            for key in swept}


def _evaluation_row(entry: dict[str, Any]) -> dict[str, object]:
    metrics = entry.get("metrics", {})
    row = _flatten_metrics("eval", metrics)
    settings = entry.get("settings", {})
    device = entry.get("device") if isinstance(entry.get("device"), dict) else {"type": entry.get("device")}
    row.update({"eval.date": entry.get("date"), "eval.git_sha": entry.get("git_sha"),
                "eval.command": rerun_command("arvision-eval", entry.get("overrides")),
                "eval.device": device.get("type"), "eval.device_name": device.get("name"),
                "eval.num_samples": settings.get("num_samples", _dig(settings, ("metrics", "num_samples"))),
                "eval.extractor": (entry.get("feature_extractor") or {}).get("extractor"),
                "eval.source": entry.get("source")})
    # The sampling settings an evaluation overrode (e.g. FlexVAR steps), for ablations over them.
    for key, value in (settings.get("sample") or {}).items():
        if isinstance(value, (list, tuple)):  # e.g. a FlexVAR schedule: "1,2,4,8" and its number of steps
            row[f"eval.sample.{key}"] = ",".join(str(v) for v in value)
            row[f"eval.sample.{key}.len"] = len(value)
        elif not isinstance(value, dict):
            row[f"eval.sample.{key}"] = value
    return row


def _run_row(path: Path, results: dict[str, Any], root: Path) -> dict[str, object]:
    # `run`: the run folder relative to the collected root, so a committed CSV names runs, not one machine's paths
    row: dict[str, object] = {"run": path.parent.relative_to(root).as_posix(), "tokenizer": results.get("tokenizer"),
                              "generator": results.get("generator"), "data": results.get("data"),
                              "seed": results.get("seed"), "tags": ",".join(results.get("tags") or []),
                              "git_sha": results.get("git_sha"), "finished": results.get("finished"),
                              "command": rerun_command("arvision-train", results.get("overrides"), path.parent)}
    row.update({f"choice.{k}": v for k, v in results.get("choices", {}).items()})
    row.update(_flatten_spec(results.get("spec") or {}))
    row.update(_flatten_metrics("tok", results.get("metrics", {}).get("tokenizer", {})))
    row.update(_flatten_metrics("gen", results.get("metrics", {}).get("generator", {})))
    for key, cost in results.get("costs", {}).items():  # stage_seconds → cost.stage.<stage>
        if isinstance(cost, dict):
            row.update({f"cost.stage.{k}": v for k, v in cost.items()})
        else:
            row[f"cost.{key}"] = cost
    config = results.get("config") or {}
    row.update({name: _dig(config, path) for name, path in CONFIG_COLUMNS.items()})
    row["tokens_per_image"] = tokens_per_image(results.get("spec") or {})
    row["num_evaluations"] = len(results.get("evaluations", []))
    return row


def _derive(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns computed from the collected ones (see the module docstring)."""
    if frame.empty:
        return frame
    gen = frame.get("generator", pd.Series([None] * len(frame), index=frame.index))
    family = frame.get("cfg.family", pd.Series([None] * len(frame), index=frame.index))
    frame["type"] = [f if isinstance(f, str) else PARADIGM_TYPES.get(g, g) if isinstance(g, str) else None
                     for g, f in zip(gen, family)]
    depth = frame.get("cfg.depth", pd.Series([None] * len(frame), index=frame.index))
    frame["model"] = [
        None if not isinstance(g, str) else f"{g}-d{int(d)} / {t}" if pd.notna(d) else f"{g} / {t}"
        for g, d, t in zip(gen, depth, frame["tokenizer"])
    ]
    if "gen.backbone_passes" in frame:
        frame["steps"] = frame["gen.backbone_passes"].where(frame["gen.backbone_passes"].notna(),
                                                            frame.get("gen.nfe_per_image"))
    elif "gen.nfe_per_image" in frame:
        frame["steps"] = frame["gen.nfe_per_image"]
    for prefix in ("gen", "eval"):
        speed = f"{prefix}.sample_img_per_s"
        if speed in frame:
            frame[f"{prefix}.s_per_image"] = 1.0 / pd.to_numeric(frame[speed], errors="coerce")
    if "gen.s_per_image" in frame:
        frame["s_per_image"] = frame["gen.s_per_image"]
    if {"gen.params", "cfg.max_steps", "cfg.batch_size", "tokens_per_image"} <= set(frame.columns):
        tokens = (pd.to_numeric(frame["cfg.max_steps"], errors="coerce")
                  * pd.to_numeric(frame["cfg.batch_size"], errors="coerce")
                  * pd.to_numeric(frame["tokens_per_image"], errors="coerce"))
        frame["train_tokens"] = tokens
        frame["train_compute"] = 6.0 * pd.to_numeric(frame["gen.params"], errors="coerce") * tokens
    # The held-out loss, from training or (newer) from arvision-eval.
    loss = pd.Series(np.nan, index=frame.index)
    for column in ("gen.test_loss", "eval.test_loss"):
        if column in frame:
            values = pd.to_numeric(frame[column], errors="coerce")
            loss = values.where(values.notna(), loss)
    frame["test_loss"] = loss
    return frame


def runs_dir(default: str | Path | None = None) -> Path:
    """The runs directory a notebook reads: `$ARVISION_RUNS`, else `default`, else the checked-in fixture
    (tests/fixtures/runs of the repository)."""
    if os.environ.get("ARVISION_RUNS"):
        return Path(os.environ["ARVISION_RUNS"]).expanduser()
    if default is not None:
        return Path(default).expanduser()
    return Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "runs"


def collect(root: str | Path, *, evaluations: Literal["latest", "rows"] = "latest") -> pd.DataFrame:
    """Every results.json under `root` (recursively) as one DataFrame; see the module docstring."""
    if evaluations not in ("latest", "rows"):
        raise ValueError(f"evaluations must be 'latest' or 'rows', got {evaluations!r}")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"no runs directory {root}")
    rows, skipped = [], []
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        try:
            results = read_results(path.parent)
        except ResultsError as err:  # one unreadable file does not hide the others: skipped and reported
            skipped.append(str(err))
            continue
        base = _run_row(path, results, Path(root))
        entries = results.get("evaluations", [])
        if evaluations == "latest":
            if entries:
                base.update(_evaluation_row(entries[-1]))
            rows.append(base)
        else:
            rows.append({**base, "source": "train"})
            rows.extend({**base, **_evaluation_row(e), "source": e.get("date")} for e in entries)
    frame = _derive(pd.DataFrame(rows))
    if "command" in frame:
        for key, values in swept_values(frame["command"]).items():
            if key not in frame:  # a swept identity (seed, generator, …) already has its column
                frame[key] = pd.Series(values, index=frame.index)
    frame.attrs["skipped"] = skipped  # why each unreadable results.json was left out
    return frame


def skipped_report(frame: pd.DataFrame, *, prog: str) -> str:
    """The unreadable results.json `collect` left out: one warning line each, then their count."""
    skipped = frame.attrs.get("skipped", [])
    return "\n".join([f"{prog}: warning: skipped {reason}" for reason in skipped]
                     + [f"{prog}: skipped {len(skipped)} unreadable results.json"])


__all__ = ["CONFIG_COLUMNS", "PARADIGM_TYPES", "collect", "command_overrides", "rerun_command", "runs_dir",
           "skipped_report", "swept_values", "tokens_per_image"]
