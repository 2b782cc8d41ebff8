#!/usr/bin/env bash
# Everything a short lease on a CUDA machine should run, in priority order, each step time-boxed and
# logged under $OUT (default ./gpu_check): GPT-2 124M training speed (bf16, fused AdamW, flash SDPA,
# torch.compile) with torch's own attention kernel and with flash's first, after the GPU tests (CUDA training, KV
# cache, NCCL DDP/FSDP2, compile, `train.attention`, the CLI's eval and generate --compile).
# Needs a CUDA build of torch and lmforge's dependencies; lmforge itself runs from this checkout.
#
#     bash bench/gpu_check.sh             # about 7 minutes on one H100 or H200
#     GPU_TESTS=0 bash bench/gpu_check.sh # the speed rows alone
#     ONLY="tests speed_compile_b64_nolog" bash bench/gpu_check.sh  # the steps named (a short lease)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
GPT2=(bench/train_speed.py --device cuda --dtype bfloat16 --presets gpt2-124m --steps 30 --warmup 5 --nominal-peak 989.4)

step() {  # step NAME SECONDS CMD...: run CMD with a time limit, log to $OUT/NAME.txt, say how it ended
    local name=$1 limit=$2
    shift 2
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
    local t0=$SECONDS
    # a fresh inductor cache per step: a cached graph would hide both the compile time and an attention
    # kernel change (the AOTAutograd cache does not key on the SDPA kernel order)
    # (CACHE=DIR shares one cache between the steps instead: a short lease's rows then compile once)
    TORCHINDUCTOR_CACHE_DIR=${CACHE:-$(mktemp -d)} timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    tail -n 8 "$OUT/$name.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

[ "${GPU_TESTS:-1}" = 0 ] || step tests 300 $PY -m pytest -q -p no:cacheprovider -n 0 -m gpu tests/test_gpu.py tests/test_gpu_dist.py
step speed_compile_b64 150 $PY "${GPT2[@]}" --batch 64 --compile on --vocab-size 50304 --profile 3
# log steps (each syncs the host) only where a train() call ends: the idle time left in steady state
step speed_compile_b64_nolog 150 $PY "${GPT2[@]}" --batch 64 --compile on --vocab-size 50304 --profile 8 --log-every 1000
# CUDA graphs (`--train.compile_mode reduce-overhead`): no launch gaps between kernels
step speed_compile_b64_cudagraphs 150 $PY "${GPT2[@]}" --batch 64 --compile on --vocab-size 50304 --compile-mode reduce-overhead --profile 3
# GPT-2's own recipe: ~0.5M tokens per optimizer step, 8 micro-batches of 64 x 1024
step speed_compile_b64_accum8 150 $PY "${GPT2[@]}" --batch 64 --accum 8 --steps 8 --compile on --vocab-size 50304
step speed_compile_b64_flash 120 $PY "${GPT2[@]}" --batch 64 --compile on --vocab-size 50304 --attention flash
step speed_eager_b32 90 $PY "${GPT2[@]}" --batch 32 --vocab-size 50304
step speed_eager_b32_flash 90 $PY "${GPT2[@]}" --batch 32 --vocab-size 50304 --attention flash
step speed_compile_b32 120 $PY "${GPT2[@]}" --batch 32 --compile on --vocab-size 50304
step speed_compile_b32_flash 120 $PY "${GPT2[@]}" --batch 32 --compile on --vocab-size 50304 --attention flash
