#!/usr/bin/env bash
# SC2317: the stage functions run in child shells (`bash -c stage_X`), not called directly here
# shellcheck disable=SC2317,SC2012
# One command for everything GPU, on a machine with CUDA torch and no package registry
# (the device tool's H200: python3 = /opt/torch/.venv/bin/python3). Run from the repo root.
#
#   bash tools/gpu_check.sh [--wheels .whl] [--only a,b | --skip a,b] [--timeout stage=S ...]
#   bash tools/gpu_check.sh --te-stash .whl-te/p5 --te-build-bg --only env,tests
#                  # stash one TE folder (one per call: 64 MiB each), start the extension build
#                  # (needs only the sdist, in the last folder) detached, run other stages
#   bash tools/gpu_check.sh --te-stash .whl-te/p0 --only demo    # ... one call per piece ...
#   bash tools/gpu_check.sh --te-stash .whl-te/p4 --only te      # all pieces there: install, test
#
# Set-up (always): pip-installs --wheels DIR (made by tools/fetch_gpu_wheels.sh) into --site
# (/tmp/site, skipped when already done for the same wheels) with --no-index --no-deps, puts the
# repo and the site on PYTHONPATH (no editable install: nothing needs the dist metadata), and
# checks `import megatron.core, math_verify, rlrt_megatron` (--no-setup skips both, e.g. in a call
# that only stashes TE pieces).
#
# Stages (default: env tests demo throughput logprobs weight_sync, plus `te` with --te-dir DIR;
# or exactly those named by --only). Each runs under its own `timeout`, logs to $OUT/<stage>.log
# (./gpu_check_logs without $OUT); the default stages' timeouts add up to 505 s, an upper bound.
#   env          nvidia-smi, torch/CUDA, megatron-core, which optional packages import
#   tests        pytest -m gpu tests/gpu (TE / SGLang tests skip with a reason when absent)
#   demo         rlrt demo on the GPU ($DEMO_ARGS); step time and reward from metrics.jsonl
#   throughput   benchmarks/train_throughput.py (or te_throughput.py) ($THROUGHPUT_ARGS; default
#                qwen3-0.6b shape, seq 4096, every case)
#   logprobs     benchmarks/logprobs_memory.py ($LOGPROBS_ARGS)
#   weight_sync  benchmarks/weight_sync.py ($WEIGHT_SYNC_ARGS)
#   te           Transformer Engine: reassemble + sha256-check the core wheel pieces (--te-dir,
#                default /tmp/te-stash), build the transformer_engine_torch sdist into a wheel
#                (or wait for --te-build-bg's), install core + metapackage + extension + deps
#                in ONE pip call, import with a stack dump on a stall, run
#                tests/gpu/test_te_spec.py and the TE cases of the throughput benchmark.
#
# Summary: one table `stage | status | seconds | key figures`, the key figures being the
# benchmarks' `RESULT key=value ...` lines (a line starting with "RESULT ", then space-separated
# key=value tokens, values without spaces); all of them also go to $OUT/results.txt. Exit status:
# 0 when no stage failed, 1 otherwise, 2 for bad arguments or a failed set-up.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
WHEELS=.whl
SITE=/tmp/site
LOGDIR=${OUT:-$REPO/gpu_check_logs}
TE_DIR=""
TE_STASH=${TE_STASH:-/tmp/te-stash}
TE_BUILD=${TE_BUILD:-/tmp/te-build}
TE_BG=0
TE_ASKED=0
SETUP=1
ONLY=""
SKIP=""
DEFAULT_STAGES=(env tests demo throughput logprobs weight_sync)
ALL_STAGES=(env tests demo throughput logprobs weight_sync te)
declare -A TIMEOUT=([env]=40 [tests]=150 [demo]=170 [throughput]=70 [logprobs]=45
                    [weight_sync]=30 [te]=420)
# Arguments each benchmark gets; override from the environment (the device tool's command line).
# the whole demo (100 steps): the reward-rise and step-time goals are stated for it (one H200:
# ~0.9 s/step measured, SFT warm-up and conversion included it fits the stage's timeout)
DEMO_ARGS=${DEMO_ARGS:-"--steps 100"}
THROUGHPUT_ARGS=${THROUGHPUT_ARGS:-}        # empty: chosen by throughput_args below
LOGPROBS_ARGS=${LOGPROBS_ARGS:-"--device cuda"}
WEIGHT_SYNC_ARGS=${WEIGHT_SYNC_ARGS:-"--device cuda --layers 28"}
TE_THROUGHPUT_ARGS=${TE_THROUGHPUT_ARGS:-}  # empty: the TE cases of that script
TESTS_ARGS=${TESTS_ARGS:-""}

