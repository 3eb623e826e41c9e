"""``gpuloader generate``: options, presets, exit codes and messages."""

from __future__ import annotations

import argparse

import pytest

from gpuloader.commands import generate as command
from gpuloader.format import layout


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


def cli_main(argv: list[str]) -> int:
    from gpuloader.commands import cli

    return cli.main(argv)


def test_preset_with_overrides():
    cfg = command.config_from_args(parse("o", "--preset", "demo", "--seed", "7", "--adaptive"))
    assert cfg.resolution == 32 and cfg.seed == 7 and cfg.adaptive
    assert "asym" in cfg.shapes
    cfg = command.config_from_args(parse("o", "--preset", "bench", "--shapes", "box", "sphere"))
    assert cfg.shapes == ["box", "sphere"] and cfg.num_shape_objects() == 2
    assert cfg.resolution == 64


def test_mesh_only_config(tmp_path):
    cfg = command.config_from_args(parse("o", "--mesh", "a.stl"))
    assert cfg.shapes == [] and cfg.meshes == ["a.stl"]


def test_cli_generates_small_dataset(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", str(out), "--shapes", "asym", "--resolution", "8", "--min-resolution"]
    argv += ["4", "--divisions", "2", "--samples-per-view", "6", "--workers", "1", "--quiet"]
    assert cli_main(argv) == 0
    assert "ray files" in capsys.readouterr().out
    assert layout.ray_path(out / "ray_dataset_hierarchical", 0, "0000").exists()
    assert cli_main(argv) == 0  # same config again: resume, nothing to do
    assert "resumed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shapes", "sphere", "--resolution", "48"], "power of two"),
        (["--preset", "demo", "--resolution", "16", "--min-resolution", "32"], "min-resolution"),
        (["--shapes", "box", "--split", "0.5", "0.5", "0.5"], "sum to 1"),
        (["--shapes", "box", "--split", "1.5", "-0.25", "-0.25"], ">= 0"),
        (["--shapes", "sphere", "--num-objects", "0"], "--num-objects must be >= 1"),
        (["--shapes", "sphere", "--num-objects", "-2"], "--num-objects must be >= 1"),
        (["--shapes", "sphere", "--adaptive", "--min-samples-per-view", "1"], "min-samples"),
        (["--shapes", "sphere", "blob9"], "unknown shape"),
        (["--mesh", "/does/not/exist.stl"], "does not exist"),
    ],
)
def test_cli_bad_arguments_exit_nonzero_with_message(tmp_path, capsys, args, message):
    rc = cli_main(["generate", str(tmp_path / "out"), "--quiet", *args])
    assert rc != 0
    assert message in capsys.readouterr().err


def test_cli_bad_mesh_file(tmp_path, capsys):
    bad = tmp_path / "broken.stl"
    bad.write_bytes(b"\x00\x01 not a mesh")
    rc = cli_main(["generate", str(tmp_path / "out"), "--mesh", str(bad), "--quiet"])
    assert rc != 0
    err = capsys.readouterr().err
    assert str(bad) in err


def test_cli_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = cli_main(["generate", str(blocker / "out"), "--preset", "demo", "--quiet"])
    assert rc != 0
    assert "output folder" in capsys.readouterr().err


def test_cli_requires_what_to_generate(tmp_path, capsys):
    """No --preset/--shapes/--mesh: a one-line error naming them, and nothing is written."""
    out = tmp_path / "out"
    assert cli_main(["generate", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--preset" in err and "--shapes" in err and "--mesh" in err
    assert not out.exists()


def test_cli_num_objects_zero_names_the_option(tmp_path, capsys):
    rc = cli_main(["generate", str(tmp_path / "o"), "--shapes", "sphere", "--num-objects", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--num-objects" in err and "got 0" in err
    assert "give --shapes" not in err


def test_cli_min_samples_per_view(tmp_path):
    cfg = command.config_from_args(parse("o", "--shapes", "box", "--min-samples-per-view", "50"))
    assert cfg.min_samples_per_view == 50
    assert command.config_from_args(parse("o", "--shapes", "box")).min_samples_per_view == 100


def test_cli_warns_about_empty_splits(tmp_path, capsys):
    argv = ["generate", str(tmp_path / "o"), "--shapes", "asym", "torus", "--resolution", "8"]
    argv += ["--divisions", "2", "--samples-per-view", "6", "--workers", "1", "--quiet"]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: split 'val' is empty" in err and "warning: split 'test' is empty" in err
    assert "2 object(s) cannot fill 3 splits" in err


def test_cli_three_objects_no_warning(tmp_path, capsys):
    argv = ["generate", str(tmp_path / "o"), "--shapes", "asym", "torus", "box"]
    argv += ["--resolution", "8", "--divisions", "2", "--samples-per-view", "6", "--quiet"]
    argv += ["--workers", "1", "--split", "0.9", "0.05", "0.05"]
    assert cli_main(argv) == 0
    assert "warning" not in capsys.readouterr().err


def test_shipped_mesh_generates(tmp_path):
    """The README's ``--mesh examples/meshes/vase.stl`` names a file the project ships."""
    from pathlib import Path

    from gpuloader.generate.meshes import voxelize_file

    root = Path(__file__).resolve().parents[2]
    mesh = root / "examples" / "meshes" / "vase.stl"
    assert "--mesh examples/meshes/vase.stl" in (root / "README.md").read_text()
    grid, info = voxelize_file(mesh, 16)
    assert grid.shape == (16, 16, 16) and 0.1 < grid.mean() < 0.9
    # bent off its axis: no quarter turn about the vertical axis maps it onto itself
    assert not (grid == grid.transpose(0, 2, 1)[:, ::-1, :]).all()
    out = tmp_path / "mesh_data"
    argv = [
        "generate",
        str(out),
        "--mesh",
        str(mesh),
        "--resolution",
        "8",
        "--min-resolution",
        "4",
        "--divisions",
        "2",
        "--samples-per-view",
        "20",
        "--split",
        "1",
        "0",
        "0",
        "--workers",
        "1",
    ]
    assert cli_main(argv) == 0
    assert any((out / "ray_dataset_hierarchical").rglob("*_rays.npz"))
