"""What ``gpuloader verify`` finds and how it is printed.

Holds the problem kinds (in report order), :class:`Problem` (one finding, naming its file),
:class:`VerifyReport` (everything found, and its printed form), :class:`UnitResult` (what one
unit of work, an object folder or a sample's files, reports back) with :func:`merge` that adds
it to a report, and the small wording helpers the checks share (:func:`describe`,
:func:`examples`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MISSING",
    "UNREADABLE",
    "OUTSIDE",
    "MISPLACED",
    "FORMAT",
    "VALUES",
    "HASH",
    "PAIRING",
    "MAP",
    "SPLITS",
    "TRACE",
    "INTERNAL",
    "KINDS",
    "Problem",
    "VerifyReport",
    "UnitResult",
    "merge",
    "describe",
    "examples",
]

# Problem kinds, in report order.
MISSING = "missing file"
UNREADABLE = "unreadable file"
#: a file or folder a symlink leads outside its root, or an object ID that is a path
OUTSIDE = "outside the dataset"
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
    OUTSIDE,
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


@dataclass
class UnitResult:
    """What one unit of work (an object folder or a sample's files) reports back.

    ``weight``: files the unit stands for (progress bar); ``payload``: what the dataset-wide
    checks need from it (an object's subdivision references, a sample's emptiness).
    """

    weight: int = 1
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    rays_checked: int = 0
    max_err: float = 0.0
    payload: dict[str, Any] = field(default_factory=dict)

    def add(self, file: Path | str, message: str, kind: str) -> None:
        """Record one problem of ``kind`` about ``file``."""
        self.problems.append(Problem(str(file), message, kind))


def merge(report: VerifyReport, res: UnitResult) -> None:
    """Add one unit's problems, warnings, counts and trace numbers to the report."""
    report.problems += res.problems
    report.warnings += res.warnings
    for k, v in res.counts.items():
        report.counts[k] = report.counts.get(k, 0) + int(v)
    report.rays_checked += res.rays_checked
    report.max_trace_error = max(report.max_trace_error, res.max_err)


def describe(exc: BaseException) -> str:
    """``"TypeName: message"`` of an exception (``"no detail"`` when it says nothing)."""
    text = str(exc).strip() or "no detail"
    return f"{type(exc).__name__}: {text}"


def examples(items: Sequence[str], n: int = 3) -> str:
    """The first ``n`` of the sorted ``items``, with how many there are when more."""
    items = sorted(items)
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
