"""Speed measurements for any tokenizer × generator pair, with random weights and random tokens.

What is measured, per the protocol of the papers' own speed tables (reference/continuous_generators.md §5):
- training: forward + backward + fused-AdamW step on a batch of random tokens of the tokenizer's layout, bf16
  autocast on GPU; warm-up steps excluded, median of the timed steps → img/s; FLOPs of one step counted by
  `torch.utils.flop_counter` → model FLOPs utilisation against the GPU's dense bf16 peak;
- sampling: `generator.sample` on a batch with and without CFG (decode excluded) and `tokenizer.decode` apart,
  a warm-up batch excluded, median of repeats → img/s with decode excluded and included;
- peak memory of each phase (CUDA allocator; on CPU the process's peak RSS), network evaluations per image.

Every timed region ends with a device synchronisation, so GPU work is counted in full.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from arvision.generators.base import Generator
from arvision.tasks.optim import adamw
from arvision.tokenizers.base import Tokenizer, TokenSpec

# Dense bf16 tensor-core peaks (FLOP/s) for model FLOPs utilisation, by a substring of the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], *, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict[str, Any]):
    """Records the phase's peak memory in MiB into out['peak_memory_mib'] (CPU: process peak RSS so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast(device: torch.device, precision: str):
    if precision in ("fp32", "tf32"):  # tf32: fp32 tensors; the TF32 matmul flag is the caller's device setting
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def bench_training(generator: Generator, *, batch_size: int, device: torch.device, precision: str,
                   warmup: int, repeats: int, compile: bool = False, seed: int = 0) -> dict[str, Any]:
    """Training throughput: forward + backward + optimiser step on random tokens."""
    rng = torch.Generator().manual_seed(seed)
    tokens = random_tokens(generator.spec, batch_size, device, rng)
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
               decode_img_per_s=batch_size / decode_s, network_evaluations=generator.network_evaluations(cfg))
    cost = getattr(generator, "sampling_cost", None)
    if cost is not None:
        out["sampling_cost"] = cost(cfg)
    return out
