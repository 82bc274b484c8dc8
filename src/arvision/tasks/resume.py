"""What both stages need to resume bit-for-bit: the RNG state and the number of completed steps.

The step sampler (`arvision.data.tokens.StepSampler`) makes batch `s` a pure function of (seed, s), so a run
resumed at step k is handed the batches k, k+1, … that an uninterrupted run would have seen. Checkpoints are
`step=N.ckpt` (the two newest) with `last.ckpt` linking to the newest; `latest_checkpoint` finds where to resume
and `roll_back` drops the checkpoints a divergence made.

Checkpoints resume on any number of processes: the global batch of a step is fixed and cut into per-rank slices
by the sampler, so only the weights and optimiser state must fit the new layout. A full checkpoint (one file:
single process, DDP, trainer=fsdp with state_dict=full) loads into any strategy, FSDP re-sharding it on load; a
sharded one (a directory of per-rank files and `meta.pt`, trainer=fsdp) re-shards on load under FSDP at any world
size, and `full_checkpoint` gathers it into one file for a single process or DDP.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from arvision.utils.files import load_weights


class ResumableTask(L.LightningModule):
    def completed_steps(self) -> int:
        return self.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()  # dropout / label dropout continue identically
        checkpoint["completed_steps"] = self.completed_steps()
        for index, state in enumerate(checkpoint.get("optimizer_states", [])):
            self._name_optimizer_state(state, index)

    def _name_optimizer_state(self, state: dict, index: int) -> None:
        """Key a full optimiser state by parameter name instead of number, as sharded ones are: FSDP loads a full
        checkpoint by names (Lightning numbers parameters in module order to name them, but a plain optimiser numbers
        them in its parameter groups' order), and a plain optimiser loads named states by their groups' order."""
        if not state.get("state") or not isinstance(next(iter(state["state"])), int):
            return  # nothing saved (yet, or by this rank: a full FSDP state is rank 0's), or already named
        if isinstance(self.trainer.strategy, ModelParallelStrategy):  # trainer=fsdp, full: numbered in module order
            names = [name for name, _ in self.named_parameters()]
        else:
            name_of = {id(p): name for name, p in self.named_parameters()}
            groups = self.trainer.optimizers[index].param_groups
            names = [name_of[id(p)] for group in groups for p in group["params"]]
        state["state"] = {names[i]: value for i, value in state["state"].items()}
        state["param_groups"] = [{**group, "params": [names[i] for i in group["params"]]}
                                 for group in state["param_groups"]]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])


# The file of a sharded checkpoint that holds everything but the weights and optimiser states (Lightning's name)
SHARDED_META = "meta.pt"


def completed_steps(ckpt_path: str | Path) -> int:
    path = Path(ckpt_path)
    checkpoint = load_weights(path / SHARDED_META if path.is_dir() else path, mmap=True)
    return int(checkpoint.get("completed_steps", checkpoint["global_step"]))


def full_checkpoint(sharded: Path, out: Path) -> Path:
    """Gather a sharded checkpoint directory into one Lightning checkpoint file at `out` (in this process)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out.parent.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(sharded, out)
    checkpoint = load_weights(out)
    checkpoint.update(load_weights(sharded / SHARDED_META))
    count = sum(1 for key in checkpoint if re.fullmatch(r"optimizer_\d+", key))
    checkpoint["optimizer_states"] = [checkpoint.pop(f"optimizer_{i}") for i in range(count)]  # keyed by name
    torch.save(checkpoint, out)
    return out


def _step_of(path: Path) -> int:
    return int(path.stem.removeprefix("step="))


def latest_checkpoint(ckpt_dir: Path) -> Path:
    """last.ckpt, or the newest step=N.ckpt when it is missing: a kill between Lightning removing the old link and
    making the new one must not lose the run."""
    last = ckpt_dir / "last.ckpt"
    steps = sorted(ckpt_dir.glob("step=*.ckpt"), key=_step_of)
    return last if last.exists() or not steps else steps[-1]


def roll_back(ckpt_dir: Path, bad_step: int) -> str:
    """After a non-finite loss at trainer step `bad_step` (computed with the weights saved at that step, if any):
    drop the checkpoints from that step on and point last.ckpt at the newest one before it; says what is kept."""
    kept = None
    for path in sorted(ckpt_dir.glob("step=*.ckpt"), key=_step_of):
        if _step_of(path) >= bad_step:
            if path.is_dir():  # a sharded checkpoint
                shutil.rmtree(path)
            else:
                path.unlink()
        else:
            kept = path
    last = ckpt_dir / "last.ckpt"
    if kept is None:
        last.unlink(missing_ok=True)
        return "no checkpoint from before it is kept, so a rerun starts from scratch"
    tmp = ckpt_dir / ".last.ckpt.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(kept.name)
    os.replace(tmp, last)  # atomic: last.ckpt is the old link or the new one, never missing
    return f"{last} now links to {kept.name}, the last checkpoint before the divergence"
