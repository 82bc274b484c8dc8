"""Measurements of the sharded token store (experiments/store/README.md).

    python experiments/store/measure.py encode --items 100000 --out experiments/store/encode.csv
    python experiments/store/measure.py rss --sizes 10000 100000 400000 --out experiments/store/rss.csv
    python experiments/store/measure.py gather --sizes 10000 100000 400000 --out experiments/store/gather.csv
    python experiments/store/measure.py rate --out experiments/store/encode_rate.csv
    python experiments/store/measure.py imagenet --out experiments/store/imagenet.csv

`encode`: arvision-encode of a synthetic set (procedural shapes, 32 px, the demo's vq tokenizer after a short stage
1) into the store, uninterrupted; the same killed (SIGKILL) once half its shards exist and rerun; and by two
processes (rank=0/1 world=2). Every store file of the last two is compared byte for byte with the first.
`rss`: stage 2 (pipeline.train_generator, flowar on the demo vae's 4×8×8 latents) for a fixed number of steps on
synthetic stores of each size, from the store and from the same latents held in memory (the former tokens.pt).
`rate`: CPU encode throughput of the ImageNet-256 tokenizers (random weights, the official architectures).
`imagenet`: store size and encode time for ImageNet-1k's 1,281,167 training images, computed from the above.
Each measurement runs in its own process, one at a time.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGENET_TRAIN = 1_281_167
# Dense bf16 peak of one A100 (NVIDIA's datasheet), and the share of it a conv encoder reaches (an assumption).
A100_BF16_FLOPS = 312e12
GPU_EFFICIENCY = 0.3


def env_for(root: Path) -> dict[str, str]:
    return {**os.environ, "ARVISION_ROOT": str(root), "ARVISION_ARTIFACTS": str(root / "artifacts"),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


SHARD_ITEMS = 10_000


def encode_command(items: int, shard_items: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "arvision.cli.encode", "data=shapes", f"data.shapes_train_size={items}",
            "tokenizer=vq", "tokenizer.train.max_steps=20", "trainer.enable_progress_bar=false",
            f"shard_items={shard_items}", *extra]


def wait_child(proc: subprocess.Popen) -> tuple[int, float]:
    """Exit status and peak RSS (MB) of a child process."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def store_dir(root: Path) -> Path:
    stores = [p for p in (root / "artifacts" / "token_store").iterdir() if p.is_dir() and (p / "meta.json").exists()]
    assert len(stores) == 1, stores
    return stores[0]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "meta.json"}


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


