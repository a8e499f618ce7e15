"""Fixtures of the Slurm tier: one real 2-node cluster per session (see cluster.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cluster import NOT_TESTED, SHARED_ROOT, ClusterError, LocalCluster  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        pytest.skip("the Slurm tier installs and runs munged/slurmctld/slurmd: needs root")
    c = LocalCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.up()
    except (ClusterError, subprocess.SubprocessError) as e:
        c.down()
        pytest.fail(f"could not start the local Slurm cluster: {e}")
    yield c
    c.down()


@pytest.fixture
def job_dir(request: pytest.FixtureRequest):
    """A fresh directory under the repo's runs/ (shared by both 'nodes', like shared storage)."""
    d = SHARED_ROOT / f"{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"
    d.mkdir(parents=True)
    yield d
    if not getattr(request.node, "rep_failed", True):
        shutil.rmtree(d, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001 - keep a failed test's job dir
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_failed = rep.failed
    elif rep.failed:
        item.rep_failed = True


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001, ARG001
    """Repeat, after everything else, each Slurm-tier test that was skipped and why, so a skip
    (e.g. of the SSH-tunnel test when openssh-server cannot be installed) cannot go unseen."""
    lines = []
    for rep in terminalreporter.stats.get("skipped", []):
        if "tests/slurm/" not in rep.nodeid.replace(os.sep, "/"):
            continue
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        lines.append(f"{rep.nodeid}: {reason.removeprefix('Skipped: ')}")
    if not lines:
        return
    terminalreporter.write_sep("=", f"slurm tier: {len(lines)} test(s) did NOT run")
    for line in lines:
        terminalreporter.write_line(line, yellow=NOT_TESTED in line)
    log = os.environ.get("RLRT_CI_SKIP_LOG")
    if log:
        with open(log, "a") as f:
            f.writelines(f"SKIPPED {line}\n" for line in lines)
