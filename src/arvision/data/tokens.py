"""Stage-2 inputs: the dataset pre-encoded by the frozen tokenizer, served in resumable, seeded batches."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

Tokens = Any  # a tensor, or a list of tensors (multi-scale), batch dimension first


def index_tokens(tokens: Tokens, idx: torch.Tensor) -> Tokens:
    if isinstance(tokens, (list, tuple)):
        return [t[idx] for t in tokens]
    return tokens[idx]


def cat_tokens(chunks: list[Tokens]) -> Tokens:
    if isinstance(chunks[0], (list, tuple)):
        return [torch.cat(parts) for parts in zip(*chunks)]
    return torch.cat(chunks)


def compact(tokens: Tokens, vocab_size: int | None) -> Tokens:
    """Store indices in the smallest integer type that holds the vocabulary (the cache is 4–8× smaller)."""
    if vocab_size is None:
        return tokens
    dtype = torch.int16 if vocab_size <= 2**15 else torch.int32
    if isinstance(tokens, (list, tuple)):
        return [t.to(dtype) for t in tokens]
    return tokens.to(dtype) if not tokens.is_floating_point() else tokens


def widen(tokens: Tokens) -> Tokens:
    if isinstance(tokens, (list, tuple)):
        return [widen(t) for t in tokens]
    return tokens if tokens.is_floating_point() else tokens.long()


class TokenDataset(Dataset):
    """Whole batches by index tensor: one gather per batch instead of one collate per sample."""

    def __init__(self, tokens: Tokens, labels: torch.Tensor) -> None:
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: torch.Tensor) -> tuple[Tokens, torch.Tensor]:
        return widen(index_tokens(self.tokens, idx)), self.labels[idx].long()


class StepSampler(Sampler[torch.Tensor]):
    """Yields the micro-batches of steps `start_step .. num_steps − 1` for this rank.

    `batch_size` is the global batch of one optimizer step: all ranks and all `accumulate` micro-batches together.
    Batch `s` is a pure function of (seed, s): epochs are seeded permutations of the dataset, and the global batch
    of step s is cut into world × accumulate equal micro-batches, rank r taking micro-batches r, r + world, … in
    its k accumulation passes. A run resumed at step k therefore sees exactly the batches an uninterrupted run
    would, on any number of processes (set `start_step` from the restored optimizer step).
    `with_steps` yields (step, indices) instead, for a dataset that also depends on the step (a token store's
    pre-encoded augmentations draw each item's view from it).
    """

    def __init__(self, num_items: int, *, batch_size: int, num_steps: int, seed: int = 0, accumulate: int = 1,
                 with_steps: bool = False) -> None:
        self.num_items, self.batch_size, self.num_steps, self.seed = num_items, batch_size, num_steps, seed
        self.accumulate, self.with_steps = accumulate, with_steps
        self.start_step = 0

    def _world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _epoch(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __len__(self) -> int:
        # The whole schedule in micro-batches, the steps already run included: on resumption Lightning restores the
        # epoch's batch counter to `start_step` × accumulate and ends the epoch when that counter reaches the
        # loader's length. A length of `num_steps − start_step` ended a run resumed before half-way too early.
        return self.num_steps * self.accumulate

    def __iter__(self):
        rank, world = self._world()
        pieces = world * self.accumulate
        if self.batch_size % pieces:
            raise ValueError(f"a global batch of {self.batch_size} does not split into {world} ranks × "
                             f"{self.accumulate} accumulated micro-batches")
        micro = self.batch_size // pieces
        per_epoch = self.num_items // self.batch_size
        if per_epoch == 0:
            raise ValueError(f"dataset of {self.num_items} items is smaller than one global batch ({self.batch_size})")
        cached_epoch, perm = -1, None
        for step in range(self.start_step, self.num_steps):
            epoch, pos = divmod(step, per_epoch)
            if epoch != cached_epoch:
                cached_epoch, perm = epoch, self._epoch(epoch)
            for k in range(self.accumulate):
                start = pos * self.batch_size + (k * world + rank) * micro
                batch = perm[start:start + micro]
                yield (step, batch) if self.with_steps else batch


def step_loader(dataset: Dataset, *, batch_size: int, num_steps: int, seed: int, num_workers: int = 0,
                accumulate: int = 1, with_steps: bool = False) -> DataLoader:
    """Seeded, resumable batches of `dataset` (indexed by a tensor of indices, a whole batch per call).

    `batch_size` is the global batch of an optimizer step; each rank is served its `accumulate` micro-batches of
    batch_size / (world × accumulate) per step (`StepSampler`).

    `num_workers` > 0 builds batches in that many worker processes (stage 1: decoding and padding images). The
    sampler stays in this process, so the batches and their order, and `start_step` on resumption, are the same
    for any number of workers. Stage 2 serves its token store with 0: one gather per batch from memory-mapped
    shards, which worker processes would only slow down by copying the batch between processes. `with_steps`
    indexes the dataset by (step, indices) (see `StepSampler`).
    """
    sampler = StepSampler(len(dataset), batch_size=batch_size, num_steps=num_steps, seed=seed,
                          accumulate=accumulate, with_steps=with_steps)
    # Its own generator: creating an iterator then draws its base seed from there, not from the global RNG
    # (which a resumed run has just restored and must leave untouched).
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed))


class ImageBatches(Dataset):
    """Adapts an image dataset (one sample per index) to index-tensor batches for `step_loader`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*(self.dataset[int(i)] for i in idx))
        return torch.stack(images), torch.as_tensor(labels, dtype=torch.long)
