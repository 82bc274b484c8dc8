"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for stage 2, applied in `GeneratorTask.configure_model` under
Lightning's `ModelParallelStrategy` (`trainer=fsdp`).

The units sharded on their own are a generator's transformer blocks: the elements of its outermost `ModuleList`s
(every generator keeps its blocks in one). Each is all-gathered for its forward and backward and freed after,
so a rank holds one block's full weights at a time; with `activation_checkpointing` a block's activations are
recomputed in the backward instead of kept. The EMA copy is sharded by the same units, so its update stays a
shard-local lerp. The generator's `loss` is registered as a forward method: the pipeline trains through `loss`,
not `forward`, and its root parameters (embeddings, head) must be gathered for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ShardSettings:
    """`trainer.fsdp` of trainer=fsdp."""
    activation_checkpointing: bool = True
    param_dtype: str | None = None     # dtype of the gathered weights and of compute (None: the parameters' own)
    reduce_dtype: str | None = None    # dtype of the gradient reduce-scatter (None: param_dtype)
    state_dict: str = "sharded"        # checkpoints: sharded (a directory, one file per rank) | full (one file)


def block_lists(module: nn.Module) -> list[nn.ModuleList]:
    """The outermost ModuleLists of `module` (a ModuleList inside a block is part of that block)."""
    found: list[nn.ModuleList] = []
    inside: set[int] = set()
    for sub in module.modules():
        if id(sub) in inside:
            continue
        if isinstance(sub, nn.ModuleList):
            found.append(sub)
            inside.update(id(m) for m in sub.modules())
    return found


def shard_generator(generator: nn.Module, ema: nn.Module | None, mesh: DeviceMesh, settings: ShardSettings) -> int:
    """fully_shard each block, then the root, of the generator and of its EMA copy (None: no EMA); returns the
    blocks sharded."""
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[settings.param_dtype] if settings.param_dtype else None,
                                  reduce_dtype=DTYPES[settings.reduce_dtype] if settings.reduce_dtype else None)
    count = 0
    for blocks in block_lists(generator):
        for block in blocks:
            if settings.activation_checkpointing:
                checkpoint(block)  # by forward hooks: the module tree and parameter names stay as they are
            fully_shard(block, mesh=mesh, mp_policy=policy)
            count += 1
    fully_shard(generator, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(generator, "loss")
    if ema is None:
        return count
    for blocks in block_lists(ema):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(ema, mesh=mesh)
    return count


def unsharded(module: nn.Module, fresh: nn.Module) -> nn.Module:
    """`fresh`, an unsharded module built as `module` was, with `module`'s full weights gathered from its shards.
    A collective: every process calls it, and every process gets the full weights."""
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    fresh.load_state_dict({name: value.cpu() for name, value in state.items()})
    return fresh.requires_grad_(any(p.requires_grad for p in module.parameters()))
