"""Resource hygiene: many epochs keep the parent's RSS, processes, shared memory and file
descriptors flat, and close() gives back every worker, /dev/shm entry and descriptor.

Runs ``benchmarks/soak.py`` as a user would (a subprocess, so that the figures are of a
process holding nothing else), 20 epochs of every loader on a small generated dataset, after
one unmeasured warm-up epoch each (what a process sets up once is not a leak). The full
200-epoch figures on the demo data are in benchmarks/README.md ("Soak").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpuloader.commands.demo import data_dirs
from gpuloader.reading.pipeline import dali_available
from support import loading_helpers as _loading

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 20
RSS_BOUND_MIB = 30.0


@pytest.fixture(scope="module")
def soak_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    dataset_dir, ray_dir = _loading.generate(
        tmp_path_factory, "soak_data", ("asym", "torus", "box"), 40
    )
    folder = dataset_dir.parent
    assert data_dirs(folder) == (dataset_dir, ray_dir)
    loaders = ["host", "stream_torch", "cpu_api"]
    if dali_available():
        loaders.insert(1, "stream_dali")
    out = tmp_path_factory.mktemp("soak_out")
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "soak.py"),
            "--data",
            str(folder),
            "--epochs",
            str(EPOCHS),
            "--loaders",
            *loaders,
            "--rays-per-batch",
            "320",
            "--subvolumes-per-batch",
            "4",
            "--warmup",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    (path,) = out.glob("soak-*.json")
    assert path.with_suffix(".png").is_file()
    report = json.loads(path.read_text())
    assert [r["loader"] for r in report["results"]] == loaders
    return report


@pytest.mark.slow
def test_soak_stays_flat(soak_report: dict) -> None:
    for r in soak_report["results"]:
        name = r["loader"]
        assert r["epochs"] == EPOCHS and r["batches"] > 0, name
        growth = r["last"]["rss_mib"] - r["epoch2"]["rss_mib"]
        assert growth < RSS_BOUND_MIB, f"{name}: RSS grew {growth:.1f} MiB over {EPOCHS} epochs"
        # while it runs, the workers, shared memory and descriptors are those of epoch 1
        series = r["per_epoch"]
        for key in ("children", "shm_ours", "shm_maps", "fds"):
            assert series[key][-1] == series[key][0], f"{name}: {key} {series[key]}"
        new = {k: v for k, v in r["new_at_last_epoch"].items() if k != "shm_unattributed"}
        assert not any(new.values()), f"{name}: {new}"


@pytest.mark.slow
def test_soak_close_gives_everything_back(soak_report: dict) -> None:
    for r in soak_report["results"]:
        name = r["loader"]
        if name != "host":  # the host store reads in the fill only, not while iterating
            assert r["epoch1"]["children"] >= 2, f"{name}: no workers seen"
        # only what appeared since before the loader was built; /dev/shm entries only when
        # this process or its workers were seen mapping them (other processes' do not count)
        new = r["new_after_close"]
        for key in ("children", "shm", "shm_maps", "fds"):
            assert new[key] == [], f"{name}: {key} left after close: {new[key]}"
        assert r["closed"]["children"] <= r["before"]["children"], name
