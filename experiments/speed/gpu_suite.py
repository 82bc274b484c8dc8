"""The GPU speed measurements in one prepared run: the CUDA tests, arvision's bench presets and the official code,
model by model, under a time budget (--budget seconds in all).

    python experiments/speed/gpu_suite.py --out $OUT --official .official --budget 540      # on the GPU machine
    python experiments/speed/gpu_suite.py --out /tmp/suite --official ~/official --check    # CPU: the plumbing only

`--official` holds checkouts of the official code, never committed: VAR/, LlamaGen/, FlowAR/ (wangqiang9/FlowAR,
the code of OliverRensu/FlowAR) and ACDiT/ (thunlp/ACDiT); experiments/speed/README.md says how to get them there.
Each item runs in its own process (an OOM or a crash costs that item only) with a timeout cut to the time left;
ours and the official code alternate per model, so a run cut short still holds matched pairs. Written to --out as
the run goes, so whatever finished comes back even if the run is stopped (three files: the device tool returns few):
- results.jsonl: one line per item (name, command, exit code, seconds, the JSON it wrote);
- summary.md: the comparison against the official code and the H200 goals, rewritten after every item.
`--check` runs every item at CPU sizes (`bench_preset=cpu_tiny`, the harnesses' `--tiny`): it times nothing real.
`--cpu` times each model's pair (ours, the official code) at the published sizes on a CPU: fp32, batch 2, ACDiT at 2
DPM-Solver steps per block. It checks that both sides do the same work, not the GPU goals.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# The official code on one H200, eager (img/s), and arvision's goals as multiples of it (experiments/speed/README.md).
H200_FIGURES = {"var_d16": (210, 141), "gpt_b": (971, 28.8), "gpt_l": (379, 14.4), "flowar_s": (250, 69.8),
                 "acdit_b": (107, 3.3)}
GOALS = {"var_d16": (1.3, 1.5), "gpt_b": (1.2, 3.0), "gpt_l": (1.2, 3.0), "flowar_s": (1.3, 1.5),
         "acdit_b": (1.3, 1.5)}
# How each official sampling figure was taken: decode included for VAR only.
DECODE_INCLUDED = {"var_d16": True}
PAIRS = {"var_d16": "tokenizer=msvq generator=next_scale", "gpt_b": "tokenizer=vq generator=raster",
         "gpt_l": "tokenizer=vq generator=raster", "flowar_s": "tokenizer=vae generator=flowar",
         "acdit_b": "tokenizer=vae generator=acdit"}
PRESETS = {"var_d16": "var_d16", "gpt_b": "llamagen_gpt_b", "gpt_l": "llamagen_gpt_l", "flowar_s": "flowar_s",
           "acdit_b": "acdit_b"}
# Few repeats: a 64-image batch on a GPU varies little, and the budget is minutes. The first warm-up step compiles
# FlexAttention's kernels; sampling without CFG is left to the items that ask for it.
GPU_REPEATS = ["train.warmup=2", "train.repeats=8", "sample.warmup=1", "sample.repeats=1"]
OFFICIAL_REPEATS = ["--train-warmup", "2", "--train-repeats", "8", "--sample-warmup", "1", "--sample-repeats", "1"]
# --cpu: the published sizes at batch 2 in fp32 (no AMX on the CPUs this runs on: bf16 would time emulation). One
# batch of sampling, no warm-up batch: a batch is 256 (GPT), 10 (VAR) or 100 (ACDiT) steps, each warm after the first.
CPU_OURS = ["device=cpu", "precision=fp32", "sample.precision=fp32", "train.batch_size=2", "sample.batch_size=2",
            "train.warmup=1", "train.repeats=2", "sample.warmup=0", "sample.repeats=1"]
CPU_OFFICIAL = ["--device", "cpu", "--train-batch", "2", "--sample-batch", "2", "--train-warmup", "1",
                "--train-repeats", "2", "--sample-warmup", "0", "--sample-repeats", "1"]
CPU_ACDIT_STEPS = 2  # DPM-Solver steps per block on both sides (25 would take the CPU an hour)
CPU_CAP_S = 1200  # each item's limit with --cpu: a full-size model on two cores takes minutes


@dataclass
class Item:
    name: str        # model/variant, e.g. gpt_b/ours_fast
    model: str       # key of H200_FIGURES, or "tests"
    kind: str        # ours | official | tests
    args: list[str]
    cap_s: int       # the most it may take
    extra: dict = field(default_factory=dict)


def ours(model: str, variant: str, *overrides: str, cap_s: int = 120) -> Item:
    return Item(f"{model}/{variant}", model, "ours", [f"bench_preset={PRESETS[model]}", "sample.no_cfg=false",
                                                      *overrides], cap_s)


def official(model: str, script: str, *flags: str, cap_s: int = 150) -> Item:
    return Item(f"{model}/official", model, "official", [script, *flags], cap_s)


def plan() -> list[Item]:
    """The order is the priority: each model's pair at the official precision, the CUDA tests, then the fast paths
    and bf16."""
    return [
        ours("gpt_b", "ours"), official("gpt_b", "llamagen.py", "--preset", "gpt_b"),
        ours("var_d16", "ours"), official("var_d16", "var.py"),
        ours("flowar_s", "ours"), official("flowar_s", "flowar.py", "--skip-encode"),
        ours("acdit_b", "ours", cap_s=180), official("acdit_b", "acdit.py", cap_s=200),
        ours("gpt_l", "ours"), official("gpt_l", "llamagen.py", "--preset", "gpt_l"),
        Item("tests", "tests", "tests", ["-m", "gpu", "tests/test_gpu.py"], 180),
        # fast paths: compiled training step; the raster, next-scale and FlowAR-head CUDA-graph steps
        ours("gpt_b", "ours_fast", "compile=true", "generator.sample.decode=compiled", cap_s=200),
        ours("var_d16", "ours_fast", "compile=true", "generator.sample.decode=compiled", cap_s=300),
        ours("flowar_s", "ours_fast", "compile=true", "generator.sample.decode=compiled", cap_s=240),
        ours("gpt_l", "ours_fast", "compile=true", "generator.sample.decode=compiled", cap_s=200),
        ours("acdit_b", "ours_compiled", "compile=true", "skip_sampling=true", cap_s=200),
        # bf16 figures too where the official precision is another
        ours("flowar_s", "ours_bf16", "precision=bf16", "sample.precision=bf16"),
        ours("acdit_b", "ours_bf16", "sample.precision=bf16", cap_s=150),
    ]


def command(item: Item, args: argparse.Namespace, json_path: Path) -> list[str]:
    if item.kind == "tests":
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *item.args]
    if item.kind == "ours":
        overrides = list(item.args)
        if args.check:  # the same switches on CPU-sized models of the same paradigm
            overrides = [o for o in overrides if not o.startswith("bench_preset=")]
            overrides = [*PAIRS[item.model].split(), "bench_preset=cpu_tiny", *overrides]
        elif args.cpu:
            overrides += CPU_OURS + ([f"generator.sample.steps={CPU_ACDIT_STEPS}"] if item.model == "acdit_b" else [])
        else:
            overrides += GPU_REPEATS
        return [sys.executable, "-m", "arvision.cli.bench", *overrides, f"out={json_path}",
                f"hydra.run.dir={json_path.parent / 'hydra' / json_path.stem}"]
    script, *flags = item.args
    folder = {"var.py": "VAR", "llamagen.py": "LlamaGen", "flowar.py": "FlowAR", "acdit.py": "ACDiT"}[script]
    if args.check:
        flags += ["--tiny"]
    elif args.cpu:
        flags += CPU_OFFICIAL + (["--sample-steps", str(CPU_ACDIT_STEPS)] if item.model == "acdit_b" else [])
    else:
        flags += OFFICIAL_REPEATS
    return [sys.executable, str(HERE / "official" / script), "--repo", str(args.official / folder), *flags,
            "--out", str(json_path)]


def run_item(item: Item, args: argparse.Namespace, deadline: float, log) -> dict:
    left = deadline - time.monotonic()
    cap_s = CPU_CAP_S if args.cpu else item.cap_s
    record = {"item": item.name, "model": item.model, "kind": item.kind}
    if left < min(cap_s, 45):  # too little time left to finish it: skip rather than be cut
        return {**record, "skipped": f"{left:.0f} s left"}
    json_path = args.work / f"{item.name.replace('/', '__')}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(item, args, json_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.monotonic()
    print(f"\n=== {item.name}: {' '.join(cmd[1:])}", file=log, flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=min(cap_s, left))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    record.update(rc=rc, seconds=round(time.monotonic() - start, 1), command=cmd[1:])
    if json_path.exists() and rc == 0:
        record["result"] = json.loads(json_path.read_text())
    return record


def ratio(a: float | None, b: float | None, goal: float | None = None) -> str:
    """a/b, marked against the goal when one is given: ✓ met, ✗ not."""
    if not (a and b):
        return "–"
    return f"{a / b:.2f}×" + ("" if goal is None else (" ✓" if a / b >= goal else " ✗"))


def fmt(x: float | None) -> str:
    return (f"{x:.1f}" if x >= 1 else f"{x:.3g}") if x else "–"


def summarize(records: list[dict], mode: str = "gpu") -> str:
    """Per model: ours (the best variant at the official precision) against the official code measured in the same
    run, and against the official H200 figures (a GPU run only: mode "check" or "cpu" times other hardware)."""
    by = {}
    for r in records:
        if "result" in r:
            by.setdefault(r["model"], {})[r["item"].split("/", 1)[1]] = r["result"]
    device = next((r["result"].get("device") for r in records if "result" in r), "?")
    lines = [f"# GPU speed suite — {device}", "",
             *(["**Check run at CPU sizes: these numbers time nothing real.**", ""] if mode == "check" else []),
             *(["**CPU run at the published sizes (fp32, batch 2): ours against the official code on the same CPU. "
                "The official H200 figures and the goals are for an H200, so they are not marked here.**", ""]
               if mode == "cpu" else []),
             ]
    gpu = mode == "gpu"  # the H200 figures and goals belong to a GPU run only
    header = ["model", "ours train img/s", "official train", "×", *(["H200 figure", "×", "goal"] if gpu else []),
              "ours sample img/s", "official sample", "×", *(["H200 figure", "×", "goal"] if gpu else [])]
    lines += ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for model, (train_fig, sample_fig) in H200_FIGURES.items():
        runs = by.get(model, {})
        official = runs.get("official", {})
        same_precision = [v for k, v in runs.items() if k in ("ours", "ours_fast", "ours_compiled")]
        train = max((v["train"]["img_per_s"] for v in same_precision if "train" in v), default=None)
        key = "img_per_s_decode_included" if DECODE_INCLUDED.get(model) else "img_per_s_decode_excluded"
        sample = max((v["sample_cfg"][key] for v in same_precision if "sample_cfg" in v), default=None)
        # FlowAR's loop also updates an EMA and runs a grad scaler in fp32, which the bench does not time: its core
        # step (forward, backward, optimiser step) is the like-for-like figure
        off_train = official.get("train_core", official.get("train", {})).get("img_per_s")
        off_sample = official.get("sample", {}).get("img_per_s")
        goal_t, goal_s = GOALS[model] if gpu else (None, None)
        cells = [model, fmt(train), fmt(off_train), ratio(train, off_train, goal_t),
                 *([str(train_fig), ratio(train, train_fig, goal_t), f"{goal_t}×"] if gpu else []),
                 fmt(sample), fmt(off_sample), ratio(sample, off_sample, goal_s),
                 *([str(sample_fig), ratio(sample, sample_fig, goal_s), f"{goal_s}×"] if gpu else [])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Official train: its training loop's step (grad clipping, FlowAR's EMA and scaler included); "
              "`core` is forward, backward and the optimiser step alone (the summary's FlowAR figure), `encode` "
              "adds the tokenizer's encoder.", "",
              "| item | rc | s | train img/s | core / encode | precision | sample img/s cfg (excl. / incl. decode) "
              "| no cfg | MFU | peak CUDA MiB |", "|---|---|---:|---:|---|---|---|---:|---:|---:|"]
    for r in records:
        res = r.get("result", {})
        train, s, n = res.get("train", {}), res.get("sample_cfg", res.get("sample", {})), res.get("sample_no_cfg", {})
        sampled = (f"{fmt(s.get('img_per_s_decode_excluded', s.get('img_per_s')))} / "
                   f"{fmt(s.get('img_per_s_decode_included'))}") if s else "–"
        precision = "/".join(filter(None, [train.get("precision"), s.get("precision")]))
        mfu = f"{train['mfu']:.1%}" if train.get("mfu") else "–"
        peak = max([x.get("peak_memory_mib") or 0 for x in (train, s)] or [0])
        other = f"{fmt(res.get('train_core', {}).get('img_per_s'))} / " \
                f"{fmt(res.get('train_with_encode', {}).get('img_per_s'))}"
        lines.append(f"| {r['item']} | {r.get('rc', r.get('skipped'))} | {r.get('seconds', '–')} | "
                     f"{fmt(train.get('img_per_s'))} | {other} | {precision or '–'} | {sampled} | "
                     f"{fmt(n.get('img_per_s_decode_excluded'))} | {mfu} | {f'{peak:.0f}' if peak else '–'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="gets results.jsonl, summary.md and log.txt only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_suite"), help="each item's JSON and Hydra dir")
    parser.add_argument("--official", type=Path, required=True, help="folder of the official checkouts")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole suite")
    parser.add_argument("--check", action="store_true", help="CPU sizes: checks the suite, times nothing real")
    parser.add_argument("--cpu", action="store_true", help="the model pairs at full size on a CPU, fp32, batch 2")
    parser.add_argument("--only", default="", help="comma-separated item names or model names to run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    wanted = set(filter(None, args.only.split(",")))
    if args.check and args.cpu:
        parser.error("--check and --cpu exclude each other: --check shrinks the models, --cpu keeps the sizes")
    mode = "check" if args.check else "cpu" if args.cpu else "gpu"
    items = [i for i in plan() if (not wanted or i.name in wanted or i.model in wanted)
             and (mode != "cpu" or i.name.endswith(("/ours", "/official")))]
    records: list[dict] = []
    with open(args.out / "log.txt", "a") as log, open(args.out / "results.jsonl", "a") as jsonl:
        for item in items:
            record = run_item(item, args, deadline, log)
            records.append(record)
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            (args.out / "summary.md").write_text(summarize(records, mode))
            print(f"{item.name}: rc {record.get('rc', record.get('skipped'))}, {record.get('seconds', 0)} s",
                  flush=True)
    print(summarize(records, mode))


if __name__ == "__main__":
    main()
