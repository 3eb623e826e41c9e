"""The "unreadable file" case (a ray file with mode 0) as a user permissions apply to (issue 8).

tests/test_damaged.py skips that case as root, who may read any file. Here, as root, a copy of
the tiny dataset goes to a world-readable folder (folders 0755, files 0644), one train
sample's ray file gets mode 0, and the checks run in a forked child that drops to an
unprivileged uid/gid (``nobody``) before touching the data; as any other user they run in
this process. A fork, not a new interpreter: the interpreter may live under a home only root
may enter (``/root/.pyenv`` here), and the child needs nothing from disk but the dataset once
the parent has run the same code paths on the clean copy (lazy imports done).

Checks: the dataset with ``on_error='raise'`` raises :class:`UnreadableFileError` whose first
line names the file and says "permission denied" (not "damaged"); ``verify`` reports the file
as permission denied, not damaged; ``on_error='skip'`` replaces the sample and records the
file in ``dataset.errors``; ``pack_rays`` raises naming the file.
"""

from __future__ import annotations

import multiprocessing
import os
import pwd
import shutil
import stat
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

import gpuloader
from gpuloader.commands.verify import verify_dataset
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset, SkippedFileWarning
from gpuloader.errors import DamagedFileError, UnreadableFileError
from gpuloader.stores.pack import pack_rays

ROOT = os.geteuid() == 0
CHILD_TIMEOUT_S = 300


class Case(NamedTuple):
    """A copy of the tiny dataset with one train sample's ray file at mode 0."""

    ds: Path
    rays: Path
    bad: Path  # the mode-0 ray file
    key: tuple[int, str]  # its sample's (level, hash)
    out: Path  # a folder the checks may write (the pack)
    indexed_skip: HierarchicalVoxelRayDataset  # on_error='skip', indexed while readable


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0]


def _index(dataset: HierarchicalVoxelRayDataset, key: tuple[int, str]) -> int:
    return [(s["level"], s["hash"]) for s in dataset.samples].index(key)


def _run_checks(case: Case) -> None:
    """Every check of the module on a dataset whose ray file ``case.bad`` cannot be read."""
    ds, rays, bad, key, out = case.ds, case.rays, case.bad, case.key, case.out
    # raise: a named error, first line = the file + "permission denied", never "damaged"
    try:
        dataset = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0)
        with pytest.raises(UnreadableFileError) as err:
            dataset[_index(dataset, key)]
        exc: BaseException = err.value
    except UnreadableFileError as built:  # the index build may read the file already
        exc = built
    line = _first_line(exc)
    assert str(bad) in line and "permission denied" in line, line
    assert "damaged" not in line, line

    # verify: the file is reported, as permission denied, not as damage
    report = verify_dataset(ds, rays, fraction=0.05, progress=False)
    msgs = [p.message for p in report.problems if p.file == str(bad)]
    assert msgs, report.format()
    assert any("permission denied" in m for m in msgs), msgs
    assert not any("damaged" in m for m in msgs), msgs

    # skip, file unreadable when the index is built: left out of the index, recorded
    with pytest.warns(SkippedFileWarning, match=str(bad)):
        dataset = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0, on_error="skip")
    assert key not in [(s["level"], s["hash"]) for s in dataset.samples]
    assert [f for f, _ in dataset.errors] == [str(bad)], dataset.errors
    assert "permission denied" in dataset.errors[0][1], dataset.errors

    # skip, file unreadable after the index was built: the sample is replaced, recorded
    dataset = case.indexed_skip
    i = _index(dataset, key)
    with pytest.warns(SkippedFileWarning, match=str(bad)):
        got = [dataset[j] for j in range(len(dataset))]
    assert [f for f, _ in dataset.errors] == [str(bad)], dataset.errors
    assert "permission denied" in dataset.errors[0][1], dataset.errors
    assert dataset.skipped == 1
    assert got[i]["skipped_from"] == i and str(bad) in got[i]["skip_error"]
    assert "permission denied" in got[i]["skip_error"]
    assert (got[i]["level"], got[i]["hash"]) != key
    assert all("skipped_from" not in s for j, s in enumerate(got) if j != i)

    # pack: refuses, naming the file, and leaves no pack behind
    with pytest.raises(DamagedFileError) as err:
        pack_rays(rays, out / "pack", progress=False, workers=1)
    line = _first_line(err.value)
    assert isinstance(err.value, UnreadableFileError) and str(bad) in line, line
    assert not (out / "pack").exists()


def _warm_up(ds: Path, rays: Path, key: tuple[int, str], out: Path) -> None:
    """Run the checked code paths on the clean copy (as root) so the child imports nothing."""
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0)
    dataset[_index(dataset, key)]
    verify_dataset(ds, rays, fraction=0.05, progress=False)
    pack_rays(rays, out / "warm_pack", progress=False, workers=1)
    shutil.rmtree(out / "warm_pack")


