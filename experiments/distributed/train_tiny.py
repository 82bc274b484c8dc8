"""Stage 2 of a tiny raster generator on a synthetic token set, through arvision's trainer (`pipeline.make_trainer`,
`pipeline.fit`), `GeneratorTask` and step sampler, on any process layout: the multi-process proofs of
tests/test_distributed.py and `measure.py` run it.

    python experiments/distributed/train_tiny.py OUT                            # one process
    python experiments/distributed/train_tiny.py OUT --devices 2 --strategy ddp  # Lightning starts the second rank
    python experiments/distributed/train_tiny.py OUT --devices 2 --strategy fsdp # FSDP2 (gloo on CPU)
    python experiments/distributed/train_tiny.py OUT --accumulate 4             # 4 micro-batches per step
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29500 \
        experiments/distributed/train_tiny.py OUT --num-nodes 2                # on each of two "nodes"

Rank 0 writes OUT/weights.pt (the generator's and the EMA's full weights, gathered when sharded) and OUT/run.json
(steps and seconds); checkpoints go to OUT/checkpoints (`--resume` a step=N.ckpt of any run to continue it).
Dropout and class dropout are off, so nothing in the loss is random and layouts can be compared weight for weight
(`max_diff`). `launch` and `two_nodes` start the multi-process layouts from Python (tests, measure.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from arvision import pipeline
from arvision.data.tokens import TokenDataset, step_loader
from arvision.generators.raster import RasterGenerator
from arvision.tasks import GeneratorTask
from arvision.tasks.sharding import unsharded
from arvision.tokenizers.base import TokenSpec

SPEC = TokenSpec(name="vq", kind="discrete", layout="grid", grid=(4, 4), dim=8, vocab_size=16)
NUM_CLASSES = 4
ITEMS = 256


def token_set(seed: int = 0) -> TokenDataset:
    """Class-dependent synthetic tokens (each class prefers a quarter of the vocabulary), so the loss falls."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ITEMS) % NUM_CLASSES
    tokens = (labels[:, None, None] * 4 + torch.randint(0, 6, (ITEMS, *SPEC.grid), generator=g)) % SPEC.vocab_size
    return TokenDataset(tokens.to(torch.int16), labels)


def build(seed: int) -> RasterGenerator:
    torch.manual_seed(seed)
    return RasterGenerator(spec=SPEC, num_classes=NUM_CLASSES, dim=32, depth=2, heads=2, token_dropout=0.0,
                           resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0)


def config(args: argparse.Namespace):
    precision = "bf16-mixed" if args.param_dtype else "32-true"  # bf16 weights go with autocast (check_trainer)
    trainer = {"accelerator": "cpu", "devices": args.devices, "num_nodes": args.num_nodes, "strategy": args.strategy,
               "precision": precision, "accumulate_grad_batches": args.accumulate, "log_every_n_steps": 1,
               "enable_progress_bar": False, "deterministic": False}
    if args.strategy == "fsdp":
        trainer["fsdp"] = {"activation_checkpointing": args.checkpointing, "param_dtype": args.param_dtype,
                           "reduce_dtype": "float32" if args.param_dtype else None, "state_dict": args.state_dict}
    return OmegaConf.create({"trainer": trainer, "checkpoint_every": args.ckpt_every})


def train(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    cfg = config(args)
    L.seed_everything(args.seed, workers=True)
    task = GeneratorTask(generator=build(args.seed), lr=3e-3, warmup_steps=2, max_steps=args.steps, ema_decay=0.9,
                         compile=args.compile, shard=pipeline.shard_settings(cfg))
    loader = step_loader(token_set(args.seed), batch_size=args.batch, num_steps=args.steps, seed=args.seed,
                         accumulate=args.accumulate)
    trainer = pipeline.make_trainer(cfg, max_steps=args.steps, ckpt_dir=out / "checkpoints", loggers=[],
                                    callbacks=[], grad_clip=1.0)
    start = time.perf_counter()
    seconds, steps = pipeline.fit(trainer, task, loader, Path(args.resume) if args.resume else None)
    generator, ema = task.generator, task.ema.module
    if task.sharded:  # a collective: every rank takes part
        generator, ema = unsharded(generator, build(args.seed)), unsharded(ema, build(args.seed))
    if trainer.global_rank == 0:
        torch.save({"generator": generator.state_dict(), "ema": ema.state_dict()}, out / "weights.pt")
        (out / "run.json").write_text(json.dumps({"world": trainer.world_size, "steps_run": steps,
                                                  "fit_seconds": seconds, "seconds": time.perf_counter() - start}))
    return {"world": trainer.world_size, "steps_run": steps}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="auto | ddp | fsdp")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--batch", type=int, default=16, help="the global batch of a step")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--ckpt-every", type=int, default=3)
    p.add_argument("--state-dict", default="sharded", help="fsdp checkpoints: sharded | full")
    p.add_argument("--param-dtype", default=None, help="fsdp: the gathered weights' and compute dtype (bfloat16)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="fsdp: activation checkpointing of the blocks")
    p.add_argument("--compile", action="store_true", help="torch.compile the training loss")
    p.add_argument("--resume", default=None, help="a checkpoint to continue")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- running layouts
SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[2]


def weights(out: Path) -> dict[str, torch.Tensor]:
    blob = torch.load(Path(out) / "weights.pt", weights_only=True)
    return {f"{part}.{key}": value for part in ("generator", "ema") for key, value in blob[part].items()}


def max_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between two runs' weights (generator and EMA)."""
    wa, wb = weights(a), weights(b)
    if wa.keys() != wb.keys():
        raise ValueError(f"{a} and {b} hold different tensors")
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def in_process(out: Path, *args: str) -> Path:
    train(parse([str(out), *args]))
    return Path(out)


def child_env(**more: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **more}


def launch(out: Path, *args: str, timeout: int = 400) -> Path:
    """A run in a new process; Lightning starts its other ranks (--strategy ddp or fsdp with --devices N)."""
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), *args], env=child_env(), capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{out}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return Path(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(out: Path, *args: str, launcher: str, timeout: int = 400) -> Path:
    """One process on each of two "nodes" of this machine: two torchrun agents meeting at a c10d rendezvous
    (launcher="torchrun"), or two processes given Lightning's environment: MASTER_ADDR, MASTER_PORT, NODE_RANK."""
    port = free_port()
    run = [str(SCRIPT), str(out), "--num-nodes", "2", "--devices", "1", "--strategy", "ddp", *args]
    procs = []
    for node in range(2):
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", Path(out).name, *run]
            env = child_env()
        else:
            cmd = [sys.executable, *run]
            env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError(f"{out}: a node failed\n{outputs[0][-2000:]}\n{outputs[1][-2000:]}")
    return Path(out)


if __name__ == "__main__":
    train(parse())
