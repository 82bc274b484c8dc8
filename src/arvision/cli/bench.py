"""arvision-bench [tokenizer=… generator=… | bench_preset=…]: training and sampling speed on this device.

Random weights and random tokens, so nothing is trained or read: the numbers are the model's cost alone.

    arvision-bench generator=next_scale tokenizer=msvq                # the CPU demo sizes
    arvision-bench bench_preset=var_d16 device=cuda:1                 # VAR-d16 on the second GPU
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from arvision import bench
from arvision.cli.common import config_dir, fail, print_table
from arvision.generators.base import IncompatibleTokenizer
from arvision.tokenizers.base import MissingExtra


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")
def main(cfg: DictConfig) -> dict[str, Any]:
    try:
        result = bench.run(cfg, out=Path(cfg.out))
    # ValueError: BenchError, DeviceError, or a model option the model refuses
    except (IncompatibleTokenizer, MissingExtra, ValueError) as err:
        fail(str(err))
    print_table(f"arvision-bench — {result['device']}", [bench.summary_row(result)])
    print(f"results: {cfg.out}")
    return result


if __name__ == "__main__":
    main()
