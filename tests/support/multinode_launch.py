"""Launching two nodes on one machine (two ``torchrun`` launches, ``--nnodes 2``, c10d
rendezvous on 127.0.0.1) of tests/support/multinode_worker.py, and checking their ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset

WORKER = Path(__file__).resolve().parent / "multinode_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(
    dataset: Path, pack: str, out: Path, *extra: str, nodes: int = 2, env: dict | None = None
) -> list[dict]:
    """``nodes`` torchrun launches of one rank each, run together; their rank files."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                str(nodes),
                "--node-rank",
                str(r),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "gpuloader-test",
                "--max-restarts",
                "0",
                str(WORKER),
                str(dataset),
                pack,
                str(out),
                *extra,
            ],
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(nodes)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nodes)]


def check_ranks_cover_the_split(dataset: HierarchicalVoxelRayDataset, results: list[dict]) -> None:
    """Every epoch: the ranks' samples are disjoint and together every train sample."""
    want = {(s["level"], s["hash"]) for s in dataset.samples}
    for epoch in results[0]["batches"]:
        owned = [
            {tuple(x) for b in res["batches"][epoch] for x in b} for res in results
        ]  # fmt: skip
        assert all(owned), "a rank read nothing"
        for a in range(len(owned)):
            for b in range(a + 1, len(owned)):
                assert not owned[a] & owned[b], f"ranks {a} and {b} share samples"
        assert set().union(*owned) == want
        counts = {len(res["batches"][epoch]) for res in results}
        assert len(counts) == 1, f"ranks yield different batch counts {counts}"
