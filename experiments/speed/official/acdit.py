"""Speed of the official ACDiT code (thunlp/ACDiT), random weights, as the official ACDiT-B figures were taken.

    python experiments/speed/official/acdit.py --repo <ACDiT checkout> [--out x.json] [--tiny] [--build-only]

ACDiT-B (`ACDiT_models["ACDiT-B"]`: depth 12, width 768, 12 heads, ~130M), class-conditional ImageNet 256 px on
SD-VAE f8 latents (32×32×4), patch size 1: 1024 tokens in `ar_len` 4 square blocks of 256 (16×16), built with the
constructor arguments sample_img.py takes from an ImageNet checkpoint's args (train.py's own call passes `use_rope`
and `spatial_2d`, which the released `ACDiT.__init__` does not accept). Timed, batch 64:
- train: the loop body of train.py after the VAE (latents given, as a latent cache serves them): the square-block
  rearrangement, `DDPMScheduler().add_noise` with one random timestep per block, `model(latent, noised, t, y)` under
  bf16 autocast with the official FlexAttention skip-causal BlockMask (`torch.compile(flex_attention)` as
  models.py sets it up), MSE to the noise, backward, grad-norm clip 1.0 (`--max_grad_norm` default), the AdamW of
  train.py (lr 1e-4, betas 0.9/0.95, weight decay 0.05); TF32 matmuls on, as train.py sets. Not timed by default:
  the EMA update (`--ema` adds it), the wsd LR scheduler, `loss.item()` and wandb logging, DDP (one GPU);
- sample: `ACDiT.sample` as sample_img.py's `samples_case` calls it: `DPMSolverMultistepScheduler.from_config(
  DDIMScheduler().config)`, 25 steps per block × 4 blocks with the KV cache, cfg 1.5, `dtype=torch.float`, fp32
  weights and no autocast, TF32 off (sample_img.py leaves PyTorch's default); decode excluded (the VAE is not run).
`--tiny` builds the same class at width 128, depth 2 on 8×8 latents (4 blocks of 16 tokens) to check the harness on
a CPU; if FlexAttention fails there, it falls back to the official dense-mask path (models.USE_FLEX_ATTENTION =
False) and says so in the result. At full size on a CPU it trains in fp32 on the official dense-mask path, the same
computation as arvision's CPU path. The GPU path always runs the official FlexAttention code unchanged.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

PRESETS = {"acdit_b": "ACDiT-B"}
# The checkpoint args sample_img.py reads for ImageNet 256 (train.py's argparse names).
FULL = dict(image_size=256, vae_patch_pixels=8, patch_size=1, vae_latent_size=4, block_size=256, ar_len=4,
            num_frames=1, nd_split=None, num_classes=1000)
# Head dim stays 64: rope.RopeND is built with its default head_dim=64.
TINY = dict(FULL, image_size=64, block_size=16)
TINY_SIZE = dict(depth=2, hidden_size=128, num_heads=2)
# Defaults --tiny applies to the flags the user did not give.
TINY_FLAGS = {"train_batch": 2, "sample_batch": 2, "train_warmup": 0, "train_repeats": 1, "sample_warmup": 0,
              "sample_repeats": 1, "sample_steps": 2}


def extra_flags(parser) -> None:
    parser.add_argument("--cfg", type=float, default=1.5, help="sample_img.py --cfg")
    parser.add_argument("--sample-steps", type=int, default=25, help="DPM-Solver steps per block (sample_img.py)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="train.py --max_grad_norm (0: no clip)")
    parser.add_argument("--ema", action="store_true", help="also time train.py's update_ema (a loop over params)")
    parser.add_argument("--build-only", action="store_true", help="build the model, count parameters, stop")


def apply_tiny_defaults(args) -> None:
    given = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
    for name, value in TINY_FLAGS.items():
        if "--" + name.replace("_", "-") not in given:
            setattr(args, name, value)


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999) -> None:
    """What train.py's update_ema does (train.py itself cannot be imported: wandb, inception, sample_ddp)."""
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data.to(torch.float32), alpha=1 - decay)


def timm_compat(models) -> list[str]:
    """Newer timm (1.0.31 here) passes device=/dtype= to `norm_layer`; the official LlamaRMSNorm takes neither.

    models.py looks LlamaRMSNorm up by name when it builds each block, so a subclass that only accepts (and, as
    timm passes None, ignores) those two arguments builds the same modules with the same parameters.
    """
    import inspect

    from timm.models.vision_transformer import Attention
    if "device" not in inspect.signature(Attention.__init__).parameters:
        return []

    class LlamaRMSNorm(models.LlamaRMSNorm):
        def __init__(self, hidden_size, eps=1e-6, device=None, dtype=None):
            super().__init__(hidden_size, eps=eps)

    models.LlamaRMSNorm = LlamaRMSNorm
    return ["models.LlamaRMSNorm subclassed to accept timm's device=/dtype= norm_layer arguments (None here)"]


