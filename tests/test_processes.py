"""Continuous processes (nn/processes.py): noising conventions, oracle reconstruction, Gaussian targets, CFG."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from arvision.nn.processes import GaussianDiffusion, RectifiedFlow, guided, time_grid

FLOW = RectifiedFlow()
DDPM = {s: GaussianDiffusion(beta_schedule=s) for s in ("linear", "cosine")}
MU, SIGMA = 1.5, 0.5  # the 1-D Gaussian target N(MU, SIGMA²) of the moment tests


def data(seed: int = 0, shape: tuple[int, ...] = (3, 4, 2, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 2 + 1, torch.randn(shape, generator=gen)


# --- conventions ------------------------------------------------------------------------------------------------------


def test_flow_path_endpoints_and_velocity() -> None:
    x0, eps = data()
    torch.testing.assert_close(FLOW.add_noise(x0, eps, 1.0), eps)  # t = 1 is pure noise
    torch.testing.assert_close(FLOW.add_noise(x0, eps, 0.0), x0)   # t = 0 is data
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = FLOW.add_noise(x0, eps, t)
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    per_token = torch.rand(3, 4)  # per-token times (B, L) broadcast over the trailing dims of x (B, L, …)
    torch.testing.assert_close(FLOW.add_noise(x0, eps, per_token),
                               (1 - per_token[..., None, None]) * x0 + per_token[..., None, None] * eps)
    # the target is the time derivative of the path
    h = 1e-3
    deriv = (FLOW.add_noise(x0, eps, 0.5 + h) - FLOW.add_noise(x0, eps, 0.5 - h)) / (2 * h)
    torch.testing.assert_close(deriv, FLOW.target(x0, eps), atol=1e-3, rtol=0)


def test_flow_time_sampling_and_embedding_input() -> None:
    t = FLOW.sample_t(4096, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and t.dtype == torch.float32 and 0 <= t.min() and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.02
    # FlowAR's head embeds (t·1000).long(): truncation, not rounding
    assert FLOW.timestep_embedding_input(torch.tensor([0.0, 0.9996, 1.0])).tolist() == [0.0, 999.0, 1000.0]
    assert RectifiedFlow(discrete_time=False).timestep_embedding_input(torch.tensor([0.0005])).item() == 0.5


def test_time_grids() -> None:
    grid = time_grid("flowar", 25)
    assert grid.dtype == torch.float64 and len(grid) == 25  # 12 + 13 points: FlowAR's "25 steps" are 24 evaluations
    torch.testing.assert_close(grid[:12], torch.linspace(1, 0.3, 12, dtype=torch.float64))
    torch.testing.assert_close(grid[12:], torch.linspace(0.25, 0, 13, dtype=torch.float64))
    assert (grid.diff() < 0).all() and grid[0] == 1 and grid[-1] == 0
    assert FLOW.evaluations(steps=25) == 24 and FLOW.evaluations(sampler="heun", steps=25) == 47
    assert len(time_grid("uniform", 50)) == 51 and FLOW.evaluations(steps=50, grid="uniform") == 50
    with pytest.raises(ValueError):
        time_grid("cosine", 10)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_schedule_and_timesteps(schedule: str) -> None:
    ddpm = DDPM[schedule]
    t = ddpm.sample_t(5000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 999
    ab = ddpm.alphas_cumprod
    assert ab.shape == (1000,) and (ab.diff() < 0).all() and ab[-1] < 1e-3
    if schedule == "linear":  # diffusers' DDPMScheduler defaults
        torch.testing.assert_close(ddpm.betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
        assert abs(ab[-1].item() - 4.04e-5) < 1e-6
    else:  # IDDPM cosine ᾱ (ignoring the β cap at the very end)
        s = torch.tensor([0.0, 500.0]) / 1000
        ref = torch.cos((s + 1 / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
        torch.testing.assert_close(ab[[0, 500]].float(), ref)
    x0, eps = data()
    tt = torch.tensor([0, 500, 999])
    xt = ddpm.add_noise(x0, eps, tt)
    torch.testing.assert_close(xt[2], (ab[999].sqrt() * x0[2] + (1 - ab[999]).sqrt() * eps[2]).float())
    assert torch.equal(ddpm.target(x0, eps), eps)
    for steps, spacing in [(25, "leading"), (25, "linspace"), (7, "trailing"), (1000, "leading")]:
        ts = ddpm.inference_timesteps(steps, spacing)
        assert len(ts) == steps and ts == sorted(ts, reverse=True) and len(set(ts)) == steps
        assert all(isinstance(v, int) and 0 <= v <= 999 for v in ts)
    assert ddpm.inference_timesteps(25, "leading")[:2] == [960, 920]  # diffusers DDIM: k·(1000 // 25)
    assert ddpm.inference_timesteps(25, "linspace")[:2] == [999, 959]  # diffusers DPM-Solver: round(linspace)


def test_losses_weighting() -> None:
    x0, eps = data()
    pred = torch.zeros_like(x0)
    per = (eps - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(FLOW.loss(pred, x0, eps), per.mean())
    w = torch.tensor([1.0, 0.0, 3.0])
    torch.testing.assert_close(FLOW.loss(pred, x0, eps, w), (per * w).mean())
    torch.testing.assert_close(DDPM["linear"].loss(pred, x0, eps), eps.pow(2).mean())
    assert FLOW.loss(eps - x0, x0, eps) == 0


# --- oracle reconstruction ------------------------------------------------------------------------------------------


def flow_oracle(x0: torch.Tensor, eps: torch.Tensor):
    def v(x, t):
        assert x.dtype == torch.float32 and t.shape == (x.shape[0],)
        return eps - x0
    return v


@settings(max_examples=20, deadline=None)
@given(steps=st.integers(2, 40), grid=st.sampled_from(["uniform", "flowar"]),
       sampler=st.sampled_from(["euler", "heun"]), seed=st.integers(0, 2**16))
def test_flow_oracle_velocity_reconstructs_data(steps: int, grid: str, sampler: str, seed: int) -> None:
    """The straight path has constant velocity ε − x0, so any grid integrates it exactly from ε to x0."""
    x0, eps = data(seed)
    out = FLOW.sample(flow_oracle(x0, eps), eps, sampler=sampler, steps=steps, grid=grid)
    torch.testing.assert_close(out.sample, x0, atol=1e-5, rtol=1e-5)
    assert out.evaluations == FLOW.evaluations(sampler=sampler, steps=steps, grid=grid)


@settings(max_examples=20, deadline=None)
@given(steps=st.integers(1, 60), schedule=st.sampled_from(["linear", "cosine"]),
       sampler=st.sampled_from(["ddim", "dpm_solver_pp_2m"]), seed=st.integers(0, 2**16))
def test_ddpm_oracle_eps_reconstructs_data(steps: int, schedule: str, sampler: str, seed: int) -> None:
    # float64: at t = 999 the cosine schedule has √ᾱ ≈ 1e-5, which would amplify fp32 rounding of x_t a hundred-thousandfold
    x0, eps = (v.double() for v in data(seed))
    ddpm = DDPM[schedule]
    seen: list[torch.Tensor] = []

    def eps_fn(x, t):
        assert t.dtype == torch.long
        seen.append(t)
        return eps  # the true noise of the deterministic trajectory through x0

    start = ddpm.add_noise(x0, eps, ddpm.inference_timesteps(steps, "leading" if sampler == "ddim" else "linspace")[0])
    out = ddpm.sample(eps_fn, start, sampler=sampler, steps=steps)
    torch.testing.assert_close(out.sample, x0, atol=1e-6, rtol=1e-6)
    assert out.evaluations == steps == len(seen)


def test_dpm_solver_second_order_beats_first_order() -> None:
    """On a Gaussian target DPM-Solver++(2M) converges to the probability-flow ODE solution much faster than DDIM
    (first order: error halves when the steps double) on the same time steps."""
    ddpm = DDPM["linear"]
    noise = torch.randn(2000, 1, generator=torch.Generator().manual_seed(1))
    reference = ddpm.ddim(gaussian_eps(ddpm), noise, 1000, spacing="linspace").sample

    def err(fn, steps: int, **kw) -> float:
        return (fn(gaussian_eps(ddpm), noise, steps, **kw).sample - reference).abs().mean().item()

    for steps, factor in [(20, 2), (40, 10)]:
        assert err(ddpm.dpm_solver_pp_2m, steps) < err(ddpm.ddim, steps, spacing="linspace") / factor


# --- exact fields of a Gaussian target --------------------------------------------------------------------------------


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[ε − x0 | x_t] for x0 ~ N(MU, SIGMA²): x_t ~ N((1−t)μ, (1−t)²σ² + t²), Cov(ε, x_t) = t, Cov(x0, x_t) = (1−t)σ²."""
    t = t.double()[:, None]
    var = (1 - t) ** 2 * SIGMA**2 + t**2
    centred = x.double() - (1 - t) * MU
    eps = t * centred / var
    x0 = MU + (1 - t) * SIGMA**2 * centred / var
    return (eps - x0).float()


