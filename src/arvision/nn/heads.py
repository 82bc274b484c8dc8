"""Per-token output heads: MAR's diffusion head (DiffLoss) and its cross-entropy counterpart.

Both map a backbone output z (rows, cond_dim) — one row per token to predict — to that token, with the same three
calls: `loss(target, z, mask)`, `sample(z, cfg=…, temperature=…, generator=…)` and `evaluations(...)` (head passes
per `sample` call). Under classifier-free guidance `sample` takes 2·rows conditions, [cond; uncond], and returns
the rows' tokens once.

`DiffusionHead` is MAR's `DiffLoss` (models/diffloss.py): `net` is `SimpleMLPAdaLN` — input_proj(x) through
`depth` residual blocks (LayerNorm → adaLN shift/scale from y → Linear-SiLU-Linear → gated residual), then a final
LayerNorm (no affine) with adaLN and a linear to 2·C channels (ε and the learned variance), where
y = TimestepEmbedder(t) + cond_embed(z). Every adaLN output and the final linear start at zero. Parameter names
are MAR's (`net.res_blocks.0.adaLN_modulation.1.weight`, …) so its checkpoints load key for key. The process is
`LearnedVarianceDiffusion` (cosine ᾱ, T = 1000 in training; respaced to `steps` at sampling).

`CrossEntropyHead` is the discrete counterpart (MAR's Table-1 "CrossEnt" rows, MaskGIT): LayerNorm → Linear to
`vocab_size` logits; CFG on the logits, temperature, a categorical draw; it also returns the log-probability of
each drawn token (MaskGIT's confidence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arvision.nn.blocks import TimestepEmbedder
from arvision.nn.processes import LearnedVarianceDiffusion, NoiseSource, space_timesteps


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """MAR's `ResBlock`: x + gate · MLP(modulate(LN(x), shift, scale)), (shift, scale, gate) from SiLU → Linear(y)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """DiT's final layer: LN (no affine) → adaLN (shift, scale) → Linear."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """MAR's denoiser: (x (rows, C), t (rows,), z (rows, cond_dim)) → (rows, out_channels)."""

    def __init__(self, *, in_channels: int, width: int, out_channels: int, cond_dim: int, depth: int) -> None:
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        zeroed = [block.adaLN_modulation[-1] for block in self.res_blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.time_embed(t) + self.cond_embed(z)
        x = self.input_proj(x)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class DiffusionHead(nn.Module):
    """MAR's DiffLoss: a per-token DDPM with learned variance, conditioned on z (see the module docstring)."""

    def __init__(self, *, channels: int, cond_dim: int, width: int = 1024, depth: int = 3,
                 num_train_timesteps: int = 1000, beta_schedule: str = "cosine") -> None:
        super().__init__()
        self.channels, self.num_train_timesteps, self.beta_schedule = channels, num_train_timesteps, beta_schedule
        self.net = SimpleMLPAdaLN(in_channels=channels, width=width, out_channels=2 * channels, cond_dim=cond_dim,
                                  depth=depth)
        self.train_diffusion = LearnedVarianceDiffusion(num_train_timesteps=num_train_timesteps,
                                                        beta_schedule=beta_schedule)
        self._respaced: dict[int, LearnedVarianceDiffusion] = {}

    def sampling_diffusion(self, steps: int) -> LearnedVarianceDiffusion:
        """The process respaced to `steps` kept timesteps (IDDPM's `timestep_respacing=str(steps)`)."""
        if steps not in self._respaced:
            self._respaced[steps] = LearnedVarianceDiffusion(
                num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                timesteps=space_timesteps(self.num_train_timesteps, steps))
        return self._respaced[steps]

    def terms(self, target: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mse, vb) per row for targets (rows, C) under conditions z (rows, cond_dim), one t and ε per row. The
        network runs under the ambient autocast, as MAR's (bf16 on GPU: MAR reports NaNs with fp16 only); noising
        and the loss terms in fp32."""
        target = target.float()
        t = self.train_diffusion.sample_t(target.shape[0], device=target.device)
        noise = torch.randn_like(target)
        x_t = self.train_diffusion.add_noise(target, noise, t)
        output = self.net(x_t, t.float(), z).float()
        with torch.autocast(device_type=target.device.type, enabled=False):
            return self.train_diffusion.loss_terms(output, target, x_t, noise, t)

    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over rows (mask-weighted: Σ mask·loss / Σ mask) of ε-MSE + VLB, MAR's `DiffLoss.forward`."""
        mse, vb = self.terms(target, z)
        loss = mse + vb
        if mask is None:
            return loss.mean()
        return (loss * mask).sum() / mask.sum()

    def sample(self, z: torch.Tensor, *, cfg: float = 1.0, temperature: float = 1.0, steps: int = 100,
               clip_denoised: float = 0.0, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, step_noise: NoiseSource = None) -> torch.Tensor:
        """Tokens (rows, C) for conditions z: (rows, cond_dim), or (2·rows) [cond; uncond] when cfg ≠ 1. Initial
        noise (shared by both halves) from `noise` or `generator`; `clip_denoised` > 0 clamps every x0 prediction
        to ±clip_denoised (`LearnedVarianceDiffusion.p_mean_log_var`)."""
        rows = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
        if noise is None:
            device = generator.device if generator is not None else z.device
            noise = torch.randn((rows, self.channels), generator=generator, device=device).to(z.device)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net(x, t.float(), z.to(x.dtype))

        diffusion = self.sampling_diffusion(steps)
        return diffusion.sample(model_fn, noise.float(), cfg=cfg, temperature=temperature,
                                clip_denoised=clip_denoised, step_noise=step_noise, generator=generator).sample

    def evaluations(self, *, steps: int = 100) -> int:
        return steps


class CrossEntropyHead(nn.Module):
    """Logits over a codebook from z: LayerNorm → Linear (see the module docstring)."""

    def __init__(self, *, vocab_size: int, cond_dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.norm = nn.LayerNorm(cond_dim, eps=1e-6)
        self.linear = nn.Linear(cond_dim, vocab_size)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(z)).float()

    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of targets (rows,) long, mask-weighted mean as the diffusion head's."""
        loss = F.cross_entropy(self.logits(z), target.long(), reduction="none")
        if mask is None:
            return loss.mean()
        return (loss * mask).sum() / mask.sum()

    def sample_with_log_prob(self, z: torch.Tensor, *, cfg: float = 1.0, temperature: float = 1.0,
                             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (rows,), log p(token) (rows,)) under the guided, tempered distribution."""
        logits = self.logits(z)
        if cfg != 1.0:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg * (cond - uncond)
        log_probs = F.log_softmax(logits / max(temperature, 1e-6), dim=-1)
        device = generator.device if generator is not None else z.device
        u = torch.rand(log_probs.shape, generator=generator, device=device).to(z.device)
        tokens = (log_probs - torch.log(-torch.log(u.clamp(1e-20, 1.0)))).argmax(dim=-1)  # Gumbel-max draw
        return tokens, log_probs.gather(-1, tokens[:, None])[:, 0]

    def sample(self, z: torch.Tensor, *, cfg: float = 1.0, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample_with_log_prob(z, cfg=cfg, temperature=temperature, generator=generator)[0]

    def evaluations(self, **_: int) -> int:
        """The logits are the backbone pass's output layer: no separate head pass."""
        return 0
