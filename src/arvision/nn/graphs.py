"""What the fixed-shape sampling steps of raster, next-scale and FlowAR share: static KV caches held per model
across sampling runs (their addresses stay fixed, so a CUDA graph can replay over them), and the compiled step
(a CUDA graph on CUDA)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from arvision.nn.attention import StaticKVCache

# Per model, the static caches of its latest sampling shape: outside the module, so deepcopy (EMA), pickling and
# state_dict never see them.
_HELD_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILED: dict[tuple[Callable, str], Callable] = {}  # one torch.compile per (function, mode); guards pick the graph


@torch.inference_mode()
def held_static_caches(owner: object, *, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int,
                       weight_dtype: torch.dtype, device: torch.device) -> list[StaticKVCache]:
    """`layers` static caches for `owner`'s sampling runs, in the dtype attention computes in (the autocast dtype if
    on, else the weights'): the previous call's when the shape matches (zero-filled again), otherwise fresh ones
    that replace them. Inference tensors, like everything `sample` makes."""
    autocast = torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else weight_dtype
    key = (layers, rows, kv_heads, max_len, head_dim, str(device), dtype)
    held = _HELD_CACHES.get(owner)
    if held is not None and held[0] == key:
        for cache in held[1]:
            cache.reset()
        return held[1]
    caches = [StaticKVCache(rows, kv_heads, max_len, head_dim, dtype=dtype, device=device) for _ in range(layers)]
    _HELD_CACHES[owner] = (key, caches)
    return caches


def compiled_step(fn: Callable[..., torch.Tensor], device: torch.device, *, graphs: int = 0,
                  copy_output: bool = False) -> Callable[..., torch.Tensor]:
    """`fn` under torch.compile (fullgraph, static shapes): on CUDA `mode="reduce-overhead"`, a CUDA-graph replay,
    elsewhere inductor's default. Each call begins a new CUDA-graph step, since the caller has consumed the previous
    outputs and a replay may overwrite them; `copy_output` returns a copy for callers that keep one (Heun). `graphs`:
    the number of input shapes to compile (one graph each) before Dynamo's recompile limit falls back to eager."""
    cuda = device.type == "cuda"
    mode = "reduce-overhead" if cuda else "default"
    if (fn, mode) not in _COMPILED:
        _COMPILED[fn, mode] = torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
    compiled = _COMPILED[fn, mode]
    limit = max(torch._dynamo.config.recompile_limit, graphs)

    def step(*args: Any, **kwargs: Any) -> torch.Tensor:
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(recompile_limit=limit):
            out = compiled(*args, **kwargs)
        return out.clone() if cuda and copy_output else out
    return step
