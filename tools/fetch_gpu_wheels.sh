#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels the GPU machine lacks (it has CUDA torch
# but no registry): Python 3.12, manylinux x86_64, --no-deps, one version of each.
#
#   bash tools/fetch_gpu_wheels.sh .whl          # ~4 MB: megatron-core, math-verify, datasets, ...
#   bash tools/fetch_gpu_wheels.sh --te .whl-te  # Transformer Engine (~280 MB) in call-sized folders
#
# Base set: what `import rlrt_megatron`, its CLI and tests import at run time, minus what the GPU
# image already has (torch, transformers, tokenizers, safetensors, numpy, rich, tqdm, tensorboard,
# matplotlib, psutil, pyarrow, pandas, xxhash, fsspec, huggingface-hub, sympy, pyyaml, filelock,
# packaging, einops, onnx, onnxscript). tools/gpu_check.sh --wheels DIR installs them there.
#
# --te: the device tool carries at most 64 MiB per call, so the 276 MB TE core wheel is split
# into <= PIECE (47M) pieces, one folder per call: TEDIR/p0 .. TEDIR/pN, each with the wheel's
# .sha256; the last folder also holds the transformer_engine_torch sdist (built there) and TE's
# small run-time deps (deps/*.whl). tools/gpu_check.sh --te-stash TEDIR/pK copies one folder
# into /tmp/te-stash (kept while the machine stays warm); --te-dir /tmp/te-stash reassembles.
set -euo pipefail

TE_VERSION=2.20.2
# The GPU machine runs Python 3.12: megatron-core 0.19 (what current GPU containers ship; the
# code supports 0.16 through 0.19, rlrt_megatron/megatron/compat.py). MCORE_VERSION=0.16.1 for
# the older one; gpu_check's `env` stage prints which one each figure was measured with.
MCORE_VERSION=${MCORE_VERSION:-0.19.2}
BASE=(
  "megatron-core==$MCORE_VERSION"
  "math-verify==0.9.0"
  "latex2sympy2_extended==1.11.0"
  "antlr4-python3-runtime==4.13.2"
  "datasets==5.2.0"
  "dill==0.4.1"
  "multiprocess==0.70.19"
)
# TE's run-time needs that the image lacks (checked against its package list and TE's imports):
# the `transformer-engine` metapackage (TE asserts its dist-info exists and its version matches
# the core's), pydantic (transformer_engine.common.recipe) and its stack, nvdlfw-inspect (TE's
# debug hooks). einops, onnx, onnxscript, packaging are on the image; nvidia-cudnn-frontend is only
# imported for sm100 kernels.
TE_DEPS=(
  "transformer-engine==$TE_VERSION"
  "pydantic==2.14.4"
  "pydantic-core==2.50.5"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
  "typing-extensions==4.16.0"
  "nvdlfw-inspect==0.2.2"
)
PIECE=${PIECE:-47M}

usage() { awk 'NR > 1 && /^set /{exit} NR > 1' "$0"; exit "${1:-0}"; }

te=0
base=1
dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --te) te=1; base=0 ;;
    -h|--help) usage 0 ;;
    -*) echo "fetch_gpu_wheels.sh: unknown option $1" >&2; usage 2 ;;
    *) dir="$1" ;;
  esac
  shift
done
[[ -n "$dir" ]] || usage 2

PY=${PYTHON:-python3}
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
dl() {  # dl DEST SPEC...: binary wheels for CPython 3.12 on x86-64 Linux, no dependencies
  local dest=$1
  shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLAT[@]}" -d "$dest" "$@"
}

mkdir -p "$dir"
if [[ $base == 1 ]]; then
  dl "$dir" "${BASE[@]}"
  echo "base wheels in $dir:"
  du -ch "$dir"/*.whl | tail -n 1
fi

if [[ $te == 1 ]]; then
  work="$dir/.download"
  rm -rf "$work"
  mkdir -p "$work/deps"
  dl "$work" "transformer-engine-cu13==$TE_VERSION"
  # transformer_engine_torch is an sdist only (built on the GPU machine against its torch).
  # `pip download` would run its setup.py to read the metadata, which needs CUDA torch: take
  # the file from the index's JSON page instead and check its sha256.
  "$PY" - "$work" "$TE_VERSION" <<'PYEOF'
import hashlib, json, os, sys, urllib.request
dest, ver = sys.argv[1], sys.argv[2]
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
req = urllib.request.Request(f"{index}/transformer-engine-torch/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(req, timeout=60) as r:
    files = json.load(r)["files"]
want = f"transformer_engine_torch-{ver}.tar.gz"
f = next((f for f in files if f["filename"] == want), None)
if f is None:
    sys.exit(f"fetch_gpu_wheels: {want} is not on {index}")
with urllib.request.urlopen(f["url"], timeout=300) as r:
    data = r.read()
if hashlib.sha256(data).hexdigest() != f["hashes"]["sha256"]:
    sys.exit(f"fetch_gpu_wheels: sha256 mismatch for {want}")
with open(os.path.join(dest, want), "wb") as out:
    out.write(data)
PYEOF
  dl "$work/deps" "${TE_DEPS[@]}"
  core=$(ls "$work"/transformer_engine_cu13-*.whl)
  name=$(basename "$core")
  rm -rf "$dir"/p[0-9]*
  split -b "$PIECE" -d -a 2 "$core" "$work/$name.part-"
  sum=$(cd "$work" && sha256sum "$name")
  k=0
  for part in "$work/$name".part-*; do
    mkdir -p "$dir/p$k"
    mv "$part" "$dir/p$k/"
    echo "$sum" > "$dir/p$k/$name.sha256"
    k=$((k + 1))
  done
  last="$dir/p$((k - 1))"
  mv "$work"/transformer_engine_torch-*.tar.gz "$last/"
  mv "$work/deps" "$last/deps"
  rm -rf "$work"
  echo "TE in $dir ($k folders, one per device call):"
  du -sh "$dir"/p*
fi
