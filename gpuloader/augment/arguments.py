"""Checks of the transforms' constructor arguments: each error names the transform, the
argument, the value given and what is allowed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["AXES", "axes_arg", "probability_arg", "real_arg"]


def real_arg(owner: str, name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a float where it is finite and ``ok``; the errors name ``owner``'s
    argument ``name``, the value and ``allowed``.

    Raises:
        TypeError: not a real number (a bool, a string, None). ValueError: NaN, inf or not ok.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"{owner}: {name} must be {allowed}; got {name}={value!r} ({type(value).__name__})"
        )
    if not (np.isfinite(value) and ok(float(value))):
        raise ValueError(f"{owner}: {name} must be {allowed}; got {name}={value!r}")
    return float(value)


def probability_arg(owner: str, name: str, value: Any) -> float:
    return real_arg(owner, name, value, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)


#: world axes by name and number (``axes`` arguments)
AXES = {"x": 0, "y": 1, "z": 2, 0: 0, 1: 1, 2: 2}


def axes_arg(owner: str, axes: Any) -> tuple[str | int, ...]:
    """``axes`` as a non-empty tuple of distinct world axes ('x', 'y', 'z' or 0, 1, 2).

    Raises:
        TypeError: ``axes`` is not a sequence. ValueError: empty, an unknown axis, a repeat.
    """
    allowed = "a non-empty sequence of distinct axes among 'x', 'y', 'z' (or 0, 1, 2)"
    if not isinstance(axes, (str, Sequence, np.ndarray)):
        raise TypeError(f"{owner}: axes must be {allowed}; got axes={axes!r}")
    out = tuple(int(a) if isinstance(a, np.integer) else a for a in axes)
    bad = [a for a in out if isinstance(a, bool) or not isinstance(a, (str, int)) or a not in AXES]
    if bad or not out or len({AXES[a] for a in out}) != len(out):
        what = f" ({bad[0]!r} is not an axis)" if bad else " (an axis twice)" if out else ""
        raise ValueError(f"{owner}: axes must be {allowed}; got axes={axes!r}{what}")
    return out
