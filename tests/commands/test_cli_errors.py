"""What a new user meets on the command line: help, version, one-line errors, closed pipes.

Each case of issue 10 ("What a new user hits") has a test here: ``gpuloader`` alone and
``--version``; ``demo``'s option errors (argparse style, exit 2, no traceback); ``verify`` on
files and on a damaged npz; ``info ... | head``; help texts without Sphinx markup; the
stale-pack message; the training example on a validation split with nothing of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpuloader.commands import cli
from support.tiny_dataset import write_tiny_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_cli"), max_level=1)


@pytest.fixture()
def tiny_copy(tiny: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    ds, rays = tiny
    return (
        Path(shutil.copytree(ds, tmp_path / "dataset")),
        Path(shutil.copytree(rays, tmp_path / "ray_dataset_hierarchical")),
    )


def _exit_code(argv: list[str]) -> int:
    """``cli.main(argv)``'s status, whether it returns it or argparse exits with it."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _one_error_line(err: str, command: str) -> str:
    """The single ``gpuloader CMD: error: ...`` line of stderr (argparse's usage may precede)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"gpuloader {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ gpuloader, --version


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    """No command is a usage error: the usage (every command named) on stderr, exit 2."""
    assert _exit_code([]) == 2
    out = capsys.readouterr().err
    assert out.startswith("usage: gpuloader")
    for name in cli.COMMANDS:
        assert name in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from gpuloader import __version__

    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gpuloader {__version__}"


# ------------------------------------------------------------------ demo's options


@pytest.mark.parametrize(
    "argv, option, accepted",
    [
        (["--device", "gpu"], "--device", "auto, cpu, cuda or cuda:N"),
        (["--rays-per-batch", "-5"], "--rays-per-batch", ">= 1"),
        (["--rays-per-batch", "0"], "--rays-per-batch", ">= 1"),
        (["--subvolumes-per-batch", "0"], "--subvolumes-per-batch", ">= 1"),
        (["--epochs", "0"], "--epochs", ">= 1"),
        (["--epochs", "two"], "--epochs", ">= 1"),
        (["--num-workers", "-1"], "--num-workers", ">= 0"),
    ],
)
def test_demo_option_errors(
    argv: list[str],
    option: str,
    accepted: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # refused while parsing: nothing is generated
    assert _exit_code(["demo", "--out", str(tmp_path / "d"), *argv]) == 2
    line = _one_error_line(capsys.readouterr().err, "demo")
    assert f"argument {option}:" in line and accepted in line
    assert not (tmp_path / "d").exists()


def test_demo_device_cuda_without_cuda(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpuloader.loading import setup

    monkeypatch.setattr(setup, "cuda_usable", lambda: False)
    for device in ("cuda", "cuda:0"):
        assert _exit_code(["demo", "--out", str(tmp_path / "d"), "--device", device]) == 2
        line = _one_error_line(capsys.readouterr().err, "demo")
        assert "argument --device:" in line and "no CUDA device" in line
        assert "use auto or cpu" in line


# ------------------------------------------------------------------ verify


def test_verify_on_files_says_not_a_folder(
    tiny: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ds, _ = tiny
    files = [str(ds / "metadata.json"), str(ds / "splits.json")]
    assert _exit_code(["verify", *files]) == 2
    line = _one_error_line(capsys.readouterr().err, "verify")
    assert "metadata.json is not a folder; check the DATASET_DIR argument" in line
    assert _exit_code(["verify", str(ds), files[1]]) == 2
    line = _one_error_line(capsys.readouterr().err, "verify")
    assert "splits.json is not a folder; check the RAY_DIR argument" in line


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated zip"])
def test_verify_damaged_npz_says_regenerate(
    damage: str, tiny_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ds, rays = tiny_copy
    bad = sorted(rays.glob("level_1/*/*_rays.npz"))[0]
    data = bad.read_bytes()
    bad.write_bytes({"garbage": b"not an npz\n", "empty": b"", "truncated zip": data[:200]}[damage])
    assert _exit_code(["verify", str(ds), str(rays), "--quiet"]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if str(bad) in line)
    assert "not a valid npz file" in line and "regenerate it" in line
    assert "pickle" not in out


# ------------------------------------------------------------------ closed pipe


class _ClosedPipe:
    """A stdout whose reader has gone away."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_stdout_exits_quietly_in_process(
    tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert cli.main(["info", *map(str, tiny)]) == 141


@pytest.mark.parametrize("command", ["info", "verify"])
def test_closed_pipe_no_traceback(command: str, tiny: tuple[Path, Path]) -> None:
    """``gpuloader info ... | head``: stdout is a pipe whose reader already closed."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "gpuloader.commands.cli", command, *map(str, tiny)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr


# ------------------------------------------------------------------ help texts


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_has_no_sphinx_markup(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gpuloader {command}")
    for markup in ("``", ":class:", ":func:", ":mod:", ":meth:", ":attr:"):
        assert markup not in out, (command, markup)


def test_plain_text_strips_roles() -> None:
    doc = """Build a :class:`~gpuloader.loading.loader.GPURayLoader` over ``--out``.

    Uses :func:`gpuloader.trace` and :mod:`gpuloader.augment`.
    """
    assert cli.plain_text(doc) == (
        "Build a GPURayLoader over --out.\n\nUses gpuloader.trace and gpuloader.augment."
    )


# ------------------------------------------------------------------ stale pack


def test_stale_pack_message(tiny_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]):
    from gpuloader.stores.pack import PackedRayStore, StalePackError, pack_rays

    _, rays = tiny_copy
    pack = rays.parent / "pack"
    pack_rays(rays, pack, progress=False, workers=1)
    f = sorted(rays.glob("level_1/*/*_rays.npz"))[0]
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    rebuild = f"gpuloader pack {rays} {pack} --force"

    with pytest.raises(StalePackError) as err:
        PackedRayStore(pack)
    msg = str(err.value)
    assert msg.count(rebuild) == 1 and "check='none'" not in msg

    assert _exit_code(["pack", str(rays), str(pack), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err, "pack")
    assert line.count(rebuild) == 1 and "check='none'" not in line


# ------------------------------------------------------------------ training example


def _train(ds: Path, rays: Path) -> subprocess.CompletedProcess:
    argv = [ROOT / "examples" / "train_neural_rendering.py", "--dataset-dir", ds]
    argv += ["--ray-dataset-dir", rays, "--epochs", "1", "--max-steps", "1", "--num-workers", "0"]
    return subprocess.run(
        [sys.executable, *map(str, argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, MPLBACKEND="Agg"),
    )


def _move_val_to_train(ds: Path) -> None:
    """What 1 or 2 objects give: every object in train, val holds only shared empty blocks."""
    doc = json.loads((ds / "splits.json").read_text())
    doc["object_splits"] = {k: "train" for k in doc["object_splits"]}
    doc["hash_object_usage"] = {
        h: {o: "train" for o in users} for h, users in doc["hash_object_usage"].items()
    }
    (ds / "splits.json").write_text(json.dumps(doc))


def test_training_refuses_a_validation_split_of_nothing(tiny_copy: tuple[Path, Path]) -> None:
    ds, rays = tiny_copy
    _move_val_to_train(ds)
    proc = _train(ds, rays)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: the validation split of {ds} has nothing to evaluate on")
    assert "gpuloader generate" in err and "include_empty" not in err
    assert "data: train" not in proc.stdout  # refused before any loader starts
