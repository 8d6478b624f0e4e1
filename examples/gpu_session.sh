#!/usr/bin/env bash
# The GPU work of the open issues, in calls that fit a lent device machine (10 min a command, 30 min a session).
#
#   bash examples/gpu_session.sh STEP [STEP ...]        # on the device machine, from the repository root
#
# Steps (each under its own `timeout`, each writing a log and its results under $OUT, default /tmp/out):
#   env       nvidia-smi, torch / triton / transformers versions, the copy and matmul ceilings (seconds)
#   tests     every Triton kernel test compiled for the real GPU (kernels, FP6, ParetoQ, integer ops) (~4 min)
#   int       issue #3: int8 / int4 GEMV and GEMM against FP16 torch.matmul, no decode run (examples/bench_kernels.py)
#   lowbit    issue #5: 1 / 1.58 / 2 / 3 / 4-bit GEMV against FP16 (examples/bench_lowbit_gemv.py)
#   fp6       issue #6: FP6 GEMV per channel and g128 against FP16 (examples/bench_fp6_gemv.py)
#   intops    issue #7: DI-MatMul at M = 2048 and the integer ops, checked against the reference (bench_intops.py)
#   illm      issue #7: a lowered LLaMA on CUDA equals the CPU reference bit for bit (examples/gpu_illm_check.py)
#
# The machine's own torch / triton / transformers are used; nothing is installed. fxquant is imported from the
# working tree through a PYTHONPATH shim (the package maps compiler/ -> fxquant, passes/ -> fxquant.passes,
# backends/ -> fxquant.backends), as in examples/results/gpu_tests_nvidia_h100.md.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# the shim is a folder of links under /tmp: the working tree is not touched
rm -rf /tmp/shim && mkdir -p /tmp/shim/fxquant
for f in "$PWD"/compiler/*; do ln -s "$f" /tmp/shim/fxquant/; done
ln -s "$PWD/passes" /tmp/shim/fxquant/passes
ln -s "$PWD/backends" /tmp/shim/fxquant/backends
export PYTHONPATH=/tmp/shim
PY=${PY:-python3}

summary=()
run() {  # run NAME SECONDS CMD...: a guarded step, its log under $OUT, one summary line
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-8s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$OUT/$name.log")")
    tail -n 5 "$OUT/$name.log"
}

pytest_gpu() {  # the kernel test files, compiled for the GPU, spread over 8 processes
    $PY -m pytest -q -rfE --tb=short --durations=5 -p no:cacheprovider -p fxquant.testing.plugin -n 8 "$@"
}

for step in "$@"; do
    case "$step" in
        env)
            run env 120 bash -c "nvidia-smi; $PY -c '
import torch, triton, transformers, time
print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())
x = torch.empty(1 << 30, dtype=torch.uint8, device=\"cuda\"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): y.copy_(x)
torch.cuda.synchronize(); print(\"copy GB/s (read+write)\", 2 * 20 * x.numel() / (time.perf_counter() - t) / 1e9)
a = torch.randn(8192, 8192, device=\"cuda\", dtype=torch.float16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); print(\"fp16 matmul TFLOP/s\", 10 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12)
'" ;;
        tests)
            run tests 560 pytest_gpu tests/test_kernels_triton.py tests/test_fp6_kernel.py tests/test_paretoq_kernel.py \
                tests/test_intops_triton.py ;;
        int)
            run int 560 $PY examples/bench_kernels.py --no-e2e --rows 1,16,64,256,2048 --out "$OUT/results" ;;
        lowbit)
            run lowbit 560 $PY examples/bench_lowbit_gemv.py --deadline 480 --out "$OUT/results" ;;
        fp6)
            run fp6 560 $PY examples/bench_fp6_gemv.py --deadline 480 --out "$OUT/results" ;;
        intops)
            run intops 560 $PY examples/bench_intops.py --check --out "$OUT/results" ;;
        illm)
            run illm 300 $PY examples/gpu_illm_check.py ;;
        *)
            echo "unknown step $step (env tests int lowbit fp6 intops illm)"; exit 2 ;;
    esac
done
printf '%s\n' "${summary[@]}"
