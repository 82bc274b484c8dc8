"""Continuous generative processes: rectified flow (FlowAR) and DDPM ε-prediction (ACDiT, MAR).

Only the process mathematics lives here: noising, targets, losses, time sampling and ODE/SDE samplers. The
network is never called directly; samplers take a closure `model_fn(x_t, t) -> prediction` so a caller can close
over anything its network needs per step (class or AR conditioning, KV caches, positions).

Rectified flow (`RectifiedFlow`), FlowAR's code convention (SiT/REPA `SILoss`, `path_type="linear"`):
    t ∈ [0, 1],   x_t = (1 − t)·x0 + t·ε,   t = 0 is data, t = 1 is pure noise,
    the network predicts the velocity v = dx_t/dt = ε − x0, trained with MSE, t ~ U(0, 1).
    FlowAR's *paper* writes F_t = t·s + (1 − t)·F0 (t = 1 is data): the flip t ↦ 1 − t of the code; we follow the
    code everywhere. The network sees floor(1000·t) (FlowAR's head does `(t * 1000).long()` before its sinusoidal
    embedding; `timestep_embedding_input`). Sampling integrates dx/dt = v from t = 1 down to 0 on a time grid:
    `uniform` (linspace(1, 0, steps + 1)) or `flowar` (FlowAR's `euler_sampler`: steps//2 points linspace(1 → 0.3)
    then steps//2 + 1 points linspace(0.25 → 0); for steps = 25 that is 25 points, i.e. 24 Euler steps — FlowAR's
    "25 steps" evaluate the network 24 times; FlowAR itself switches to the uniform grid at 50 steps). The ODE state
    is kept in float64, as FlowAR does, so a long grid accumulates no rounding; the network gets it in the dtype of
    the initial noise.

DDPM (`GaussianDiffusion`), diffusers' `DDPMScheduler` conventions (ACDiT trains with its defaults):
    T = 1000 integer timesteps t ∈ {0, …, 999}, ᾱ_t = Π_{s ≤ t}(1 − β_s), x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε,
    β linear in [1e-4, 0.02] (`linear`, DDPM/diffusers default) or IDDPM's cosine ᾱ (`cosine`, diffusers'
    `squaredcos_cap_v2`, MAR), ε-prediction trained with MSE, t ~ U{0, …, T − 1}. Samplers: DDIM (diffusers'
    `DDIMScheduler`: "leading" spacing, ᾱ_{−1} = 1, η for stochasticity) and DPM-Solver++(2M) (diffusers'
    `DPMSolverMultistepScheduler` defaults: "linspace" spacing, data prediction, midpoint second order, first order
    on the first step and on the last step to σ = 0). Both take diffusers' `leading` / `linspace` / `trailing`
    spacing and `steps_offset`, each by its own scheduler's rules (`inference_timesteps`): ACDiT samples with
    DPM-Solver++ built from DDIMScheduler's config, i.e. "leading" with offset 0 (950, 912, …, 38 for 25 steps).

Classifier-free guidance, shared by every sampler ("duplicate the batch" layout): with `cfg ≠ 1` the closure is
called on 2B rows, [x; x] with times [t; t], and must return [cond; uncond] predictions (conditional rows first,
then the null-class rows); the guided prediction is uncond + cfg·(cond − uncond). Inside the guidance interval
(low ≤ t ≤ high, in the process's time units: t ∈ [0, 1] for the flow, integer timesteps for DDPM) the guided
prediction is used, outside it the conditional one — the batch stays doubled, as in FlowAR, so the closure's row
layout never changes. Every sampler returns `Sampled(sample, evaluations)`, the number of `model_fn` calls.

No sampler reads a device tensor on the host: the time grids and ᾱ values that drive the Python loops are built on
the CPU (or kept as Python floats) before the loop, so a GPU sampling loop never waits for the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSource = Sequence[torch.Tensor] | Callable[[int], torch.Tensor] | None

TIME_GRIDS = ("uniform", "flowar", "sde")
BETA_SCHEDULES = ("linear", "cosine")
SPACINGS = ("leading", "linspace", "trailing")
SOLVERS = ("ddim", "dpm_solver")  # whose spacing rules `inference_timesteps` follows (diffusers' schedulers)
ALWAYS = (-math.inf, math.inf)


class Sampled(NamedTuple):
    sample: torch.Tensor
    evaluations: int  # model_fn calls (each on 2B rows under CFG)


def _per_sample(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar, (B,) or leading-dims (B, n, …) time/coefficient → broadcastable against x (B, …) by trailing ones
    (per-token times: t (B, L) against x (B, L, C))."""
    t = torch.as_tensor(t, device=x.device)
    return t.reshape(*t.shape, *([1] * (x.ndim - t.ndim))) if t.ndim else t


