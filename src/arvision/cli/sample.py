"""arvision-sample run=<run dir> num_samples=N out=<file.npz>: export class-balanced samples (ADM npz layout).

    arvision-sample run=<run dir> num_samples=50000 out=samples.npz                  # the run's own sampling
    arvision-sample run=<run dir> num_samples=1000 +sample.cfg=1.5                   # one setting overridden
    arvision-sample run=<run dir> num_samples=50000 device=cuda:1                    # on a given GPU (auto: cuda if any)

Zero-shot editing of the run's test images (VAR's in-/out-painting, raster and next_scale generators):

    arvision-sample run=<run dir> edit=inpaint edit_mask=center num_samples=16     # regenerate the centre box
    arvision-sample run=<run dir> edit=outpaint num_samples=16                     # keep the centre, redo the border
    arvision-sample run=<run dir> edit=inpaint edit_mask=right +sample.cfg=1.0     # complete the right half

Samples and edits use the run's own `generator.sample` settings; `+sample.<key>=…` overrides one (the `+` adds
the key to the command's empty `sample` block), and a key the run's generator does not sample with is refused,
naming its settings. The first `num_samples` test images are encoded, their known tokens teacher-forced and the
rest sampled; their class labels condition the generator. What is written: `arvision.export`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from arvision.cli.common import config_dir, fail
from arvision.export import EditError, export
from arvision.pipeline import ConfigError
from arvision.results import ResultsError
from arvision.utils.device import DeviceError
from arvision.utils.files import UnreadableFile


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        exported = export(cfg)
    except (FileNotFoundError, EditError, ConfigError, ResultsError, UnreadableFile, DeviceError) as err:
        fail(str(err))
    print(exported.message)


if __name__ == "__main__":
    main()
