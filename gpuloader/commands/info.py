"""Summarize a dataset per split and per level, and optionally plot it.

Prints objects per split; unique sub-volumes, ray files, rays, occupancy and hit rate per
level; and cross-split leakage (non-trivial sub-volume hashes used by objects of two splits),
recounted from splits.json's hash_object_usage and trivial_hashes and compared with what its
statistics claim. Ray counts come from the .npy header of each ray file's 'origins' member
(nothing decompressed beyond the header); hit rates read only the 'hits' member.
"""

from __future__ import annotations

import argparse
import itertools
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpuloader.errors import DatasetLayoutError
from gpuloader.format import layout
from gpuloader.format.index import split_membership

__all__ = [
    "dataset_info",
    "format_info",
    "plot_info",
    "npy_member_shape",
    "add_arguments",
    "run",
]

SPLIT_ORDER: tuple[str, ...] = ("train", "val", "test")
_LEVEL_DIR = re.compile(r"^level_(\d+)$")


def npy_member_shape(zf: zipfile.ZipFile, member: str) -> tuple[int, ...]:
    """Shape of the array stored as ``member`` of an npz, from its .npy header only."""
    with zf.open(member) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _fortran, _dtype = np.lib.format.read_array_header_1_0(fp)
        else:  # 2.0 (and 3.0, whose header differs only in its text encoding)
            shape, _fortran, _dtype = np.lib.format.read_array_header_2_0(fp)
    return tuple(int(s) for s in shape)


def _read_member(zf: zipfile.ZipFile, member: str) -> np.ndarray:
    """One array of an npz, decompressing that member only."""
    with zf.open(member) as fp:
        return np.lib.format.read_array(fp, allow_pickle=False)


def _level_files(root: Path, pattern: str) -> dict[int, list[Path]]:
    """``level -> files`` matching ``root/level_<L>/<hh>/<pattern>``."""
    out: dict[int, list[Path]] = {}
    if not root.is_dir():
        return out
    for d in root.iterdir():
        m = _LEVEL_DIR.match(d.name)
        if m and d.is_dir():
            files = [p for p in d.glob(f"*/{pattern}") if not p.name.startswith(".")]
            out[int(m.group(1))] = sorted(files)
    return out


def _split_names(found: set[str]) -> list[str]:
    return [s for s in SPLIT_ORDER if s in found] + sorted(found - set(SPLIT_ORDER))


def _claimed_pairs(statistics: Any) -> dict[str, int] | None:
    """splits.json's per-pair leak counts, keyed ``"a-b"``; None when it states none."""
    if not isinstance(statistics, dict):
        return None
    pairs = statistics.get("leaked_hashes_per_split_pair")
    if not isinstance(pairs, dict):
        return None
    return {str(k): int(v) for k, v in pairs.items() if isinstance(v, int | float)}


