"""Speed measurements for any tokenizer × generator pair, with random weights and random tokens.

What is measured, per the protocol of the papers' own speed tables (VAR, LlamaGen, FlowAR, ACDiT):
- training: forward + backward + fused-AdamW step on a batch of random tokens of the tokenizer's layout, bf16
  autocast on GPU; warm-up steps excluded, median of the timed steps → img/s; FLOPs of one step counted by
  `torch.utils.flop_counter` → model FLOPs utilisation against the GPU's dense bf16 peak;
- sampling: `generator.sample` on a batch with and without CFG (decode excluded) and `tokenizer.decode` apart,
  a warm-up batch excluded, median of repeats → img/s with decode excluded and included;
- peak memory of each phase (CUDA allocator; on CPU the process's peak RSS), network evaluations per image.

Every timed region goes through `arvision.metrics.speed.timed` (warm-up excluded, device synchronised), as the
evaluation's sampling speed does. `run(cfg)` is arvision-bench.
"""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from arvision.generators.base import Generator
from arvision.metrics.speed import count_parameters, peak_memory, timed
from arvision.results import git_sha, now, versions, write_json_atomic
from arvision.tasks.optim import adamw
from arvision.tokenizers.base import Tokenizer, TokenSpec
from arvision.utils.device import device_name, resolve_device, synchronize
from arvision.utils.instantiate import instantiate

# Dense bf16 tensor-core peaks (FLOP/s) for model FLOPs utilisation, by a substring of the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


class BenchError(ValueError):
    """A bench setting that cannot be used (an unknown precision); one line for the user."""


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def random_tokens(spec: TokenSpec, batch: int, device: torch.device, generator: torch.Generator) -> Any:
    """A batch of random tokens in `spec`'s layout (what a token cache would serve)."""
    if spec.kind == "continuous":
        return torch.randn(batch, spec.dim, *spec.grid, generator=generator).to(device)
    assert spec.vocab_size is not None
    if spec.layout == "scales":
        return [torch.randint(0, spec.vocab_size, (batch, n, n), generator=generator).to(device)
                for n in spec.scales]
    shape = (batch, *spec.grid) + ((spec.depth,) if spec.layout == "depth" else ())
    return torch.randint(0, spec.vocab_size, shape, generator=generator).to(device)


