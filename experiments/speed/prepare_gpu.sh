#!/usr/bin/env bash
# Gets a checkout ready for experiments/speed/gpu_suite.py on a GPU machine that cannot download anything:
#   .official/  the official code (VAR, LlamaGen, FlowAR, ACDiT) at their default branches, never committed;
#   .whl/       wheels of what the suite needs beyond an image with torch, lightning, torchmetrics, timm and einops.
# Both folders are git-ignored through .git/info/exclude. Run it where the network is, then copy both folders into
# the checkout on the GPU machine:
#   bash experiments/speed/prepare_gpu.sh [dir with mirrors <owner>+<name>/repo (git dirs); default: clone GitHub]
set -euo pipefail
cd "$(dirname "$0")/../.."
mirrors=${1:-}
for ignored in /.official/ /.whl/; do grep -qxF "$ignored" .git/info/exclude || echo "$ignored" >> .git/info/exclude; done
mkdir -p .official .whl
for pair in FoundationVision/VAR:VAR FoundationVision/LlamaGen:LlamaGen wangqiang9/FlowAR:FlowAR thunlp/ACDiT:ACDiT; do
  repo=${pair%%:*}; dest=.official/${pair##*:}
  [ -d "$dest" ] && { echo "$dest: present"; continue; }
  if [ -n "$mirrors" ]; then  # a bare mirror: its source files only (large blobs may be absent)
    git_dir="$mirrors/${repo/\//+}/repo"
    git --git-dir="$git_dir" ls-tree -r --name-only HEAD | grep -E '\.(py|txt|sh|json|yaml)$' | while read -r f; do
      mkdir -p "$dest/$(dirname "$f")"; git --git-dir="$git_dir" show "HEAD:$f" > "$dest/$f"; done
  else
    git clone -q --depth 1 "https://github.com/$repo" "$dest"
  fi
  echo "$dest: $(git --git-dir="${git_dir:-$dest/.git}" rev-parse HEAD 2>/dev/null || echo checked out)"
done
# Python 3.12 wheels (the GPU image's Python); antlr4's 4.9.3 exists only as an sdist, so a wheel is built from it.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 torch-fidelity==0.4.0 diffusers==0.31.0 importlib_metadata==10.2.0
ls .whl/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1 || python3 -m pip wheel -q --no-deps -w .whl \
  antlr4-python3-runtime==4.9.3
du -sh .official .whl
