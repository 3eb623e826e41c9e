"""The compiled widening of packed stripe records equals numpy's field by field."""

from __future__ import annotations

import numpy as np
import pytest

from gpuloader import schema
from gpuloader.reading import widen
from gpuloader.stores.pack.striped import record_dtype


@pytest.mark.parametrize("vid", ["u1", "<u2", "<i4"])
def test_compiled_widening_equals_numpy(vid, monkeypatch):
    if not widen.AVAILABLE:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(0)
    rec = record_dtype(vid, "u1")
    m, w, slots, k = 7, 16, 9, 3
    raw = np.frombuffer(rng.bytes(m * w * rec.itemsize), dtype=rec).reshape(m, w).copy()
    raw["view_ids"] = rng.integers(0, {"u1": 256, "<u2": 65536, "<i4": 2**31 - 1}[vid], (m, w))
    src = rng.permutation(m)[:5].astype(np.int64)
    dst = rng.permutation(slots)[:5].astype(np.int64)
    fast = np.zeros((slots, k, w), dtype=schema.RAY_RECORD)
    widen.widen_into(raw, src, dst, 2, fast)
    monkeypatch.setattr(widen, "_widen_compiled", None)
    slow = np.zeros((slots, k, w), dtype=schema.RAY_RECORD)
    widen.widen_into(raw, src, dst, 2, slow)
    assert fast.tobytes() == slow.tobytes()
    assert np.array_equal(fast["view_ids"][dst, 2], raw["view_ids"][src].astype(np.int32))
    raw_out = fast.view(np.uint8).reshape(slots, k, -1)
    assert not raw_out[:, :2].any()  # only stripe place 2 written


def test_another_layout_takes_the_numpy_path():
    odd = np.dtype([("hits", "u1"), ("origins", "<f4", (3,))])
    assert widen._fits(odd) is None
    assert widen._fits(record_dtype("<u2", "u1")) == 2
