#!/bin/sh
# Everything flash_attention.py needs a GPU for, in one command, from the repository root:
#     sh bench/gpu_checks.sh 2>&1 | tee gpu_checks.log
# 1. the CPU test file, now on CUDA (compiled kernels, fp32 with IEEE dots and fp16);
# 2. what the compiler says about every kernel variant (registers, spills, shared memory);
# 3. bf16 accuracy vs an fp32 reference, next to SDPA's (d64/d128, N up to 16k);
# 4. the speed table vs SDPA's flash and cuDNN backends and the dense-mask baseline.
# Not yet timed end to end (written without a GPU at hand); if one call must stay under ~10 minutes,
# run steps 1-2 and steps 3-4 as two calls. Block sizes are retuned with `python bench/attention.py --sweep`.
set -e
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
$PYTHON -m pytest -q tests/test_flash_attention.py
$PYTHON bench/compile_check.py
$PYTHON bench/attention.py --check
$PYTHON bench/attention.py
