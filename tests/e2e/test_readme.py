"""The README's Python snippets run as written (on the demo data, in a scratch folder)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpuloader.generate import PRESETS, generate_dataset

README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("readme")
    cfg = dataclasses.replace(PRESETS["demo"], samples_per_view=90, workers=1)
    generate_dataset(out / "demo_data", cfg, progress=False)
    return out


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("number", range(len(SNIPPETS)))
def test_snippet_runs(workdir, number):
    code = SNIPPETS[number]
    # snippets that start workers are guarded as a user's script must be
    script = workdir / f"snippet_{number}.py"
    script.write_text(code)
    res = subprocess.run(
        [sys.executable, str(script)], cwd=workdir, capture_output=True, text=True, timeout=240
    )
    assert res.returncode == 0, f"snippet {number} failed:\n{code}\n{res.stdout}\n{res.stderr}"
