"""arvision-bench [tokenizer=… generator=… | bench_preset=…]: training and sampling speed on this device.

Random weights and random tokens, so nothing is trained or read: the numbers are the model's cost alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from arvision import bench
from arvision.cli.common import config_dir, fail, print_table
from arvision.generators.base import IncompatibleTokenizer
from arvision.metrics import count_parameters
from arvision.tokenizers.base import MissingExtra
from arvision.utils.instantiate import instantiate
from arvision.utils.results import git_sha, now, versions, write_json_atomic


PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def resolve_device(cfg: DictConfig) -> tuple[torch.device, str]:
    """The device and the training precision (the sampling precision is `sample_precision`)."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device=cuda needs a CUDA GPU and none is visible; use device=cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32, tf32, bf16 or fp16, got {precision!r}")
    use_tf32(device, precision == "tf32")
    return device, precision


def use_tf32(device: torch.device, enabled: bool) -> None:
    """tf32: fp32 tensors with TF32 matmuls and convolutions (FlowAR trains so); set per timed phase."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled


def sample_precision(cfg: DictConfig, precision: str) -> str:
    """sample.precision, or the training precision when unset (FlowAR samples in fp16, ACDiT in fp32)."""
    chosen = cfg.sample.get("precision") or precision
    if chosen not in PRECISIONS:
        raise ValueError(f"sample.precision must be null, fp32, tf32, bf16 or fp16, got {chosen!r}")
    return chosen


def run(cfg: DictConfig) -> dict[str, Any]:
    device, precision = resolve_device(cfg)
    sampled_in = sample_precision(cfg, precision)
    torch.manual_seed(cfg.seed)
    tokenizer = instantiate(cfg.tokenizer.model, image_size=cfg.data.image_size, image_channels=cfg.data.channels)
    generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=cfg.data.num_classes)
    tokenizer.to(device)
    generator.to(device).attach_tokenizer(tokenizer)
    sampling = {k: v for k, v in OmegaConf.to_container(cfg.generator.sample, resolve=True).items() if k != "cfg"}
    result: dict[str, Any] = {
        "date": now(), "device": bench.device_name(device), "precision": precision, "git_sha": git_sha(),
        "versions": versions(), "tokenizer": cfg.tokenizer.name, "generator": cfg.generator.name,
        "preset": cfg.get("preset_name"),
        "spec": tokenizer.spec.to_dict(), "params": {"generator": count_parameters(generator),
                                                     "tokenizer": count_parameters(tokenizer)},
        "config": {"generator": OmegaConf.to_container(cfg.generator.model, resolve=True),
                   "tokenizer": OmegaConf.to_container(cfg.tokenizer.model, resolve=True)},
    }
    result["train"] = bench.bench_training(generator, batch_size=cfg.train.batch_size, device=device,
                                           precision=precision, warmup=cfg.train.warmup,
                                           repeats=cfg.train.repeats, compile=cfg.compile, seed=cfg.seed)
    if not cfg.skip_sampling:
        use_tf32(device, sampled_in == "tf32")
        common = dict(batch_size=cfg.sample.batch_size, sampling=sampling, device=device, precision=sampled_in,
                      warmup=cfg.sample.warmup, repeats=cfg.sample.repeats, seed=cfg.seed)
        result["sample_cfg"] = bench.bench_sampling(generator, tokenizer, cfg=float(cfg.sample.cfg), **common)
        if cfg.sample.get("no_cfg", True):
            result["sample_no_cfg"] = bench.bench_sampling(generator, tokenizer, cfg=1.0, **common)
    return result


def summary(result: dict[str, Any]) -> dict[str, object]:
    train = result["train"]
    precision = result["precision"]  # training / sampling when they differ
    sampled_in = result.get("sample_cfg", {}).get("precision", precision)
    row: dict[str, object] = {"pair": f"{result['tokenizer']}+{result['generator']}", "device": result["device"],
                              "precision": precision if sampled_in == precision else f"{precision} / {sampled_in}",
                              "params (M)": result["params"]["generator"] / 1e6,
                              "train img/s": train["img_per_s"], "train peak MiB": train.get(
                                  "peak_memory_mib", train.get("peak_rss_mib")),
                              "MFU": train.get("mfu") if train.get("mfu") is not None else "-"}
    for key, label in (("sample_cfg", "cfg"), ("sample_no_cfg", "no cfg")):
        if key in result:
            s = result[key]
            row[f"sample img/s ({label}, decode excl.)"] = s["img_per_s_decode_excluded"]
            row[f"sample img/s ({label}, decode incl.)"] = s["img_per_s_decode_included"]
    if "sample_cfg" in result:
        row["decode img/s"] = result["sample_cfg"]["decode_img_per_s"]
        row["NFE/image"] = result["sample_cfg"]["network_evaluations"]
    return row


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")
def main(cfg: DictConfig) -> dict[str, Any]:
    try:
        result = run(cfg)
    except (IncompatibleTokenizer, MissingExtra, ValueError) as err:
        fail(str(err))
    write_json_atomic(Path(cfg.out), result)
    print_table(f"arvision-bench — {result['device']}", [summary(result)])
    print(f"results: {cfg.out}")
    return result


if __name__ == "__main__":
    main()