usage() { awk 'NR > 3 && /^set /{exit} NR > 3' "$0"; exit "${1:-0}"; }
die() { echo "gpu_check: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS=$2; shift ;;
    --site) SITE=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --skip) SKIP=$2; shift ;;
    --timeout) [[ $2 == *=* ]] || die "--timeout wants stage=seconds, got $2"
               TIMEOUT[${2%%=*}]=${2#*=}; shift ;;
    --te-dir) TE_DIR=$2; TE_ASKED=1; shift ;;
    --te-stash) { mkdir -p "$TE_STASH" && cp -r "$2"/. "$TE_STASH"/; } || die "cannot stash $2"
                echo "gpu_check: stashed $2 into $TE_STASH:"; ls "$TE_STASH"; shift ;;
    --te-build-bg) TE_BG=1 ;;
    --te-wait) ONLY=${ONLY:+$ONLY,}te ;;
    --no-setup) SETUP=0 ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
TE_DIR=${TE_DIR:-$TE_STASH}

mkdir -p "$LOGDIR" || die "cannot create $LOGDIR"
: > "$LOGDIR/results.txt"

# which stages run (checked before any work)
declare -A STATUS SECS FIGS
selected=()
in_list() { [[ ",$2," == *",$1,"* ]]; }
if [[ -n $ONLY ]]; then
  for s in "${ALL_STAGES[@]}"; do in_list "$s" "$ONLY" && selected+=("$s"); done
  for s in ${ONLY//,/ }; do in_list "$s" "$(IFS=,; echo "${ALL_STAGES[*]}")" || die "unknown stage $s"; done
else
  selected=("${DEFAULT_STAGES[@]}")
  [[ $TE_ASKED == 1 && $TE_BG == 0 ]] && selected+=(te)
fi
RUN_STAGES=()
for s in "${selected[@]}"; do in_list "$s" "$SKIP" || RUN_STAGES+=("$s"); done

# ----------------------------------------------------------------------------- set-up
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"

install_wheels() {
  [[ -d $WHEELS ]] || { echo "gpu_check: no wheel folder $WHEELS: using what is installed"; return; }
  local stamp="$SITE/.gpu_check_wheels" want
  want=$(cd "$WHEELS" && ls ./*.whl 2>/dev/null | sort | tr '\n' ' ')
  [[ -n $want ]] || { echo "gpu_check: $WHEELS has no wheels"; return; }
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    echo "gpu_check: wheels of $WHEELS already in $SITE"
    return
  fi
  mkdir -p "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || die "pip install of $WHEELS into $SITE failed"
  echo "$want" > "$stamp"
}
if [[ $SETUP == 1 ]]; then
  install_wheels
  if ! "$PY" -c "import megatron.core, math_verify, rlrt_megatron" 2> "$LOGDIR/.import.err"; then
    cat "$LOGDIR/.import.err"
    die "import megatron.core, math_verify, rlrt_megatron failed (PYTHONPATH=$PYTHONPATH)"
  fi
  rm -f "$LOGDIR/.import.err"
fi

# TE's import looks for cuDNN / NVRTC / cuRAND with a recursive glob of $X_HOME, $CUDA_HOME and
# /usr/local/cuda before the pip packages (transformer_engine/common/__init__.py,
# _load_cuda_library_from_system), one full tree walk per library. Point each at the folder of
# the pip package torch itself uses, so the first glob is of a small tree and finds it.
te_lib_env() {
  local line
  while IFS= read -r line; do
    [[ -n $line ]] && export "${line?}" && echo "gpu_check: $line"
  done < <("$PY" - <<'EOF'
import glob, os, sysconfig
nv = os.path.join(sysconfig.get_path("purelib"), "nvidia")
for lib, var in (("cudnn", "CUDNN_HOME"), ("nvrtc", "NVRTC_HOME"), ("curand", "CURAND_HOME")):
    if os.environ.get(var):
        continue
    hits = sorted(glob.glob(f"{nv}/*/lib/lib{lib}.so*") + glob.glob(f"{nv}/*/*/lib/lib{lib}.so*"))
    if hits:
        print(f"{var}={os.path.dirname(os.path.dirname(hits[0]))}")
EOF
)
}
te_lib_env  # every stage: the tests and `env` import TE too once it is installed

# ----------------------------------------------------------------------------- stages
stage_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" - <<'EOF'
import importlib, os, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
p = torch.cuda.get_device_properties(0)
print(f"device {p.name} {p.total_memory / 2**30:.0f} GiB sm_{p.major}{p.minor} x{p.multi_processor_count}")
import megatron.core
print("megatron-core", megatron.core.__version__)
found = []
for mod in ("transformer_engine", "triton", "liger_kernel", "cut_cross_entropy", "flash_attn",
            "sglang", "math_verify", "datasets", "apex"):
    try:
        m = importlib.import_module(mod)
        found.append(f"{mod}={getattr(m, '__version__', 'yes')}")
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
        found.append(f"{mod}=no({type(e).__name__})")
print("importable:", " ".join(found))
print(f"RESULT gpu={p.name.replace(' ', '_')} torch={torch.__version__} "
      f"mcore={megatron.core.__version__} "
      f"te={'yes' if any(f.startswith('transformer_engine=') and 'no(' not in f for f in found) else 'no'}")
EOF
}

