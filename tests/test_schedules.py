"""Stage 2's learning-rate and weight-decay schedules (tasks/optim.py), training without an EMA, and the TF32
switch: each schedule's values against the official code's formulas (written out here from VAR's
utils/lr_control.py, MAR/FlowAR's util/lr_sched.py and ACDiT's train.py lambda_wsd), a killed run resuming on the
same rates, and the recipes' notes."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from arvision import pipeline
from arvision.recipes import recipe_notes
from arvision.tasks import GeneratorTask
from arvision.tasks.optim import lr_factor, lr_schedule, warmup_cosine, weight_decay_at
from tests.conftest import compose_train, run_crashing_at


def var_lr_wd(sche: str, cur_it: int, wp_it: int, max_it: int, *, wp0: float, wpe: float, wd: float,
              wd_end: float) -> tuple[float, float]:
    """VAR's lr_wd_annealing (utils/lr_control.py) for 'lin0' and 'lin00', as fractions of the peak lr."""
    if cur_it < wp_it:
        lr = wp0 + (1 - wp0) * cur_it / wp_it
    else:
        pasd = (cur_it - wp_it) / (max_it - 1 - wp_it)
        if sche == "lin0":
            lr = 1.0 if pasd < 0.05 else wpe + (1 - wpe) * (1 - pasd) / 0.95
        else:  # lin00
            lr = wpe + (1 - wpe) * (1 - pasd)
    pasd = cur_it / (max_it - 1)
    return lr, wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * pasd))


def acdit_wsd(step: int, total: int, warmup: float = 0.0, exponent: int = 6) -> float:
    """ACDiT's lambda_wsd (train.py) with its stages [int(warmup·total), int(0.85·total), total]."""
    stages = [int(warmup * total), int(0.85 * total), total]
    if step < stages[0]:
        return step / stages[0]
    if step < stages[1]:
        return 1.0
    return 0.5 ** ((step - stages[1]) / (stages[2] - stages[1]) * exponent)


def mar_lr(step: int, iters: int, *, warmup_epochs: int, epochs: int, schedule: str, min_lr: float) -> float:
    """MAR's and FlowAR's adjust_learning_rate (util/lr_sched.py) at epoch = step / iters per epoch, lr 1."""
    epoch = step / iters
    if epoch < warmup_epochs:
        return epoch / warmup_epochs
    if schedule == "constant":
        return 1.0
    return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_var_lin0_and_its_weight_decay_ramp_follow_lr_control():
    warmup, total = 40, 1000
    for wpe in (0.1, 0.01):
        for step in range(total):
            lr, wd = var_lr_wd("lin0", step, warmup, total, wp0=0.005, wpe=wpe, wd=0.05, wd_end=0.08)
            ours = lr_factor(step, schedule="linear", warmup_steps=warmup, max_steps=total, min_lr_ratio=wpe,
                             decay_fraction=0.95, warmup_start=0.005)
            assert ours == pytest.approx(lr, abs=1e-12), step
            assert weight_decay_at(step, start=0.05, end=0.08, max_steps=total) == pytest.approx(wd, abs=1e-12)
    # The shape in numbers: 0.005 at step 0, peak after the warm-up, flat for 5% of the rest, wpe at the last step.
    factor = dict(schedule="linear", warmup_steps=warmup, max_steps=total, min_lr_ratio=0.1, decay_fraction=0.95,
                  warmup_start=0.005)
    assert lr_factor(0, **factor) == 0.005 and lr_factor(warmup, **factor) == 1.0
    assert lr_factor(warmup + 47, **factor) == 1.0 and lr_factor(warmup + 48, **factor) < 1.0  # 0.05 · 959 = 47.95
    assert lr_factor(total - 1, **factor) == pytest.approx(0.1)
    assert weight_decay_at(0, start=0.05, end=0.08, max_steps=total) == pytest.approx(0.05)
    assert weight_decay_at(total - 1, start=0.05, end=0.08, max_steps=total) == pytest.approx(0.08)
    assert weight_decay_at(total // 2, start=0.05, end=None, max_steps=total) == 0.05  # null: constant
    # decay_fraction 1 is VAR's lin00: linear from the warm-up's end.
    for step in range(warmup, total, 37):
        lin00, _ = var_lr_wd("lin00", step, warmup, total, wp0=0.005, wpe=0.1, wd=0.05, wd_end=0.05)
        assert lr_factor(step, schedule="linear", warmup_steps=warmup, max_steps=total, min_lr_ratio=0.1,
                         decay_fraction=1.0) == pytest.approx(lin00, abs=1e-12)


def test_wsd_follows_acdit_lambda_wsd():
    total = 1000
    for step in range(total + 1):
        ours = lr_factor(step, schedule="wsd", warmup_steps=0, max_steps=total, min_lr_ratio=0.5 ** 6,
                         decay_fraction=0.15)
        assert ours == pytest.approx(acdit_wsd(step, total), rel=1e-12), step
    assert lr_factor(849, schedule="wsd", warmup_steps=0, max_steps=total, min_lr_ratio=0.5 ** 6) == 1.0
    assert lr_factor(900, schedule="wsd", warmup_steps=0, max_steps=total, min_lr_ratio=0.5 ** 6) == \
        pytest.approx(0.5 ** 2)  # a third of the way down: two of the six halvings


def test_constant_and_cosine_follow_mar_and_flowar_lr_sched():
    iters = 25  # steps per epoch
    for step in range(0, 40 * iters):
        mar = mar_lr(step, iters, warmup_epochs=10, epochs=40, schedule="constant", min_lr=0.0)
        assert lr_factor(step, schedule="constant", warmup_steps=10 * iters, max_steps=40 * iters,
                         warmup_start=0.0) == pytest.approx(mar, abs=1e-12)
        flowar = mar_lr(step, iters, warmup_epochs=10, epochs=40, schedule="cosine", min_lr=0.025)
        assert lr_factor(step, schedule="cosine", warmup_steps=10 * iters, max_steps=40 * iters, min_lr_ratio=0.025,
                         warmup_start=0.0) == pytest.approx(flowar, abs=1e-12)
    # No warm-up (LlamaGen): the peak from the first step.
    assert lr_factor(0, schedule="constant", warmup_steps=0, max_steps=10) == 1.0


def test_the_default_is_the_cosine_schedule_arvision_always_had():
    for step in (0, 4, 9, 10, 50, 109, 110, 200):
        old = (step + 1) / 10 if step < 10 else \
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 10) / 100)))
        assert lr_factor(step, warmup_steps=10, max_steps=110) == old
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        lr_factor(20, schedule="step", warmup_steps=10, max_steps=110)


