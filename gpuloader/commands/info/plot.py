"""The plot of ``gpuloader info``: a 4-panel PNG of :func:`dataset_info`'s dict.

Panels: objects per split; sub-volumes and rays per level (log scale); mean occupancy and ray
hit rate per level; the leakage matrix of the splits. Drawn with matplotlib's Agg canvas, so
no display is needed; matplotlib is imported only when a plot is asked for.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_info"]


def plot_info(info: dict[str, Any], path: str | Path) -> Path:
    """Write a 4-panel PNG of :func:`dataset_info`'s dict (Agg, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9.5), layout="constrained")
    FigureCanvasAgg(fig)
    (ax1, ax2), (ax3, ax4) = fig.subplots(2, 2)
    fig.suptitle(
        f"{Path(info['dataset_dir']).resolve().parent.name or info['dataset_dir']}: "
        f"{info['num_objects']} objects, {info['totals']['rays']:,} rays",
        fontsize=14,
    )

    # 1. objects per split
    splits = list(info["objects_per_split"].items())
    colors = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
    bars = ax1.bar(
        [s for s, _ in splits],
        [n for _, n in splits],
        color=[colors.get(s, "tab:gray") for s, _ in splits],
    )
    ax1.bar_label(bars, padding=2)
    ax1.set_title("objects per split")
    ax1.set_ylabel("objects (count)")
    ax1.set_xlabel("split")
    ax1.margins(y=0.15)

    # 2. sub-volumes and rays per level (log scale)
    levels = info["levels"]
    x = np.arange(len(levels))
    labels = [f"L{r['level']}" + (f"\n{r['side']}³" if r["side"] else "") for r in levels]
    w = 0.38
    b1 = ax2.bar(x - w / 2, [max(r["sub_volumes"], 0) for r in levels], w, label="sub-volumes")
    b2 = ax2.bar(x + w / 2, [max(r["rays"], 0) for r in levels], w, label="rays")
    ax2.set_yscale("log")
    ax2.bar_label(b1, labels=[f"{r['sub_volumes']:,}" for r in levels], padding=2, fontsize=8)
    ax2.bar_label(b2, labels=[_short(r["rays"]) for r in levels], padding=2, fontsize=8)
    ax2.set_xticks(x, labels)
    ax2.set_ylabel("count (log scale)")
    ax2.set_xlabel("octree level (sub-volume side, voxels)")
    ax2.set_title("unique sub-volumes and rays per level (log)")
    ax2.legend(loc="upper left")
    ax2.margins(y=0.2)

    # 3. occupancy and hit rate per level
    occ = [r["occupancy"] or 0.0 for r in levels]
    hit = [r["hit_rate"] or 0.0 for r in levels]
    b3 = ax3.bar(x - w / 2, occ, w, label="occupancy", color="tab:purple")
    b4 = ax3.bar(x + w / 2, hit, w, label="hit rate", color="tab:red")
    ax3.bar_label(b3, labels=[f"{v:.2f}" for v in occ], padding=2, fontsize=8)
    ax3.bar_label(b4, labels=[f"{v:.2f}" for v in hit], padding=2, fontsize=8)
    ax3.set_xticks(x, labels)
    ax3.set_ylim(0, min(1.05, max([*occ, *hit, 0.05]) * 1.3))
    ax3.set_ylabel("fraction (0-1)")
    ax3.set_xlabel("octree level (sub-volume side, voxels)")
    ax3.set_title("mean occupancy and ray hit rate per level")
    ax3.legend(loc="upper left")

    # 4. leakage matrix
    leak = info["leakage"]
    names = leak["splits"]
    m = np.asarray(leak["matrix"], dtype=float).reshape(len(names), len(names))
    off = m.copy()
    np.fill_diagonal(off, 0)
    im = ax4.imshow(off, cmap="Reds", vmin=0, vmax=max(1.0, off.max()))
    for i, j in itertools.product(range(len(names)), repeat=2):
        v = int(m[i, j])
        text = f"{v:,}\nused" if i == j else f"{v:,}"
        dark = i != j and off.max() > 0 and v > 0.6 * off.max()
        ax4.text(
            j,
            i,
            text,
            ha="center",
            va="center",
            fontsize=11,
            color="white" if dark else ("gray" if i == j else "black"),
        )
    ax4.set_xticks(range(len(names)), names)
    ax4.set_yticks(range(len(names)), names)
    ax4.set_xlabel("split")
    ax4.set_ylabel("split")
    title = "leaked non-trivial sub-volumes per split pair\n(diagonal: how many each split uses)"
    if leak["matches"] is False:
        title += "\n(splits.json statistics disagree!)"
    ax4.set_title(title)
    fig.colorbar(im, ax=ax4, shrink=0.8, label="shared hashes")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _short(n: int) -> str:
    """A count in three significant digits with a k/M/G suffix (``12.3k``)."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)
