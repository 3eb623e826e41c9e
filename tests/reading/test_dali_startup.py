"""DALI reader workers that fail while their pool starts (issue 18, item 1b).

A worker SIGKILLed 0-1.0 s after it was started, or stopped (SIGSTOP) so that the pool never
comes up, or failing on its own (a script run from stdin, whose main module a spawned worker
cannot import): the loader raises ``WorkerError`` naming the worker and what happened,
within ``worker_timeout``, never DALI's ``BrokenPipeError`` / ``RuntimeError: Workers
initialization failed``, and never hangs; no worker is left behind, and iterating again
starts a pool that serves the whole epoch.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gpuloader import GPURayLoader, PackedRayStore, pack_rays
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import WorkerError
from gpuloader.reading.pipeline import dali_available
from support.processes import alarm, children

pytestmark = pytest.mark.skipif(not dali_available(), reason="no DALI")

RAYS, SPB = 64, 2
HANG = 4.0  # worker_timeout of the stopped-worker case


@pytest.fixture(scope="module")
def datasets(tiny_dataset, tmp_path_factory):
    ds_dir, rays = tiny_dataset
    pack = tmp_path_factory.mktemp("startup") / "pack"
    pack_rays(rays, pack, progress=False)
    return {
        "dali": HierarchicalVoxelRayDataset(ds_dir, rays, "train", cache_size=0),
        "pack-dali": HierarchicalVoxelRayDataset(
            ds_dir, rays, "train", cache_size=0, ray_store=PackedRayStore(pack)
        ),
    }


def _loader(ds, timeout: float) -> GPURayLoader:
    return GPURayLoader(
        ds, RAYS, SPB, device="cpu", store="stream", backend="dali", num_workers=2,
        prefetch=1, shuffle=False, worker_timeout=timeout,
    )  # fmt: skip


def _strike(sig: int, delay: float, struck: list[int]) -> threading.Thread:
    """A thread that sends ``sig`` to the first worker process started after it, ``delay``
    seconds after that worker appeared (its pid appended to ``struck``)."""
    before = set(multiprocessing.process._children)

    def watch() -> None:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            new = [p for p in list(multiprocessing.process._children) if p not in before]
            new = [p for p in new if p.pid is not None]
            if new:
                time.sleep(delay)
                struck.append(new[0].pid)
                try:
                    os.kill(new[0].pid, sig)
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.001)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


CASES = [
    pytest.param(signal.SIGKILL, 0.0, "killed by signal 9", id="kill-at-once"),
    pytest.param(signal.SIGKILL, 0.15, "killed by signal 9", id="kill-at-0.15s"),
    # a spawn start takes about 2 s on 2 cores (the worker imports torch): these land while
    # the workers import, after the pool's pipes and shared memory are set up
    pytest.param(signal.SIGKILL, 0.5, "killed by signal 9", id="kill-at-0.5s"),
    pytest.param(signal.SIGKILL, 1.0, "killed by signal 9", id="kill-at-1.0s"),
    pytest.param(signal.SIGSTOP, 0.05, "is stopped", id="stopped"),
]


@pytest.mark.parametrize("path", ["dali", "pack-dali"])
@pytest.mark.parametrize("sig, delay, says", CASES)
def test_worker_lost_while_the_pool_starts(datasets, path, sig, delay, says) -> None:
    ds = datasets[path]
    with alarm(90):
        before = children()
        with _loader(ds, HANG) as ld:
            want = len(ld)
            struck: list[int] = []
            watcher = _strike(sig, delay, struck)
            start = time.monotonic()
            with pytest.raises(WorkerError) as info:
                for _ in ld:
                    pass
            took = time.monotonic() - start
            watcher.join(5)
            first = str(info.value).splitlines()[0]
            assert says in first, first
            assert str(struck[0]) in first
            if sig == signal.SIGSTOP:
                assert "did not start" in str(info.value)
                assert took < HANG + 8
            else:
                assert "while its pool started" in first
                assert took < HANG  # at once, not after the timeout
            assert not (children() - before)  # the pool is gone
            assert len(list(ld)) == want  # a fresh pool serves the whole epoch
        assert not (children() - before)


def test_worker_that_cannot_import_the_main_module(tiny_dataset, tmp_path) -> None:
    """A script read from stdin: spawned workers exit with code 1 at once; one line names
    the worker, a note says how to run the loader."""
    ds_dir, rays = tiny_dataset
    script = f"""
import sys
from gpuloader import GPURayLoader, HierarchicalVoxelRayDataset
from gpuloader.errors import WorkerError
ds = HierarchicalVoxelRayDataset({str(ds_dir)!r}, {str(rays)!r}, "train", cache_size=0)
ld = GPURayLoader(ds, 64, 2, device="cpu", store="stream", backend="dali", num_workers=2,
                  worker_timeout=30)
try:
    next(iter(ld))
except WorkerError as exc:
    print("WORKER_ERROR", str(exc).splitlines()[0])
    print("NOTE", " ".join(getattr(exc, "__notes__", [])))
finally:
    ld.close()
"""
    got = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120,
        cwd=Path(tmp_path), check=False,
    )  # fmt: skip
    lines = {ln.split(" ", 1)[0]: ln for ln in got.stdout.splitlines() if " " in ln}
    assert "WORKER_ERROR" in lines, got.stdout + got.stderr
    assert "died while its pool started (exited with code 1)" in lines["WORKER_ERROR"]
    assert "if __name__ == '__main__':" in lines["NOTE"]
    assert "Workers initialization failed" not in got.stdout
