"""Token sampling and classifier-free guidance, shared by the discrete generators.

Two CFG conventions appear in the literature and their scales are not comparable:
    LlamaGen:  logits = uncond + s·(cond − uncond)                 s = 1 is unguided
    VAR:       logits = (1 + t)·cond − t·uncond,  t = s·k/(K − 1)  ramped over the K scales, t = 0 is unguided
The second is the first with weight 1 + t: `classifier_free_guidance(cond, uncond, 1 + linear_cfg_schedule(s, k, K))`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use sample_from_logits(temperature=0) for argmax), got {temperature}")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept), -inf elsewhere; k = 0 is off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest most-likely prefix whose probability mass is ≥ p (at least one token).

    p = 1 is off.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_p_filter_llamagen(logits: torch.Tensor, p: float) -> torch.Tensor:
    """LlamaGen's nucleus (generate.py's `top_k_top_p_filtering`, the Hugging Face rule): a token stays while the
    running sum of the more likely tokens' probabilities is ≤ p. It parts from `top_p_filter` only where that sum
    equals p in float32 (p = 0.9 is 0.89999998 there; 1 of 512 rows of GPT-B logits in experiments/parity/
    llamagen.py): this keeps the token, `top_p_filter` drops it. p = 1 is off."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    drop_sorted[..., 1:] = cumulative[..., :-1] > p  # the sum before each token, as LlamaGen shifts it
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_p_filter_rq(logits: torch.Tensor, p: float) -> torch.Tensor:
    """The RQ-Transformer's nucleus (rqvae/utils/utils.py `top_p_probs`): the probabilities are sorted and a token
    stays while the running sum of the more likely ones is < p, so a sum equal to p drops it (LlamaGen keeps it).
    p = 1 is off."""
    if p >= 1.0:
        return logits
    sorted_probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    drop_sorted[..., 1:] = cumulative[..., :-1] >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_p_filter_var(logits: torch.Tensor, p: float) -> torch.Tensor:
    """VAR's nucleus (models/helpers.py `sample_with_top_k_top_p_`, copied unchanged into FlexVAR): the
    probabilities are sorted in ascending order and a token is dropped where the running sum up to and including it
    is ≤ 1 − p; the most likely token always stays. The same rule as `top_p_filter` in exact arithmetic, summed from
    the other end in float32: they keep different sets in about 1 row in 1,000 of random logits over 8912 codes
    (432 of 408,000 rows; FlexVAR-d20/d24 in experiments/parity/flexvar.py), this one none. p = 1 is off."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_from_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None,
                       nucleus: Callable[[torch.Tensor, float], torch.Tensor] = top_p_filter) -> torch.Tensor:
    """Draw one token per row of logits (..., V) → LongTensor (...). Temperature, then top-k, then top-p
    (LlamaGen's order) with the `nucleus` filter; temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = nucleus(top_k_filter(apply_temperature(logits.float(), temperature), top_k), top_p)
    probs = logits.softmax(dim=-1)
    # torch.multinomial(probs, 1)'s own algorithm, argmax(p / q) with q ~ Exp(1) (the same draws from the same
    # generator, so the same tokens), without its two input checks that each read a device tensor on the host
    q = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / q).argmax(dim=-1)


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """LlamaGen's CFG: uncond + scale·(cond − uncond); scale 1 returns cond, 0 returns uncond."""
    return uncond + scale * (cond - uncond)


def linear_cfg_schedule(scale: float, step: int, num_steps: int) -> float:
    """VAR's ramp t = scale·k/(K − 1) for step k of K: 0 at the first scale, `scale` at the last.

    The guided logits are (1 + t)·cond − t·uncond. A single-step schedule gets the full `scale`.
    """
    if num_steps == 1:
        return scale
    return scale * step / (num_steps - 1)
