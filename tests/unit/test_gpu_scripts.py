"""tools/gpu_check.sh and tools/fetch_gpu_wheels.sh, on CPU: argument handling, the stage
driver and its summary of RESULT lines, and the TE pieces' reassembly + sha256 check (the GPU
machine has one run per session, so their logic is checked here)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "tools" / "gpu_check.sh"
FETCH = REPO / "tools" / "fetch_gpu_wheels.sh"


def _run(args, tmp_path, timeout=240, **env):
    full = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "TE_BUILD": str(tmp_path / "te-build"),
        "TE_STASH": str(tmp_path / "te-stash"),
        **env,
    }
    return subprocess.run(
        ["bash", str(CHECK), "--wheels", str(tmp_path / "no-wheels"), *args],
        capture_output=True, text=True, timeout=timeout, env=full, cwd=REPO,
    )  # fmt: skip


def _summary(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1 :] if line.strip()}


@pytest.mark.parametrize("script", [CHECK, FETCH])
def test_scripts_parse_and_are_shellcheck_clean(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck"):
        p = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout
    p = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("# ") and "--te" in p.stdout


def test_bad_arguments_exit_2(tmp_path):
    assert _run(["--only", "nonsense"], tmp_path).returncode == 2
    assert _run(["--bogus"], tmp_path).returncode == 2
    assert _run(["--timeout", "tests"], tmp_path).returncode == 2


def test_stage_runs_and_summary_carries_result_lines(tmp_path):
    p = _run(
        ["--only", "weight_sync"], tmp_path,
        WEIGHT_SYNC_ARGS="--device cpu --layers 1 --vocab 512 --repeats 1",
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = _summary(p.stdout)
    assert rows["weight_sync"][0] == "pass"
    assert any(tok.startswith("flatten_bucket_vs_copy=") for tok in rows["weight_sync"])
    assert rows["tests"][0] == rows["te"][0] == "skip"
    out = tmp_path / "out"
    assert (out / "weight_sync.log").is_file()
    assert (out / "results.txt").read_text().startswith("weight_sync: RESULT device=cpu")


def test_failing_and_timed_out_stages_make_the_run_fail(tmp_path):
    p = _run(
        ["--no-setup", "--only", "weight_sync,logprobs", "--timeout", "logprobs=1"], tmp_path,
        WEIGHT_SYNC_ARGS="--no-such-flag", LOGPROBS_ARGS="--device cpu --tokens 65536",
    )  # fmt: skip
    assert p.returncode == 1
    rows = _summary(p.stdout)
    assert rows["weight_sync"][0].startswith("fail(rc=")
    assert rows["logprobs"][0] == "fail(timeout)"


def _te_pieces(folder: Path, payload: bytes, piece: int) -> str:
    name = "transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl"
    folder.mkdir(parents=True)
    for k in range(0, len(payload), piece):
        (folder / f"{name}.part-{k // piece:02d}").write_bytes(payload[k : k + piece])
    (folder / f"{name}.sha256").write_text(f"{hashlib.sha256(payload).hexdigest()}  {name}\n")
    return name


def test_te_stage_reassembles_checks_sha_and_reports_a_failed_build(tmp_path):
    payload = os.urandom(5000)
    name = _te_pieces(tmp_path / "pieces", payload, 2048)
    (tmp_path / "pieces" / "transformer_engine_torch-2.20.2.tar.gz").write_bytes(b"not a tar")
    p = _run(["--no-setup", "--te-dir", str(tmp_path / "pieces"), "--only", "te"], tmp_path)
    log = (tmp_path / "out" / "te.log").read_text()
    assert p.returncode == 1 and f"core wheel {name} ok" in log, log
    assert (tmp_path / "te-build" / "wheels" / name).read_bytes() == payload
    assert "extension build failed" in log  # the fake sdist cannot build
    assert (tmp_path / "te-build" / "done").read_text().strip() != "0"


def test_te_stage_rejects_a_missing_or_corrupt_piece(tmp_path):
    payload = os.urandom(5000)
    name = _te_pieces(tmp_path / "pieces", payload, 2048)
    (tmp_path / "pieces" / f"{name}.part-01").unlink()
    p = _run(["--no-setup", "--te-dir", str(tmp_path / "pieces"), "--only", "te"], tmp_path)
    log = (tmp_path / "out" / "te.log").read_text()
    assert p.returncode == 1 and "sha256 of the reassembled" in log, log
    assert not (tmp_path / "te-build" / "wheels" / name).exists()


def test_te_stash_collects_pieces_across_calls_and_build_bg_starts(tmp_path):
    payload = os.urandom(5000)
    name = _te_pieces(tmp_path / "src", payload, 2048)
    for k, part in enumerate(sorted((tmp_path / "src").glob("*.part-*"))):
        d = tmp_path / f"p{k}"
        d.mkdir()
        shutil.copy(part, d)
        shutil.copy(tmp_path / "src" / f"{name}.sha256", d)
    (tmp_path / "p2" / "transformer_engine_torch-2.20.2.tar.gz").write_bytes(b"not a tar")
    for k in range(3):  # one call per piece, as with the device tool's 64 MiB per call
        p = _run(["--no-setup", "--te-stash", str(tmp_path / f"p{k}"), "--only", "te",
                  "--skip", "te"], tmp_path)  # fmt: skip
        assert p.returncode == 0, p.stdout + p.stderr
    # the build needs only the sdist: it starts detached, before every piece is there
    p = _run(["--no-setup", "--te-build-bg", "--only", "te", "--skip", "te"], tmp_path)
    assert p.returncode == 0 and "started in the background" in p.stdout, p.stdout + p.stderr
    done = tmp_path / "te-build" / "done"
    for _ in range(300):
        if done.exists():
            break
        time.sleep(0.2)
    assert done.read_text().strip() != "0"  # the fake sdist cannot build
    p = _run(["--no-setup", "--only", "te"], tmp_path)
    log = (tmp_path / "out" / "te.log").read_text()
    assert p.returncode == 1 and f"core wheel {name} ok" in log and "build failed" in log, log
    assert (tmp_path / "te-build" / "wheels" / name).read_bytes() == payload
