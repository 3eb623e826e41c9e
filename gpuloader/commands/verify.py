"""Check a dataset's layout and re-trace a sample of its rays.

Reads both roots of the on-disk format (dataset/ and ray_dataset_hierarchical/) and reports
every problem it finds, each naming its file: missing or unreadable files; wrong keys, shapes,
dtypes or values in voxel and ray files; sub-volume hashes that do not match their contents;
ray files without a voxel file and non-empty sub-volumes without a ray file; splits.json
bookkeeping that disagrees with the subdivision maps; JSON files (metadata, splits, registry,
processing summary, object metadata) that lack keys upstream's generator writes; and stored
ray distances that the exact tracer does not reproduce, on a random fraction of the rays of
every ray file. It never stops at the first bad file. Exit status: 0 when clean, 1 when any
problem was found.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import multiprocessing as mp
import re
import sys
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpuloader.errors import (
    EmptyRayFileError,
    FileCheckError,
    InvalidValueError,
    MissingKeyError,
    UnreadableFileError,
)
from gpuloader.format import layout, validate
from gpuloader.tracer import trace

__all__ = ["Problem", "VerifyReport", "verify_dataset", "add_arguments", "run", "KINDS"]

#: Trace tolerance: files store float32 distances.
ABS_TOL = 1e-3
REL_TOL = 1e-5
#: Allowed deviation of |direction| from 1 (the readers' tolerance, one for all).
UNIT_TOL = validate.UNIT_TOL
#: Keys of one subdivision_map.json record.
MAP_KEYS: tuple[str, ...] = layout.SUBDIVISION_RECORD_KEYS
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")

# Problem kinds, in report order.
MISSING = "missing file"
UNREADABLE = "unreadable file"
MISPLACED = "misplaced file"
FORMAT = "wrong keys, shapes or dtypes"
VALUES = "invalid values"
HASH = "hash mismatch"
PAIRING = "ray/voxel pairing"
MAP = "subdivision map"
SPLITS = "splits.json"
TRACE = "trace mismatch"
INTERNAL = "verifier error"
KINDS: tuple[str, ...] = (
    MISSING,
    UNREADABLE,
    MISPLACED,
    FORMAT,
    VALUES,
    HASH,
    PAIRING,
    MAP,
    SPLITS,
    TRACE,
    INTERNAL,
)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LEVEL_DIR = re.compile(r"^level_(\d+)$")


@dataclass(frozen=True)
class Problem:
    """One finding: the file it is about, what is wrong (and the fix), and its kind."""

    file: str
    message: str
    kind: str = VALUES


@dataclass
class VerifyReport:
    """What :func:`verify_dataset` found.

    ``problems`` make the dataset fail; ``warnings`` (unreferenced files, empty ray files)
    do not. ``counts`` holds objects, subdivision records, voxel files, ray files, rays ...
    """

    dataset_dir: str
    ray_dir: str
    fraction: float = 0.01
    seed: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    rays_checked: int = 0
    max_trace_error: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def by_kind(self) -> dict[str, list[Problem]]:
        """Problems grouped by kind, kinds in report order."""
        groups: dict[str, list[Problem]] = defaultdict(list)
        for p in self.problems:
            groups[p.kind].append(p)
        order = {k: i for i, k in enumerate(KINDS)}
        return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))

    def format(self, max_per_kind: int = 20, summary: bool = True) -> str:
        """The printed report; ``max_per_kind=0`` lists every problem."""
        lines: list[str] = []
        if summary:
            lines.append(f"dataset  {self.dataset_dir}")
            lines.append(f"rays     {self.ray_dir}")
            rows = [(name.replace("_", " "), f"{n:,}") for name, n in self.counts.items()]
            rows.append(("rays re-traced", f"{self.rays_checked:,}"))
            width = max(len(r[0]) for r in rows)
            nwidth = max(len(r[1]) for r in rows)
            lines += [f"  {a:<{width}}  {b:>{nwidth}}" for a, b in rows]
            lines.append(
                f"  (fraction {self.fraction:g}, seed {self.seed}, "
                f"max |trace error| {self.max_trace_error:.3g})"
            )
        for title, items in (("warnings", self.warnings), ("problems", self.problems)):
            if not items:
                continue
            groups = self.by_kind() if items is self.problems else {"warning": items}
            lines.append(f"{title}: {len(items)}")
            for kind, probs in groups.items():
                lines.append(f"  [{kind}] {len(probs)}")
                shown = probs if max_per_kind <= 0 else probs[:max_per_kind]
                lines += [f"    {p.file}: {p.message}" for p in shown]
                if len(shown) < len(probs):
                    lines.append(
                        f"    ... and {len(probs) - len(shown)} more (--max-per-kind 0 lists all)"
                    )
        verdict = "OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)"
        lines.append(verdict)
        return "\n".join(lines)


# ------------------------------------------------------------------ per-unit results


@dataclass
class _Result:
    """What one unit of work (an object folder or a sample's files) reports back."""

    weight: int = 1
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    rays_checked: int = 0
    max_err: float = 0.0
    payload: dict[str, Any] = field(default_factory=dict)

    def add(self, file: Path | str, message: str, kind: str) -> None:
        self.problems.append(Problem(str(file), message, kind))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or "no detail"
    return f"{type(exc).__name__}: {text}"


def _npz_problem(exc: BaseException) -> str:
    """What to say about an npz that numpy cannot open, as the dataset and ``pack`` say it.

    numpy reads a file that is neither a zip nor a ``.npy`` as a pickle and then advises
    ``allow_pickle=True``; that advice is wrong here (an npz never holds pickles), so such a
    file, an empty one or a broken zip is reported as not a valid npz.
    """
    fix = "the file is damaged: regenerate it (gpuloader generate) or delete it"
    if isinstance(exc, UnreadableFileError):
        return str(exc)[len(f"{exc.path}: ") :] if exc.path else str(exc)
    if isinstance(exc, FileCheckError):
        what = "holds a pickled object array" if "pickled" in (exc.detail or "") else None
        where = f"{exc.key!r} " if exc.key else ""
        return f"not a valid npz file ({what or where + (exc.detail or str(exc))}); {fix}"
    if isinstance(exc, zipfile.BadZipFile):
        return f"not a valid npz file (broken zip: {exc}); {fix}"
    if isinstance(exc, EOFError) or (isinstance(exc, ValueError) and "pickle" in str(exc)):
        return f"not a valid npz file (neither a zip archive nor a .npy array); {fix}"
    return f"cannot read npz ({_describe(exc)}); {fix}"


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _aggregate(res: _Result, file: Path, issues: dict[str, list[int]], kind: str) -> None:
    """One problem per kind of record issue, with a count and the first record index."""
    for message, where in issues.items():
        res.add(file, f"{len(where)} record(s) {message} (first: record {where[0]})", kind)


# ------------------------------------------------------------------ object folders


def _check_object(job: tuple[str, str]) -> _Result:
    """Object folder: metadata.json, subdivision_map.json records, level_0.npz."""
    dataset_dir, oid = Path(job[0]), job[1]
    res = _Result()
    odir = layout.object_dir(dataset_dir, oid)
    meta_path = odir / "metadata.json"
    map_path = odir / "subdivision_map.json"
    grid_path = layout.level0_voxel_path(dataset_dir, oid)
    res.payload = {"object_id": oid, "refs": [], "records": 0}

    if not meta_path.is_file():
        res.add(meta_path, "object metadata.json is missing; re-generate the object", MISSING)
    else:
        try:
            meta = layout.read_json(meta_path)
            if not isinstance(meta, dict):
                res.add(meta_path, "metadata.json is not a JSON object", FORMAT)
        except Exception as exc:
            res.add(meta_path, f"cannot parse JSON ({_describe(exc)})", UNREADABLE)

    grid = None
    if not grid_path.is_file():
        res.add(grid_path, "level_0.npz is missing from the object folder", MISSING)
    else:
        try:
            with np.load(grid_path, allow_pickle=False) as f:
                if "voxels" in f.files:
                    grid = np.asarray(f["voxels"]).astype(bool)
        except Exception:
            pass  # reported by the file check of level_0.npz
        if grid is not None and (grid.ndim != 3 or len(set(grid.shape)) != 1):
            grid = None

    if not map_path.is_file():
        res.add(map_path, "subdivision_map.json is missing; re-generate the object", MISSING)
        return res
    try:
        records = layout.read_json(map_path)
    except Exception as exc:
        res.add(map_path, f"cannot parse JSON ({_describe(exc)})", UNREADABLE)
        return res
    if not isinstance(records, list):
        res.add(map_path, "subdivision_map.json must be a JSON list of records", FORMAT)
        return res
    res.payload["records"] = len(records)
    res.counts["subdivision records"] += len(records)

    issues: dict[str, list[int]] = defaultdict(list)
    content: dict[str, list[int]] = defaultdict(list)
    per_level: Counter = Counter()
    refs: dict[tuple[int, str], bool] = {}
    for n, rec in enumerate(records):
        if not isinstance(rec, dict):
            issues["are not JSON objects"].append(n)
            continue
        missing = [k for k in MAP_KEYS if k not in rec]
        if missing:
            issues[f"lack key(s) {missing}"].append(n)
            continue
        level, h = rec["level"], rec["hash"]
        if not isinstance(level, int) or isinstance(level, bool) or level < 1:
            issues["have a level that is not an integer >= 1"].append(n)
            continue
        if not isinstance(h, str) or not _HEX64.match(h):
            issues["have a hash that is not a 64-digit lowercase hex SHA-256"].append(n)
            continue
        if layout.object_name(rec["object_id"]) != oid:
            issues[f"name another object_id than {oid}"].append(n)
        if not isinstance(rec["is_empty"], bool):
            issues["have a non-boolean is_empty"].append(n)
        per_level[level] += 1
        refs[(level, h)] = refs.get((level, h), True) and rec["is_empty"] is True
        pos = [rec[f"position_{a}"] for a in "xyz"]
        gpos = [rec[f"global_position_{a}"] for a in "xyz"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in pos + gpos):
            issues["have non-integer positions"].append(n)
            continue
        octant = rec["octant_index"]
        expected_octant = 4 * (pos[0] > 0) + 2 * (pos[1] > 0) + (pos[2] > 0)
        if octant != expected_octant:
            issues["have an octant_index that does not match position_x/y/z"].append(n)
        if grid is None:
            continue
        side = grid.shape[0] >> level
        if side < 1 or any(p not in (0, side) for p in pos):
            issues[f"have positions other than 0 or side (base >> level = {side})"].append(n)
            continue
        if any(g < 0 or g + side > grid.shape[0] or g % side for g in gpos):
            issues["have global positions outside the level-0 grid"].append(n)
            continue
        sub = grid[gpos[0] : gpos[0] + side, gpos[1] : gpos[1] + side, gpos[2] : gpos[2] + side]
        if hashlib.sha256(sub.tobytes()).hexdigest() != h:
            content["have a hash that differs from the level-0 grid at their position"].append(n)
        if rec["is_empty"] is not (not sub.any()):
            content["have is_empty that disagrees with the level-0 grid"].append(n)
    _aggregate(res, map_path, issues, MAP)
    _aggregate(res, map_path, content, HASH)
    if per_level:
        top = max(per_level)
        wrong = {
            lv: per_level.get(lv, 0) for lv in range(1, top + 1) if per_level.get(lv, 0) != 8**lv
        }
        if wrong:
            res.add(
                map_path,
                "records per level should be 8**level (one per octant); got "
                + ", ".join(f"level {lv}: {c}" for lv, c in wrong.items()),
                MAP,
            )
    res.payload["refs"] = [(lv, h, empty) for (lv, h), empty in refs.items()]
    return res


# ------------------------------------------------------------------ voxel and ray files


def _load_all(path: Path) -> dict[str, np.ndarray]:
    """Every member of an npz (decompressing all, so CRC and zlib errors surface)."""
    return validate.load_npz(path)


def _present(path: Path) -> bool:
    """A file, or a link that may be one (a symlink loop is checked, and named, not skipped)."""
    return path.is_file() or path.is_symlink()


def _problem(res: _Result, exc: FileCheckError) -> None:
    """One problem from a validate error: the message without the file and the fix."""
    where = f"{exc.key} row {exc.row}: " if exc.row is not None else ""
    kind = VALUES if isinstance(exc, (InvalidValueError, EmptyRayFileError)) else FORMAT
    res.add(exc.path or "?", f"{where or (exc.key + ' ' if exc.key else '')}{exc.detail}", kind)


def _check_voxel_file(
    res: _Result, path: Path, level: int, name: str, expected_side: int | None
) -> np.ndarray | None:
    """Returns the bool grid when it is a 3-D cube (even if other checks fail)."""
    res.counts["voxel files"] += 1
    try:
        data = _load_all(path)
    except Exception as exc:
        res.add(path, _npz_problem(exc), UNREADABLE)
        return None
    if "voxels" not in data:
        res.add(path, f"no key 'voxels' (keys: {sorted(data)})", FORMAT)
        return None
    arr = data["voxels"]
    problems = validate.voxel_problems(path, arr)
    for problem in problems:
        _problem(res, problem)
    if arr.ndim != 3 or len(set(arr.shape)) != 1:
        return None
    side = arr.shape[0]
    if expected_side is not None and side != expected_side and not side & (side - 1):
        res.add(
            path,
            f"voxels side {side} does not match level {level} (base >> {level} = {expected_side})",
            FORMAT,
        )
    grid = arr.astype(bool)
    if level >= 1:
        digest = hashlib.sha256(grid.tobytes()).hexdigest()
        if digest != name:
            res.add(path, f"content SHA-256 is {digest}, not the file name {name}", HASH)
    return grid


def _is_int_scalar(a: np.ndarray) -> bool:
    return a.shape == () and np.issubdtype(a.dtype, np.integer)


def _check_ray_file(
    res: _Result, path: Path, level: int, name: str, grid: np.ndarray | None
) -> dict[str, np.ndarray] | None:
    """Returns origins/directions/distances (and voxel_size) when they can be traced."""
    res.counts["ray files"] += 1
    try:
        data = _load_all(path)
    except Exception as exc:
        res.add(path, _npz_problem(exc), UNREADABLE)
        return None
    expected = (*layout.RAY_ROW_KEYS, "view_positions", *layout.RAY_SCALAR_KEYS)
    missing = [k for k in expected if k not in data]
    if missing:
        res.add(path, f"missing key(s) {missing}", FORMAT)

    n = None
    for key in ("origins", "distances", *layout.RAY_ROW_KEYS):  # as validate counts N
        if key in data and data[key].ndim >= 1:
            n = int(data[key].shape[0])
            break
    # keys, dtypes, shapes, zero rays and values: the readers' checks (gpuloader.format.validate)
    problems = validate.ray_problems(path, data)
    bad_keys = set()
    for problem in problems:
        if not isinstance(problem, MissingKeyError):  # named above, with the scalar keys
            _problem(res, problem)
        if not isinstance(problem, (InvalidValueError, EmptyRayFileError)):
            bad_keys.add(problem.key)
    good = {
        k: data[k]
        for k in (*layout.RAY_ROW_KEYS, "view_positions")
        if k in data and k not in bad_keys
    }
    if n is not None:
        res.counts["rays"] += n
    finite = np.ones(n or 0, dtype=bool)
    for key in ("origins", "directions", "distances"):
        a = good.get(key)
        if a is not None:
            ok = np.isfinite(a)
            finite &= ok.all(axis=1) if ok.ndim > 1 else ok
    hits = good.get("hits")
    if hits is not None:
        res.counts["hits"] += int(np.count_nonzero(hits))
    faces = good.get("face_ids")

    # provenance scalars
    voxel_size = 1.0
    if "voxel_size" in data:
        vs = data["voxel_size"]
        if vs.shape != () or not np.issubdtype(vs.dtype, np.number) or not (float(vs) > 0):
            res.add(path, f"voxel_size must be a positive number; got {vs!r}", VALUES)
        else:
            voxel_size = float(vs)
    if "level" in data:
        lv = data["level"]
        if not _is_int_scalar(lv):
            res.add(path, f"level must be an integer scalar; got {lv!r}", FORMAT)
        elif int(lv) != level:
            res.add(path, f"level scalar {int(lv)} but the file lies under level_{level}", VALUES)
    if "hash" in data:
        hv = data["hash"]
        if hv.shape != () or hv.dtype.kind not in "US":
            res.add(path, f"hash must be a string scalar; got {hv!r}", FORMAT)
        elif str(hv.item() if hv.dtype.kind == "U" else hv.item().decode()) != name:
            res.add(path, f"hash scalar {hv.item()!r} does not match the file name {name}", VALUES)
    if "sampling_mode" in data:
        sm = data["sampling_mode"]
        if sm.shape != () or sm.dtype.kind not in "US":
            res.add(path, f"sampling_mode must be a string scalar; got {sm!r}", FORMAT)
    shape_xyz = None
    if "grid_shape" in data:
        gs = data["grid_shape"]
        if gs.shape != (3,) or not np.issubdtype(gs.dtype, np.integer):
            res.add(path, f"grid_shape must be 3 integers; got {gs!r}", FORMAT)
        else:
            if grid is not None and tuple(int(v) for v in gs) != grid.shape:
                res.add(
                    path,
                    f"grid_shape {tuple(int(v) for v in gs)} differs from the voxel grid's "
                    f"{grid.shape}",
                    VALUES,
                )
            shape_xyz = gs[::-1].astype(np.float64)
    o = good.get("origins")
    if faces is not None and o is not None and shape_xyz is not None:
        ok_face = (faces >= 0) & (faces <= 5) & finite
        f = np.clip(faces, 0, 5)
        axis = f // 2
        sign = np.where(f % 2 == 0, -1.0, 1.0)
        half = shape_xyz[axis] * voxel_size / 2.0
        coord = o[np.arange(o.shape[0]), axis].astype(np.float64)
        bad = ok_face & (np.abs(coord - sign * half) > 1e-3 * (1.0 + half))
        if bad.any():
            res.add(
                path,
                f"{int(bad.sum())} origin(s) do not lie on the box face given by face_ids "
                f"(first: ray {_first(bad)})",
                VALUES,
            )
    if all(k in good for k in ("origins", "directions", "distances")):
        return {
            "origins": good["origins"],
            "directions": good["directions"],
            "distances": good["distances"],
            "finite": finite,
            "voxel_size": np.float64(voxel_size),
        }
    return None


def _retrace(
    res: _Result, path: Path, key: str, grid: np.ndarray, rays: dict, fraction: float, seed: int
) -> None:
    """Trace a random ``fraction`` of the rays (at least one) and compare with distances."""
    n = rays["distances"].shape[0]
    if n == 0:
        return
    k = min(n, max(1, int(round(fraction * n))))
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    idx = np.sort(rng.choice(n, size=k, replace=False))
    idx = idx[rays["finite"][idx]]
    if idx.size == 0:
        return
    got = trace(grid, rays["origins"][idx], rays["directions"][idx], float(rays["voxel_size"]))
    stored = rays["distances"][idx].astype(np.float64)
    err = np.abs(got - stored)
    res.rays_checked += int(idx.size)
    res.max_err = max(res.max_err, float(err.max()))
    bad = err > ABS_TOL + REL_TOL * np.abs(got)
    if bad.any():
        j = int(np.argmax(np.where(bad, err, -1.0)))
        res.add(
            path,
            f"{int(bad.sum())} of {idx.size} re-traced ray(s) differ from distances "
            f"(worst: ray {int(idx[j])}, stored {stored[j]:.6g}, traced {got[j]:.6g})",
            TRACE,
        )


def _check_sample(job: dict[str, Any]) -> _Result:
    """A sample's voxel file and ray file (either may be absent), then the re-trace."""
    level, name = job["level"], job["name"]
    res = _Result(weight=int(job["voxel"] is not None) + int(job["ray"] is not None))
    res.payload = {"level": level, "name": name, "trivial": None, "empty": None}
    grid = None
    if job["voxel"] is not None:
        grid = _check_voxel_file(res, Path(job["voxel"]), level, name, job["side"])
        if grid is not None:
            empty = not grid.any()
            res.payload["empty"] = empty
            res.payload["trivial"] = empty  # upstream's pipeline lists all-empty grids only
    if job["ray"] is None:
        known_empty = res.payload["empty"] if grid is not None else job["map_empty"]
        if level == 0 or known_empty is False:
            what = "object" if level == 0 else "non-empty sub-volume"
            res.add(
                job["ray_expected"],
                f"ray file of {what} {name} is missing (voxel file {job['voxel']})",
                PAIRING,
            )
        return res
    rays = _check_ray_file(res, Path(job["ray"]), level, name, grid)
    if rays is not None and grid is not None:
        _retrace(res, Path(job["ray"]), job["key"], grid, rays, job["fraction"], job["seed"])
    return res


# ------------------------------------------------------------------ running units


def _safe(fn: Callable[[Any], _Result], job: Any) -> _Result:
    """Run a unit; an unexpected exception becomes a problem, never a crash."""
    try:
        return fn(job)
    except Exception as exc:  # pragma: no cover - defensive
        if isinstance(job, dict):
            file = job.get("ray") or job.get("voxel")
        else:
            file = layout.object_dir(Path(job[0]), job[1])
        res = _Result()
        res.add(str(file), f"unexpected error while checking ({_describe(exc)})", INTERNAL)
        return res


def _run_units(
    fn: Callable[[Any], _Result],
    jobs: Sequence[Any],
    weights: Sequence[int],
    workers: int,
    desc: str,
    progress: bool,
) -> Iterator[_Result]:
    bar = tqdm(
        total=int(sum(weights)), desc=desc, unit="file", disable=not progress, file=sys.stderr
    )
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                res = _safe(fn, job)
                bar.update(res.weight)
                yield res
            return
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        ctx = mp.get_context(method)
        chunk = max(1, min(16, len(jobs) // (workers * 8)))
        with ctx.Pool(min(workers, len(jobs))) as pool:
            for res in pool.imap_unordered(functools.partial(_safe, fn), jobs, chunksize=chunk):
                bar.update(res.weight)
                yield res
    finally:
        bar.close()


def _merge(report: VerifyReport, res: _Result) -> None:
    report.problems += res.problems
    report.warnings += res.warnings
    for k, v in res.counts.items():
        report.counts[k] = report.counts.get(k, 0) + int(v)
    report.rays_checked += res.rays_checked
    report.max_trace_error = max(report.max_trace_error, res.max_err)


def _read_json(report: VerifyReport, path: Path, what: str) -> Any:
    if not path.is_file():
        report.problems.append(Problem(str(path), f"{what} is missing", MISSING))
        return None
    try:
        return layout.read_json(path)
    except Exception as exc:
        report.problems.append(
            Problem(str(path), f"cannot parse JSON ({_describe(exc)})", UNREADABLE)
        )
        return None


def _scan(root: Path, pattern: str) -> dict[tuple[int, str], Path]:
    """``(level, name) -> path`` of files matching ``level_<L>/<hh>/<pattern>`` under root."""
    out: dict[tuple[int, str], Path] = {}
    if not root.is_dir():
        return out
    for level_dir in sorted(root.iterdir()):
        m = _LEVEL_DIR.match(level_dir.name)
        if not m or not level_dir.is_dir():
            continue
        for p in sorted(level_dir.glob(f"*/{pattern}")):
            if _present(p) and not p.name.startswith("."):
                name = p.name[: -len(pattern) + 1]
                out[(int(m.group(1)), name)] = p
    return out


def _examples(items: Sequence[str], n: int = 3) -> str:
    items = sorted(items)
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _check_splits(
    report: VerifyReport,
    path: Path,
    splits: Any,
    objects: Sequence[str],
    refs: dict[tuple[int, str], tuple[bool, set[str]]],
    trivial: dict[str, bool],
) -> None:
    """splits.json against the object folders, the subdivision maps and the voxel contents."""

    def add(msg: str, kind: str = SPLITS) -> None:
        report.problems.append(Problem(str(path), msg, kind))

    if not isinstance(splits, dict):
        add("splits.json must be a JSON object", FORMAT)
        return
    missing = [
        k for k in ("object_splits", "hash_object_usage", "trivial_hashes") if k not in splits
    ]
    if missing:
        add(f"missing key(s) {missing}", FORMAT)
    object_splits = splits.get("object_splits")
    if isinstance(object_splits, dict):
        absent = [o for o in objects if o not in object_splits]
        if absent:
            add(f"{len(absent)} object(s) have no entry in object_splits: {_examples(absent)}")
        extra = [o for o in object_splits if o not in set(objects)]
        if extra:
            add(
                f"{len(extra)} object(s) in object_splits have no object folder: {_examples(extra)}"
            )
        odd = sorted({str(v) for v in object_splits.values() if v not in SPLIT_NAMES})
        if odd:
            add(f"object_splits uses unknown split name(s) {odd}; expected train/val/test")
    elif "object_splits" in splits:
        add("object_splits must be a JSON object {object ID: split}", FORMAT)
        object_splits = None

    usage = splits.get("hash_object_usage")
    used: dict[str, set[str]] = defaultdict(set)
    for (_level, h), (_empty, oids) in refs.items():
        used[h] |= oids
    if isinstance(usage, dict):
        lacking = [h for h in used if h not in usage]
        if lacking:
            add(
                f"hash_object_usage lacks {len(lacking)} hash(es) used in subdivision maps: "
                f"{_examples(lacking)}"
            )
        stale = [h for h in usage if h not in used]
        if stale:
            add(
                f"hash_object_usage lists {len(stale)} hash(es) no subdivision map uses: "
                f"{_examples(stale)}"
            )
        wrong_users, wrong_split = [], []
        for h, oids in used.items():
            entry = usage.get(h)
            if not isinstance(entry, dict):
                continue
            if set(entry) != oids:
                wrong_users.append(h)
            elif isinstance(object_splits, dict) and any(
                object_splits.get(o) != s for o, s in entry.items()
            ):
                wrong_split.append(h)
        if wrong_users:
            add(
                f"hash_object_usage names other objects than the subdivision maps for "
                f"{len(wrong_users)} hash(es): {_examples(wrong_users)}"
            )
        if wrong_split:
            add(
                f"hash_object_usage gives other splits than object_splits for "
                f"{len(wrong_split)} hash(es): {_examples(wrong_split)}"
            )
    elif "hash_object_usage" in splits:
        add("hash_object_usage must be a JSON object {hash: {object ID: split}}", FORMAT)

    listed = splits.get("trivial_hashes")
    if isinstance(listed, list):
        listed_set = {str(h) for h in listed}
        not_listed = [h for h, t in trivial.items() if t and h not in listed_set]
        if not_listed:
            add(
                f"trivial_hashes lacks {len(not_listed)} all-empty hash(es): "
                f"{_examples(not_listed)}"
            )
        wrongly = [h for h in listed_set if trivial.get(h) is False]
        if wrongly:
            add(
                f"trivial_hashes lists {len(wrongly)} hash(es) that are not all-empty (upstream "
                f"lists only all-empty grids; all-full ones are ordinary samples): "
                f"{_examples(wrongly)}"
            )
        unknown = [h for h in listed_set if h not in used and h not in trivial]
        if unknown:
            add(f"trivial_hashes lists {len(unknown)} unknown hash(es): {_examples(unknown)}")
    elif "trivial_hashes" in splits:
        add("trivial_hashes must be a JSON list of hashes", FORMAT)


def _check_metadata_keys(
    report: VerifyReport,
    ds: Path,
    rays_root: Path,
    meta: Any,
    splits: Any,
    summary: Any,
    registry: Any,
) -> None:
    """Every JSON file holds the keys upstream's generator writes; name the missing ones.

    ``meta``, ``splits``, ``summary``, ``registry``: the parsed dataset metadata.json,
    splits.json, processing_summary.json, registry.json (None: missing or unreadable, already
    reported). Object metadata.json files are read here.
    """
    from gpuloader.generate.metadata import missing_keys

    def check(file: str, path: Path, doc: Any) -> None:
        if doc is None:
            return
        lacking = missing_keys(file, doc)
        if lacking:
            report.problems.append(
                Problem(
                    str(path),
                    f"missing key(s) that upstream's generator writes: {', '.join(lacking)}; "
                    "regenerate the dataset (gpuloader generate) so upstream tools can read it",
                    FORMAT,
                )
            )

    check("metadata.json", ds / "metadata.json", meta)
    check("splits.json", ds / "splits.json", splits)
    check("registry.json", ds / "registry.json", registry)
    check("processing_summary.json", rays_root / "processing_summary.json", summary)
    objects_root = ds / "objects"
    if objects_root.is_dir():
        for odir in sorted(objects_root.glob("object_*/")):
            path = odir / "metadata.json"
            try:
                doc = layout.read_json(path)
            except Exception:
                continue  # missing or unreadable: reported by the object check
            check("object metadata.json", path, doc)


def verify_dataset(
    dataset_dir: str | Path,
    ray_dir: str | Path,
    fraction: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    workers: int = 1,
) -> VerifyReport:
    """Check both roots of a dataset; re-trace ``fraction`` of each ray file's rays.

    Every check runs on every file; the report lists all problems found. ``workers > 1``
    checks files in a process pool. The rays re-traced are a pure function of ``seed`` and
    the file's path under the ray root.
    """
    if not (0.0 <= fraction <= 1.0):
        raise ValueError(f"fraction must be in [0, 1]; got {fraction}")
    ds, rays_root = Path(dataset_dir), Path(ray_dir)
    report = VerifyReport(str(ds), str(rays_root), fraction=fraction, seed=seed)
    report.counts = dict.fromkeys(
        ("objects", "subdivision records", "unique sub-volumes", "voxel files", "ray files"), 0
    )
    report.counts.update(rays=0, hits=0)
    for root, what in ((ds, "dataset folder (DATASET_DIR)"), (rays_root, "ray folder (RAY_DIR)")):
        if root.exists() and not root.is_dir():
            report.problems.append(Problem(str(root), f"{what} is not a folder", MISSING))
        elif not root.is_dir():
            report.problems.append(Problem(str(root), f"{what} does not exist", MISSING))

    meta = _read_json(report, ds / "metadata.json", "dataset metadata.json")
    splits = _read_json(report, ds / "splits.json", "splits.json")
    summary = _read_json(report, rays_root / "processing_summary.json", "processing_summary.json")
    registry = _read_json(report, ds / "registry.json", "registry.json")
    _check_metadata_keys(report, ds, rays_root, meta, splits, summary, registry)
    base = meta.get("base_resolution") if isinstance(meta, dict) else None
    if not isinstance(base, int) or isinstance(base, bool) or base < 1:
        base = None

    objects_root = ds / "objects"
    objects = sorted(
        p.name[len("object_") :]
        for p in (objects_root.iterdir() if objects_root.is_dir() else [])
        if p.is_dir() and p.name.startswith("object_")
    )
    report.counts["objects"] = len(objects)

    # 1. object folders and their subdivision maps
    refs: dict[tuple[int, str], tuple[bool, set[str]]] = {}
    jobs = [(str(ds), oid) for oid in objects]
    for res in _run_units(_check_object, jobs, [1] * len(jobs), workers, "objects", progress):
        _merge(report, res)
        oid = res.payload["object_id"]
        for level, h, empty in res.payload["refs"]:
            old_empty, users = refs.get((level, h), (True, set()))
            refs[(level, h)] = (old_empty and empty, users | {oid})

    if base is None:  # infer the base resolution from the level-0 grids' most common side
        sides: Counter = Counter()
        for oid in objects[:64]:
            try:
                with np.load(layout.level0_voxel_path(ds, oid)) as f:
                    sides[f["voxels"].shape[0]] += 1
            except Exception:
                pass
        base = sides.most_common(1)[0][0] if sides else None

    # 2. voxel and ray files, paired per sample
    voxel_files = _scan(ds / "subvolumes", "*.npz")
    ray_files = _scan(rays_root, "*_rays.npz")
    for found in (voxel_files, ray_files):
        for (_level, name), p in found.items():
            if p.parent.name != name[:2]:
                report.problems.append(
                    Problem(
                        str(p),
                        f"file should be in folder {name[:2]}/, not {p.parent.name}/",
                        MISPLACED,
                    )
                )
    keys = set(refs) | {(0, o) for o in objects} | set(voxel_files) | set(ray_files)
    sample_jobs: list[dict[str, Any]] = []
    for level, name in sorted(keys):
        vpath = layout.voxel_path(ds, level, name)
        rpath = layout.ray_path(rays_root, level, name)
        v_ok, r_ok = _present(vpath), _present(rpath)
        ref = refs.get((level, name))
        if not v_ok:
            if ref is not None:
                report.problems.append(
                    Problem(
                        str(vpath),
                        f"sub-volume used by subdivision_map.json of object(s) "
                        f"{_examples(sorted(ref[1]))} is missing",
                        MISSING,
                    )
                )
            if r_ok:
                report.problems.append(
                    Problem(str(rpath), f"ray file has no voxel file (expected {vpath})", PAIRING)
                )
        elif level >= 1 and ref is None:
            report.warnings.append(
                Problem(str(vpath), "sub-volume file is used by no subdivision_map record")
            )
        if not v_ok and not r_ok:
            continue
        sample_jobs.append(
            {
                "level": level,
                "name": name,
                "key": f"level_{level}/{name}",
                "voxel": str(vpath) if v_ok else None,
                "ray": str(rpath) if r_ok else None,
                "ray_expected": str(rpath),
                "side": (base >> level) if base is not None else None,
                "map_empty": ref[0] if ref is not None else None,
                "fraction": fraction,
                "seed": seed,
            }
        )
    weights = [int(j["voxel"] is not None) + int(j["ray"] is not None) for j in sample_jobs]
    trivial: dict[str, bool] = {}
    for res in _run_units(_check_sample, sample_jobs, weights, workers, "files", progress):
        _merge(report, res)
        p = res.payload
        if p.get("level", 0) >= 1:  # a unit that crashed has no payload
            if p["trivial"] is not None:
                trivial[p["name"]] = p["trivial"]
    for (_level, h), (empty, _users) in refs.items():
        if empty and h not in trivial:
            trivial[h] = True
    report.counts["unique sub-volumes"] = len(refs)

    # 3. splits.json against everything above
    if splits is not None:
        _check_splits(report, ds / "splits.json", splits, objects, refs, trivial)

    order = {k: i for i, k in enumerate(KINDS)}
    report.problems.sort(key=lambda p: (order.get(p.kind, len(order)), p.file, p.message))
    report.warnings.sort(key=lambda p: (p.file, p.message))
    return report


# ------------------------------------------------------------------ command line


def _fraction(text: str) -> float:
    value = float(text)
    if not (0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in [0, 1]; got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gpuloader verify``."""
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="voxel side (dataset/)")
    parser.add_argument("ray_dir", metavar="RAY_DIR", help="ray side (ray_dataset_hierarchical/)")
    parser.add_argument(
        "--fraction",
        type=_fraction,
        default=0.01,
        help="fraction of each ray file's rays to re-trace (at least 1 per file; default 0.01)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the ray sample (default 0)")
    parser.add_argument(
        "--workers", type=_positive_int, default=1, help="processes checking files (default 1)"
    )
    parser.add_argument(
        "--max-per-kind",
        type=int,
        default=20,
        help="problems listed per kind (0 = all; default 20)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar and no counts; problems only"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``gpuloader verify``; 0 when clean, 1 on any problem, 2 when a root is no folder."""
    from gpuloader.errors import DatasetLayoutError

    for root, arg in ((Path(args.dataset_dir), "DATASET_DIR"), (Path(args.ray_dir), "RAY_DIR")):
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise DatasetLayoutError(f"{root} {what}; check the {arg} argument")
    report = verify_dataset(
        args.dataset_dir,
        args.ray_dir,
        fraction=args.fraction,
        seed=args.seed,
        progress=not args.quiet,
        workers=args.workers,
    )
    print(report.format(max_per_kind=args.max_per_kind, summary=not args.quiet))
    return 0 if report.ok else 1