stage_tests() {
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider --timeout 300 -rs $TESTS_ARGS
}

stage_demo() {
  local run=/tmp/gpu_check_demo
  rm -rf "$run"
  # shellcheck disable=SC2086
  "$PY" -m rlrt_megatron.cli demo --run-dir "$run" $DEMO_ARGS || return $?
  "$PY" - "$run/rlrt/metrics.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
if not rows:
    sys.exit("demo wrote no metrics")
r = [row["reward/mean"] for row in rows if "reward/mean" in row]
t = [row["time/step"] for row in rows if "time/step" in row]
k = min(5, len(r))
print(f"RESULT steps={len(rows)} step_s_median={statistics.median(t[1:] or t):.3f} "
      f"reward_first{k}={sum(r[:k]) / k:.3f} reward_last{k}={sum(r[-k:]) / k:.3f}")
EOF
}

# benchmarks/train_throughput.py (hf anchor row, cases hf local torch te te-fp8) replaces
# benchmarks/te_throughput.py (cases local te te_fp8_delayed te_fp8_current): use what exists
throughput_script() {
  if [[ -f benchmarks/train_throughput.py ]]; then echo benchmarks/train_throughput.py
  else echo benchmarks/te_throughput.py; fi
}
throughput_args() {  # throughput_args base|te
  if [[ -f benchmarks/train_throughput.py ]]; then
    if [[ $1 == te ]]; then echo "--shape qwen3-0.6b --seq 4096 --device cuda --cases local te te-fp8"
    # the goal's rows (hf anchor, the no-TE torch spec); add `local` / `hf-amp` via THROUGHPUT_ARGS
    else echo "--shape qwen3-0.6b --seq 4096 --device cuda --cases hf torch"; fi
  elif [[ $1 == te ]]; then echo "--seq 4096 --cases local te te_fp8_delayed te_fp8_current"
  else echo "--seq 4096 --cases local"; fi
}

stage_throughput() {
  # shellcheck disable=SC2086
  "$PY" "$(throughput_script)" ${THROUGHPUT_ARGS:-$(throughput_args base)}
}

stage_logprobs() {
  # shellcheck disable=SC2086
  "$PY" benchmarks/logprobs_memory.py $LOGPROBS_ARGS
}

stage_weight_sync() {
  # shellcheck disable=SC2086
  "$PY" benchmarks/weight_sync.py $WEIGHT_SYNC_ARGS
}

