"""Draw docs/staleness_timeline.png: who waits for whom in each rollout mode (README figure).

    python tools/staleness_timeline.py [--out docs/staleness_timeline.png]

A schematic, not a measurement: the trainer's steps and the engine's work under
`rollout.max_staleness=0` (sync), `=1` and partial rollouts with K=2, with a heavy-tailed batch
(one long rollout per batch). Boxes are labelled with the batch they make or train and the
weights version they use; hatched = waiting.
"""

from __future__ import annotations

import argparse

TRAIN, GEN = 1.0, 1.6  # seconds of a training step / a full generation with its long tail


def _lanes(ax, y: float, spans: list[tuple[float, float, str, str]]) -> None:
    for x0, w, label, kind in spans:
        style = {
            "train": dict(color="tab:blue", alpha=0.75),
            "gen": dict(color="tab:orange", alpha=0.75),
            "tail": dict(color="tab:orange", alpha=0.35),
            "wait": dict(facecolor="white", edgecolor="grey", hatch="///"),
            "push": dict(color="tab:green", alpha=0.9),
        }[kind]
        ax.broken_barh([(x0, w)], (y, 0.8), **style)
        if label:
            ax.text(x0 + w / 2, y + 0.4, label, ha="center", va="center", fontsize=7)


def _lanes_of(ax, depth: int, gen: float, label: str, steps: int, push: float) -> None:
    """Simulate the queue: batches 1..depth+1 with v0, then per step k the push of v_k (after
    step k trains) and batch k+depth+1; step k trains when batch k is sampled."""
    eng, trn = [], []
    t_eng, gen_end, train_end = 0.0, {}, {0: 0.0}
    for b in range(1, depth + 2):
        eng.append((t_eng, gen, f"{label} b{b} (v0)" if gen > 1 else f"b{b}", "gen"))
        t_eng += gen
        gen_end[b] = t_eng
    for k in range(1, steps + 1):
        start = max(train_end[k - 1], gen_end[k])
        if start > train_end[k - 1]:
            trn.append((train_end[k - 1], start - train_end[k - 1], "wait", "wait"))
        trn.append((start, TRAIN, f"train b{k}", "train"))
        train_end[k] = start + TRAIN
        if train_end[k] > t_eng:
            eng.append((t_eng, train_end[k] - t_eng, "idle" if gen > 1 else "", "wait"))
            t_eng = train_end[k]
        eng.append((t_eng, push, "", "push"))
        t_eng += push
        b = k + depth + 1
        eng.append((t_eng, gen, f"{label} b{b} (v{k})" if gen > 1 else f"b{b}", "gen"))
        t_eng += gen
        gen_end[b] = t_eng
    _lanes(ax, 1, trn)
    _lanes(ax, 0, eng)


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/staleness_timeline.png")
    args = p.parse_args(argv)
    fig, axes = plt.subplots(3, 1, figsize=(8.5, 4.8), sharex=True)
    push = 0.08
    # sync: generate (long tail included) then train, one after the other
    ax, t, eng, trn = axes[0], 0.0, [], []
    for k in range(1, 4):
        eng += [(t, GEN * 0.35, f"gen b{k} (v{k - 1})", "gen"), (t + GEN * 0.35, GEN * 0.65,
                "long tail", "tail")]  # fmt: skip
        trn += [(t, GEN, "wait", "wait"), (t + GEN, TRAIN, f"train b{k}", "train")]
        eng += [(t + GEN, TRAIN, "idle", "wait"), (t + GEN + TRAIN, push, "", "push")]
        t += GEN + TRAIN + push
    _lanes(ax, 1, trn)
    _lanes(ax, 0, eng)
    ax.set_title("max_staleness=0 (sync): on-policy; trainer waits for the longest rollout",
                 fontsize=9, loc="left")  # fmt: skip
    # K=1 and partial: the engine works through one queue (generations, then the push of v_k
    # once step k has trained); step k trains once batch k is there
    _lanes_of(axes[1], depth=1, gen=GEN, label="gen", steps=3, push=push)
    axes[1].set_title("max_staleness=1: batch k sampled with v(k-2), trained by v(k-1): one "
                      "version behind", fontsize=9, loc="left")  # fmt: skip
    # partial: a round stops once enough groups have finished (no waiting for the long tail);
    # unfinished rollouts continue in the next round under the new weights
    _lanes_of(axes[2], depth=1, gen=GEN * 0.4, label="round", steps=4, push=push)
    axes[2].set_title("partial, max_staleness=2: first groups to finish make the batch; a resumed "
                      "rollout mixes v(k-3) and v(k-2) tokens", fontsize=9, loc="left")  # fmt: skip
    for ax in axes:
        ax.set_yticks([0.4, 1.4], ["engine", "trainer"])
        ax.set_ylim(-0.1, 1.9)
    axes[-1].set_xlabel("time (schematic)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