def mse_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over all but the batch dimension, optionally weighted per sample, then mean over the batch; fp32."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weight is not None:
        per_sample = per_sample * weight.float()
    return per_sample.mean()


def guided(model_fn: ModelFn, x: torch.Tensor, t: float | int, *, cfg: float = 1.0,
           guidance_interval: tuple[float, float] = ALWAYS) -> torch.Tensor:
    """One network evaluation with classifier-free guidance in the duplicate-the-batch layout.

    x (B, …) in the network's dtype; t a scalar time. cfg = 1 calls `model_fn` on the B rows; otherwise on
    [x; x] (2B rows, conditional then null-class) and returns uncond + cfg·(cond − uncond) inside the guidance
    interval, cond outside it.
    """
    rows = x.shape[0]  # torch.full keeps the type of t: float32 flow times, int64 DDPM timesteps
    if cfg == 1.0:
        return model_fn(x, torch.full((rows,), t, device=x.device))
    t_rows = torch.full((2 * rows,), t, device=x.device)
    cond, uncond = model_fn(torch.cat([x, x]), t_rows).chunk(2)
    low, high = guidance_interval
    if low <= float(t) <= high:
        return uncond + cfg * (cond - uncond)
    return cond


def _noise_at(source: NoiseSource, i: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Per-step noise: the i-th supplied tensor, a callable's output, or a fresh draw from `generator`."""
    if source is None:
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)
    noise = source(i) if callable(source) else source[i]
    return noise.to(device=like.device, dtype=like.dtype)


# --- rectified flow -------------------------------------------------------------------------------------------------


