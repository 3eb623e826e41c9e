"""The training example's checkpoints: read with ``weights_only=True``, so a crafted pickle
is refused before any of its code runs, while the example's own checkpoints load back."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_neural_rendering.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_neural_rendering_ckpt", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


class _Payload:
    """Unpickling this creates ``marker`` (what a hostile checkpoint's code could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _crafted(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "model.pt"
    torch.save({"model": {}, "optimizer": _Payload(marker), "epoch": 0}, ckpt)
    return ckpt, marker


def test_crafted_checkpoint_runs_code_when_fully_unpickled(tmp_path: Path) -> None:
    """Control: the crafted file is hostile (the old weights_only=False load ran it)."""
    ckpt, marker = _crafted(tmp_path)
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_crafted_checkpoint_is_refused_without_running_code(example, tmp_path: Path) -> None:
    ckpt, marker = _crafted(tmp_path)
    with pytest.raises(SystemExit) as info:
        example.load_checkpoint(ckpt, "cpu")
    assert not marker.exists()
    message = str(info.value.code)
    assert message.startswith(f"error: {ckpt}: not a checkpoint that can be loaded safely")
    assert "weights_only=True" in message and "nothing in it was run" in message


def test_resume_with_crafted_checkpoint_exits_with_the_error(example, tmp_path, monkeypatch):
    """``--resume`` reaches the safe load (data set-up stubbed out: no data, no training)."""
    ckpt, marker = _crafted(tmp_path)

    class _NoData:
        def __init__(self, *args, **kwargs) -> None:
            self.dataset = None

    monkeypatch.setattr(example, "check_validation_split", lambda args: 1)
    monkeypatch.setattr(example, "Batches", _NoData)
    monkeypatch.setattr(example, "level_means", lambda ds: {"mean": 0.0, "per_level": {0: 0.0}})
    with pytest.raises(SystemExit) as info:
        example.main(["--checkpoint", str(ckpt), "--resume", "--device", "cpu"])
    assert not marker.exists()
    assert str(info.value.code).startswith(f"error: {ckpt}: not a checkpoint that can be loaded")


def test_own_checkpoint_round_trips(example, tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.ones(4, 3)).sum().backward()
    opt.step()
    state = {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 1,
        "position": {"epoch": 2, "step": 3, "loader": {"seed": 7, "split": "train"}},
        "epoch_losses": [np.float64(0.5), 0.25],
        "history": {"train_loss": [1.0], "val": [{"model": np.float32(0.5), "rays": 4}]},
        "baselines": {"mean": 0.1, "per_level": {0: 0.2, 1: 0.3}},
        "args": {"dataset_dir": Path("data"), "levels": None, "lr": 1e-3},
    }
    path = tmp_path / "runs" / "model.pt"
    example.save_checkpoint(path, state)
    back = example.load_checkpoint(path, "cpu")
    assert back["epoch"] == 1 and back["position"] == state["position"]
    assert back["epoch_losses"] == [0.5, 0.25] and back["history"]["val"][0]["model"] == 0.5
    assert back["baselines"]["per_level"] == {0: 0.2, 1: 0.3}
    assert back["args"]["dataset_dir"] == "data"
    assert torch.equal(back["model"]["weight"], net.state_dict()["weight"])
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])  # loads as a real optimizer state
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_checkpoint_without_the_keys_is_refused(example, tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(SystemExit, match="not a checkpoint of this script"):
        example.load_checkpoint(path, "cpu")
