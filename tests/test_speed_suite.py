"""experiments/speed/gpu_suite.py: the order of the GPU run, the commands of its three modes, and the summary's
arithmetic (ratios, goals, which official figure is the like-for-like one)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "experiments" / "speed" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # its dataclass looks its module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_suite"]


def args(check=False, cpu=False) -> argparse.Namespace:
    return argparse.Namespace(check=check, cpu=cpu, official=Path("/official"))


def record(model, variant, result):
    return {"item": f"{model}/{variant}", "model": model, "kind": "official" if variant == "official" else "ours",
            "rc": 0, "seconds": 1.0, "result": result}


def ours_result(train, excluded, included):
    return {"device": "NVIDIA H200", "train": {"img_per_s": train, "precision": "bf16"},
            "sample_cfg": {"img_per_s_decode_excluded": excluded, "img_per_s_decode_included": included}}


def table_row(summary: str, model: str) -> list[str]:
    line = next(line for line in summary.splitlines() if line.startswith(f"| {model} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_plan_runs_each_models_pair_first_ours_then_official(suite):
    items = suite.plan()
    pairs = items[:10]
    assert [i.kind for i in pairs] == ["ours", "official"] * 5
    assert [i.model for i in pairs[::2]] == [i.model for i in pairs[1::2]]
    assert set(i.model for i in pairs) == set(suite.H200_FIGURES)
    assert items[10].kind == "tests"


def test_commands_of_the_three_modes(suite, tmp_path):
    item = next(i for i in suite.plan() if i.name == "acdit_b/ours")
    official = next(i for i in suite.plan() if i.name == "acdit_b/official")
    gpu = suite.command(item, args(), tmp_path / "x.json")
    assert "bench_preset=acdit_b" in gpu and "train.repeats=8" in gpu and "device=cpu" not in gpu
    check = suite.command(item, args(check=True), tmp_path / "x.json")
    assert "bench_preset=cpu_tiny" in check and "bench_preset=acdit_b" not in check
    assert "--tiny" in suite.command(official, args(check=True), tmp_path / "y.json")
    # --cpu: the published size on both sides, the same batch and the same DPM-Solver steps per block
    cpu_ours = suite.command(item, args(cpu=True), tmp_path / "x.json")
    cpu_official = suite.command(official, args(cpu=True), tmp_path / "y.json")
    assert "bench_preset=acdit_b" in cpu_ours and "precision=fp32" in cpu_ours
    steps = suite.CPU_ACDIT_STEPS
    assert f"generator.sample.steps={steps}" in cpu_ours
    assert cpu_official[cpu_official.index("--sample-steps") + 1] == str(steps)
    assert "train.batch_size=2" in cpu_ours and cpu_official[cpu_official.index("--train-batch") + 1] == "2"
    assert "--tiny" not in cpu_official and "--device" in cpu_official


def test_summary_ratios_and_goals(suite):
    records = [
        # raster GPT-B, goal 1.2× training and 3× sampling (decode excluded): 1.25× ✓, 2.5× ✗
        record("gpt_b", "ours", ours_result(125.0, 25.0, 20.0)),
        record("gpt_b", "official", {"train": {"img_per_s": 100.0}, "sample": {"img_per_s": 10.0}}),
        # VAR's figure includes the decode; the fast variant is the better of ours
        record("var_d16", "ours", ours_result(100.0, 300.0, 100.0)),
        record("var_d16", "ours_fast", ours_result(150.0, 400.0, 160.0)),
        record("var_d16", "official", {"train": {"img_per_s": 100.0}, "sample": {"img_per_s": 100.0}}),
        # FlowAR: the official core step (no EMA, no scaler) is the like-for-like training figure
        record("flowar_s", "ours", ours_result(130.0, 10.0, 9.0)),
        record("flowar_s", "official", {"train": {"img_per_s": 50.0}, "train_core": {"img_per_s": 100.0},
                                        "sample": {"img_per_s": 10.0}}),
    ]
    summary = suite.summarize(records, "gpu")
    gpt = table_row(summary, "gpt_b")
    assert gpt[3] == "1.25× ✓" and gpt[9] == "2.50× ✗"
    assert gpt[4] == "971" and gpt[5] == f"{125 / 971:.2f}× ✗"
    var = table_row(summary, "var_d16")
    assert var[1] == "150.0" and var[3] == "1.50× ✓" and var[7] == "160.0" and var[9] == "1.60× ✓"
    flowar = table_row(summary, "flowar_s")
    assert flowar[2] == "100.0" and flowar[3] == "1.30× ✓"
    assert table_row(summary, "acdit_b")[1:] == ["–", "–", "–", "107", "–", "1.3×", "–", "–", "–", "3.3", "–",
                                                 "1.5×"]


def test_cpu_summary_leaves_out_the_gpu_figures_and_goals(suite):
    records = [record("gpt_b", "ours", ours_result(0.5, 0.1, 0.09)),
               record("gpt_b", "official", {"train": {"img_per_s": 0.4}, "sample": {"img_per_s": 0.05}})]
    summary = suite.summarize(records, "cpu")
    header = next(line for line in summary.splitlines() if line.startswith("| model |"))
    assert "H200 figure" not in header and "goal" not in header and "✓" not in summary and "✗" not in summary
    assert table_row(summary, "gpt_b") == ["gpt_b", "0.5", "0.4", "1.25×", "0.1", "0.05", "2.00×"]
