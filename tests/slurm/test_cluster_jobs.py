"""Jobs on the real local 2-node cluster: placement, fail-fast, USR1 -> requeue, nemo-run submit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cluster import NOT_TESTED, SHARED_ROOT

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "slurm" / "rlrt.sbatch"
ALLREDUCE = 'python tests/slurm/allreduce_job.py "$@"'


def sbatch(
    cluster, job_dir: Path, *args: str, env: dict[str, str] | None = None, tasks_per_node: int = 1
) -> str:
    e = dict(cluster.env, RLRT_HOME=str(REPO), RLRT_LOG_DIR=str(job_dir), **(env or {}))
    p = subprocess.run(
        ["sbatch", "--parsable", "-N", "2", f"--ntasks-per-node={tasks_per_node}",
         f"--output={job_dir}/batch-%j.out", str(SBATCH), *args],
        env=e, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def batch_log(job_dir: Path, job_id: str) -> str:
    return (job_dir / f"batch-{job_id}.out").read_text(errors="replace")


def node_logs(job_dir: Path, job_id: str) -> dict[str, str]:
    return {
        f.name: f.read_text(errors="replace") for f in (job_dir / f"job-{job_id}").glob("*.log")
    }


def test_two_node_gloo_job_runs_one_rank_per_node(cluster, job_dir):
    job = sbatch(cluster, job_dir, env={"RLRT_TRAIN_CMD": ALLREDUCE})
    info = cluster.wait_job(job, 240)
    out = batch_log(job_dir, job)
    assert info["JobState"] == "COMPLETED", out
    logs = node_logs(job_dir, job)
    assert "allreduce rank 0/2 node node1 sum 1" in logs["node1.r0.train.rank0.log"]
    assert "allreduce rank 1/2 node node2 sum 1" in logs["node2.r0.train.rank1.log"]
    assert "train rank 0/2 local_rank 0 on node node1" in out
    assert "train rank 1/2 local_rank 0 on node node2" in out


def test_a_job_asking_n_tasks_per_node_gets_n_ranks_per_node(cluster, job_dir):
    # `sbatch -N 2 --ntasks-per-node=2 slurm/rlrt.sbatch` with no RLRT_* setting: 4 ranks
    job = sbatch(cluster, job_dir, env={"RLRT_TRAIN_CMD": ALLREDUCE}, tasks_per_node=2)
    info = cluster.wait_job(job, 240)
    out = batch_log(job_dir, job)
    assert info["JobState"] == "COMPLETED", out
    assert "2 training node(s) [node1,node2] x 2 rank(s)" in out
    logs = node_logs(job_dir, job)
    for rank, node, local in ((0, "node1", 0), (1, "node1", 1), (2, "node2", 0), (3, "node2", 1)):
        assert (
            f"allreduce rank {rank}/4 node {node} sum 6" in logs[f"{node}.r0.train.rank{rank}.log"]
        ), logs
        assert f"train rank {rank}/4 local_rank {local} on node {node}" in out


def test_a_dead_task_fails_the_whole_job_fast_naming_node_and_code(cluster, job_dir):
    t0 = time.monotonic()
    job = sbatch(cluster, job_dir, "--fail-rank", "1", "--exit-code", "3",
                 env={"RLRT_TRAIN_CMD": ALLREDUCE})  # fmt: skip
    info = cluster.wait_job(job, 240)
    out = batch_log(job_dir, job)
    assert info["JobState"] == "FAILED", out
    assert info["ExitCode"] == "3:0", info
    assert "FAILED: train rank 1 on node node2 exited with code 3" in out
    # rank 0 was blocked in a barrier: it was killed, not left waiting for the 300 s timeout
    assert time.monotonic() - t0 < 150, out


def wait_for(cond, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def running(cluster, job: str, cond):  # noqa: ANN001, ANN201
    """`cond` for wait_for that fails at once (with the job's log) if the job has ended."""

    last = [0.0]

    def check() -> bool:
        if cond():
            return True
        if time.monotonic() - last[0] < 1.0:  # ask slurmctld at most once a second
            return False
        last[0] = time.monotonic()
        info = cluster.job_state(job)
        if info.get("JobState") in TERMINAL:
            out = Path(info.get("StdOut", "/nonexistent"))
            log = out.read_text() if out.exists() else ""
            raise AssertionError(f"job {job} ended early: {info.get('JobState')}\n{log}")
        return False

    return check


def wait_requeued(cluster, job: str, timeout: float) -> None:
    def requeued() -> bool:
        info = cluster.job_state(job)
        if info.get("JobState") in TERMINAL:
            out = Path(info.get("StdOut", "/nonexistent"))
            log = out.read_text() if out.exists() else ""
            raise AssertionError(f"job {job} ended instead of requeueing: {info}\n{log}")
        return info.get("Restarts") == "1" and info.get("JobState") == "PENDING"

    wait_for(requeued, timeout, "the requeue")


def release_requeued(cluster, job: str, timeout: float = 120) -> None:
    """Wait for the requeue, then shorten the 120 s hold Slurm puts on requeued jobs
    (`scontrol update StartTime=now`) so the test does not sit idle."""
    wait_requeued(cluster, job, timeout)
    # slurmd revokes the old incarnation's credential with a 1 s resolution: a restart in the same
    # second is refused ("Job credential revoked"). Let both nodes finish the old run first.
    wait_for(cluster.nodes_idle, 60, "the nodes to clean up the first run")
    time.sleep(3)
    deadline = time.monotonic() + 60
    while cluster.job_state(job).get("JobState") == "PENDING" and time.monotonic() < deadline:
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        time.sleep(2)


def preempt_and_release(cluster, job: str, timeout: float = 120) -> None:
    """What Slurm does at `--signal=B:USR1@120`, then release the requeued job."""
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    release_requeued(cluster, job, timeout)


def test_usr1_is_forwarded_and_the_job_requeues(cluster, job_dir):
    job = sbatch(cluster, job_dir, "--sleep", "30", env={"RLRT_TRAIN_CMD": ALLREDUCE})
    logs = job_dir / f"job-{job}"

    def started() -> bool:
        text = "".join(p.read_text() for p in logs.glob("*.r0.*.log"))
        return text.count("allreduce rank") == 2

    wait_for(running(cluster, job, started), 180, "both ranks to start")
    preempt_and_release(cluster, job)
    info = cluster.wait_job(job, 240)
    out = batch_log(job_dir, job)
    assert info["JobState"] == "COMPLETED", out
    assert "requeueing job" in out and "restart 1" in out, out
    got = node_logs(job_dir, job)
    # exactly once, to the trainer process only: its helper process survives
    assert "rank 0 on node1 got USR1 x1" in got["node1.r0.train.rank0.log"]
    assert "rank 1 on node2 got USR1 x1" in got["node2.r0.train.rank1.log"]
    assert "rank 0 helper alive after USR1: True" in got["node1.r0.train.rank0.log"]
    assert "rank 1 helper alive after USR1: True" in got["node2.r0.train.rank1.log"]


def test_rlrt_slurm_submit_renders_and_submits_through_nemo_run(cluster, job_dir):
    pytest.importorskip("nemo_run")
    ckpt = job_dir / "ckpt"
    ckpt.mkdir()
    cmd = [str(REPO / ".venv" / "bin" / "rlrt"), "slurm", "submit", "--recipe", "tiny_demo",
           "--nodes", "2", "--gpus-per-node", "0", "--log-dir", str(job_dir),
           "--env", f"RLRT_TRAIN_CMD={ALLREDUCE}",
           "parallel.tp=2", f"checkpoint.dir={ckpt}"]  # fmt: skip
    dry = subprocess.run([*cmd, "--dry-run"], env=cluster.env, capture_output=True, text=True,
                         timeout=120, cwd=REPO)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    script = job_dir / "rendered.sbatch"
    script.write_text(dry.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for line in ["#SBATCH --nodes=2", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120"]:
        assert line in dry.stdout
    # sbatch itself accepts the script (--test-only: validated by slurmctld, not queued)
    t = cluster.run("sbatch", "--test-only", str(script), check=False)
    assert "to start at" in (t.stdout + t.stderr), t.stderr

    p = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    job = re.search(r"submitted job (\d+)", p.stdout).group(1)
    info = cluster.wait_job(job, 240)
    out = (job_dir / f"rlrt-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    logs = node_logs(job_dir, job)
    assert "node node1" in logs["node1.r0.train.rank0.log"]
    assert "node node2" in logs["node2.r0.train.rank1.log"]
    st = subprocess.run([cmd[0], "slurm", "status", job], env=cluster.env, capture_output=True,
                        text=True, timeout=60)  # fmt: skip
    assert "JobState=COMPLETED" in st.stdout and "training finished" in st.stdout, st.stdout


# ---- the real trainer: tiny recipe, TP=2 across the two nodes -----------------------------------

# 10 steps: the preemption below lands after step 1, well before the end even when a step takes
# only a fraction of a second (an idle CI machine).
STEPS = 10
TINY = ["--recipe", "tiny_demo", "parallel.tp=2", f"train.steps={STEPS}",
        "train.prompts_per_step=4", "train.mini_batch_prompts=4", "rollout.group_size=4",
        "logging.tensorboard=false", "checkpoint.save_every=0",
        # e.g. RLRT_SLURM_TINY_EXTRA="rollout.async_steps=1": the same jobs with other settings
        *os.environ.get("RLRT_SLURM_TINY_EXTRA", "").split()]  # fmt: skip
NONDETERMINISTIC = ("time/", "throughput/")


@pytest.fixture(scope="module")
def tiny_model() -> list[str]:
    """The tiny model (SFT-warmed HF dir + Megatron checkpoint), made once by a single-process
    `rlrt train ... train.steps=0`; the Slurm jobs load it instead of each building it."""
    rlrt = REPO / ".venv" / "bin" / "rlrt"
    if subprocess.run([str(rlrt), "train", "--help"], capture_output=True).returncode != 0:
        pytest.skip("`rlrt train` is not available")
    run_dir = SHARED_ROOT / "tiny-model"
    hf, mc = run_dir / "model" / "hf", run_dir / "model" / "megatron"
    if not (mc.is_dir() and (hf / "config.json").exists()):
        p = subprocess.run(
            [str(rlrt), "train", "--recipe", "tiny_demo", "train.steps=0",
             f"logging.run_dir={run_dir}", "logging.tensorboard=false"],
            capture_output=True, text=True, timeout=900, cwd=REPO,
        )  # fmt: skip
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [f"model.hf_path={hf}", f"model.megatron_ckpt={mc}"]


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> that step's metrics (the last record of a step wins: a resumed run may repeat one),
    without the wall-clock fields."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = {k: v for k, v in rec.items() if not k.startswith(NONDETERMINISTIC)}
    return out


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_model) -> dict:
    job_dir = SHARED_ROOT / f"uninterrupted-{uuid.uuid4().hex[:6]}"
    job_dir.mkdir(parents=True)
    run_dir = job_dir / "run"
    job = sbatch(cluster, job_dir, *TINY, *tiny_model, f"logging.run_dir={run_dir}")
    info = cluster.wait_job(job, 900)
    result = {"job": job, "job_dir": job_dir, "run_dir": run_dir, "info": info,
              "out": batch_log(job_dir, job)}  # fmt: skip
    yield result
    if info["JobState"] == "COMPLETED":
        shutil.rmtree(job_dir, ignore_errors=True)


def test_a_tiny_recipe_tp2_across_two_nodes_finishes(uninterrupted):
    out, info = uninterrupted["out"], uninterrupted["info"]
    assert info["JobState"] == "COMPLETED", out
    logs = node_logs(uninterrupted["job_dir"], uninterrupted["job"])
    assert "train rank 0/2 local_rank 0 on node node1" in out
    assert "train rank 1/2 local_rank 0 on node node2" in out
    assert set(logs) >= {"node1.r0.train.rank0.log", "node2.r0.train.rank1.log"}
    metrics = read_metrics(uninterrupted["run_dir"])
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert (uninterrupted["run_dir"] / "checkpoints" / "latest").exists()


def run_preempted(
    cluster, tiny_model, uninterrupted, job_dir, preempt, extra: tuple[str, ...] = ()
) -> str:
    """Start the tiny run (+ `extra` overrides), `preempt(job)` right after its first step (and
    its first checkpoint, if it writes one), let the requeued job resume from `latest`; every
    step's metrics must equal the uninterrupted run's."""
    assert uninterrupted["info"]["JobState"] == "COMPLETED", uninterrupted["out"]
    run_dir = job_dir / "run"
    job = sbatch(cluster, job_dir, *TINY, *tiny_model, f"logging.run_dir={run_dir}", *extra)
    metrics = run_dir / "metrics.jsonl"
    saving = any(a.startswith("checkpoint.save_every=") and not a.endswith("=0") for a in extra)

    def first_step() -> bool:
        stepped = metrics.exists() and metrics.read_text().count("\n") >= 1
        return stepped and (not saving or (run_dir / "checkpoints" / "latest").exists())

    wait_for(running(cluster, job, first_step), 600,
             "the first training step", poll=0.1)  # fmt: skip
    preempt(job)
    release_requeued(cluster, job, timeout=300)
    info = cluster.wait_job(job, 900)
    out = batch_log(job_dir, job)
    state = {k: info.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts")}
    assert info["JobState"] == "COMPLETED", f"{state}\n{out}"
    assert f"job {job} restart 1" in out, out
    iters = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
    assert any(int(name.split("_")[1]) < STEPS for name in iters), iters  # the preemption's
    resumed, reference = read_metrics(run_dir), read_metrics(uninterrupted["run_dir"])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in sorted(reference):
        diff = {k: (reference[step].get(k), resumed[step].get(k))
                for k in reference[step].keys() | resumed[step].keys()
                if reference[step].get(k) != resumed[step].get(k)}  # fmt: skip
        assert not diff, f"step {step}: (uninterrupted, resumed) differ: {diff}"
    return out


def test_b_preempted_run_resumes_and_matches_the_uninterrupted_one(
    cluster, tiny_model, uninterrupted, job_dir
):
    """USR1 to the batch shell (what `--signal=B:USR1@120` does before the time limit): the job
    forwards it, the trainer checkpoints and exits, the job requeues itself."""

    def usr1(job: str) -> None:
        cluster.run("scancel", "--signal=USR1", "--batch", job)

    out = run_preempted(cluster, tiny_model, uninterrupted, job_dir, usr1)
    assert "USR1 (preemption or time limit)" in out and "requeueing job" in out, out


def test_b_scontrol_requeue_mid_run_resumes_identically(
    cluster, tiny_model, uninterrupted, job_dir
):
    """An admin/scheduler requeue: Slurm SIGTERMs every task (KillWait before SIGKILL), the
    trainer checkpoints on SIGTERM, Slurm requeues the job itself."""

    def requeue(job: str) -> None:
        cluster.run("scontrol", "requeue", job)

    run_preempted(cluster, tiny_model, uninterrupted, job_dir, requeue)


# Phase timeouts of the node-failure run; `init` keeps its default (model build and load).
PHASE_TIMEOUT = 40
PHASES = ("rollout", "reward", "logprobs", "advantages", "update", "sync", "checkpoint", "log")


def test_b_a_dead_node_fails_fast_and_the_requeue_resumes_exactly(
    cluster, tiny_model, uninterrupted, job_dir, fault_row
):
    """node2 dies after the first checkpoint: its slurmd, slurmstepd and trainer rank stopped and
    SIGKILLed at once (a dead slurmd alone leaves the job's tasks running). The rank on node1
    exits within the phase timeout + 10 s, Slurm marks node2 DOWN and requeues the job
    (--requeue); node2 comes back (slurmd restarted, as after a reboot: ReturnToService=2) and
    the requeued job resumes from `latest` with every step's metrics equal to the uninterrupted
    run's."""
    row = fault_row(
        "10 node death (slurmd + its processes)",
        "node2 of a 2-node TP=2 job, after step 1's checkpoint",
        "node1's rank exits <= timeout + 10 s; Slurm requeues; resume exact",
    )
    seen: dict = {}

    def node_dies(job: str) -> None:
        seen["job"] = job
        survivor = int((job_dir / f"job-{job}" / "pids" / "r0.node1.train.0").read_text())
        t0 = time.monotonic()
        seen["killed"] = cluster.kill_node("node2", job)
        try:
            wait_for(lambda: not Path(f"/proc/{survivor}").exists(), PHASE_TIMEOUT + 60,
                     "the rank on node1 to exit", poll=0.1)  # fmt: skip
            seen["detect_s"] = round(time.monotonic() - t0, 1)
            wait_requeued(cluster, job, 300)
            seen["requeued_s"] = round(time.monotonic() - t0, 1)
            cluster.run("scontrol", "hold", job)  # released below
        finally:  # node2 comes back either way: the tests after this one need both nodes
            cluster.restart_node("node2")
        # Kills of the first run's step (srun's --kill-on-bad-exit, ...) could not reach node2:
        # slurmctld resends each every 60 s (RPC_RETRY_INTERVAL) until node2 answers, and one
        # delivered after the requeued run started kills its step of the same id, <job>.0 (seen:
        # its rank on node2 exited 143). Keep the job held for one resend round (+15 s).
        restarted = time.monotonic()
        wait_for(lambda: time.monotonic() - restarted > 75 and cluster.nodes_idle(), 180,
                 "node2 back and slurmctld's pending messages to it resent")  # fmt: skip
        cluster.run("scontrol", "release", job)
        seen["released_s"] = round(time.monotonic() - t0, 1)

    extra = ("checkpoint.save_every=1", *(f"timeouts.{p}={PHASE_TIMEOUT}" for p in PHASES))
    out = run_preempted(cluster, tiny_model, uninterrupted, job_dir, node_dies, extra)
    print(f"node failure: {seen}")
    assert "DUE TO NODE FAILURE" in out, out  # Slurm's requeue: not a failed job
    # slurmd, node2's slurmstepd, its launch.sh and the trainer rank
    assert len(seen["killed"]) >= 4, seen
    assert seen["detect_s"] <= PHASE_TIMEOUT + 10, seen
    exit_r0 = (job_dir / f"job-{seen['job']}" / "exit.r0.train.0").read_text().split()
    resumed = node_logs(job_dir, seen["job"])["node1.r1.train.rank0.log"]
    assert "resumed from" in resumed, resumed[-3000:]
    row.update(observed=f"node1's rank exit {exit_r0[-1]}; Slurm: node2 DOWN, job requeued after "
               f"{seen['requeued_s']} s; resumed from latest: metrics = reference",
               exit=exit_r0[-1], detect_s=seen["detect_s"], lost=0)  # fmt: skip


# ---- separate rollout nodes: node2 serves, node1 trains and is told the address ------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rollout_nodes_serve_and_the_trainer_gets_their_urls(cluster, job_dir):
    port = free_port()
    env = {
        "RLRT_ROLLOUT_NODES": "1",
        "RLRT_ROLLOUT_PORT": str(port),
        # a stand-in for sglang.launch_server on the rollout node (loopback only)
        "RLRT_ROLLOUT_CMD": 'exec python -m http.server "$RLRT_ROLLOUT_PORT" --bind 127.0.0.1',
        "RLRT_TRAIN_CMD": 'python tests/slurm/rollout_probe.py "$@"',
    }
    job = sbatch(cluster, job_dir, env=env)
    info = cluster.wait_job(job, 240)
    out = batch_log(job_dir, job)
    assert info["JobState"] == "COMPLETED", out
    assert "training node(s) [node1]" in out and "rollout node(s) [node2]" in out, out
    assert f"rollout servers: http://127.0.0.1:{port}" in out
    logs = node_logs(job_dir, job)
    assert (
        f"rollout server http://127.0.0.1:{port} answered 200" in logs["node1.r0.train.rank0.log"]
    )
    assert "rollout rank 0/1 local_rank 0 on node node2" in logs["node2.r0.rollout.rank0.log"]


def test_a_crashed_rollout_server_fails_the_job(cluster, job_dir):
    env = {
        "RLRT_ROLLOUT_NODES": "1",
        "RLRT_ROLLOUT_CMD": "sleep 5; exit 7",
        "RLRT_TRAIN_CMD": "sleep 600",
    }
    t0 = time.monotonic()
    job = sbatch(cluster, job_dir, env=env)
    info = cluster.wait_job(job, 240)
    out = batch_log(job_dir, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "7:0", out
    assert "FAILED: rollout rank 0 on node node2 exited with code 7" in out
    assert time.monotonic() - t0 < 150, out


# ---- submitting from another machine: nemo-run's SSH tunnel (sshd on 127.0.0.1) -----------------


@pytest.fixture(scope="module")
def sshd(cluster, tmp_path_factory):
    """A private sshd on 127.0.0.1 (key auth only) whose sessions see the test cluster's
    SLURM_CONF, standing in for a cluster's login node."""
    if shutil.which("/usr/sbin/sshd") is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server"]
        p = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
        if p.returncode != 0:
            pytest.skip(
                f"{NOT_TESTED} openssh-server could not be installed (apt-get exit "
                f"{p.returncode}), so nemo-run's SSH-tunnel submission was not exercised; "
                f"apt-get said: {p.stderr.decode(errors='replace')[-300:].strip()}"
            )
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                       check=True, timeout=60)  # fmt: skip
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PidFile {d}/sshd.pid\nSubsystem sftp internal-sftp\nSetEnv SLURM_CONF={cluster.conf}\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    log = open(d / "sshd.log", "wb")  # noqa: SIM115 - the daemon's log
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: proc.poll() is not None or _listening(port), 30, "sshd")
        if proc.poll() is not None:
            pytest.skip(
                f"{NOT_TESTED} sshd did not start, so nemo-run's SSH-tunnel submission was not "
                f"exercised; its log: {(d / 'sshd.log').read_text()[-300:].strip()}"
            )
        yield {"port": port, "key": str(d / "client_key")}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_c_submit_and_status_through_an_ssh_tunnel(cluster, sshd, job_dir):
    pytest.importorskip("nemo_run")
    ckpt = job_dir / "ckpt"
    ckpt.mkdir()
    rlrt = str(REPO / ".venv" / "bin" / "rlrt")
    ssh = ["--ssh", f"root@127.0.0.1:{sshd['port']}", "--identity", sshd["key"]]
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}  # only the far side knows it
    p = subprocess.run(
        [rlrt, "slurm", "submit", "--recipe", "tiny_demo", "--nodes", "2", "--gpus-per-node", "0",
         *ssh, "--home", str(REPO), "--log-dir", str(job_dir),
         "--env", f"RLRT_TRAIN_CMD={ALLREDUCE}", "parallel.tp=2", f"checkpoint.dir={ckpt}"],
        env=env, capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    job = re.search(r"submitted job (\d+)", p.stdout).group(1)
    info = cluster.wait_job(job, 240)
    assert info["JobState"] == "COMPLETED", (job_dir / f"rlrt-{job}.out").read_text()
    st = subprocess.run([rlrt, "slurm", "status", job, *ssh], env=env, capture_output=True,
                        text=True, timeout=120)  # fmt: skip
    assert "JobState=COMPLETED" in st.stdout, st.stdout + st.stderr
    # the storage check goes through the tunnel too
    p = subprocess.run(
        [rlrt, "slurm", "submit", "--recipe", "tiny_demo", "--nodes", "2", "--gpus-per-node", "0",
         *ssh, "--home", str(REPO), f"checkpoint.dir={job_dir}/missing"],
        env=env, capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 2 and "does not exist on the cluster's shared storage" in p.stderr