def measure_encode(items: int, shard_items: int, work: Path) -> list[dict]:
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    # 1. Uninterrupted (stage 1 trains the tokenizer first; the encode's own time is in the store's meta.json).
    ref = work / "uninterrupted"
    ref.mkdir(parents=True)
    start = time.perf_counter()
    proc = subprocess.Popen(encode_command(items, shard_items), env=env_for(ref), cwd=ref, stdout=subprocess.DEVNULL)
    code, rss = wait_child(proc)
    assert code == 0, code
    ref_store = store_dir(ref)
    meta = json.loads((ref_store / "meta.json").read_text())
    rows.append({"run": "uninterrupted, 1 process", "items": items, "shards": meta["num_shards"],
                 "wall_s": round(time.perf_counter() - start, 1), "encode_s": round(meta["encode_seconds"], 1),
                 "img_per_s": round(items / meta["encode_seconds"]), "store_mb": round(size_mb(ref_store), 1),
                 "peak_rss_mb": round(rss), "identical": "reference"})
    reference = digests(ref_store)
    for name in ("killed", "two"):  # the same trained tokenizer artifact in each root
        shutil.copytree(ref / "artifacts" / "tokenizer", work / name / "artifacts" / "tokenizer")

    # 2. Killed once half the shards are complete, then rerun.
    root = work / "killed"
    start = time.perf_counter()
    proc = subprocess.Popen(encode_command(items, shard_items), env=env_for(root), cwd=root, stdout=subprocess.DEVNULL)
    half = meta["num_shards"] // 2
    while True:
        partial = list((root / "artifacts" / "token_store").glob("*.partial/0*.json"))
        if len(partial) >= half:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    code, rss = wait_child(proc)
    killed_at = time.perf_counter() - start
    complete = len(list((root / "artifacts" / "token_store").glob("*.partial/0*.json")))
    rows.append({"run": f"killed (SIGKILL) after {complete} shards", "items": items, "shards": complete,
                 "wall_s": round(killed_at, 1), "encode_s": "", "img_per_s": "", "store_mb": "",
                 "peak_rss_mb": round(rss), "identical": ""})
    start = time.perf_counter()
    proc = subprocess.Popen(encode_command(items, shard_items), env=env_for(root), cwd=root, stdout=subprocess.DEVNULL)
    code, rss = wait_child(proc)
    assert code == 0, code
    resumed = store_dir(root)
    meta = json.loads((resumed / "meta.json").read_text())
    rows.append({"run": "rerun after the kill", "items": items, "shards": meta["num_shards"] - complete,
                 "wall_s": round(time.perf_counter() - start, 1), "encode_s": round(meta["encode_seconds"], 1),
                 "img_per_s": "", "store_mb": round(size_mb(resumed), 1), "peak_rss_mb": round(rss),
                 "identical": digests(resumed) == reference})

    # 3. Two processes, each writing its own shards; rank 0 writes the index.
    root = work / "two"
    start = time.perf_counter()
    procs = [subprocess.Popen(encode_command(items, shard_items, f"rank={rank}", "world=2"), env=env_for(root),
                              cwd=root, stdout=subprocess.DEVNULL) for rank in (0, 1)]
    results = [wait_child(p) for p in procs]
    assert all(code == 0 for code, _ in results), results
    two = store_dir(root)
    meta = json.loads((two / "meta.json").read_text())
    rows.append({"run": "2 processes (rank=0/1 world=2)", "items": items, "shards": meta["num_shards"],
                 "wall_s": round(time.perf_counter() - start, 1), "encode_s": round(meta["encode_seconds"], 1),
                 "img_per_s": round(items / meta["encode_seconds"]), "store_mb": round(size_mb(two), 1),
                 "peak_rss_mb": round(max(r for _, r in results)), "identical": digests(two) == reference})
    return rows


