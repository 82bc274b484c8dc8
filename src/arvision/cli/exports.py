"""arvision-export run=<imported run> out=<dir>: write the official checkpoint files of a run back.

    arvision-export run=outputs/import/runs/<time> out=official/     # e.g. vae_ch160v4096z32.pth and var_d16.pth

The files hold the same tensors under the official names and top-level layout as the imported ones (`arvision
.imports.runs.export_official`), so the official code loads them strictly.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from arvision.cli.common import config_dir, fail
from arvision.imports.runs import ImportError_, export_official
from arvision.results import ResultsError
from arvision.tokenizers.base import MissingExtra
from arvision.utils.files import UnreadableFile


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    if cfg.run is None or cfg.out is None:
        fail("give run=<run folder made by arvision-import> and out=<directory to write the official files into>")
    try:
        written = export_official(Path(cfg.run), Path(cfg.out))
    except (FileNotFoundError, ImportError_, MissingExtra, ResultsError, UnreadableFile) as err:
        fail(str(err))
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