def time_grid(kind: str, steps: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Float64 times from 1 (noise) down to 0 (data); len − 1 network evaluations for Euler.

    `uniform`: steps + 1 points. `flowar`: FlowAR's Euler grid, steps//2 points linspace(1 → 0.3) then
    steps//2 + 1 points linspace(0.25 → 0) (dense near the data; 2·(steps//2) intervals, so 24 for steps = 25),
    except at exactly 50 steps, where FlowAR's `euler_sampler` switches to the uniform grid. `sde`: FlowAR's (SiT's)
    Euler–Maruyama grid, linspace(1 → 0.04, steps) then 0 (steps intervals).
    """
    if kind == "uniform" or (kind == "flowar" and steps == 50):
        if steps < 1:
            raise ValueError(f"need steps >= 1, got {steps}")
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    if kind == "flowar":
        if steps < 2:
            raise ValueError(f"the flowar time grid needs steps >= 2, got {steps}")
        half = steps // 2
        return torch.cat([torch.linspace(1.0, 0.3, half, dtype=torch.float64, device=device),
                          torch.linspace(0.25, 0.0, half + 1, dtype=torch.float64, device=device)])
    if kind == "sde":
        if steps < 2:
            raise ValueError(f"the sde time grid needs steps >= 2, got {steps}")
        return torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64, device=device),
                          torch.zeros(1, dtype=torch.float64, device=device)])
    raise ValueError(f"time grid must be one of {TIME_GRIDS}, got {kind!r}")


class RectifiedFlow:
    """Linear-path flow matching with velocity prediction (t = 0 data, t = 1 noise; see the module docstring)."""

    def __init__(self, *, time_scale: float = 1000.0, discrete_time: bool = True) -> None:
        self.time_scale, self.discrete_time = time_scale, discrete_time

    # training
    def sample_t(self, n: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """t ~ U(0, 1), shape (n,), fp32 (FlowAR: uniform weighting, no logit-normal)."""
        return torch.rand(n, generator=generator, device=device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = _per_sample(t, x0).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity dx_t/dt = ε − x0."""
        return noise - x0

    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        return mse_loss(prediction, self.target(x0, noise), weight)

    def timestep_embedding_input(self, t: torch.Tensor) -> torch.Tensor:
        """What the network's sinusoidal embedding sees: floor(1000·t) as FlowAR (`(t * 1000).long()`), or 1000·t
        with discrete_time=False. Float, so it feeds a sinusoidal embedding directly."""
        scaled = t.float() * self.time_scale
        return scaled.floor() if self.discrete_time else scaled

    # sampling
    def euler(self, model_fn: ModelFn, noise: torch.Tensor, timesteps: torch.Tensor, *, cfg: float = 1.0,
              guidance_interval: tuple[float, float] = ALWAYS, state_dtype: torch.dtype = torch.float64) -> Sampled:
        """Euler ODE from timesteps[0] (1, noise) to timesteps[-1] (0, data): len(timesteps) − 1 evaluations."""
        dtype, x = noise.dtype, noise.to(state_dtype)
        for t_cur, t_next in zip(timesteps[:-1].tolist(), timesteps[1:].tolist()):
            v = guided(model_fn, x.to(dtype), t_cur, cfg=cfg, guidance_interval=guidance_interval)
            x = x + (t_next - t_cur) * v.to(state_dtype)
        return Sampled(x.to(dtype), len(timesteps) - 1)

    def heun(self, model_fn: ModelFn, noise: torch.Tensor, timesteps: torch.Tensor, *, cfg: float = 1.0,
             guidance_interval: tuple[float, float] = ALWAYS, state_dtype: torch.dtype = torch.float64) -> Sampled:
        """Heun's second-order method (SiT/REPA `euler_sampler(heun=True)`): Euler predictor, trapezoid corrector,
        except on the last step (plain Euler, as theirs): 2·(len − 1) − 1 evaluations."""
        dtype, x = noise.dtype, noise.to(state_dtype)
        steps, evaluations = len(timesteps) - 1, 0
        for i, (t_cur, t_next) in enumerate(zip(timesteps[:-1].tolist(), timesteps[1:].tolist())):
            d_cur = guided(model_fn, x.to(dtype), t_cur, cfg=cfg, guidance_interval=guidance_interval).to(state_dtype)
            x_next = x + (t_next - t_cur) * d_cur
            evaluations += 1
            if i < steps - 1:
                d_next = guided(model_fn, x_next.to(dtype), t_next, cfg=cfg,
                                guidance_interval=guidance_interval).to(state_dtype)
                x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
                evaluations += 1
            x = x_next
        return Sampled(x.to(dtype), evaluations)

    def euler_maruyama(self, model_fn: ModelFn, noise: torch.Tensor, timesteps: torch.Tensor, *, cfg: float = 1.0,
                       guidance_interval: tuple[float, float] = ALWAYS, step_noise: NoiseSource = None,
                       generator: torch.Generator | None = None,
                       state_dtype: torch.dtype = torch.float64) -> Sampled:
        """The reverse SDE with diffusion coefficient g² = 2t (FlowAR/SiT `euler_maruyama_sampler`):
        drift v − ½·g²·score, score from the velocity of the linear path, score = −(x + (1 − t)·v)/t.
        The last interval takes the drift without noise (SiT's and FlowAR's final mean step; a plain velocity step
        where it starts at t = 0, where the score is singular). Per-step noise comes from `step_noise` (a list or
        callable i → tensor) or `generator`; len − 1 evaluations."""
        dtype, x = noise.dtype, noise.to(state_dtype)
        grid = timesteps.tolist()
        for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            v = guided(model_fn, x.to(dtype), t_cur, cfg=cfg, guidance_interval=guidance_interval).to(state_dtype)
            dt = t_next - t_cur
            if t_cur <= 0:
                x = x + dt * v
                continue
            score = -(x + (1 - t_cur) * v) / t_cur
            diffusion = 2 * t_cur
            x = x + dt * (v - 0.5 * diffusion * score)
            if i < len(grid) - 2:
                x = x + math.sqrt(diffusion * abs(dt)) * _noise_at(step_noise, i, x, generator)
        return Sampled(x.to(dtype), len(grid) - 1)

    def sample(self, model_fn: ModelFn, noise: torch.Tensor, *, sampler: str = "euler", steps: int = 25,
               grid: str = "flowar", cfg: float = 1.0, guidance_interval: tuple[float, float] = ALWAYS,
               step_noise: NoiseSource = None, generator: torch.Generator | None = None) -> Sampled:
        timesteps = time_grid(grid, steps, device="cpu")  # the solvers read it as Python floats: no device sync
        if sampler == "euler":
            return self.euler(model_fn, noise, timesteps, cfg=cfg, guidance_interval=guidance_interval)
        if sampler == "heun":
            return self.heun(model_fn, noise, timesteps, cfg=cfg, guidance_interval=guidance_interval)
        if sampler == "euler_maruyama":
            return self.euler_maruyama(model_fn, noise, timesteps, cfg=cfg, guidance_interval=guidance_interval,
                                       step_noise=step_noise, generator=generator)
        raise ValueError(f"flow sampler must be euler, heun or euler_maruyama, got {sampler!r}")

    def evaluations(self, *, sampler: str = "euler", steps: int = 25, grid: str = "flowar") -> int:
        """`model_fn` calls one `sample` makes, without running it."""
        intervals = len(time_grid(grid, steps)) - 1
        return 2 * intervals - 1 if sampler == "heun" else intervals


# --- DDPM -----------------------------------------------------------------------------------------------------------


def betas_for(schedule: str, num_steps: int) -> torch.Tensor:
    """β_t (float64, (num_steps,), on the CPU whatever the default device: a host table): `linear` in [1e-4, 0.02]
    (scaled to num_steps as in IDDPM, equal to diffusers' default at 1000) or `cosine` (IDDPM:
    ᾱ(s) = cos²((s + 0.008)/1.008·π/2), β ≤ 0.999)."""
    if schedule == "linear":
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64, device="cpu")
    if schedule == "cosine":
        s = torch.arange(num_steps + 1, dtype=torch.float64, device="cpu") / num_steps
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")


class GaussianDiffusion:
    """DDPM with ε-prediction over `num_train_timesteps` integer steps (see the module docstring)."""

    def __init__(self, *, num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> None:
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.betas = betas_for(beta_schedule, num_train_timesteps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # float64, ᾱ_t for t = 0 … T − 1
        self.alpha_bars: list[float] = self.alphas_cumprod.tolist()  # the samplers' host copy: no tensor reads
        self._tables: dict[torch.device, torch.Tensor] = {}  # ᾱ on each device it is used on

    def _alpha_bar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        # Index a copy of the table on the tensor's own device: no device-to-host sync in the training step.
        device = like.device
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self.alphas_cumprod.to(device)
        return table[torch.as_tensor(t, dtype=torch.long, device=device)]

    # training
    def sample_t(self, n: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """t ~ U{0, …, T − 1}, LongTensor (n,)."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        alpha_bar = _per_sample(self._alpha_bar(t, x0), x0)
        return (alpha_bar.sqrt() * x0.double() + (1 - alpha_bar).sqrt() * noise.double()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        return mse_loss(prediction, self.target(x0, noise), weight)

    def timestep_embedding_input(self, t: torch.Tensor) -> torch.Tensor:
        """The integer timestep itself, as a float for a sinusoidal embedding (DiT, MAR, ACDiT)."""
        return t.float()

    def inference_timesteps(self, steps: int, spacing: str, *, solver: str | None = None,
                            steps_offset: int = 0) -> list[int]:
        """Descending integer timesteps exactly as diffusers' `set_timesteps` picks them. The two schedulers space
        differently under the same names (T = num_train_timesteps):

        | spacing  | `solver="ddim"` (DDIMScheduler)        | `solver="dpm_solver"` (DPMSolverMultistepScheduler)      |
        |----------|----------------------------------------|----------------------------------------------------------|
        | leading  | k·(T // steps), k = steps−1 … 0        | k·(T // (steps + 1)), k = steps … 1 (T = 1000, 25 steps: |
        |          |                                        | 950, 912, …, 38: ACDiT's sampler, DPM-Solver built from  |
        |          |                                        | DDIMScheduler's config)                                  |
        | linspace | round(linspace(0, T − 1, steps))       | round(linspace(0, T − 1, steps + 1)) without the final 0 |
        | trailing | round(arange(T, 0, −T/steps)) − 1      | the same                                                 |

        `steps_offset` (a scheduler config entry: 0 in DDIMScheduler's default, 1 in Stable Diffusion's) is added
        to `leading` timesteps only, as diffusers does. Rounding is half-to-even, as numpy's. `solver=None` takes
        the scheduler whose default the spacing is: DDIM's `leading`, DPM-Solver's `linspace`."""
        T = self.num_train_timesteps
        if solver is None:
            solver = "dpm_solver" if spacing == "linspace" else "ddim"
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        most = T - 1 if solver == "dpm_solver" and spacing == "leading" else T
        if not 1 <= steps <= most:
            raise ValueError(f"need 1 <= steps <= {most} for {spacing} spacing, got {steps}")
        if spacing == "leading":
            ratio = T // steps if solver == "ddim" else T // (steps + 1)
            first = steps - 1 if solver == "ddim" else steps
            return [k * ratio + steps_offset for k in range(first, first - steps, -1)]
        # numpy, as diffusers: torch.linspace/arange round a few points the other way (e.g. 27 linspace steps)
        if spacing == "linspace":
            if solver == "ddim":
                return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64).tolist()
            return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64).tolist()
        return (np.arange(T, 0, -T / steps).round().astype(np.int64) - 1).tolist()

    # sampling
    def ddim(self, eps_fn: ModelFn, noise: torch.Tensor, steps: int, *, eta: float = 0.0, cfg: float = 1.0,
             guidance_interval: tuple[float, float] = ALWAYS, spacing: str = "leading", steps_offset: int = 0,
             step_noise: NoiseSource = None, generator: torch.Generator | None = None,
             state_dtype: torch.dtype = torch.float64) -> Sampled:
        """DDIM (diffusers' `DDIMScheduler.step`, ᾱ after the last step = 1, no clipping): x0̂ = (x − √(1−ᾱ)ε̂)/√ᾱ,
        x' = √ᾱ'·x0̂ + √(1 − ᾱ' − σ²)·ε̂ + σ·z, σ = η·√((1 − ᾱ')/(1 − ᾱ))·√(1 − ᾱ/ᾱ'). η = 1 is ancestral DDPM on
        the sub-sequence. `steps` evaluations; per-step noise z from `step_noise` or `generator` (η > 0 only)."""
        dtype, x = noise.dtype, noise.to(state_dtype)
        ts = self.inference_timesteps(steps, spacing, solver="ddim", steps_offset=steps_offset)
        for i, t in enumerate(ts):
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            a = self.alpha_bars[t]
            a_prev = self.alpha_bars[prev] if prev >= 0 else 1.0
            eps = guided(eps_fn, x.to(dtype), t, cfg=cfg, guidance_interval=guidance_interval).to(state_dtype)
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * _noise_at(step_noise, i, x, generator)
        return Sampled(x.to(dtype), len(ts))

    def dpm_solver_pp_2m(self, eps_fn: ModelFn, noise: torch.Tensor, steps: int, *, cfg: float = 1.0,
                         guidance_interval: tuple[float, float] = ALWAYS, spacing: str = "linspace",
                         steps_offset: int = 0, state_dtype: torch.dtype = torch.float64) -> Sampled:
        """DPM-Solver++(2M), data prediction, midpoint form (diffusers' `DPMSolverMultistepScheduler` defaults).

        With α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), λ = log(α/σ), x0̂ = (x − σ_s·ε̂)/α_s, h = λ_t − λ_s:
            first order   x_t = (σ_t/σ_s)·x − α_t·(e^{−h} − 1)·x0̂
            second order  … − ½·α_t·(e^{−h} − 1)·(x0̂ − x0̂_prev)/r,  r = (λ_s − λ_prev)/h
        First order on the first step and on the last, which goes to σ = 0 (x = x0̂). `steps` evaluations.
        Timesteps by DPMSolverMultistepScheduler's spacing rules (`inference_timesteps(solver="dpm_solver")`).
        """
        dtype, x = noise.dtype, noise.to(state_dtype)
        ts = self.inference_timesteps(steps, spacing, solver="dpm_solver", steps_offset=steps_offset)
        alphas = [math.sqrt(self.alpha_bars[t]) for t in ts] + [1.0]
        sigmas = [math.sqrt(1 - self.alpha_bars[t]) for t in ts] + [0.0]
        lambdas = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alphas, sigmas)]
        x0_prev: torch.Tensor | None = None
        for i, t in enumerate(ts):
            eps = guided(eps_fn, x.to(dtype), t, cfg=cfg, guidance_interval=guidance_interval).to(state_dtype)
            x0 = (x - sigmas[i] * eps) / alphas[i]
            if sigmas[i + 1] == 0:  # the final step to σ = 0 lands on the data prediction
                x = x0
            else:
                h = lambdas[i + 1] - lambdas[i]
                phi = math.expm1(-h)  # e^{−h} − 1
                x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * phi * x0
                if x0_prev is not None:
                    r = (lambdas[i] - lambdas[i - 1]) / h
                    x = x - 0.5 * alphas[i + 1] * phi * (x0 - x0_prev) / r
            x0_prev = x0
        return Sampled(x.to(dtype), len(ts))

    def sample(self, eps_fn: ModelFn, noise: torch.Tensor, *, sampler: str = "dpm_solver_pp_2m", steps: int = 25,
               eta: float = 0.0, cfg: float = 1.0, guidance_interval: tuple[float, float] = ALWAYS,
               step_noise: NoiseSource = None, generator: torch.Generator | None = None) -> Sampled:
        if sampler == "ddim":
            return self.ddim(eps_fn, noise, steps, eta=eta, cfg=cfg, guidance_interval=guidance_interval,
                             step_noise=step_noise, generator=generator)
        if sampler == "dpm_solver_pp_2m":
            return self.dpm_solver_pp_2m(eps_fn, noise, steps, cfg=cfg, guidance_interval=guidance_interval)
        raise ValueError(f"diffusion sampler must be ddim or dpm_solver_pp_2m, got {sampler!r}")

    def evaluations(self, *, sampler: str = "dpm_solver_pp_2m", steps: int = 25) -> int:
        return steps


# --- DDPM with learned variance (IDDPM / ADM; MAR's DiffLoss) ---------------------------------------------------------


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """IDDPM's respacing with one section (`timestep_respacing="100"`): `steps` of the timesteps 0 … T − 1 at the
    fractional stride (T − 1)/(steps − 1), each rounded (Python's round); 0 and T − 1 are always kept."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"need 1 <= sampling steps <= {num_timesteps}, got {steps}")
    stride = 1.0 if steps <= 1 else (num_timesteps - 1) / (steps - 1)
    return [round(k * stride) for k in range(steps)]


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """−log P(x) in nats of N(mean, exp(log_scale)²) integrated over the bin x ± 1/255, with the tails beyond ±0.999
    open (ADM's decoder term at t = 0, which MAR applies to latents unchanged)."""
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_probs = torch.where(x < -0.999, cdf_plus.clamp(min=1e-12).log(),
                            torch.where(x > 0.999, (1.0 - cdf_min).clamp(min=1e-12).log(),
                                        (cdf_plus - cdf_min).clamp(min=1e-12).log()))
    return -log_probs


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).pow(2) * torch.exp(-logvar2))


class LearnedVarianceDiffusion:
    """IDDPM's Gaussian diffusion with ε-prediction and a learned variance (`LEARNED_RANGE`), as MAR's DiffLoss.

    The network outputs 2·C channels per row: ε̂ and v ∈ [−1, 1]; the reverse variance is
    log σ² = ½(v + 1)·log β_t + (1 − ½(v + 1))·log β̃_t (β̃ the posterior variance, its t = 0 value replaced by
    t = 1's). Training loss per row: mean_C (ε − ε̂)² + L_vb, where L_vb is KL(q(x_{t−1}|x_t, x0) ‖ p(x_{t−1}|x_t))
    in bits (mean over C), or the discretised decoder NLL at t = 0, with the mean from a *detached* ε̂ (the VLB
    trains the variance only). `timesteps` keeps a subset of the T training steps (IDDPM's respacing): β's are
    recomputed from the kept ᾱ's and the network sees the original timestep numbers. Sampling is ancestral:
    x_{t−1} = μ + exp(½ log σ²)·z·τ (τ the temperature), no noise on the last step, no clipping.
    """

    def __init__(self, *, num_train_timesteps: int = 1000, beta_schedule: str = "cosine",
                 timesteps: Sequence[int] | None = None) -> None:
        base = torch.cumprod(1 - betas_for(beta_schedule, num_train_timesteps), dim=0).tolist()
        self.timestep_map = list(timesteps) if timesteps is not None else list(range(num_train_timesteps))
        betas, last = [], 1.0
        for t in self.timestep_map:
            betas.append(1 - base[t] / last)
            last = base[t]
        b = torch.tensor(betas, dtype=torch.float64)
        alpha_bar = torch.cumprod(1 - b, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        posterior_var = b * (1 - alpha_bar_prev) / (1 - alpha_bar)
        self.num_timesteps = len(betas)
        self.tables = {  # float64 host tables, indexed by the (respaced) step index
            "sqrt_alpha_bar": alpha_bar.sqrt(), "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            "sqrt_recip_alpha_bar": (1 / alpha_bar).sqrt(), "sqrt_recipm1_alpha_bar": (1 / alpha_bar - 1).sqrt(),
            "posterior_log_var": torch.cat([posterior_var[1:2], posterior_var[1:]]).log()
            if len(betas) > 1 else torch.zeros(1, dtype=torch.float64),
            "log_beta": b.log(),
            "coef_x0": b * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "coef_xt": (1 - alpha_bar_prev) * (1 - b).sqrt() / (1 - alpha_bar),
        }
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _at(self, name: str, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.device)
        if key not in self._on_device:
            self._on_device[key] = self.tables[name].to(like.device, torch.float32)
        return _per_sample(self._on_device[key][index], like)

    def model_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        """The original timestep numbers the network embeds, for step indices `index`."""
        return torch.tensor(self.timestep_map, device=index.device)[index]

    def sample_t(self, n: int, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Step indices ~ U{0, …, num_timesteps − 1}, LongTensor (n,)."""
        return torch.randint(0, self.num_timesteps, (n,), device=device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_alpha_bar", t, x0) * x0 + self._at("sqrt_one_minus_alpha_bar", t, x0) * noise

    def p_mean_log_var(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                       clip_denoised: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The reverse step's mean and log-variance from the network output (rows, 2C) at x_t (rows, C); with
        `clip_denoised` > 0 the x0 prediction is clamped to ±clip_denoised first (IDDPM's `clip_denoised`, at ±1
        for pixels; MAR never clips)."""
        eps, v = output.split(x_t.shape[-1], dim=-1)
        frac = (v + 1) / 2
        log_var = frac * self._at("log_beta", t, x_t) + (1 - frac) * self._at("posterior_log_var", t, x_t)
        x0 = self._at("sqrt_recip_alpha_bar", t, x_t) * x_t - self._at("sqrt_recipm1_alpha_bar", t, x_t) * eps
        if clip_denoised > 0:
            x0 = x0.clamp(-clip_denoised, clip_denoised)
        return self.posterior_mean(x0, x_t, t), log_var

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._at("coef_x0", t, x_t) * x0 + self._at("coef_xt", t, x_t) * x_t

    def loss_terms(self, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
                   t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mse, vb) per row (rows,): the ε-MSE and the variational term in bits (see the class docstring)."""
        channels = x0.shape[-1]
        mse = (noise - output[..., :channels]).pow(2).mean(dim=-1)
        frozen = torch.cat([output[..., :channels].detach(), output[..., channels:]], dim=-1)
        mean, log_var = self.p_mean_log_var(frozen, x_t, t)
        true_mean = self.posterior_mean(x0, x_t, t)
        kl = normal_kl(true_mean, self._at("posterior_log_var", t, x_t), mean, log_var).mean(dim=-1) / math.log(2.0)
        nll = discretized_gaussian_nll(x0, mean, 0.5 * log_var).mean(dim=-1) / math.log(2.0)
        return mse, torch.where(t == 0, nll, kl)

    def sample(self, model_fn: ModelFn, noise: torch.Tensor, *, cfg: float = 1.0, temperature: float = 1.0,
               clip_denoised: float = 0.0, step_noise: NoiseSource = None,
               generator: torch.Generator | None = None) -> Sampled:
        """Ancestral sampling over every kept step, from x = noise (rows, C). `model_fn(x, timesteps)` gets the
        original timestep numbers and returns (rows, 2C); with cfg ≠ 1 it gets [x; x] (2·rows) and returns
        [cond; uncond]: ε is guided, uncond + cfg·(cond − uncond), the variance is the conditional rows' (MAR).
        `clip_denoised` as in `p_mean_log_var`."""
        x, channels = noise, noise.shape[-1]
        for i, step in enumerate(reversed(range(self.num_timesteps))):
            index = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
            timesteps = torch.full_like(index, self.timestep_map[step])
            if cfg == 1.0:
                output = model_fn(x, timesteps)
            else:
                cond, uncond = model_fn(torch.cat([x, x]), torch.cat([timesteps, timesteps])).chunk(2)
                eps = uncond[..., :channels] + cfg * (cond[..., :channels] - uncond[..., :channels])
                output = torch.cat([eps, cond[..., channels:]], dim=-1)
            mean, log_var = self.p_mean_log_var(output.float(), x.float(), index, clip_denoised=clip_denoised)
            # drawn at t = 0 too and for both CFG halves, as MAR (its 2·rows chain): the same random stream
            z = _noise_at(step_noise, i, torch.cat([mean, mean]) if cfg != 1.0 else mean, generator)[: mean.shape[0]]
            x = (mean + torch.exp(0.5 * log_var) * z * temperature if step > 0 else mean).to(noise.dtype)
        return Sampled(x, self.num_timesteps)
