"""ACDiT: arvision's generator against the official model, interleaved in one process on the same weights (CPU).

    python experiments/speed/official/acdit_ab.py --repo <ACDiT checkout> [--reps 8]

On a CPU shared with other jobs, two timings taken minutes apart (gpu_suite.py --cpu runs ours, then the official
harness) can differ by more than the models do. Here both run in one process, one step of each in turn: the official
`ACDiT` (dense-mask path, random weights) and `ACDiTGenerator` with the same weights through the import's name map;
a training step (forward on clean + noisy blocks, MSE, backward, AdamW) and a sampling call (3 DPM-Solver++ steps
per block, cfg 1.5), medians after the first. Size: width 384, depth 4, 6 heads of 64, a 16×16×4 latent in 4 blocks
of 64 tokens, batch 4; fp32, one thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "parity"))
import acdit as parity  # noqa: E402  (the parity harness builds the official model and ours)

SIZE = dict(dim=384, depth=4, heads=6, side=16, block=8, classes=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, type=Path, help="checkout of thunlp/ACDiT")
    parser.add_argument("--reps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    official = parity.Official(args.repo)
    torch.manual_seed(0)
    theirs = official.build(SIZE)
    parity.randomize_(theirs, seed=1)
    theirs.y_embedder.dropout_prob = 0.0
    ours = parity.ours_for(SIZE)
    ours.load_state_dict(parity.ACDiTCheckpoints().generator_names(ours).to_ours(theirs.state_dict())[0])
    n, k = ours.num_blocks, ours.block_size
    gen = torch.Generator().manual_seed(2)
    clean, noisy = torch.randn(4, n, k, 4, generator=gen), torch.randn(4, n, k, 4, generator=gen)
    t, labels = torch.randint(0, 1000, (4, n), generator=gen), torch.randint(0, 1000, (4,), generator=gen)
    models = {"official": theirs, "ours": ours}
    optimisers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, model in models.items()}
    train: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.reps):
        for name, model in models.items():
            start = time.perf_counter()
            loss = model(clean, noisy, t, labels).pow(2).mean()
            optimisers[name].zero_grad()
            loss.backward()
            optimisers[name].step()
            train[name].append(time.perf_counter() - start)
    sample: dict[str, list[float]] = {name: [] for name in models}
    theirs.eval(), ours.eval()
    with torch.no_grad():
        for _ in range(max(2, args.reps // 2)):
            start = time.perf_counter()
            theirs.sample(labels, official.scheduler(), 3, 1.5, (4, n, k, 4), generator=torch.Generator().manual_seed(0),
                          dtype=torch.float)
            sample["official"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ours.sample(labels, cfg=1.5, steps=3, generator=torch.Generator().manual_seed(0))
            sample["ours"].append(time.perf_counter() - start)
    for what, times in (("train step", train), ("sample", sample)):
        median = {name: statistics.median(values[1:]) for name, values in times.items()}
        print(f"{what}: official {median['official']:.3f} s, ours {median['ours']:.3f} s, "
              f"ours {median['official'] / median['ours']:.2f}× the official speed")


if __name__ == "__main__":
    main()
