"""The rollout API key stays secret (issue 24 item 9): never on a command line (`ps` shows
every argv), never in a file under the run dir (config.json, checkpoints, metrics loggers, the
server's log). The full run with a real SGLang server is tests/real_sglang/test_train.py."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from recipes import get_recipe
from rlrt_megatron.config import REDACTED
from rlrt_megatron.rollout.sglang.engine import launch_key
from rlrt_megatron.rollout.sglang.server import (
    Server,
    build_launch_command,
    start_server,
    stop_server,
)

KEY = "sk-test-7f3a9c1e5b"

# A stand-in launcher that behaves like sglang.launch_server where it matters here: it reads
# the key from its --config YAML and prints its arguments (SGLang logs `server_args=...`).
FAKE_SERVER = """
import sys, time
path = sys.argv[sys.argv.index("--config") + 1]
key = open(path).read().split(":", 1)[1].strip().strip('"')
print(f"server_args={{'api_key': {key!r}, 'port': 1}}", flush=True)
time.sleep(float(sys.argv[1]))
"""


def _cmdlines() -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return out


def test_config_writers_redact_the_key(tmp_path):
    cfg = get_recipe("tiny_demo", [f"rollout.sglang_api_key={KEY}"])
    assert cfg.rollout.sglang_api_key == KEY  # the run itself still has it
    cfg.to_json(str(tmp_path / "config.json"))  # what setup writes into the run dir
    text = (tmp_path / "config.json").read_text()
    assert KEY not in text and json.loads(text)["rollout"]["sglang_api_key"] == REDACTED
    # checkpoints and the metrics loggers (TensorBoard / wandb config) get cfg.to_dict()
    assert KEY not in json.dumps(cfg.to_dict())
    assert cfg.to_dict(redact=False)["rollout"]["sglang_api_key"] == KEY
    # an unset key stays empty (nothing to redact; $RLRT_ROLLOUT_API_KEY is used)
    assert get_recipe("tiny_demo").to_dict()["rollout"]["sglang_api_key"] == ""


def test_launched_server_gets_the_key_in_a_private_file_and_its_log_is_redacted(tmp_path):
    cmd = build_launch_command("/m", port=1, python=sys.executable)
    assert KEY not in " ".join(cmd) and "--api-key" not in cmd
    s = Server(
        index=0, url="http://127.0.0.1:1", cmd=[sys.executable, "-c", FAKE_SERVER, "3"], tp=1
    )
    s.api_key = KEY
    start_server(s, str(tmp_path / "logs"))
    try:
        secret_file = os.path.join(s.secret_dir, "secrets.yaml")
        assert oct(os.stat(secret_file).st_mode & 0o777) == "0o600"
        assert oct(os.stat(s.secret_dir).st_mode & 0o777) == "0o700"
        assert not s.secret_dir.startswith(str(tmp_path))  # outside the run dir
        deadline = time.monotonic() + 30
        while "server_args" not in open(s.log_path).read() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.proc.poll() is None  # still running: its command line is in /proc
        assert not [c for c in _cmdlines() if KEY in c]
    finally:
        stop_server(s, grace_s=5)
    assert s.secret_dir is None and not os.path.exists(secret_file)
    log = open(s.log_path).read()
    assert KEY not in log and f"'api_key': '{REDACTED}'" in log
    for root, _, files in os.walk(tmp_path):
        for name in files:
            assert KEY not in open(os.path.join(root, name), errors="replace").read()


def test_launched_servers_keys_never_start_with_a_dash():
    # SGLang's --config loader passes the key to argparse as its own word: '-...' is an option
    # there and the server exits (a url-safe key began with '-' once in 64 launches)

    keys = {launch_key(None) for _ in range(2000)}
    assert len(keys) == 2000 and not [k for k in keys if k.startswith("-")]
    assert launch_key(KEY) == KEY
    with pytest.raises(ValueError, match="starts with '-'"):
        launch_key("-" + KEY)
