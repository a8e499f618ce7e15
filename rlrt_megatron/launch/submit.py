"""Submit a rendered `SlurmJob` through the nemo-run `SlurmExecutor`'s tunnel, and query jobs.

Why not nemo-run's own sbatch template: it runs the training `srun` in the foreground, so a USR1
trapped by the batch shell (`--signal=B:USR1@120`) would only be handled after training ended,
too late to checkpoint. Our script (slurm/rlrt.sbatch) waits on a background srun and forwards
the signal. The executor still carries the resources and owns the connection: a `LocalTunnel`
on a login node, an `SSHTunnel` (`--ssh user@host`) from a laptop; the script is written into
the tunnel's job dir and `sbatch` runs on the far side of the tunnel.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import tempfile
import time
from typing import Any

from rlrt_megatron.launch.job import SlurmJob, SlurmJobError


def make_tunnel(ssh: str | None, job_dir: str, identity: str | None = None) -> Any:
    """A nemo-run tunnel: local (run sbatch here) or SSH (`user@host[:port]`)."""
    import nemo_run as run

    if not ssh:
        return run.LocalTunnel(job_dir=job_dir)
    user, at, host = ssh.rpartition("@")
    if not at or not user or not host:
        raise SlurmJobError(f"--ssh {ssh!r}: expected user@host or user@host:port")
    port = None
    if ":" in host:
        host, _, p = host.partition(":")
        port = int(p)
    return run.SSHTunnel(host=host, user=user, port=port, job_dir=job_dir, identity=identity)


def path_exists(tunnel: Any, path: str) -> bool:
    r = tunnel.run(f"test -e {shlex.quote(path)}", hide=True, warn=True)
    return r.return_code == 0


def _need_nemo_run(dry_run: bool) -> None:
    if importlib.util.find_spec("nemo_run") is None:
        what = "check the cluster's storage (--ssh) for" if dry_run else "submit"
        raise SlurmJobError(
            f"the job is valid, but `rlrt slurm submit` needs nemo-run to {what} it: "
            "pip install -e '.[slurm]'"
        )


def check_memory(
    job: SlurmJob,
    cfg: Any,
    *,
    gpu: str | None,
    gpu_mem_gib: float | None,
    force: bool,
    log=print,  # noqa: ANN001
) -> None:
    """`rlrt plan` for the job's layout: SlurmJobError with the planner's table if the layout does
    not fit (unless `force`, which logs it). CPU jobs (`--gpus-per-node 0`) are not checked."""
    from rlrt_megatron.launch.plan import PlanError, gpu_limit, plan_config, render

    if job.gpus_per_node <= 0:
        return
    try:
        plan = plan_config(cfg, nodes=job.nodes, gpus_per_node=job.gpus_per_node,
                           limit_gib=gpu_limit(gpu, gpu_mem_gib),
                           rollout_nodes=job.rollout_nodes)  # fmt: skip
    except PlanError as e:
        raise SlurmJobError(f"memory check: {e}") from e
    if plan.fits:
        from rlrt_megatron.launch.plan_notes import notes

        log(f"memory: {render(plan).splitlines()[-1]}")
        for line in notes(cfg, plan, None if gpu_mem_gib else gpu):
            log(line)
        return
    table = render(plan)
    if force:
        log(f"--force: submitting a layout the planner says does not fit:\n{table}")
        return
    raise SlurmJobError(
        "the layout does not fit in GPU memory (`rlrt plan`'s prediction below); change it as "
        f"suggested, or pass --force to submit anyway:\n{table}"
    )


def submit(
    job: SlurmJob,
    *,
    ssh: str | None = None,
    identity: str | None = None,
    dry_run: bool = False,
    mkdir: bool = False,
    gpu: str | None = "h100-80gb",
    gpu_mem_gib: float | None = None,
    force: bool = False,
    log=print,  # noqa: ANN001 - where the layout line goes
) -> tuple[str | None, str]:
    """Validate, render and (unless `dry_run`) submit `job`; returns (job id, script).

    Validation checks the checkpoint dir on the cluster through the tunnel (also in dry-run when
    the tunnel is local; a dry run never opens an SSH connection; with `mkdir` it validates as if
    the directory existed and says it would create it), and predicts the per-GPU memory
    (`launch/plan.py`, GPUs of kind `gpu` or `gpu_mem_gib` GiB): a layout that does not fit is
    refused unless `force`; the inputs the config names (model, data, eval sets) must exist. It
    logs which Megatron checkpoint the job starts from and the container mounts it adds.
    Validation, the memory check and a local `--dry-run` need only the base install (without
    nemo-run the header is written from the job's own fields); submitting and `--ssh` need
    nemo-run (the `slurm` extra), named in one line when missing.
    """
    from rlrt_megatron.launch.plan import gpu_limit

    try:
        limit = gpu_limit(gpu, gpu_mem_gib) if job.gpus_per_node > 0 else None
    except ValueError as e:
        raise SlurmJobError(str(e)) from e
    cfg = job.validate(limit_gib=limit)  # everything but the storage check: no connection
    log(f"{job.recipe}: {job.describe(cfg)}")
    check_memory(job, cfg, gpu=gpu, gpu_mem_gib=gpu_mem_gib, force=force, log=log)
    ckpt = job.resolve(cfg.checkpoint_dir)
    tunnel = None
    check = None
    if dry_run and not ssh:
        check = os.path.exists  # the local tunnel's storage is this machine's: no nemo-run
    if not dry_run or ssh:
        _need_nemo_run(dry_run)
        tunnel = make_tunnel(ssh, job.settings()["RLRT_LOG_DIR"] + "/submitted", identity)
    if not dry_run:
        tunnel.connect()
        if mkdir:
            tunnel.run(f"mkdir -p {shlex.quote(ckpt)}", hide=True)

        def check(p: str) -> bool:
            return path_exists(tunnel, p)

    if mkdir and dry_run:
        log(f"--mkdir: would create checkpoint.dir={ckpt} (dry run: nothing created)")
        inner = check

        def check(p: str) -> bool:  # validate as if the directory had been created
            return p == ckpt or inner is None or inner(p)

    cfg = job.validate(cfg, path_exists=check)
    from rlrt_megatron.config.warnings import config_warnings
    from rlrt_megatron.launch.paths import checkpoint_source

    log(checkpoint_source(cfg, job.resolve))
    for w in job.warnings() + config_warnings(cfg):
        log(f"warning: {w}")
    mounts = job.auto_mounts(cfg, job.settings()["RLRT_LOG_DIR"]) if job.container_image else []
    if mounts:
        log(f"container mounts for the config's paths: {','.join(mounts)}")
    if dry_run and importlib.util.find_spec("nemo_run") is None:
        return None, job.render(cfg)  # the header from the job's own fields (same lines)
    _need_nemo_run(dry_run)
    executor = job.executor(tunnel=tunnel)
    script = job.render(cfg, executor)
    if dry_run:
        return None, script

    job_dir = job.settings()["RLRT_LOG_DIR"] + "/submitted"
    tunnel.run(f"mkdir -p {shlex.quote(job_dir)}", hide=True)
    remote = f"{job_dir}/{job.job_name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.sbatch"
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(script)
        local = f.name
    try:
        tunnel.put(local, remote)
    finally:
        os.unlink(local)
    r = tunnel.run(f"cd {shlex.quote(job.home)} && sbatch --parsable {shlex.quote(remote)}",
                   hide=True, warn=True)  # fmt: skip
    if r.return_code != 0:
        raise SlurmJobError(f"sbatch {remote} failed ({r.return_code}): {r.stderr.strip()}")
    job_id = r.stdout.strip().split(";")[0]
    return job_id, script


def status(
    job_id: str | None,
    *,
    ssh: str | None = None,
    identity: str | None = None,
    log_dir: str | None = None,
) -> str:
    """A short summary: squeue/scontrol state, then the job's own summary lines."""
    tunnel = make_tunnel(ssh, log_dir or ".", identity)
    tunnel.connect()
    if not job_id:
        fmt = "-o '%.10i %.12j %.9T %.10M %.6D %R'"
        r = tunnel.run(f"squeue --me {fmt} 2>/dev/null || squeue {fmt}", hide=True, warn=True)
        return r.stdout
    r = tunnel.run(f"scontrol -o show job {shlex.quote(job_id)}", hide=True, warn=True)
    if r.return_code != 0:
        return f"job {job_id}: unknown to slurmctld ({r.stderr.strip()})"
    fields = dict(t.split("=", 1) for t in r.stdout.split() if "=" in t)
    keys = ["JobState", "Reason", "Restarts", "RunTime", "NumNodes", "NodeList", "ExitCode"]
    out = [f"job {job_id}: " + " ".join(f"{k}={fields.get(k, '?')}" for k in keys)]
    log = fields.get("StdOut")
    if log:
        t = tunnel.run(f"grep -h '^\\[rlrt-job' {shlex.quote(log)} | tail -n 8", hide=True,
                       warn=True)  # fmt: skip
        out += [t.stdout.rstrip()] if t.stdout.strip() else []
    return "\n".join(out)
