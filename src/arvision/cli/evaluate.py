"""arvision-eval: re-evaluate a finished run, or a samples .npz, with any metric set and sample count.

    arvision-eval run=<run dir> metrics.num_samples=50000 metrics.extractor=inception
    arvision-eval run=<run dir> select=[fid,test_loss] +sample.cfg=1.5 +sample.steps=12     # any subset, any sampling
    arvision-eval npz=<samples.npz> data=fashion_mnist                                      # ADM-layout samples
    arvision-eval run=<run dir> npz=<run dir>/samples_50000.npz                            # a run's exported samples

`+sample.<key>=…` overrides one of the run's own `generator.sample` settings (the `+` adds the key to the
command's empty `sample` block); a key the run's generator does not sample with is refused, naming its settings.
`select` picks among fid, is, kid, precision, recall, accuracy, sfid, sampling, test_loss (null: all that apply).
Each evaluation is appended to `evaluations` in the run's results.json (or in results.json next to the .npz)
with its provenance. What each metric is: `arvision.reevaluate`.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from arvision.cli.common import config_dir, fail, print_table
from arvision.data import DatasetNotFound
from arvision.metrics import MissingWeights
from arvision.pipeline import ConfigError
from arvision.reevaluate import EvalError, inception_hint, reevaluate, summary_row
from arvision.results import ResultsError
from arvision.utils.device import DeviceError
from arvision.utils.files import UnreadableFile


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        entry = reevaluate(cfg)
    except MissingWeights as err:
        fail(inception_hint(err))
    except (FileNotFoundError, DatasetNotFound, EvalError, ConfigError, DeviceError, ResultsError,
            UnreadableFile) as err:
        fail(str(err))
    print_table(f"arvision-eval {cfg.run or cfg.npz} ({entry['device']['type']})", [summary_row(entry)])
    print(f"appended to {entry['results_file']}: " + json.dumps({"select": entry["settings"]["select"],
                                                                  "device": entry["device"]}))


if __name__ == "__main__":
    main()
