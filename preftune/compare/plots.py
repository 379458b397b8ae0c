"""The grid's two trade-off plots: held-out success against KL to π_0, and against answer length, one colour
per objective (one point per task and seed), error bars from the Wilson intervals, π_0 as a black star."""

from __future__ import annotations

import math
from pathlib import Path

from preftune.compare.table import BASE

PLOTS = {"success_vs_kl.png": ("kl", "KL to π_0 (nats per answer)"),
         "success_vs_length.png": ("len_words", "mean answer length (words)")}


def _ok(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def write_plots(rows: list[dict], root: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never open a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != BASE))
    colours = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    written = []
    for name, (key, xlabel) in PLOTS.items():
        fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.5 * max(1, len(tasks)) + 2.2, 4.2), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=False):
            for i, variant in enumerate([BASE, *variants]):
                pts = [r for r in rows if r["task"] == task and r["variant"] == variant
                       and _ok(r.get(key), r.get("success"), r.get("success_low"), r.get("success_high"))]
                if not pts:
                    continue
                x = [r[key] for r in pts]
                y = [100 * r["success"] for r in pts]
                err = [[100 * (r["success"] - r["success_low"]) for r in pts],
                       [100 * (r["success_high"] - r["success"]) for r in pts]]
                style = dict(fmt="*", color="black", markersize=11) if variant == BASE else \
                    dict(fmt="o", color=colours(i - 1), markersize=6)
                ax.errorbar(x, y, yerr=err, capsize=3, label="π_0 (base)" if variant == BASE else variant,
                            alpha=0.9, **style)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out success % (95% Wilson CI)")
            ax.set_title(task)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6))  # tiny KLs (a few 1e-3) otherwise crowd the axis
            ax.grid(alpha=0.3)
        # outside the axes: with several objectives a legend inside covers points
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        path = root / name
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written
