"""arvision-bench: runs on the CPU at CI sizes and reports consistent numbers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from arvision import bench
from arvision.bench import resolve_precision, run
from arvision.cli.common import config_dir
from arvision.generators import RasterGenerator
from arvision.tokenizers.base import TokenSpec
from arvision.utils.device import DeviceError, resolve_device
from tests.conftest import cli_env


def compose_bench(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=["bench_preset=cpu_tiny", *overrides])
    with open_dict(cfg):
        cfg.out = "unused.json"
    return cfg


def test_bench_reports_training_and_sampling_with_and_without_cfg():
    result = run(compose_bench())
    assert result["device"].startswith("cpu") and result["precision"] == "fp32"
    train = result["train"]
    assert train["img_per_s"] > 0 and train["repeats"] == 2 and train["peak_rss_mib"] > 0
    assert train["mfu"] is None  # no peak FLOP/s is claimed for a CPU
    for key, cfg in (("sample_cfg", 2.0), ("sample_no_cfg", 1.0)):
        s = result[key]
        assert s["cfg"] == cfg and s["network_evaluations"] == s["sampling_cost"]["passes"] == 8 * 8
        # decode is timed apart: including it can only lower the throughput
        assert 0 < s["img_per_s_decode_included"] < s["img_per_s_decode_excluded"]
    assert result["sample_cfg"]["sampling_cost"]["rows_per_pass_factor"] == 2
    assert result["sample_no_cfg"]["sampling_cost"]["rows_per_pass_factor"] == 1


def test_sampling_precision_is_set_apart_and_checked_before_any_timing(monkeypatch):
    """FlowAR samples in fp16 and ACDiT in fp32 whatever they train in: sample.precision sets the sampling phase."""
    result = run(compose_bench("sample.precision=bf16", "sample.no_cfg=false"))
    assert result["precision"] == result["train"]["precision"] == "fp32"
    assert result["sample_cfg"]["precision"] == "bf16" and "sample_no_cfg" not in result
    monkeypatch.setattr(bench, "bench_training", lambda *a, **k: pytest.fail("timed before the config was checked"))
    with pytest.raises(ValueError, match="sample.precision must be"):
        run(compose_bench("sample.precision=fp8"))


def test_training_flops_count_at_least_the_transformer_matmuls():
    """FlopCounterMode's count of one training step ≥ 6 · (linear weights) · tokens (fwd 2, bwd 4 per weight)."""
    spec = TokenSpec(name="vq", kind="discrete", layout="grid", grid=(4, 4), dim=8, vocab_size=64)
    model = RasterGenerator(spec=spec, num_classes=10, dim=64, depth=2, heads=4)
    tokens = bench.random_tokens(spec, 8, torch.device("cpu"), torch.Generator().manual_seed(0))
    labels = torch.zeros(8, dtype=torch.long)
    flops = bench.count_training_flops(model, tokens, labels, torch.device("cpu"), "fp32")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops >= 6 * linear * 8 * 16 * 0.99
    assert flops <= 6 * linear * 8 * 16 * 2  # attention and norms add a little, not a multiple


@pytest.mark.parametrize("layout", ["grid", "depth", "scales", "continuous"])
def test_random_tokens_follow_the_spec(layout):
    kind = "continuous" if layout == "continuous" else "discrete"
    spec = TokenSpec(name="x", kind=kind, layout="grid" if layout == "continuous" else layout, grid=(4, 4), dim=3,
                     vocab_size=None if kind == "continuous" else 7, depth=2 if layout == "depth" else 1,
                     scales=(1, 2, 4) if layout == "scales" else ())
    tokens = bench.random_tokens(spec, 5, torch.device("cpu"), torch.Generator().manual_seed(0))
    if layout == "scales":
        assert [t.shape for t in tokens] == [(5, n, n) for n in (1, 2, 4)]
    elif layout == "continuous":
        assert tokens.shape == (5, 3, 4, 4) and tokens.dtype == torch.float32
    else:
        assert tokens.shape == ((5, 4, 4, 2) if layout == "depth" else (5, 4, 4)) and tokens.max() < 7


def test_cli_writes_json_and_prints_the_table(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "arvision.cli.bench", "bench_preset=cpu_tiny", "skip_sampling=true",
                         f"out={tmp_path / 'b.json'}", f"hydra.run.dir={tmp_path}"],
                        capture_output=True, text=True, env=cli_env(tmp_path), timeout=240)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "b.json").exists() and "train img/s" in ok.stdout
    absent = subprocess.run([sys.executable, "-m", "arvision.cli.bench", "bench_preset=cpu_tiny", "device=cuda:63",
                             f"out={tmp_path / 'c.json'}", f"hydra.run.dir={tmp_path}"],
                            capture_output=True, text=True, env=cli_env(tmp_path), timeout=240)
    assert absent.returncode == 2 and absent.stderr.startswith("arvision: error: device=cuda:63")
    assert absent.stderr.count("\n") == 1 and not (tmp_path / "c.json").exists()