@pytest.mark.parametrize("schedule", ["cosine", "constant", "linear", "wsd"])
def test_a_restored_scheduler_continues_on_the_uninterrupted_rates(schedule):
    settings = dict(warmup_steps=5, max_steps=40, schedule=schedule, min_lr_ratio=0.05, decay_fraction=0.3,
                    warmup_start=0.01)

    def make():
        opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2))], lr=2e-3)
        return opt, lr_schedule(opt, **settings)

    opt, sched = make()
    straight = []
    for _ in range(40):
        straight.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert straight == pytest.approx([2e-3 * lr_factor(s, **{**settings, "schedule": schedule}) for s in range(40)])
    opt, sched = make()
    for _ in range(17):
        opt.step()
        sched.step()
    saved = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    opt, sched = make()  # a new process: fresh objects, the saved states loaded
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    resumed = []
    for _ in range(17, 40):
        resumed.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert resumed == straight[17:]


def test_warmup_cosine_is_the_default_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=3, max_steps=9)
    assert sched.lr_lambdas[0](5) == lr_factor(5, warmup_steps=3, max_steps=9)


def test_a_killed_run_without_ema_resumes_on_the_schedule_and_samples_its_trained_weights(tiny_cfg, tmp_path,
                                                                                             monkeypatch, caplog):
    """One debug=tiny run (killed at step 3 of 8, then resumed) with VAR's linear schedule, a weight-decay ramp and
    no EMA: every step's lr and weight decay are the formulas' (the resumed steps too), generator.pt holds no EMA
    weights, and loading it for sampling falls back to the trained ones."""
    overrides = ("generator.train.max_steps=8", "generator.train.warmup_steps=2", "checkpoint_every=2",
                 "evaluate=false", "generator.train.ema_decay=null", "generator.train.lr_schedule=linear",
                 "generator.train.decay_fraction=0.5", "generator.train.min_lr_ratio=0.2",
                 "generator.train.warmup_start=0.1", "generator.train.weight_decay_end=0.2")
    seen: dict[int, tuple[float, float]] = {}
    original = GeneratorTask.optimizer_step

    def record(self, epoch, batch_idx, optimizer, *args, **kwargs):
        step = self.global_step
        original(self, epoch, batch_idx, optimizer, *args, **kwargs)
        seen[step] = (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"])

    monkeypatch.setattr(GeneratorTask, "optimizer_step", record)
    run_dir = tmp_path / "run"
    run_crashing_at(monkeypatch, tiny_cfg(*overrides), run_dir, 3)
    monkeypatch.setattr(GeneratorTask, "optimizer_step", record)  # run_crashing_at restored training_step only
    assert sorted(seen) == [0, 1, 2]
    seen.clear()
    pipeline.run(tiny_cfg(*overrides), run_dir)  # resumes from the checkpoint at step 2
    assert sorted(seen) == [2, 3, 4, 5, 6, 7]
    cfg = tiny_cfg(*overrides)
    lr, wd = cfg.generator.train.lr, cfg.generator.train.weight_decay
    for step, (got_lr, got_wd) in seen.items():
        assert got_lr == pytest.approx(lr * lr_factor(step, schedule="linear", warmup_steps=2, max_steps=8,
                                                      min_lr_ratio=0.2, decay_fraction=0.5, warmup_start=0.1))
        assert got_wd == pytest.approx(weight_decay_at(step, start=wd, end=0.2, max_steps=8))
    assert seen[7][0] == pytest.approx(0.2 * lr) and seen[7][1] == pytest.approx(0.2)

    blob = torch.load(run_dir / "generator.pt", weights_only=True)
    assert "ema" not in blob
    ckpt = torch.load(run_dir / "checkpoints" / "generator" / "last.ckpt", weights_only=True)
    assert not any(key.startswith("ema.") for key in ckpt["state_dict"])
    with caplog.at_level(logging.INFO, logger=pipeline.log.name):
        run = pipeline.load_run(run_dir)
    assert "has no EMA weights (trained with generator.train.ema_decay=null)" in caplog.text
    for key, value in run.generator.state_dict().items():
        assert torch.equal(value, blob["generator"][key]), key


def test_tf32_switch_sets_the_backend_flags(tiny_cfg, tmp_path):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        cfg = pipeline.finalize_config(tiny_cfg())
        pipeline.make_trainer(cfg, max_steps=1, ckpt_dir=tmp_path / "a", loggers=[], callbacks=[])
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)  # default
        assert "tf32" not in pipeline.run_identity(cfg)["trainer"]
        cfg = pipeline.finalize_config(tiny_cfg("trainer.tf32=true"))
        pipeline.make_trainer(cfg, max_steps=1, ckpt_dir=tmp_path / "b", loggers=[], callbacks=[])
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        assert pipeline.run_identity(cfg)["trainer"]["tf32"] is True  # a run resumes only with its own TF32 setting
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_a_bad_schedule_setting_is_one_clear_line(tiny_cfg):
    cfg = pipeline.finalize_config(tiny_cfg("generator.train.lr_schedule=cosin"))
    with pytest.raises(pipeline.ConfigError, match=r"generator.train.lr_schedule='cosin': must be one of cosine, "
                                                   r"constant, linear, wsd"):
        pipeline.check_settings(cfg)
    cfg = pipeline.finalize_config(tiny_cfg("generator.train.ema_decay=1.0"))
    with pytest.raises(pipeline.ConfigError, match=r"generator.train.ema_decay=1.0: must be .* \(or null\)"):
        pipeline.check_settings(cfg)