def autocast(device: torch.device, precision: str):
    if precision in ("fp32", "tf32"):  # tf32: fp32 tensors; the TF32 matmul flag is the caller's device setting
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def bench_training(generator: Generator, *, batch_size: int, device: torch.device, precision: str,
                   warmup: int, repeats: int, compile: bool = False, seed: int = 0) -> dict[str, Any]:
    """Training throughput: forward + backward + optimiser step on random tokens."""
    rng = torch.Generator().manual_seed(seed)
    tokens = random_tokens(generator.training_spec, batch_size, device, rng)
    labels = torch.randint(0, generator.num_classes, (batch_size,), generator=rng).to(device)
    generator.train()
    optimizer = adamw(generator, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    loss_fn = torch.compile(lambda t, y: generator.loss(t, y)["loss"]) if compile else (
        lambda t, y: generator.loss(t, y)["loss"])

    def step() -> None:
        with autocast(device, precision):
            loss = loss_fn(tokens, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out: dict[str, Any] = {"batch_size": batch_size, "precision": precision, "compile": compile}
    with peak_memory(device, out):
        seconds = timed(step, warmup=warmup, repeats=repeats, device=device)
    median = statistics.median(seconds)
    out.update(step_ms=1e3 * median, img_per_s=batch_size / median, repeats=repeats, warmup=warmup)
    flops = count_training_flops(generator, tokens, labels, device, precision)
    out["flops_per_image"] = flops / batch_size if flops else None
    if flops:
        out["achieved_tflops"] = flops / median / 1e12
        peak = peak_flops(device)
        out["mfu"] = flops / median / peak if peak and precision == "bf16" else None
    optimizer.zero_grad(set_to_none=True)
    return out


def count_training_flops(generator: Generator, tokens: Any, labels: torch.Tensor, device: torch.device,
                         precision: str) -> float | None:
    """FLOPs of one forward + backward (matmuls and attention, as counted by torch's FlopCounterMode)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover
        return None
    counter = FlopCounterMode(display=False)
    with counter, autocast(device, precision):
        generator.loss(tokens, labels)["loss"].backward()
    generator.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


@torch.inference_mode()
def bench_sampling(generator: Generator, tokenizer: Tokenizer, *, batch_size: int, cfg: float,
                   sampling: dict[str, Any], device: torch.device, precision: str, warmup: int, repeats: int,
                   seed: int = 0) -> dict[str, Any]:
    """Sampling throughput with decode excluded and, separately, the tokenizer's decode of the same batch."""
    cost = generator.sampling_cost(cfg=cfg, **sampling)  # settings checked before anything is timed
    generator.eval()
    labels = torch.arange(batch_size, device=device) % generator.num_classes
    rng = torch.Generator(device=device).manual_seed(seed)
    tokens: list[Any] = []

    def sample() -> None:
        with autocast(device, precision):
            tokens[:] = [generator.sample(labels, cfg=cfg, generator=rng, **sampling)]

    def decode() -> None:
        with autocast(device, precision):
            tokenizer.decode(tokens[0])

    # the settings as run (e.g. raster's decode=eager|static|compiled, the fast path being measured)
    out: dict[str, Any] = {"batch_size": batch_size, "cfg": cfg, "precision": precision, "sampling": dict(sampling)}
    with peak_memory(device, out):
        sample_s = statistics.median(timed(sample, warmup=warmup, repeats=repeats, device=device))
        decode_s = statistics.median(timed(decode, warmup=warmup, repeats=repeats, device=device))
    out.update(sample_s_per_batch=sample_s, decode_s_per_batch=decode_s,
               img_per_s_decode_excluded=batch_size / sample_s,
               img_per_s_decode_included=batch_size / (sample_s + decode_s),
               decode_img_per_s=batch_size / decode_s, network_evaluations=cost.passes,
               sampling_cost=cost.to_dict())
    return out


# --------------------------------------------------------------------------------------------- arvision-bench
def resolve_precision(cfg: DictConfig) -> tuple[torch.device, str]:
    """The device and the training precision (the sampling precision is `sample_precision`)."""
    device = resolve_device(cfg.device)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision not in PRECISIONS:
        raise BenchError(f"precision must be auto, fp32, tf32, bf16 or fp16, got {precision!r}")
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
        raise BenchError(f"sample.precision must be null, fp32, tf32, bf16 or fp16, got {chosen!r}")
    return chosen


def run(cfg: DictConfig, *, out: Path | None = None) -> dict[str, Any]:
    """arvision-bench: build the pair with random weights on the configured device, time training and sampling;
    the result is also written to `out` as JSON when given."""
    device, precision = resolve_precision(cfg)
    sampled_in = sample_precision(cfg, precision)
    torch.manual_seed(cfg.seed)
    tokenizer = instantiate(cfg.tokenizer.model, image_size=cfg.data.image_size, image_channels=cfg.data.channels)
    generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=cfg.data.num_classes)
    tokenizer.to(device)
    generator.to(device).attach_tokenizer(tokenizer)
    sampling = {k: v for k, v in OmegaConf.to_container(cfg.generator.sample, resolve=True).items() if k != "cfg"}
    result: dict[str, Any] = {
        "date": now(), "device": device_name(device), "precision": precision, "git_sha": git_sha(),
        "versions": versions(), "tokenizer": cfg.tokenizer.name, "generator": cfg.generator.name,
        "preset": cfg.get("preset_name"),
        "spec": tokenizer.spec.to_dict(), "params": {"generator": count_parameters(generator),
                                                     "tokenizer": count_parameters(tokenizer)},
        "config": {"generator": OmegaConf.to_container(cfg.generator.model, resolve=True),
                   "tokenizer": OmegaConf.to_container(cfg.tokenizer.model, resolve=True)},
    }
    result["train"] = bench_training(generator, batch_size=cfg.train.batch_size, device=device,
                                     precision=precision, warmup=cfg.train.warmup,
                                     repeats=cfg.train.repeats, compile=cfg.compile, seed=cfg.seed)
    if not cfg.skip_sampling:
        use_tf32(device, sampled_in == "tf32")
        common = dict(batch_size=cfg.sample.batch_size, sampling=sampling, device=device, precision=sampled_in,
                      warmup=cfg.sample.warmup, repeats=cfg.sample.repeats, seed=cfg.seed)
        result["sample_cfg"] = bench_sampling(generator, tokenizer, cfg=float(cfg.sample.cfg), **common)
        if cfg.sample.get("no_cfg", True):
            result["sample_no_cfg"] = bench_sampling(generator, tokenizer, cfg=1.0, **common)
    if out is not None:
        write_json_atomic(out, result)
    return result


def summary_row(result: dict[str, Any]) -> dict[str, object]:
    """The row arvision-bench prints."""
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


__all__ = ["BenchError", "bench_sampling", "bench_training", "count_training_flops", "device_name", "peak_memory",
           "random_tokens", "resolve_precision", "run", "sample_precision", "summary_row", "synchronize", "timed"]