def gaussian_eps(ddpm: GaussianDiffusion):
    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = ddpm.alphas_cumprod[t][:, None]
        var = ab * SIGMA**2 + 1 - ab
        return ((1 - ab).sqrt() * (x.double() - ab.sqrt() * MU) / var).float()
    return eps_fn


@pytest.mark.parametrize("sampler,steps,grid", [("euler", 100, "uniform"), ("euler", 25, "flowar"),
                                                ("heun", 10, "uniform"), ("euler_maruyama", 200, "uniform")])
def test_flow_samplers_recover_a_gaussian(sampler: str, steps: int, grid: str) -> None:
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 1, generator=gen)
    x = FLOW.sample(gaussian_velocity, noise, sampler=sampler, steps=steps, grid=grid, generator=gen).sample
    assert abs(x.mean().item() - MU) < 0.03 and abs(x.std().item() - SIGMA) < 0.03, (x.mean(), x.std())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,steps,eta", [("ddim", 50, 0.0), ("ddim", 100, 1.0), ("dpm_solver_pp_2m", 25, 0.0)])
def test_ddpm_samplers_recover_a_gaussian(schedule: str, sampler: str, steps: int, eta: float) -> None:
    ddpm = DDPM[schedule]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 1, generator=gen)
    x = ddpm.sample(gaussian_eps(ddpm), noise, sampler=sampler, steps=steps, eta=eta, generator=gen).sample
    assert abs(x.mean().item() - MU) < 0.03 and abs(x.std().item() - SIGMA) < 0.03, (x.mean(), x.std())


