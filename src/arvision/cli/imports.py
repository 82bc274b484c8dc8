"""arvision-import official=<preset> tokenizer_file=<file> generator_file=<file>: official checkpoints → a run folder.

    arvision-import official=var_d16 tokenizer_file=vae_ch160v4096z32.pth generator_file=var_d16.pth
    arvision-import official=llamagen_c2i_l_384 tokenizer_file=vq_ds16_c2i.pt generator_file=c2i_L_384.pt
    arvision-import official=var_d16 ... hydra.run.dir=runs/var_d16           # choose the run folder
    arvision-import official=sd_vae_ft_ema tokenizer_file=<vae folder>        # a tokenizer alone (no generator)

The presets are conf/official/*.yaml; what is written: `arvision.imports.runs`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from arvision.cli.common import config_dir, fail
from arvision.imports.base import CheckpointMismatch
from arvision.imports.runs import ImportError_, import_official
from arvision.pipeline import ConfigError
from arvision.tokenizers.base import MissingExtra
from arvision.utils.files import UnreadableFile


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="import")
def main(cfg: DictConfig) -> None:
    try:
        imported = import_official(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (FileNotFoundError, ImportError_, CheckpointMismatch, ConfigError, MissingExtra, UnreadableFile) as err:
        fail(str(err))
    print(imported.message)


if __name__ == "__main__":
    main()
