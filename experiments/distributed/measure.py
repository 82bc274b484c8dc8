"""Measure how far each process layout's weights are from one process on the same global batch, and how a run
resumed on another layout ends: writes experiments/distributed/differences.csv (README table).

    python experiments/distributed/measure.py                 # all layouts (about 15 minutes on 2 busy cores)
    python experiments/distributed/measure.py --only fsdp2_bf16   # these runs again (and what they compare to)

Every run is train_tiny.py: 6 AdamW steps of a tiny raster generator, global batch 16, checkpoints at steps 3
and 6. `max_abs_diff` is the largest absolute difference over all generator and EMA tensors against `against`.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import REPO, in_process, launch, max_diff, two_nodes  # noqa: E402

OUT = Path(__file__).resolve().parent / "differences.csv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="rerun these runs; the CSV's other rows stay")
    only = p.parse_args().only
    sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                         text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def timed(name: str, run, *args, **kwargs) -> Path:
            start = time.perf_counter()
            out = run(root / name, *args, **kwargs)
            timed.seconds[name] = time.perf_counter() - start
            return out
        timed.seconds = {}

        def ckpt(run: str) -> str:
            return str(root / run / "checkpoints" / "step=3.ckpt")

        layouts = [  # name, what, processes, how it was started, run, args, kwargs, against
            ("one", "1 process, batch 16", 1, "in process", in_process, (), {}, None),
            ("accumulate4", "1 process, 4 micro-batches of 4", 1, "in process", in_process, ("--accumulate", "4"),
             {}, "one"),
            ("ddp2", "DDP, 2 processes × 8", 2, "Lightning", launch, ("--devices", "2", "--strategy", "ddp"), {},
             "one"),
            ("ddp4", "DDP, 4 processes × 4", 4, "Lightning", launch, ("--devices", "4", "--strategy", "ddp"), {},
             "one"),
            ("ddp2_accumulate2", "DDP, 2 processes × 2 micro-batches of 4", 2, "Lightning", launch,
             ("--devices", "2", "--strategy", "ddp", "--accumulate", "2"), {}, "one"),
            ("fsdp2", "FSDP2, 2 processes × 8 (sharded checkpoints)", 2, "Lightning", launch,
             ("--devices", "2", "--strategy", "fsdp"), {}, "one"),
            ("fsdp4", "FSDP2, 4 processes × 4", 4, "Lightning", launch, ("--devices", "4", "--strategy", "fsdp"), {},
             "one"),
            ("fsdp2_bf16", "FSDP2, 2 processes × 8, bf16 weights and compute (fp32 reductions)", 2, "Lightning",
             launch, ("--devices", "2", "--strategy", "fsdp", "--param-dtype", "bfloat16"), {}, "one"),
            ("compile", "1 process, generator.train.compile", 1, "in process", in_process, ("--compile",), {},
             "one"),
            ("fsdp2_compile", "FSDP2, 2 processes × 8, compiled loss, no activation checkpointing", 2, "Lightning",
             launch, ("--devices", "2", "--strategy", "fsdp", "--compile", "--no-checkpointing"), {}, "one"),
            ("two_nodes", "DDP, 2 nodes × 1 process", 2, "torchrun c10d rendezvous", two_nodes, (),
             {"launcher": "torchrun"}, "one"),
            ("accumulate4_resumed", "accumulate4 resumed at step 3, same layout", 1, "in process", in_process,
             ("--accumulate", "4", "--resume", "@accumulate4"), {}, "accumulate4"),
            ("fsdp2_to_one", "fsdp2's sharded step 3 resumed by 1 process", 1, "in process", in_process,
             ("--resume", "@fsdp2"), {}, "fsdp2"),
            ("fsdp2_to_fsdp4", "fsdp2's sharded step 3 resumed by FSDP on 4", 4, "Lightning", launch,
             ("--devices", "4", "--strategy", "fsdp", "--resume", "@fsdp2"), {}, "fsdp2"),
            ("one_to_fsdp2", "one's full step 3 resumed by FSDP on 2", 2, "Lightning", launch,
             ("--devices", "2", "--strategy", "fsdp", "--resume", "@one"), {}, "one"),
            ("ddp4_to_one", "ddp4's step 3 resumed by 1 process", 1, "in process", in_process, ("--resume", "@ddp4"),
             {}, "ddp4"),
            ("two_nodes_resumed", "two_nodes' step 3 resumed on 2 nodes", 2, "Lightning env (NODE_RANK)", two_nodes,
             ("--resume", "@two_nodes"), {"launcher": "lightning"}, "two_nodes"),
        ]
        needed = set(only or [row[0] for row in layouts])
        for row in layouts[::-1]:  # what a needed run compares to or resumes from is needed (listed before it)
            if row[0] in needed:
                needed |= {row[7]} if row[7] else set()
                needed |= {a[1:] for a in row[5] if a.startswith("@")}
        for name, what, processes, how, run, args, kwargs, against in layouts:
            if name not in needed:
                continue
            args = tuple(ckpt(a[1:]) if a.startswith("@") else a for a in args)
            timed(name, run, *args, **kwargs)
            diff = max_diff(root / name, root / against) if against else 0.0
            rows.append({"run": name, "layout": what, "processes": processes, "started_by": how,
                         "against": against or "", "max_abs_diff": f"{diff:.3g}",
                         "seconds": f"{timed.seconds[name]:.1f}", "torch": torch.__version__.split("+")[0],
                         "lightning": lightning.__version__, "git_sha": sha})
            print(rows[-1], flush=True)
    if only:  # the CSV's other rows as they were, these in their places
        fresh = {row["run"]: row for row in rows if row["run"] in only}
        with open(OUT, newline="") as handle:
            rows = [fresh.get(row["run"], row) for row in csv.DictReader(handle)]
        rows += [row for name, row in fresh.items() if name not in {r["run"] for r in rows}]
    with open(OUT, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
