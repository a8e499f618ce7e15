"""The fault-injection table: every case of tests/faults run on the tiny model, one row each.

    python benchmarks/faults.py [--model-dir runs/faults/tiny_model] [--table FILE] [-k EXPR]
                                [--slurm]

Builds (once, cached in `--model-dir`) the SFT-warmed tiny model, runs the `faults` tier
(`pytest -m faults tests/faults`) with `RLRT_FAULT_TABLE` set so each test records what it
injected, where, what it expected and what it observed, then prints

    case | injected where | expected | observed | exit code | time to detect | data lost

and a last line `faults=N survived=S lost=L`. A row survived when its test passed: the documented
outcome happened (the run continued, or stopped with a clear message and the documented exit
code) and, where the row says so, `--resume auto` then finished with metrics identical to an
uninterrupted run. "Data lost" is 0 when the test checked that nothing was lost: no checkpoint
that loads but differs from what was trained, no prompt skipped without being counted, no metric
step missing; `?` when the test failed before it could check (counted as lost). Exit codes:
`rlrt_megatron/trainer/faults.py` ("-" where the fault is handled inside a call, no process
exits). Time to detect: seconds from the injection to the surviving process's exit (dead ranks
and engines: must be <= the phase timeout + 10 s), or where in the run it was caught.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ("case", "injected where", "expected", "observed", "exit code", "time to detect",
           "data lost")  # fmt: skip


def build_model(model_dir: str) -> None:
    sys.path.insert(0, ROOT)
    from recipes import get_recipe
    from rlrt_megatron.trainer.cli import _prepare_demo_model

    _prepare_demo_model(get_recipe("tiny_demo", ["model.sft_warmup_steps=300"]), model_dir)


def run_tier(model_dir: str, table: str, select: str | None, tier: str = "faults") -> int:
    env = {**os.environ, "RLRT_FAULT_TABLE": table, "RLRT_TEST_TINY_MODEL": model_dir,
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", tier, f"tests/{tier}",
           "-p", "no:cacheprovider", "--timeout", "1800"]  # fmt: skip
    if select:
        cmd += ["-k", select]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def format_table(rows: list[dict]) -> list[str]:
    """The table's lines (markdown), then the summary line."""
    cells = [
        (r["case"], r["where"], r["expected"], r["observed"] if r["survived"] else
         f"FAILED: {r['observed'] or 'see ' + r['test']}", str(r["exit"]), str(r["detect_s"]),
         str(r["lost"]) if r["survived"] else "?")
        for r in sorted(rows, key=lambda r: (int(r["case"].split()[0]), r["case"]))
    ]  # fmt: skip
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
    survived = sum(1 for r in rows if r["survived"] and r["lost"] == 0)
    lost = sum(1 for r in rows if not (r["survived"] and r["lost"] == 0))
    lines.append(f"faults={len(rows)} survived={survived} lost={lost}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=os.path.join(ROOT, "runs", "faults", "tiny_model"))
    ap.add_argument("--table", default=None, help="keep the json rows here (default: temp)")
    ap.add_argument("-k", dest="select", default=None, help="pytest -k expression (a subset)")
    ap.add_argument("--slurm", action="store_true",
                    help="also case 10's node death on the local 2-node Slurm cluster (root; "
                    "tests/slurm, ~8 min)")  # fmt: skip
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    build_model(args.model_dir)
    table = args.table or tempfile.mkstemp(suffix=".jsonl")[1]
    open(table, "w").close()
    rc = run_tier(args.model_dir, table, args.select)
    if args.slurm:
        rc = run_tier(args.model_dir, table, "dead_node", tier="slurm") or rc
    with open(table) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    print("\n".join(format_table(rows)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