def _leakage(splits: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Recount leaks from hash_object_usage + trivial_hashes; compare with the statistics."""
    usage = splits.get("hash_object_usage") or {}
    trivial = {str(h) for h in splits.get("trivial_hashes") or []}
    index = {s: i for i, s in enumerate(names)}
    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    leaked = 0
    non_trivial = 0
    for h, users in usage.items():
        if h in trivial or not isinstance(users, dict):
            continue
        non_trivial += 1
        used_by = sorted({str(s) for s in users.values() if str(s) in index}, key=index.get)
        for s in used_by:
            matrix[index[s], index[s]] += 1
        if len(used_by) > 1:
            leaked += 1
        for a, b in itertools.combinations(used_by, 2):
            matrix[index[a], index[b]] += 1
            matrix[index[b], index[a]] += 1
    pairs = {
        f"{a}-{b}": int(matrix[index[a], index[b]]) for a, b in itertools.combinations(names, 2)
    }
    statistics = splits.get("statistics")
    claimed = _claimed_pairs(statistics)
    claimed_total = statistics.get("leaked_hashes") if isinstance(statistics, dict) else None
    matches = None
    if claimed is not None or isinstance(claimed_total, int):
        matches = True
        if claimed is not None:
            for a, b in itertools.combinations(names, 2):
                said = claimed.get(f"{a}-{b}", claimed.get(f"{b}-{a}"))
                if said is not None and said != pairs[f"{a}-{b}"]:
                    matches = False
        if isinstance(claimed_total, int) and claimed_total != leaked:
            matches = False
    return {
        "pairs": pairs,
        "claimed_pairs": claimed,
        "leaked_hashes": leaked,
        "claimed_leaked_hashes": claimed_total if isinstance(claimed_total, int) else None,
        "matches": matches,
        "splits": names,
        "matrix": matrix.tolist(),
        "non_trivial_hashes": non_trivial,
        "trivial_hashes": len(trivial),
    }


def dataset_info(
    dataset_dir: str | Path, ray_dir: str | Path, progress: bool = False
) -> dict[str, Any]:
    """Per-split and per-level numbers of a dataset, JSON-ready.

    Keys: ``dataset_dir``, ``ray_dir``, ``num_objects``, ``objects_per_split``, ``levels`` (a
    list of dicts: level, side, sub_volumes (level 0: objects), ray_files, rays, hits,
    hit_rate, occupancy = mean occupied fraction over the level's voxel files), ``totals``,
    ``leakage`` (recounted per split pair, the matrix whose diagonal counts the non-trivial
    hashes each split uses, and what splits.json claims) and ``unreadable_files``.
    Raises DatasetLayoutError when splits.json or a root folder is missing.
    """
    ds, rays_root = Path(dataset_dir), Path(ray_dir)
    for root, arg in ((ds, "DATASET_DIR"), (rays_root, "RAY_DIR")):
        if not root.is_dir():
            raise DatasetLayoutError(f"{root} is not a folder; check the {arg} argument")
    splits_path = ds / "splits.json"
    if not splits_path.is_file():
        raise DatasetLayoutError(
            f"{splits_path} is missing; re-generate the dataset or run `gpuloader verify`"
        )
    splits = layout.read_json(splits_path)
    object_splits: dict[str, str] = {
        str(k): str(v) for k, v in (splits.get("object_splits") or {}).items()
    }
    objects_root = ds / "objects"
    objects = sorted(
        p.name[len("object_") :]
        for p in (objects_root.iterdir() if objects_root.is_dir() else [])
        if p.is_dir() and p.name.startswith("object_")
    )
    names = _split_names(set(object_splits.values()))
    per_split = {s: 0 for s in names}
    for oid in objects:
        s = object_splits.get(oid, "unassigned")
        per_split[s] = per_split.get(s, 0) + 1

    voxel_files = _level_files(ds / "subvolumes", "*.npz")
    voxel_files[0] = [layout.level0_voxel_path(ds, o) for o in objects]
    voxel_files[0] = [p for p in voxel_files[0] if p.is_file()]
    ray_files = _level_files(rays_root, "*_rays.npz")
    levels = sorted(set(voxel_files) | set(ray_files))
    unreadable: list[str] = []
    total = sum(len(voxel_files.get(lv, [])) + len(ray_files.get(lv, [])) for lv in levels)
    bar = tqdm(total=total, desc="info", unit="file", disable=not progress)
    rows = []
    # per (level, name): voxel occupancy, and (rays, hits) of the ray file, for the split table
    file_occupancy: dict[tuple[int, str], float] = {}
    file_rays: dict[tuple[int, str], tuple[int, int]] = {}
    for lv in levels:
        occupancy, side = [], None
        for p in voxel_files.get(lv, []):
            try:
                with np.load(p, allow_pickle=False) as f:
                    grid = f["voxels"]
                occupancy.append(float(np.count_nonzero(grid)) / max(grid.size, 1))
                file_occupancy[(lv, _sample_name(p, lv))] = occupancy[-1]
                side = side or int(grid.shape[0])
            except Exception:
                unreadable.append(str(p))
            bar.update()
        rays = hits = 0
        for p in ray_files.get(lv, []):
            try:
                with zipfile.ZipFile(p) as zf:
                    n = npy_member_shape(zf, "origins.npy")[0]
                    h = int(np.count_nonzero(_read_member(zf, "hits.npy")))
                rays, hits = rays + n, hits + h
                file_rays[(lv, _sample_name(p, lv))] = (n, h)
            except Exception:
                unreadable.append(str(p))
            bar.update()
        rows.append(
            {
                "level": lv,
                "side": side,
                "sub_volumes": len(voxel_files.get(lv, [])),
                "ray_files": len(ray_files.get(lv, [])),
                "rays": rays,
                "hits": hits,
                "hit_rate": hits / rays if rays else None,
                "occupancy": float(np.mean(occupancy)) if occupancy else None,
            }
        )
    bar.close()
    rays_total = sum(r["rays"] for r in rows)
    hits_total = sum(r["hits"] for r in rows)
    return {
        "dataset_dir": str(ds),
        "ray_dir": str(rays_root),
        "num_objects": len(objects),
        "objects_per_split": per_split,
        "levels": rows,
        "totals": {
            "sub_volumes": sum(r["sub_volumes"] for r in rows),
            "ray_files": sum(r["ray_files"] for r in rows),
            "rays": rays_total,
            "hits": hits_total,
            "hit_rate": hits_total / rays_total if rays_total else None,
        },
        "per_split": _per_split_rows(
            splits, object_splits, per_split, levels, file_occupancy, file_rays
        ),
        "leakage": _leakage(splits, names),
        "unreadable_files": sorted(unreadable),
    }


def _sample_name(path: Path, level: int) -> str:
    """The sample a file belongs to: the object ID at level 0, else the sub-volume hash."""
    if path.name.endswith("_rays.npz"):
        return path.name[: -len("_rays.npz")]
    if level == 0:  # objects/object_<ID>/level_0.npz
        return path.parent.name[len("object_") :]
    return path.stem


def _per_split_rows(
    splits: dict[str, Any],
    object_splits: dict[str, str],
    objects_per_split: dict[str, int],
    levels: list[int],
    file_occupancy: dict[tuple[int, str], float],
    file_rays: dict[tuple[int, str], tuple[int, int]],
) -> list[dict[str, Any]]:
    """One row per split and level, then the split's ``level="all"`` row.

    A sample counts in every split it belongs to (as the dataset decides it: the splits of
    the objects that use it; a trivial sub-volume is in every split), so the splits' rows can
    add up to more than the per-level totals. Samples no split claims go to "unassigned".
    """
    usage = splits.get("hash_object_usage") or {}
    trivial = {str(h) for h in splits.get("trivial_hashes") or []}
    members: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for key in sorted(set(file_occupancy) | set(file_rays)):
        level, name = key
        owners = split_membership(name, level, object_splits, usage, trivial) or {"unassigned"}
        for s in owners:
            members.setdefault((s, level), []).append(key)
    names = _split_names({s for s, _ in members} | set(objects_per_split))
    rows: list[dict[str, Any]] = []
    for s in names:
        total = {"sub_volumes": 0, "ray_files": 0, "rays": 0, "hits": 0, "occ": []}
        for level in levels:
            keys = members.get((s, level), [])
            occ = [file_occupancy[k] for k in keys if k in file_occupancy]
            counts = [file_rays[k] for k in keys if k in file_rays]
            row = {
                "split": s,
                "level": level,
                "sub_volumes": len(occ),
                "ray_files": len(counts),
                "rays": sum(n for n, _ in counts),
                "hits": sum(h for _, h in counts),
                "occupancy": float(np.mean(occ)) if occ else None,
            }
            row["hit_rate"] = row["hits"] / row["rays"] if row["rays"] else None
            if level == 0:
                row["objects"] = objects_per_split.get(s, 0)
            rows.append(row)
            for k in ("sub_volumes", "ray_files", "rays", "hits"):
                total[k] += row[k]
            total["occ"] += occ
        rows.append(
            {
                "split": s,
                "level": "all",
                "objects": objects_per_split.get(s, 0),
                "sub_volumes": total["sub_volumes"],
                "ray_files": total["ray_files"],
                "rays": total["rays"],
                "hits": total["hits"],
                "hit_rate": total["hits"] / total["rays"] if total["rays"] else None,
                "occupancy": None,
            }
        )
    return rows


# ------------------------------------------------------------------ text


def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Aligned plain-text columns: the first ``left`` columns left-aligned, others right."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        out = [
            str(c).ljust(w) if i < left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _num(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _frac(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_info(info: dict[str, Any]) -> str:
    """The printed summary of :func:`dataset_info`'s dict."""
    out = [f"dataset  {info['dataset_dir']}", f"rays     {info['ray_dir']}", ""]
    split_rows = []
    for r in info.get("per_split", []):
        split_rows.append(
            [
                r["split"],
                str(r["level"]),
                _num(r.get("objects")),
                _num(r["sub_volumes"]),
                _num(r["ray_files"]),
                _num(r["rays"]),
                _frac(r["hit_rate"]),
                _frac(r["occupancy"]),
            ]
        )
    split_rows.append(["total", "all", _num(info["num_objects"]), "", "", "", "", ""])
    headers = ["split", "level", "objects", "sub-volumes", "ray files", "rays", "hit rate"]
    out += _table([*headers, "occupancy"], split_rows, left=2)
    out.append(
        "(a sub-volume counts in every split whose objects use it, a trivial one in all; "
        "objects: level 0)"
    )
    out.append("")
    level_rows = []
    for r in info["levels"]:
        level_rows.append(
            [
                str(r["level"]),
                "-" if r["side"] is None else f"{r['side']}^3",
                _num(r["sub_volumes"]),
                _num(r["ray_files"]),
                _num(r["rays"]),
                _num(r["hits"]),
                _frac(r["hit_rate"]),
                _frac(r["occupancy"]),
            ]
        )
    t = info["totals"]
    level_rows.append(
        [
            "all",
            "",
            _num(t["sub_volumes"]),
            _num(t["ray_files"]),
            _num(t["rays"]),
            _num(t["hits"]),
            _frac(t["hit_rate"]),
            "",
        ]
    )
    headers = ["level", "grid", "sub-volumes", "ray files", "rays", "hits", "hit rate", "occupancy"]
    out += _table(headers, level_rows)
    out.append("(level 0: one sub-volume per object; occupancy: mean over the level's voxel files)")
    out.append("")
    leak = info["leakage"]
    claimed = leak["claimed_pairs"]
    leak_rows = []
    for pair, n in leak["pairs"].items():
        said = None
        if claimed is not None:
            a, b = pair.split("-", 1)
            said = claimed.get(pair, claimed.get(f"{b}-{a}"))
        leak_rows.append([pair, _num(n), _num(said)])
    leak_rows.append(["any", _num(leak["leaked_hashes"]), _num(leak["claimed_leaked_hashes"])])
    out += _table(["leakage", "recounted", "splits.json says"], leak_rows)
    out.append(
        f"(non-trivial hashes used by objects of both splits; {leak['non_trivial_hashes']:,} "
        f"non-trivial and {leak['trivial_hashes']:,} trivial hashes)"
    )
    if leak["matches"] is False:
        out.append("WARNING: splits.json statistics disagree with the recount")
    elif leak["matches"] is None:
        out.append("(splits.json states no leak statistics)")
    if info["unreadable_files"]:
        out.append("")
        out.append(
            f"WARNING: {len(info['unreadable_files'])} file(s) could not be read and are left "
            "out; run `gpuloader verify` for details:"
        )
        out += [f"  {p}" for p in info["unreadable_files"][:10]]
    return "\n".join(out)


# ------------------------------------------------------------------ plot


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
    ax1.set_ylabel("objects")
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
    ax3.set_ylabel("fraction")
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
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)


# ------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gpuloader info``."""
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="voxel side (dataset/)")
    parser.add_argument("ray_dir", metavar="RAY_DIR", help="ray side (ray_dataset_hierarchical/)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the summary as a PNG")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``gpuloader info``; 0 on success."""
    info = dataset_info(args.dataset_dir, args.ray_dir, progress=args.progress)
    print(format_info(info))
    if args.json:
        out = Path(args.json)
        layout.atomic_write_json(out, info)
        print(f"wrote {out}")
    if args.plot:
        print(f"wrote {plot_info(info, args.plot)}")
    return 0
