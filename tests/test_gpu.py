"""The fast paths on a CUDA device: what the CPU suite cannot check. Run with `pytest -m gpu`; every test
here skips itself without CUDA, and the default run deselects them (`-m 'not slow and not gpu'`).

- FlexAttention block masks (the `auto` default on CUDA) compute the dense-mask model: loss and gradients, fp32
  and bf16, for the three masked paradigms (block-causal next_scale / flowar, skip-causal acdit);
- no host synchronisation inside any sampling loop: `torch.cuda.set_sync_debug_mode("error")` raises on every
  operation that waits for the device (`.item()`, a device-to-host copy, `nonzero`, a synchronous copy…);
- raster and next-scale decode: the static caches and the compiled CUDA-graph steps sample the eager tokens;
  FlowAR's compiled CUDA-graph head samples the eager latents (Euler and Heun);
- the optimiser is PyTorch's fused AdamW on CUDA parameters.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch

from arvision import bench
from arvision.generators.acdit import ACDiTGenerator
from arvision.generators.flowar import FlowARGenerator
from arvision.generators.next_scale import NextScaleGenerator
from arvision.tasks.optim import adamw
from tests.test_fast_paths import (NUM_CLASSES, SAMPLERS, VAE, flowar_model, make_sampler, msvq, next_scale_model,
                                  raster)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def masked_twins(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same weights twice: attention through FlexAttention block masks, and through SDPA with a dense mask."""
    def build(attention: str) -> torch.nn.Module:
        torch.manual_seed(0)
        if kind == "next_scale":
            return NextScaleGenerator(spec=msvq().spec, num_classes=NUM_CLASSES, depth=2, dim=64, heads=4,
                                      attention=attention)
        if kind == "flowar":
            return FlowARGenerator(spec=VAE, num_classes=NUM_CLASSES, dim=64, depth=2, heads=4, head_width=64,
                                   head_depth=1, head_heads=4, attention=attention)
        return ACDiTGenerator(spec=VAE, num_classes=NUM_CLASSES, dim=64, depth=2, heads=4, block_size=16,
                              attention=attention)
    flex, dense = build("flex"), build("sdpa")
    dense.load_state_dict(flex.state_dict())
    return flex.to(CUDA).train(), dense.to(CUDA).train()


def loss_and_grads(model: torch.nn.Module, tokens, labels, dtype: torch.dtype):
    torch.manual_seed(1)  # the same class dropout, timesteps and noise for both twins
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss = model.loss(tokens, labels)["loss"]
    loss.backward()
    return loss.detach().float(), [p.grad.float() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["next_scale", "flowar", "acdit"])
def test_flex_block_masks_give_the_dense_mask_loss_and_gradients(kind: str, dtype: torch.dtype) -> None:
    flex, dense = masked_twins(kind)
    tokens = bench.random_tokens(flex.spec, 8, CUDA, torch.Generator().manual_seed(0))
    labels = torch.arange(8, device=CUDA) % NUM_CLASSES
    flex_loss, flex_grads = loss_and_grads(flex, tokens, labels, dtype)
    dense_loss, dense_grads = loss_and_grads(dense, tokens, labels, dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(flex_loss, dense_loss, **tol)
    assert len(flex_grads) == len(dense_grads)
    for got, want in zip(flex_grads, dense_grads, strict=True):
        scale = want.abs().max().clamp_min(1e-6)  # relative to each tensor's largest gradient
        torch.testing.assert_close(got / scale, want / scale, **tol)


@contextlib.contextmanager
def no_device_waits():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_sampling_loops_never_wait_for_the_gpu(kind: str) -> None:
    model, sampling = make_sampler(kind)
    model = model.to(CUDA).eval()
    labels = torch.tensor([0, 2], device=CUDA)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    with torch.inference_mode():
        model.sample(labels, cfg=2.0, generator=generator, **sampling)  # warm-up: lazy CUDA and kernel set-up
        with no_device_waits():
            out = model.sample(labels, cfg=2.0, generator=generator, **sampling)
    assert (out[0] if isinstance(out, list) else out).is_cuda


@pytest.mark.parametrize("layout", ["grid", "rvq_flat", "rvq_head"])
def test_static_and_cuda_graph_decode_sample_the_eager_tokens(layout: str) -> None:
    """Greedy decoding, so the comparison is of the logits' argmax at every step, not of random draws."""
    model = raster(layout).to(CUDA)
    labels = torch.tensor([0, 1, 2, 1], device=CUDA)
    with torch.inference_mode():
        eager = model.sample(labels, cfg=2.0, temperature=0.0, decode="eager")
        static = model.sample(labels, cfg=2.0, temperature=0.0, decode="static")
        compiled = model.sample(labels, cfg=2.0, temperature=0.0, decode="compiled")
        again = model.sample(labels, cfg=2.0, temperature=0.0, decode="compiled")  # a replay, no recompilation
    assert torch.equal(static, eager)
    assert torch.equal(compiled, eager) and torch.equal(again, eager)


@pytest.mark.parametrize("residual", [True, False])
def test_next_scale_static_and_cuda_graph_steps_sample_the_eager_tokens(residual: bool) -> None:
    model = next_scale_model(residual).to(CUDA)
    labels = torch.tensor([0, 1, 2, 1], device=CUDA)
    runs = {decode: model.sample(labels, cfg=2.5, temperature=0.0, decode=decode)
            for decode in ("eager", "static", "compiled")}
    again = model.sample(labels, cfg=2.5, temperature=0.0, decode="compiled")  # replays, no recompilation
    for decode, out in [*runs.items(), ("again", again)]:
        for got, want in zip(out if residual else [out], runs["eager"] if residual else [runs["eager"]], strict=True):
            assert torch.equal(got, want), decode


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flowar_cuda_graph_head_samples_the_eager_latents(sampler: str) -> None:
    """Heun reads its first velocity after the second evaluation: a replay must not overwrite what it returned."""
    model = flowar_model().to(CUDA)
    labels = torch.tensor([0, 1, 2, 1], device=CUDA)
    run = functools.partial(model.sample, labels, cfg=2.0, steps=4, sampler=sampler)
    eager = run(generator=torch.Generator(device=CUDA).manual_seed(5))
    for _ in range(2):  # the first run records the graphs, the second replays them
        compiled = run(generator=torch.Generator(device=CUDA).manual_seed(5), decode="compiled")
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_the_optimiser_is_fused_adamw_on_cuda_parameters() -> None:
    model = copy.deepcopy(raster()).to(CUDA)
    optimizer = adamw(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    assert optimizer.defaults["fused"] is True
