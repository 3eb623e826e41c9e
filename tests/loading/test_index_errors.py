"""Files the index build left out (``on_error='skip'``: a ray file whose npz header cannot
be read) appear once in ``dataset.errors`` and in ``GPURayLoader.errors`` (issue 18, item 10)."""

from __future__ import annotations

import warnings

from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.loading.loader import GPURayLoader


def test_index_left_out_files_are_in_loader_errors(tiny_copy):
    ds_dir, rays = tiny_copy
    bad = sorted(rays.rglob("*.npz"))[0]
    bad.write_bytes(b"not an npz at all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = HierarchicalVoxelRayDataset(ds_dir, rays, split="train", on_error="skip")
    files = [f for f, _ in ds.errors]
    assert files.count(str(bad)) == 1, ds.errors
    assert all(s.get("ray_path") != str(bad) for s in ds.samples)
    with GPURayLoader(ds, None, 2, device="cpu", store="host", backend="torch",
                      num_workers=0) as ld:  # fmt: skip
        assert [f for f, _ in ld.errors] == files
        line = dict(ld.errors)[str(bad)]
        assert line and line == dict(ds.errors)[str(bad)]
        list(ld)
        assert [f for f, _ in ld.errors].count(str(bad)) == 1
