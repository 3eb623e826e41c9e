"""The text report of ``gpuloader info``: aligned tables of :func:`dataset_info`'s dict.

Three tables (per split and level, per level, leakage per split pair), each followed by a
line in parentheses saying what it counts, and warnings when splits.json's statistics disagree
with the recount or files could not be read.
"""

from __future__ import annotations

from typing import Any

__all__ = ["format_info"]


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
    """An integer with thousands separators; ``-`` for None."""
    return "-" if v is None else f"{v:,}"


def _frac(v: float | None, digits: int = 4) -> str:
    """A fraction with ``digits`` decimals; ``-`` for None."""
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
    problems = info.get("problems") or [
        {"file": p, "error": "could not be read"} for p in info["unreadable_files"]
    ]
    if problems:
        out.append("")
        out.append(
            f"WARNING: {len(problems)} file(s) or folder(s) could not be read, are missing or "
            "lie outside the roots, and are left out; run `gpuloader verify` for details:"
        )
        out += [f"  {p['file']}: {p['error']}" for p in problems[:10]]
        if len(problems) > 10:
            out.append(f"  ... and {len(problems) - 10} more")
    return "\n".join(out)
