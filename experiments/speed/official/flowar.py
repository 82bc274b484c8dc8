"""Speed of the official FlowAR-S code (OliverRensu/FlowAR) with random weights, as the official FlowAR-S figures were taken.

The model is `models.flowar.flowar_small` built with the arguments of the README's FlowAR-S commands
(`--model flowar_small --diffloss_d 2 --diffloss_w 1024`, the other `main_flowar.py` defaults: dropout 0.1,
label drop 0.1, buffer 0, KL-16 latents 16×16×16 at 256 px), 171.7M parameters. TF32 matmuls and cudnn.benchmark
are switched on as `main_flowar.py` and `eval.py` do. What is timed (median of the repeats, warm-up excluded):

- train: one iteration of the loop body of `engine.train_one_epoch` with cached latents: the official
  `DiagonalGaussianDistribution(moments).sample().mul_(0.2325)` on random moments, `model(x, labels)` in fp32,
  `loss.item()`, the official `NativeScalerWithGradNormCount` (GradScaler, unscale, clip_grad_norm 3.0, AdamW step
  with `add_weight_decay` groups 0.02, betas 0.9/0.95), `zero_grad`, and the official `engine.update_ema` (0.9999).
  Left out: the per-iteration lr schedule and metric logging (host-side bookkeeping).
- train_core: forward + loss + backward + the same AdamW step only (no scaler, clipping or EMA), as ours is timed.
- train_with_encode: `train` preceded by the official `AutoencoderKL.encode` of random 256 px images under fp16
  autocast, as the README's training command runs it (it does not pass `--use_cached`). Random VAE weights.
- sample: `FlowAR.sample_tokens(num_steps=25, guidance=0.9, cfg=4.3, labels)` under fp16 autocast, as
  `engine.evaluate` calls it for the README's FlowAR-S eval command: 5 scales, cfg ramped linearly over the scales
  from 1 to 4.3 (inside sample_tokens), 24 flow-head evaluations per scale at batch 2B. VAE decode excluded.

Run (from the repository root):
    python experiments/speed/official/flowar.py --repo /path/to/FlowAR [--tiny] [--out x.json]
Extra flags besides common.py's: --build-only (build on the CPU, print parameters, exit), --skip-encode,
--cfg 4.3, --guidance 0.9, --num-steps 25. --tiny shrinks width and depth (same scales and latent) and defaults to
batch 2, one repeat, no warm-up. On a CPU sampling and VAE encoding run in fp32, without autocast (fp16 is the GPU
setting; bf16 autocast is many times slower on a CPU without AMX).
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from arvision import bench  # noqa: E402

PRESETS = ["flowar_s"]
# main_flowar.py's arguments for FlowAR-S (README training / eval commands, the rest its defaults).
MODEL_ARGS = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, label_drop_prob=0.1, class_num=1000,
                  attn_dropout=0.1, proj_dropout=0.1, buffer_size=0, diffloss_d=2, diffloss_w=1024,
                  use_checkpoint=False)
# CPU-sized: the scales (1…16) and the 16-channel latent are hard-coded in sample_tokens, so only width and depth
# shrink. The flow head has diffloss_w // 64 heads, so 64 is its smallest width.
TINY_MODEL = dict(encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=64, decoder_depth=1,
                  decoder_num_heads=2, mlp_ratio=4, diffloss_d=1, diffloss_w=64)
TINY_DEFAULTS = dict(train_batch=2, sample_batch=2, train_warmup=0, train_repeats=1, sample_warmup=0,
                     sample_repeats=1)
LATENT_SCALE = 0.2325  # engine.py: posterior.sample().mul_(0.2325)
LR = 5e-5 * 2048 / 256  # README: blr 5e-5 at total batch 2048 (the value does not change the speed)
WEIGHT_DECAY, BETAS, GRAD_CLIP, EMA_RATE = 0.02, (0.9, 0.95), 3.0, 0.9999  # main_flowar.py defaults
VAE_CH_MULT = (1, 1, 2, 2, 4)  # main_flowar.py: MAR's KL-16


def parse() -> argparse.Namespace:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--build-only", action="store_true")
    extra.add_argument("--skip-encode", action="store_true")
    extra.add_argument("--cfg", type=float, default=4.3)  # README's FlowAR-S eval (eval.sh says 4.2)
    extra.add_argument("--guidance", type=float, default=0.9)
    extra.add_argument("--num-steps", type=int, default=25)
    own, rest = extra.parse_known_args()
    given = {a.split("=")[0] for a in rest if a.startswith("--")}
    sys.argv[1:] = rest
    args = common.parse_args(__doc__.splitlines()[0] + " Also: --build-only, --skip-encode, --cfg, --guidance, "
                             "--num-steps (see the module docstring).", PRESETS)
    vars(args).update(vars(own))
    if args.tiny:  # small defaults unless the flag was given
        for name, value in TINY_DEFAULTS.items():
            if "--" + name.replace("_", "-") not in given:
                setattr(args, name, value)
    return args


def load_official(repo: Path) -> types.SimpleNamespace:
    stubbed = []
    with common.official_imports(repo):
        from models import flowar, vae
        import util.misc as misc
        # engine.py imports torch_fidelity and cv2 at module level for its FID evaluation only; stand-ins where they
        # are missing let its update_ema (the training loop's EMA step) be used as it is.
        for name in ("torch_fidelity", "cv2"):
            if importlib.util.find_spec(name) is None:
                sys.modules[name] = types.ModuleType(name)
                stubbed.append(name)
        import engine
    for module in (flowar, vae, misc, engine):  # another `models` / `util` on sys.path would shadow the checkout's
        if repo.resolve() not in Path(module.__file__).resolve().parents:
            raise SystemExit(f"{module.__name__} was imported from {module.__file__}, not from {repo}")
    return types.SimpleNamespace(flowar=flowar, vae=vae, misc=misc, engine=engine, stubbed=stubbed)


def allow_cpu(device: torch.device) -> None:
    """The official forward, sample_tokens and RoPE call `.cuda()` on new tensors: on a CPU run that is a no-op."""
    if device.type == "cpu":
        torch.Tensor.cuda = lambda self, *args, **kwargs: self


def build_model(off: types.SimpleNamespace, tiny: bool) -> torch.nn.Module:
    if tiny:
        norm = functools.partial(torch.nn.LayerNorm, eps=1e-6)  # as flowar_small passes (unused by its blocks)
        return off.flowar.FlowAR(norm_layer=norm, **{**MODEL_ARGS, **TINY_MODEL})
    return off.flowar.flowar_small(**MODEL_ARGS)


def build_vae(off: types.SimpleNamespace, tiny: bool) -> torch.nn.Module:
    vae = off.vae.AutoencoderKL(embed_dim=16, ch_mult=VAE_CH_MULT, ckpt_path=None)  # random weights
    if tiny:  # a narrow encoder with the same stride, so that encoding 256 px on a CPU takes a second
        vae.encoder = off.vae.Encoder(ch=32, ch_mult=VAE_CH_MULT, num_res_blocks=1, z_channels=16)
    del vae.decoder  # never run: decode is excluded everywhere
    for p in vae.parameters():
        p.requires_grad = False
    return vae.eval()


def bench_train(model: torch.nn.Module, off: types.SimpleNamespace, args: argparse.Namespace,
                device: torch.device) -> dict[str, Any]:
    batch = args.train_batch
    model.train(True)
    optimizer = torch.optim.AdamW(off.misc.add_weight_decay(model, WEIGHT_DECAY), lr=LR, betas=BETAS)
    loss_scaler = off.misc.NativeScalerWithGradNormCount()
    model_params = list(model.parameters())
    ema_params = copy.deepcopy(model_params)  # main_flowar.py when training from scratch
    labels = torch.randint(0, 1000, (batch,), device=device)
    moments = torch.randn(batch, 32, 16, 16, device=device)  # what the latent cache serves: mean and logvar

    def cached_latents() -> torch.Tensor:
        return off.vae.DiagonalGaussianDistribution(moments).sample().mul_(LATENT_SCALE)

    def official_step(latents) -> None:
        with torch.no_grad():
            x = latents()
        loss = model(x, labels)
        loss.item()  # engine checks the loss is finite every step: a host sync
        loss_scaler(loss, optimizer, clip_grad=GRAD_CLIP, parameters=model.parameters(), update_grad=True)
        optimizer.zero_grad()
        bench.synchronize(device)  # engine synchronises before the EMA update
        off.engine.update_ema(ema_params, model_params, rate=EMA_RATE)

    x_fixed = cached_latents()

    def core_step() -> None:
        loss = model(x_fixed, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    steps = {"train": lambda: official_step(cached_latents), "train_core": core_step}
    if not args.skip_encode:
        vae = build_vae(off, args.tiny).to(device)
        images = torch.randn(batch, 3, 256, 256, device=device)
        encode_dtype = common.gpu_dtype(device, torch.float16)

        def encoded_latents() -> torch.Tensor:
            with common.autocast(device, encode_dtype):  # engine: torch.no_grad(), torch.cuda.amp.autocast()
                posterior = vae.encode(images)
            return posterior.sample().mul_(LATENT_SCALE)

        steps["train_with_encode"] = lambda: official_step(encoded_latents)

    results = {}
    for name, step in steps.items():
        common.reset_peak(device)
        seconds = common.median_seconds(step, warmup=args.train_warmup, repeats=args.train_repeats, device=device)
        results[name] = {"img_per_s": batch / seconds, "step_ms": 1e3 * seconds, "batch_size": batch,
                         "precision": "tf32" if device.type == "cuda" else "fp32",
                         "peak_memory_mib": common.peak_memory_mib(device),
                         "warmup": args.train_warmup, "repeats": args.train_repeats}
    if "train_with_encode" in results:
        results["train_with_encode"]["vae_encode_precision"] = "fp16" if encode_dtype else "fp32"
    model.zero_grad(set_to_none=True)  # the optimiser state and EMA copy go with this frame
    return results


def bench_sample(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    batch = args.sample_batch
    model.eval()
    labels = torch.randint(0, 1000, (batch,), device=device)
    dtype = common.gpu_dtype(device, torch.float16)

    def sample() -> torch.Tensor:
        with torch.no_grad(), common.autocast(device, dtype):  # engine.evaluate: torch.cuda.amp.autocast()
            return model.sample_tokens(num_steps=args.num_steps, guidance=args.guidance, cfg=args.cfg, labels=labels)

    common.reset_peak(device)
    seconds = common.median_seconds(sample, warmup=args.sample_warmup, repeats=args.sample_repeats, device=device)
    return {"img_per_s": batch / seconds, "s_per_batch": seconds, "batch_size": batch,
            "precision": "fp16" if dtype is torch.float16 else "fp32", "cfg": args.cfg, "steps": args.num_steps,
            "peak_memory_mib": common.peak_memory_mib(device), "decode": "excluded",
            "guidance_high": args.guidance, "cfg_schedule": f"linear over the 5 scales, 1 → {args.cfg}",
            # euler_sampler's schedule (num_steps != 50) has 2 * (num_steps // 2) + 1 points: 24 Euler steps for 25
            "flow_evals_per_scale": 2 * (args.num_steps // 2) if args.num_steps != 50 else 50,
            "flow_batch": 2 * batch if args.cfg != 1.0 else batch,
            "warmup": args.sample_warmup, "repeats": args.sample_repeats}


def main() -> None:
    args = parse()
    if args.build_only:
        args.device = "cpu"
    device = torch.device(args.device)
    # as main_flowar.py and eval.py set them at import
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(1)
    allow_cpu(device)
    off = load_official(args.repo)
    model = build_model(off, args.tiny)
    result: dict[str, Any] = {"model": "flowar_s", "preset": args.preset, "params": common.count_parameters(model),
                              "params_flow_head": common.count_parameters(model.flownet),
                              "official_repo": str(args.repo), "stubbed_imports": off.stubbed,
                              "model_args": {**MODEL_ARGS, **(TINY_MODEL if args.tiny else {})}}
    print(f"flowar_s official params: {result['params']} (flow head {result['params_flow_head']})")
    if args.build_only:
        common.report(args, result)
        return
    model.to(device)
    if not args.skip_train:
        phases = bench_train(model, off, args, device)
        result["train"] = phases.pop("train")
        result.update(phases)
        for name, r in phases.items():
            print(f"flowar_s official {name}: {r['img_per_s']:.1f} img/s ({r['step_ms']:.1f} ms/step)")
    if not args.skip_sample:
        result["sample"] = bench_sample(model, args, device)
    common.report(args, result)


if __name__ == "__main__":
    main()
