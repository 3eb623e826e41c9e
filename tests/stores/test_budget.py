"""Host-memory budgets under a cgroup limit (``gpuloader.stores.budget``).

* :func:`cgroup_memory_available` on fake cgroup v1 and v2 trees: nested v2 cgroups (the
  tightest ancestor binds), ``"max"``, ``memory.high``, v1's "no limit" value, reclaimable
  file cache added back, unreadable files, no cgroup at all;
* :func:`host_memory_available` is the smaller of ``MemAvailable`` and the cgroup's allowance;
* ``choose_store`` streams instead of filling host RAM under a tight limit, and names it;
* one run in a real cgroup (v2, or v1 where the memory controller lives there) where root may
  create one; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from gpuloader.stores import budget
from gpuloader.stores.budget import (
    cgroup_memory_available,
    choose_store,
    host_memory_available,
)

MiB, GiB = 1 << 20, 1 << 30
V1_NO_LIMIT = "9223372036854771712"


def write_tree(root: Path, files: dict[str, str | None]) -> Path:
    """Files under ``root`` (relative path -> text; None: a directory in the file's place)."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            path.mkdir()
        else:
            path.write_text(text)
    return root


def fake(tmp_path: Path, cgroup: str, files: dict[str, str | None]) -> tuple[str, str]:
    """(root, proc_self) of a fake cgroup tree whose ``/proc/self/cgroup`` reads ``cgroup``."""
    root = write_tree(tmp_path / "sys_fs_cgroup", files)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(cgroup)
    return str(root), str(proc)


# -- cgroup v2 ---------------------------------------------------------------------------------


def test_v2_nested_the_tighter_parent_binds(tmp_path):
    root, proc = fake(
        tmp_path,
        "0::/job/step\n",
        {
            "cgroup.controllers": "cpu memory\n",
            "job/memory.max": f"{600 * MiB}\n",
            "job/memory.current": f"{100 * MiB}\n",
            "job/step/memory.max": f"{2 * GiB}\n",
            "job/step/memory.current": f"{80 * MiB}\n",
        },
    )
    assert cgroup_memory_available(root, proc) == 500 * MiB


def test_v2_own_limit_binds_and_inactive_file_is_added_back(tmp_path):
    root, proc = fake(
        tmp_path,
        "0::/job/step\n",
        {
            "cgroup.controllers": "memory\n",
            "job/memory.max": "max\n",
            "job/memory.current": f"{900 * MiB}\n",
            "job/step/memory.max": f"{1000 * MiB}\n",
            "job/step/memory.current": f"{800 * MiB}\n",
            "job/step/memory.stat": f"anon {500 * MiB}\nfile {300 * MiB}\n"
            f"active_file {100 * MiB}\ninactive_file {200 * MiB}\n",
        },
    )
    # 1000 - (800 - 200): the inactive file cache is reclaimable, the active part counts
    assert cgroup_memory_available(root, proc) == 400 * MiB


def test_v2_max_everywhere_is_no_limit(tmp_path):
    root, proc = fake(
        tmp_path,
        "0::/a/b\n",
        {
            "cgroup.controllers": "memory\n",
            "a/memory.max": "max\n",
            "a/memory.current": "123\n",
            "a/b/memory.max": "max\n",
            "a/b/memory.high": "max\n",
            "a/b/memory.current": "45\n",
        },
    )
    assert cgroup_memory_available(root, proc) is None


def test_v2_memory_high_binds_too(tmp_path):
    root, proc = fake(
        tmp_path,
        "0::/a\n",
        {
            "cgroup.controllers": "memory\n",
            "a/memory.max": f"{GiB}\n",
            "a/memory.high": f"{300 * MiB}\n",
            "a/memory.current": f"{100 * MiB}\n",
        },
    )
    assert cgroup_memory_available(root, proc) == 200 * MiB


def test_v2_usage_above_the_limit_is_zero(tmp_path):
    root, proc = fake(
        tmp_path,
        "0::/a\n",
        {"cgroup.controllers": "memory\n", "a/memory.max": "100\n", "a/memory.current": "150\n"},
    )
    assert cgroup_memory_available(root, proc) == 0


def test_v2_hierarchy_mounted_at_the_process_cgroup(tmp_path):
    # a container without a cgroup namespace: /proc/self/cgroup names the host's path, the
    # mount's root is the container's own cgroup
    root, proc = fake(
        tmp_path,
        "0::/kubepods/pod1/ctr\n",
        {
            "cgroup.controllers": "memory\n",
            "memory.max": f"{512 * MiB}\n",
            "memory.current": f"{12 * MiB}\n",
        },
    )
    assert cgroup_memory_available(root, proc) == 500 * MiB


# -- cgroup v1 ---------------------------------------------------------------------------------


def test_v1_limit_minus_usage(tmp_path):
    root, proc = fake(
        tmp_path,
        "5:devices:/slurm/job\n4:memory:/slurm/job\n1:cpu,cpuacct:/slurm/job\n0::/\n",
        {
            "unified/cgroup.procs": "",
            "memory/memory.limit_in_bytes": V1_NO_LIMIT,
            "memory/memory.usage_in_bytes": f"{5 * GiB}\n",
            "memory/slurm/memory.limit_in_bytes": V1_NO_LIMIT,
            "memory/slurm/memory.usage_in_bytes": f"{2 * GiB}\n",
            "memory/slurm/job/memory.limit_in_bytes": f"{600 * MiB}\n",
            "memory/slurm/job/memory.usage_in_bytes": f"{120 * MiB}\n",
            "memory/slurm/job/memory.stat": f"inactive_file {5 * MiB}\n"
            f"total_inactive_file {20 * MiB}\n",
        },
    )
    # hierarchical usage, so the hierarchical inactive file cache is added back
    assert cgroup_memory_available(root, proc) == 500 * MiB


def test_v1_parent_limit_binds(tmp_path):
    root, proc = fake(
        tmp_path,
        "4:memory:/a/b\n",
        {
            "memory/a/memory.limit_in_bytes": f"{300 * MiB}\n",
            "memory/a/memory.usage_in_bytes": f"{100 * MiB}\n",
            "memory/a/b/memory.limit_in_bytes": V1_NO_LIMIT,
            "memory/a/b/memory.usage_in_bytes": f"{50 * MiB}\n",
        },
    )
    assert cgroup_memory_available(root, proc) == 200 * MiB


def test_v1_unlimited_is_none(tmp_path):
    root, proc = fake(
        tmp_path,
        "4:memory:/a\n0::/\n",
        {
            "memory/memory.limit_in_bytes": V1_NO_LIMIT,
            "memory/memory.usage_in_bytes": "1000\n",
            "memory/a/memory.limit_in_bytes": V1_NO_LIMIT,
            "memory/a/memory.usage_in_bytes": "10\n",
            "unified/cgroup.procs": "",
        },
    )
    assert cgroup_memory_available(root, proc) is None


# -- unreadable, absent ------------------------------------------------------------------------


def test_no_cgroup_is_none(tmp_path):
    root, proc = fake(tmp_path, "0::/\n", {"cgroup.controllers": "cpu\n", "cgroup.procs": ""})
    assert cgroup_memory_available(root, proc) is None
    assert cgroup_memory_available(str(tmp_path / "absent"), proc) is None
    assert cgroup_memory_available(root, str(tmp_path / "no_proc_file")) is None
    empty = tmp_path / "empty_proc"
    empty.write_text("")
    assert cgroup_memory_available(root, str(empty)) is None


def test_unreadable_files(tmp_path):
    # a directory where the limit file should be, and garbage in another: no limit there
    root, proc = fake(
        tmp_path,
        "0::/a/b\n",
        {
            "cgroup.controllers": "memory\n",
            "a/memory.max": None,
            "a/memory.current": "1\n",
            "a/b/memory.max": "lots\n",
            "a/b/memory.current": "2\n",
        },
    )
    assert cgroup_memory_available(root, proc) is None
    # a readable limit with an unreadable usage: the limit itself bounds the budget; an
    # unreadable memory.stat adds nothing back
    root, proc = fake(
        tmp_path / "2",
        "0::/a\n",
        {
            "cgroup.controllers": "memory\n",
            "a/memory.max": f"{400 * MiB}\n",
            "a/memory.current": None,
            "a/memory.stat": None,
        },
    )
    assert cgroup_memory_available(root, proc) == 400 * MiB
    root, proc = fake(
        tmp_path / "3",
        "0::/a\n",
        {
            "cgroup.controllers": "memory\n",
            "a/memory.max": f"{400 * MiB}\n",
            "a/memory.current": f"{100 * MiB}\n",
            "a/memory.stat": None,
        },
    )
    assert cgroup_memory_available(root, proc) == 300 * MiB


# -- host_memory_available and choose_store ----------------------------------------------------


@pytest.fixture
def host(tmp_path, monkeypatch):
    """``set(mem_available, limit, used)``: point the budget at a fake meminfo and a fake v2
    cgroup (``limit`` None: no cgroup limit)."""

    def set_host(mem_available: int, limit: int | None, used: int = 0) -> None:
        files = {"cgroup.controllers": "memory\n", "job/memory.current": f"{used}\n"}
        files["job/memory.max"] = "max\n" if limit is None else f"{limit}\n"
        tree = tmp_path / f"host_{uuid.uuid4().hex}"
        root, proc = fake(tree, "0::/job\n", files)
        meminfo = tree / "meminfo"
        meminfo.write_text(
            f"MemTotal:       {32 * GiB // 1024} kB\n"
            f"MemFree:        {mem_available // 2048} kB\n"
            f"MemAvailable:   {mem_available // 1024} kB\n"
        )
        monkeypatch.setattr(budget, "CGROUP_ROOT", root)
        monkeypatch.setattr(budget, "PROC_SELF_CGROUP", proc)
        monkeypatch.setattr(budget, "MEMINFO", str(meminfo))

    return set_host


def test_host_memory_available_takes_the_minimum(host):
    host(24 * GiB, 600 * MiB, used=100 * MiB)
    assert host_memory_available() == 500 * MiB
    host(2 * GiB, 8 * GiB, used=MiB)
    assert host_memory_available() == 2 * GiB
    host(24 * GiB, None, used=3 * GiB)
    assert host_memory_available() == 24 * GiB


def test_choose_store_streams_under_a_tight_cgroup(host):
    # the case: 600 MB cgroup on a 24 GiB machine, a 1 GiB split
    host(24 * GiB, 600 * 10**6, used=20 * 10**6)
    store, why = choose_store(GiB, "cpu")
    half = (600 - 20) * 10**6 // 2
    assert store == "stream"
    assert why == (
        "the split (1.00 GiB) fits neither GPU nor host budget "
        f"(host budget {half / GiB:.2f} GiB: cgroup limit): streaming"
    )
    # a split that fits the cgroup's budget: host, and the reason names the cgroup
    store, why = choose_store(100 * MiB, "cpu")
    assert (store, why) == (
        "host",
        f"the split (0.10 GiB) fits the host-RAM budget ({half / GiB:.2f} GiB: cgroup limit)",
    )
    # an explicit byte budget is the caller's: no cgroup in the message
    assert choose_store(GiB, "cpu", host_budget=10**8) == (
        "stream",
        "the split (1.00 GiB) fits neither GPU nor host budget: streaming",
    )


def test_choose_store_without_a_cgroup_limit_keeps_its_messages(host):
    host(24 * GiB, None)
    assert choose_store(GiB, "cpu") == (
        "host",
        "the split (1.00 GiB) fits the host-RAM budget (12.00 GiB)",
    )
    assert choose_store(20 * GiB, "cpu") == (
        "stream",
        "the split (20.00 GiB) fits neither GPU nor host budget: streaming",
    )
    # the machine is tighter than a loose cgroup: MemAvailable binds, no cgroup named
    host(GiB, 16 * GiB)
    assert choose_store(2 * GiB, "cpu") == (
        "stream",
        "the split (2.00 GiB) fits neither GPU nor host budget: streaming",
    )


# -- a real cgroup -----------------------------------------------------------------------------

REAL_LIMIT = 256 * MiB
HOLD = 64 * MiB

CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("budget_child", sys.argv[1])
budget = importlib.util.module_from_spec(spec)
spec.loader.exec_module(budget)
print("ready", flush=True)
sys.stdin.readline()
hold = b"x" * int(sys.argv[2])
print(budget.cgroup_memory_available(), budget.host_memory_available(), flush=True)
sys.stdin.readline()
"""


def own_cgroup_path(version: str) -> str | None:
    """The process's cgroup path in the v2 (``0::``) or v1 memory hierarchy, or None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if version == "v2" and hierarchy == "0" and controllers == "":
            return path
        if version == "v1" and "memory" in controllers.split(","):
            return path
    return None


def make_cgroup(version: str) -> tuple[Path, str]:
    """A new cgroup under the process's own one with the memory controller and a limit set:
    (its directory, the limit file's name); skips the test when that is not possible."""
    if os.geteuid() != 0:
        pytest.skip("creating a cgroup needs root")
    root = Path("/sys/fs/cgroup")
    path = own_cgroup_path(version)
    if path is None:
        pytest.skip(f"this process is in no cgroup {version} memory hierarchy")
    if version == "v2":
        base = root if (root / "cgroup.controllers").exists() else root / "unified"
        parent = base / path.lstrip("/")
        control = parent / "cgroup.subtree_control"
        try:
            enabled = control.read_text().split()
        except OSError:
            enabled = []
        if "memory" not in enabled:
            pytest.skip(
                f"the memory controller is not enabled for children of {parent} "
                f"({control} lacks 'memory'); enabling it would change a system setting"
            )
        limit_file = "memory.max"
    else:
        parent = root / "memory" / path.lstrip("/")
        limit_file = "memory.limit_in_bytes"
    if not parent.is_dir():
        pytest.skip(f"the process's cgroup {parent} is not mounted here")
    cgroup = parent / f"gpuloader-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        cgroup.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a cgroup under {parent}: {e}")
    try:
        (cgroup / limit_file).write_text(f"{REAL_LIMIT}\n")
    except OSError as e:
        remove_cgroup(cgroup)
        pytest.skip(f"cannot set {limit_file} in {cgroup}: {e}")
    return cgroup, limit_file


def remove_cgroup(cgroup: Path) -> None:
    """rmdir the (emptied) cgroup, retrying while the kernel releases it."""
    for _ in range(50):
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    cgroup.rmdir()


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_real_cgroup_allowance_is_below_its_limit(version):
    cgroup, _ = make_cgroup(version)
    child = None
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, budget.__file__, str(HOLD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        try:
            (cgroup / "cgroup.procs").write_text(f"{child.pid}\n")
        except OSError as e:
            pytest.skip(f"cannot move a process into {cgroup}: {e}")
        child.stdin.write("go\n")
        child.stdin.flush()
        line = child.stdout.readline().split()
        assert len(line) == 2, f"child said {line!r}"
        allowance, available = int(line[0]), int(line[1])
        # the child's own 64 MiB were charged after the move: the allowance is below the limit
        assert 0 <= allowance <= REAL_LIMIT - HOLD // 2
        assert available <= REAL_LIMIT
    finally:
        if child is not None:
            child.kill()
            child.wait()
        remove_cgroup(cgroup)
