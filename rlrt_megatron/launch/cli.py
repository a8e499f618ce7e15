"""`rlrt slurm submit | status`: multi-node jobs through nemo-run's SlurmExecutor; `rlrt plan`:
the per-GPU memory of a recipe at a layout (`launch/plan.py`).

    rlrt slurm submit --recipe qwen3_8b_rlrt --nodes 4 --gpus-per-node 8 --time 04:00:00 \
        --partition batch [--rollout-nodes 1] [--ssh me@login] [--dry-run] [--force] [key=value ...]
    rlrt slurm status [JOB_ID]
    rlrt plan --recipe qwen3_8b_rlrt --nodes 4 --gpus-per-node 8 --gpu h100-80gb [key=value ...]

Exit status of `rlrt plan`: 0 fits, 3 does not fit (memory, or a layout the trainer refuses at
its world size: the nearest valid layouts are suggested), 2 bad arguments (recipe, override, GPU
kind or memory).
"""

from __future__ import annotations

import argparse
import sys

from rlrt_megatron.launch.job import REPO_ROOT, SlurmJob, SlurmJobError


def _kv(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for it in items:
        k, eq, v = it.partition("=")
        if not eq or not k:
            raise SlurmJobError(f"{flag} {it!r}: expected KEY=VALUE")
        out[k] = v
    return out


def _submit(args: argparse.Namespace) -> int:
    from rlrt_megatron.launch.submit import submit

    try:
        if args.ssh and not args.home:
            raise SlurmJobError(
                "--ssh needs --home: the path of the repo checkout on the cluster's shared storage"
            )
        sbatch_args = {k.lstrip("-"): (v if v != "" else True)
                       for k, v in _kv(args.sbatch, "--sbatch").items()}  # fmt: skip
        job = SlurmJob(
            recipe=args.recipe,
            overrides=args.overrides,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            rollout_nodes=args.rollout_nodes,
            partition=args.partition,
            account=args.account,
            time=args.time,
            job_name=args.job_name,
            container_image=args.container_image,
            container_mounts=args.container_mounts.split(",") if args.container_mounts else [],
            home=args.home or str(REPO_ROOT),
            log_dir=args.log_dir,
            exclusive=args.exclusive,
            sbatch_args=sbatch_args,
            env=_kv(args.env, "--env"),
        )
        job_id, script = submit(
            job,
            ssh=args.ssh,
            identity=args.identity,
            dry_run=args.dry_run,
            mkdir=args.mkdir,
            gpu=args.gpu,
            gpu_mem_gib=args.gpu_mem_gib,
            force=args.force,
            log=lambda m: print(m, file=sys.stderr if args.dry_run else sys.stdout),
        )
    except SlurmJobError as e:
        print(f"rlrt slurm submit: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    print(f"submitted job {job_id}")
    logs = job.settings()["RLRT_LOG_DIR"]
    print(f"  logs: {logs}/job-{job_id}/  status: rlrt slurm status {job_id}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from rlrt_megatron.config import ConfigError
    from rlrt_megatron.launch.plan import PlanError, gpu_limit, plan_config, render

    try:
        limit = gpu_limit(args.gpu, args.gpu_mem_gib)
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise PlanError("--nodes and --gpus-per-node must be >= 1")
        if not 0 <= args.rollout_nodes < args.nodes:
            raise PlanError(f"--rollout-nodes {args.rollout_nodes}: must be in [0, --nodes)")
        from recipes import get_recipe

        cfg = get_recipe(args.recipe, list(args.overrides))
        plan = plan_config(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                           limit_gib=limit, rollout_nodes=args.rollout_nodes)  # fmt: skip
    except (ConfigError, PlanError) as e:
        print(f"rlrt plan: {e}", file=sys.stderr)  # every line: a config error lists each key
        return 2
    from rlrt_megatron.launch.plan_notes import notes

    table = render(plan).splitlines()  # the summary line stays last
    print("\n".join(table[:-1] + notes(cfg, plan, None if args.gpu_mem_gib else args.gpu)))
    print(table[-1])
    return 0 if plan.fits else 3


def _status(args: argparse.Namespace) -> int:
    from rlrt_megatron.launch.submit import status

    print(status(args.job_id, ssh=args.ssh, identity=args.identity))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from rlrt_megatron.launch.plan import GPU_MEMORY_GIB

    q = subparsers.add_parser(
        "plan", help="predict per-GPU memory of a recipe at a layout (exit 0 fits, 3 not)"
    )
    q.add_argument("--recipe", required=True, help="recipe name (see `rlrt train --list`)")
    q.add_argument("--nodes", type=int, default=1, help="total nodes (training + rollout)")
    q.add_argument("--gpus-per-node", type=int, default=8)
    q.add_argument("--rollout-nodes", type=int, default=0,
                   help="nodes running SGLang apart (0 = colocated)")  # fmt: skip
    q.add_argument("--gpu", default="h100-80gb",
                   help=f"GPU kind (default h100-80gb): {', '.join(GPU_MEMORY_GIB)}")  # fmt: skip
    q.add_argument("--gpu-mem-gib", type=float, help="GPU memory in GiB (instead of --gpu)")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides")
    q.set_defaults(func=_plan)

    p = subparsers.add_parser("slurm", help="submit / inspect multi-node Slurm jobs (nemo-run)")
    sub = p.add_subparsers(dest="slurm_command", required=True)

    s = sub.add_parser("submit", help="validate, render and sbatch an `rlrt train` job")
    s.add_argument("--recipe", required=True, help="recipe name (see `rlrt train --list`)")
    s.add_argument("--nodes", type=int, default=1, help="total nodes (training + rollout)")
    s.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs = training ranks per node; 0 = CPU, one gloo rank/node")  # fmt: skip
    s.add_argument("--rollout-nodes", type=int, default=0,
                   help="the last K nodes run SGLang servers (0 = colocated)")  # fmt: skip
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--time", help="time limit, e.g. 04:00:00 (USR1 120 s before: checkpoint)")
    s.add_argument("--job-name", default="rlrt")
    s.add_argument("--container-image", help="pyxis/enroot image; default: the venv")
    s.add_argument("--container-mounts", help="extra pyxis mounts src:dst[,src:dst]")
    s.add_argument("--home", help=f"repo checkout as the nodes see it (default {REPO_ROOT})")
    s.add_argument("--log-dir", help="job logs (default <home>/runs/slurm-logs)")
    s.add_argument("--exclusive", action="store_true", help="#SBATCH --exclusive")
    s.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="extra #SBATCH --KEY=VALUE (repeatable; KEY= for a bare flag)")  # fmt: skip
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra variable exported in the job (repeatable)")  # fmt: skip
    s.add_argument("--ssh", metavar="USER@HOST[:PORT]", help="submit through an SSH tunnel")
    s.add_argument("--identity", help="SSH private key for --ssh")
    s.add_argument("--mkdir", action="store_true",
                   help="create the checkpoint dir on the cluster instead of failing")  # fmt: skip
    s.add_argument(
        "--dry-run", action="store_true", help="print the rendered script, submit nothing"
    )
    s.add_argument("--gpu", default="h100-80gb",
                   help=f"GPU kind for the memory check: {', '.join(GPU_MEMORY_GIB)}")  # fmt: skip
    s.add_argument("--gpu-mem-gib", type=float, help="GPU memory in GiB (instead of --gpu)")
    s.add_argument("--force", action="store_true",
                   help="submit even if `rlrt plan` predicts it does not fit")  # fmt: skip
    s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides")
    s.set_defaults(func=_submit)

    t = sub.add_parser("status", help="state of a job (or your queue) and its summary lines")
    t.add_argument("job_id", nargs="?")
    t.add_argument("--ssh", metavar="USER@HOST[:PORT]")
    t.add_argument("--identity", help="SSH private key for --ssh")
    t.set_defaults(func=_status)
