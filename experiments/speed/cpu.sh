#!/usr/bin/env bash
# The CPU benchmark of experiments/speed/README.md: every paradigm at the demo sizes (random weights), sampling at
# batch 64 and, for the two discrete AR pairs, at batch 1 (the latency-bound regime of VAR's speed claim).
#   bash experiments/speed/cpu.sh [out_dir]      (default outputs/speed/cpu)
set -euo pipefail
out=${1:-outputs/speed/cpu}
mkdir -p "$out"
bench() {  # name, then overrides
  local name=$1; shift
  arvision-bench "$@" out="$out/$name.json" hydra.run.dir="$out/hydra/$name" > "$out/$name.log" 2>&1
  echo "$name: $out/$name.json"
}
bench raster_vq tokenizer=vq generator=raster
bench next_scale_msvq tokenizer=msvq generator=next_scale
bench flexvar_vq tokenizer=vq generator=next_scale generator.residual=false
bench flowar_vae tokenizer=vae generator=flowar
bench acdit_vae tokenizer=vae generator=acdit
for b in 1 8; do
  bench raster_vq_b$b tokenizer=vq generator=raster sample.batch_size=$b sample.repeats=5 train.repeats=2
  bench next_scale_msvq_b$b tokenizer=msvq generator=next_scale sample.batch_size=$b sample.repeats=5 train.repeats=2
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
rows = []
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    s, n = r.get("sample_cfg", {}), r.get("sample_no_cfg", {})
    rows.append(f"| {f.stem} | {r['params']['generator'] / 1e6:.2f} | {r['train']['img_per_s']:.1f} | "
                f"{s.get('batch_size', '-')} | {s.get('img_per_s_decode_excluded', 0):.1f} | "
                f"{s.get('img_per_s_decode_included', 0):.1f} | {n.get('img_per_s_decode_excluded', 0):.1f} | "
                f"{s.get('network_evaluations', '-')} |")
print("| run | params (M) | train img/s | sample batch | sample img/s (cfg, decode excl.) | (cfg, decode incl.) "
      "| (no cfg, decode excl.) | NFE/image |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
print("\n".join(rows))
PY