# --- classifier-free guidance and noise -------------------------------------------------------------------------------


def two_headed(calls: list[int]):
    """A fake network: conditional rows predict +1 everywhere, null-class rows −1 (and both halves see equal x)."""
    def fn(x, t):
        calls.append(x.shape[0])
        b = x.shape[0] // 2
        assert torch.equal(x[:b], x[b:]) and torch.equal(t[:b], t[b:])
        return torch.cat([torch.ones_like(x[:b]), -torch.ones_like(x[b:])])
    return fn


@settings(max_examples=25, deadline=None)
@given(w=st.floats(-2, 6), t=st.floats(0, 1), low=st.floats(0, 1), high=st.floats(0, 1))
def test_guidance_combination_and_interval(w: float, t: float, low: float, high: float) -> None:
    assume(w != 1.0)  # cfg = 1 runs the B conditional rows only (checked below)
    calls: list[int] = []
    x = torch.randn(3, 2)
    out = guided(two_headed(calls), x, t, cfg=w, guidance_interval=(low, high))
    inside = low <= t <= high
    expected = (-1 + w * 2) if inside else 1.0  # uncond + w·(cond − uncond), or cond outside the interval
    torch.testing.assert_close(out, torch.full_like(x, expected))
    assert calls == [6]  # always one call on the doubled batch
    torch.testing.assert_close(guided(lambda x, t: x * 2, x, t, cfg=1.0), x * 2)  # cfg = 1: B rows, unguided


def test_cfg_one_is_the_conditional_prediction_and_interval_in_samplers() -> None:
    x0, eps = data()
    noise = torch.randn(3, 4, 2, 2)

    def cond_uncond(x, t):  # 2B rows under CFG, B rows without
        v = eps - x0
        return torch.cat([v, torch.zeros_like(v)]) if x.shape[0] == 2 * x0.shape[0] else v

    plain = FLOW.sample(lambda x, t: eps - x0, noise, steps=10)
    torch.testing.assert_close(FLOW.sample(cond_uncond, noise, steps=10, cfg=1.0).sample, plain.sample)
    # guidance never active (interval below every grid time but 0) → the conditional prediction at every step
    off = FLOW.sample(cond_uncond, noise, steps=10, cfg=3.0, guidance_interval=(-1.0, -0.5))
    torch.testing.assert_close(off.sample, plain.sample)
    # guidance for t ≤ 0.5 only: steps from t = 0.5, 0.4, … use 3·v, those from t = 1 … 0.6 use v
    half = FLOW.sample(cond_uncond, noise, steps=10, grid="uniform", cfg=3.0, guidance_interval=(0.0, 0.55))
    torch.testing.assert_close(half.sample, noise - 0.5 * (eps - x0) - 0.5 * 3.0 * (eps - x0))
    ddpm = DDPM["linear"]
    calls: list[int] = []
    out = ddpm.sample(two_headed(calls), torch.zeros(2, 3), sampler="ddim", steps=5, cfg=2.0,
                      guidance_interval=(0, 500))
    assert out.evaluations == 5 and calls == [4] * 5


def test_external_and_seeded_noise_make_sampling_reproducible() -> None:
    ddpm = DDPM["cosine"]
    noise = torch.randn(64, 3)
    eps_fn = gaussian_eps(ddpm)
    a = ddpm.ddim(eps_fn, noise, 20, eta=1.0, generator=torch.Generator().manual_seed(5)).sample
    b = ddpm.ddim(eps_fn, noise, 20, eta=1.0, generator=torch.Generator().manual_seed(5)).sample
    c = ddpm.ddim(eps_fn, noise, 20, eta=1.0, generator=torch.Generator().manual_seed(6)).sample
    assert torch.equal(a, b) and not torch.allclose(a, c)
    steps = [torch.randn(64, 3, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    d = ddpm.ddim(eps_fn, noise, 20, eta=1.0, step_noise=steps).sample
    e = ddpm.ddim(eps_fn, noise, 20, eta=1.0, step_noise=lambda i: steps[i]).sample
    assert torch.equal(d, e) and not torch.allclose(d, a)
    # η = 0 ignores per-step noise entirely
    assert torch.equal(ddpm.ddim(eps_fn, noise, 20, step_noise=steps).sample, ddpm.ddim(eps_fn, noise, 20).sample)
    f = FLOW.sample(gaussian_velocity, noise, sampler="euler_maruyama", steps=20, step_noise=steps).sample
    g = FLOW.sample(gaussian_velocity, noise, sampler="euler_maruyama", steps=20, step_noise=steps).sample
    assert torch.equal(f, g)
