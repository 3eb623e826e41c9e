"""Command-line mistakes of issue 17: one line on stderr, a non-zero exit, no traceback.

The wrong folders given to ``verify``/``info``, ``info`` on the folder holding a dataset,
``pack --levels`` naming a level that is not there, ``generate``/``demo`` into a dataset's
own root or another config's folder, a typo in a sub-command's option, ``gpuloader`` alone,
and Ctrl-C during ``generate``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuloader.commands import cli
from support.generated import TINY_GENERATE as TINY


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of a tiny generated dataset (read-only)."""
    folder = tmp_path_factory.mktemp("mistakes") / "out"
    assert cli.main(["generate", str(folder), *TINY]) == 0
    return folder


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stderr's first line, stderr) of ``gpuloader ARGV`` run in process."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, (err.splitlines() or [""])[0], err


# ------------------------------------------------------------------ verify / info folders


@pytest.mark.parametrize("command", ["verify", "info"])
def test_swapped_roots(command: str, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds, rays = out / "dataset", out / "ray_dataset_hierarchical"
    code, line, _ = _run([command, str(rays), str(ds)], capsys)
    assert code == 2
    assert line.startswith(f"gpuloader {command}: error: DATASET_DIR {rays} looks like a ray root")
    assert line.endswith(f"they are swapped; call `gpuloader {command} {ds} {rays}`")


@pytest.mark.parametrize("command", ["verify", "info"])
@pytest.mark.parametrize("which", ["ray root twice", "dataset root twice"])
def test_a_root_given_for_the_other(
    command: str, which: str, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds, rays = out / "dataset", out / "ray_dataset_hierarchical"
    folder = rays if which == "ray root twice" else ds
    code, line, _ = _run([command, str(folder), str(folder)], capsys)
    assert code == 2
    arg, looks = ("DATASET_DIR", "a ray root") if folder == rays else ("RAY_DIR", "a dataset root")
    assert line.startswith(f"gpuloader {command}: error: {arg} {folder} looks like {looks}")
    assert line.endswith(f"call `gpuloader {command} {ds} {rays}`")


@pytest.mark.parametrize("command", ["verify", "info"])
def test_empty_folder(
    command: str, out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    rays = out / "ray_dataset_hierarchical"
    code, line, _ = _run([command, str(empty), str(rays)], capsys)
    assert code == 2
    assert line.startswith(f"gpuloader {command}: error: DATASET_DIR {empty} is an empty folder")
    assert line.endswith(f"call `gpuloader {command} {out / 'dataset'} {rays}`")


@pytest.mark.parametrize("argv", [["info", "{out}"], ["info", "{out}", "{out}"]])
def test_info_on_the_folder_holding_a_dataset(
    argv: list[str], out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line, _ = _run([a.format(out=out) for a in argv], capsys)
    assert code == 2
    ds, rays = out / "dataset", out / "ray_dataset_hierarchical"
    assert line == (
        f"gpuloader info: error: DATASET_DIR {out} is not a root but holds a dataset one level "
        f"down ({ds} and {rays}); call `gpuloader info {ds} {rays}`"
    )


def test_info_ray_dir_defaults_to_beside(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", str(out / "dataset")]) == 0
    assert str(out / "ray_dataset_hierarchical") in capsys.readouterr().out


# ------------------------------------------------------------------ pack --levels


@pytest.mark.parametrize("levels", [["9"], ["1", "9"]])
def test_pack_absent_level(
    levels: list[str], out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rays, pack = out / "ray_dataset_hierarchical", tmp_path / "pack"
    code, line, _ = _run(["pack", str(rays), str(pack), "--levels", *levels, "--quiet"], capsys)
    assert code == 2
    assert line.startswith(f"gpuloader pack: error: {rays}: no ray files at level(s) 9; ")
    assert "it has levels 0, 1" in line and "RAY_DIR" not in line
    assert not pack.exists()


# ------------------------------------------------------------------ generate / demo --out


@pytest.mark.parametrize("root", ["dataset", "ray_dataset_hierarchical"])
def test_generate_into_a_root_is_refused(
    root: str, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = out / root
    before = sorted(p.name for p in target.iterdir())
    code, line, _ = _run(["generate", str(target), *TINY], capsys)
    assert code == 2
    assert line.startswith(f"gpuloader generate: error: output folder {target} is a ")
    assert f"give {out} (the OUT of that run)" in line
    assert sorted(p.name for p in target.iterdir()) == before  # nothing nested


def test_generate_into_another_config_needs_overwrite(
    out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = Path(shutil.copytree(out, tmp_path / "out"))
    code, line, _ = _run(["generate", str(mine), *TINY, "--seed", "5"], capsys)
    assert code == 2
    assert "holds a dataset generated with a different config" in line and "--overwrite" in line
    assert _run(["generate", str(mine), *TINY, "--seed", "5", "--overwrite"], capsys)[0] == 0


@pytest.mark.parametrize("where", ["dataset root", "other config"])
def test_demo_out_refused(where: str, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = out / "dataset" if where == "dataset root" else out
    code, line, _ = _run(["demo", "--out", str(target), "--quiet"], capsys)
    assert code == 2
    if where == "dataset root":
        assert line.startswith(f"gpuloader demo: error: output folder {target} is a voxel")
    else:
        assert line.startswith(f"gpuloader demo: error: {out} holds a dataset generated with ")
        assert "give another folder (demo --out)" in line


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "argv", [["verify", "a", "b", "--fractoin", "0.1"], ["generate", "o", "--sead", "3"]]
)
def test_typo_in_an_option_shows_the_subcommand_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, line, err = _run(argv, capsys)
    assert code == 2
    assert line.startswith(f"usage: gpuloader {argv[0]} ")
    assert err.splitlines()[-1].startswith(
        f"gpuloader {argv[0]}: error: unrecognized arguments: {argv[-2]}"
    )


def test_no_command_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, line, err = _run([], capsys)
    assert code == 2
    assert line.startswith("usage: gpuloader")
    assert err.splitlines()[-1].startswith("gpuloader: error: give a COMMAND (generate, ")


# ------------------------------------------------------------------ Ctrl-C


def _terminal_sigint() -> None:
    """In the child before exec: SIGINT handled by default and not blocked."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_generate(tmp_path: Path) -> None:
    """SIGINT to the process group (as a terminal sends it) once ray files are being written."""
    folder = tmp_path / "out"
    argv = [sys.executable, "-m", "gpuloader.commands.cli", "generate", str(folder), "--quiet"]
    argv += ["--shapes", "asym", "torus", "box", "blobs", "--resolution", "32"]
    argv += ["--min-resolution", "8", "--samples-per-view", "3000", "--workers", "2"]
    # as from a terminal: SIGINT neither ignored nor blocked, whatever this test process's
    # earlier tests left (a child inherits an ignored or blocked SIGINT and never sees it)
    proc = subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_terminal_sigint
    )
    try:
        deadline = time.monotonic() + 60
        while not any((folder / "ray_dataset_hierarchical").glob("level_*/*/*_rays.npz")):
            assert proc.poll() is None and time.monotonic() < deadline, "no ray file written"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    for noise in ("Traceback", "Exception ignored", "Process ForkPoolWorker"):
        assert noise not in err
    assert err.splitlines() == [
        "gpuloader generate: interrupted; run the same command again to resume"
    ]
