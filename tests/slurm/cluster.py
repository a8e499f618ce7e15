"""A real two-node Slurm cluster on this one host, for the `slurm` test tier.

`LocalCluster` installs Debian's slurmctld / slurmd / slurm-client / munge when they are missing
(root only), writes a private config under a temp dir (its own munge key and socket, its own
ports, state and spool dirs), starts munged + slurmctld + two `slurmd -N nodeX` (distinct
`Port=`, NodeAddr 127.0.0.1, CPU only) and waits until both nodes are idle. `down()` stops only
the daemons it started, by pid. Nothing outside the temp dir is touched apart from the apt
install, so it can run beside anything else on the machine.

Also a small CLI for poking at the cluster by hand:
    python tests/slurm/cluster.py up --dir /tmp/rlrt-slurm     # prints `export SLURM_CONF=...`
    python tests/slurm/cluster.py down --dir /tmp/rlrt-slurm
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The two local "nodes" share this host's disk, which stands in for the cluster's shared storage.
# `rlrt slurm submit` rightly rejects node-local checkpoint paths (/tmp/..., see
# rlrt_megatron.launch.job.NODE_LOCAL_PREFIXES), and a CI clone may itself live under /tmp:
# then the tier's job directories go under /srv instead of the checkout's runs/.
try:
    from rlrt_megatron.launch.job import NODE_LOCAL_PREFIXES as _NODE_LOCAL
except ImportError:  # cluster.py run as a script outside the venv: only up/down need it then
    _NODE_LOCAL = ("/tmp/",)
_RUNS = REPO / "runs" / "pytest-slurm"
SHARED_ROOT = Path("/srv/rlrt-slurm-tests") if f"{_RUNS}/".startswith(_NODE_LOCAL) else _RUNS
# Starts the reason of a skip that leaves a real code path untested; conftest.py repeats every
# skip of this tier at the end of the run (and appends it to $RLRT_CI_SKIP_LOG when CI sets it).
NOT_TESTED = "NOT TESTED:"

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "munged"]


class ClusterError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def install_slurm(timeout: float = 600) -> None:
    """apt-get install Slurm + munge when any binary is missing (root only)."""
    if not missing_binaries():
        return
    if os.geteuid() != 0:
        raise ClusterError(f"missing {missing_binaries()} and not root: cannot apt-get install")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # policy-rc.d keeps the packages' init scripts from starting system-wide daemons.
    subprocess.run(["apt-get", "update", "-q"], check=True, timeout=timeout, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
        check=True,
        timeout=timeout,
        env=env,
    )
    if missing_binaries():
        raise ClusterError(f"still missing after apt-get install: {missing_binaries()}")


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0): reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


class LocalCluster:
    """Two slurmd + one slurmctld + munged, all under `root`, on 127.0.0.1."""

    def __init__(
        self, root: str | Path, nodes: tuple[str, ...] = ("node1", "node2"), cpus: int = 2
    ):
        self.root = Path(root).resolve()
        self.nodes = nodes
        self.cpus = cpus
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.pids: dict[str, int] = {}
        self.hostname = socket.gethostname().split(".")[0]

    # -- environment for client commands (sbatch, squeue, scontrol) ---------------------------
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        # Keep the caller's Slurm job context (if any) from leaking into our submissions.
        for key in list(env):
            if key.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_", "SRUN_", "SALLOC_")):
                env.pop(key)
        return env

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
        return p

    # -- config ------------------------------------------------------------------------------
    def write_config(self) -> None:
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        ctl_port, *node_ports = free_ports(1 + len(self.nodes))
        r = self.root
        lines = [
            "ClusterName=rlrttest",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd.%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # no cgroups in this container: track processes by parent pid, no task binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            # SIGTERM -> SIGKILL after 30 s (Slurm's default): the trainer checkpoints on SIGTERM
            # (scontrol requeue); 10 s was too short for that on a loaded 2-core machine.
            "KillWait=30",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "MessageTimeout=20",
            "JobRequeue=1",
            "KillOnBadExit=1",
        ]
        for node, port in zip(self.nodes, node_ports, strict=True):
            lines.append(
                f"NodeName={node} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"
            )
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE "
            "State=UP OverSubscribe=NO"
        )
        self.conf.write_text("\n".join(lines) + "\n")
        # Slurm 22.05 reads cgroup.conf next to slurm.conf when present; a minimal one avoids
        # probing the host's cgroup mounts.
        (self.root / "etc" / "cgroup.conf").write_text("CgroupPlugin=autodetect\n")

    # -- daemons -------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - kept open by the child
        p = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.pids[name] = p.pid
        self._save_pids()

    def _save_pids(self) -> None:
        (self.root / "run" / "pids.json").write_text(json.dumps(self.pids))

    def up(self, timeout: float = 120) -> LocalCluster:
        install_slurm()
        if os.geteuid() != 0:
            raise ClusterError("slurmd must run as root (it starts jobs as their owners)")
        self.write_config()
        r = self.root
        self._spawn(
            "munged",
            [
                "munged", "--foreground", "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={r}/munge/munge.key",
                f"--pid-file={r}/munge/munged.pid",
                f"--log-file={r}/log/munged.log",
                f"--seed-file={r}/munge/munged.seed",
            ],
        )  # fmt: skip
        self._wait(lambda: self.munge_socket.exists(), 20, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, 60,
                   "slurmctld to answer `scontrol ping`")  # fmt: skip
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self.nodes_idle, timeout, "both nodes to be idle")
        return self

    def nodes_idle(self) -> bool:
        p = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
        return all(states.get(n, "").rstrip("*~#") == "idle" for n in self.nodes)

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, pid in self.pids.items():
                if not _pid_alive(pid):
                    raise ClusterError(f"{name} (pid {pid}) died while waiting for {what}; "
                                       f"see {self.root / 'log'}:\n{self.logs_tail()}")  # fmt: skip
            if cond():
                return
            time.sleep(0.5)
        raise ClusterError(f"timed out after {timeout}s waiting for {what}:\n{self.logs_tail()}")

    def logs_tail(self, n: int = 20) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def down(self, timeout: float = 30) -> None:
        """Cancel leftover jobs, then SIGTERM (later SIGKILL) the daemons we started, by pid."""
        if self.pids.get("slurmctld") and _pid_alive(self.pids["slurmctld"]):
            self.run("scancel", "--full", "--quiet", "-u", "root", check=False)
        for name in [f"slurmd-{n}" for n in self.nodes] + ["slurmctld", "munged"]:
            pid = self.pids.get(name)
            if pid is None or not _pid_alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        self._save_pids()

    @classmethod
    def attach(cls, root: str | Path) -> LocalCluster:
        c = cls(root)
        pids = c.root / "run" / "pids.json"
        if pids.exists():
            c.pids = json.loads(pids.read_text())
        return c

    # -- a node dying and coming back ----------------------------------------------------------
    def node_processes(self, node: str, job_id: str) -> list[int]:
        """Pids of what `node`'s slurmd started for `job_id` (its slurmstepd(s) and their tasks'
        process trees), slurmstepds first. Both "nodes" share this host: a task is `node`'s by
        its SLURMD_NODENAME, a slurmstepd by being a task's ancestor."""
        tasks, parent, comm = [], {}, {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                env = (d / "environ").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile, or not readable
                continue
            pid = int(d.name)
            comm[pid] = stat[stat.index("(") + 1 : stat.rindex(")")]
            parent[pid] = int(stat[stat.rindex(")") + 2 :].split()[1])
            if f"SLURMD_NODENAME={node}".encode() in env and (
                f"SLURM_JOB_ID={job_id}".encode() in env
            ):
                tasks.append(pid)
        steps = set()
        for pid in tasks:
            p = parent.get(pid, 0)
            while p > 1 and not comm.get(p, "").startswith("slurmstepd"):
                p = parent.get(p, 0)
            if p > 1:
                steps.add(p)
        return sorted(steps) + sorted(tasks)

    def kill_node(self, node: str, job_id: str) -> list[int]:
        """`node` dies (power loss): its slurmd, and the slurmstepd(s) and tasks it started for
        `job_id`, stopped at once and then SIGKILLed, so no process of the node reports anything.
        Returns the pids killed (slurmd first)."""
        pids = [self.pids.pop(f"slurmd-{node}"), *self.node_processes(node, job_id)]
        self._save_pids()
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        for pid in pids:
            _pid_alive(pid)  # reap our own child (the slurmd)
        return pids

    def restart_node(self, node: str) -> None:
        """The node is back (rebooted): start its slurmd again. With ReturnToService=2 a node
        that was DOWN for not responding returns to service when it registers."""
        self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])

    # -- jobs ----------------------------------------------------------------------------------
    def job_state(self, job_id: str) -> dict[str, str]:
        p = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        fields: dict[str, str] = {}
        for tok in p.stdout.split():
            if "=" in tok:
                k, _, v = tok.partition("=")
                fields.setdefault(k, v)
        return fields

    def wait_job(self, job_id: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED",
                 "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")
                 ) -> dict[str, str]:  # fmt: skip
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_state(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise ClusterError(f"job {job_id} not finished after {timeout}s: {info}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["up", "down", "install"])
    ap.add_argument("--dir", default="/tmp/rlrt-slurm")
    args = ap.parse_args(argv)
    if args.action == "install":
        install_slurm()
        return 0
    if args.action == "up":
        c = LocalCluster(args.dir).up()
        print(f"export SLURM_CONF={c.conf}")
        print(f"# pids {c.pids}; stop with: {sys.argv[0]} down --dir {args.dir}")
        return 0
    LocalCluster.attach(args.dir).down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
