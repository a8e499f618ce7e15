"""`rlrt compare` outputs from the finished runs' `metrics.jsonl`: `compare.csv`, `summary.md`
(+ `summary.json`, the same numbers unrounded) and `compare.png`.

Per run (algorithm, seed):
- final avg@k: the fixed eval set's `eval/average/avg@k` at the last step (the trainer always
  evaluates after its last step when `eval.every > 0`);
- reward AUC: the area under the training mean-reward curve divided by the number of steps, i.e.
  the mean of `reward/mean` over steps 1..N (same units as the reward, comparable across N).
Per algorithm: mean +- standard error over seeds. Each algorithm against the reference (RLRT when
it is compared, else the first algorithm): a paired t-test over the seeds both have.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlrt_megatron.compare import stats

REWARD = "reward/mean"
# Teacher-side diagnostics of the trainer (`trainer/steps.py:step_metrics`), shown for the
# algorithms whose runs logged a Delta (those with a teacher).
TEACHER_KEYS = (
    "teacher/frac_rows",
    "delta/mean",
    "delta/correct_mean",
    "delta/wrong_mean",
    "delta/gap",
    "delta/gap@10",  # the mean gap over the first 10 steps
)
COLLAPSE_TOL = 0.02  # issue 23: last-10 mean >= first-5 mean - 0.02 for every run
FIRST_COLUMNS = (REWARD, "reward/pass_rate", "reward/pass_at_group")


@dataclass
class RunRows:
    """One finished run: its per-step metrics rows (`{"step": s, key: value, ...}`)."""

    algorithm: str
    seed: int
    rows: list[dict[str, Any]]
    seconds: float = 0.0


@dataclass
class Summary:
    eval_key: str | None
    reference: str
    per_run: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    per_algorithm: dict[str, dict[str, Any]] = field(default_factory=dict)
    versus: dict[str, dict[str, Any]] = field(default_factory=dict)
    teacher: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of a `metrics.jsonl`, one per step (a torn last line is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def eval_key(runs: Sequence[RunRows]) -> str | None:
    """`eval/average/avg@k` if the runs evaluated (else the first `eval/*/avg@k`), or None."""
    keys = {
        k for r in runs for row in r.rows for k in row if k.startswith("eval/") and "/avg@" in k
    }
    avg = sorted(k for k in keys if k.startswith("eval/average/"))
    return (avg or sorted(keys) or [None])[0]


def metric_columns(runs: Sequence[RunRows]) -> list[str]:
    keys = {k for r in runs for row in r.rows for k in row} - {"step"}
    first = [k for k in FIRST_COLUMNS if k in keys]
    evals = sorted(k for k in keys if k.startswith("eval/"))
    return first + evals + sorted(keys - set(first) - set(evals))


def write_csv(runs: Sequence[RunRows], path: str) -> list[str]:
    """One row per (algorithm, seed, step); a metric a step did not log is empty."""
    cols = metric_columns(runs)
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["algorithm", "seed", "step", *cols])
        for r in runs:
            for row in r.rows:
                w.writerow([r.algorithm, r.seed, row["step"], *(_cell(row.get(c)) for c in cols)])
    os.replace(path + ".tmp", path)
    return cols


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return repr(float(v)) if isinstance(v, int | float) else str(v)


def run_numbers(rows: list[dict[str, Any]], ekey: str | None) -> dict[str, float]:
    """`final_avg` (last logged eval value; nan without eval) and `reward_auc` of one run."""
    rewards = [row[REWARD] for row in rows if REWARD in row]
    evals = [row[ekey] for row in rows if ekey and ekey in row]
    return {
        "final_avg": evals[-1] if evals else math.nan,
        "reward_auc": stats.mean(rewards),
        "reward_first5": stats.mean(rewards[:5]),
        "reward_last5": stats.mean(rewards[-5:]),
        "reward_last10": stats.mean(rewards[-10:]),
        "steps": float(rows[-1]["step"]) if rows else 0.0,
    }


def summarize(runs: Sequence[RunRows], algorithms: Sequence[str]) -> Summary:
    ekey = eval_key(runs)
    ref = "rlrt" if "rlrt" in algorithms else algorithms[0]
    s = Summary(eval_key=ekey, reference=ref)
    for r in runs:
        s.per_run.setdefault(r.algorithm, {})[r.seed] = run_numbers(r.rows, ekey)
    for algo in algorithms:
        seeds = s.per_run.get(algo, {})
        entry: dict[str, Any] = {"seeds": sorted(seeds)}
        for m in ("final_avg", "reward_auc", "reward_first5", "reward_last5"):
            vals = [seeds[k][m] for k in sorted(seeds)]
            entry[m] = {"mean": stats.mean(vals), "se": stats.stderr(vals), "values": vals}
        s.per_algorithm[algo] = entry
    for algo in algorithms:
        if algo == ref:
            continue
        common = sorted(set(s.per_run.get(algo, {})) & set(s.per_run.get(ref, {})))
        out = {"seeds": common}
        for m in ("final_avg", "reward_auc"):
            a = [s.per_run[ref][k][m] for k in common]
            b = [s.per_run[algo][k][m] for k in common]
            if any(math.isnan(x) for x in a + b):
                continue
            out[m] = stats.paired_t_test(a, b).__dict__
        s.versus[algo] = out
    for r in runs:
        if not any("delta/mean" in row for row in r.rows):
            continue
        per_seed = s.teacher.setdefault(r.algorithm, {})
        for k, v in teacher_means(r.rows).items():
            per_seed.setdefault(k, []).append(v)
    return s


def teacher_means(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per run: the mean over steps of each `TEACHER_KEYS` metric (`delta/gap@10`: over the first
    10 steps) and of the eval's teacher probe (`eval/teacher/<bench>/avg@k` and the student's
    `student_avg@k` on the same problems), over the steps that logged it."""
    out = {}
    for k in TEACHER_KEYS:
        src, rs = (k[:-3], rows[:10]) if k.endswith("@10") else (k, rows)
        vals = [row[src] for row in rs if src in row]
        if vals:
            out[k] = stats.mean(vals)
    probe = sorted(
        {k for row in rows for k in row if k.startswith("eval/teacher/") and "avg@" in k}
    )
    for k in probe:
        out[k] = stats.mean([row[k] for row in rows if k in row])
    return out