# --------------------------------------------------------------------------------------------- rss
def proc_status() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def compose(overrides: list[str], root: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from arvision.cli.common import config_dir
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.output_dir = str(root / "run")
        cfg.paths.artifact_dir = str(root / "artifacts")
        cfg.paths.log_dir = str(root / "outputs")
    return cfg


RSS_OVERRIDES = ["paradigm=flowar", "logger=none", "callbacks=none", "trainer.enable_progress_bar=false",
                 "generator.train.warmup_steps=0"]


def make_synthetic_store(items: int, folder: Path) -> None:
    """Random latents of the demo vae's shape, written shard by shard (10k items at a time)."""
    import torch

    from arvision import pipeline
    from arvision.data.store import encode_shards, finish_store, make_plan

    cfg = compose(RSS_OVERRIDES, folder)
    tokenizer = pipeline.build_tokenizer(cfg, pipeline.build_datamodule(cfg))
    shape = tuple(tokenizer.encode(torch.zeros(1, 1, 32, 32)).shape[1:])
    plan = make_plan(items, batch_size=10_000)
    ids = torch.arange(items)
    latents = torch.utils.data.TensorDataset(ids, ids % 10)  # the "images" are item ids; encode draws latents

    def encode(batch: torch.Tensor) -> torch.Tensor:
        return torch.randn(len(batch), *shape)
    encode_shards(folder / "work", plan, latents, encode, vocab_size=None)
    (folder / "store").mkdir()
    finish_store(folder / "work", folder / "store", plan, {"synthetic": True})


def rss_one(items: int, mode: str, steps: int, work: Path) -> dict:
    import math

    from arvision import pipeline
    from arvision.data.store import TokenStore
    from arvision.data.tokens import TokenDataset

    folder, run_dir = work / f"store_{items}", work / f"run_{items}_{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resumed one
    cfg = compose([*RSS_OVERRIDES, f"generator.train.max_steps={steps}"], run_dir)
    tokenizer = pipeline.build_tokenizer(cfg, pipeline.build_datamodule(cfg))
    before = proc_status()
    store = TokenStore(folder / "store", seed=cfg.seed)
    tokens = store if mode == "store" else TokenDataset(*store.load())
    loaded = proc_status()
    start = time.perf_counter()
    stage2 = pipeline.train_generator(cfg, tokenizer, tokens, 10, run_dir)
    seconds = time.perf_counter() - start
    after = proc_status()
    assert stage2.steps == steps
    per_item = math.prod(store.index["arrays"]["tokens"]["shape"]) * 4  # fp32
    return {"items": items, "tokens_from": mode, "latents_mb": round(items * per_item / 1e6),
            "steps": steps, "batch": cfg.generator.train.batch_size, "train_s": round(seconds, 1),
            "rss_before_mb": round(before["VmRSS"]), "rss_loaded_mb": round(loaded["VmRSS"]),
            "peak_rss_mb": round(after["VmHWM"]), "anon_end_mb": round(after["RssAnon"]),
            "file_end_mb": round(after["RssFile"])}


def measure_rss(sizes: list[int], steps: int, work: Path) -> list[dict]:
    rows = []
    for items in sizes:
        if not (work / f"store_{items}" / "store" / "index.json").exists():
            subprocess.run([sys.executable, __file__, "make-store", "--items", str(items), "--work", str(work)],
                           check=True, env=env_for(work))
        for mode in ("store", "memory"):
            done = subprocess.run([sys.executable, __file__, "rss-one", "--items", str(items), "--mode", mode,
                                   "--steps", str(steps), "--work", str(work)], check=True, env=env_for(work),
                                  capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    return rows


def gather_one(items: int, batches: int, work: Path) -> list[dict]:
    """Milliseconds per batch of 64 random items: from the store (memory maps, pages released after each gather)
    and from the same latents in memory (`TokenDataset`)."""
    import torch

    from arvision.data.store import TokenStore
    from arvision.data.tokens import TokenDataset

    store = TokenStore(work / f"store_{items}" / "store")
    rows = []
    for mode, dataset in (("store", store), ("memory", TokenDataset(*store.load()))):
        generator = torch.Generator().manual_seed(0)
        batches_idx = [torch.randint(0, items, (64,), generator=generator) for _ in range(batches)]
        start = time.perf_counter()
        for idx in batches_idx:
            dataset[idx]
        rows.append({"items": items, "shards": len(store.index["shards"]), "tokens_from": mode,
                     "ms_per_batch_of_64": round((time.perf_counter() - start) / batches * 1e3, 3)})
    return rows


# --------------------------------------------------------------------------------------------- rate
# The ImageNet-256 tokenizers (arvision-import presets: the official architectures) and what a store keeps per image.
TOKENIZERS = {
    "vq (LlamaGen VQ-16)": ("llamagen_c2i_b_256", "16×16 int16 codes"),
    "msvq (VAR)": ("var_d16", "680 int16 codes (10 scales, 1²…16²)"),
    "kl16 (MAR)": ("mar_kl16", "16×16×16 latents"),
    "sd_vae (DiT/ACDiT)": ("sd_vae_ft_ema", "32×32×4 latents"),
}


def rate_one(official: str, batch: int, repeats: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from arvision.utils.instantiate import instantiate

    with_root = compose_import([f"official={official}"])
    tokenizer = instantiate(with_root.tokenizer.model, image_size=256, image_channels=3).eval()
    images = torch.rand(batch, 3, 256, 256) * 2 - 1
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = tokenizer.encode(images)  # warm-up
        parts = tokens if isinstance(tokens, (list, tuple)) else [tokens]
        per_image = [tuple(t.shape[1:]) for t in parts]
        start = time.perf_counter()
        for _ in range(repeats):
            tokenizer.encode(images)
        seconds = (time.perf_counter() - start) / repeats
        with FlopCounterMode(display=False) as counter:
            tokenizer.encode(images[:1])
    return {"official": official, "shapes": per_image, "cpu_img_per_s": batch / seconds,
            "gflops_per_img": counter.get_total_flops() / 1e9, "threads": torch.get_num_threads(),
            "batch": batch, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def compose_import(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from arvision.cli.common import config_dir
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="import", overrides=overrides)


def measure_rate(batch: int, repeats: int) -> list[dict]:
    rows = []
    for name, (official, stored) in TOKENIZERS.items():
        done = subprocess.run([sys.executable, __file__, "rate-one", "--official", official, "--batch", str(batch),
                               "--repeats", str(repeats)], check=True, env=env_for(Path("/tmp")),
                              capture_output=True, text=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"tokenizer": name, "preset": official, "stored": stored,
                     "encoder_output": " + ".join("×".join(map(str, s)) for s in row["shapes"][:3])
                     + (f" + … ({len(row['shapes'])} scales)" if len(row["shapes"]) > 3 else ""),
                     "cpu_img_per_s": round(row["cpu_img_per_s"], 2), "gflops_per_img": round(row["gflops_per_img"], 1),
                     "batch": batch, "threads": row["threads"], "peak_rss_mb": round(row["rss_mb"])})
        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------------------------- imagenet
# Bytes per image in the store: the token/latent values (int16 codes; latents fp16 or fp32) plus an int64 label.
PER_IMAGE = {
    "vq (LlamaGen VQ-16)": [("int16", 16 * 16 * 2)],
    "msvq (VAR)": [("int16", 680 * 2)],
    "kl16 (MAR)": [("fp16", 16 * 16 * 16 * 2), ("fp32", 16 * 16 * 16 * 4)],
    "sd_vae (DiT/ACDiT)": [("fp16", 32 * 32 * 4 * 2), ("fp32", 32 * 32 * 4 * 4)],
}
VIEWS = {"none": 1, "flip": 2, "ten_crop": 10}


def imagenet_table(rates: Path) -> list[dict]:
    measured = {row["tokenizer"]: row for row in csv.DictReader(rates.open())}
    rows = []
    for name, kinds in PER_IMAGE.items():
        rate = measured[name]
        cpu = float(rate["cpu_img_per_s"])
        gpu = A100_BF16_FLOPS * GPU_EFFICIENCY / (float(rate["gflops_per_img"]) * 1e9)
        for dtype, nbytes in kinds:
            per_image = nbytes + 8
            rows.append({
                "tokenizer": name, "stored": rate["stored"] if dtype == "int16" else f"{rate['stored']}, {dtype}",
                "bytes_per_view": per_image,
                "store_gb": round(per_image * IMAGENET_TRAIN / 1e9, 2),
                "store_gb_flip": round((nbytes * VIEWS["flip"] + 8) * IMAGENET_TRAIN / 1e9, 2),
                "store_gb_ten_crop": round((nbytes * VIEWS["ten_crop"] + 8) * IMAGENET_TRAIN / 1e9, 2),
                "cpu_img_per_s_1thread": cpu, "cpu_core_hours": round(IMAGENET_TRAIN / cpu / 3600),
                "gflops_per_img": rate["gflops_per_img"], "a100_img_per_s_est": round(gpu),
                "a100_minutes_est": round(IMAGENET_TRAIN / gpu / 60, 1)})
    return rows


def write_csv(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["encode", "rss", "gather", "rate", "imagenet", "make-store", "rss-one",
                                         "rate-one"])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--shard-items", type=int, default=SHARD_ITEMS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 400_000])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--mode", choices=["store", "memory"], default="store")
    parser.add_argument("--official", default="var_d16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rates", type=Path, default=REPO / "experiments/store/encode_rate.csv")
    parser.add_argument("--work", type=Path, default=Path("/tmp/arvision_store_measure"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.what == "encode":
        write_csv(measure_encode(args.items, args.shard_items, args.work / "encode"), args.out)
    elif args.what == "rss":
        write_csv(measure_rss(args.sizes, args.steps, args.work / "rss"), args.out)
    elif args.what == "gather":  # on the stores `rss` made
        write_csv([row for items in args.sizes for row in gather_one(items, 300, args.work / "rss")], args.out)
    elif args.what == "rate":
        write_csv(measure_rate(args.batch, args.repeats), args.out)
    elif args.what == "imagenet":
        write_csv(imagenet_table(args.rates), args.out)
    elif args.what == "make-store":
        make_synthetic_store(args.items, args.work / f"store_{args.items}")
    elif args.what == "rss-one":
        print(json.dumps(rss_one(args.items, args.mode, args.steps, args.work)))
    else:
        print(json.dumps(rate_one(args.official, args.batch, args.repeats)))


if __name__ == "__main__":
    main()
