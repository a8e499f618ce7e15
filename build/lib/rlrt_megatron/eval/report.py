"""The eval report: a rich console table, `summary.json` and `summary.csv`.

CSV columns: ``benchmark, n_problems, k, avg@k, pass@1, pass@2, ..., pass@k,
mean_response_tokens, truncated_frac, reward_failures``; one row per benchmark, then ``average``
(the unweighted mean over benchmarks). Accuracies are fractions in [0, 1] in the files and
percentages in the table.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from rlrt_megatron.eval.metrics import pass_ks
from rlrt_megatron.eval.runner import AVERAGE, EvalReport


def columns(k: int) -> list[str]:
    return [
        "n_problems",
        f"avg@{k}",
        *[f"pass@{j}" for j in pass_ks(k)],
        "mean_response_tokens",
        "truncated_frac",
        "reward_failures",
    ]


def _fmt(key: str, v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key.startswith(("avg@", "pass@")) or key == "truncated_frac":
        return f"{100 * v:.1f}"
    if key in ("n_problems", "reward_failures"):
        return f"{int(v)}"
    return f"{v:.0f}"


def render_table(report: EvalReport, title: str | None = None) -> Any:
    """A `rich.table.Table`: benchmarks as rows, metrics (in %) as columns, the average last."""
    from rich.table import Table

    k = report.settings.k
    # pass@1 equals avg@k (both are c / n per problem): the table shows it once
    cols = [c for c in columns(k) if c not in ("reward_failures", "pass@1")]
    s = report.settings
    table = Table(
        title=title or f"avg@{k} / pass@k (%), T={s.temperature}, top_p={s.top_p}",
        caption=f"model: {s.model}",
    )
    table.add_column("benchmark", style="bold")
    for c in cols:
        table.add_column(
            {"n_problems": "problems", "mean_response_tokens": "mean len"}.get(
                c, c.replace("truncated_frac", "truncated")
            ),
            justify="right",
        )
    names = [b for b in report.summary if b != AVERAGE]
    for i, name in enumerate([*names, AVERAGE]):
        row = report.summary.get(name, {})
        table.add_row(name, *[_fmt(c, row.get(c)) for c in cols], end_section=i == len(names) - 1)
    return table


def table_text(report: EvalReport, width: int = 140) -> str:
    """The table as plain text (logs, tests)."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(render_table(report))
    return buf.getvalue()


def csv_text(report: EvalReport) -> str:
    k = report.settings.k
    cols = columns(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["benchmark", "k", *cols])
    for name, row in report.summary.items():
        w.writerow([name, k, *["" if row.get(c) is None else f"{row[c]:.6g}" for c in cols]])
    return buf.getvalue()


def write_report(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    """Write `summary.json` and `summary.csv` under `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "summary.json", "csv": out / "summary.csv"}
    data = report.to_json()
    data["n_sampled"] = report.n_sampled
    data["n_resumed"] = report.n_resumed
    paths["json"].write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")
    paths["csv"].write_text(csv_text(report))
    return paths