def flex_probe(models, model: torch.nn.Module, device: torch.device) -> None:
    """Forward and backward of the official compiled flex_attention with the model's BlockMask, bf16 autocast."""
    length = 2 * model.ar_len * model.block_size  # clean + noised tokens
    q, k, v = (torch.randn(1, model.num_heads, length, model.hidden_size // model.num_heads, device=device,
                           dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with common.autocast(device, torch.bfloat16):
        out = models.flex_attention(q, k, v, block_mask=model.flex_attnmask)
    out.float().sum().backward()


def flex_matches_dense(models, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """Forward only (CPU flex has no backward): the official model with its BlockMask vs its dense bool mask."""
    probe = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in probe.parameters():  # adaLN-zero init makes the output 0: give every weight a random value
            p.normal_(0, 0.05)
        n = 2
        clean = torch.randn(n, model.ar_len, model.block_size, model.in_channels, device=device)
        noised, t = torch.randn_like(clean), torch.randint(0, 1000, (n, model.ar_len), device=device)
        y = torch.randint(0, model.num_classes, (n,), device=device)
        flag, outputs = models.USE_FLEX_ATTENTION, []
        for use_flex in (True, False):
            models.USE_FLEX_ATTENTION = use_flex
            torch.manual_seed(1)  # ACDiT.forward always drops 10 % of the labels at random (y_embedder(y, True))
            outputs.append(probe(clean, noised, t, y))
        models.USE_FLEX_ATTENTION = flag
    return {"max_abs_diff": (outputs[0] - outputs[1]).abs().max().item(), "max_abs": outputs[1].abs().max().item()}


def main() -> dict[str, Any]:
    args = common.parse_args("official ACDiT speed", list(PRESETS), extra_flags)
    if args.tiny:
        apply_tiny_defaults(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the BlockMask is built at construction on the current CUDA device
    cfg = TINY if args.tiny else FULL
    side = cfg["image_size"] // cfg["vae_patch_pixels"] // cfg["patch_size"]
    channels = cfg["vae_latent_size"] * cfg["patch_size"] ** 2
    torch.manual_seed(0)

    with common.official_imports(args.repo):
        import models  # prints "Use flex attention!!!!" when the import of flex_attention works
        compat = timm_compat(models)
        if device.type == "cpu":
            # Older PyTorch builds a BlockMask on "cuda" by default; the model builds its mask in __init__.
            models.create_block_mask = functools.partial(models.create_block_mask, device="cpu")
        kwargs = dict(latent_size=channels, block_size=cfg["block_size"], num_classes=cfg["num_classes"],
                      ar_len=cfg["ar_len"], temporal_len=cfg["num_frames"], spatial_len=side * side,
                      nd_split=cfg["nd_split"], square_block=True)  # as sample_img.py
        if args.tiny:
            model = models.ACDiT(**TINY_SIZE, **kwargs)
        else:
            model = models.ACDiT_models[PRESETS[args.preset]](**kwargs)
    model = model.to(device)

    import diffusers
    import timm
    params = common.count_parameters(model)
    attention = "flex" if models.USE_FLEX_ATTENTION else "dense (models.py could not import flex_attention)"
    result: dict[str, Any] = {
        "model": "acdit_b", "preset": args.preset, "params": params,
        "config": {"depth": model.depth, "hidden_size": model.hidden_size, "num_heads": model.num_heads,
                   "latent": [channels, side, side], "tokens": side * side, "block_size": model.block_size,
                   "ar_len": model.ar_len, "num_classes": model.num_classes},
        "versions": {"diffusers": diffusers.__version__, "timm": timm.__version__},
        "compat": compat,
    }
    name = "tiny ACDiT" if args.tiny else PRESETS[args.preset]
    print(f"{name}: {params / 1e6:.2f}M parameters ({params}), {side * side} tokens in {model.ar_len} blocks "
          f"of {model.block_size}, width {model.hidden_size}, depth {model.depth}")
    if args.build_only:
        return common.report(args, result)
    if device.type == "cpu" and not args.tiny and models.USE_FLEX_ATTENTION:
        # A CPU run at full size compares against arvision's CPU path, dense SDPA with the mask: the official dense
        # path is the same computation (compiling flex_attention for a CPU would time Inductor's CPU template)
        models.USE_FLEX_ATTENTION = False
        attention = "dense bool mask from the official ACDiT.build_attention_mask + SDPA (CPU, fp32)"
    if not models.USE_FLEX_ATTENTION and device.type == "cuda":
        raise SystemExit("the official models.py fell back to dense attention: the GPU figure needs FlexAttention")

    if not args.skip_train:
        import einops
        from diffusers import DDPMScheduler

        torch.backends.cuda.matmul.allow_tf32 = True  # train.py, top of file
        torch.backends.cudnn.allow_tf32 = True
        scheduler = DDPMScheduler()  # train.py: default config (1000 steps, linear betas)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=5e-2, betas=(0.9, 0.95))
        ema = None
        if args.ema:
            ema = copy.deepcopy(model).to(torch.float32)
            ema.requires_grad_(False)
        model.train()
        # --tiny keeps bf16 on a CPU too: it checks the GPU's code path, at full size a CPU times fp32
        train_dtype = torch.bfloat16 if args.tiny else common.gpu_dtype(device, torch.bfloat16)
        batch = args.train_batch
        # Scaled SD-VAE latents as a latent cache serves them, (N, C, H, W); labels over the 1000 classes.
        latents = torch.randn(batch, channels, side, side, device=device)
        labels = torch.randint(0, cfg["num_classes"], (batch,), device=device)
        block = math.isqrt(model.block_size)

        def step() -> None:  # train.py's loop body after vae.encode, ImageNet, --square_block
            # 'N C (h1 h2) (w1 w2) -> N (h1 w1) (h2 w2 C)' (patch 1), then square blocks of block×block tokens.
            latent = einops.rearrange(latents, "N C (nh bh) (nw bw) -> N (nh nw) (bh bw) C", bh=block, bw=block)
            n, t_len, b, c = latent.shape
            noise = torch.randn_like(latent)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (n, t_len))  # on the host, as train.py
            noised = scheduler.add_noise(latent.reshape(-1, 1, b, c), noise.reshape(-1, 1, b, c),
                                         t.reshape(-1)).reshape(n, t_len, b, c)
            optimizer.zero_grad()
            with common.autocast(device, train_dtype):
                # train.py's DDP wrapper moves t to the GPU; here it is done by hand.
                output = model(latent, noised, t.to(device), labels)
                loss = F.mse_loss(output, noise.reshape(n, t_len * b, c))
            loss.backward()  # GradScaler is disabled for bf16: scale/unscale_/step are plain calls
            if args.max_grad_norm != 0.0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            if ema is not None:
                update_ema(ema, model)

        if args.tiny and device.type == "cpu" and models.USE_FLEX_ATTENTION:
            try:  # flex_attention on a CPU needs Inductor's CPU template, which may not lower this case
                flex_probe(models, model, device)
            except Exception as error:  # noqa: BLE001 - any compile/lowering error means: use the dense path
                models.USE_FLEX_ATTENTION = False
                attention = (f"dense bool mask from the official ACDiT.build_attention_mask + SDPA (tiny CPU "
                             f"fallback: flex_attention failed with {type(error).__name__})")
                print(f"flex_attention failed on the CPU ({type(error).__name__}: {str(error)[:300]}); "
                      "falling back to the official dense-mask path")
                check = flex_matches_dense(models, model, device)
                result["flex_forward_vs_dense"] = check
                print(f"flex forward vs dense forward (fp32, random weights): max |diff| {check['max_abs_diff']:.2e}"
                      f" of max |out| {check['max_abs']:.2e}")

        common.reset_peak(device)
        seconds = common.median_seconds(step, warmup=args.train_warmup, repeats=args.train_repeats, device=device)
        result["train"] = {
            "img_per_s": batch / seconds, "step_ms": 1e3 * seconds, "batch_size": batch,
            "precision": "bf16" if train_dtype else "fp32", "peak_memory_mib": common.peak_memory_mib(device),
            "attention": attention,
            "grad_clip": args.max_grad_norm, "ema": args.ema, "warmup": args.train_warmup,
            "repeats": args.train_repeats, "tf32": True,
            "timed": "train.py loop body: rearrange, DDPMScheduler.add_noise, "
                     f"ACDiT.forward ({'bf16 autocast' if train_dtype else 'fp32'}), "
                     "mse_loss, backward, clip_grad_norm_, AdamW.step" + (", update_ema" if args.ema else ""),
        }
        optimizer.zero_grad(set_to_none=True)
        del optimizer, ema
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if not args.skip_sample:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        torch.backends.cuda.matmul.allow_tf32 = False  # sample_img.py does not touch PyTorch's default
        batch = args.sample_batch
        labels = torch.arange(batch, device=device) % cfg["num_classes"]
        target_shape = (batch, model.ar_len, model.block_size, channels)

        def sample() -> torch.Tensor:  # sample_img.py's samples_case up to the decode
            sample_scheduler = DPMSolverMultistepScheduler.from_config(DDIMScheduler().config)
            return model.sample(labels, sample_scheduler, args.sample_steps, cfg=args.cfg,
                                target_shape=target_shape, dtype=torch.float)

        common.reset_peak(device)
        seconds = common.median_seconds(sample, warmup=args.sample_warmup, repeats=args.sample_repeats,
                                        device=device)
        result["sample"] = {
            "img_per_s": batch / seconds, "s_per_batch": seconds, "batch_size": batch, "precision": "fp32",
            "cfg": args.cfg, "steps": args.sample_steps, "blocks": model.ar_len,
            "forward_passes": model.ar_len * args.sample_steps, "peak_memory_mib": common.peak_memory_mib(device),
            "decode": "excluded", "warmup": args.sample_warmup, "repeats": args.sample_repeats, "tf32": False,
            "timed": "ACDiT.sample(labels, DPMSolverMultistepScheduler.from_config(DDIMScheduler().config), "
                     f"{args.sample_steps}, cfg={args.cfg}, target_shape={list(target_shape)}, dtype=torch.float)",
        }
    return common.report(args, result)


if __name__ == "__main__":
    main()