def _world_readable_tmp() -> Path:
    """A temp folder every user can enter (every ancestor searchable by others)."""
    for base in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        p = Path(base).resolve()
        if p.is_dir() and all(a.stat().st_mode & stat.S_IXOTH for a in (p, *p.parents)):
            work = Path(tempfile.mkdtemp(prefix="gpuloader-unreadable-", dir=p))
            work.chmod(0o755)
            return work
    pytest.skip("no temp folder that an unprivileged user can enter")


def _open_up(root: Path) -> None:
    """Folders 0755, files 0644 under ``root``."""
    root.chmod(0o755)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o755)
        for name in files:
            os.chmod(os.path.join(d, name), 0o644)


def _can_read(path: Path) -> bool:
    try:
        open(path, "rb").close()
    except PermissionError:
        return False
    return True


def _unprivileged() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def _child(conn, uid: int, gid: int, home: str, case: Case) -> None:
    """Drop to ``uid``/``gid`` (HOME, TMPDIR and caches in ``home``), then run the checks.

    Sends ``(status, text)``: ``ok``, ``skip`` (with the reason) or ``fail`` (a traceback).
    """
    try:
        for var in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR", "TORCH_HOME"):
            os.environ[var] = home
        tempfile.tempdir = None
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        conn.send(("skip", f"cannot drop privileges to uid {uid} / gid {gid}: {exc}"))
        return
    try:
        if os.geteuid() == 0 or os.getuid() != uid:
            conn.send(("skip", f"still uid {os.getuid()} / euid {os.geteuid()} after setuid"))
            return
        pkg = Path(gpuloader.__file__).parent
        if not all(os.access(p, os.R_OK | os.X_OK) for p in (pkg, *pkg.parents)):
            conn.send(("skip", f"{pkg} is not readable by uid {uid}; not changing its modes"))
            return
        if _can_read(case.bad):
            conn.send(("skip", f"uid {uid} can still read a mode-0 file (capabilities?)"))
            return
        _run_checks(case)
    except BaseException:  # noqa: BLE001 - reported to the parent
        conn.send(("fail", traceback.format_exc()))
    else:
        conn.send(("ok", ""))
    finally:
        conn.close()


def _as_unprivileged_user(case: Case, work: Path) -> None:
    """Run :func:`_run_checks` in a forked child that drops to ``nobody``; report its result."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork start method: cannot drop privileges in a child process")
    uid, gid = _unprivileged()
    home = work / "home"
    home.mkdir(mode=0o700)
    os.chown(home, uid, gid)
    os.chown(case.out, uid, gid)
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, uid, gid, str(home), case))
    proc.start()
    send.close()
    try:
        if not recv.poll(CHILD_TIMEOUT_S):
            pytest.fail(f"the unprivileged child sent nothing in {CHILD_TIMEOUT_S} s")
        status, text = recv.recv()
    except EOFError:
        proc.join(10)
        pytest.fail(f"the unprivileged child died (exit code {proc.exitcode})")
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status == "skip":
        pytest.skip(text)
    if status == "fail":
        pytest.fail(f"in the child as uid {uid}:\n{text}", pytrace=False)


@pytest.fixture
def unreadable_copy(tiny_dataset, tmp_path) -> Iterator[tuple[Case, Path]]:
    """(the case, the work folder holding it).

    As root the copy is in a world-readable temp folder and the code paths have run once
    on it (clean) before the file loses its permissions.
    """
    src_ds, src_rays = tiny_dataset
    work = _world_readable_tmp() if ROOT else tmp_path
    try:
        ds = Path(shutil.copytree(src_ds, work / "dataset"))
        rays = Path(shutil.copytree(src_rays, work / "ray_dataset_hierarchical"))
        _open_up(ds)
        _open_up(rays)
        out = work / "out"
        out.mkdir(mode=0o755)
        clean = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0)
        victim = clean.samples[-1]  # a train sample (level 1)
        key = (victim["level"], victim["hash"])
        if ROOT:
            _warm_up(ds, rays, key, out)
        skip = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0, on_error="skip")
        bad = Path(victim["ray_path"])
        os.chmod(bad, 0)
        yield Case(ds, rays, bad, key, out, skip), work
        os.chmod(bad, 0o644)
    finally:
        if ROOT:
            shutil.rmtree(work, ignore_errors=True)


def test_unreadable_ray_file_is_permission_denied(unreadable_copy) -> None:
    case, work = unreadable_copy
    if ROOT:
        _as_unprivileged_user(case, work)
        return
    if _can_read(case.bad):
        pytest.skip("this user can read a mode-0 file (capabilities?)")
    _run_checks(case)
