"""The published numbers and sampling settings of every official preset (conf/official/), as a CSV.

    python experiments/reproduce/published.py            # rewrite experiments/reproduce/published.csv

Each row is what `arvision-import official=<preset>` records in the run's results.json (`imported.published`) and the
sampling settings the imported run uses (`generator.sample`); the README beside this script renders the CSV, and a
test checks that the CSV is what the presets say.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
CSV = Path(__file__).resolve().parent / "published.csv"
COLUMNS = ["preset", "files", "px", "sample", "FID", "IS", "source", "paper FID", "paper IS", "paper source"]


def _number(value) -> str:
    return "" if value is None else f"{value:g}"


def rows() -> list[dict[str, str]]:
    out = []
    for path in sorted((REPO / "conf" / "official").glob("*.yaml")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="import", overrides=[f"official={path.stem}"])
        official = OmegaConf.to_container(cfg.official, resolve=True)
        if official["files"].get("generator") is None:  # a tokenizer alone (mar_kl16, sd_vae_*): no sampling row
            continue
        published, sample = official.get("published", {}), OmegaConf.to_container(cfg.generator.sample, resolve=True)
        paper = published.get("paper") or {}
        settings = " ".join(f"{k}={v}" for k, v in sample.items() if v is not None and k in
                            ("cfg", "top_k", "top_p", "temperature", "cfg_interval", "more_smooth", "schedule",
                             "guidance_high"))
        out.append({"preset": path.stem, "files": " + ".join(official["files"].values()),
                    "px": str(cfg.data.image_size), "sample": settings, "FID": _number(published.get("fid")),
                    "IS": _number(published.get("is")), "source": published.get("source") or "",
                    "paper FID": _number(paper.get("fid")), "paper IS": _number(paper.get("is")),
                    "paper source": paper.get("source") or ""})
    return out


def main() -> None:
    with open(CSV, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows())
    print(f"wrote {CSV}", file=sys.stderr)


if __name__ == "__main__":
    main()