# --- Transformer Engine
te_core_wheel() {  # reassemble the pieces in $TE_DIR into $TE_BUILD/wheels, check the sha256
  local sumfile name
  sumfile=$(ls "$TE_DIR"/transformer_engine_cu*.whl.sha256 2>/dev/null | head -n 1)
  [[ -n $sumfile ]] || { echo "te: no transformer_engine_cu*.whl.sha256 in $TE_DIR"; return 1; }
  name=$(basename "$sumfile" .sha256)
  mkdir -p "$TE_BUILD/wheels"
  if [[ ! -f $TE_BUILD/wheels/$name ]]; then
    echo "te: pieces in $TE_DIR:" "$(cd "$TE_DIR" && ls "$name".part-* 2>/dev/null | tr '\n' ' ')"
    cat "$TE_DIR/$name".part-* > "$TE_BUILD/wheels/$name.tmp" || return 1
    if ! (cd "$TE_BUILD/wheels" && sed "s/ .*$/  $name.tmp/" "$TE_DIR/$name.sha256" \
          | sha256sum -c --quiet -); then
      echo "te: sha256 of the reassembled $name differs: a piece is missing or broken" \
           "(expected $(cut -c1-12 "$TE_DIR/$name.sha256")...)"
      rm -f "$TE_BUILD/wheels/$name.tmp"
      return 1
    fi
    mv "$TE_BUILD/wheels/$name.tmp" "$TE_BUILD/wheels/$name"
  fi
  echo "te: core wheel $name ok"
}

# Build transformer_engine_torch from its sdist into a wheel (never straight into the target:
# that wheel's files live in transformer_engine/wheel_lib/, and `pip install --target` of it on
# its own either skips the existing transformer_engine/ dir without --upgrade -- the extension
# never lands, the warning "Target directory ... already exists" -- or with --upgrade replaces
# the whole dir, deleting the core package). Writes $TE_BUILD/build.log and $TE_BUILD/done (rc).
te_build() {
  local sdist
  sdist=$(ls "$TE_DIR"/transformer_engine_torch-*.tar.gz 2>/dev/null | head -n 1)
  [[ -n $sdist ]] || { echo "te: no transformer_engine_torch sdist in $TE_DIR"; echo 1 > "$TE_BUILD/done"; return 1; }
  # NVTE_PYTORCH_FORCE_BUILD: setup.py otherwise first tries urlretrieve() of a prebuilt wheel
  # from GitHub, with no timeout (a stall where the network drops packets).
  # NVTE_PROJECT_BUILDING is set by its setup.py: the core package is not loaded while building.
  mkdir -p "$TE_BUILD/ext"
  local t0=$SECONDS rc
  {
    NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_FRAMEWORK=pytorch MAX_JOBS=${MAX_JOBS:-16} \
      NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS:-90} \
      "$PY" -m pip wheel -q --no-index --no-deps --no-build-isolation --no-cache-dir \
      -w "$TE_BUILD/ext" "$sdist"
    rc=$?
    echo "te: extension build rc=$rc in $((SECONDS - t0)) s"
  } > "$TE_BUILD/build.log" 2>&1
  echo "$rc" > "$TE_BUILD/done"
  return "$rc"
}

te_build_bg() {
  mkdir -p "$TE_BUILD"
  if [[ -f $TE_BUILD/pid ]] && kill -0 "$(cat "$TE_BUILD/pid")" 2>/dev/null; then
    echo "te: a build is already running (pid $(cat "$TE_BUILD/pid"))"
    return 0
  fi
  rm -f "$TE_BUILD/done"
  # its own session: the device tool ends the command's other processes when it returns
  setsid nohup bash -c te_build > /dev/null 2>&1 < /dev/null &
  echo $! > "$TE_BUILD/pid"
  echo "te: extension build started in the background (pid $!, log $TE_BUILD/build.log," \
       "marker $TE_BUILD/done); run '--only te' in the next call to use it"
}

te_wait_build() {  # wait for a background build, or build now
  if [[ ! -f $TE_BUILD/done ]]; then
    if [[ -f $TE_BUILD/pid ]] && kill -0 "$(cat "$TE_BUILD/pid")" 2>/dev/null; then
      echo "te: waiting for the background build (pid $(cat "$TE_BUILD/pid"))"
      while [[ ! -f $TE_BUILD/done ]] && kill -0 "$(cat "$TE_BUILD/pid")" 2>/dev/null; do sleep 2; done
      sleep 1
    else
      echo "te: building the extension now"
      te_build
    fi
  fi
  tail -n 20 "$TE_BUILD/build.log" 2>/dev/null
  [[ -f $TE_BUILD/done && $(cat "$TE_BUILD/done") == 0 ]] || { echo "te: extension build failed"; return 1; }
  ls "$TE_BUILD"/ext/transformer_engine_torch-*.whl >/dev/null || return 1
}

