"""Stage-1 training options: the PatchGAN path, and LPIPS only with local weights."""

import logging

import lightning as L
import torch

from arvision.data.tokens import ImageBatches, step_loader
from arvision.data import ShapesDataset
from arvision.tasks import TokenizerTask
from arvision.tasks.tokenizer_task import stage1_trainer_steps
from arvision.tokenizers import VQTokenizer
from arvision.tokenizers.losses import PatchDiscriminator, build_perceptual_loss, hinge_d_loss, hinge_g_loss


def test_hinge_losses():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0  # confident and right
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0
    assert hinge_g_loss(torch.tensor([1.0, 3.0])).item() == -2.0


def test_patch_discriminator_gives_a_map_of_patch_logits():
    logits = PatchDiscriminator(in_channels=1, width=8, num_layers=2)(torch.randn(2, 1, 32, 32))
    # 32 → 16 → 8 (stride-2 convs) → 7 → 6 (the last two 4×4 convs, stride 1, padding 1): one logit per patch
    assert logits.shape == (2, 1, 6, 6)


def test_perceptual_loss_is_off_without_local_weights(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert build_perceptual_loss("vgg") is None
    assert "vgg16-397923af.pth" in caplog.text


def test_gan_training_alternates_both_optimisers(tmp_path):
    torch.manual_seed(0)
    tok = VQTokenizer(image_size=16, image_channels=1, ch=8, ch_mult=(1, 2), z_channels=8, vocab_size=16, code_dim=4)
    task = TokenizerTask(tokenizer=tok, max_steps=4, warmup_steps=1, disc_weight=0.5, disc_start=2, disc_width=8,
                         disc_layers=2)
    disc_before = [p.detach().clone() for p in task.discriminator.parameters()]
    loader = step_loader(ImageBatches(ShapesDataset(num_samples=32, image_size=16, num_classes=2)), batch_size=8,
                         num_steps=4, seed=0)
    trainer = L.Trainer(max_steps=stage1_trainer_steps(4, 0.5, 2), accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0)
    trainer.fit(task, loader)
    assert int(task.updates) == 4  # 4 tokenizer updates although Lightning counted 6 optimiser steps
    assert trainer.global_step == 6
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, task.discriminator.parameters()))
    assert "stage1/d_loss" in trainer.callback_metrics and "stage1/g_loss" in trainer.callback_metrics
