#!/usr/bin/env bash
# Issue 5's CPU-against-GPU check: the demo in float64 built again under `exlbuild --frozen` against the lock of the
# development machine's CPU build (results/cpu-vs-gpu-session38-cpu-float64.lock), on the same calibration file.
#
#   bash bench/frozen_float64_demo.sh CAL_PARQUET NEWS_TXT WORKDIR
#
# CAL_PARQUET: bench/cal_parquet.py's file as the lock has it (sha256 7b7957eecb11…; if it is another, the build
# stops before building anything and names the calibration). NEWS_TXT: Python 3.11's idlelib/NEWS.txt (the GPU
# machine's Python 3.12 has none). WORKDIR: made afresh, with an empty store. Exit status 0: every artifact the lock
# compares, the quantized tensors and the compiled directories among them, has the lock's bytes; 1: each file that
# differs is named. (The lock is never rewritten.) Then the compiled directories' tensors are compared one by one
# with the CPU's (results/cpu-vs-gpu-session38-cpu-float64-tensors.json, bench/tensor_digests.py): where a file
# differs, that says whether its tensors do or only the file around them (another safetensors version).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cal=$(realpath "$1")
news=$(realpath "$2")
work=$3
rm -rf "$work"
mkdir -p "$work"
cp "$repo/recipes/demo.yaml" "$work/demo.yaml"
cp "$repo/bench/results/cpu-vs-gpu-session38-cpu-float64.lock" "$work/exlbuild.lock"
cp "$cal" "$work/cal.parquet"
cp "$news" "$work/NEWS.txt"
cd "$work"
status=0
# (PYTHONSAFEPATH: the installed exlbuild, not a folder of the working directory's)
PYTHONSAFEPATH=1 "${PYTHON:-python3}" -m exlbuild.cli demo.yaml --frozen \
    passes.dtype=float64 calibration.dataset=cal.parquet eval.text=NEWS.txt || status=$?
if [ -d out/exl2-4.0bpw ] && [ -d out/exl2-3.0bpw ]; then
    "${PYTHON:-python3}" "$repo/bench/tensor_digests.py" \
        --against "$repo/bench/results/cpu-vs-gpu-session38-cpu-float64-tensors.json" \
        exl2-4.0bpw=out/exl2-4.0bpw exl2-3.0bpw=out/exl2-3.0bpw || status=1
fi
exit $status
