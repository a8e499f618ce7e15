"""Fixtures of the `sglang` tier: REAL `sglang.launch_server` processes on the CPU.

The servers run in the SGLang venv (`make sglang-env`, /opt/venv-sglang; $RLRT_SGLANG_PYTHON
points elsewhere) with the CPU flags of sglang_env.py and `tests/sglang_cpu` (the two
sgl_kernel helpers in plain torch) first on their PYTHONPATH. Without that venv every test of
the tier is skipped with the reason, and the reasons are repeated at the end of the run (and
appended to $RLRT_CI_SKIP_LOG under CI) so a skipped tier cannot pass unseen.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from sglang_env import SERVER_ENV, sglang_missing  # noqa: E402


def pytest_collection_modifyitems(config, items):  # noqa: ANN001, ARG001
    why = sglang_missing()
    if why is None:
        return
    for item in items:
        if "tests/real_sglang/" in item.nodeid.replace(os.sep, "/"):
            item.add_marker(pytest.mark.skip(reason=why))


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001, ARG001
    """Repeat every skipped test of this tier and why, after everything else."""
    lines = []
    for rep in terminalreporter.stats.get("skipped", []):
        if "tests/real_sglang/" not in rep.nodeid.replace(os.sep, "/"):
            continue
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        lines.append(f"NOT TESTED {rep.nodeid}: {reason}")
    if not lines:
        return
    terminalreporter.write_sep("=", "sglang tier: skipped tests")
    for ln in lines:
        terminalreporter.write_line(ln)
    log = os.environ.get("RLRT_CI_SKIP_LOG")
    if log:
        with open(log, "a") as f:
            f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def server_env() -> dict[str, str]:
    """The environment variables a launched CPU server needs (set them in the trainer's env:
    its servers inherit it)."""
    return dict(SERVER_ENV)
