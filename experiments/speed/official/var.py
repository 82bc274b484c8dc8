"""Speed of the official VAR code (FoundationVision/VAR), random weights, as the official VAR-d16 figure was taken.

    python experiments/speed/official/var.py --repo <VAR checkout> [--out var_d16.json] [--tiny]

Timed, on VAR-d16 (310M, scales 1…16 of a 4096-code multi-scale VQVAE at 256 px, batch 64):
- train: VAR's training step on token maps given (what arvision's token cache serves, so the same work as
  `arvision-bench bench_preset=var_d16`): `idxBl_to_var_input`, the forward under VAR's `AmpOptimizer` autocast
  (bf16: `--fp16 2`), label-smoothed (0.1) cross-entropy with VAR's uniform loss weights, and
  `AmpOptimizer.backward_clip_step` (grad clip 2.0, fused AdamW over `filter_params`' groups, as train.py);
- train_with_encode: the same step with `vae.img_to_idxBl` of a random image batch first, as VAR's trainer does;
- sample: `VAR.autoregressive_infer_cfg` (cfg 1.5, top-k 900, top-p 0.96), which decodes: decode included,
  under `--sample-precision` autocast (fp16 in VAR's demo notebook; bf16 to compare with arvision's bf16 run).
flash-attn and xformers are used by VAR when installed; without them it falls back to PyTorch's SDPA.
"""

from __future__ import annotations

import builtins
import contextlib
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def quiet_print():
    original = builtins.print
    builtins.print = lambda *a, force=False, **k: None
    try:
        yield
    finally:
        builtins.print = original


@torch.no_grad()
def random_init_(vae: torch.nn.Module) -> None:
    """build_vae_var turns off PyTorch's layer initialisation (the VAE loads a checkpoint), so its weights are
    whatever memory held, NaN included: random weights stand in for the checkpoint."""
    for module in vae.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding)):
            module.weight.normal_(0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def extra_flags(parser) -> None:
    parser.add_argument("--sample-precision", choices=list(DTYPES), default="fp16")
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--build-only", action="store_true")


def main() -> dict:
    args = common.parse_args("official VAR speed", ["var_d16"], extra_flags)
    device = torch.device(args.device)
    if args.tiny:  # a CPU-sized VAR that runs the same code paths in seconds
        sizes = dict(depth=2, V=512, ch=32, patch_nums=(1, 2, 3, 4))
        args.train_batch = args.sample_batch = 2
        args.train_warmup = args.sample_warmup = 0
        args.train_repeats = args.sample_repeats = 1
    else:
        sizes = dict(depth=16, V=4096, ch=160, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    with common.official_imports(args.repo):
        from models import build_vae_var
        from utils.amp_sc import AmpOptimizer
        from utils.lr_control import filter_params
        vae, var = build_vae_var(device=device, num_classes=1000, shared_aln=False, attn_l2_norm=True,
                                 flash_if_available=True, fused_if_available=True, **sizes)
    random_init_(vae)
    result = {"model": "var_d16", "preset": args.preset, "params": common.count_parameters(var),
              "tokenizer_params": common.count_parameters(vae), "patch_nums": list(sizes["patch_nums"])}
    print(f"VAR depth {sizes['depth']}: {result['params'] / 1e6:.1f}M parameters")
    if args.build_only:
        return result
    torch.manual_seed(0)
    patch_nums, vocab = sizes["patch_nums"], sizes["V"]
    image_size = 16 * patch_nums[-1]

    if not args.skip_train:
        var.train()
        nowd_keys = {"cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                     "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul"}
        with quiet_print():  # VAR's train.py patches print to take force=; filter_params calls it so
            names, paras, groups = filter_params(var, nowd_keys=nowd_keys)
        fused = device.type == "cuda"  # VAR's afuse=True; the fused kernel is CUDA-only
        opt_cls = partial(torch.optim.AdamW, betas=(0.9, 0.95), fused=fused)
        optimizer = AmpOptimizer(mixed_precision=2, optimizer=opt_cls(params=groups, lr=1e-4, weight_decay=0),
                                 names=names, paras=paras, grad_clip=2.0)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1, reduction="none")
        seq_len = sum(n * n for n in patch_nums)
        loss_weight = torch.ones(1, seq_len, device=device) / seq_len
        batch = args.train_batch
        labels = torch.randint(0, 1000, (batch,), device=device)
        tokens = [torch.randint(0, vocab, (batch, n * n), device=device) for n in patch_nums]
        images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1

        def step(gt_idx_Bl) -> None:  # VARTrainer.train_step without its logging
            gt_BL = torch.cat(gt_idx_Bl, dim=1)
            x_BLCv = vae.quantize.idxBl_to_var_input(gt_idx_Bl)
            with optimizer.amp_ctx:
                logits = var(labels, x_BLCv)
                loss = loss_fn(logits.view(-1, vocab), gt_BL.view(-1)).view(batch, -1)
                loss = loss.mul(loss_weight).sum(dim=-1).mean()
            optimizer.backward_clip_step(stepping=True, loss=loss)

        def step_with_encode() -> None:
            with torch.no_grad():
                gt = vae.img_to_idxBl(images)
            step(gt)

        for key, fn in (("train", lambda: step(tokens)), ("train_with_encode", step_with_encode)):
            common.reset_peak(device)
            seconds = common.median_seconds(fn, warmup=args.train_warmup, repeats=args.train_repeats, device=device)
            result[key] = {"img_per_s": batch / seconds, "step_ms": 1e3 * seconds, "batch_size": batch,
                           "precision": "bf16" if device.type == "cuda" else "fp32 (VAR autocasts on CUDA only)",
                           "peak_memory_mib": common.peak_memory_mib(device)}
        del optimizer

    if not args.skip_sample:
        var.eval()
        batch = args.sample_batch
        labels = torch.arange(batch, device=device) % 1000
        if device.type == "cpu" and args.sample_precision == "fp16":
            args.sample_precision = "fp32"  # fp16 is the GPU setting; on a CPU it overflows the random tiny model
        dtype = DTYPES[args.sample_precision]
        top_k = min(900, vocab)  # the tiny model's codebook is smaller than 900

        @torch.inference_mode()
        def sample() -> None:
            with common.autocast(device, dtype):
                var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=None, cfg=args.cfg, top_k=top_k,
                                             top_p=0.96, more_smooth=False)

        common.reset_peak(device)
        seconds = common.median_seconds(sample, warmup=args.sample_warmup, repeats=args.sample_repeats,
                                        device=device)
        result["sample"] = {"img_per_s": batch / seconds, "s_per_batch": seconds, "batch_size": batch,
                            "precision": args.sample_precision, "cfg": args.cfg, "top_k": top_k, "top_p": 0.96,
                            "steps": len(patch_nums), "decode": "included",
                            "peak_memory_mib": common.peak_memory_mib(device)}
    return common.report(args, result)


if __name__ == "__main__":
    main()
