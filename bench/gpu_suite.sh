#!/usr/bin/env bash
# The GPU checks. `quick` is the whole proof in ONE call of <= 9 minutes (`python -m bench gpu`, bench/gpu.py: CUDA
# tests, ours + fp8 with the kernel recipe vs cache-dit's best stack at 1024² and 512², then the recipe ablation and
# Qwen-Image if time is left; writes summary.md). The exact call: bench/README.md, "gpu". The other parts are longer studies, each
# one device call of < 10 minutes, for sessions with more device time. The lent box has torch 2.11 but no diffusers / torchao / cache-dit / calflops and no
# internet: fetch their wheels here first (bench/fetch_wheels.sh), then call the device tool with carry [".whl"]
# and, from the repository root there:
#
#   bash bench/gpu_suite.sh quick --budget 520   # everything that matters in <= 9 minutes (python -m bench gpu)
#   bash bench/gpu_suite.sh tests        # CUDA tests: hand-captured and cudagraph-tree graphs, one sync per free step
#   bash bench/gpu_suite.sh tests-fp8    # fp8 with regional and segments (max-autotune) on the tiny FLUX; fp8
#                                        # threshold shift (python -m bench threshold-shift, tiny FLUX, bf16)
#   bash bench/gpu_suite.sh steps-1024   # FLUX.1-dev size 1024²: regional bf16 / fp8 cold compile + step times
#   bash bench/gpu_suite.sh steps-512    # 512²: regional bf16 with and without fused QKV: compile + step times
#   bash bench/gpu_suite.sh segments-512 # 512²: whole-segment graphs (cudagraph trees): compile + step times
#   bash bench/gpu_suite.sh e2e-1024     # 1024², 50 steps, F1B0_W4MC6 forced: ours vs cache-dit (+compile, +fp8)
#   bash bench/gpu_suite.sh cold-start-1024  # FLUX.1-dev size 1024², regional max-autotune: cold, warm same process,
#                                        # warm new process from compile_cache (issue #24's GPU row)
#
# Results land in $OUT (the device tool brings them back); copy them into bench/results/ and commit them with the
# card, torch version and date they carry.
set -euo pipefail
part=${1:?"usage: bash bench/gpu_suite.sh quick|tests|tests-fp8|steps-1024|steps-512|segments-512|e2e-1024|cold-start-1024"}
OUT=${OUT:-/tmp/gpu_suite_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers, torchao; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'torchao', torchao.__version__, torch.cuda.get_device_name(0))" 2>&1 | grep -v "Failed to load" | tee "$OUT/versions.txt"

case "$part" in
quick)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/versions.txt" 2>&1 || true
    python3 -m bench gpu --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/gpu.log"
    ;;
tests)
    python3 -m pytest -q -rs -p no:cacheprovider tests/test_cudagraphs.py 2>&1 | tee "$OUT/tests.log"
    ;;
tests-fp8)
    python3 -m pytest -q -rs -p no:cacheprovider tests/test_quantize.py 2>&1 | tee "$OUT/tests-fp8.log"
    # how fp8 dynamic quantization shifts the residual diffs (the README's threshold advice)
    python3 -m bench threshold-shift --model flux-tiny --quantize fp8 --device cuda --dtype bf16 --out "$OUT" \
        2>&1 | tail -12
    ;;
steps-1024)
    python3 -m bench steps --random-weights flux --height 1024 --width 1024 --steps 50 --graphs regional \
        --quantize none,fp8 --mode max-autotune --repeats 2 --timeout 280 --out "$OUT" 2>&1 | tee "$OUT/steps-1024.log"
    ;;
steps-512)
    python3 -m bench steps --random-weights flux --height 512 --width 512 --steps 50 --graphs regional \
        --quantize none --fuse-qkv off,on --mode max-autotune --repeats 2 --timeout 280 --out "$OUT" \
        2>&1 | tee "$OUT/steps-512.log"
    ;;
segments-512)
    python3 -m bench steps --random-weights flux --height 512 --width 512 --steps 50 --graphs segments \
        --quantize none --mode max-autotune --repeats 2 --timeout 500 --tag flux-512-segments --out "$OUT" \
        2>&1 | tee "$OUT/segments-512.log"
    ;;
e2e-1024)
    python3 -m bench run --random-weights flux --height 1024 --width 1024 --steps 50 --num-prompts 3 \
        --modes compile+fp8 --peers cache-dit --configs F1B0_W4MC6_R1.0 --out "$OUT/e2e" 2>&1 | tee "$OUT/e2e.log"
    ;;
cold-start-1024)
    python3 -m bench cold-start --model flux --graph regional --mode max-autotune --steps 28 --timeout 240 \
        --out "$OUT/cold-start-gpu" 2>&1 | tee "$OUT/cold-start-1024.log"
    ;;
*)
    echo "unknown part $part" >&2; exit 2 ;;
esac
