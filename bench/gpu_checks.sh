#!/bin/sh
# Every check that needs a GPU, in one command, from the repository root (nothing here runs in CI):
#     sh bench/gpu_checks.sh
# The steps, run in this order by default (what the open issues need first; a lent GPU may be short):
# 3. bf16 accuracy of the kernel vs an fp32 reference, next to SDPA's (d64/d128, N up to 16k);
# 4. the attention speed table vs SDPA's flash and cuDNN backends and the dense-mask baseline;
# 6. pretrain.py's training step vs a plain transformers loop (Qwen3-1.7B shape, 4×2048, bf16);
# 1. the kernel's tests and the whole model through the kernel, on CUDA (compiled kernels, fp32 with
#    IEEE dots and fp16), and pretrain.py under --fsdp --cpu-offload on one GPU;
# 5. model.py vs transformers, forward+backward (Qwen3-0.6B shape, bf16);
# 2. what the compiler says about every kernel variant (registers, spills, shared memory);
# 7. the deepest Qwen3-1.7B-width model each training contender fits on this GPU (slow);
# 8. the block-size sweep of the kernel (chooses flash_attention._GPU_CONFIGS for this GPU).
# STEPS="3 4" picks and orders steps. Every step runs even when an earlier one fails; the exit status
# says whether all that ran passed. Each step's output also goes to $LOGS/step_N.log (LOGS defaults to
# $OUT, which the device tool sets, else gpu_checks_logs/). DEADLINE=S (seconds from the start; none by
# default) stops a step when the time is up (what it printed so far is kept: the tables print row by
# row) and skips the rest, so one call under a 10-minute limit returns whatever finished:
#     DEADLINE=540 sh bench/gpu_checks.sh
# Not yet run on a GPU (written without one at hand).
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-"3 4 6 1 5 2 7 8"}
LOGS=${LOGS:-${OUT:-gpu_checks_logs}}
DEADLINE=${DEADLINE:-0}
mkdir -p "$LOGS"
start=$(date +%s)
failed=""
skipped=""
# what ran: the numbers below depend on these (the scripts were written against torch 2.14, triton 3.8,
# transformers 5.25; bench/compile_check.py also passes with triton 3.6)
$PYTHON -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__,
'| transformers', transformers.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
  2>&1 | tee "$LOGS/versions.log"
for s in $STEPS; do
  case $s in
    1) cmd="$PYTHON -m pytest -q tests/test_flash_attention.py tests/test_model_triton.py \
         tests/test_pretrain.py::test_cpu_offload_trains_like_fsdp_on_the_gpu" ;;
    2) cmd="$PYTHON bench/compile_check.py" ;;
    3) cmd="$PYTHON bench/attention.py --check" ;;
    4) cmd="$PYTHON bench/attention.py" ;;
    5) cmd="$PYTHON bench/forward.py --preset gpu" ;;
    6) cmd="$PYTHON bench/train.py --preset gpu" ;;
    7) cmd="$PYTHON bench/train.py --preset gpu --warmup 1 --iters 2 --max-layers 64" ;;
    8) cmd="$PYTHON bench/attention.py --sweep" ;;
    *) echo "no step $s"; failed="$failed $s"; continue ;;
  esac
  limit=""
  if [ "$DEADLINE" -gt 0 ]; then
    left=$((DEADLINE - ($(date +%s) - start)))
    if [ "$left" -lt 20 ]; then
      skipped="$skipped $s"
      continue
    fi
    limit="timeout -k 5 $left"
  fi
  echo "=== gpu_checks step $s ($(date +%T)${limit:+, ${left}s left}): $cmd"
  # (POSIX sh has no pipefail: the step's status goes through a file)
  { $limit sh -c "$cmd"; echo $? > "$LOGS/step_$s.status"; } 2>&1 | tee "$LOGS/step_$s.log"
  status=$(cat "$LOGS/step_$s.status")
  [ "$status" = 0 ] || failed="$failed $s"
  [ "$status" = 124 ] && echo "=== step $s stopped at the deadline"
done
echo "=== gpu_checks done ($(date +%T), $(($(date +%s) - start)) s); failed steps:${failed:- none};" \
     "skipped at the deadline:${skipped:- none}" | tee "$LOGS/summary.log"
[ -z "$failed" ]
