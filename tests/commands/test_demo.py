"""Helpers of the demo command that training scripts use too."""

from __future__ import annotations


def test_set_torch_threads_leaves_the_workers_their_cores(monkeypatch):
    """``gpuloader.set_torch_threads``: cores minus workers (at least 1); OMP_NUM_THREADS wins."""
    import torch

    import gpuloader

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert gpuloader.set_torch_threads(workers=1, cores=3) == 2
        assert gpuloader.set_torch_threads(workers=4, cores=2) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(2)
        assert gpuloader.set_torch_threads(workers=0, cores=8) == 2  # the user's choice kept
    finally:
        torch.set_num_threads(before)
