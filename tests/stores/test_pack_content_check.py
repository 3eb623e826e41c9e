"""A ray file rewritten to the same size with its mtime set back: the store's default fast
check cannot see it (documented), the full check and ``gpuloader pack`` on the pack do."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpuloader.commands.cli import main
from gpuloader.errors import PackError, StalePackError
from gpuloader.stores.pack import PackedRayStore, pack_rays


@pytest.fixture
def packed(tiny_dataset, tmp_path) -> tuple[Path, Path, Path]:
    """(ray tree copy, pack, one level-1 ray file of it)."""
    rays = Path(shutil.copytree(tiny_dataset[1], tmp_path / "ray_dataset_hierarchical"))
    victim = next(
        p
        for p in sorted((rays / "level_1").glob("*/*_rays.npz"))
        if (_arrays(p)["distances"] > 0).any()
    )
    np.savez(victim, **_arrays(victim))  # uncompressed: a rewrite keeps its size exactly
    pack = tmp_path / "pack"
    pack_rays(rays, pack, progress=False, workers=1)
    return rays, pack, victim


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _rewrite_same_size_same_mtime(path: Path) -> None:
    """Other (valid) rays, the same size, the mtime set back."""
    st = os.stat(path)
    a = _arrays(path)
    hit = int(np.flatnonzero(a["distances"] > 0)[0])
    a["distances"][hit] *= 0.5
    np.savez(path, **a)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_pack_rebuild_compares_content(packed) -> None:
    rays, pack, victim = packed
    _rewrite_same_size_same_mtime(victim)
    with pytest.raises(PackError) as info:
        pack_rays(rays, pack, progress=False, workers=1)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{pack} already holds a ray pack that does not match")
    assert "content differs, same size and mtime" in first and victim.name in first


def test_pack_command_does_not_say_up_to_date(packed, capsys) -> None:
    rays, pack, victim = packed
    args = ["pack", str(rays), str(pack), "--quiet", "--workers", "1"]
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    _rewrite_same_size_same_mtime(victim)
    assert main(args) != 0
    out, err = capsys.readouterr()
    assert "up to date" not in out and "content differs" in err and "--force" in err
    assert main([*args, "--force"]) == 0  # the rebuild the message names
    PackedRayStore(pack, check="full")  # now matches the tree, content too


def test_touched_file_needs_a_rebuild_as_the_store_says(packed) -> None:
    """Same bytes, a newer mtime: the store's fast check calls the pack stale, so ``pack``
    does not call it up to date (the two agree)."""
    rays, pack, victim = packed
    os.utime(victim, ns=(0, os.stat(victim).st_mtime_ns + 10**9))
    with pytest.raises(StalePackError):
        PackedRayStore(pack)
    with pytest.raises(PackError, match="--force"):
        pack_rays(rays, pack, progress=False, workers=1)


def test_store_fast_check_misses_it_full_check_does_not(packed) -> None:
    _, pack, victim = packed
    _rewrite_same_size_same_mtime(victim)
    PackedRayStore(pack)  # the default "fast" check: sizes and mtimes only (README)
    with pytest.raises(StalePackError, match="content differs, same size and mtime"):
        PackedRayStore(pack, check="full")
