"""``gpuloader generate`` that runs out of room (issue 18, item 6): one named error line
(GenerationSpaceError: the folder, the errno, the fix), no traceback, no half-written file,
and the same command run again with room finishes the dataset, which then loads whole."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import GenerationSpaceError, IncompleteDatasetWarning
from gpuloader.format import layout

#: big enough that ray files pass the size limit below, small enough to take a second
ARGS = ["--shapes", "asym", "torus", "box", "--resolution", "8", "--min-resolution", "4"]
ARGS += ["--divisions", "2", "--samples-per-view", "300", "--quiet"]
LIMIT = 6000  # bytes per file: the JSON and voxel files fit, most ray files do not


def _limited() -> None:
    """In the child: files larger than LIMIT fail with EFBIG (SIGXFSZ ignored, so the write
    fails rather than the process dying), as a quota or a full disk makes them fail."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _generate(out: Path, workers: int, limited: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gpuloader.commands.cli", "generate", str(out), *ARGS]
    return subprocess.run(
        [*cmd, "--workers", str(workers)],
        preexec_fn=_limited if limited else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.is_file() and p.name.endswith(".tmp")]


@pytest.mark.parametrize("workers", [1, 2])
def test_out_of_room_is_one_line_and_the_rerun_finishes(tmp_path: Path, workers: int) -> None:
    out = tmp_path / "out"
    got = _generate(out, workers, limited=True)
    assert got.returncode == 2, got.stderr
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1, got.stderr  # no traceback
    assert lines[0].startswith(
        f"gpuloader generate: error: {out}: cannot write the dataset: [Errno {errno.EFBIG}] "
    )
    assert "run the same command again" in lines[0] and "bytes free there" in lines[0]
    assert _tmp_files(out) == []  # no half-written file left holding the space
    written = list(out.rglob("*.npz"))
    assert written  # some files made it before the limit
    for p in written:  # and each is whole: temporary file, then rename
        with zipfile.ZipFile(p) as z:
            assert z.testzip() is None, p

    again = _generate(out, workers, limited=False)
    assert again.returncode == 0, again.stderr
    rays = out / "ray_dataset_hierarchical"
    assert (rays / "processing_summary.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteDatasetWarning)
        data = HierarchicalVoxelRayDataset(out / "dataset", rays, "train", cache_size=0)
    assert len(data) > 0
    assert layout.read_json(rays / "processing_summary.json")["processed"] == len(
        list(rays.rglob("*_rays.npz"))
    )


def test_the_error_is_named_in_the_api(tmp_path, monkeypatch) -> None:
    """In-process: the OSError of a write becomes GenerationSpaceError (errno, free bytes),
    chained to the original; other OSErrors pass through unchanged."""
    from gpuloader.format import layout as layout_mod
    from gpuloader.generate import GeneratorConfig, generate_dataset

    config = GeneratorConfig(
        shapes=["box"], resolution=8, min_resolution=4, divisions=2, samples_per_view=6, workers=1
    )
    real = layout_mod.atomic_write_bytes
    calls = {"n": 0}

    def full(path, data):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(layout_mod, "atomic_write_bytes", full)
    with pytest.raises(GenerationSpaceError) as info:
        generate_dataset(tmp_path / "a", config, progress=False)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value.free, int)
    assert isinstance(info.value.__cause__, OSError)
    assert str(info.value).startswith(f"{tmp_path / 'a'}: cannot write the dataset: [Errno 28]")

    def denied(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(layout_mod, "atomic_write_bytes", denied)
    with pytest.raises(PermissionError):
        generate_dataset(tmp_path / "b", config, progress=False)
