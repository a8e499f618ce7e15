"""PNG plots and console tables of `rlrt analyze` (matplotlib with the Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from rlrt_megatron.eval.analyze import POSITION_KINDS, token_text  # noqa: E402

DPI = 130
C_CORRECT, C_WRONG = "#1b9e77", "#d95f02"
C_EXPLORE, C_EXPLOIT = "#7570b3", "#e7298a"


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _short(s: str, n: int = 14) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _pick_traces(rollouts: Sequence[Any], n: int) -> list[Any]:
    """Rollouts to draw: correct ones first, then by the spread of their Delta."""
    with_d = [r for r in rollouts if r.delta is not None and len(r.response_ids) > 1]

    def spread(r: Any) -> float:
        return float(r.delta.max() - r.delta.min())

    return sorted(with_d, key=lambda r: (not r.correct, -spread(r)))[:n]


def plot_delta_traces(rollouts: Sequence[Any], tokenizer: Any, path: Path, n: int = 3) -> Path:
    """Delta_t along up to `n` rollouts, with the max-Delta and min-Delta tokens marked."""
    picked = _pick_traces(rollouts, n)
    fig, axes = plt.subplots(max(1, len(picked)), 1, figsize=(10, 2.8 * max(1, len(picked))))
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    if not picked:
        axes[0].text(0.5, 0.5, "no rollout with a teacher context", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, r in zip(axes, picked, strict=False):
        d = r.delta.tolist()
        x = list(range(len(d)))
        ax.plot(x, d, color="#444444", lw=1.2, marker=".", ms=3, label="Δ_t")
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        for fn, color, name in ((max, C_EXPLOIT, "max Δ"), (min, C_EXPLORE, "min Δ")):
            t = d.index(fn(d))
            tok = token_text(tokenizer, r.response_ids[t])
            ax.scatter([t], [d[t]], color=color, s=60, zorder=3, label=f"{name}: '{_short(tok)}'")
        status = "correct" if r.correct else "incorrect"
        ax.set_title(f"{r.key} ({status}, {r.teacher_source} teacher)", fontsize=10)
        ax.set_ylabel("Δ (nats)")
        ax.legend(loc="best", fontsize=8, framealpha=0.85)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("response token position")
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle("Per-token Δ = log π_T − log π_S along rollouts", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def plot_delta_hist(rollouts: Sequence[Any], path: Path) -> Path:
    """Histogram of Delta on correct vs incorrect rollouts (density, log y)."""
    groups = {True: [], False: []}
    for r in rollouts:
        if r.delta is not None:
            groups[r.correct].extend(r.delta.tolist())
    fig, ax = plt.subplots(figsize=(8, 4.5))
    vals = groups[True] + groups[False]
    if vals:
        lo, hi = min(vals), max(vals)
        bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
        for ok, color, name in ((True, C_CORRECT, "correct"), (False, C_WRONG, "incorrect")):
            if groups[ok]:
                mean = sum(groups[ok]) / len(groups[ok])
                ax.hist(
                    groups[ok],
                    bins=bins,
                    density=True,
                    alpha=0.55,
                    color=color,
                    label=f"{name} rollouts ({len(groups[ok])} tokens, mean {mean:+.3f})",
                )
        ax.set_yscale("log")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("Δ = log π_T − log π_S (nats)   (Δ < 0: explore, w = π_S/π_T > 1)")
    ax.set_ylabel("density (log scale)")
    ax.set_title("Teacher − student log-prob of the sampled tokens")
    if vals:
        ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_explore_exploit(delta: dict[str, Any], path: Path) -> Path:
    """Top explore (most negative mean Delta) and exploit (most positive) token types."""
    n = max(8, len(delta["explore"]), len(delta["exploit"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * n + 1.8))
    panels = (
        ("explore", C_EXPLORE, "Explore: most negative mean Δ (w = π_S/π_T > 1)"),
        ("exploit", C_EXPLOIT, "Exploit: most positive mean Δ (teacher surer)"),
    )
    for ax, (key, color, title) in zip(axes, panels, strict=True):
        rows = delta[key][::-1]  # the top entry drawn at the top
        if not rows:
            ax.text(0.5, 0.5, "no tokens with a teacher", ha="center", va="center")
            ax.set_axis_off()
            continue
        labels = [f"'{_short(r['token'], 16)}' ×{r['count']}" for r in rows]
        vals = [r["mean_delta"] for r in rows]
        bars = ax.barh(range(len(rows)), vals, color=color, alpha=0.8)
        ax.set_yticks(range(len(rows)), labels, fontsize=9)
        span = max(abs(v) for v in vals) or 1.0
        ax.set_xlim(min(0.0, min(vals)) - 0.25 * span, max(0.0, max(vals)) + 0.25 * span)
        for b, r in zip(bars, rows, strict=True):
            v = r["mean_delta"]
            ax.annotate(
                f"w≈{r['geo_mean_w']:.3g}",
                (v, b.get_y() + b.get_height() / 2),
                ha="left" if v >= 0 else "right",
                va="center",
                fontsize=8,
                xytext=(3 if v >= 0 else -3, 0),
                textcoords="offset points",
            )
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("mean Δ = log π_T − log π_S over the token's occurrences (nats)")
        ax.set_title(title, fontsize=11)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"Explore / exploit tokens on {delta['scope']} rollouts ({delta['n_tokens']} tokens; "
        "w≈exp(−mean Δ))",
        fontsize=12,
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_reflection(refl: dict[str, Any], path: Path) -> Path:
    """flipR / flipW (%) per insertion position, with the group sizes."""
    names = {
        "max_delta": "max-Δ position",
        "random": "random position",
        "min_delta": "min-Δ position",
    }
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.38
    for i, (metric, n_key, color, label) in enumerate(
        (
            ("flipR", "n_right", C_WRONG, "flipR: right → wrong"),
            ("flipW", "n_wrong", C_CORRECT, "flipW: wrong → right"),
        )
    ):
        xs = [j + (i - 0.5) * width for j in range(len(POSITION_KINDS))]
        vals = [refl[k][metric] for k in POSITION_KINDS]
        heights = [0.0 if math.isnan(v) else 100 * v for v in vals]
        bars = ax.bar(xs, heights, width, color=color, alpha=0.85, label=label)
        for b, v, k in zip(bars, vals, POSITION_KINDS, strict=True):
            n = int(refl[k][n_key])
            txt = "n/a (n=0)" if math.isnan(v) else f"{100 * v:.0f}% (n={n})"
            ax.annotate(
                txt,
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(range(len(POSITION_KINDS)), [names[k] for k in POSITION_KINDS])
    ax.set_ylim(0, 128)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("flip rate (%)")
    ax.set_xlabel(f"where '{refl['phrase']}' is inserted")
    ax.set_title("Reflection injection: answers flipped by the inserted phrase")
    ax.legend(fontsize=9, loc="upper center", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_jsd(jsd: dict[str, Any], path: Path) -> Path:
    """Per-token JSD(policy, base): histogram (log x), mean vs relative position, top-k
    overlap."""
    per = jsd["_per_token"].clamp(min=1e-7)
    rel = jsd["_relpos"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    lo = math.log10(float(per.min()))
    hi = math.log10(max(float(per.max()), 10 ** (lo + 1e-3)))
    bins = [10 ** (lo + (hi - lo) * i / 40) for i in range(41)]
    ax = axes[0]
    ax.hist(per.tolist(), bins=bins, color="#386cb0", alpha=0.8)
    ax.set_xscale("log")
    for i, (t, f) in enumerate(jsd["frac_above"].items()):
        ax.axvline(
            float(t),
            color=plt.cm.autumn(i / max(1, len(jsd["frac_above"]))),
            ls="--",
            lw=1,
            label=f"JSD > {t}: {100 * f:.1f}% of tokens",
        )
    ax.set_xlabel("JSD(policy ‖ base) per token (nats, log scale)")
    ax.set_ylabel("tokens")
    ax.set_title(f"Per-token JSD ({jsd['n_tokens']} tokens, mean {jsd['mean_jsd']:.3g})")
    ax.legend(fontsize=8, loc="best")
    ax = axes[1]
    n_bins = 10
    idx = (rel * n_bins).long().clamp(max=n_bins - 1)
    means = [
        float(per[idx == b].mean()) if bool((idx == b).any()) else math.nan for b in range(n_bins)
    ]
    ax.plot([(b + 0.5) / n_bins for b in range(n_bins)], means, marker="o", color="#386cb0")
    ax.set_xlabel("relative position in the response (0 = start, 1 = end)")
    ax.set_ylim(bottom=0.0)
    ax.set_ylabel("mean JSD (nats)")
    ax.set_title("JSD along the response")
    ax.grid(alpha=0.3)
    ax = axes[2]
    ks = list(jsd["topk_overlap"])
    vals = [100 * jsd["topk_overlap"][k] for k in ks]
    bars = ax.bar([f"top-{k}" for k in ks], vals, color="#7fc97f")
    for b, v in zip(bars, vals, strict=True):
        ax.annotate(
            f"{v:.1f}%",
            (b.get_x() + b.get_width() / 2, v),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_ylim(0, 110)
    ax.set_ylabel("mean overlap |top-k(policy) ∩ top-k(base)| / k (%)")
    ax.set_title("Top-k agreement with the base")
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Trained policy vs base model along the policy's rollouts", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def print_summary(console: Any, data: dict[str, Any], top: int = 10) -> None:
    """Rich tables: Delta stats and tokens, reflection flips, JSD."""
    from rich.table import Table

    if "delta" in data:
        d = data["delta"]
        st = d["stats"]
        console.print(
            f"Δ: {int(st.get('rollouts_with_teacher', 0))} rollouts with a teacher "
            f"({int(st.get('rollouts_peer_teacher', 0))} peer); mean Δ correct "
            f"{st.get('delta_mean_correct', float('nan')):+.3f}, incorrect "
            f"{st.get('delta_mean_incorrect', float('nan')):+.3f} (delta/gap "
            f"{st.get('delta/gap', float('nan')):+.3f})"
        )
        for key in sorted(k for k in st if k.startswith("eval/teacher/")):
            console.print(f"{key}: {st[key]:.3f}")
        t = Table(title=f"explore / exploit tokens ({d['scope']} rollouts)")
        for c in ("explore", "mean Δ", "n", "exploit", "mean Δ ", "n "):
            t.add_column(c, justify="right" if c.strip() in ("mean Δ", "n") else "left")
        for i in range(min(top, max(len(d["explore"]), len(d["exploit"])))):
            cells = []
            for key in ("explore", "exploit"):
                if i < len(d[key]):
                    r = d[key][i]
                    cells += [f"'{r['token']}'", f"{r['mean_delta']:+.3f}", str(r["count"])]
                else:
                    cells += ["", "", ""]
            t.add_row(*cells)
        console.print(t)
    if "reflection" in data:
        r = data["reflection"]
        t = Table(title=f"reflection injection: '{r['phrase']}'")
        for c in ("position", "flipR", "n right", "flipW", "n wrong"):
            t.add_column(c, justify="right")
        for k in ("max_delta", "random", "min_delta"):
            row = r[k]

            def pct(v: Any) -> str:
                return "n/a" if v is None else f"{100 * v:.1f}%"

            t.add_row(
                k,
                pct(row["flipR"]),
                f"{int(row['n_right'])}",
                pct(row["flipW"]),
                f"{int(row['n_wrong'])}",
            )
        console.print(t)
    if "jsd" in data and data["jsd"].get("n_tokens"):
        j = data["jsd"]
        above = ", ".join(f"> {t}: {100 * f:.1f}%" for t, f in j["frac_above"].items())
        ov = ", ".join(f"top-{k}: {100 * v:.1f}%" for k, v in j["topk_overlap"].items())
        console.print(
            f"JSD(policy ‖ base) over {j['n_tokens']} tokens: mean {j['mean_jsd']:.4g}, "
            f"median {j['median_jsd']:.4g}; tokens {above}; top-k overlap {ov}"
        )
