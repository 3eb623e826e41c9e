"""Following a damaged file's advice works: the same ``gpuloader generate`` repairs the dataset.

Issue 17, "Advice that does not work": a truncated npz made a resumed ``generate`` fail with
a traceback, and a NaN in ``distances`` was kept. Now a resumed run checks every file it
keeps (a voxel file must hold its grid; a ray file its SHA-256 recorded at write time, else
every reader's check) and rewrites what is bad, one ``rewrote FILE: why`` line each.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from gpuloader.commands import cli
from gpuloader.commands.verify import verify_dataset
from gpuloader.generate.resume import CHECKSUMS
from support.generated import TINY_GENERATE as ARGS


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of a tiny generated dataset (read-only: copy it)."""
    out = tmp_path_factory.mktemp("repair") / "out"
    assert cli.main(["generate", str(out), *ARGS]) == 0
    return out


@pytest.fixture()
def out(clean: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean, tmp_path / "out"))


def _generate(out: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Run the same generate again; its ``rewrote`` lines."""
    capsys.readouterr()
    assert cli.main(["generate", str(out), *ARGS]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return [line for line in captured.out.splitlines() if line.startswith("rewrote ")]


def _damage(out: Path) -> dict[str, Path]:
    """A truncated ray file, a NaN distance, a junk voxel file; returns them by kind."""
    ray_files = sorted((out / "ray_dataset_hierarchical").glob("level_1/*/*_rays.npz"))
    truncated, nan = ray_files[0], ray_files[1]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with np.load(nan) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["distances"][0] = np.nan
    np.savez_compressed(nan, **arrays)
    voxel = sorted((out / "dataset").glob("subvolumes/level_1/*/*.npz"))[0]
    voxel.write_bytes(b"not an npz")
    return {"truncated": truncated, "nan": nan, "voxel": voxel}


def _ok(out: Path) -> bool:
    return verify_dataset(
        out / "dataset", out / "ray_dataset_hierarchical", progress=False, fraction=0.1
    ).ok


@pytest.mark.parametrize("records", [True, False], ids=["checksums", "no-checksums"])
def test_following_the_advice_repairs(
    out: Path, records: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _damage(out)
    if not records:  # an interrupted run never saved them: every kept file gets full checks
        (out / CHECKSUMS).unlink()
    assert not _ok(out)
    lines = _generate(out, capsys)
    assert len(lines) == 3, lines
    by_file = {line.split(": ", 1)[0].removeprefix("rewrote "): line for line in lines}
    assert set(by_file) == {str(p) for p in bad.values()}
    assert "'distances' row 0: NaN or inf" in by_file[str(bad["nan"])]
    assert _ok(out)
    assert _generate(out, capsys) == []  # repaired for good: nothing more to rewrite


def test_repaired_files_are_the_originals(
    clean: Path, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _damage(out)
    _generate(out, capsys)
    for path in bad.values():  # the writer is deterministic: the bytes first written
        assert path.read_bytes() == (clean / path.relative_to(out)).read_bytes()


def test_clean_resume_rewrites_nothing(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(out.glob("**/*.npz"))
    before = {p: p.stat().st_mtime_ns for p in files}
    assert _generate(out, capsys) == []
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_changed_but_valid_ray_file_is_restored(
    clean: Path, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Valid values, other bytes: its recorded SHA-256 no longer matches, so it is rewritten."""
    path = sorted((out / "ray_dataset_hierarchical").glob("level_0/*/*_rays.npz"))[0]
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez_compressed(path, **arrays)  # numpy's bytes, not the writer's
    (line,) = _generate(out, capsys)
    assert line.startswith(f"rewrote {path}: ") and "SHA-256" in line
    assert path.read_bytes() == (clean / path.relative_to(out)).read_bytes()