def test_debug_tiny_runs_the_bench_as_it_runs_training(tmp_path):
    """`debug=tiny` composes with arvision-bench (its callbacks override has a group to override) and gives the
    tiny model sizes and the cpu_tiny budgets."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=["generator=raster", "tokenizer=vq", "debug=tiny"])
        preset = compose(config_name="bench", overrides=["bench_preset=cpu_tiny"])
    with open_dict(cfg):
        cfg.out = str(tmp_path / "unused.json")
    assert cfg.tiny and cfg.generator.model.dim == 32 and cfg.tokenizer.model.vocab_size == 32
    for key in ("batch_size", "warmup", "repeats"):
        assert cfg.train[key] == preset.train[key] and cfg.sample[key] == preset.sample[key]
    result = run(cfg)
    assert result["train"]["img_per_s"] > 0 and result["train"]["repeats"] == 2
    assert result["sample_cfg"]["img_per_s_decode_included"] > 0 and result["sample_no_cfg"]["cfg"] == 1.0
    printed = subprocess.run([sys.executable, "-m", "arvision.cli.bench", "generator=raster", "tokenizer=vq",
                              "debug=tiny", f"out={tmp_path / 'b.json'}", f"hydra.run.dir={tmp_path}"],
                             capture_output=True, text=True, env=cli_env(tmp_path), timeout=240)
    assert printed.returncode == 0, printed.stderr
    shown = [line for line in printed.stdout.splitlines() if "train img/s" in line or "sample img/s" in line]
    assert len(shown) == 5 and all(float(line.split("│")[2]) > 0 for line in shown)
    assert (tmp_path / "b.json").exists()


def test_a_missing_gpu_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="device=cuda needs a CUDA GPU and none is visible; use device=cpu"):
        resolve_precision(compose_bench("device=cuda"))
    assert resolve_precision(compose_bench()) == (torch.device("cpu"), "fp32")


@pytest.mark.parametrize("name, expected", [("auto", "cpu"), ("cpu", "cpu")])
def test_device_names_resolve_on_a_machine_without_cuda(name, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(name) == torch.device(expected)


@pytest.mark.parametrize("name, message", [
    ("cuda:1", "device=cuda:1 needs a CUDA GPU and none is visible"),
    ("tpu", "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("meta", "device must be auto, cpu, cuda or cuda:N, got 'meta'")])
def test_bad_or_absent_devices_are_one_line(name, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as err:
        resolve_device(name)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_an_absent_gpu_index_names_the_ones_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match=r"device=cuda:2: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


# FlowAR-S: 171.7M from its module shapes (reported 170M); ACDiT-B: 130M (the paper's Table 5 says 132M: within 2%).
# FlowAR and ACDiT index their mask tables at construction, which the meta device cannot: they are built on the CPU.
@pytest.mark.parametrize("preset, params, device", [
    ("llamagen_gpt_b", 111e6, "meta"), ("llamagen_gpt_l", 343e6, "meta"), ("var_d16", 310e6, "meta"),
    ("flowar_s", 172e6, "cpu"), ("acdit_b", 130e6, "cpu")])
def test_official_comparison_presets_build_the_published_sizes(preset, params, device):
    """The GPU comparison presets reproduce the official model sizes (random weights, nothing run)."""
    from arvision.utils.instantiate import instantiate
    cfg = compose_bench(f"bench_preset={preset}")
    with torch.device(device):
        tokenizer = instantiate(cfg.tokenizer.model, image_size=cfg.data.image_size, image_channels=cfg.data.channels)
        generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=cfg.data.num_classes)
    count = sum(p.numel() for p in generator.parameters())
    assert abs(count - params) / params < 0.05, count
    assert cfg.preset_name == preset


def test_flowar_s_and_acdit_b_presets_follow_the_papers_settings():
    """Beyond the sizes: the token layouts, block counts and samplers of the papers' ImageNet-256 settings."""
    flowar = compose_bench("bench_preset=flowar_s")
    assert flowar.generator.model.scales == [1, 2, 4, 8, 16] and flowar.tokenizer.model.latent_channels == 16
    assert flowar.tokenizer.model.ch_mult == [1, 1, 2, 2, 4]  # stride 16: 256 px → 16×16×16
    assert (flowar.generator.sample.cfg, flowar.generator.sample.steps) == (4.3, 25)
    assert (flowar.precision, flowar.sample.precision) == ("tf32", "fp16")  # main_flowar.py's TF32, engine.py's fp16
    acdit = compose_bench("bench_preset=acdit_b")
    assert len(acdit.tokenizer.model.ch_mult) == 4 and acdit.tokenizer.model.latent_channels == 4  # f8: 32×32×4
    assert (32 * 32) // acdit.generator.model.block_size == 4 and acdit.generator.model.patch_size == 1
    assert (acdit.generator.sample.cfg, acdit.generator.sample.steps, acdit.generator.sample.sampler) == \
        (1.5, 25, "dpm_solver_pp")
    assert (acdit.precision, acdit.sample.precision) == ("auto", "fp32")  # bf16 training on GPU, fp32 sampling
