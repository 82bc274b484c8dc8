"""arvision-encode: the token store of a run's settings, written ahead of training (resumable, multi-process).

    arvision-encode data=imagenet tokenizer=vq                         # one process; rerun after a kill to resume
    arvision-encode data=imagenet tokenizer=vq rank=1 world=4          # one of four processes, each its shards
    torchrun --nproc_per_node 4 -m arvision.cli.encode data=imagenet   # four processes, ranks from torchrun

Rank 0 writes the index once every rank's shards exist; arvision-train with the same settings then reuses the
store. The work is `arvision.pipeline.encode_store`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from arvision import pipeline
from arvision.cli.common import config_dir, fail
from arvision.data import DatasetNotFound
from arvision.generators.base import IncompatibleTokenizer
from arvision.tokenizers.base import MissingExtra
from arvision.utils.files import UnreadableFile


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="encode")
def main(cfg: DictConfig) -> None:
    try:
        store = pipeline.encode_store(cfg)
    except (pipeline.ConfigError, DatasetNotFound, IncompatibleTokenizer, MissingExtra, UnreadableFile) as err:
        fail(str(err))
    if pipeline.world_rank() == 0:
        print(f"token store: {store.folder} ({len(store)} items, {len(store.index['shards'])} shards)")


if __name__ == "__main__":
    main()
