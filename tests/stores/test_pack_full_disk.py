"""``gpuloader pack`` onto a full disk (issue 18, item 1c): refused up front when the estimate
exceeds the free space; a failed write (ENOSPC) removes the partial pack and raises one
named error, with 1 or 2 workers, without hanging; stale temporary folders of dead runs are
removed; a voxel file linked out of the voxel root is refused (striped)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
from collections import namedtuple
from pathlib import Path

import pytest

from gpuloader.commands.cli import main
from gpuloader.errors import OutsideRootError, PackSpaceError
from gpuloader.stores.pack import build_steps, pack_rays

Usage = namedtuple("Usage", "total used free")


def _left(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_refused_before_writing_when_space_is_short(tiny_dataset, tmp_path, monkeypatch, capsys):
    _, rays = tiny_dataset
    out = tmp_path / "pack"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10_000, 9_000, 1_000))
    with pytest.raises(PackSpaceError) as info:
        pack_rays(rays, out, progress=False, workers=1)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{out}: not enough free space for the pack: it needs about ")
    assert "1,000 bytes" in first and info.value.free == 1000 and info.value.needed > 1000
    assert not out.exists() and _left(out) == []
    assert main(["pack", str(rays), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpuloader pack: error: ")


@pytest.mark.parametrize("workers", [1, 2])
def test_write_failure_removes_the_partial_pack(tiny_dataset, tmp_path, monkeypatch, workers):
    _, rays = tiny_dataset
    out = tmp_path / "pack"
    real = build_steps.pwrite_all
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:  # a few writes succeed, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data, offset)

    monkeypatch.setattr(build_steps, "pwrite_all", full)
    for mod in ("rows_build", "striped_build"):
        monkeypatch.setattr(f"gpuloader.stores.pack.{mod}.pwrite_all", full)
    monkeypatch.setattr(build_steps, "POLL_S", 0.05)

    def hung(*_):
        raise TimeoutError("pack_rays hung on a failed write")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)  # no hang: the failed write ends the build
    try:
        with pytest.raises(PackSpaceError) as info:
            pack_rays(rays, out, progress=False, workers=workers)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{out}: cannot write the pack: [Errno {errno.ENOSPC}] ")
    assert info.value.errno == errno.ENOSPC and info.value.folder == str(out)
    assert not out.exists() and _left(out) == []


def test_real_write_failure_under_rlimit_fsize(tiny_dataset, tmp_path):
    """RLIMIT_FSIZE (SIGXFSZ ignored): the OS refuses the writes (EFBIG), in a subprocess."""
    import subprocess
    import sys

    _, rays = tiny_dataset
    out = tmp_path / "pack"
    code = f"""
import resource, signal, sys
from gpuloader.errors import PackSpaceError
from gpuloader.stores.pack import pack_rays
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
for w in (2,):
    try:
        pack_rays({str(rays)!r}, {str(out)!r}, progress=False, workers=w)
    except PackSpaceError as exc:
        print(str(exc).splitlines()[0])
"""
    got = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    lines = got.stdout.strip().splitlines()
    assert len(lines) == 1, got.stderr
    assert all(line.startswith(f"{out}: cannot write the pack: [Errno 27]") for line in lines)
    assert not out.exists() and _left(out) == []


def test_stale_tmp_folders_of_dead_runs_are_removed(tiny_dataset, tmp_path):
    _, rays = tiny_dataset
    out = tmp_path / "pack"
    dead = tmp_path / f".pack.tmp-{2**22 + 12345}-0123456789ab"  # no such pid
    (dead / "level_0").mkdir(parents=True)
    alive = tmp_path / f".pack.tmp-{os.getpid()}-0123456789ab"
    alive.mkdir()
    legacy = tmp_path / ".pack.tmp-0123456789ab"  # an older run's name: no pid known
    legacy.mkdir()
    pack_rays(rays, out, progress=False, workers=1)
    assert not dead.exists() and alive.exists() and legacy.exists()
    assert not (out / build_steps.OWNER).exists()


def test_striped_voxel_file_linked_outside_is_refused(tiny_copy, tmp_path):
    ds, rays = tiny_copy
    vfile = next((ds / "objects").rglob("level_0.npz"))
    outside = tmp_path / "outside.npz"
    shutil.move(vfile, outside)
    vfile.symlink_to(outside)
    with pytest.raises(OutsideRootError) as info:
        pack_rays(
            rays,
            tmp_path / "pack",
            progress=False,
            workers=1,
            layout="striped",
            stripe_rays=8,
            dataset_dir=ds,
        )
    assert str(info.value).startswith(f"{vfile}: resolves to {outside}")
