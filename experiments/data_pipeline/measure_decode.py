"""JPEG decode + the papers' pre-processing, images per second on one CPU core (docs/scaling.md's decode rate).

    python experiments/data_pipeline/measure_decode.py --out experiments/data_pipeline/decode.csv

Synthetic photographs at ImageNet's typical size (500×375, JPEG quality 90, blurred random fields: ~35 KB, smaller
than ImageNet's ~110 KB average; decoding time follows the pixel count more than the bytes), decoded by PIL and
cropped to 256 px by `PaperCrop` as `ImageFolderDataset` and `ShardedImages` do, one thread, after a warm-up pass.
On a shared machine the rate is a lower bound.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from arvision.data.datasets import PaperCrop, image_to_tensor


def photographs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    files = []
    for _ in range(n):
        noise = Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        noise.filter(ImageFilter.GaussianBlur(2.0)).save(buffer, format="JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def rate(files: list[bytes], crop: PaperCrop) -> float:
    start = time.perf_counter()
    for i, data in enumerate(files):
        with Image.open(io.BytesIO(data)) as file:
            image_to_tensor(crop(file.convert("RGB"), i), 3)
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    files = photographs(args.images)
    rows = []
    for name, crop in (("center_adm", PaperCrop(image_size=256)),
                       ("random 1.125 + flip", PaperCrop(image_size=256, crop="random", crop_range=1.125, flip=True))):
        rate(files[:20], crop)  # warm-up
        rows.append({"pre_processing": name, "image_size": 256, "source": "500×375 JPEG q90",
                     "mean_file_kb": round(sum(map(len, files)) / len(files) / 1024, 1),
                     "img_per_s_per_core": round(rate(files, crop), 1), "images": len(files),
                     "cpu": os.uname().machine})
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(rows)


if __name__ == "__main__":
    main()
