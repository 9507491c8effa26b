#!/usr/bin/env bash
# Every GPU figure of the project, prepared for one short lease of a CUDA machine that has torch and
# transformers installed (no install step, no network, no model download: whole-model steps use SmolLM2-135M's
# architecture with random weights). Run from the repository root:
#
#   bash benchmarks/gpu.sh [PARTS] [OUTDIR]     PARTS: all (default) or a comma list of tests, layer, model;
#                                               OUTDIR: results/gpu
#
#   tests  the CUDA tests CI skips (bf16 grouped path vs the fp32 reference, compiled vs eager, no host sync)
#   layer  one MoE layer, fwd+bwd in bf16 against a dense SwiGLU of equal active FLOPs, at the three anchor shapes
#          (d=576 E=8 top-2 16k tokens; d=4096 d_ff=14336 E=8 top-2 8k; d=2048 d_ff=1024 E=64 top-8 16k) with
#          transformers' Mixtral block (grouped_mm, eager) and torch.compile rows; expert choice C=2; BAM's
#          mixture of attention                                           (estimated 6 minutes on an H200)
#   model  whole-model training steps: dense, dense of ours' active FLOPs, ours, the stock Qwen2-MoE / Mixtral
#          exports; then ours against Qwen2-MoE and against the equal-FLOPs dense model in one process,
#          alternating steps                                              (estimated 4 minutes)
#
# One device command runs at most 10 minutes: run `tests,layer` in one call and `model` in the next (the machine
# stays warm between calls made back to back), each with OUTDIR=$OUT. Writes one markdown file per benchmark and
# the whole log (gpu_log.txt) to OUTDIR: 6 files for tests,layer and 4 for model, each call within the 8 files
# a device call brings back. A step that fails is logged and the others still run; the exit status
# is 1 if any failed. Each step is stopped after STEP_TIMEOUT seconds (default 300), so one that hangs cannot
# use up a lease. (Written and checked on a CPU machine: the timings above are estimates until a first GPU run.)
#
#   SMOKE=1 DEVICE=cpu bash benchmarks/gpu.sh all /tmp/gpu-smoke    # the same steps at tiny sizes, any machine
set -uo pipefail
part=${1:-all}
out=${2:-results/gpu}
for p in ${part//,/ }; do
    case "$p" in all | tests | layer | model) ;; *) echo "unknown part '$p': all, or a comma list of tests, layer, model" >&2; exit 2 ;; esac
done
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/gpu_log.txt"
limit=${STEP_TIMEOUT:-300}
dev=${DEVICE:-cuda}
small_layer=() small_model=()
if [ "${SMOKE:-0}" = 1 ]; then  # a plumbing check: every step, tiny shapes (the later flags win)
    small_layer=(--d 64 --d-ff 128 --tokens 64 --reps 1 --warmup 1 --min-sample-ms 1 --dtype bfloat16)
    [ "$dev" = cpu ] && small_layer+=(--compile-backend aot_eager)  # inductor on a CPU wants a C++ compiler
    small_model=(--batch 1 --seq 16 --steps 1 --warmup 1 --rounds 1)
fi
status=0

step() {
    echo "== $(date -u +%H:%M:%S) $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local s=${PIPESTATUS[0]}
    if [ "$s" != 0 ]; then
        echo "!! exit $s: $*" | tee -a "$log"
        status=1
    fi
}

want() { [ "$part" = all ] || [[ ",$part," == *",$1,"* ]]; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true; } | tee -a "$log"
$py -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(), "transformers", transformers.__version__)' 2>&1 | tee -a "$log"

if want tests; then
    step $py -m pytest -q -p no:cacheprovider tests/test_compile.py tests/test_moe.py
fi
if want layer; then
    # compiled rows (inductor compiles take a while) at the two shapes where dispatch, not the matmuls, decides
    L="$py benchmarks/moe_layer.py --device $dev --backend grouped --reps 5 --min-sample-ms 50 --quiet"
    step $L --compile --tokens 16384 "${small_layer[@]}" --out "$out/moe_layer_cuda_d576.md"
    step $L --d 4096 --d-ff 14336 --tokens 8192 "${small_layer[@]}" --out "$out/moe_layer_cuda_d4096.md"
    step $L --compile --d 2048 --d-ff 1024 --experts 64 --top-k 8 --tokens 16384 "${small_layer[@]}" \
        --out "$out/moe_layer_cuda_e64.md"
    step $L --router expert_choice --tokens 16384 "${small_layer[@]}" --out "$out/moe_layer_cuda_ec.md"
    small_moa=()
    [ "${SMOKE:-0}" = 1 ] && small_moa=(--tokens 64 --seq 32 --reps 1 --warmup 1 --min-sample-ms 1 --dtype bfloat16)
    step $py benchmarks/moa_layer.py --device $dev --tokens 16384 "${small_moa[@]}" --out "$out/moa_layer_cuda.md"
fi
if want model; then
    M="$py benchmarks/train_speed.py --device $dev --weights random --batch 16 --seq 1024"
    step $M --steps 5 "${small_model[@]}" --out "$out/train_speed_cuda.md"
    step $M --pair ours qwen2_moe --rounds 10 "${small_model[@]}" --out "$out/train_speed_pair_cuda.md"
    step $M --pair dense_eq ours --rounds 10 "${small_model[@]}" --out "$out/train_speed_pair_dense_cuda.md"
fi
echo "== done, status $status; files in $out" | tee -a "$log"
exit $status