def verdict(ref: str, other: str, t: dict[str, Any]) -> str:
    """`rlrt > grpo on 3/3 seeds, p = 0.034` (the side ahead on more seeds first)."""
    n, ref_wins, other_wins, ties = t["n"], t["a_wins"], t["b_wins"], t["ties"]
    if ties == n:
        words = f"{ref} = {other} on all {n} seeds"
    elif ref_wins == other_wins:
        words = f"no winner: {ref} ahead on {ref_wins}/{n} seeds, {other} on {other_wins}/{n}"
    elif ref_wins > other_wins:
        words = f"{ref} > {other} on {ref_wins}/{n} seeds"
    else:
        words = f"{other} > {ref} on {other_wins}/{n} seeds"
    if ties and ties < n:
        words += f" ({ties} tied)"
    p = t["p"]
    return words + (", p n/a (one seed)" if math.isnan(p) else f", p = {p:.3g}")


def pm(mean: float, se: float, digits: int = 3) -> str:
    """`0.412 ± 0.013` (no ± part without a standard error)."""
    if math.isnan(mean):
        return "n/a"
    if math.isnan(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def summary_markdown(s: Summary, header: Sequence[str] = ()) -> str:
    k = s.eval_key.rsplit("/", 1)[-1] if s.eval_key else "avg@k"
    lines = [*header]
    lines += [
        f"| algorithm | seeds | final {k} | reward AUC | reward first 5 -> last 5 steps |",
        "|---|---|---|---|---|",
    ]
    for algo, e in s.per_algorithm.items():
        f5, l5 = e["reward_first5"], e["reward_last5"]
        lines.append(
            f"| {algo} | {len(e['seeds'])} | {pm(e['final_avg']['mean'], e['final_avg']['se'])}"
            f" | {pm(e['reward_auc']['mean'], e['reward_auc']['se'])}"
            f" | {pm(f5['mean'], f5['se'])} -> {pm(l5['mean'], l5['se'])} |"
        )
    lines += [
        "",
        f"Mean ± standard error over seeds. final {k}: the fixed eval set "
        f"(`{s.eval_key}`) after the last step. reward AUC: area under the training mean-reward "
        "curve / number of steps (= the mean of `reward/mean` over all steps).",
        "",
        "Collapse check: per seed, mean reward of the last 10 steps minus that of the first 5 "
        f"(a run collapses when it is below -{COLLAPSE_TOL}).",
        "",
        "| algorithm | last 10 - first 5, per seed | collapsed runs |",
        "|---|---|---|",
    ]
    for algo, per_seed in s.per_run.items():
        d = [v["reward_last10"] - v["reward_first5"] for _, v in sorted(per_seed.items())]
        bad = sum(x < -COLLAPSE_TOL for x in d)
        lines.append(f"| {algo} | {', '.join(f'{x:+.3f}' for x in d)} | {bad}/{len(d)} |")
    if s.versus:
        lines += [
            "",
            f"## Against {s.reference} (paired t-test over seeds, two-sided)",
            "",
            f"| algorithm | metric | {s.reference} - algorithm | verdict |",
            "|---|---|---|---|",
        ]
        for algo, v in s.versus.items():
            for m, label in (("final_avg", f"final {k}"), ("reward_auc", "reward AUC")):
                if m not in v:
                    continue
                t = v[m]
                diff = pm(t["mean_diff"], t["se_diff"])
                lines.append(f"| {algo} | {label} | {diff} | {verdict(s.reference, algo, t)} |")
    if s.teacher:
        lines += [
            "",
            "## Teacher-side diagnostics (algorithms with a teacher)",
            "",
            "Per run the mean over steps, then mean ± standard error over seeds. "
            "`teacher/frac_rows`: share of rollouts whose teacher the algorithm uses; "
            "Delta = log pi_T - log pi_S of the sampled tokens (`delta/mean` on those rows; "
            "`correct_mean` / `wrong_mean` on correct / wrong rollouts, probe rows included; "
            "`gap` = their difference, `gap@10` over the first 10 steps: > 0 when the teacher "
            "tells right from wrong). `eval/teacher/.../avg@k`: the teacher prompt showing a "
            "correct eval sample vs `student_avg@k`, the student on the same problems.",
            "",
        ]
        keys = [k for k in TEACHER_KEYS if any(k in p for p in s.teacher.values())]
        keys += sorted({k for p in s.teacher.values() for k in p} - set(keys))
        lines += [
            "| algorithm | " + " | ".join(f"`{key}`" for key in keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for algo, per_seed in s.teacher.items():
            cells = [
                pm(stats.mean(per_seed[key]), stats.stderr(per_seed[key]))
                if per_seed.get(key)
                else "-"
                for key in keys
            ]
            lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(s: Summary, md_path: str, json_path: str, header: Sequence[str] = ()) -> str:
    text = summary_markdown(s, header)
    for path, data in ((md_path, text), (json_path, json.dumps(_jsonable(s.__dict__), indent=1))):
        with open(path + ".tmp", "w") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return text


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _smooth(vals: Sequence[float], window: int = 5) -> list[float]:
    """Trailing `window`-step mean (the demo plot's smoothing)."""
    return [stats.mean(vals[max(0, i - window + 1) : i + 1]) for i in range(len(vals))]


def plot(runs: Sequence[RunRows], algorithms: Sequence[str], path: str, title: str) -> None:
    """One panel per metric (training mean reward, 5-step mean; the eval set's avg@k): per
    algorithm the mean over seeds and its t-based 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ekey = eval_key(runs)
    panels = [(REWARD, "mean training reward (5-step mean)", True)]
    if ekey:
        panels.append((ekey, f"fixed eval set: {ekey.rsplit('/', 1)[-1]}", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (key, label, smooth) in zip(axes[0], panels, strict=True):
        means: list[float] = []
        for algo in algorithms:
            curves = []
            for r in runs:
                if r.algorithm != algo:
                    continue
                pts = {row["step"]: row[key] for row in r.rows if key in row}
                steps = sorted(pts)
                vals = [pts[s] for s in steps]
                curves.append(dict(zip(steps, _smooth(vals) if smooth else vals, strict=True)))
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            cols = [[c[s] for c in curves] for s in steps]
            m = [stats.mean(v) for v in cols]
            h = [stats.ci95_halfwidth(v) for v in cols]
            means += m
            style = {} if smooth else {"marker": "o"}
            (line,) = ax.plot(
                steps, m, label=f"{algo.upper()} (n={len(curves)})", linewidth=2, **style
            )
            if len(curves) > 1:
                lo = [a - b for a, b in zip(m, h, strict=True)]
                hi = [a + b for a, b in zip(m, h, strict=True)]
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        if means and min(means) >= 0.0 and max(means) <= 1.0:
            # rewards and avg@k live in [0, 1]: a few seeds' t-bands may reach far beyond
            ax.set_ylim(max(0.0, min(means) - 0.1), min(1.0, max(means) + 0.1))
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}\nmean over seeds, shaded: 95% interval of the mean (t, n - 1 df)")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