def test_recipes_set_the_published_schedules_and_a_departure_is_noted(tmp_path):
    def compose(recipe: str, *overrides: str):
        return pipeline.finalize_config(compose_train([f"experiment=imagenet/{recipe}", "data.root=/data",
                                                       *overrides], tmp_path))
    d30, gpt_b = compose("var_d30"), compose("llamagen_gpt_b")
    flowar, acdit, mar = compose("flowar_s"), compose("acdit_b"), compose("mar_b")
    train = d30.generator.train
    assert (train.lr_schedule, train.min_lr_ratio, train.decay_fraction, train.warmup_start, train.weight_decay,
            train.weight_decay_end, train.ema_decay) == ("linear", 0.01, 0.95, 0.005, 0.05, 0.08, None)
    assert compose("var_d16").generator.train.min_lr_ratio == 0.1  # --wpe=0.1
    assert (gpt_b.generator.train.lr_schedule, gpt_b.generator.train.ema_decay) == ("constant", None)
    assert (flowar.generator.train.lr_schedule, flowar.generator.train.min_lr_ratio, flowar.trainer.tf32) == \
        ("cosine", 0.025, True)
    assert (acdit.generator.train.lr_schedule, acdit.generator.train.min_lr_ratio,
            acdit.generator.train.decay_fraction) == ("wsd", 0.5 ** 6, 0.15)
    assert (mar.generator.train.lr_schedule, mar.generator.train.warmup_start) == ("constant", 0.0)

    def notes(cfg, **changes) -> str:
        cfg = cfg.copy()
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value)
        return "\n".join(recipe_notes(cfg, world=cfg.trainer.devices * cfg.trainer.num_nodes))
    assert notes(d30) == notes(gpt_b) == notes(flowar) == notes(acdit) == notes(mar) == ""
    assert "generator.train.lr_schedule=cosine is not the published linear (lin0:" in \
        notes(d30, **{"generator.train.lr_schedule": "cosine"})
    assert "the published weight decay goes 0.05 → 0.08; here it ends at 0.05" in \
        notes(d30, **{"generator.train.weight_decay_end": None})
    assert "generator.train.ema_decay=0.999 is not the published None (null: no EMA)" in \
        notes(gpt_b, **{"generator.train.ema_decay": 0.999})
    assert "trainer.tf32=False; the published run has TF32 on" in notes(flowar, **{"trainer.tf32": False})
    assert "generator.train.decay_fraction=0.2 is not the published 0.15" in \
        notes(acdit, **{"generator.train.decay_fraction": 0.2})
