#!/usr/bin/env bash
# The FLUX.1 GPU benchmark (tests/bench_flux.py) on a lent GPU machine: one H100 80 GB or H200 141 GB whose python3
# (3.12) has torch, transformers, accelerate, safetensors, tokenizers, sentencepiece and huggingface_hub but not
# diffusers, and no network. From the repository root, in one call of the device tool:
#
#     run  command: bash tests/device_flux.sh     carry: [".whl"]     timeout_s: 600
#
# .whl/ holds diffusers' wheel, ignored by git (`echo /.whl/ >> .git/info/exclude`), fetched on this side with
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         -d .whl diffusers==0.42.1
#
# (a pure-Python wheel, 6.4 MB). Nothing else is needed: diffusers 0.42.1 requires importlib_metadata, filelock,
# huggingface-hub>=1.32.0,<3.0, numpy, regex, requests, safetensors>=0.8.0 and Pillow, which the image has (its
# huggingface_hub 1.33.0, safetensors 0.8.0), importlib_metadata aside: diffusers imports Python's own
# importlib.metadata on Python >= 3.8.
#
# What it runs, each step's log (and figures as JSON) under $OUT:
#   1. the wheels into /tmp/site; the GPU and the versions;
#   2. the mid-size model in float32 on the GPU, 256 px, 4 steps: the paths must agree (relative difference at most
#      1e-4), which checks the reference's device moves and draws there (a minute at most);
#   3. FLUX.1-dev's full size in bf16 at 1024 px, 28 steps, both methods, each path once to warm up and twice timed,
#      then ours with --offload-text: an edit is 4.2 PFLOP (RF-Inversion, 28 + 28 transformer calls) or 3.6 PFLOP
#      (FlowEdit, 24 calls of 2 rows), about 10 s and 9 s at 400 TFLOP/s; with the build and the offloaded runs'
#      transfers about 4 minutes, 6.5 at 250 TFLOP/s and slow copies; cut at 7.5 so that the logs come back.
set -uo pipefail
OUT=${OUT:-/tmp/device_flux}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2
  python3 -c "import sys, torch, transformers, diffusers
print(sys.version.split()[0], torch.__version__, transformers.__version__, diffusers.__version__)"; } 2>&1 \
    | tee "$OUT/machine.txt"
timeout 80 python3 -m tests.bench_flux --config mid --device cuda --dtype float32 --size 256 --steps 4 --repeat 1 \
    --json "$OUT/flux_mid_fp32.json" 2>&1 | tee "$OUT/flux_mid_fp32.log"
mid=$?
timeout 450 python3 -m tests.bench_flux --config full --device cuda --dtype bfloat16 --size 1024 --steps 28 \
    --repeat 2 --warmup 1 --offload-text --json "$OUT/flux_full_bf16.json" 2>&1 | tee "$OUT/flux_full_bf16.log"
full=$?
echo "exit status: mid fp32 $mid, full bf16 $full (124: cut by its timeout)"
exit $((mid || full))
