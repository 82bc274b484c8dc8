"""Speed of the official LlamaGen code (FoundationVision/LlamaGen), random weights, as the official GPT-B/L figures were taken.

    python experiments/speed/official/llamagen.py --repo <LlamaGen checkout> --preset gpt_b [--out x.json] [--tiny]

Timed, on GPT-B (111M) or GPT-L (343M), class-conditional, 16×16 = 256 tokens of a 16384-code VQ, batch 64:
- train: the loop body of autoregressive/train/train_c2i.py on code indices given (LlamaGen trains on codes
  extracted beforehand, as arvision's token cache serves): `model(cond_idx, idx[:, :-1], targets)` under bf16
  autocast (`--mixed-precision bf16`), backward, grad-norm clip 1.0, the fused AdamW of its `creat_optimizer`
  (weight decay 0.05 on ≥ 2-D parameters), dropout 0.1 as its defaults; eager by default (train_c2i.py compiles
  unless `--no-compile`: pass `--compile` to measure that);
- sample: `autoregressive.models.generate.generate` as sample_c2i.py calls it (weights cast to bf16, cfg 2.0,
  256 steps, top-k 2000, top-p 1.0, temperature 1.0), decode excluded; eager by default, `--compile` compiles the
  model as sample_c2i.py's `--compile` does (mode reduce-overhead, fullgraph).
On a CPU both run in fp32 (no autocast, fp32 weights): bf16 is the GPU setting and crawls on CPUs without AMX.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

SIZES = {"gpt_b": "GPT-B", "gpt_l": "GPT-L"}


def extra_flags(parser) -> None:
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--top-k", type=int, default=2000)
    parser.add_argument("--compile", action="store_true", help="torch.compile as LlamaGen's scripts can")
    parser.add_argument("--build-only", action="store_true")


def main() -> dict:
    args = common.parse_args("official LlamaGen speed", list(SIZES), extra_flags)
    device = torch.device(args.device)
    vocab, grid = 16384, 16
    if args.tiny:  # a CPU-sized GPT that runs the same code paths in seconds
        vocab, grid = 512, 4
        args.train_batch = args.sample_batch = 2
        args.train_warmup = args.sample_warmup = 0
        args.train_repeats = args.sample_repeats = 1
    with common.official_imports(args.repo):
        from autoregressive.models.generate import generate
        from autoregressive.models.gpt import GPT_models, ModelArgs, Transformer

        def build(**kw):
            if args.tiny:
                return Transformer(ModelArgs(n_layer=2, n_head=2, dim=64, **kw))
            return GPT_models[SIZES[args.preset]](**kw)

        model_kw = dict(vocab_size=vocab, block_size=grid * grid, num_classes=1000, cls_token_num=1,
                        model_type="c2i")
        model = build(**model_kw, resid_dropout_p=0.1, ffn_dropout_p=0.1, drop_path_rate=0.0,
                      token_dropout_p=0.1).to(device)
    result = {"model": f"llamagen_{args.preset}", "preset": args.preset, "params": common.count_parameters(model),
              "compile": args.compile}
    print(f"LlamaGen {SIZES[args.preset]}{' (tiny)' if args.tiny else ''}: {result['params'] / 1e6:.1f}M parameters")
    if args.build_only:
        return result
    torch.manual_seed(0)

    if not args.skip_train:
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
        trained = torch.compile(model) if args.compile else model
        trained.train()
        batch = args.train_batch
        codes = torch.randint(0, vocab, (batch, grid * grid), device=device)
        labels = torch.randint(0, 1000, (batch,), device=device)

        train_dtype = common.gpu_dtype(device, torch.bfloat16)

        def step() -> None:  # train_c2i.py's loop body (bf16: no grad scaler)
            with common.autocast(device, train_dtype):
                _, loss = trained(cond_idx=labels, idx=codes[:, :-1], targets=codes)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        common.reset_peak(device)
        seconds = common.median_seconds(step, warmup=args.train_warmup, repeats=args.train_repeats, device=device)
        result["train"] = {"img_per_s": batch / seconds, "step_ms": 1e3 * seconds, "batch_size": batch,
                           "precision": "bf16" if train_dtype else "fp32",
                           "peak_memory_mib": common.peak_memory_mib(device)}
        del optimizer, trained

    if not args.skip_sample:
        sample_dtype = common.gpu_dtype(device, torch.bfloat16) or torch.float32
        model = model.to(dtype=sample_dtype).eval()  # sample_c2i.py: .to(device, dtype=precision)
        sampler_model = model
        if args.compile:  # sample_c2i.py --compile
            sampler_model = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        batch = args.sample_batch
        labels = torch.arange(batch, device=device) % 1000
        top_k = min(args.top_k, vocab)

        @torch.inference_mode()
        def sample() -> None:
            generate(sampler_model, labels, grid * grid, cfg_scale=args.cfg, cfg_interval=-1, temperature=1.0,
                     top_k=top_k, top_p=1.0, sample_logits=True)

        common.reset_peak(device)
        seconds = common.median_seconds(sample, warmup=args.sample_warmup, repeats=args.sample_repeats,
                                        device=device)
        result["sample"] = {"img_per_s": batch / seconds, "s_per_batch": seconds, "batch_size": batch,
                            "precision": "bf16 weights" if sample_dtype is torch.bfloat16 else "fp32",
                            "cfg": args.cfg, "top_k": top_k, "steps": grid * grid,
                            "decode": "excluded", "peak_memory_mib": common.peak_memory_mib(device)}
    return common.report(args, result)


if __name__ == "__main__":
    main()
