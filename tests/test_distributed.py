"""Multi-process training on CPU (gloo): DDP and FSDP2 on 1, 2 and 4 processes, two "nodes", gradient accumulation
and checkpoints that resume on another number of processes, each against one process on the same global batch.

The runs are experiments/distributed/train_tiny.py: a tiny raster generator on a synthetic token set through
arvision's trainer, task and sampler, with dropout off so that nothing in the loss is random. One process and
accumulation run in this process; the other layouts are real process groups started by Lightning or torchrun.
Splitting a batch changes only the order of fp32 sums, so weights agree to TOLERANCE (measured ≤ 2.0e-6 after
6 AdamW steps, experiments/distributed/README.md); a run resumed on the layout that saved it is bitwise equal.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from arvision import pipeline
from arvision.data.tokens import StepSampler
from tests.conftest import REPO, cli_env, compose_train

SCRIPT = REPO / "experiments" / "distributed" / "train_tiny.py"
_spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
train_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_tiny)

TOLERANCE = 1e-5  # max abs weight difference between layouts after 6 steps (measured ≤ 2.0e-6)


max_diff, in_process, launch, two_nodes = train_tiny.max_diff, train_tiny.in_process, train_tiny.launch, \
    train_tiny.two_nodes


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    return in_process(tmp_path_factory.mktemp("one") / "run")


# --------------------------------------------------------------------------------------------- the global batch
@pytest.mark.parametrize("world, accumulate", [(1, 1), (2, 1), (4, 1), (1, 4), (2, 2)])
def test_every_layout_reads_exactly_the_global_batch_of_each_step(world, accumulate, monkeypatch):
    """Ranks × micro-batches partition step s's global batch, the same one a single process reads, and resuming
    at step k yields the rest of the schedule."""
    single = list(StepSampler(40, batch_size=8, num_steps=7, seed=3))
    served = {}
    for rank in range(world):
        monkeypatch.setattr(StepSampler, "_world", lambda self, r=rank: (r, world))
        sampler = StepSampler(40, batch_size=8, num_steps=7, seed=3, accumulate=accumulate)
        served[rank] = list(sampler)
        assert len(sampler) == 7 * accumulate and all(len(b) == 8 // (world * accumulate) for b in served[rank])
        sampler.start_step = 4
        assert [b.tolist() for b in sampler] == [b.tolist() for b in served[rank][4 * accumulate:]]
    for step in range(7):
        pieces = [b for rank in range(world) for b in served[rank][step * accumulate:(step + 1) * accumulate]]
        assert sorted(torch.cat(pieces).tolist()) == sorted(single[step].tolist())


def test_a_global_batch_that_does_not_split_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "build_datamodule", lambda cfg: pytest.fail("work started"))
    cases = {  # overrides → what the one line names
        ("trainer.accumulate_grad_batches=3",): "generator.train.batch_size=16 is the global batch",
        ("trainer=ddp_sim", "generator.train.batch_size=6", "trainer.accumulate_grad_batches=2"): "multiple of 4",
        ("trainer=ddp_sim", "tokenizer.train.batch_size=7"): "tokenizer.train.batch_size=7",
        ("trainer.accumulate_grad_batches=0",): "trainer.accumulate_grad_batches",
        ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.fsdp.param_dtype=bf16"):
            "trainer.fsdp.param_dtype=bf16",
        ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.fsdp.state_dict=both"):
            "trainer.fsdp.state_dict=both",
        ("trainer.strategy=fsdp",): "use trainer=fsdp",
        ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "generator.train.compile=true"):
            "generator.train.compile=true with trainer.fsdp.activation_checkpointing=true",
        ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"):
            "trainer.fsdp.param_dtype=bfloat16 needs autocast",
    }
    for overrides, named in cases.items():
        cfg = compose_train(["debug=tiny", "data=shapes", *overrides], tmp_path)
        with pytest.raises(pipeline.ConfigError, match=named.replace(".", "\\.")) as err:
            pipeline.run(cfg, tmp_path / "run")
        assert "\n" not in str(err.value)
    # a released tokenizer (tokenizer.artifact) has no stage 1, whose batch then need not split
    released = ["debug=tiny", "data=shapes", "trainer=ddp_sim", "tokenizer.train.batch_size=7", "+tokenizer.artifact=x"]
    pipeline.check_trainer(compose_train(released, tmp_path))


def test_the_process_layout_is_not_part_of_a_runs_identity(tmp_path):
    """Resuming on another number of processes or nodes is allowed; another accumulation (Lightning's saved loop
    counts micro-batches) or precision is not."""
    base = pipeline.run_identity(compose_train(["debug=tiny", "data=shapes"], tmp_path))
    for other in (["trainer=ddp_sim"], ["trainer.num_nodes=2"], ["trainer.devices=4", "trainer.strategy=ddp"]):
        assert pipeline.run_identity(compose_train(["debug=tiny", "data=shapes", *other], tmp_path)) == base
    for other in (["trainer.accumulate_grad_batches=2"], ["trainer.precision=bf16-mixed"]):
        assert pipeline.run_identity(compose_train(["debug=tiny", "data=shapes", *other], tmp_path)) != base


def test_trainer_fsdp_shards_stage_2_and_runs_stage_1_with_ddp(tmp_path):
    cfg = compose_train(["debug=tiny", "data=shapes", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                         "trainer.precision=32-true", "trainer.fsdp.param_dtype=null"], tmp_path)
    pipeline.check_trainer(cfg)
    kwargs = dict(max_steps=2, ckpt_dir=tmp_path / "ckpt", loggers=[], callbacks=[])
    stage2 = pipeline.make_trainer(cfg, **kwargs).strategy
    assert isinstance(stage2, ModelParallelStrategy) and stage2._save_distributed_checkpoint
    assert stage2._data_parallel_size == 2 and stage2._tensor_parallel_size == 1
    stage1 = pipeline.make_trainer(cfg, **kwargs, stage=1)
    assert isinstance(stage1.strategy, DDPStrategy) and stage1.accumulate_grad_batches == 1


# --------------------------------------------------------------------------------------------- the proofs
def test_accumulation_equals_the_large_batch_and_resumes_exactly(one_process, tmp_path):
    """4 micro-batches of 4 per step train what one batch of 16 trains; resumed at step 3 from its checkpoint it
    ends bitwise where the uninterrupted run ends."""
    accumulated = in_process(tmp_path / "k4", "--accumulate", "4")
    assert max_diff(accumulated, one_process) <= TOLERANCE
    resumed = in_process(tmp_path / "resumed", "--accumulate", "4", "--resume",
                         str(accumulated / "checkpoints" / "step=3.ckpt"))
    assert max_diff(resumed, accumulated) == 0.0


def test_fsdp_on_two_processes_trains_as_one_and_its_sharded_checkpoint_resumes_in_one(one_process, tmp_path):
    """FSDP2 over 2 gloo processes (blocks sharded, activation checkpointing on) against one process; its sharded
    checkpoint at step 3 (a directory of two shard files) resumed by a single process ends where both end."""
    fsdp = launch(tmp_path / "fsdp", "--devices", "2", "--strategy", "fsdp")
    assert max_diff(fsdp, one_process) <= TOLERANCE
    sharded = fsdp / "checkpoints" / "step=3.ckpt"
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2
    resumed = in_process(tmp_path / "resumed", "--resume", str(sharded))
    assert max_diff(resumed, fsdp) <= TOLERANCE and max_diff(resumed, one_process) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ddp_on_two_and_four_processes_trains_as_one(world, one_process, tmp_path):
    ddp = launch(tmp_path / "ddp", "--devices", str(world), "--strategy", "ddp")
    assert max_diff(ddp, one_process) <= TOLERANCE


@pytest.mark.slow
def test_a_full_checkpoint_resumes_under_fsdp_and_fsdp_full_checkpoints_resume_anywhere(one_process, tmp_path):
    """One process's checkpoint continued by FSDP on 2 processes (re-sharded on load); FSDP's full checkpoint
    (state_dict=full, one file) continued by FSDP bitwise and by one process."""
    fsdp = launch(tmp_path / "fsdp", "--devices", "2", "--strategy", "fsdp", "--resume",
                    str(one_process / "checkpoints" / "step=3.ckpt"))
    assert max_diff(fsdp, one_process) <= TOLERANCE
    full = launch(tmp_path / "full", "--devices", "2", "--strategy", "fsdp", "--state-dict", "full")
    assert (full / "checkpoints" / "step=3.ckpt").is_file()
    again = launch(tmp_path / "again", "--devices", "2", "--strategy", "fsdp", "--state-dict", "full", "--resume",
                     str(full / "checkpoints" / "step=3.ckpt"))
    assert max_diff(again, full) == 0.0
    single = in_process(tmp_path / "single", "--resume", str(full / "checkpoints" / "step=3.ckpt"))
    assert max_diff(single, full) <= TOLERANCE


@pytest.mark.slow
def test_fsdp_with_bf16_weights_trains_near_fp32(one_process, tmp_path):
    """fsdp.param_dtype=bfloat16 (fp32 reductions, fp32 master weights): within bf16's precision of fp32
    (measured 1.2e-2 after 6 steps; the layouts in fp32 agree to 2e-6)."""
    bf16 = launch(tmp_path / "bf16", "--devices", "2", "--strategy", "fsdp", "--param-dtype", "bfloat16")
    assert all(v.dtype == torch.float32 for v in train_tiny.weights(bf16).values())
    assert 1e-4 < max_diff(bf16, one_process) <= 5e-2


@pytest.mark.slow
def test_two_nodes_train_as_one_process_and_resume_exactly(one_process, tmp_path):
    """Two "nodes" by torchrun train as one process; resumed at step 3 on two nodes (Lightning's environment) the
    run ends bitwise where it ended, and resumed by one process within the tolerance."""
    nodes = two_nodes(tmp_path / "nodes", launcher="torchrun")
    assert max_diff(nodes, one_process) <= TOLERANCE
    step3 = str(nodes / "checkpoints" / "step=3.ckpt")
    again = two_nodes(tmp_path / "again", "--resume", step3, launcher="lightning")
    assert max_diff(again, nodes) == 0.0
    single = in_process(tmp_path / "single", "--resume", step3)
    assert max_diff(single, nodes) <= TOLERANCE


def _final(run: Path, part: str) -> dict[str, torch.Tensor]:
    return torch.load(run / "generator.pt", weights_only=True)[part]


@pytest.mark.slow
def test_arvision_train_on_two_torchrun_nodes_trains_both_stages_as_one_process(tiny_cfg, tmp_path):
    """The whole run under torchrun on two "nodes": both processes train the tokenizer (rank 0 writes the artifact)
    and the generator (both evaluate: the metrics sync across them); both stages' weights are one process's. Nothing
    is random in either stage's loss (dead-code restarts draw rows of each rank's own latents, so they are off)."""
    port = train_tiny.free_port()
    same = ("generator.model.class_dropout=0.0", "tokenizer.model.restart_unused=false")
    run = tmp_path / "nodes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "nodes", "-m", "arvision.cli.train",
           "debug=tiny", "data=shapes", "trainer=ddp_sim", "trainer.strategy=ddp", "trainer.devices=1",
           "trainer.num_nodes=2", f"hydra.run.dir={run}", *same]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["metrics"]["generator"]["fid"]["value"] > 0 and results["config"]["trainer"]["num_nodes"] == 2
    # Stage 1: one process training its own tokenizer encodes the test images into the same tokens. (Conv biases
    # ahead of a GroupNorm get gradients that are only rounding noise, which Adam scales to lr-sized steps: the
    # weights differ there by up to 3e-3, the reconstructions by 1e-5.)
    alone = pipeline.run(tiny_cfg(*same, "train_generator=false", "evaluate=false", root=tmp_path / "alone"),
                         tmp_path / "alone" / "run")
    tokenizers = [pipeline.load_tokenizer(Path(r["tokenizer_artifact"])) for r in (results, alone)]
    dm = pipeline.build_datamodule(tiny_cfg(root=tmp_path / "alone"))
    images = torch.stack([dm.test_set[i][0] for i in range(64)])
    with torch.no_grad():
        tokens = [tokenizer.encode(images) for tokenizer in tokenizers]
        recon = [tokenizer.decode(t) for tokenizer, t in zip(tokenizers, tokens)]
    assert torch.equal(tokens[0], tokens[1]) and (recon[0] - recon[1]).abs().max().item() <= 1e-4
    # Stage 2: one process on the same tokenizer and token store (this root's artifacts) trains the same generator
    single = pipeline.run(tiny_cfg(*same, "evaluate=false"), tmp_path / "single")
    assert single["tokenizer_artifact"] == results["tokenizer_artifact"]
    for part in ("generator", "ema"):
        a, b = _final(run, part), _final(tmp_path / "single", part)
        assert max((a[k] - b[k]).abs().max().item() for k in b) <= TOLERANCE