stage_te() {
  mkdir -p "$TE_BUILD"
  te_core_wheel || return 1
  te_wait_build || return 1
  local deps=()
  [[ -d $TE_DIR/deps ]] && deps=("$TE_DIR"/deps/*.whl)
  # one pip call: pip merges every wheel's transformer_engine/ files before moving the
  # directory into the target
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$TE_BUILD"/wheels/*.whl "$TE_BUILD"/ext/*.whl "${deps[@]}" || return 1
  ls "$SITE"/transformer_engine/wheel_lib/
  # how long the recursive glob TE would otherwise do takes here (bounded)
  local t0=$SECONDS
  timeout 20 "$PY" -c "import glob; glob.glob('/usr/local/cuda/**/libcudnn.so*', recursive=True)"
  echo "RESULT cuda_tree_glob_s=$((SECONDS - t0)) (TE's lookup without *_HOME; 20 = timed out)"
  export NVTE_FRAMEWORK=pytorch
  t0=$SECONDS
  timeout 150 "$PY" -X faulthandler -c "
import faulthandler, sys
faulthandler.dump_traceback_later(90, exit=True)
import transformer_engine as T, transformer_engine.pytorch as te
print('transformer_engine', T.__version__)
" || { echo "te: import failed or stalled (stack above)"; return 1; }
  echo "RESULT te_import_s=$((SECONDS - t0))"
  "$PY" -m pytest -q -m gpu tests/gpu/test_te_spec.py -p no:cacheprovider --timeout 300 -rs -s \
    || return 1
  # shellcheck disable=SC2086
  "$PY" "$(throughput_script)" ${TE_THROUGHPUT_ARGS:-$(throughput_args te)}
}

# ----------------------------------------------------------------------------- driver
# each stage runs as `timeout N bash -c stage_X`: the child shell needs these
export -f stage_env stage_tests stage_demo stage_throughput stage_logprobs stage_weight_sync \
  stage_te throughput_script throughput_args te_core_wheel te_build te_wait_build te_lib_env
export PY SITE TE_DIR TE_BUILD DEMO_ARGS THROUGHPUT_ARGS LOGPROBS_ARGS WEIGHT_SYNC_ARGS \
  TE_THROUGHPUT_ARGS TESTS_ARGS

if [[ $TE_BG == 1 ]]; then  # needs only the sdist: start it with the first piece folder
  te_build_bg
fi

for s in "${RUN_STAGES[@]}"; do
  log="$LOGDIR/$s.log"
  echo "=== $s (timeout ${TIMEOUT[$s]} s) -> $log"
  t0=$(date +%s.%N)
  timeout --kill-after=10 "${TIMEOUT[$s]}" bash -c "stage_$s" > "$log" 2>&1
  rc=$?
  SECS[$s]=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
  if [[ $rc == 0 ]]; then STATUS[$s]=pass
  elif [[ $rc == 124 || $rc == 137 ]]; then STATUS[$s]="fail(timeout)"
  elif [[ $s == tests ]] && grep -q "no tests ran" "$log"; then STATUS[$s]=skip
  else STATUS[$s]="fail(rc=$rc)"; fi
  FIGS[$s]=$(grep -a '^RESULT ' "$log" | sed 's/^RESULT //' | tr '\n' ';' | sed 's/;$//')
  grep -a '^RESULT ' "$log" | sed "s/^/$s: /" >> "$LOGDIR/results.txt"
  tail -n 8 "$log" | cut -c1-240
  echo "=== $s: ${STATUS[$s]} in ${SECS[$s]} s"
done

echo
printf '%-12s %-14s %7s  %s\n' stage status seconds "key figures (RESULT lines)"
fail=0
for s in "${ALL_STAGES[@]}"; do
  if [[ -n ${STATUS[$s]:-} ]]; then
    printf '%-12s %-14s %7s  %s\n' "$s" "${STATUS[$s]}" "${SECS[$s]}" "${FIGS[$s]}"
    [[ ${STATUS[$s]} == fail* ]] && fail=1
  elif [[ $TE_BG == 1 && $s == te ]]; then
    printf '%-12s %-14s %7s  %s\n' te "started(bg)" - "$TE_BUILD/build.log"
  else
    printf '%-12s %-14s %7s\n' "$s" skip -
  fi
done
exit "$fail"
