"""Launching SGLang server processes and waiting for them to be healthy.

Each server is `python -m sglang.launch_server ...` started in its own session (process group),
so stopping it signals that group only: its scheduler/detokenizer children go with it and no
other process is touched. A server that exits or stays unhealthy past the startup timeout
raises SGLangError with the tail of its log.

The API key never appears on a command line (`ps` shows every argv): it goes to the server in a
private YAML file (`--config`, mode 0600 in a 0700 temporary directory outside the run dir,
deleted once the server is up), and the server's log, which prints its arguments, is written
through a filter that replaces the key with `<redacted>`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rlrt_megatron.rollout.sglang.client import INITIAL_WEIGHT_VERSION, SGLangClient, SGLangError

__all__ = [
    "build_launch_command",
    "free_port",
    "Server",
    "start_server",
    "spread",
    "stop_server",
    "wait_until_healthy",
]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_launch_command(
    model_path: str,
    *,
    port: int,
    host: str = "127.0.0.1",
    tp: int = 1,
    base_gpu_id: int = 0,
    mem_fraction: float | None = 0.5,
    colocated: bool = True,
    dtype: str = "bfloat16",
    seed: int | None = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The `python -m sglang.launch_server ...` command for one server (no API key: the key
    goes in a private `--config` file, see `start_server`)."""
    flags = {
        "--model-path": model_path,
        "--host": host,
        "--port": port,
        "--tp-size": tp,
        "--base-gpu-id": base_gpu_id,
        "--dtype": dtype,
        # a name no sync uses: a restarted server can never pass for a synced one
        "--weight-version": INITIAL_WEIGHT_VERSION,
        "--mem-fraction-static": mem_fraction,
        "--random-seed": seed,
    }
    cmd = [python, "-m", "sglang.launch_server", "--trust-remote-code"]
    for flag, value in flags.items():
        if value is not None:
            cmd += [flag, str(value)]
    if colocated:  # lets release/resume_memory_occupation hand the GPU to the trainer
        cmd.append("--enable-memory-saver")
    return cmd + list(extra_args)


@dataclass
class Server:
    index: int
    url: str
    cmd: list[str] | None  # None in connect mode (we did not start it)
    tp: int
    proc: subprocess.Popen | None = None
    log_path: str | None = None
    api_key: str | None = None  # handed over in a private --config file, never in argv
    env: dict[str, str] | None = None  # extra environment of the server process
    secret_dir: str | None = None  # the --config file's directory, removed once healthy
    released: set[str] = field(default_factory=set)  # memory tags currently released
    starts: int = 0  # restarts so far (concurrent calls that saw it fail restart it once)
    client: SGLangClient = field(init=False)

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no log)"
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])


def spread(servers: list[Server], items: list) -> list[tuple[Server, list]]:
    """Contiguous, balanced shards of `items` over `servers` (server k gets items
    [n*k//S, n*(k+1)//S)); servers left with nothing are left out."""
    k = len(servers)
    bounds = [len(items) * i // k for i in range(k + 1)]
    shards = [(s, items[bounds[i] : bounds[i + 1]]) for i, s in enumerate(servers)]
    return [(s, part) for s, part in shards if part]


REDACTED = "<redacted>"


def _secret_config(api_key: str) -> str:
    """A private YAML for `--config` holding the key (a 0700 directory outside the run dir)."""
    d = tempfile.mkdtemp(prefix="rlrt-sglang-")
    path = os.path.join(d, "secrets.yaml")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"api-key: {json.dumps(api_key)}\n")
    return path


def _drop_secret_config(s: Server) -> None:
    if s.secret_dir:
        shutil.rmtree(s.secret_dir, ignore_errors=True)
        s.secret_dir = None


def _pump_redacted(pipe, log, secrets: list[bytes]) -> None:
    """Copy the server's output to its log line by line, each secret replaced by REDACTED."""
    with pipe, log:
        for line in iter(pipe.readline, b""):
            for secret in secrets:
                line = line.replace(secret, REDACTED.encode())
            log.write(line)
            log.flush()


def start_server(s: Server, log_dir: str) -> None:
    """Launch `s.cmd`, appending its output (API key redacted) to `<log_dir>/server<i>.log`."""
    os.makedirs(log_dir, exist_ok=True)
    s.log_path = os.path.join(log_dir, f"server{s.index}.log")
    cmd = list(s.cmd or [])
    secrets = []
    if s.api_key:
        _drop_secret_config(s)
        path = _secret_config(s.api_key)
        s.secret_dir = os.path.dirname(path)
        cmd += ["--config", path]
        secrets = [s.api_key.encode()]
    env = {**os.environ, **(s.env or {})}
    # start_new_session: the server and its scheduler children form one process group
    # that stop_server signals as a whole, never touching anyone else's processes.
    s.proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    log = open(s.log_path, "ab")  # noqa: SIM115 - the pump thread closes it
    threading.Thread(target=_pump_redacted, args=(s.proc.stdout, log, secrets), daemon=True).start()


def stop_server(s: Server, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL after `grace_s` (no-op in connect mode)."""
    _drop_secret_config(s)
    proc = s.proc
    if proc is None:
        return
    if proc.poll() is not None:
        # the launcher died; its scheduler/detokenizer children (our process group) may
        # live on holding GPU memory
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace_s)
    except ProcessLookupError:
        pass


def wait_until_healthy(servers: Sequence[Server], timeout_s: float) -> None:
    """Poll /health until every server answers; SGLangError (with its log tail) if one exits
    first or all are not healthy within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    for s in servers:
        while not s.client.health(timeout=5.0):
            if not s.alive():
                raise SGLangError(
                    f"SGLang server {s.index} ({s.url}) exited with code "
                    f"{s.proc.returncode} before becoming healthy; log {s.log_path}:\n"
                    f"{s.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise SGLangError(
                    f"SGLang server {s.index} ({s.url}) not healthy after "
                    f"{timeout_s:.0f}s; log {s.log_path}:\n{s.log_tail()}"
                )
            time.sleep(0.2)
        _drop_secret_config(s)  # read at start-up; a restart writes a new one
