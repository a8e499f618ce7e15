#!/bin/bash
# Per-task launcher: `srun` runs one per training rank (`launch.sh train CMD...`), one per
# rollout node (`launch.sh rollout`) or one for `rlrt eval` (`launch.sh eval CMD...`,
# slurm/eval.sbatch). Sets the torch.distributed env from Slurm's, activates the
# venv (outside a container), logs where it runs, forwards USR1/TERM to its child and records the
# child's exit code in $RLRT_JOB_LOG_DIR/exit.r<restart>.<role>.<rank> for the batch script.
set -uo pipefail
role=${1:?usage: launch.sh train CMD... | launch.sh rollout | launch.sh eval CMD...}
shift

export RANK=${SLURM_PROCID:?launch.sh runs under srun}
export WORLD_SIZE=${SLURM_NTASKS}
export LOCAL_RANK=${SLURM_LOCALID:-0}
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE%%(*}
export NODE_RANK=${SLURM_NODEID:-0}
export PYTHONUNBUFFERED=1
# Cluster environment: defaults only, each overridable from the job's environment (`rlrt slurm
# submit --env KEY=VALUE`, or exported before sbatch). docs/CLUSTER.md lists them.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}              # nodes without internet: local files only
export TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
if [[ -n ${RLRT_NET_IF:-} ]]; then  # the fast network's interface (e.g. ib0): NCCL, gloo, sync
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$RLRT_NET_IF}
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$RLRT_NET_IF}
  export RLRT_SYNC_IFNAME=${RLRT_SYNC_IFNAME:-$RLRT_NET_IF}  # weight-sync address (topology.py)
fi
if [[ $role == train ]] && ((${RLRT_GPUS_PER_NODE:-0} > 0)); then
  # Megatron's TP / sequence-parallel communication relies on one hardware queue per device
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
fi
node=${SLURMD_NODENAME:-$(hostname -s)}
restart=${SLURM_RESTART_COUNT:-0}

if [[ -n ${RLRT_CONTAINER_IMAGE:-} ]]; then
  # inside the image: its python, our checkout (mounted at the same path) first on the path
  export PYTHONPATH="$RLRT_HOME${PYTHONPATH:+:$PYTHONPATH}"
elif [[ -f ${RLRT_VENV:-}/bin/activate ]]; then
  # shellcheck disable=SC1091
  source "$RLRT_VENV/bin/activate"
fi
cd "${RLRT_HOME:?}" || exit 2

case $role in
  train | eval) cmd=("$@") ;;
  rollout)
    # SGLANG_PORT: this node's first port; servers s = 0..n-1 listen on port + s.
    port0=${RLRT_ROLLOUT_PORT:-30000}
    n=${RLRT_ROLLOUT_SERVERS_PER_NODE:-1}
    if [[ -n ${RLRT_ROLLOUT_CMD:-} ]]; then
      cmd=(bash -c "$RLRT_ROLLOUT_CMD" rlrt-rollout)
    else
      gpus=${RLRT_GPUS_PER_NODE:-0}
      tp=$((gpus > 0 ? gpus / n : 1))
      # n servers of tp GPUs each, bound to the address the trainer's URLs name (the node's
      # NodeAddr, as rlrt.sbatch builds them), not to every interface. The API key reaches them
      # in a private --config file written by a shell builtin: never on a command line (`ps`).
      host=${RLRT_ROLLOUT_HOST:-$(scontrol show node "$node" -o 2>/dev/null | tr ' ' '\n' |
        sed -n 's/^NodeAddr=//p')}
      secrets=$(umask 077 && mktemp -d)
      printf 'api-key: "%s"\n' "${RLRT_ROLLOUT_API_KEY:?rlrt.sbatch sets it}" \
        >"$secrets/secrets.yaml"
      cmd=(bash -c 'trap "rm -rf $6" EXIT; for ((s = 0; s < $2; s++)); do
        CUDA_VISIBLE_DEVICES=$(seq -s, $((s * $3)) $((s * $3 + $3 - 1))) \
          python -m sglang.launch_server --model-path "$1" --host "$5" \
          --port $(($4 + s)) --tp-size "$3" --config "$6/secrets.yaml" &
      done; wait -n; exit $?' rlrt-rollout "${RLRT_ROLLOUT_MODEL:?set RLRT_ROLLOUT_MODEL}" \
        "$n" "$tp" "$port0" "${host:-$node}" "$secrets")
    fi
    ;;
  *) echo "launch.sh: unknown role $role" >&2; exit 2 ;;
esac

# One log per rank, named by node: <log dir>/<node>.r<restart>.<role>.rank<R>.log
log_file=/dev/stdout
if [[ -n ${RLRT_JOB_LOG_DIR:-} ]]; then
  log_file="$RLRT_JOB_LOG_DIR/$node.r$restart.$role.rank$RANK.log"
fi
say() { echo "[rlrt-launch] $*"; [[ $log_file == /dev/stdout ]] || echo "[rlrt-launch] $*" >>"$log_file"; }
say "$role rank $RANK/$WORLD_SIZE local_rank $LOCAL_RANK on node $node" \
  "(host $(hostname), master ${MASTER_ADDR:-?}:${MASTER_PORT:-?}, restart $restart, log $log_file)"

"${cmd[@]}" >>"$log_file" 2>&1 &
child=$!
# The batch script signals exactly this pid on preemption (see on_usr1 in rlrt.sbatch).
if [[ -n ${RLRT_JOB_LOG_DIR:-} ]]; then
  mkdir -p "$RLRT_JOB_LOG_DIR/pids"
  echo "$child" >"$RLRT_JOB_LOG_DIR/pids/r$restart.$node.$role.$RANK"
fi
trap 'kill -USR1 $child 2>/dev/null' USR1
trap 'kill -TERM $child 2>/dev/null' TERM
# a trapped signal makes `wait` return early: wait again until the child is gone.
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
wait "$child"
rc=$?
say "$role rank $RANK on node $node exited with code $rc"
if [[ -n ${RLRT_JOB_LOG_DIR:-} ]]; then
  echo "$role $RANK $node $rc" >"$RLRT_JOB_LOG_DIR/exit.r$restart.$role.$RANK"
fi
exit "$rc"
