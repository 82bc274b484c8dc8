"""The compute, memory and data plan of each ImageNet recipe (docs/scaling.md), from measured and published figures.

    python experiments/scaling_plan/plan.py --out experiments/scaling_plan

Inputs, each with its source:
- the recipe itself (conf/experiment/imagenet/<recipe>.yaml, composed): global batch, steps, GPUs;
- FLOPs per training image: `arvision-bench` (PyTorch's FLOP counter on one training step of the recipe's model at
  batch 1, random weights; experiments/scaling_plan/flops.csv);
- training img/s on one H200: the official code's measured figures (experiments/speed/README.md) and MAR-B's
  (src/arvision/generators/README.md); the larger models of a family are scaled from its measured one by FLOPs per
  image (said so in the row);
- published GPU time where a paper or its issues state one.
Derived: H200-hours = images seen / img/s (linear scaling over GPUs: multi-node DDP usually loses 5-15 %, not measured
here); memory per GPU = model states + activations + logits (formulas in docs/scaling.md); the job's image rate =
per-GPU img/s × GPUs, which an on-the-fly JPEG pipeline must decode (experiments/data_pipeline/decode.csv gives
the rate of one core).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from hydra import compose, initialize_config_dir

from arvision.cli.common import config_dir

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# Parameters (M), tokens per image through the transformer, its depth and width, vocabulary (0: continuous tokens),
# EMA kept, bytes per activation value (2: bf16/fp16 autocast, 4: fp32/TF32 training).
MODELS = {
    "var_d16": (310.3, 680, 16, 1024, 4096, False, 2),
    "var_d20": (600.8, 680, 20, 1280, 4096, False, 2),
    "var_d24": (1030.0, 680, 24, 1536, 4096, False, 2),
    "var_d30": (2010.0, 680, 30, 1920, 4096, False, 2),
    "llamagen_gpt_b": (110.9, 256, 12, 768, 16384, False, 2),
    "llamagen_gpt_l": (342.9, 256, 24, 1024, 16384, False, 2),
    "llamagen_gpt_xl": (775.0, 256, 36, 1280, 16384, False, 2),
    "flowar_s": (171.7, 341, 12, 768, 0, True, 4),  # 6 + 6 blocks over 341 tokens; the 2-block head not counted
    "mar_b": (207.9, 420, 12, 768, 0, True, 2),  # encoder ~64 + 36 kept tokens, decoder 64 + 256, 12 blocks each
    "acdit_b": (130.3, 2048, 12, 768, 0, True, 2),  # 1024 clean + 1024 noisy tokens
}
# Training img/s on one H200 (bf16 unless said), and where the figure comes from.
MEASURED = {  # official code: experiments/speed/README.md; arvision's MAR-B: src/arvision/generators/README.md
    "var_d16": (210, "official code, bf16"),
    "llamagen_gpt_b": (971, "official code, bf16"),
    "llamagen_gpt_l": (379, "official code, bf16"),
    "flowar_s": (250, "official code, TF32"),
    "mar_b": (294, "arvision, bf16, batch 64"),
    "acdit_b": (107, "official code, bf16"),
}
SCALED_FROM = {"var_d20": "var_d16", "var_d24": "var_d16", "var_d30": "var_d16", "llamagen_gpt_xl": "llamagen_gpt_l"}
PUBLISHED = {"var_d16": "2.5 days on 16 A100 = 960 A100-h (FoundationVision/VAR#26)"}


def recipe(name: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment=imagenet/{name}", "data.root=/data"])


def flops_per_image() -> dict[str, float]:
    with open(HERE / "flops.csv") as handle:
        return {row["recipe"]: float(row["gflops_per_img"]) for row in csv.DictReader(handle)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="folder for compute.csv and memory_data.csv")
    args = parser.parse_args()
    flops = flops_per_image()
    compute, memory = [], []
    for name, (params, tokens, depth, width, vocab, ema, act_bytes) in MODELS.items():
        cfg = recipe(name)
        paper, train = cfg.recipe, cfg.generator.train
        images = train.max_steps * train.batch_size
        gflops = flops[name] if name in flops else flops[SCALED_FROM[name]] * params / MODELS[SCALED_FROM[name]][0]
        if name in MEASURED:
            rate, source = MEASURED[name]
        else:
            base = SCALED_FROM[name]
            rate = MEASURED[base][0] * flops[base] / gflops
            source = f"scaled from {base} by FLOPs (not measured)"
        per_gpu = train.batch_size // paper.gpus
        states = (16 + (4 if ema else 0)) * params * 1e6  # fp32 weights, grads, Adam m and v (+ EMA copy)
        activations = 17 * act_bytes * tokens * depth * per_gpu * width  # Korthikanti et al. 2022, no scores
        logits = 12 * per_gpu * tokens * vocab  # fp32 logits, their softmax and its gradient
        h200_hours = images / rate / 3600
        compute.append({
            "recipe": name, "params_m": params, "global_batch": train.batch_size, "gpus": paper.gpus,
            "steps": train.max_steps, "images_seen_m": round(images / 1e6, 1), "gflops_per_img": round(gflops, 1),
            "h200_img_per_s": round(rate, 1), "img_per_s": source, "h200_hours": round(h200_hours),
            "days_on_recipe_gpus": round(h200_hours / paper.gpus / 24, 1),
            "mfu_h200_bf16": round(gflops * 1e9 * rate / 989e12, 2), "published": PUBLISHED.get(name, ""),
        })
        memory.append({
            "recipe": name, "per_gpu_batch": per_gpu, "states_gb": round(states / 1e9, 1),
            "activations_gb": round(activations / 1e9, 1), "logits_gb": round(logits / 1e9, 1),
            "per_gpu_gb": round((states + activations + logits) / 1e9, 1),
            "job_img_per_s": round(rate * paper.gpus), "decode_cores_needed": round(rate * paper.gpus / DECODE_RATE),
        })
    args.out.mkdir(parents=True, exist_ok=True)
    for rows, name in ((compute, "compute.csv"), (memory, "memory_data.csv")):
        with open(args.out / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


# One core's JPEG decode + ADM crop to 256 px (experiments/data_pipeline/decode.csv, center_adm).
with open(REPO / "experiments" / "data_pipeline" / "decode.csv") as _handle:
    DECODE_RATE = float(next(csv.DictReader(_handle))["img_per_s_per_core"])

if __name__ == "__main__":
    main()
