"""End-to-end smoke runs of ``gpuloader demo``, the examples and the benchmark suite.

Each runs as a user would (a subprocess of this interpreter) on the demo preset, generated
once per session, with small settings; the checks look at real outputs: exit codes, the
re-trace error, the JSON files, the training curves and the checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BENCHMARKS = ROOT / "benchmarks"


def run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` from the repository root; fail with its output when rc != 0."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
        f"{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo preset, generated once (a few seconds on 2 cores)."""
    from gpuloader.commands.demo import ensure_data

    out = tmp_path_factory.mktemp("demo") / "demo_data"
    ensure_data(out, "demo", progress=False)
    return out


def test_demo_command(demo_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "demo.png"
    proc = run(
        "-m",
        "gpuloader.commands.cli",
        "demo",
        "--out",
        demo_dir,
        "--epochs",
        "1",
        "--plot",
        png,
        "--num-workers",
        "0",
        "--quiet",
    )
    out = proc.stdout
    assert "back end" in out and "rays/s" in out and "samples/s" in out
    err = float(re.search(r"max error ([0-9.e+-]+) voxels", out).group(1))
    assert err < 1e-3, out
    batches = int(re.search(r"(\d+) batches", out).group(1))
    assert batches > 0
    assert png.is_file() and png.stat().st_size > 10_000


@pytest.mark.slow
def test_demo_generates_into_a_fresh_folder(tmp_path: Path) -> None:
    """The README's first command on a fresh machine: no data yet, defaults otherwise."""
    proc = run("-m", "gpuloader.commands.cli", "demo", "--out", tmp_path / "fresh", "--quiet")
    assert "OK" in proc.stdout
    assert (tmp_path / "fresh" / "ray_dataset_hierarchical" / "processing_summary.json").is_file()


def test_dataset_usage_example(demo_dir: Path) -> None:
    out = run(EXAMPLES / "dataset_usage_example.py", "--demo-dir", demo_dir).stdout
    assert "level distribution" in out
    err = float(re.search(r"max \|trace - distance\| = ([0-9.e+-]+)", out).group(1))
    assert err < 1e-3
    assert "origins (4096, 3)" in out  # rays_per_batch honoured


def test_quick_timing_test(demo_dir: Path) -> None:
    out = run(
        EXAMPLES / "quick_timing_test.py", "--demo-dir", demo_dir, "--samples", "5",
        "--fresh-runs", "1",
    ).stdout  # fmt: skip
    rows = ("dataset init, repeated", "dataset init, first in a process", "single sample")
    for row in (*rows, "DataLoader", "RayBatchSampler", "rot/flip"):
        assert row in out
    assert re.search(r"\d+\.\d\dx", out)


def test_benchmark_dataset(demo_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    run(
        EXAMPLES / "benchmark_dataset.py",
        "--demo-dir",
        demo_dir,
        "--benchmarks",
        "single",
        "batch",
        "transform",
        "memory",
        "--samples",
        "4",
        "--num-workers",
        "0",
        "--max-batches",
        "4",
        "--json",
        path,
    )
    rows = json.loads(path.read_text())["results"]
    assert {r["benchmark"] for r in rows} == {"single", "batch", "transform", "memory"}
    for r in rows:
        assert set(r) >= {"name", "gpuloader", "upstream", "unit", "ratio"}
        assert r["ratio"] > 0


@pytest.mark.slow
def test_run_benchmarks_quick(demo_dir: Path, tmp_path: Path) -> None:
    out = run(
        BENCHMARKS / "run_benchmarks.py",
        "--quick",
        "--data",
        demo_dir,
        "--preset",
        "demo",
        "--workers",
        "0",
        "--epochs",
        "1",
        "--max-batches",
        "4",
        "--out",
        tmp_path,
    ).stdout
    (json_path,) = tmp_path.glob("*.json")
    report = json.loads(json_path.read_text())
    assert set(report) >= {"timestamp", "machine", "data", "settings", "results", "summary"}
    assert json_path.with_suffix(".png").is_file()
    by_loader = {(r["loader"], r["scenario"]): r for r in report["results"]}
    for scenario in ("plain", "augment"):
        for loader in ("upstream", "cpu_api", "gpu_loader"):
            r = by_loader[(loader, scenario)]
            if loader == "gpu_loader" and "error" in r:
                continue  # reported, not hidden: the row says why
            assert r["rays_per_s"] > 0 and r["samples_per_s"] > 0, r
            assert r["ratio_rays_per_s"] > 0 and "ratio_samples_per_s" in r
        assert by_loader[("upstream", scenario)]["ratio_rays_per_s"] == pytest.approx(1.0)
    assert "ratio to the upstream baseline" in out


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dataloader", "gpu"])
def test_train_example_learns_and_resumes(demo_dir: Path, tmp_path: Path, loader: str) -> None:
    ckpt, metrics, png = tmp_path / "m.pt", tmp_path / "m.json", tmp_path / "curves.png"
    common = [
        EXAMPLES / "train_neural_rendering.py",
        "--demo-dir",
        demo_dir,
        "--loader",
        loader,
        "--batch-size",
        "4",
        "--rays-per-batch",
        "1024",
        "--max-steps",
        "8",
        "--val-batches",
        "4",
        "--num-workers",
        "0",
        "--checkpoint",
        ckpt,
        "--metrics",
        metrics,
    ]
    out = run(*common, "--epochs", "1", "--plot", png).stdout
    assert "mean baseline" in out and "level-mean baseline" in out
    m = json.loads(metrics.read_text())
    assert m["steps"] == 8
    assert m["val"][-1]["model"] < m["val_initial"]["model"]  # it learns
    assert set(m["baselines"]) == {"mean", "per_level"}
    assert ckpt.is_file() and png.is_file()

    out = run(*common, "--epochs", "2", "--resume").stdout
    assert "resumed from" in out
    m2 = json.loads(metrics.read_text())
    assert m2["steps"] == 16 and len(m2["val"]) == 2
    assert m2["train_loss"][:8] == m["train_loss"]


def test_upstream_baseline_keeps_the_upstream_behaviour(demo_dir: Path) -> None:
    """The baseline is only useful if it costs what upstream costs on the same samples."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import upstream_baseline as up
    finally:
        sys.path.remove(str(BENCHMARKS))
    from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset

    kw = {
        "dataset_dir": demo_dir / "dataset",
        "ray_dataset_dir": demo_dir / "ray_dataset_hierarchical",
        "split": "train",
    }
    base = up.UpstreamDataset(**kw, samples_per_subvolume=100, cache_size=2)
    ours = HierarchicalVoxelRayDataset(**kw)
    assert sorted((s["level"], s["hash"]) for s in base.samples) == sorted(
        (s["level"], s["hash"]) for s in ours.samples
    )
    assert base[0]["origins"].shape == (100, 3)
    for i in range(4):
        base[i]
    assert len(base._cache_order) == 2  # FIFO, bounded
    sampler = up.UpstreamRayBatchSampler(
        base, rays_per_batch=64, subvolumes_per_batch=3, group_by_level=True
    )
    full = next(b for b in sampler if len(b) == 3)
    batch = up.upstream_collate([base[i] for i in full])
    assert batch["origins"].shape[0] == 300  # rays_per_batch ignored, as upstream
    levels = {s["level"] for s in base.samples}
    assert len(levels) > 1
    mixed = [next(i for i, s in enumerate(base.samples) if s["level"] == lv) for lv in levels]
    with pytest.raises(RuntimeError):
        up.upstream_collate([base[i] for i in mixed])  # upstream crashes on mixed levels


TRAIN_SHORT = [
    "--batch-size",
    "4",
    "--rays-per-batch",
    "512",
    "--max-steps",
    "6",
    "--val-batches",
    "2",
    "--num-workers",
    "0",
]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["gpu", "dataloader"])
def test_train_example_resumes_mid_epoch_exactly(demo_dir: Path, tmp_path: Path, loader: str):
    """Cut in the second epoch (the last checkpoint two steps before), then --resume: the
    losses and validation are those of an uninterrupted run, step for step."""
    ckpt = tmp_path / "m.pt"
    common = [EXAMPLES / "train_neural_rendering.py", "--demo-dir", demo_dir, "--loader", loader,
              *TRAIN_SHORT, "--epochs", "2"]  # fmt: skip
    run(*common, "--metrics", tmp_path / "whole.json")
    out = run(*common, "--checkpoint", ckpt, "--checkpoint-every", "2", "--stop-after", "9")
    assert "stopped after 9 steps" in out.stdout
    out = run(*common, "--checkpoint", ckpt, "--resume", "--metrics", tmp_path / "cut.json")
    assert "in epoch 2, after 2 steps" in out.stdout
    whole = json.loads((tmp_path / "whole.json").read_text())
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert len(whole["train_loss"]) == 12
    assert cut["train_loss"] == whole["train_loss"]
    assert cut["val"] == whole["val"]


@pytest.mark.slow
def test_train_example_under_torchrun_with_gloo(demo_dir: Path, tmp_path: Path):
    """``torchrun --nproc_per_node 2`` on the CPU (gloo): DDP over the sharded loader, rank 0
    writes the metrics and the mid-epoch checkpoint."""
    ckpt, metrics = tmp_path / "m.pt", tmp_path / "m.json"
    out = run(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        EXAMPLES / "train_neural_rendering.py", "--demo-dir", demo_dir, "--device", "cpu",
        "--loader", "gpu", *TRAIN_SHORT, "--epochs", "1", "--checkpoint", ckpt,
        "--checkpoint-every", "2", "--metrics", metrics,
    )  # fmt: skip
    assert "DDP world size 2" in out.stdout
    assert out.stdout.count("final val MSE") == 1  # rank 0 only
    m = json.loads(metrics.read_text())
    assert m["world_size"] == 2 and m["steps"] == 6
    assert m["val"][-1]["model"] < m["val_initial"]["model"]
    import torch

    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 0 and state["history"]["train_loss"] == m["train_loss"]


@pytest.mark.parametrize("loader", ["cpu", "gpu"])
def test_benchmark_dataset_cache_figure_is_true(demo_dir: Path, loader: str) -> None:
    """The cache rows say what gpuloader's cache did: real hits on the seed API's path (every
    grid of the split fits in the largest cache), no 0% for a resident store that has no use
    for it."""
    out = run(
        EXAMPLES / "benchmark_dataset.py",
        "--demo-dir",
        demo_dir,
        "--benchmarks",
        "cache",
        "--loader",
        loader,
        "--max-batches",
        "6",
    ).stdout
    lines = [line for line in out.splitlines() if "vs upstream's hit rate" in line]
    assert len(lines) >= 3, out
    if loader == "cpu":
        hits = [int(m) for m in re.findall(r"\((\d+) hits", out)]
        assert len(hits) == len(lines) and hits[0] == 0 and hits[-1] > 0, out
    else:
        assert all("resident" in line for line in lines), out
